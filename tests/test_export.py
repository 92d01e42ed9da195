"""`kdcache export`: a subset of a cache's epochs and blocks, as a directory or one zip archive.

An export holds the source's manifest and plan unchanged and the chosen units byte for byte;
train-student, info and verify read it (from a directory, a .zip, or a .zip over http); every
refusal is one line naming the culprit and leaves nothing at OUT.
"""

from __future__ import annotations

import functools
import http.server
import io
import json
import os
import re
import shutil
import threading
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdcache.errors import ChecksumError, ConfigError, IncompleteCacheError
from kdcache.export import FORMATS, ExportConfig, export_cache
from kdcache.format import format_selection, parse_selection
from kdcache.format import RECORD_ARRAYS, ledger_key, open_cache, shard_key
from kdcache.losses import LossConfig
from kdcache.student import StudentConfig, train_student
from kdcache.verify import VerifyConfig, verify_cache
from kdcache.teacher import TeacherConfig
from kdcache_cli.main import app

pytestmark = pytest.mark.usefixtures("one_thread")


def quiet(message: str) -> None:
    pass


def export(cache, output, **options):
    return export_cache(ExportConfig(cache=str(cache), output=str(output), **options), log=quiet)


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_error_line(result, exit_code: int) -> str:
    """The command failed with ``exit_code`` and one `error:` line on stderr (verify also prints its report)."""
    assert result.exit_code == exit_code, result.output
    assert isinstance(result.exception, SystemExit), f"escaped: {result.exception!r}"
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and "Traceback" not in result.output
    return line


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir() if ".exporting-" in p.name or ".creating-" in p.name)


def unit_files(path) -> dict:
    """(epoch, unit, array) -> the bytes of that shard file, for every committed unit (any location)."""
    cache = open_cache(path)
    return {(*key, array): cache.location.read(shard_key(array, *key)) for key in cache.ledger for array in RECORD_ARRAYS}


def train_losses(run_dir) -> list[float]:
    lines = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if line.get("kind") == "train"]


def train(cache, run_dir, log=quiet, **overrides) -> list[float]:
    settings = dict(data="digits", model="test_resnet", run_dir=str(run_dir), loss=LossConfig(name="kd"), cache=str(cache),
                    epochs=1, batch_size=64, log_every=1, max_steps=12, amp="none", device="cpu")
    settings.update(overrides)
    train_student(StudentConfig(**settings), log=log)
    return train_losses(run_dir)


@pytest.fixture(scope="module")
def exports(tmp_path_factory, small_cache):
    """The small cache (2 epochs, 6 blocks in 3 units) exported whole as a zip, as epoch 1 only, and as blocks 0-3."""
    root = tmp_path_factory.mktemp("exports")
    export(small_cache, root / "all.zip", format="zip")
    export(small_cache, root / "epoch1", epochs=(1,))
    export(small_cache, root / "blocks", blocks=(0, 1, 2, 3))
    return root


# ---- the selection spec -------------------------------------------------------------------------


def test_selection_specs_read_numbers_and_ranges():
    assert parse_selection("0,2-4", "--epochs") == (0, 2, 3, 4)
    assert parse_selection(" 3, 1,1-2 ", "--blocks") == (1, 2, 3)
    assert format_selection([0, 2, 3, 4, 7]) == "0,2-4,7"
    for text, problem in [("", "selects nothing"), (",", "selects nothing"), ("1-x", "'1-x' is not a number or a range"),
                          ("-1", "'-1' is not a number"), ("4-2", "the range 4-2 runs backwards")]:
        with pytest.raises(ConfigError, match=re.escape(problem)):
            parse_selection(text, "--epochs")


# ---- what an export holds -----------------------------------------------------------------------


def test_an_epoch_subset_keeps_the_manifest_and_the_chosen_units_byte_for_byte(exports, small_cache):
    source, sub = open_cache(small_cache), open_cache(exports / "epoch1")
    assert sub.manifest == source.manifest  # same epochs planned, same numbers: epoch 1 stays epoch 1
    assert sorted(sub.ledger) == [(1, 0), (1, 1), (1, 2)]
    assert sub.ledger == {key: source.ledger[key] for key in sub.ledger}  # commit times included
    want = {key: data for key, data in unit_files(small_cache).items() if key[0] == 1}
    assert unit_files(exports / "epoch1") == want
    assert sub.complete_epochs() == [1] and sub.present_units() == ([1], [0, 1, 2])
    for name, array in source.samples().items():
        assert sub.samples()[name].tolist() == array.tolist()


def test_a_block_subset_holds_whole_units_of_every_epoch(exports, small_cache):
    sub = open_cache(exports / "blocks")
    assert sorted(sub.ledger) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert unit_files(exports / "blocks") == {k: v for k, v in unit_files(small_cache).items() if k[1] < 2}
    assert sub.complete_epochs() == [] and sub.present_units() == ([0, 1], [0, 1])


def test_a_zip_export_is_one_file_of_stored_members_read_in_place(exports, small_cache, helpers):
    path = exports / "all.zip"
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
    assert {info.compress_type for info in infos} == {zipfile.ZIP_STORED}
    names = {info.filename for info in infos}
    assert {"zarr.json", ledger_key(1, 2), shard_key("params", 0, 1)} <= names
    assert open_cache(path).manifest == open_cache(small_cache).manifest
    assert unit_files(path) == unit_files(small_cache)
    helpers.assert_same_records(helpers.all_records(path), helpers.all_records(small_cache))


def test_the_same_export_twice_is_the_same_archive(tmp_path, exports, small_cache):
    again = export(small_cache, tmp_path / "again.zip", format="zip")
    assert again.units == 6 and again.views == 2 * 1437 and again.bytes == (tmp_path / "again.zip").stat().st_size
    assert (tmp_path / "again.zip").read_bytes() == (exports / "all.zip").read_bytes()


def test_an_export_of_an_archive_equals_the_export_of_its_source(tmp_path, exports, small_cache):
    from_zip = export(exports / "all.zip", tmp_path / "from-zip", epochs=(1,))
    assert from_zip.epochs == [1] and from_zip.blocks == [0, 1, 2, 3, 4, 5] and from_zip.units == 3
    assert unit_files(tmp_path / "from-zip") == unit_files(exports / "epoch1")
    assert open_cache(tmp_path / "from-zip").ledger == open_cache(exports / "epoch1").ledger


# ---- reading an export --------------------------------------------------------------------------


def test_train_student_from_the_zip_steps_like_from_the_directory(tmp_path, exports, small_cache):
    directory = train(small_cache, tmp_path / "dir")
    archive = train(exports / "all.zip", tmp_path / "zip")
    assert len(archive) == 12 and archive == directory


def test_train_student_from_an_epoch_subset_uses_the_epochs_present_and_cycles(tmp_path, small_cache, exports):
    export(small_cache, tmp_path / "epoch0", epochs=(0,))
    # Training epoch 0 reads cache epoch 0 in both: the same steps.
    assert train(tmp_path / "epoch0", tmp_path / "a") == train(small_cache, tmp_path / "b")
    messages = []
    losses = train(exports / "epoch1", tmp_path / "c", log=messages.append, epochs=2, batch_size=256, max_steps=7)
    assert len(losses) == 7  # 5 steps per epoch: both training epochs read epoch 1 (epoch 0 is absent: reading it would fail)
    assert "the cache holds epochs 1 of the 2 planned: training from those" in messages
    assert "training for 2 epochs from 1 cached epochs: cycling through them" in messages


def test_train_student_from_a_block_subset_trains_on_its_samples_only(tmp_path, exports):
    messages = []
    losses = train(exports / "blocks", tmp_path / "run", log=messages.append, batch_size=64, max_steps=None)
    assert len(losses) == 1024 // 64  # 4 blocks of 256 (blocks 4-5 would fail to read: absent)
    assert "the cache holds blocks 0-3 of 6: training on their 1024 of 1437 samples only" in messages


def test_verify_checks_the_units_present_with_their_original_epoch_numbers(exports, teacher_ckpt):
    report = verify_cache(VerifyConfig(cache=str(exports / "epoch1"), data="digits", views=8,
                                 teacher=TeacherConfig(model="test_resnet", checkpoint=str(teacher_ckpt))), log=quiet)
    assert report.ok and report.views_checked == 8  # the parameters re-drawn by (seed, epoch 1) match the stored ones
    assert dict(report.checks)["ledger"] == "3 unit(s) committed, 0 missing, 0 damaged (a subset: epochs 1 of 2, units 0-2 of 3)"


@pytest.mark.parametrize("name", ["all.zip", "blocks"])
def test_info_and_verify_quick_read_an_export(exports, name):
    result = invoke("info", exports / name, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["units_committed"] == (6 if name == "all.zip" else 4) and info["bytes_per_view"] > 0
    result = invoke("verify", exports / name, "--quick")
    assert result.exit_code == 0 and "result       OK" in result.stdout


def flip_member_byte(archive: Path, member: str) -> None:
    """Flip one byte in the middle of a stored member's data, in place."""
    with zipfile.ZipFile(archive) as z:
        content = z.read(member)
    data = bytearray(archive.read_bytes())
    start = data.find(content)
    assert start > 0 and data.find(content, start + 1) < 0
    data[start + len(content) // 2] ^= 0xFF
    archive.write_bytes(bytes(data))


def test_a_damaged_archive_member_is_reported_naming_epoch_and_unit(tmp_path, exports):
    path = tmp_path / "copy.zip"
    shutil.copy(exports / "all.zip", path)
    key = shard_key("values", 1, 2)
    flip_member_byte(path, key)
    result = invoke("verify", path, "--quick")
    one_error_line(result, 3)
    assert f"{path}: epoch 1 unit 2 (blocks 4..5): file {key} is damaged in the archive" in result.stdout
    with pytest.raises(ChecksumError, match=re.escape(f"epoch 1 unit 2 (blocks 4..5): file {key} is damaged")):
        open_cache(path).read_block(1, 4)
    open_cache(path).read_block(1, 2)  # the other units read as before


def test_a_file_that_is_not_an_archive_is_named(tmp_path):
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not a zip at all")
    line = one_error_line(invoke("info", bad), 3)
    assert line.startswith(f"error: {bad}: not a zip archive")
    line = one_error_line(invoke("info", tmp_path / "none.zip"), 3)
    assert line == f"error: cache {tmp_path / 'none.zip'} does not exist"


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Python's http.server plus single byte ranges, which reading a zip over http needs (as real servers serve)."""

    def log_message(self, *args):
        pass

    def send_head(self):
        wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if wanted is None:
            return super().send_head()
        try:
            handle = open(self.translate_path(self.path), "rb")
        except OSError:
            self.send_error(404)
            return None
        with handle:
            size = os.fstat(handle.fileno()).st_size
            start, end = int(wanted[1]), min(int(wanted[2] or size - 1), size - 1)
            if start >= size:
                self.send_error(416)
                return None
            handle.seek(start)
            body = handle.read(end - start + 1)
        self.send_response(206)
        self.send_header("Content-Type", "application/zip")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return io.BytesIO(body)


@pytest.fixture
def served_zip(exports):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_RangeHandler, directory=str(exports)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/all.zip"
    finally:
        server.shutdown()
        server.server_close()


def test_a_zip_over_http_trains_like_the_local_archive(tmp_path, served_zip, exports, small_cache):
    assert open_cache(served_zip).manifest == open_cache(small_cache).manifest
    assert unit_files(served_zip) == unit_files(small_cache)
    assert train(served_zip, tmp_path / "http") == train(exports / "all.zip", tmp_path / "local")
    result = invoke("verify", served_zip, "--quick")
    assert result.exit_code == 0 and "result       OK" in result.stdout


def test_cli_export_prints_a_summary(tmp_path, small_cache):
    out = tmp_path / "sub.zip"
    result = invoke("export", small_cache, out, "--epochs", "1", "--blocks", "2-5", "--format", "zip")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"exported 2 unit(s), {1437 - 512} views to {out} (zip, ")
    assert "a block subset: blocks 2-5 of 6 (925 of 1437 samples); train-student trains on these only" in result.stderr
    assert sorted(open_cache(out).ledger) == [(1, 1), (1, 2)] and leftovers(tmp_path) == []


# ---- refusals -------------------------------------------------------------------------------------


@pytest.mark.parametrize("options, code, message", [
    (["--epochs", "2"], 2, "--epochs 2: {cache} has no epoch 2 (its epochs are 0-1)"),
    (["--epochs", "0,5-6"], 2, "--epochs 0,5-6: {cache} has no epoch 5 (its epochs are 0-1)"),
    (["--blocks", "6"], 2, "--blocks 6: {cache} has no block 6 (its blocks are 0-5)"),
    (["--blocks", "0-2"], 2, "--blocks 0-2 cuts unit 1 (blocks 2..3): only whole units can be exported, 2 blocks each; "
                             "take --blocks 0-3 or leave the cut unit out"),
    (["--epochs", ""], 2, "--epochs '' selects nothing; expected e.g. 0,2-4"),
    (["--blocks", "1-"], 2, "--blocks '1-': '1-' is not a number or a range; expected e.g. 0,2-4"),
    (["--format", "tar"], 2, "--format 'tar'; expected one of {formats}"),
    (["--format", "zip"], 2, "output {out}: a zip export must end in .zip (that is how kdcache recognises an archive)"),
], ids=["epoch", "epoch-range", "block", "cut-unit", "empty", "bad-spec", "format", "zip-suffix"])
def test_a_bad_selection_is_one_line_and_leaves_nothing(tmp_path, small_cache, options, code, message):
    out = tmp_path / "out"
    line = one_error_line(invoke("export", small_cache, out, *options), code)
    assert line == "error: " + message.format(cache=small_cache, out=out, formats=", ".join(FORMATS))
    assert not out.exists() and leftovers(tmp_path) == []


def test_a_zarr_export_named_like_an_archive_is_refused(tmp_path, small_cache):
    line = one_error_line(invoke("export", small_cache, tmp_path / "out.zip"), 2)
    assert line == f"error: output {tmp_path / 'out.zip'} ends in .zip but --format is zarr; pass --format zip for an archive, or choose another name"
    with pytest.raises(ConfigError, match=r"--epochs selects nothing; leave it out"):
        ExportConfig(cache=str(small_cache), output=str(tmp_path / "x"), epochs=())


@pytest.mark.parametrize("kind", ["directory", "empty-directory", "file"])
def test_an_existing_output_is_left_alone(tmp_path, small_cache, helpers, kind):
    out = tmp_path / ("out.zip" if kind == "file" else "out")
    if kind == "file":
        out.write_bytes(b"keep me")
    else:
        out.mkdir()
        if kind == "directory":
            (out / "notes.txt").write_text("keep me")
    before = helpers.tree_hashes(tmp_path)
    line = one_error_line(invoke("export", small_cache, out, "--format", "zip" if kind == "file" else "zarr"), 2)
    assert line == f"error: output {out} already exists; export writes a new cache, choose a new path"
    assert helpers.tree_hashes(tmp_path) == before and out.exists()


@pytest.fixture(scope="module")
def partial_cache(tmp_path_factory, make_config, helpers):
    """Epoch 0 whole, epoch 1 unit 0 only (a precompute stopped after 4 units)."""
    path = tmp_path_factory.mktemp("partial") / "cache"
    helpers.run_precompute(make_config(path, max_units=4))
    return path


def test_uncommitted_source_units_are_refused_naming_the_first(tmp_path, partial_cache):
    out = tmp_path / "out.zip"
    line = one_error_line(invoke("export", partial_cache, out, "--format", "zip"), 3)
    assert line == (f"error: {partial_cache}: epoch 1 unit 1 (blocks 2..3) is not committed, so it cannot be exported; "
                    "choose other --epochs/--blocks (complete epochs: 0) or finish the cache with kdcache precompute-logits --resume")
    assert not out.exists() and leftovers(tmp_path) == []
    # What is whole exports: epoch 0, or unit 0 of both epochs.
    assert export(partial_cache, tmp_path / "e0", epochs=(0,)).units == 3
    assert export(partial_cache, tmp_path / "u0", blocks=(0, 1)).units == 2


@pytest.mark.parametrize("fmt", ["zarr", "zip"])
def test_a_damaged_source_unit_stops_the_export_and_leaves_nothing(tmp_path, small_cache, fmt):
    source = tmp_path / "source"
    shutil.copytree(small_cache, source)
    key = shard_key("tail", 1, 2)
    data = bytearray((source / key).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (source / key).write_bytes(bytes(data))
    out = tmp_path / ("out.zip" if fmt == "zip" else "out")
    line = one_error_line(invoke("export", source, out, "--format", fmt), 3)
    assert line.startswith(f"error: {source}: epoch 1 unit 2: file {key} does not match its ledger checksum")
    assert not out.exists() and leftovers(tmp_path) == []
    assert export(source, tmp_path / "ok", blocks=(0, 1, 2, 3)).units == 4  # the undamaged units still export


def test_a_cache_without_committed_units_has_nothing_to_export(tmp_path, small_cache):
    empty = tmp_path / "empty"
    shutil.copytree(small_cache, empty)
    for entry in (empty / "ledger").glob("e*-u*.json"):  # the epoch indexes stay: they list entries that are gone
        entry.unlink()
    line = one_error_line(invoke("export", empty, tmp_path / "out"), 3)
    assert line == f"error: {empty}: no unit is committed; there is nothing to export"
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    result = invoke("verify", empty, "--quick")  # and verify does not take an empty cache for a subset
    one_error_line(result, 3)
    assert "FAILED       no unit is committed" in result.stdout


# ---- the subset declaration ------------------------------------------------------------------------


def root_attributes(path) -> dict:
    return json.loads((Path(path) / "zarr.json").read_text())["attributes"]


def test_an_export_declares_the_epochs_and_units_it_kept(exports, small_cache):
    epoch1, blocks = root_attributes(exports / "epoch1"), root_attributes(exports / "blocks")
    assert set(epoch1) == {"kdcache", "kdcache_subset"}  # the manifest, unchanged, and the declaration next to it
    assert epoch1["kdcache"] == root_attributes(small_cache)["kdcache"]
    assert {k: epoch1["kdcache_subset"][k] for k in ("epochs", "units", "source")} == {"epochs": [1], "units": [0, 1, 2],
                                                                                     "source": str(small_cache)}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", epoch1["kdcache_subset"]["exported"])
    assert (blocks["kdcache_subset"]["epochs"], blocks["kdcache_subset"]["units"]) == ([0, 1], [0, 1])
    sub = open_cache(exports / "blocks").subset
    assert (sub.epochs, sub.units, sub.blocks(open_cache(small_cache).layout)) == ([0, 1], [0, 1], [0, 1, 2, 3])
    # Every unit of every epoch is a whole cache: it declares nothing.
    assert open_cache(exports / "all.zip").subset is None and open_cache(small_cache).subset is None


def test_a_subset_of_a_subset_keeps_its_declaration_and_names_its_own_source(tmp_path, exports):
    again = export(exports / "blocks", tmp_path / "again")
    assert (again.epochs, again.blocks) == ([0, 1], [0, 1, 2, 3])
    sub = open_cache(tmp_path / "again").subset
    assert (sub.epochs, sub.units, sub.source) == ([0, 1], [0, 1], str(exports / "blocks"))
    line = one_error_line(invoke("export", exports / "blocks", tmp_path / "more", "--blocks", "4-5"), 3)
    assert line == (f"error: {exports / 'blocks'}: epoch 0 unit 2 (blocks 4..5) is not committed, so it cannot be exported; "
                    "choose other --epochs/--blocks (the subset holds epochs 0-1, blocks 0-3)")


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update(units=[0, 3]), "field units = [0, 3]; expected a non-empty sorted list of distinct integers in 0..2"),
    (lambda s: s.update(epochs=[]), "field epochs = []; expected a non-empty sorted list of distinct integers in 0..1"),
    (lambda s: s.pop("source"), "missing field 'source'"),
    (lambda s: s.update(source=7), "field source = 7; expected a string"),
], ids=["unit-out-of-range", "no-epochs", "no-source", "source-type"])
def test_a_damaged_declaration_is_refused_naming_the_field(tmp_path, exports, edit, message):
    path = Path(shutil.copytree(exports / "blocks", tmp_path / "copy"))
    root = json.loads((path / "zarr.json").read_text())
    edit(root["attributes"]["kdcache_subset"])
    (path / "zarr.json").write_text(json.dumps(root))
    line = one_error_line(invoke("info", path), 3)
    assert line == f"error: {path}: attributes.kdcache_subset: {message}"


@pytest.fixture(scope="module")
def first_units(tmp_path_factory, make_config, helpers):
    """A precompute stopped inside its first epoch: epoch 0 units 0 and 1 of 3 (blocks 0-3 of 6)."""
    path = tmp_path_factory.mktemp("first-units") / "cache"
    helpers.run_precompute(make_config(path, max_units=2))
    return path


def test_a_precompute_stopped_in_its_first_epoch_exports_only_what_is_asked(tmp_path, first_units):
    # Not a subset by default: the whole of epoch 0 is asked for, and unit 2 is missing.
    line = one_error_line(invoke("export", first_units, tmp_path / "out"), 3)
    assert line == (f"error: {first_units}: epoch 0 unit 2 (blocks 4..5) is not committed, so it cannot be exported; "
                    "choose other --epochs/--blocks (complete epochs: none) or finish the cache with kdcache precompute-logits --resume")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    # Asked for, its committed units make an explicit subset.
    assert export(first_units, tmp_path / "sub", blocks=(0, 1, 2, 3)).units == 2
    sub = open_cache(tmp_path / "sub").subset
    assert (sub.epochs, sub.units, sub.source) == ([0], [0, 1], str(first_units))


def test_a_subset_missing_a_declared_unit_is_refused_naming_it(tmp_path, exports, teacher_ckpt):
    path = Path(shutil.copytree(exports / "blocks", tmp_path / "holed"))
    (path / ledger_key(1, 1)).unlink()
    with pytest.raises(IncompleteCacheError) as refused:
        train(path, tmp_path / "run")
    assert str(refused.value) == (f"cache {path}: epoch 1 unit 1 (blocks 2..3) is missing from this subset (it declares "
                                  f"epochs 0-1, blocks 0-3); export it again from {open_cache(path).subset.source}")
    assert not (tmp_path / "run").exists()
    result = invoke("verify", path, "--quick")
    one_error_line(result, 3)
    assert "FAILED       epoch 1 unit 1 (blocks 2..3) is not committed" in result.stdout


def test_precompute_refuses_to_resume_a_subset_naming_its_source(tmp_path, exports, make_config, small_cache):
    """Filling a subset's holes would leave a whole cache that still declares itself a subset."""
    from kdcache.precompute import precompute_logits

    path = Path(shutil.copytree(exports / "blocks", tmp_path / "subset"))
    before = {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError) as refused:
        precompute_logits(make_config(path, resume=True), log=quiet)
    assert str(refused.value) == (f"{path} is a subset exported from {small_cache}; resume or extend that cache "
                                  "and export again")
    assert {p: p.read_bytes() for p in path.rglob("*") if p.is_file()} == before


def test_info_says_what_a_location_is_and_which_part_a_subset_holds(exports, small_cache):
    text = invoke("info", exports / "blocks").stdout
    assert text.startswith(f"cache       {exports / 'blocks'}: zarr cache (format v1")
    assert ("subset      epochs 0-1 of 2, blocks 0-3 of 6 (1024 of 1437 samples); 2 of 2 epochs whole, 4/4 units committed\n"
            "            exported 20") in text and f" from {small_cache}\n" in text
    assert "complete (none)" not in text
    info = json.loads(invoke("info", exports / "epoch1", "--json").stdout)
    assert (info["container"], info["zip_archive"], info["subset"]["epochs"], info["subset"]["blocks"]) == ("zarr", False, [1], list(range(6)))
    text = invoke("info", exports / "all.zip").stdout
    assert text.startswith(f"cache       {exports / 'all.zip'}: zip archive of a zarr cache (format v1")
    assert "epochs      2 of 2 complete (0-1); 6/6 units committed" in text and "subset" not in text
    assert json.loads(invoke("info", exports / "all.zip", "--json").stdout)["subset"] is None
