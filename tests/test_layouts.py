"""Caches of earlier layouts still open, verify and extend.

``tests/data/v1-2026-11/cache`` was made by kdcache 0.1.0 before claims existed (format v1, no
``claims/`` directory), from ``digits:val`` (360 samples) with ``teacher.pt`` beside it (timm
``test_resnet``, 32 px): light augmentation, seed 3, top-3, 2 epochs, blocks of 64, 2 blocks a unit.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from kdcache.format import CLAIMS_DIR, open_cache
from kdcache_cli.main import app

FIXTURE = Path(__file__).resolve().parent / "data" / "v1-2026-11"


@pytest.fixture
def old_cache(tmp_path) -> Path:
    path = tmp_path / "cache"
    shutil.copytree(FIXTURE / "cache", path)
    return path


def test_a_cache_made_before_claims_opens_and_reads(old_cache, helpers):
    assert not (old_cache / CLAIMS_DIR).exists()
    cache = open_cache(old_cache)
    assert cache.complete_epochs() == [0, 1] and cache.manifest.format_version == 1
    for epoch, unit in sorted(cache.ledger):
        records = cache.read_unit(epoch, unit)  # checksums verified
        assert records["values"].dtype == np.float16 and records["indices"].shape[1] == 3
    result = CliRunner().invoke(app, ["verify", str(old_cache), "--quick"])
    assert result.exit_code == 0, result.output


def test_a_cache_made_before_claims_verifies_against_its_teacher(old_cache, one_thread):
    result = CliRunner().invoke(app, ["verify", str(old_cache), "--data", "digits:val", "--teacher", "test_resnet",
                                      "--teacher-checkpoint", str(FIXTURE / "teacher.pt"), "--views", "96"])
    assert result.exit_code == 0, result.output
    assert "96 view(s)" in result.output


def test_a_cache_made_before_claims_is_extended_through_claims(old_cache, helpers, one_thread):
    before = helpers.tree_hashes(old_cache)
    result = CliRunner().invoke(app, [
        "precompute-logits", "--data", "digits:val", "--teacher", "test_resnet", "--teacher-checkpoint", str(FIXTURE / "teacher.pt"),
        "--augmentation", "light", "--seed", "3", "--topk", "3", "--epochs", "3", "--block-size", "64", "--blocks-per-unit", "2",
        "--batch-size", "64", "--output", str(old_cache), "--resume"])
    assert result.exit_code == 0, result.output
    assert result.stderr.strip().splitlines()[-1] == "computed 3 unit(s)"
    after = helpers.tree_hashes(old_cache)
    kept = [name for name in before if name.split("/")[0] in ("values", "indices", "tail", "params", "samples", "ledger")
            and not name.endswith("zarr.json")]
    assert kept and all(after[name] == before[name] for name in kept)  # the old units are untouched
    assert open_cache(old_cache).complete_epochs() == [0, 1, 2]
    left = [p.name for p in (old_cache / CLAIMS_DIR).iterdir()]
    assert left == ["manifest.g0.json"], left  # every unit claim went with its commit; adding epochs leaves its released mark
    assert "released" in (old_cache / CLAIMS_DIR / "manifest.g0.json").read_text()


#: The content digest of the stored cache: a change of the digest's encoding (docs/format.md) shows here.
OLD_CACHE_DIGEST = "1d21341f76dadf726f809a61fd92b84a6feb17c6fd5acc93af30bd04262f465f"


def test_a_cache_made_before_epoch_indexes_has_the_same_digest_once_indexed(old_cache):
    from kdcache.format import epoch_index_key

    assert not (old_cache / "ledger" / "epochs").exists()
    plain = open_cache(old_cache)
    assert plain.indexed_epochs() == [] and plain.digest() == OLD_CACHE_DIGEST
    result = CliRunner().invoke(app, ["index", str(old_cache)])
    assert result.exit_code == 0 and "2 written" in result.stdout, result.output
    indexed = open_cache(old_cache)
    assert indexed.indexed_epochs() == [0, 1] and indexed.ledger == plain.ledger and indexed.digest() == OLD_CACHE_DIGEST
    assert (old_cache / epoch_index_key(1)).is_file()


def test_a_cache_made_before_claims_takes_another_teacher(old_cache, helpers, make_teacher, one_thread):
    """add-teacher on the old layout: its files stay as they are, the teacher's group verifies and trains."""
    before = helpers.tree_hashes(old_cache)
    result = CliRunner().invoke(app, ["add-teacher", str(old_cache), "--data", "digits:val", "--teacher", "test_resnet",
                                      "--teacher-checkpoint", str(make_teacher(seed=1)), "--name", "B", "--batch-size", "64"])
    assert result.exit_code == 0, result.output
    assert result.stderr.strip().splitlines()[-1] == "computed 6 unit(s)"
    after = helpers.tree_hashes(old_cache)
    assert {name: after[name] for name in before} == before and all(name.startswith("teachers/B/") for name in set(after) - set(before))
    cache = open_cache(old_cache)
    assert cache.teachers == ["main", "B"] and cache.teacher_records("B").complete_epochs() == [0, 1]
    for args in (["--quick"], ["--data", "digits:val", "--teacher", "test_resnet", "--teacher-checkpoint", str(make_teacher(seed=1)),
                               "--views", "16", "--teacher-record", "B"]):
        verified = CliRunner().invoke(app, ["verify", str(old_cache), *args])
        assert verified.exit_code == 0, verified.output


# ``tests/data/v2-2026-12/cache``: the first version-2 layout, whose tail code is the plain
# projection of all C logits in 127 levels (its manifest names no code fit). Made by kdcache 0.1.0
# at that layout from ``digits:val`` with the v1 fixture's ``teacher.pt``: light augmentation, seed
# 3, top-2 and a rank-3 tail code, 2 epochs, blocks of 64, 2 blocks a unit.
V2_FIXTURE = Path(__file__).resolve().parent / "data" / "v2-2026-12"
V2_PRECOMPUTE = ["precompute-logits", "--data", "digits:val", "--teacher", "test_resnet", "--teacher-checkpoint",
                 str(FIXTURE / "teacher.pt"), "--augmentation", "light", "--seed", "3", "--topk", "2", "--block-size", "64",
                 "--blocks-per-unit", "2", "--batch-size", "64"]


@pytest.fixture
def first_v2_cache(tmp_path) -> Path:
    path = tmp_path / "cache-v2"
    shutil.copytree(V2_FIXTURE / "cache", path)
    return path


def test_a_first_version_2_cache_opens_with_its_projection_code(first_v2_cache):
    from kdcache.record import CODE_FIT_V2_0, stored_record, tail_spec_of

    cache = open_cache(first_v2_cache)
    spec = tail_spec_of(cache.manifest.tail)
    assert cache.manifest.format_version == 2 and spec.rank == 3
    assert (spec.code_levels, spec.code_beta, spec.code_floor) == CODE_FIT_V2_0
    records = cache.read_unit(0, 0)
    record = stored_record(records["values"], records["indices"], records["tail"], cache.manifest)
    assert record.shape_logits().shape == (len(records["values"]), 10) and float(record.tail[:, -3:].abs().max()) <= 127
    result = CliRunner().invoke(app, ["verify", str(first_v2_cache), "--quick"])
    assert result.exit_code == 0, result.output


def test_a_first_version_2_cache_verifies_against_its_teacher_and_a_wrong_fit_fails(first_v2_cache, one_thread):
    verify = ["verify", str(first_v2_cache), "--data", "digits:val", "--teacher", "test_resnet", "--teacher-checkpoint",
              str(FIXTURE / "teacher.pt"), "--views", "128"]
    result = CliRunner().invoke(app, verify)
    assert result.exit_code == 0 and "128 view(s)" in result.output, result.output
    # the same records read as if they had been fitted with today's weights: verify must see the difference
    zarr_json = first_v2_cache / "zarr.json"
    data = json.loads(zarr_json.read_text())
    data["attributes"]["kdcache"]["tail"].update(code_levels=31, code_beta=0.5, code_floor=0.05)
    zarr_json.write_text(json.dumps(data))
    wrong = CliRunner().invoke(app, verify)
    assert wrong.exit_code != 0 and "tail code differs" in wrong.output, wrong.output


def test_a_first_version_2_cache_trains_and_resumes_with_its_own_code(first_v2_cache, helpers, one_thread, tmp_path):
    from kdcache.record import stored_record

    before = helpers.tree_hashes(first_v2_cache)
    result = CliRunner().invoke(app, [*V2_PRECOMPUTE, "--epochs", "3", "--output", str(first_v2_cache), "--resume"])
    assert result.exit_code == 0, result.output
    after = helpers.tree_hashes(first_v2_cache)
    kept = [name for name in before if name.split("/")[0] in ("values", "indices", "tail", "params") and not name.endswith("zarr.json")]
    assert kept and all(after[name] == before[name] for name in kept)  # the old units are untouched
    cache = open_cache(first_v2_cache)
    assert cache.complete_epochs() == [0, 1, 2] and "code_beta" not in cache.manifest.tail
    verified = CliRunner().invoke(app, ["verify", str(first_v2_cache), "--data", "digits:val", "--teacher", "test_resnet",
                                        "--teacher-checkpoint", str(FIXTURE / "teacher.pt"), "--views", "1080"])
    assert verified.exit_code == 0 and "1080 view(s)" in verified.output, verified.output  # every view, the new epoch's too
    records = cache.read_unit(2, 0)
    assert stored_record(records["values"], records["indices"], records["tail"], cache.manifest).spec.code_beta == 0.0
    run = tmp_path / "run"
    trained = CliRunner().invoke(app, ["train-student", "--data", "digits:val", "--cache", str(first_v2_cache), "--model",
                                       "test_resnet", "--run-dir", str(run), "--epochs", "1", "--batch-size", "64",
                                       "--loss", "kd", "--temperature", "4"])
    assert trained.exit_code == 0, trained.output
    assert "rank-3 tail code" in (run / "config.json").read_text()
