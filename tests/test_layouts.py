"""Caches of earlier layouts still open, verify and extend.

``tests/data/v1-2026-11/cache`` was made by kdcache 0.1.0 before claims existed (format v1, no
``claims/`` directory), from ``digits:val`` (360 samples) with ``teacher.pt`` beside it (timm
``test_resnet``, 32 px): light augmentation, seed 3, top-3, 2 epochs, blocks of 64, 2 blocks a unit.
"""

from __future__ import annotations

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
