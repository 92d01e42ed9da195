"""`kdcache merge`: caches from separate jobs combine into the cache one job would have made."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdcache.errors import ChecksumError, ConfigError, FormatError, MismatchError
from kdcache.format import RECORD_ARRAYS, ledger_key, open_cache, sha256_bytes, shard_key, write_epoch_index
from kdcache.merge import merge_caches
from kdcache.verify import VerifyConfig, verify_cache
from kdcache_cli.main import app


def quiet(message: str) -> None:
    pass


def merge(output, *inputs):
    return merge_caches(str(output), [str(i) for i in inputs], command="pytest merge", log=quiet)


def shard_bytes(path) -> dict:
    cache = open_cache(path)
    return {(key, array): (Path(path) / shard_key(array, *key)).read_bytes() for key in cache.ledger for array in RECORD_ARRAYS}


def ledger_without_time(path) -> dict:
    entries = open_cache(path).ledger
    return {key: dataclasses.replace(entry, committed="") for key, entry in entries.items()}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir() if ".merging-" in p.name or ".creating-" in p.name)


@pytest.fixture(scope="module")
def epoch_jobs(tmp_path_factory, make_config, helpers, small_cache):
    """Job A: epochs 0-1 (the shared small cache); job B: epochs 2-3 only; and one job over epochs 0-3."""
    root = tmp_path_factory.mktemp("epoch-jobs")
    later = root / "later"
    helpers.run_precompute(make_config(later, epochs=4, from_epoch=2))
    whole = root / "whole"
    helpers.run_precompute(make_config(whole, epochs=4))
    return small_cache, later, whole


@pytest.fixture(scope="module")
def unit_jobs(tmp_path_factory, make_config, helpers):
    """Two partial jobs over epochs 0-1: A takes units (0,0)..(1,0), B takes epoch 1; they share (1,0)."""
    root = tmp_path_factory.mktemp("unit-jobs")
    helpers.run_precompute(make_config(root / "a", max_units=4))
    helpers.run_precompute(make_config(root / "b", from_epoch=1))
    return root / "a", root / "b"


@pytest.fixture(scope="module")
def other_jobs(tmp_path_factory, make_config, make_teacher, helpers):
    """One-unit caches that each differ from the small cache's recipe in one way."""
    root = tmp_path_factory.mktemp("other-jobs")
    variants = {
        "seed": dict(seed=1),
        "augmentation": dict(augmentation="strong"),
        "teacher": dict(checkpoint=make_teacher(seed=1)),
        "k": dict(topk=3),
    }
    for name, overrides in variants.items():
        helpers.run_precompute(make_config(root / name, epochs=1, max_units=1, **overrides))
    return root


def test_disjoint_epoch_ranges_merge_into_the_one_job_cache(tmp_path, epoch_jobs, helpers):
    early, later, whole = epoch_jobs
    assert sorted({e for e, _ in open_cache(early).ledger}) == [0, 1]
    assert sorted({e for e, _ in open_cache(later).ledger}) == [2, 3]
    out = tmp_path / "merged"
    result = merge(out, early, later)
    assert result.output == str(out)
    assert result.units_copied == {str(early): 6, str(later): 6} and result.units == 12
    assert result.epochs_complete == [0, 1, 2, 3]
    merged = open_cache(out)
    assert merged.manifest.epochs == 4 and merged.manifest.command == "pytest merge"
    assert shard_bytes(out) == shard_bytes(whole)
    helpers.assert_same_records(helpers.all_records(out), helpers.all_records(whole))
    assert ledger_without_time(out) == ledger_without_time(whole)
    # the original commit times travel with the units
    assert {k: e.committed for k, e in merged.ledger.items() if k[0] < 2} == {k: e.committed for k, e in open_cache(early).ledger.items()}
    verify_cache(VerifyConfig(cache=str(out), quick=True), log=quiet)
    assert leftovers(tmp_path) == []


def test_overlapping_partial_jobs_merge_into_the_full_cache(tmp_path, unit_jobs, small_cache, helpers):
    a, b = unit_jobs
    assert sorted(open_cache(a).ledger) == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert sorted(open_cache(b).ledger) == [(1, 0), (1, 1), (1, 2)]
    out = tmp_path / "merged"
    out.mkdir()  # an empty directory is a fine place to merge into
    result = merge(out, b, a)
    assert result.units_copied == {str(b): 3, str(a): 3}  # the shared unit is copied once, from the first holder
    assert result.epochs_complete == [0, 1]
    assert shard_bytes(out) == shard_bytes(small_cache)
    assert ledger_without_time(out) == ledger_without_time(small_cache)
    verify_cache(VerifyConfig(cache=str(out), quick=True), log=quiet)


def test_a_partial_merge_keeps_missing_units_missing(tmp_path, unit_jobs, small_cache):
    a, _ = unit_jobs
    out = tmp_path / "merged"
    result = merge(out, a, small_cache)
    assert result.epochs_complete == [0, 1] and result.units_copied == {str(a): 4, str(small_cache): 2}
    half = tmp_path / "half"
    shutil.copytree(a, half)
    assert merge(tmp_path / "same", a, half).epochs_complete == [0]
    assert sorted(open_cache(tmp_path / "same").ledger) == sorted(open_cache(a).ledger)


@pytest.mark.parametrize(
    "variant, field",
    [("seed", "seed"), ("augmentation", "augmentation.name"), ("teacher", "teacher.weights_sha256"), ("k", "k")],
)
def test_other_recipe_is_refused_naming_the_field_and_both_caches(tmp_path, other_jobs, small_cache, variant, field):
    other = other_jobs / variant
    out = tmp_path / "merged"
    with pytest.raises(MismatchError) as caught:
        merge(out, small_cache, other)
    message = str(caught.value)
    assert f"cannot merge {other}: {field} differs: {small_cache} has " in message and f", {other} has " in message
    assert "\n" not in message
    assert not out.exists() and leftovers(tmp_path) == []


def test_other_block_layout_is_refused(tmp_path, make_config, helpers, small_cache):
    other = tmp_path / "other"
    helpers.run_precompute(make_config(other, epochs=1, max_units=1, blocks_per_unit=3))
    with pytest.raises(MismatchError, match=r"blocks\.blocks_per_unit differs: .* has 2, .* has 3"):
        merge(tmp_path / "merged", small_cache, other)
    assert not (tmp_path / "merged").exists()


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_unit_with_other_bytes_in_two_inputs_is_refused(tmp_path, unit_jobs, small_cache):
    _, b = unit_jobs
    bad = tmp_path / "bad"
    shutil.copytree(b, bad)
    key = shard_key("values", 1, 1)
    flip_byte(bad / key)
    entry_path = bad / ledger_key(1, 1)
    entry = json.loads(entry_path.read_text())
    entry["files"][key]["sha256"] = sha256_bytes((bad / key).read_bytes())  # the input is consistent in itself
    entry_path.write_text(json.dumps(entry))
    write_epoch_index(bad, 1)  # its epoch index too
    out = tmp_path / "merged"
    with pytest.raises(MismatchError) as caught:
        merge(out, small_cache, bad)
    assert str(caught.value).startswith(f"epoch 1 unit 1 differs between {small_cache} and {bad}")
    assert key in str(caught.value)
    assert not out.exists() and leftovers(tmp_path) == []


def test_a_corrupt_input_shard_stops_the_merge_and_leaves_no_output(tmp_path, unit_jobs):
    a, b = unit_jobs
    bad = tmp_path / "bad"
    shutil.copytree(b, bad)
    key = shard_key("tail", 1, 2)
    flip_byte(bad / key)
    out = tmp_path / "merged"
    with pytest.raises(ChecksumError) as caught:
        merge(out, a, bad)
    assert str(caught.value).startswith(f"{bad}: epoch 1 unit 2: file {key} does not match its ledger checksum")
    assert not out.exists() and leftovers(tmp_path) == []


def test_fewer_than_two_inputs_are_refused(tmp_path, small_cache):
    with pytest.raises(ConfigError, match="at least two caches to combine, got 1"):
        merge(tmp_path / "merged", small_cache)
    assert not (tmp_path / "merged").exists()


def test_an_output_that_holds_files_is_left_alone(tmp_path, small_cache, unit_jobs, helpers):
    a, _ = unit_jobs
    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    before = helpers.tree_hashes(out)
    with pytest.raises(ConfigError, match=f"output {out} exists and is not empty"):
        merge(out, small_cache, a)
    assert helpers.tree_hashes(out) == before
    with pytest.raises(ConfigError, match="exists and is not empty"):
        merge(small_cache, a, small_cache)  # an input is never a merge target


def test_a_missing_input_is_named(tmp_path, small_cache):
    with pytest.raises(FormatError, match=f"cache {tmp_path / 'nothing'} does not exist"):
        merge(tmp_path / "merged", small_cache, tmp_path / "nothing")
    assert not (tmp_path / "merged").exists()


def test_the_same_cache_twice_merges_into_a_copy(tmp_path, small_cache, helpers):
    result = merge(tmp_path / "copy", small_cache, small_cache)
    assert result.units_copied == {str(small_cache): 6}
    assert shard_bytes(tmp_path / "copy") == shard_bytes(small_cache)


def test_cli_merge_prints_a_summary_and_refusals_are_one_line(tmp_path, epoch_jobs, other_jobs):
    early, later, _ = epoch_jobs
    runner = CliRunner()
    out = tmp_path / "merged"
    result = runner.invoke(app, ["merge", str(out), str(early), str(later)])
    assert result.exit_code == 0, result.output
    assert f"merged 12 unit(s) from 2 caches into {out}; epochs complete: [0, 1, 2, 3]" in result.stdout
    assert f"{later}: 6 unit(s) copied" in result.stderr
    info = runner.invoke(app, ["info", str(out)])
    assert info.exit_code == 0, info.output
    assert runner.invoke(app, ["verify", "--quick", str(out)]).exit_code == 0

    refused = runner.invoke(app, ["merge", str(tmp_path / "other"), str(early), str(other_jobs / "seed")])
    assert refused.exit_code != 0 and isinstance(refused.exception, SystemExit)
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot merge {other_jobs / 'seed'}: seed differs")
    assert "Traceback" not in refused.output and not (tmp_path / "other").exists()


def test_resume_finishes_the_units_no_input_had(tmp_path, unit_jobs, make_config, helpers, small_cache):
    a, _ = unit_jobs
    copy = tmp_path / "copy"
    shutil.copytree(a, copy)
    out = tmp_path / "merged"
    assert merge(out, a, copy).epochs_complete == [0]
    helpers.run_precompute(make_config(out, resume=True))
    assert shard_bytes(out) == shard_bytes(small_cache)


# ---- subsets (kdcache export) -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def subsets(tmp_path_factory, small_cache):
    """Exports of the small cache: each epoch whole, and unit 0 (blocks 0-1) or unit 1 of one epoch."""
    from kdcache.export import ExportConfig, export_cache

    root = tmp_path_factory.mktemp("subsets")
    for name, options in {"e0": dict(epochs=(0,)), "e1": dict(epochs=(1,)), "e0-u0": dict(epochs=(0,), blocks=(0, 1)),
                          "e1-u0": dict(epochs=(1,), blocks=(0, 1)), "e1-u1": dict(epochs=(1,), blocks=(2, 3))}.items():
        export_cache(ExportConfig(cache=str(small_cache), output=str(root / name), **options), log=quiet)
    return root


def test_subsets_that_make_up_the_whole_cache_merge_into_a_whole_cache(tmp_path, subsets, small_cache, helpers):
    merge(tmp_path / "out", subsets / "e1", subsets / "e0")
    out = open_cache(tmp_path / "out")
    assert out.subset is None and "kdcache_subset" not in json.loads((tmp_path / "out" / "zarr.json").read_text())["attributes"]
    assert ledger_without_time(tmp_path / "out") == ledger_without_time(small_cache)
    helpers.assert_same_records(helpers.all_records(tmp_path / "out"), helpers.all_records(small_cache))


def test_subsets_that_make_up_epochs_by_units_merge_into_that_subset(tmp_path, subsets):
    merge(tmp_path / "out", subsets / "e0-u0", subsets / "e1-u0")
    sub = open_cache(tmp_path / "out").subset
    assert (sub.epochs, sub.units) == ([0, 1], [0])
    assert sub.source == f"merge of {subsets / 'e0-u0'}, {subsets / 'e1-u0'}"


def test_subsets_that_leave_a_hole_merge_into_a_partial_cache(tmp_path, subsets):
    merge(tmp_path / "out", subsets / "e0-u0", subsets / "e1-u1")  # (0,0) and (1,1): not epochs x units
    out = open_cache(tmp_path / "out")
    assert out.subset is None and sorted(out.ledger) == [(0, 0), (1, 1)]
    assert out.missing_units()[0] == (0, 1)  # a partial cache: train-student and verify name the hole
    # A plain (partial) input makes the output plain too, even when the subsets alone would be epochs x units.
    merge(tmp_path / "mixed", subsets / "e0-u0", subsets / "e1-u0", tmp_path / "out")
    assert open_cache(tmp_path / "mixed").subset is None


def test_caches_whose_tail_codes_have_other_bases_are_refused(tmp_path, make_config, helpers):
    """Two jobs that each fitted their own basis (another machine moves its last bits) hold codes that cannot be mixed."""
    import json

    from kdcache.record import encode_basis, tail_basis_of

    first = tmp_path / "first"
    helpers.run_precompute(make_config(first, epochs=1, max_units=1, tail_rank=2))
    second = tmp_path / "second"
    shutil.copytree(first, second)
    attributes = json.loads((second / "zarr.json").read_text())
    tail = attributes["attributes"]["kdcache"]["tail"]
    assert tail["rank"] == 2
    tail["basis"] = encode_basis(tail_basis_of(tail, 10) * 1.001)
    (second / "zarr.json").write_text(json.dumps(attributes))
    with pytest.raises(MismatchError, match=r"tail\.basis differs"):
        merge(tmp_path / "merged", first, second)
    assert not (tmp_path / "merged").exists()
    assert merge(tmp_path / "same", first, first).units_copied  # the same basis merges
