"""What a new user meets first: the defects and refusals of a first try, each fixed and pinned here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdcache_cli.main import app


def _invoke(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def _damage(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# ---- a run that failed before its first checkpoint ----------------------------------------------


def _train(cache, run_dir, *extra):
    return _invoke("train-student", "--data", "digits", "--model", "test_resnet", "--cache", cache, "--run-dir", run_dir,
                   "--epochs", "1", "--batch-size", "64", *extra)


@pytest.fixture
def failed_run(cache_copy, tmp_path, one_thread) -> Path:
    """A run that stopped at a damaged unit of epoch 0, before its first checkpoint (at the epoch's end)."""
    cache, _ = cache_copy
    _damage(cache / "values" / "c" / "0" / "2" / "0")
    run_dir = tmp_path / "run"
    result = _train(cache, run_dir)
    assert result.exit_code == 3 and "does not match its ledger checksum" in result.stderr, result.output
    assert sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(".")) == ["config.json", "metrics.jsonl"]
    return run_dir


@pytest.mark.parametrize("resume", [False, True])
def test_a_run_that_stopped_before_its_first_checkpoint_starts_again_and_says_so(failed_run, small_cache, resume, one_thread):
    result = _train(small_cache, failed_run, "--max-steps", "2", *(["--resume"] if resume else []))
    assert result.exit_code == 0, result.output
    assert (f"run dir {failed_run}: the run there stopped before its first checkpoint, so there is nothing to resume; "
            "starting it again") in result.stderr
    assert json.loads((failed_run / "config.json").read_text())["max_steps"] == 2
    steps = [json.loads(line) for line in (failed_run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in steps if line["kind"] == "train"][-1] == 2


def test_a_run_with_a_checkpoint_still_needs_resume(small_cache, tmp_path, one_thread):
    run_dir = tmp_path / "run"
    assert _train(small_cache, run_dir, "--max-steps", "1").exit_code == 0
    result = _train(small_cache, run_dir, "--max-steps", "2")
    assert result.exit_code == 2 and result.stderr.strip() == (
        f"error: run dir {run_dir} exists; pass --resume to continue it or choose another --run-dir")
