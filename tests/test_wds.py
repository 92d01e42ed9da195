"""The webdataset export: tar shards plus an index that train-student, verify and info read as a cache."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import webdataset

from kdcache.errors import ChecksumError, ConfigError, IncompleteCacheError, MismatchError
from kdcache.format import RECORD_ARRAYS, open_cache
from kdcache.losses import LossConfig
from kdcache.shards import write_shards
from kdcache.sources import DigitsSource, Sample, npy_bytes, open_source
from kdcache.student import StudentConfig, train_student
from kdcache.teacher import TeacherConfig
from kdcache.verify import VerifyConfig, verify_cache
from kdcache.export import export_wds
from kdcache.format.wds import INDEX_NAME, WdsCache, shard_name
from cli_checks import invoke, one_error_line, quiet

pytestmark = pytest.mark.usefixtures("one_thread")


def index_of(path) -> dict:
    return json.loads((Path(path) / INDEX_NAME).read_text())


@pytest.fixture(scope="module")
def exported(small_cache, tmp_path_factory) -> Path:
    """The small cache (2 epochs x 3 units) exported without images. Treat as read-only."""
    out = tmp_path_factory.mktemp("wds") / "export"
    export_wds(small_cache, out, log=quiet)
    return out


@pytest.fixture
def export_copy(exported, tmp_path) -> Path:
    return Path(shutil.copytree(exported, tmp_path / "export"))


def test_the_export_reads_the_same_plan_and_records_as_the_cache(exported, small_cache, helpers):
    cache, here = open_cache(exported), open_cache(small_cache)
    assert isinstance(cache, WdsCache)
    assert cache.manifest == here.manifest and cache.complete_epochs() == [0, 1]
    assert {k: e.views for k, e in cache.ledger.items()} == {k: e.views for k, e in here.ledger.items()}
    for name, array in here.samples().items():
        assert cache.samples()[name].dtype == array.dtype
        np.testing.assert_array_equal(cache.samples()[name], array)
    helpers.assert_same_records(helpers.all_records(exported), helpers.all_records(small_cache))  # padding included
    copy = pickle.loads(pickle.dumps(cache))  # as DataLoader workers receive it
    for name, array in here.read_block(1, 5).items():
        assert copy.read_block(1, 5)[name].tobytes() == array.tobytes()


def test_one_shard_per_unit_in_webdataset_groups_and_the_same_bytes_each_export(exported, small_cache, tmp_path):
    index = index_of(exported)
    assert index["version"] == 1 and index["images"] is False
    assert sorted(p.name for p in exported.iterdir()) == sorted(
        [INDEX_NAME, "samples.tar"] + [shard_name(e, u) for e in range(2) for u in range(3)])
    groups = list(webdataset.WebDataset(str(exported / shard_name(1, 2)), shardshuffle=False))
    assert [g["__key__"] for g in groups] == ["e000001-b000004", "e000001-b000005"]
    stored = open_cache(small_cache).read_block(1, 5)
    for name in RECORD_ARRAYS:
        array = np.load(io.BytesIO(groups[1][f"{name}.npy"]))
        assert array.dtype == stored[name].dtype and array.tobytes() == stored[name].tobytes()
    again = index_of(export_wds(small_cache, tmp_path / "again", log=quiet).output)
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in index["shards"]]


def train_losses(run_dir) -> list[float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if line.get("kind") == "train"]


def test_train_student_steps_the_same_from_the_export_locally_and_over_http(small_cache, exported, serve_directory, tmp_path):
    url = serve_directory(exported.parent) + "/" + exported.name
    runs = {}
    for name, cache in (("zarr", str(small_cache)), ("wds", str(exported)), ("http", url)):
        config = StudentConfig(data="digits", model="test_resnet", run_dir=str(tmp_path / name), loss=LossConfig(name="kd"),
                               cache=cache, epochs=1, batch_size=64, log_every=1, max_steps=12)
        train_student(config, log=quiet)
        runs[name] = train_losses(tmp_path / name)
    assert len(runs["zarr"]) == 12
    assert runs["wds"] == runs["zarr"] and runs["http"] == runs["zarr"]


def test_a_zip_archive_of_the_export_reads_in_place(exported, small_cache, tmp_path):
    archive = tmp_path / "export.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as out:
        for path in sorted(exported.iterdir()):
            out.write(path, path.name)
    cache = open_cache(archive)
    assert isinstance(cache, WdsCache) and cache.complete_epochs() == [0, 1]
    for name, array in open_cache(small_cache).read_block(0, 4).items():
        assert cache.read_block(0, 4)[name].tobytes() == array.tobytes()


def test_verify_with_the_teacher_verify_quick_and_info_take_the_export(exported, teacher_ckpt):
    lines = []
    report = verify_cache(VerifyConfig(cache=str(exported), data="digits", views=40,
                                 teacher=TeacherConfig(model="test_resnet", checkpoint=str(teacher_ckpt))), log=lines.append)
    assert report.ok and report.views_checked == 40
    assert "dataset      1437 sample digests match" in lines[0]
    result = invoke("verify", exported, "--quick")
    assert result.exit_code == 0, result.output
    assert "ledger       6 unit(s) committed, 0 missing, 0 damaged" in result.stdout
    result = invoke("info", exported, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["epochs_complete"] == [0, 1] and info["units_committed"] == 6 and info["views_committed"] == 2 * 1437


def failed_verification(result) -> str:
    """A verify that found damaged or missing files: exit 3, one error line counting them, and the report's FAILED line."""
    line = one_error_line(result, 3)
    assert "failed verification" in line and "in the cache's files" in line, line
    failed = [row for row in result.stdout.splitlines() if row.strip().startswith("FAILED")]
    assert len(failed) == 1, result.stdout
    return failed[0]


def test_a_flipped_byte_in_a_shard_is_named(export_copy):
    shard = export_copy / shard_name(1, 2)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    expected = "epoch 1 unit 2 (blocks 4..5), shard e000001-u000002.tar does not match its sha256 in kdcache-wds.json"
    assert expected in failed_verification(invoke("verify", export_copy, "--quick"))
    with pytest.raises(ChecksumError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        open_cache(export_copy).read_block(1, 5)
    assert open_cache(export_copy).read_block(1, 3)["values"].shape == (256, 5)  # the other units read as before


def test_a_missing_shard_is_named_locally_and_over_http(export_copy, serve_directory):
    (export_copy / shard_name(0, 1)).unlink()
    expected = "epoch 0 unit 1 (blocks 2..3), shard e000000-u000001.tar is missing"
    assert expected in failed_verification(invoke("verify", export_copy, "--quick"))
    url = serve_directory(export_copy.parent) + "/" + export_copy.name
    with pytest.raises(IncompleteCacheError, match=r"epoch 0 unit 1 \(blocks 2\.\.3\), shard e000000-u000001\.tar is missing"):
        open_cache(url).read_block(0, 3)


@pytest.mark.parametrize("damage, message", [
    ("truncate", "kdcache-wds.json is not valid JSON ("),
    ("version", "kdcache-wds.json: webdataset container version 3 is not supported by this kdcache (reads 1 and 2)"),
    ("manifest", "kdcache-wds.json: manifest: format_version 7 is not supported"),
])
def test_a_damaged_index_is_a_one_line_format_error(export_copy, damage, message):
    path = export_copy / INDEX_NAME
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:1000])
    else:
        index = json.loads(path.read_text())
        if damage == "version":
            index["version"] = 3
        else:
            index["manifest"]["format_version"] = 7
        path.write_text(json.dumps(index))
    line = one_error_line(invoke("info", export_copy), 3)
    assert line.startswith(f"error: {export_copy}: {message}")


def test_images_in_the_shards_are_the_sources_bytes(small_cache, tmp_path):
    out = export_wds(small_cache, tmp_path / "images", epochs=[1], data="digits", log=quiet).output
    plan, source = open_cache(out).samples(), open_source("digits")
    assert index_of(out)["images"] is True
    layout, seen = open_cache(small_cache).layout, 0
    for entry in index_of(out)["shards"]:
        with tarfile.open(Path(out) / entry["file"]) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar if m.isreg()}
        for block in range(entry["blocks"][0], entry["blocks"][1] + 1):
            slots = range(layout.block_slots(block).start, layout.block_slots(block).stop)
            samples = source.read(plan["source_index"][slots.start : slots.stop].tolist())
            for position, sample in enumerate(samples):
                key = f"e{entry['epoch']:06d}-b{block:06d}-p{position:06d}"
                assert members[f"{key}.npy"] == sample.data
                assert members[f"{key}.cls"] == str(sample.label).encode() and members[f"{key}.key.txt"] == sample.key.encode()
                seen += 1
    assert seen == 1437
    records = open_cache(out).read_block(1, 0)  # records are unchanged by the images next to them
    for name, array in open_cache(small_cache).read_block(1, 0).items():
        assert records[name].tobytes() == array.tobytes()


class _OneChanged(DigitsSource):
    """digits with one sample's pixels changed (same key and label)."""

    def __init__(self, changed: str):
        super().__init__()
        self.changed = changed

    def read(self, indices):
        out = []
        for s in super().read(indices):
            if s.key == self.changed:
                pixels = np.load(io.BytesIO(s.data))
                s = Sample(key=s.key, label=s.label, data=npy_bytes(255 - pixels))
            out.append(s)
        return out


def test_an_export_with_other_images_is_refused_naming_the_sample_and_leaves_nothing(small_cache, tmp_path):
    plan = open_cache(small_cache).samples()
    changed = str(plan["key"][3])  # block 0, position 3: the first sample that differs in export order
    write_shards(_OneChanged(changed), str(tmp_path / "data" / "d-%06d.tar"), samples_per_shard=2000, image_format="npy")
    with pytest.raises(MismatchError, match=f"data .*d-000000.tar \\(block 0\\): sample '{changed}' differs"):
        export_wds(small_cache, tmp_path / "out", data=str(tmp_path / "data" / "d-000000.tar"), log=quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_an_interrupted_export_leaves_no_output_and_no_index(small_cache, tmp_path, monkeypatch):
    import kdcache.format.wds

    write, calls = kdcache.format.wds._write_tar, []

    def dies_on_the_third_file(path, groups):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return write(path, groups)

    monkeypatch.setattr(kdcache.format.wds, "_write_tar", dies_on_the_third_file)
    with pytest.raises(KeyboardInterrupt):
        export_wds(small_cache, tmp_path / "out", log=quiet)
    assert list(tmp_path.iterdir()) == []


def test_chosen_epochs_and_refused_requests(small_cache, export_copy, tmp_path):
    first = export_wds(small_cache, tmp_path / "first", epochs=[0], log=quiet)
    cache = open_cache(first.output)
    assert first.epochs == [0] and cache.manifest == open_cache(small_cache).manifest  # a subset keeps the manifest
    assert cache.present_units() == ([0], [0, 1, 2]) and cache.complete_epochs() == [0]
    with pytest.raises(IncompleteCacheError, match=r"epoch 1 unit 1 \(blocks 2\.\.3\), shard e000001-u000001\.tar is not in this export"):
        cache.read_block(1, 2)
    with pytest.raises(ConfigError, match=r"output .*first exists and is not empty"):
        export_wds(small_cache, tmp_path / "first", log=quiet)
    with pytest.raises(ConfigError, match=r"epochs 3: .* has no epoch 3 \(its epochs are 0-1\)"):
        export_wds(small_cache, tmp_path / "three", epochs=[3], log=quiet)
    # An export is itself a cache to export from; one with a hole is refused, naming the hole.
    index = index_of(export_copy)
    index["shards"] = [s for s in index["shards"] if (s["epoch"], s["unit"]) != (1, 1)]
    (export_copy / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(IncompleteCacheError, match=r"epoch 1 unit 1 \(blocks 2\.\.3\) is not committed, so it cannot be exported"):
        export_wds(export_copy, tmp_path / "second", log=quiet)
    again = open_cache(export_wds(export_copy, tmp_path / "again", epochs=[0], log=quiet).output)
    assert sorted(again.ledger) == [(0, 0), (0, 1), (0, 2)]


def test_the_export_command_writes_a_wds_subset_that_verifies(small_cache, tmp_path):
    out = tmp_path / "subset"
    result = invoke("export", small_cache, out, "--format", "wds", "--epochs", "1", "--blocks", "0-3", "--data", "digits")
    assert result.exit_code == 0, result.output
    assert "exported 2 unit(s), 1024 views" in result.stdout and "(wds," in result.stdout
    cache = open_cache(out)
    assert isinstance(cache, WdsCache) and cache.images and cache.present_units() == ([1], [0, 1])
    result = invoke("verify", out, "--quick")
    assert result.exit_code == 0, result.output
    assert "2 unit(s) committed, 0 missing, 0 damaged (a subset: epochs 1 of 2, units 0-1 of 3)" in result.stdout
    line = one_error_line(invoke("export", small_cache, tmp_path / "zarr", "--data", "digits"), 2)
    assert line == "error: --data digits stores images next to the records of a webdataset export; add --format wds"


# ---- subsets --------------------------------------------------------------------------------------


def test_the_index_carries_the_subset_declaration_as_a_cache_does(small_cache, exported, tmp_path):
    assert "subset" not in index_of(exported) and open_cache(exported).subset is None  # every unit: a whole cache
    out = export_wds(small_cache, tmp_path / "epoch0", epochs=[0], log=quiet).output
    declared = index_of(out)["subset"]
    assert (declared["epochs"], declared["units"], declared["source"]) == ([0], [0, 1, 2], str(small_cache))
    cache = open_cache(out)
    assert (cache.subset.epochs, cache.subset.units) == ([0], [0, 1, 2]) and cache.held_blocks() == list(range(6))
    # A zarr block subset exported again as tar shards keeps what it declares.
    result = invoke("export", small_cache, tmp_path / "blocks", "--blocks", "2-5")
    assert result.exit_code == 0, result.output
    again = open_cache(export_wds(tmp_path / "blocks", tmp_path / "blocks-wds", log=quiet).output)
    assert (again.subset.epochs, again.subset.units, again.subset.source) == ([0, 1], [1, 2], str(tmp_path / "blocks"))


def test_a_wds_subset_missing_a_declared_shard_is_refused_naming_it(small_cache, tmp_path):
    out = Path(export_wds(small_cache, tmp_path / "epoch1", epochs=[1], log=quiet).output)
    index = index_of(out)
    index["shards"] = [s for s in index["shards"] if (s["epoch"], s["unit"]) != (1, 2)]
    (out / INDEX_NAME).write_text(json.dumps(index))
    config = StudentConfig(data="digits", model="test_resnet", run_dir=str(tmp_path / "run"), loss=LossConfig(name="kd"),
                           cache=str(out), epochs=1, batch_size=64, max_steps=2)
    with pytest.raises(IncompleteCacheError, match=r"epoch 1 unit 2 \(blocks 4\.\.5\) is missing from this subset "
                                                   r"\(it declares epochs 1, blocks 0-5\); export it again from "):
        train_student(config, log=quiet)
    index["subset"]["units"] = [0, 5]
    (out / INDEX_NAME).write_text(json.dumps(index))
    line = one_error_line(invoke("info", out), 3)
    assert line == (f"error: {out}: {INDEX_NAME}: subset: field units = [0, 5]; "
                    "expected a non-empty sorted list of distinct integers in 0..2")


def test_an_export_of_an_export_stays_tar_shards(exported, tmp_path):
    line = one_error_line(invoke("export", exported, tmp_path / "zarr", "--epochs", "1"), 2)
    assert line == (f"error: {exported} is a webdataset export; --format zarr copies the shard files of a zarr cache "
                    "(or its zip archive): export it again with --format wds, or export from the cache it came from")
    assert not (tmp_path / "zarr").exists()
    result = invoke("export", exported, tmp_path / "wds", "--epochs", "1", "--format", "wds")
    assert result.exit_code == 0, result.output
    cache = open_cache(tmp_path / "wds")
    assert sorted(cache.ledger) == [(1, 0), (1, 1), (1, 2)] and cache.subset.epochs == [1]


def test_merge_refuses_a_webdataset_export_in_one_line(small_cache, exported, tmp_path):
    for inputs in ([small_cache, exported], [exported, small_cache]):
        line = one_error_line(invoke("merge", tmp_path / "out", *inputs), 2)
        assert line == (f"error: {exported} is a webdataset export; merge takes zarr caches (or their zip archives): "
                        "merge the caches it was exported from")
        assert not (tmp_path / "out").exists()


def test_info_names_a_webdataset_export_and_its_subset(small_cache, exported, tmp_path):
    text = invoke("info", exported).stdout
    assert text.startswith(f"cache       {exported}: webdataset export (format v1") and "subset" not in text
    out = export_wds(small_cache, tmp_path / "epoch1", epochs=[1], log=quiet).output
    result = invoke("info", out, "--json")
    info = json.loads(result.stdout)
    assert (info["container"], info["subset"]["epochs"], info["subset"]["units_committed"]) == ("wds", [1], 3)
    assert "subset      epochs 1 of 2, blocks 0-5 of 6 (1437 of 1437 samples); 1 of 1 epochs whole" in invoke("info", out).stdout
