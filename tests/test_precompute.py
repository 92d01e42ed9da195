"""Stage one end to end: the plan, kill -9 and --resume, partial runs, two ranks, appended epochs.

The reference for every comparison is ``small_cache`` (one uninterrupted in-process run): records
depend only on (teacher, data, spec, seed, epoch, block), so every other way of making the same cache
must give byte-identical record arrays.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from processes import kill_when, ledger_entries, units_by_rank
from typer.testing import CliRunner

from kdcache.errors import IncompleteCacheError
from kdcache.format import ledger_key, open_cache, shard_key
from kdcache.sources import open_source
from kdcache_cli.main import app

pytestmark = pytest.mark.usefixtures("one_thread")

UNITS = [(e, u) for e in range(2) for u in range(3)]  # small_cache: 2 epochs x 3 units



def without_time(entries: dict) -> dict:
    return {key: {k: v for k, v in entry.items() if k != "committed"} for key, entry in entries.items()}


def unit_files(path: Path, epoch: int, unit: int) -> list[Path]:
    """A unit's ledger entry and its four shard files."""
    path = Path(path)
    return [path / ledger_key(epoch, unit)] + [path / shard_key(a, epoch, unit) for a in ("values", "indices", "tail", "params")]


def snapshot(path: Path, units) -> dict[str, tuple[int, bytes]]:
    """(mtime in ns, bytes) of every file of ``units``."""
    return {str(f): (f.stat().st_mtime_ns, f.read_bytes()) for e, u in units for f in unit_files(path, e, u)}


# ---- what one run writes ----------------------------------------------------------------------


def test_plan_holds_every_sample_once_with_its_label_and_key(small_cache):
    cache = open_cache(small_cache)
    plan = cache.samples()
    used = plan["source_index"] >= 0
    assert used.sum() == 1437 and (plan["source_index"][~used] == -1).all()
    assert sorted(plan["source_index"][used].tolist()) == list(range(1437))
    # padding only at the end of the short last block
    assert used[: 5 * 256].all() and used[5 * 256 : 5 * 256 + 157].all() and not used[5 * 256 + 157 :].any()
    source = open_source("digits")
    samples = source.read(plan["source_index"][used].tolist())
    assert plan["key"][used].tolist() == [s.key for s in samples]
    assert plan["label"][used].tolist() == [s.label for s in samples]
    assert plan["digest"][used].tolist() == [s.digest for s in samples]


def test_every_unit_is_committed_once_with_its_view_count(small_cache):
    entries = ledger_entries(small_cache)
    assert sorted(entries) == UNITS
    assert [entries[e, u]["views"] for e, u in UNITS] == [512, 512, 413] * 2
    cache = open_cache(small_cache)
    assert cache.complete_epochs() == [0, 1]
    for e, u in UNITS:
        arrays = cache.read_unit(e, u)
        assert arrays["values"].shape == (512, 5) and arrays["indices"].max() < 10
        # the two epochs are different views of the same samples
    assert not np.array_equal(cache.read_unit(0, 0)["params"], cache.read_unit(1, 0)["params"])


# ---- partial runs and kill -9 ------------------------------------------------------------------


def test_max_units_then_resume_equals_one_run(tmp_path, make_config, small_cache, helpers):
    out = tmp_path / "partial"
    result = helpers.run_precompute(make_config(out, max_units=2))
    assert (result.units_done, result.units_skipped, result.epochs_complete) == (2, 0, [])
    assert sorted(ledger_entries(out)) == [(0, 0), (0, 1)]
    with pytest.raises(IncompleteCacheError, match="epoch 0 unit 2"):
        open_cache(out).read_block(0, 4)
    before = snapshot(out, [(0, 0), (0, 1)])
    result = helpers.run_precompute(make_config(out, resume=True))
    assert (result.units_done, result.units_skipped, result.epochs_complete) == (4, 2, [0, 1])
    assert snapshot(out, [(0, 0), (0, 1)]) == before  # committed units are not recomputed
    helpers.assert_same_records(helpers.all_records(out), helpers.all_records(small_cache))
    assert without_time(ledger_entries(out)) == without_time(ledger_entries(small_cache))


def test_resume_of_a_complete_cache_changes_nothing(tmp_path, make_config, small_cache, helpers):
    out = tmp_path / "done"
    shutil.copytree(small_cache, out)
    before = helpers.tree_hashes(out)
    result = helpers.run_precompute(make_config(out, resume=True))
    assert (result.units_done, result.units_skipped) == (0, 6)
    assert helpers.tree_hashes(out) == before


@pytest.mark.slow
def test_kill_9_then_resume_matches_an_uninterrupted_run(tmp_path, small_cache, precompute_argv, subprocess_env, helpers):
    out = tmp_path / "killed"
    command = helpers.cli_command() + precompute_argv(out)
    ledger = out / "ledger"
    kill_when(command, lambda: ledger.is_dir() and any(ledger.glob("e*-u*.json")), what="its first commit",
              log_path=tmp_path / "first.log", env=subprocess_env)
    committed = sorted(ledger_entries(out))
    assert 1 <= len(committed) < len(UNITS), "the kill must land mid-run"
    before = snapshot(out, committed)

    # the resume runs in this process (one interpreter start less); same command line
    resumed = CliRunner().invoke(app, precompute_argv(out, resume=True))
    assert resumed.exit_code == 0, resumed.output
    assert f"{len(committed)} unit(s) already committed, {len(UNITS) - len(committed)} to compute" in resumed.stderr
    recomputed = {(int(e), int(u)) for e, u in re.findall(r"committed epoch (\d+) unit (\d+)", resumed.stderr)}
    assert recomputed == set(UNITS) - set(committed)
    # units committed before the kill were not touched: same bytes, same mtimes, same ledger timestamps
    assert snapshot(out, committed) == before
    helpers.assert_same_records(helpers.all_records(out), helpers.all_records(small_cache))
    assert without_time(ledger_entries(out)) == without_time(ledger_entries(small_cache))
    assert open_cache(out).complete_epochs() == [0, 1]


# ---- two ranks -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_ranks_write_the_same_cache_as_one(tmp_path, small_cache, precompute_argv, subprocess_env, helpers):
    out = tmp_path / "two"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(helpers.free_port()), "--tee", "3", "-m", "kdcache_cli.main", *precompute_argv(out),
    ]
    run = subprocess.run(command, capture_output=True, text=True, env=subprocess_env, timeout=300)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    by_rank = units_by_rank(output)
    # each unit written by exactly one rank, and the work is split between both
    assert sorted(by_rank[0] + by_rank[1]) == UNITS, output
    assert by_rank[0] and by_rank[1]
    assert output.count("planning 1437 samples") == 1  # rank 0 alone creates the cache
    helpers.assert_same_records(helpers.all_records(out), helpers.all_records(small_cache))
    assert without_time(ledger_entries(out)) == without_time(ledger_entries(small_cache))
    two = open_cache(out).manifest.to_dict()
    one = open_cache(small_cache).manifest.to_dict()
    for volatile in ("created", "command"):
        two.pop(volatile), one.pop(volatile)
    assert two == one
    assert open_cache(out).digest() == open_cache(small_cache).digest()  # one content, one digest, whatever the ranks
    assert open_cache(out).indexed_epochs() == [0, 1]  # the rank that committed an epoch's last unit indexed it


# ---- appending epochs -----------------------------------------------------------------------------

VAL = dict(data="digits:val", block_size=64)  # 360 samples: 6 blocks, 3 units per epoch


def test_appended_epochs_equal_a_fresh_run_and_leave_epoch_0_alone(tmp_path, make_config, precompute_argv, helpers):
    out = tmp_path / "grown"
    helpers.run_precompute(make_config(out, epochs=1, **VAL))
    epoch0 = snapshot(out, [(0, u) for u in range(3)])
    result = CliRunner().invoke(app, precompute_argv(out, epochs=3, resume=True, **VAL))
    assert result.exit_code == 0, result.output
    assert "extending" in result.stderr and "from 1 to 3 epochs" in result.stderr
    assert snapshot(out, [(0, u) for u in range(3)]) == epoch0  # byte-identical, not rewritten
    fresh = tmp_path / "fresh"
    helpers.run_precompute(make_config(fresh, epochs=3, **VAL))
    helpers.assert_same_records(helpers.all_records(out), helpers.all_records(fresh))
    assert without_time(ledger_entries(out)) == without_time(ledger_entries(fresh))
    cache = open_cache(out)
    assert cache.manifest.epochs == 3 and cache.complete_epochs() == [0, 1, 2]
    for array in ("values", "indices", "tail", "params"):
        assert json.loads((out / array / "zarr.json").read_text())["shape"][0] == 3


@pytest.mark.slow
def test_worker_processes_write_the_same_records_as_the_thread(tmp_path, make_config, small_cache, helpers):
    out = tmp_path / "workers"
    helpers.run_precompute(make_config(out, workers=2))
    helpers.assert_same_records(helpers.all_records(out), helpers.all_records(small_cache))


def test_progress_on_a_terminal_is_a_bar_with_views_and_rate(tmp_path, make_config, capsys, one_thread):
    from kdcache.precompute import precompute_logits

    lines = []
    precompute_logits(make_config(tmp_path / "cache"), log=lines.append, progress=True)
    err = capsys.readouterr().err
    assert "precompute: 100%" in err and "6/6" in err and "views/s" in err
    assert not [line for line in lines if line.startswith("committed epoch")]  # the bar, not one line per unit


def test_without_a_terminal_each_unit_is_one_line_with_rate_and_eta(tmp_path, make_config, one_thread):
    from kdcache.precompute import precompute_logits

    lines = []
    precompute_logits(make_config(tmp_path / "cache"), log=lines.append)
    units = [line for line in lines if line.startswith("committed epoch")]
    assert len(units) == 6 and all("views/s" in line for line in units)
    assert "ETA" in units[0] and units[-1].startswith("committed epoch 1 unit 2 (6/6 units;")
