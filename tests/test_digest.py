"""The content digest: equal for equal content in any container, different after any edit of the recipe or
of a unit, computable from docs/format.md alone, and enforced by `verify` and `train-student --expect-digest`."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from kdcache.export import ExportConfig, export_cache
from kdcache.format import ledger_key, open_cache, sha256_bytes, shard_key
from kdcache.format.ledger import index_cache
from kdcache.merge import merge_caches
from cli_checks import invoke, quiet

pytestmark = pytest.mark.usefixtures("one_thread")


def one_error_line(result, exit_code: int) -> str:
    """One `error:` line, and the last: unlike cli_checks.one_error_line, other lines may come before it."""
    assert result.exit_code == exit_code, result.output
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and sum(line.startswith("error:") for line in lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return lines[-1]


def digest_of(path) -> str:
    return open_cache(path).digest()


def edit_manifest(path: Path, edit) -> None:
    root = json.loads((path / "zarr.json").read_bytes())
    edit(root["attributes"]["kdcache"])
    (path / "zarr.json").write_text(json.dumps(root, indent=1))


# ---- one digest for one content ------------------------------------------------------------------------------


def test_equal_content_has_one_digest_in_every_container(small_cache, tmp_path, serve_directory):
    digest = digest_of(small_cache)
    export_cache(ExportConfig(cache=str(small_cache), output=str(tmp_path / "all.zip"), format="zip"), log=quiet)
    export_cache(ExportConfig(cache=str(small_cache), output=str(tmp_path / "copy")), log=quiet)
    for epoch in (0, 1):  # two halves, each a subset with its own (other) digest
        export_cache(ExportConfig(cache=str(small_cache), output=str(tmp_path / f"half{epoch}"), epochs=(epoch,)), log=quiet)
    merge_caches(str(tmp_path / "merged"), [str(tmp_path / "half1"), str(tmp_path / "half0")], log=quiet)
    served = tmp_path / "www" / "cache"
    shutil.copytree(small_cache, served)
    url = f"{serve_directory(tmp_path / 'www')}/cache"
    assert digest_of(tmp_path / "all.zip") == digest_of(tmp_path / "copy") == digest_of(tmp_path / "merged") == digest
    assert digest_of(url) == digest
    assert len({digest, digest_of(tmp_path / "half0"), digest_of(tmp_path / "half1")}) == 3
    result = invoke("info", tmp_path / "all.zip", "--json")
    assert json.loads(result.stdout)["digest"] == digest
    assert f"digest      {digest}" in invoke("info", url).stdout


def test_provenance_is_not_content(cache_copy):
    path, _ = cache_copy
    digest = digest_of(path)
    edit_manifest(path, lambda m: m.update(created="2001-01-01T00:00:00+00:00", command="made elsewhere"))
    entry = json.loads((path / ledger_key(0, 0)).read_bytes())
    entry["committed"] = "2001-01-01T00:00:00+00:00"
    (path / ledger_key(0, 0)).write_text(json.dumps(entry))
    assert digest_of(path) == digest


# ---- a different digest for anything else ------------------------------------------------------------------------


@pytest.mark.parametrize("field, edit", [
    ("seed", lambda m: m.update(seed=m["seed"] + 1)),
    ("augmentation", lambda m: m["augmentation"].update(hflip=0.25)),
    ("teacher hash", lambda m: m["teacher"].update(weights_sha256="f" * 64)),
    ("dataset digest", lambda m: m["dataset"].update(digest="e" * 64)),
    ("epochs", lambda m: m.update(epochs=1)),
])
def test_an_edit_of_the_manifest_changes_the_digest(cache_copy, field, edit):
    path, _ = cache_copy
    digest = digest_of(path)
    edit_manifest(path, edit)
    assert digest_of(path) != digest, field


def forge_unit(path: Path, epoch: int, unit: int) -> None:
    """Replace one unit's tail file by another unit's and commit it consistently (checksums that match)."""
    donor = path / shard_key("tail", epoch, (unit + 1) % 3)
    (path / shard_key("tail", epoch, unit)).write_bytes(donor.read_bytes())
    entry = json.loads((path / ledger_key(epoch, unit)).read_bytes())
    entry["files"][shard_key("tail", epoch, unit)] = {"sha256": sha256_bytes(donor.read_bytes()), "bytes": donor.stat().st_size}
    (path / ledger_key(epoch, unit)).write_text(json.dumps(entry, indent=1))


def test_a_change_of_any_unit_changes_the_digest(cache_copy, tmp_path):
    path, _ = cache_copy
    digest = digest_of(path)
    shutil.rmtree(path / "ledger" / "epochs")  # the previous layout: every entry is read from its own file
    assert digest_of(path) == digest
    forge_unit(path, 1, 0)
    open_cache(path).verify_unit(1, 0)  # consistent: every checksum passes
    forged = digest_of(path)
    assert forged != digest
    (path / ledger_key(0, 2)).unlink()  # a unit uncommitted
    assert digest_of(path) not in (digest, forged)


def test_with_indexes_an_edit_shows_in_the_digest_or_refuses_the_unit(cache_copy):
    path, _ = cache_copy
    index_cache(path, log=quiet)
    digest = digest_of(path)
    forge_unit(path, 1, 0)  # the entry changed, its epoch index not
    assert digest_of(path) == digest  # the index names the content it was made from...
    result = invoke("verify", path, "--quick", "--expect-digest", digest)
    assert result.exit_code == 3 and "disagree (files.tail/c/1/0/0)" in result.stdout  # ...and the unit is refused
    index_cache(path, log=quiet)  # the index rebuilt from the edited entry
    assert digest_of(path) != digest


def documented_digest(path: Path) -> str:
    """docs/format.md, "The content digest", computed from the files alone."""
    def canonical(value) -> bytes:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")

    def entry_lines(ledger: Path) -> list[bytes]:
        entries = [json.loads(p.read_bytes()) for p in sorted(ledger.glob("e*-u*.json"))]
        lines = []
        for e in sorted(entries, key=lambda e: (e["epoch"], e["unit"])):
            files = {k: {"sha256": f["sha256"], "bytes": f["bytes"]} for k, f in e["files"].items()}
            lines.append(canonical({"epoch": e["epoch"], "unit": e["unit"], "views": e["views"], "files": files}))
        return lines

    root = json.loads((path / "zarr.json").read_bytes())["attributes"]
    manifest = {k: v for k, v in root["kdcache"].items() if k not in ("created", "command")}
    subset = root.get("kdcache_subset")
    lines = [canonical(manifest), canonical(None if subset is None else {"epochs": subset["epochs"], "units": subset["units"]})]
    lines += entry_lines(path / "ledger")
    teachers = sorted(p.name for p in (path / "teachers").iterdir() if not p.name.startswith(".")) if (path / "teachers").is_dir() else []
    for name in teachers:  # each added teacher: its group attributes less their provenance, then its own ledger's entries
        group = json.loads((path / "teachers" / name / "zarr.json").read_bytes())["attributes"]["kdcache_teacher"]
        lines.append(canonical({k: v for k, v in group.items() if k not in ("created", "command")}))
        lines += entry_lines(path / "teachers" / name / "ledger")
    return hashlib.sha256(b"kdcache-content-digest-1\n" + b"".join(line + b"\n" for line in lines)).hexdigest()


def test_the_digest_follows_from_the_documented_encoding(small_cache):
    assert digest_of(small_cache) == documented_digest(small_cache)


def test_added_teachers_extend_the_digest_as_documented_and_leave_the_roots_lines_alone(cache_copy, make_teacher):
    from kdcache.add_teacher import AddTeacherConfig, add_teacher
    from kdcache.format.digest import content_digest
    from kdcache.teacher import TeacherConfig

    path, _ = cache_copy
    alone = digest_of(path)
    for name, seed in (("zeta", 1), ("B", 2)):  # digested in name order, whichever was added first
        add_teacher(AddTeacherConfig(cache=str(path), data="digits", name=name, command="pytest",
                                     teacher=TeacherConfig(model="test_resnet", checkpoint=str(make_teacher(seed=seed)))), log=quiet)
    cache = open_cache(path)
    assert cache.teachers == ["main", "B", "zeta"]
    assert digest_of(path) == documented_digest(path) != alone
    assert content_digest(cache.manifest, cache.subset, cache.ledger.values()) == alone  # the root's lines are what they were
    group = path / "teachers" / "B" / "zarr.json"
    root = json.loads(group.read_bytes())
    root["attributes"]["kdcache_teacher"]["command"] = "another command line"  # provenance, not content
    before = digest_of(path)
    group.write_text(json.dumps(root))
    assert digest_of(path) == documented_digest(path) == before
    entry = path / "teachers" / "B" / "ledger" / "e000001-u000002.json"
    data = json.loads(entry.read_bytes())
    data["views"] += 1
    entry.write_text(json.dumps(data))
    (path / "teachers" / "B" / "ledger" / "epochs" / "e000001.json").unlink()  # else its epoch index is read, not the entry
    assert digest_of(path) == documented_digest(path) not in (before, alone)


# ---- --expect-digest ---------------------------------------------------------------------------------------------


def test_verify_and_train_student_refuse_another_digest_in_one_line(small_cache, tmp_path):
    digest = digest_of(small_cache)
    other = "0" * 64
    line = one_error_line(invoke("verify", small_cache, "--quick", "--expect-digest", other), 4)
    assert line == (f"error: {small_cache}: the cache's digest is {digest}, not the expected {other} (--expect-digest); "
                    "this is not the cache that was published with that digest")
    result = invoke("verify", small_cache, "--quick", "--expect-digest", digest.upper())
    assert result.exit_code == 0 and f"digest       {digest} (as expected)" in result.stdout
    run_dir = tmp_path / "run"
    args = ["train-student", "--cache", small_cache, "--data", "digits", "--model", "test_resnet", "--run-dir", run_dir,
            "--epochs", "1", "--batch-size", "64", "--device", "cpu", "--amp", "none", "--max-steps", "1"]
    line = one_error_line(invoke(*args, "--expect-digest", other), 4)
    assert digest in line and other in line and not run_dir.exists()
    assert invoke(*args, "--expect-digest", digest).exit_code == 0


def test_a_malformed_expected_digest_is_refused_naming_the_option(small_cache, tmp_path):
    line = one_error_line(invoke("verify", small_cache, "--quick", "--expect-digest", "abc123"), 2)
    assert line == ("error: --expect-digest 'abc123': expected the 64 hexadecimal digits of a cache digest "
                    "(kdcache info prints it)")
    line = one_error_line(invoke("train-student", "--data", "digits", "--model", "test_resnet", "--loss", "ce", "--img-size",
                                 "16", "--run-dir", tmp_path / "run", "--expect-digest", "0" * 64), 2)
    assert line == "error: --expect-digest names the cache to train from: give --cache too"
