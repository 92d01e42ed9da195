"""The fault suite: kills, damage, bad sources, full disks, remote faults and fuzzed input, tried on purpose.

Each test injects one kind of fault and checks that it is detected with one message naming the
culprit (file, key, epoch/unit or field) and that no record is lost or silently wrong; each trial
records a row. With ``KDCACHE_FAULT_REPORT=PATH`` the rows are written to PATH as markdown when the
suite ends (between the table markers, if PATH already has them: docs/reliability.md is made so).

Size: ``KDCACHE_FAULT_TRIALS`` seeded random kill trials of precompute-logits and random shard
damages (default 4, the CI size; docs/reliability.md comes from 20), a third as many train-student
kills, half as many full disks, and proportionally many fuzzing examples (up to 300 per target).
``KDCACHE_FAULT_SEED`` draws other moments.
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import errno
import functools
import http.server
import io
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tarfile
import threading
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from processes import kill_when, ledger_entries
from threads import single_thread
from typer.testing import CliRunner

from kdcache import __version__
from kdcache.augment import PRESETS, AugSpec, cache_spec, check_view_params, param_fields, preset, sample_view_params
from kdcache.checkpoint import CHECKPOINT_NAME, load_checkpoint
from kdcache.errors import ChecksumError, FormatError, IncompleteCacheError, KdcacheError, VerifyError
from kdcache.format import CacheWriter, Manifest, ledger_key, open_cache, shard_key, write_epoch_index
from kdcache.location import Location
from kdcache.plan import plan_layout, read_block
from kdcache.precompute import precompute_logits
from kdcache.replay import replay_block
from kdcache.runlog import read_metrics
from kdcache.shards import write_shards
from kdcache.sources import decode_sample, open_source
from kdcache.student import MODEL_NAME
from kdcache.teacher import TeacherConfig
from kdcache.verify import VerifyConfig, verify_cache
from kdcache_cli.main import app

pytestmark = [pytest.mark.faults, pytest.mark.usefixtures("one_thread")]

TRIALS = int(os.environ.get("KDCACHE_FAULT_TRIALS", "4"))
SEED = int(os.environ.get("KDCACHE_FAULT_SEED", "0"))
TRAIN_KILLS = max(2, TRIALS // 3)  # train-student kill trials: each trains for up to 44 steps twice
FULL_DISKS = max(2, TRIALS // 2)  # precompute-logits runs that meet a full disk (train-student: 1 + TRIALS // 4)
ARRAYS = ("values", "indices", "tail", "params")
UNITS = [(e, u) for e in range(2) for u in range(3)]  # small_cache: 2 epochs x 3 units, committed in this order
VIEWS = {u: (512, 512, 413)[u] for u in range(3)}  # views per unit of small_cache (blocks of 256, 1,437 samples)


def trial_rng(name: str, trial: int) -> random.Random:
    return random.Random(f"{SEED}/{name}/{trial}")


# ---- the report: one row per trial, aggregated per fault --------------------------------------------

ROWS: list[dict] = []
MOMENTS: list[dict] = []  # the random kill trials, one line each
TABLE_BEGIN, TABLE_END = "<!-- fault table: begin -->", "<!-- fault table: end -->"


def record(area: str, fault: str, *, detected: bool | None, outcome: str, lost: int = 0, wrong: int = 0, trials: int = 1) -> None:
    """One trial (or ``trials`` fuzzing examples): was the fault detected with a message naming the culprit
    (None: nothing to detect), what happened, and how many records (views) were lost or are silently wrong
    afterwards (must be 0)."""
    ROWS.append(dict(area=area, fault=fault, detected=detected, outcome=outcome, lost=lost, wrong=wrong, trials=trials))


def render_report(seconds: float) -> str:
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in ROWS:
        groups.setdefault((row["area"], row["fault"]), []).append(row)
    lines = [
        f"Made by `KDCACHE_FAULT_TRIALS={TRIALS} KDCACHE_FAULT_SEED={SEED} KDCACHE_FAULT_REPORT=docs/reliability.md "
        f"python -m pytest -q -m faults tests/test_faults.py` (kdcache {__version__}, torch {torch.__version__.split('+')[0]}; "
        f"{sum(r['trials'] for r in ROWS)} trials and fuzzing examples in {seconds / 60:.1f} min on {os.cpu_count()} CPU cores).",
        "",
        "| Area | Fault | Trials | Detected, naming the culprit | Outcome | Records lost | Records silently wrong |",
        "|---|---|---:|---:|---|---:|---:|",
    ]
    for (area, fault), rows in groups.items():
        checked = [r["detected"] for r in rows if r["detected"] is not None]
        detected = f"{sum(checked)} / {len(checked)}" if checked else "n/a"
        outcomes = Counter(r["outcome"] for r in rows)
        outcome = "; ".join(text if len(outcomes) == 1 else f"{text} ({n})" for text, n in outcomes.items())
        lost, wrong = sum(r["lost"] for r in rows), sum(r["wrong"] for r in rows)
        lines.append(f"| {area} | {fault} | {sum(r['trials'] for r in rows)} | {detected} | {outcome} | {lost} | {wrong} |")
    if MOMENTS:
        lines += ["", "The random kill trials, one by one:", "",
                  "| Command | Trial | Kill moment (seeded) | State at the kill | Resume |", "|---|---:|---|---|---|"]
        lines += [f"| {m['command']} | {m['trial']} | {m['moment']} | {m['state']} | {m['resume']} |" for m in MOMENTS]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module", autouse=True)
def fault_report():
    start = time.monotonic()
    yield
    target = os.environ.get("KDCACHE_FAULT_REPORT")
    if not target or not ROWS:
        return
    table = render_report(time.monotonic() - start)
    path = Path(target)
    text = path.read_text() if path.exists() else ""
    if TABLE_BEGIN in text and TABLE_END in text:
        head, rest = text.split(TABLE_BEGIN, 1)
        table = f"{head}{TABLE_BEGIN}\n{table}{TABLE_END}{rest.split(TABLE_END, 1)[1]}"
    path.write_text(table)


# ---- shared helpers ---------------------------------------------------------------------------------


def unit_files(path: Path, epoch: int, unit: int) -> list[Path]:
    return [Path(path) / ledger_key(epoch, unit)] + [Path(path) / shard_key(a, epoch, unit) for a in ARRAYS]


def snapshot(path: Path, units) -> dict[str, tuple[int, bytes]]:
    """(mtime in ns, bytes) of every file of ``units``: a unit written again changes both."""
    return {str(f): (f.stat().st_mtime_ns, f.read_bytes()) for e, u in units for f in unit_files(path, e, u)}


def redone(before: dict, path: Path, units) -> list[tuple[int, int]]:
    """The units of ``units`` whose files are not exactly as in ``before``."""
    return [(e, u) for e, u in units if snapshot(path, [(e, u)]) != {k: before[k] for k in map(str, unit_files(path, e, u))}]


def compare_records(path: Path, reference: Path) -> tuple[int, int]:
    """(lost, wrong): views of ``reference`` missing from ``path``, and views whose record differs in any byte."""
    want, got = open_cache(reference), open_cache(path)
    lost = wrong = 0
    for key in sorted(want.ledger):
        views = want.ledger[key].views
        if key not in got.ledger:
            lost += views
            continue
        a, b = want.read_unit(*key), got.read_unit(*key)
        rows = np.zeros(len(a["values"]), dtype=bool)
        for name in ARRAYS:
            if a[name].dtype != b[name].dtype or a[name].shape != b[name].shape:
                rows[:] = True
                continue
            rows |= np.any(a[name].view(np.uint8).reshape(len(rows), -1) != b[name].view(np.uint8).reshape(len(rows), -1), axis=1)
        wrong += int(min(rows.sum(), views))
    return lost, wrong


def without_time(entries: dict) -> dict:
    return {key: {k: v for k, v in entry.items() if k != "committed"} for key, entry in entries.items()}


def resume(make_config, out: Path, **overrides) -> list[tuple[int, int]]:
    """Run precompute --resume in this process; returns the units it committed, in order."""
    messages: list[str] = []
    precompute_logits(make_config(out, resume=True, **overrides), log=messages.append)
    return [(int(m.split()[2]), int(m.split()[4])) for m in messages if m.startswith("committed epoch")]


def error_line(result, exit_code: int, *culprits) -> str:
    """The one `error:` line a refused command printed (and no traceback), checked to name every culprit."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == exit_code, result.output
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    if lines and re.fullmatch(r"computed \d+ unit\(s\)", lines[-1]):  # precompute's last line, once it computes units
        lines = lines[:-1]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in result.output, result.stderr
    for culprit in culprits:
        assert str(culprit) in errors[0], f"{culprit!r} not named in: {errors[0]}"
    return errors[0]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def copy_cache(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


# =====================================================================================================
# SIGKILL of precompute-logits at random moments, then --resume
# =====================================================================================================

PRECOMPUTE_MOMENTS = {"after-commit": "at a random delay after a commit", "mid-write": "while a unit is being written",
                      "creating": "while the cache is being created", "delay": "at a random delay after the start"}


def precompute_moment(kind: str, rng: random.Random, out: Path):
    """(what the moment is, ready()) for one kill; every moment comes before the last unit's commit."""
    ledger, start, seen = out / "ledger", time.monotonic(), []

    def commits() -> int:
        return len(list(ledger.glob("e*-u*.json"))) if ledger.is_dir() else 0

    def first_seen(condition: bool) -> float | None:
        if condition and not seen:
            seen.append(time.monotonic())
        return seen[0] if seen else None

    if kind == "delay":
        delay = rng.uniform(0.0, 9.0)
        return f"{delay:.2f} s after the start", lambda: time.monotonic() - start >= delay or commits() >= 5
    if kind == "creating":
        delay = rng.uniform(0.0, 0.03)  # creation takes some tens of milliseconds

        def ready():
            creating = any(out.parent.glob(f".{out.name}.creating-*"))
            since = first_seen(creating)
            return (since is not None and (not creating or time.monotonic() - since >= delay)) or commits() >= 1

        return f"{delay:.2f} s into creating the cache", ready
    if kind == "after-commit":
        n, delay = rng.randint(1, 4), rng.uniform(0.0, 0.3)

        def ready():
            since = first_seen(commits() >= n)
            return since is not None and (time.monotonic() - since >= delay or commits() >= n + 1)

        return f"{delay:.2f} s after commit {n} of 6", ready
    n = rng.randint(0, 4)
    epoch, unit = UNITS[n]
    folder, entry = (out / shard_key("values", epoch, unit)).parent, out / ledger_key(epoch, unit)
    return (f"as unit {n + 1} of 6 (epoch {epoch} unit {unit}) is written",
            lambda: (folder.is_dir() and any(folder.iterdir())) or entry.exists())


def state_at_kill(out: Path) -> tuple[list[tuple[int, int]], str]:
    if not (out / "zarr.json").exists():
        left = len(list(out.parent.glob(f".{out.name}.creating-*")))
        return [], "no cache yet" + (" (a half-made one beside it)" if left else "")
    committed = sorted(ledger_entries(out))
    written = [(e, u) for e, u in UNITS if (e, u) not in committed and any(f.exists() for f in unit_files(out, e, u)[1:])]
    return committed, f"{len(committed)} of 6 units committed" + (f", {len(written)} written but not committed" if written else "")


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(TRIALS))
def test_precompute_killed_at_a_random_moment_resumes_to_identical_records(
    trial, tmp_path, small_cache, precompute_argv, subprocess_env, make_config, helpers
):
    kind = list(PRECOMPUTE_MOMENTS)[trial % len(PRECOMPUTE_MOMENTS)]
    out = tmp_path / "killed"
    moment, ready = precompute_moment(kind, trial_rng("precompute-kill", trial), out)
    kill_when(helpers.cli_command() + precompute_argv(out), ready, what=moment, log_path=tmp_path / "killed.log",
              env=subprocess_env)
    committed, state = state_at_kill(out)
    before = snapshot(out, committed)
    entries = ledger_entries(out) if committed else {}

    left_at_kill = list(out.parent.glob(f".{out.name}.creating-*"))
    computed = resume(make_config, out)
    again = redone(before, out, committed)
    lost, wrong = compare_records(out, small_cache)
    half_made = list(out.parent.glob(f".{out.name}.creating-*"))  # the killed creation's: removed by the next one
    MOMENTS.append(dict(command="precompute-logits", trial=trial, moment=moment, state=state,
                        resume=f"{len(computed)} unit(s) computed, {len(committed) - len(again)} kept untouched"
                        + ("; the half-made directory stays beside the cache" if half_made
                           else "; the half-made directory was removed" if left_at_kill else "")))
    record("kill", f"SIGKILL of precompute-logits {PRECOMPUTE_MOMENTS[kind]}, then --resume", detected=None,
           outcome="records byte-identical to an uninterrupted run; no committed unit redone" if not (again or lost or wrong)
           else f"{len(again)} committed unit(s) redone", lost=lost, wrong=wrong)
    assert (lost, wrong) == (0, 0) and half_made == []
    assert again == [] and sorted(computed) == sorted(set(UNITS) - set(committed))
    assert {key: ledger_entries(out)[key] for key in committed} == entries  # commit times included
    assert without_time(ledger_entries(out)) == without_time(ledger_entries(small_cache))


@contextlib.contextmanager
def process_ids():
    """(a PID that no longer runs, a PID that runs until the block ends): both this test's own processes."""
    ended = subprocess.Popen(["true"])
    ended.wait()
    running = subprocess.Popen(["sleep", "60"])
    try:
        with pytest.raises(ProcessLookupError):  # not reused since: the test would prove nothing
            os.kill(ended.pid, 0)
        yield ended.pid, running.pid
    finally:
        running.kill()
        running.wait()


def test_half_made_caches_of_killed_creations_are_removed_by_the_next_creation(tmp_path, precompute_argv):
    """A `.NAME.creating-HOST-PID` directory of this host whose process is gone is removed (and said) when
    the cache is next created; one whose process runs, another host's, or another cache's is never touched."""
    out = tmp_path / "cache"
    host = socket.gethostname()
    with process_ids() as (ended, running):
        dead, alive, other = (tmp_path / f".cache.creating-{host}-{ended}", tmp_path / f".cache.creating-{host}-{running}",
                              tmp_path / f".other.creating-{host}-{ended}")
        elsewhere = tmp_path / f".cache.creating-another-host-{ended}"
        for folder in (dead, alive, other, elsewhere):
            (folder / "values").mkdir(parents=True)
            (folder / "zarr.json").write_text("{}")
        result = invoke(*precompute_argv(out, data="digits:val", epochs=1, block_size=360, blocks_per_unit=1))
        assert result.exit_code == 0, result.output
        said = f"removed {dead}: left by a cache creation (process {ended}) that no longer runs" in result.output
        kept = alive.is_dir() and (alive / "zarr.json").exists() and other.is_dir() and elsewhere.is_dir()
    record("kill", "a half-made cache (.NAME.creating-HOST-PID) left by a killed creation", detected=said and not dead.exists(),
           outcome="removed by the next creation of that cache, naming it; one whose process still runs is left alone")
    assert said and not dead.exists() and kept and open_cache(out).complete_epochs() == [0]


# =====================================================================================================
# SIGKILL of train-student at random moments, then --resume
# =====================================================================================================

TRAIN_ARGS = ["train-student", "--data", "digits", "--model", "test_resnet", "--loss", "kd", "--epochs", "2",
              "--batch-size", "64", "--lr", "3e-3", "--weight-decay", "0.01", "--amp", "none", "--device", "cpu",
              "--log-every", "1", "--checkpoint-every", "4"]  # 22 batches per epoch: 44 steps, a checkpoint every 4
TRAIN_STEPS = 44


def train_args(cache: Path, run_dir: Path, *extra) -> list[str]:
    return TRAIN_ARGS + ["--cache", str(cache), "--run-dir", str(run_dir), *extra]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)["state_dict"]


def train_losses(run_dir: Path) -> list[float]:
    return [line["loss"] for line in read_metrics(run_dir / "metrics.jsonl") if line["kind"] == "train"]


class FullDisk:
    """``open`` for files under ``root`` whose writes fail with ENOSPC once ``budget`` bytes are written.

    Installed over ``builtins.open`` and ``io.open`` (pathlib and zarr's local store use them); the
    disk stays full until the test takes it away. ``used`` counts the bytes written.
    """

    def __init__(self, root: Path, budget: float = float("inf")):
        self.root, self.budget, self.used, self.full = str(root), budget, 0, False
        self._open = io.open

    def install(self, monkeypatch) -> "FullDisk":
        monkeypatch.setattr(builtins, "open", self.open)
        monkeypatch.setattr(io, "open", self.open)
        return self

    def open(self, file, mode="r", *args, **kwargs):
        handle = self._open(file, mode, *args, **kwargs)
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
            if os.path.abspath(os.fspath(file)).startswith(self.root):
                return _Limited(handle, self, os.fspath(file))
        return handle


class _Limited:
    def __init__(self, handle, disk: FullDisk, name: str):
        self._handle, self._disk, self._name = handle, disk, name

    def write(self, data):
        size = len(data) if isinstance(data, str) else memoryview(data).nbytes
        if self._disk.used + size > self._disk.budget:
            self._disk.full = True
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._name)
        self._disk.used += size
        return self._handle.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._handle.__exit__(*exc)

    def __iter__(self):
        return iter(self._handle)

    def __getattr__(self, name):
        return getattr(self._handle, name)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_cache, monkeypatch_module):
    """The uninterrupted run: its run dir and the bytes it wrote."""
    run_dir = tmp_path_factory.mktemp("train") / "whole"
    disk = FullDisk(run_dir.parent).install(monkeypatch_module)
    with single_thread():
        result = invoke(*train_args(small_cache, run_dir))
    monkeypatch_module.undo()
    assert result.exit_code == 0, result.output
    return run_dir, disk.used


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


TRAIN_MOMENTS = {"after-step": "at a random delay after a step", "checkpointing": "while a checkpoint is being written",
                 "delay": "at a random delay after the start"}


def train_moment(kind: str, rng: random.Random, run_dir: Path):
    metrics, start, seen = run_dir / "metrics.jsonl", time.monotonic(), []

    def steps() -> int:
        try:
            return metrics.read_text().count('"kind": "train"')
        except FileNotFoundError:
            return 0

    if kind == "delay":
        delay = rng.uniform(0.0, 8.0)
        return f"{delay:.2f} s after the start", lambda: time.monotonic() - start >= delay or steps() >= 40
    if kind == "after-step":
        step, delay = rng.randint(1, 40), rng.uniform(0.0, 0.1)

        def ready():
            if steps() >= step and not seen:
                seen.append(time.monotonic())
            return bool(seen) and (time.monotonic() - seen[0] >= delay or steps() >= step + 2)

        return f"{delay:.2f} s after step {step} of {TRAIN_STEPS}", ready
    k = rng.randint(1, 9)
    return (f"while checkpoint {k} is written (or just after)",
            lambda: (steps() >= 4 * k and any(run_dir.glob(f".{CHECKPOINT_NAME}.tmp-*"))) or steps() >= 4 * k + 2)


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(TRAIN_KILLS))
def test_train_student_killed_at_a_random_moment_resumes_to_the_same_weights(
    trial, tmp_path, small_cache, trained, subprocess_env, helpers
):
    kind = list(TRAIN_MOMENTS)[trial % len(TRAIN_MOMENTS)]
    run_dir = tmp_path / "killed"
    moment, ready = train_moment(kind, trial_rng("train-kill", trial), run_dir)
    kill_when(helpers.cli_command() + train_args(small_cache, run_dir), ready, what=moment,
              log_path=tmp_path / "killed.log", env=subprocess_env)
    checkpoint = run_dir / CHECKPOINT_NAME
    step = load_checkpoint(checkpoint)["position"]["step"] if checkpoint.exists() else 0
    state = f"checkpoint at step {step}" if checkpoint.exists() else ("run dir without a checkpoint" if run_dir.exists() else "no run dir yet")

    result = invoke(*train_args(small_cache, run_dir, "--resume"))
    assert result.exit_code == 0, result.output
    want, got = weights(trained[0]), weights(run_dir)
    differ = [name for name in want if not torch.equal(want[name], got[name])]
    MOMENTS.append(dict(command="train-student", trial=trial, moment=moment, state=state,
                        resume=f"steps {step + 1}..{TRAIN_STEPS} run again, weights " + ("identical" if not differ else "DIFFER")))
    record("kill", f"SIGKILL of train-student {TRAIN_MOMENTS[kind]}, then --resume", detected=None,
           outcome="the same weights and losses as an uninterrupted run" if not differ else f"{len(differ)} tensors differ",
           wrong=len(differ))
    assert differ == []
    assert train_losses(run_dir) == train_losses(trained[0])
    assert not list(run_dir.glob(f".{CHECKPOINT_NAME}.tmp-*"))  # a killed save's temporary file is cleared


# =====================================================================================================
# Damaged caches: detected naming the epoch/unit, file or field; --repair recomputes only damaged units
# =====================================================================================================


def flip_byte(path: Path, rng: random.Random) -> None:
    data = bytearray(path.read_bytes())
    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))


def truncate(path: Path, rng: random.Random) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: rng.randrange(len(data))])


SHARD_DAMAGE = {"flipped byte": flip_byte, "truncated": truncate, "deleted": lambda path, rng: path.unlink()}


def repair(make_config, out: Path) -> list[tuple[int, int]]:
    return resume(make_config, out, repair=True)


@pytest.mark.parametrize("trial", range(TRIALS))
def test_damaged_shard_files_are_named_and_repair_recomputes_only_them(trial, tmp_path, small_cache, make_config):
    """1-3 units damaged at random (a flipped bit, a cut or a deleted shard file of a random array)."""
    rng = trial_rng("shard-damage", trial)
    out = copy_cache(small_cache, tmp_path / "cache")
    damaged = {}
    for i, (epoch, unit) in enumerate(rng.sample(UNITS, rng.randint(1, 3))):
        kind = list(SHARD_DAMAGE)[(trial + i) % len(SHARD_DAMAGE)]
        key = shard_key(rng.choice(ARRAYS), epoch, unit)
        SHARD_DAMAGE[kind](out / key, rng)
        damaged[epoch, unit] = (kind, key)
    untouched = [u for u in UNITS if u not in damaged]
    before = snapshot(out, untouched)
    cache = open_cache(out)
    named = {}
    for (epoch, unit), (kind, key) in damaged.items():
        with pytest.raises((ChecksumError, IncompleteCacheError)) as caught:
            cache.read_unit(epoch, unit)
        named[epoch, unit] = f"epoch {epoch} unit {unit}" in str(caught.value) and f"file {key}" in str(caught.value)
    first = sorted(damaged)[0]
    verified = invoke("verify", out, "--quick")
    error_line(verified, 3, "failed verification")
    assert f"epoch {first[0]} unit {first[1]}" in verified.stdout and damaged[first][1] in verified.stdout

    computed = repair(make_config, out)
    lost, wrong = compare_records(out, small_cache)
    again = redone(before, out, untouched)
    for (epoch, unit), (kind, key) in damaged.items():
        record("damage", f"shard file {kind}", detected=named[epoch, unit],
               outcome="--repair recomputed only the damaged unit; records byte-identical", lost=lost, wrong=wrong)
    assert all(named.values()) and (lost, wrong) == (0, 0)
    assert sorted(computed) == sorted(damaged) and again == []


LEDGER_DAMAGE = ("flipped hex digit in a sha256", "truncated", "deleted", "edited epoch", "flipped byte")


@pytest.mark.parametrize("kind", LEDGER_DAMAGE)
def test_a_damaged_ledger_entry_is_named_and_repaired(kind, tmp_path, small_cache, make_config):
    rng = trial_rng(f"ledger-damage-{kind}", 0)
    out = copy_cache(small_cache, tmp_path / "cache")
    epoch, unit = rng.choice(UNITS)
    entry = out / ledger_key(epoch, unit)
    text = entry.read_text()
    if kind == "flipped hex digit in a sha256":
        at = text.index('"sha256": "') + len('"sha256": "') + rng.randrange(64)
        entry.write_text(text[:at] + format(int(text[at], 16) ^ 1, "x") + text[at + 1 :])
    elif kind == "truncated":
        entry.write_text(text[: rng.randrange(len(text) - 2)])
    elif kind == "deleted":
        entry.unlink()
    elif kind == "edited epoch":
        entry.write_text(text.replace(f'"epoch": {epoch}', f'"epoch": {epoch + 7}', 1))
    else:
        flip_byte(entry, rng)
    untouched = [u for u in UNITS if u != (epoch, unit)]
    before = snapshot(out, untouched)

    detected, harmless = True, False
    try:
        open_cache(out).read_unit(epoch, unit)
        harmless = True  # a changed commit time, view or byte count: informational fields, no record depends on them
    except IncompleteCacheError as exc:
        detected = f"epoch {epoch} unit {unit}" in str(exc) and "not committed" in str(exc)
    except ChecksumError as exc:  # a shard file against the entry, or the entry against its epoch index
        detected = f"epoch {epoch} unit {unit}" in str(exc) and ("ledger checksum" in str(exc) or "disagree" in str(exc))
    except FormatError as exc:
        detected = entry.name in str(exc)
    computed = repair(make_config, out) if not harmless else []
    lost, wrong = compare_records(out, small_cache)
    record("damage", f"ledger entry: {kind}", detected=None if harmless else detected,
           outcome=("an informational field changed (commit time or a count); records unaffected" if harmless
                    else "--repair (or --resume) recomputed only that unit; records byte-identical"), lost=lost, wrong=wrong)
    assert detected and (lost, wrong) == (0, 0)
    assert computed == ([] if harmless else [(epoch, unit)]) and redone(before, out, untouched) == []


ARRAY_METADATA_DAMAGE = {
    "dtype edited": lambda path: path.write_text(path.read_text().replace('"float16"', '"float32"')),
    "shape edited": lambda path: path.write_text(json.dumps({**json.loads(path.read_text()), "shape": [1, 1536, 5]})),
    "truncated": lambda path: path.write_bytes(path.read_bytes()[:200]),
    "deleted": lambda path: path.unlink(),
}


@pytest.mark.parametrize("kind", ARRAY_METADATA_DAMAGE)
def test_damaged_array_metadata_is_named_and_repair_uncommits_nothing(kind, tmp_path, small_cache, make_config, helpers):
    """Array metadata cannot be recomputed: every command refuses naming it, and --repair leaves the units alone."""
    out = copy_cache(small_cache, tmp_path / "cache")
    meta = out / "values" / "zarr.json"
    ARRAY_METADATA_DAMAGE[kind](meta)
    before = helpers.tree_hashes(out)
    with pytest.raises(FormatError) as caught:
        open_cache(out)
    detected = "values/zarr.json" in str(caught.value)
    line = error_line(invoke("info", out), 3, "values/zarr.json")
    with pytest.raises(FormatError, match="values/zarr.json"):
        resume(make_config, out, repair=True)
    kept = helpers.tree_hashes(out) == before
    shutil.copy(small_cache / "values" / "zarr.json", meta)  # restored from a copy: every unit reads as before
    lost, wrong = compare_records(out, small_cache)
    record("damage", f"array metadata (values/zarr.json) {kind}", detected=detected,
           outcome="refused by every command naming the file; --repair uncommits nothing; restoring the file restores the cache",
           lost=lost, wrong=wrong)
    assert detected and kept and (lost, wrong) == (0, 0), line


@pytest.mark.parametrize("kind, file", [("flipped byte", "samples/label/c/0"), ("truncated", "samples/digest/c/0"),
                                        ("deleted", "samples/key/c/0"), ("deleted", "samples/source_index/zarr.json")])
def test_a_damaged_plan_is_named(kind, file, tmp_path, small_cache, make_config, helpers):
    out = copy_cache(small_cache, tmp_path / "cache")
    rng = trial_rng(f"plan-{file}", 0)
    {"flipped byte": flip_byte, "truncated": truncate, "deleted": lambda p, r: p.unlink()}[kind](out / file, rng)
    before = helpers.tree_hashes(out)
    array = "/".join(file.split("/")[:2])
    with pytest.raises(FormatError) as caught:
        open_cache(out).samples()
    detected = array in str(caught.value)
    with pytest.raises(FormatError, match=array):
        resume(make_config, out, repair=True)
    record("damage", f"plan (samples arrays): {kind}", detected=detected,
           outcome="refused naming the array; the records are intact (restore the file from a copy)")
    assert detected and helpers.tree_hashes(out) == before


@pytest.mark.parametrize("kind", ["deleted", "truncated", "format_version 3", "format_version missing"])
def test_a_damaged_manifest_or_unknown_format_version_is_refused_by_every_command(kind, tmp_path, small_cache,
                                                                                precompute_argv, helpers):
    out = copy_cache(small_cache, tmp_path / "cache")
    root = out / "zarr.json"
    if kind == "deleted":
        root.unlink()
        culprit = "zarr.json is missing"
    elif kind == "truncated":
        root.write_bytes(root.read_bytes()[:1000])
        culprit = "zarr.json is not valid JSON"
    else:
        data = json.loads(root.read_text())
        manifest = data["attributes"]["kdcache"]
        if kind == "format_version 3":
            manifest["format_version"] = 3
        else:
            del manifest["format_version"]
        root.write_text(json.dumps(data))
        culprit = f"format_version {manifest.get('format_version')!r} is not supported"
    before = helpers.tree_hashes(out)
    lines = [error_line(invoke("info", out), 3, culprit),
             error_line(invoke("verify", out, "--quick"), 3, culprit),
             error_line(invoke(*train_args(out, tmp_path / "run")), 3, culprit)]
    if kind != "deleted":  # a directory without zarr.json is not a cache at all: refused as such below
        lines.append(error_line(invoke(*precompute_argv(out, resume=True)), 3, culprit))
    else:
        lines.append(error_line(invoke(*precompute_argv(out, resume=True)), 2, "is not a kdcache cache"))
    record("damage", f"manifest (zarr.json) {kind}" if not kind.startswith("format") else f"unknown format version ({kind})",
           detected=True, outcome="info, verify, train-student and precompute --resume refuse with one line naming it; nothing written")
    assert helpers.tree_hashes(out) == before and not (tmp_path / "run").exists(), lines


def edit(path: Path, field: str, change) -> None:
    root = json.loads((path / "zarr.json").read_text())
    node, parts = root["attributes"]["kdcache"], field.split(".")
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = change(node[parts[-1]])
    (path / "zarr.json").write_text(json.dumps(root, indent=1))


# (field, change, where it is detected, what the message names)
HAND_EDITS = [
    ("epochs", lambda v: v + 1, "open", "manifest field epochs"),
    ("k", lambda v: v - 2, "open", "manifest field k"),
    ("blocks.block_capacity", lambda v: v + 44, "open", "manifest field blocks.block_capacity"),
    ("blocks.blocks_per_unit", lambda v: v + 1, "open", "manifest field blocks.blocks_per_unit"),
    ("dtypes.values", lambda v: "float32", "open", "manifest field dtypes.values"),
    ("teacher.num_classes", lambda v: v + 2, "open", "dataset.num_classes"),
    ("dataset.num_samples", lambda v: v - 1, "open", "blocks.sizes"),
    ("blocks.sizes", lambda v: v[::-1], "plan", "manifest field blocks.sizes"),
    ("samples_sha256.label", lambda v: "0" * 64, "plan", "samples/label does not match its checksum"),
    ("param_fields", lambda v: v[1:] + v[:1], "spec", "field param_fields"),
    ("augmentation.color_jitter", lambda v: 0.4, "spec", "field param_fields"),
    ("augmentation.output_size", lambda v: 16, "resume", "augmentation.output_size differs"),
    ("seed", lambda v: v + 1, "resume", "seed differs"),
    ("teacher.weights_sha256", lambda v: "0" * 64, "resume", "teacher.weights_sha256 differs"),
    ("dataset.digest", lambda v: "0" * 64, "verify", "manifest field dataset.digest"),
]


@pytest.mark.parametrize("field, change, where, named", HAND_EDITS, ids=[e[0] for e in HAND_EDITS])
def test_a_hand_edited_manifest_is_detected_naming_the_field(field, change, where, named, tmp_path, small_cache,
                                                            make_config, teacher_ckpt, helpers):
    out = copy_cache(small_cache, tmp_path / "cache")
    edit(out, field, change)
    before = helpers.tree_hashes(out)
    with pytest.raises(KdcacheError) as caught:
        if where == "open":
            open_cache(out)
        elif where == "plan":
            open_cache(out).samples()
        elif where == "spec":
            cache_spec(open_cache(out).manifest)
        elif where == "resume":
            resume(make_config, out)
        else:
            verify_cache(VerifyConfig(cache=str(out), quick=True), log=lambda message: None)
    detected = named in str(caught.value)
    outcome = {"open": "refused when the cache is opened", "plan": "refused when the plan is read",
               "spec": "refused when the augmentation spec is read (every command that replays)",
               "resume": "precompute --resume refuses naming the field; verify fails naming a view", "verify": "verify fails"}[where]
    if where == "resume":  # the stored records are still those the views were made with; verify says what changed
        with pytest.raises(VerifyError) as gate:
            verify_cache(VerifyConfig(cache=str(out), data="digits", views=8,
                                teacher=TeacherConfig(model="test_resnet", checkpoint=str(teacher_ckpt))), log=lambda m: None)
        assert any(word in str(gate.value) for word in ("stored parameter", "teacher weights differ", "class", "logit"))
    record("damage", f"manifest edited by hand: {field}", detected=detected,
           outcome=outcome if where == "resume" else f"{outcome}, naming the field")
    assert detected, str(caught.value)
    assert helpers.tree_hashes(out) == before


# =====================================================================================================
# Forged augmentation parameters with valid checksums: refused before any replay, naming the view and field
# =====================================================================================================

PRESET_CACHE = dict(data="digits:val", epochs=1, block_size=360, blocks_per_unit=1)  # one block, one unit


@pytest.fixture(scope="module")
def preset_caches(tmp_path_factory, make_config, helpers):
    """``preset_caches(name) -> Path``: digits:val (360 samples, one block) cached with augmentation preset ``name``."""
    made = {}

    def make(name: str) -> Path:
        if name not in made:
            made[name] = tmp_path_factory.mktemp(f"preset-{name}") / "cache"
            helpers.run_precompute(make_config(made[name], augmentation=name, **PRESET_CACHE))
        return made[name]

    return make


@pytest.fixture(scope="module")
def digits_blocks() -> list[tuple[np.ndarray, list]]:
    """The 6 blocks of digits (blocks of 256) as a cache plans them: (source positions, decoded images)."""
    source = open_source("digits")
    layout, members = plan_layout(source, block_size=256, blocks_per_unit=2, seed=0)
    return [(block, [decode_sample(s) for s in read_block(source, layout, b, block)]) for b, block in enumerate(members)]


def test_genuine_parameters_of_every_preset_pass_the_parameter_check(digits_blocks):
    """Every block of digits, 3 epochs, every preset at two output sizes: drawn parameters are never refused."""
    checked = 0
    for name in PRESETS:
        for output_size in (32, 7):
            spec = preset(name, output_size=output_size, mean=(0.5,) * 3, std=(0.5,) * 3)
            for epoch in range(3):
                for block, (members, images) in enumerate(digits_blocks):
                    sizes = [(image.height, image.width) for image in images]
                    params = sample_view_params(spec, seed=7, epoch=epoch, block_id=block, sample_ids=members, image_sizes=sizes)
                    check_view_params(spec, params, image_sizes=sizes, block_size=len(members), where=f"epoch {epoch} block {block}")
                    checked += 1
    record("forged parameters", "genuine parameters of every preset (none, light, strong, funmatch, cutmix; output 32 and 7)",
           detected=None, trials=checked, outcome="every block's parameters pass the range check: no false alarm")
    assert checked == len(PRESETS) * 2 * 3 * 6


# (preset, field, forged value, what it is); a row with an applied RandAugment op is chosen for "ra0_mag"
FORGERIES = [
    ("light", "crop_top", float("nan"), "NaN"),
    ("light", "crop_height", 1e9, "a huge crop box"),
    ("none", "crop_width", -3.0, "a negative crop size"),
    ("light", "flip", 0.5, "a flag that is neither 0 nor 1"),
    ("strong", "ra1_op", 15.0, "a RandAugment op id out of range"),
    ("strong", "ra0_mag", 1e9, "a RandAugment magnitude out of range"),
    ("strong", "erase_height", 1000.0, "an erase box outside the output"),
    ("funmatch", "mix_partner", 360.0, "a mix partner outside the block"),
    ("funmatch", "mix_lam", float("inf"), "an infinite mixing weight"),
    ("cutmix", "mix_bottom", 33.0, "a cutmix box outside the output"),
]


def forge(cache_path: Path, field: str, value: float, rng: random.Random) -> tuple[int, str]:
    """Write ``value`` into ``field`` of one view of epoch 0, block 0, committed with valid checksums: (position, key)."""
    cache = open_cache(cache_path)
    arrays = {name: array.copy() for name, array in cache.read_unit(0, 0).items()}
    fields = list(cache.manifest.param_fields)
    rows = range(cache.layout.sizes[0])
    if field.startswith("ra0_mag"):
        rows = [r for r in rows if arrays["params"][r, fields.index("ra0_op")] >= 0]
    row = rng.choice(list(rows))
    arrays["params"][row, fields.index(field)] = value
    CacheWriter(cache_path).write_unit(0, 0, arrays)
    write_epoch_index(cache_path, 0)  # and the epoch index rebuilt from the new entry
    open_cache(cache_path).verify_unit(0, 0)  # the checksums are valid: only the values are wrong
    return row, str(cache.samples()["key"][row])


@pytest.mark.parametrize("name, field, value, what", FORGERIES, ids=[f"{f[0]}-{f[1]}" for f in FORGERIES])
def test_forged_parameters_with_valid_checksums_are_refused_before_replay(name, field, value, what, preset_caches,
                                                                         tmp_path, teacher_ckpt):
    """train-student and show refuse the block before replaying any view (no crash, no huge image), naming the
    epoch, block, view position and field; verify without its re-draw check fails naming the same."""
    out = copy_cache(preset_caches(name), tmp_path / "cache")
    row, key = forge(out, field, value, trial_rng(f"forge-{name}-{field}", 0))
    culprit = f"epoch 0 block 0, view at position {row}: stored parameter {field} = {np.float32(value):.6g}; expected"
    run_dir = tmp_path / "run"
    with time_limit(60):
        trained = error_line(invoke("train-student", "--data", "digits:val", "--cache", out, "--run-dir", run_dir,
                                    "--model", "test_resnet", "--loss", "kd", "--epochs", "1", "--batch-size", "64",
                                    "--amp", "none", "--device", "cpu"), 3, str(out), culprit)
        shown = error_line(invoke("show", out, "--data", "digits:val", "--epoch", "0", "--out", tmp_path / "views.png",
                                  "--samples", row), 3, culprit)
        with pytest.raises(VerifyError) as caught:
            verify_cache(VerifyConfig(cache=str(out), data="digits:val", views=4, check_params=False,
                                teacher=TeacherConfig(model="test_resnet", checkpoint=str(teacher_ckpt))), log=lambda m: None)
    record("forged parameters", f"{what} ({field}, preset {name}), committed with valid checksums",
           detected=culprit in str(caught.value),
           outcome="train-student, show and verify refuse before any replay, naming the epoch, block, view position and field")
    assert culprit in str(caught.value), str(caught.value)
    assert not (run_dir / "model.pt").exists() and not (tmp_path / "views.png").exists(), (trained, shown)


# =====================================================================================================
# Bad sources: one policy (fail naming the key or shard), never a silent change of the plan
# =====================================================================================================


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """digits as an imagefolder: 10 classes x 6 PNG images (60 samples)."""
    root = tmp_path_factory.mktemp("folder") / "images"
    source = open_source("digits")
    labels = {}
    for sample in source.read(range(300)):
        if labels.setdefault(sample.label, 0) < 6:
            labels[sample.label] += 1
            path = root / str(sample.label) / f"{sample.key}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png_bytes(np.load(io.BytesIO(sample.data))))
    return root


FOLDER = dict(block_size=16, blocks_per_unit=1, epochs=1)  # 4 blocks, 4 units


def folder_copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "images"))


def last_block_file(images: Path) -> Path:
    """An image of the folder's last block (computed after the blocks before it)."""
    source = open_source(f"imagefolder:{images}")
    _, members = plan_layout(source, block_size=16, blocks_per_unit=1, seed=0)
    key = source.read([int(members[-1][0])])[0].key
    return next(images.glob(f"{key}.*"))


def refused_before_writing(result, out: Path, exit_code: int, *culprits) -> str:
    line = error_line(result, exit_code, *culprits)
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*")), "nothing may be written"
    return line


@pytest.mark.parametrize("kind", ["text in a .png", "an empty .png"])
def test_a_file_that_is_not_an_image_is_named_before_anything_is_written(kind, folder, tmp_path, precompute_argv):
    images = folder_copy(folder, tmp_path)
    bad = sorted(images.glob("7/*.png"))[2]
    bad.write_bytes(b"<html>404 not found</html>" if kind.startswith("text") else b"")
    key = f"7/{bad.stem}"
    out = tmp_path / "cache"
    refused_before_writing(invoke(*precompute_argv(out, data=f"imagefolder:{images}", **FOLDER)), out, 2,
                           f"sample '{key}'", "cannot decode image")
    record("bad source", f"imagefolder: {kind}", detected=True, outcome="refused naming the key before anything is written")


def test_a_truncated_image_stops_precompute_naming_it_and_the_plan_never_changes(folder, tmp_path, precompute_argv, helpers):
    """The header reads, the pixels do not: precompute stops at that block naming the key, epoch and block, and
    keeps its committed units; neither a resume nor a fixed file changes the plan: both are refused naming the key."""
    images = folder_copy(folder, tmp_path)
    bad = last_block_file(images)
    good = bad.read_bytes()
    bad.write_bytes(good[: len(good) * 2 // 3])
    key = f"{bad.parent.name}/{bad.stem}"
    out = tmp_path / "cache"
    argv = precompute_argv(out, data=f"imagefolder:{images}", **FOLDER)
    error_line(invoke(*argv), 2, f"sample '{key}'", "epoch 0 block 3", "cannot decode image")
    kept = sorted(ledger_entries(out))

    def content():  # the cache's files; claims/ is the writers' coordination (a failed unit's claim is marked released)
        return {name: digest for name, digest in helpers.tree_hashes(out).items() if not name.startswith("claims/")}

    before = content()
    error_line(invoke(*argv, "--resume"), 2, f"sample '{key}'")  # still broken: the same refusal
    bad.write_bytes(good)  # "fixed": other bytes than the plan holds
    error_line(invoke(*argv, "--resume"), 4, f"sample '{key}'", "digest")
    record("bad source", "imagefolder: a truncated image (header intact)", detected=True,
           outcome="precompute stops naming the key, epoch and block; committed units kept; the plan never changes")
    assert kept == [(0, 0), (0, 1), (0, 2)] and content() == before
    assert all("released" in p.read_text() for p in (out / "claims").iterdir())  # the failed unit went back to the others


def test_duplicate_keys_in_an_imagefolder_are_named(folder, tmp_path, precompute_argv):
    images = folder_copy(folder, tmp_path)
    first = sorted(images.glob("3/*.png"))[0]
    Image.open(first).save(first.with_suffix(".jpg"))
    out = tmp_path / "cache"
    refused_before_writing(invoke(*precompute_argv(out, data=f"imagefolder:{images}", **FOLDER)), out, 2,
                           f"duplicate key '3/{first.stem}'")
    record("bad source", "imagefolder: duplicate keys (a.png and a.jpg)", detected=True,
           outcome="refused naming the key before anything is written")


def tar_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """digits:val in 4 tar shards of up to 100 samples, with classes.txt."""
    root = tmp_path_factory.mktemp("shards")
    write_shards(open_source("digits:val"), str(root / "s-%02d.tar"), samples_per_shard=100)
    return root


def changed_shards(shards: Path, tmp_path: Path, shard: int, change, classes: bool = True) -> str:
    root = Path(shutil.copytree(shards, tmp_path / "shards"))
    path = root / f"s-{shard:02d}.tar"
    write_tar(path, change(tar_members(path)))
    if not classes:
        (root / "classes.txt").unlink()
    return f"{root}/s-{{00..03}}.tar"


def relabel(members, key_index: int, label: bytes):
    key = sorted({name.split(".")[0] for name, _ in members})[key_index]
    return [(name, label if name == f"{key}.cls" else data) for name, data in members], key


TAR_FAULTS = {
    "a member group without an image (.txt and .cls)": (1, lambda m: m + [("notes.txt", b"hi"), ("notes.cls", b"1")],
                                                        True, ["s-01.tar", "sample 'notes' has no image"]),
    "a .png member holding text": (2, lambda m: [(n, b"not a picture" if n == m[1][0] else d) for n, d in m], True,
                                   ["cannot decode image"]),
    "a label outside the class range (classes.txt lists 10)": (3, lambda m: relabel(m, 4, b"12")[0], True,
                                                               ["has label 12", "< 10"]),
    "a label outside the class range (no classes.txt)": (3, lambda m: relabel(m, 4, b"12")[0], False,
                                                         ["has label 12", "< 10"]),
    "an empty shard among others": (1, lambda m: [], True, ["s-01.tar", "holds no samples"]),
    "duplicate keys across shards": (2, lambda m: m + [("digits-0011.png", m[1][1]), ("digits-0011.cls", b"1")], True,
                                     ["duplicate key 'digits-0011'", "s-00.tar", "s-02.tar"]),
    "a shard cut in the middle of a member": (1, None, True, ["s-01.tar", "cannot read tar"]),
}


@pytest.mark.parametrize("fault", TAR_FAULTS)
def test_a_bad_tar_shard_is_named_before_anything_is_written(fault, shards, tmp_path, precompute_argv):
    shard, change, classes, culprits = TAR_FAULTS[fault]
    if change is None:  # cut the file itself, not its members
        root = Path(shutil.copytree(shards, tmp_path / "shards"))
        path = root / f"s-{shard:02d}.tar"
        path.write_bytes(path.read_bytes()[:7000])
        pattern = f"{root}/s-{{00..03}}.tar"
    else:
        pattern = changed_shards(shards, tmp_path, shard, change, classes)
    if "holding text" in fault:
        name = tar_members(Path(pattern.split("s-{")[0]) / f"s-{shard:02d}.tar")[1][0]
        culprits = [f"sample '{name.split('.')[0]}'", *culprits]
    if "label outside" in fault:
        _, key = relabel(tar_members(shards / f"s-{shard:02d}.tar"), 4, b"12")
        culprits = [f"sample '{key}'", *culprits]
    out = tmp_path / "cache"
    refused_before_writing(invoke(*precompute_argv(out, data=pattern, block_size=100, blocks_per_unit=1, epochs=1)),
                           out, 2, *culprits)
    record("bad source", f"tar shards: {fault}", detected=True, outcome="refused naming the shard or key before anything is written")


@pytest.fixture(scope="module")
def folder_cache(tmp_path_factory, folder, make_config, helpers) -> Path:
    """A whole cache of the imagefolder (4 blocks, one unit each)."""
    path = tmp_path_factory.mktemp("folder-cache") / "cache"
    helpers.run_precompute(make_config(path, data=f"imagefolder:{folder}", **FOLDER))
    return path


PLAN_CHANGES = {
    "a sample added": lambda images: shutil.copy(sorted(images.glob("2/*.png"))[0], images / "2" / "extra.png"),
    "a sample removed": lambda images: sorted(images.glob("5/*.png"))[1].unlink(),
    "a sample's bytes replaced": lambda images: last_block_file(images).write_bytes(png_bytes(np.full((8, 8), 200, np.uint8))),
    "a sample relabelled (moved to another class)": lambda images: shutil.move(
        last_block_file(images), images / "0" / last_block_file(images).name),
}


@pytest.mark.parametrize("change", PLAN_CHANGES)
def test_a_source_changed_after_the_plan_is_refused_never_replanned(change, folder, folder_cache, tmp_path,
                                                                    precompute_argv, helpers):
    """precompute --resume (units 2 and 3 still to compute) and train-student refuse the changed data; a unit
    whose block is unchanged may still be computed, the block that differs never is."""
    data = Path(shutil.copytree(folder, tmp_path / "images"))
    whole = copy_cache(folder_cache, tmp_path / "whole")
    partial = copy_cache(folder_cache, tmp_path / "partial")
    for unit in (2, 3):
        (partial / ledger_key(0, unit)).unlink()
    victim = last_block_file(data)
    PLAN_CHANGES[change](data)
    before, kept = helpers.tree_hashes(whole), snapshot(partial, [(0, 0), (0, 1)])
    if "added" in change or "removed" in change:
        count = len(list(data.rglob("*.png")))
        resumed, trained = ["dataset.num_samples differs", f"this run has {count}"], [f"has {count} samples", "from 60"]
    elif "replaced" in change:
        resumed = trained = [f"sample '{victim.parent.name}/{victim.stem}'", "digest"]
    else:
        resumed = trained = ["differs from the cache's dataset"]
    lines = [error_line(invoke(*precompute_argv(partial, data=f"imagefolder:{data}", resume=True, **FOLDER)), 4, *resumed),
             error_line(invoke("train-student", "--data", f"imagefolder:{data}", "--model", "test_resnet", "--cache", whole,
                               "--run-dir", tmp_path / "run", "--epochs", "1", "--batch-size", "8", "--device", "cpu",
                               "--amp", "none"), 4, *trained)]
    record("bad source", f"the source changed after the cache was made: {change}", detected=True,
           outcome="precompute --resume refuses and train-student refuses or stops before any step on the block, naming "
                   "the count or the sample; the plan is unchanged")
    refused_block = [int(b) for b in re.findall(r"\(epoch 0 block (\d)\)", lines[0])]
    assert all((0, block) not in ledger_entries(partial) for block in refused_block)  # one block per unit
    assert redone(kept, partial, [(0, 0), (0, 1)]) == [] and helpers.tree_hashes(whole) == before
    assert not (tmp_path / "run" / CHECKPOINT_NAME).exists()  # a count is refused at once; a sample when its block streams


# =====================================================================================================
# Write failures: a full disk (ENOSPC injected into every write under the output)
# =====================================================================================================


@pytest.mark.parametrize("trial", range(FULL_DISKS))
def test_a_full_disk_during_precompute_is_one_line_and_the_cache_stays_resumable(
    trial, tmp_path, small_cache, precompute_argv, monkeypatch, helpers
):
    rng = trial_rng("precompute-enospc", trial)
    size = sum(f.stat().st_size for f in small_cache.rglob("*") if f.is_file())
    disk = FullDisk(tmp_path, budget=int(rng.uniform(0.0, 0.95) * size)).install(monkeypatch)
    out = tmp_path / "cache"
    line = error_line(invoke(*precompute_argv(out)), 6, "No space left on device (ENOSPC)", str(out))
    monkeypatch.undo()  # space freed
    committed = sorted(ledger_entries(out)) if (out / "zarr.json").exists() else []
    before = snapshot(out, committed)
    result = invoke(*precompute_argv(out, resume=True))
    assert result.exit_code == 0, result.output
    lost, wrong = compare_records(out, small_cache)
    again = redone(before, out, committed)
    where = "while creating the cache" if "cannot write the cache" in line else "while committing a unit"
    record("write failure", f"disk full (ENOSPC) in precompute-logits, {where}", detected=disk.full and str(out) in line,
           outcome="one line naming the cache (and unit); --resume finished to byte-identical records, committed units kept",
           lost=lost, wrong=wrong)
    assert (lost, wrong) == (0, 0) and again == []


def test_a_full_disk_during_train_student_is_one_line_and_the_run_resumes_exactly(tmp_path, small_cache, trained, monkeypatch):
    """The first trial's disk is full from the start (regression: its run dir could not be resumed)."""
    run_dir, written = trained
    for trial in range(1 + TRIALS // 4):
        rng = trial_rng("train-enospc", trial)
        target = tmp_path / f"run-{trial}"
        disk = FullDisk(tmp_path, budget=0 if trial == 0 else int(rng.uniform(0.0, 0.95) * written)).install(monkeypatch)
        line = error_line(invoke(*train_args(small_cache, target)), 6, "No space left on device (ENOSPC)", str(target))
        monkeypatch.undo()
        result = invoke(*train_args(small_cache, target, "--resume"))
        assert result.exit_code == 0, result.output
        want, got = weights(run_dir), weights(target)
        wrong = sum(not torch.equal(want[name], got[name]) for name in want)
        record("write failure", "disk full (ENOSPC) in train-student (checkpoint, metrics or plot)",
               detected=disk.full and str(target) in line,
               outcome="one line naming the run dir; --resume ended with the same weights", wrong=wrong)
        assert wrong == 0 and train_losses(target) == train_losses(run_dir)


def test_a_full_disk_while_exporting_the_trained_model_is_one_line_and_resume_writes_it(tmp_path, small_cache, trained,
                                                                                      monkeypatch):
    """The run finished, then model.pt meets a full disk (regression: torch's opaque RuntimeError from C++):
    one line naming model.pt; after space is freed, --resume writes the same weights."""
    run_dir = tmp_path / "run"
    disk = FullDisk(run_dir / f".{MODEL_NAME}", budget=0).install(monkeypatch)  # only the export's temporary file
    with single_thread():
        line = error_line(invoke(*train_args(small_cache, run_dir)), 6, f"cannot write {run_dir / MODEL_NAME}",
                          "No space left on device (ENOSPC)", "--resume")
    monkeypatch.undo()
    left = sorted(p.name for p in run_dir.glob(f".{MODEL_NAME}*"))
    result = invoke(*train_args(small_cache, run_dir, "--resume"))
    assert result.exit_code == 0, result.output
    want, got = weights(trained[0]), weights(run_dir)
    wrong = sum(not torch.equal(want[name], got[name]) for name in want)
    record("write failure", "disk full (ENOSPC) in train-student while exporting model.pt", detected=disk.full,
           outcome="one line naming model.pt, no temporary file left; --resume wrote the same weights", wrong=wrong)
    assert disk.full and left == [] and wrong == 0, line


def test_write_error_is_public_with_the_other_errors():
    import kdcache
    from kdcache.errors import WriteError

    assert kdcache.WriteError is WriteError and "WriteError" in kdcache.__all__ and issubclass(WriteError, KdcacheError)


# =====================================================================================================
# Remote faults: a server that fails, drops connections or serves a cut or truncated file
# =====================================================================================================


class FaultyHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a directory; a request for a path ending in a key of ``always`` fails that way every time,
    one ending in a key of ``next`` fails as the next entry of its list says (then is served)."""

    always: dict[str, str] = {}
    next: dict[str, list[str]] = {}
    requests: Counter = Counter()

    def log_message(self, *args):
        pass

    def do_GET(self):
        for suffix in set(self.always) | set(self.next):
            if self.path.endswith(suffix):
                self.requests[suffix] += 1
                if self.always.get(suffix):
                    return self.fail(self.always[suffix])
                if self.next.get(suffix):
                    return self.fail(self.next[suffix].pop(0))
        return super().do_GET()

    def fail(self, fault: str):
        if fault == "500":
            return self.send_error(500, "server error")
        if fault == "drop":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return None
        data = Path(self.translate_path(self.path)).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data) if fault == "cut" else len(data) // 2))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])  # "cut": the connection ends early; "short": a truncated file
        self.close_connection = True
        return None


@pytest.fixture
def faulty(tmp_path, small_cache, monkeypatch):
    """(url of a copy of small_cache behind FaultyHandler, the handler class to set faults on)."""
    monkeypatch.setattr(Location, "BACKOFF", 0.01)
    root = tmp_path / "www"
    shutil.copytree(small_cache, root / "cache")
    handler = type("Handler", (FaultyHandler,), {"always": {}, "next": {}, "requests": Counter()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/cache", handler
    finally:
        server.shutdown()
        server.server_close()


def same_block(cache, local, epoch: int, block: int) -> bool:
    got, want = cache.read_block(epoch, block), local.read_block(epoch, block)
    return all(np.array_equal(got[name], want[name]) for name in ARRAYS)


@pytest.mark.parametrize("fault", ["500", "drop", "cut"])
def test_a_transient_server_fault_is_retried_to_the_right_bytes(fault, faulty, small_cache):
    url, handler = faulty
    key = shard_key("params", 1, 1)
    handler.next[key] = [fault, fault]
    cache = open_cache(url)
    ok = same_block(cache, open_cache(small_cache), 1, 3)
    record("remote", f"server: {fault} twice, then the file", detected=None,
           outcome="retried (3 requests), then read the right bytes", wrong=int(not ok) * VIEWS[1])
    assert ok and handler.requests[key] == 3


@pytest.mark.parametrize("fault", ["500", "drop", "cut"])
def test_a_lasting_server_fault_is_one_clear_error_and_nothing_bad_is_kept(fault, faulty, small_cache):
    url, handler = faulty
    key = shard_key("values", 0, 2)
    handler.always[key] = fault
    cache = open_cache(url)
    with pytest.raises(FormatError) as caught:
        cache.read_block(0, 4)
    named = f"cannot read {key} after 4 attempts" in str(caught.value) and url in str(caught.value)
    error_line(invoke("verify", url, "--quick"), 3, key, "after 4 attempts")
    handler.always[key] = None  # the server recovers: the same Cache reads the right bytes
    ok = same_block(cache, open_cache(small_cache), 0, 4)
    record("remote", f"server: {fault} on every request", detected=named,
           outcome="4 attempts, then one line naming the URL and file; a later read of the same cache is right",
           wrong=int(not ok) * VIEWS[2])
    assert named and ok


def test_a_truncated_file_on_the_server_fails_its_checksum_and_is_not_kept(faulty, small_cache):
    url, handler = faulty
    key = shard_key("indices", 1, 0)
    handler.always[key] = "short"
    cache = open_cache(url)
    with pytest.raises(ChecksumError) as caught:
        cache.read_block(1, 1)
    named = "epoch 1 unit 0" in str(caught.value) and f"file {key}" in str(caught.value)
    handler.always[key] = None
    ok = same_block(cache, open_cache(small_cache), 1, 1)
    record("remote", "server: a truncated copy of a shard file (consistent length)", detected=named,
           outcome="checksum error naming the epoch, unit and file; nothing kept: a later read is right",
           wrong=int(not ok) * VIEWS[0])
    assert named and ok


@pytest.mark.parametrize("fault", ["short", "500"])
def test_bad_array_metadata_from_the_server_is_named_and_not_kept(fault, faulty, small_cache):
    """Regression: a truncated zarr.json of an array was kept by the reader, so every later read failed."""
    url, handler = faulty
    handler.always["values/zarr.json"] = fault
    with pytest.raises(FormatError) as caught:
        open_cache(url).read_block(0, 0)
    named = "values/zarr.json" in str(caught.value)
    handler.always["values/zarr.json"] = None
    ok = same_block(open_cache(url), open_cache(small_cache), 0, 0)
    record("remote", f"server: array metadata {'truncated' if fault == 'short' else 'failing with 500'}", detected=named,
           outcome="refused naming values/zarr.json; once the server is right, the cache reads right")
    assert named and ok


def test_a_damaged_unit_of_a_served_cache_advises_a_fresh_copy_not_repair(tmp_path, small_cache, serve_directory):
    """--repair cannot write to a URL: a checksum error read over http says to fetch a fresh copy or tell the
    publisher; the same damage in a local cache says to repair it."""
    root = tmp_path / "www"
    out = copy_cache(small_cache, root / "cache")
    key = shard_key("tail", 0, 1)
    flip_byte(out / key, trial_rng("served-damage", 0))
    url = f"{serve_directory(root)}/cache"
    served = invoke("verify", url, "--quick")
    local = invoke("verify", out, "--quick")
    error_line(served, 3, url, "failed verification")
    error_line(local, 3, "failed verification")
    served = next(line for line in served.stdout.splitlines() if line.strip().startswith("FAILED"))
    local = next(line for line in local.stdout.splitlines() if line.strip().startswith("FAILED"))
    assert all(text in served for text in (url, "epoch 0 unit 1", f"file {key}", "fetch a fresh copy", "tell whoever publishes the cache"))
    assert all(text in local for text in ("epoch 0 unit 1", f"file {key}", "recompute it with kdcache precompute-logits --resume --repair"))
    with pytest.raises(ChecksumError) as caught:
        open_cache(url).read_block(0, 2)
    advised = "fetch a fresh copy" in str(caught.value) and "recompute it with" not in served
    record("remote", "a damaged shard file in a served cache (checksum mismatch)", detected=advised,
           outcome="one line naming the URL, epoch, unit and file; advises a fresh copy or the publisher, not --repair")
    assert advised, (served, local)


# =====================================================================================================
# Fuzzed manifests, ledger entries, array metadata, augmentation specs and parameter arrays
# =====================================================================================================

EXAMPLES = min(25 * TRIALS, 300)
FUZZ = settings(max_examples=EXAMPLES, deadline=timedelta(seconds=2), derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
SLOW_FUZZ = settings(FUZZ, max_examples=2 * TRIALS, deadline=timedelta(seconds=20))

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.sampled_from([0, -1, 1, 2**31, 2**63])
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=8,
)


def json_paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from json_paths(value, prefix + (key,))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from json_paths(value, prefix + (index,))


@st.composite
def mutated_json(draw, document):
    """``document`` with 1-3 nodes replaced by random JSON values, deleted, or given an extra key."""
    data = copy.deepcopy(document)
    for _ in range(draw(st.integers(1, 3))):
        paths = list(json_paths(data))[1:]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        node = data
        for part in path[:-1]:
            node = node[part]
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if action == "delete":
            del node[path[-1]]
        elif action == "add" and isinstance(node, dict):
            node[draw(st.text(max_size=6))] = draw(JSON_VALUES)
        else:
            node[path[-1]] = draw(JSON_VALUES)
    return data


@st.composite
def mutated_bytes(draw, data: bytes):
    """``data`` with random bytes flipped, a cut, or random bytes inserted."""
    data = bytearray(data)
    action = draw(st.sampled_from(["flip", "cut", "insert"]))
    if action == "cut":
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    if action == "insert":
        at = draw(st.integers(0, len(data)))
        return bytes(data[:at]) + draw(st.binary(min_size=1, max_size=16)) + bytes(data[at:])
    for _ in range(draw(st.integers(1, 4))):
        data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
    return bytes(data)


@contextlib.contextmanager
def time_limit(seconds: float):
    """Fail (not hang) when a call takes longer than ``seconds``."""

    def expire(signum, frame):
        raise TimeoutError(f"took longer than {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def outcome_of(call, counts: Counter) -> None:
    """Run ``call``; only kdcache's own errors (with one-line messages) may come out of it."""
    with time_limit(5):
        try:
            call()
            counts["accepted"] += 1
        except KdcacheError as exc:
            assert "\n" not in str(exc), str(exc)
            counts[type(exc).__name__] += 1


def record_fuzz(fault: str, counts: Counter) -> None:
    refused = sum(n for name, n in counts.items() if name != "accepted")
    kinds = ", ".join(f"{name} {n}" for name, n in sorted(counts.items()) if name != "accepted")
    record("fuzzing", fault, detected=None, trials=sum(counts.values()),
           outcome=f"only kdcache errors: {kinds or 'none'}; {counts['accepted']} still valid; no other exception, no hang")
    assert refused > 0


@pytest.fixture(scope="module")
def manifest_dict(small_cache) -> dict:
    return json.loads(json.dumps(open_cache(small_cache).manifest.to_dict()))


def test_fuzzed_manifest_objects_raise_only_format_errors(manifest_dict):
    counts = Counter()

    @FUZZ
    @given(mutated_json(manifest_dict))
    def check(data):
        outcome_of(lambda: Manifest.from_dict(data), counts)

    check()
    record_fuzz("fuzzed manifest objects (Manifest.from_dict)", counts)


@pytest.fixture
def fuzz_copy(tmp_path_factory, small_cache) -> Path:
    return copy_cache(small_cache, tmp_path_factory.mktemp("fuzz") / "cache")


def open_and_read(path: Path) -> None:
    """What every reader does first: open, read the plan and the spec, read a unit."""
    cache = open_cache(path)
    cache.samples()
    cache_spec(cache.manifest)
    cache.read_unit(1, 2)


@pytest.mark.parametrize("level", ["json", "bytes"])
def test_fuzzed_manifest_files_raise_only_kdcache_errors(level, fuzz_copy):
    root = fuzz_copy / "zarr.json"
    original = root.read_bytes()
    document = json.loads(original)
    counts = Counter()
    strategy = mutated_json(document) if level == "json" else mutated_bytes(original)
    regressions = ([{**document, "attributes": "kdcache"}, {**document, "attributes": ["kdcache"]}] if level == "json"
                   else [b"[" * 100_000, b'{"attributes": "kdcache"}'])  # were a TypeError and a RecursionError

    @FUZZ
    @given(strategy)
    @example(regressions[0])
    @example(regressions[1])
    def check(mutated):
        root.write_bytes(json.dumps(mutated).encode() if level == "json" else mutated)
        outcome_of(lambda: open_and_read(fuzz_copy), counts)

    check()
    root.write_bytes(original)
    record_fuzz(f"fuzzed manifest files ({'JSON values' if level == 'json' else 'bytes'}), opened and read", counts)


@pytest.mark.parametrize("file", ["ledger/e000001-u000002.json", "values/zarr.json", "params/zarr.json"])
def test_fuzzed_ledger_entries_and_array_metadata_raise_only_kdcache_errors(file, fuzz_copy):
    path = fuzz_copy / file
    original = path.read_bytes()
    counts = Counter()

    entry = {"epoch": 1, "unit": 2, "views": 413, "committed": "2024-01-01T00:00:00+00:00"}
    regressions = [json.dumps({**entry, "files": {shard_key("values", 1, 2): "not an object"}}).encode(),  # an AttributeError
                   json.dumps({**entry, "epoch": float("inf"), "files": {}}).encode()]  # an OverflowError

    @FUZZ
    @given(st.one_of(mutated_json(json.loads(original)).map(lambda d: json.dumps(d).encode()), mutated_bytes(original)))
    @example(regressions[0])
    @example(regressions[1])
    def check(mutated):
        path.write_bytes(mutated)
        outcome_of(lambda: open_and_read(fuzz_copy), counts)

    check()
    path.write_bytes(original)
    record_fuzz(f"fuzzed {'ledger entry' if file.startswith('ledger') else 'array metadata'} ({file})", counts)


def test_fuzzed_augmentation_specs_raise_only_config_errors(manifest_dict):
    counts = Counter()

    @FUZZ
    @given(mutated_json(manifest_dict["augmentation"]))
    def check(data):
        outcome_of(lambda: AugSpec.from_dict(data), counts)

    check()
    record_fuzz("fuzzed augmentation specs (AugSpec.from_dict)", counts)


def test_fuzzed_stored_parameter_bytes_raise_only_checksum_errors(fuzz_copy):
    path = fuzz_copy / shard_key("params", 0, 1)
    original = path.read_bytes()
    counts = Counter()

    @FUZZ
    @given(mutated_bytes(original), st.booleans())
    def check(mutated, checksums):
        path.write_bytes(mutated)
        outcome_of(lambda: open_cache(fuzz_copy, verify_checksums=checksums).read_unit(0, 1), counts)

    check()
    path.write_bytes(original)
    record_fuzz("fuzzed bytes of a stored parameter array, read with and without checksums", counts)


@pytest.fixture(scope="module")
def one_block_cache(tmp_path_factory, make_config, helpers) -> Path:
    """digits:val (360 samples) in one block and one unit: every verified view is in it."""
    path = tmp_path_factory.mktemp("one-block") / "cache"
    helpers.run_precompute(make_config(path, data="digits:val", epochs=1, block_size=360, blocks_per_unit=1))
    return path


def test_fuzzed_parameter_arrays_with_valid_checksums_fail_verify_naming_the_view(one_block_cache, tmp_path, teacher_ckpt):
    """Forged parameters (NaN, infinities, huge or negative crops, unknown op ids) committed with valid
    checksums: verify names the view and the parameter and never replays them (no crash, no hang)."""
    out = copy_cache(one_block_cache, tmp_path / "cache")
    cache = open_cache(out)
    original = cache.read_unit(0, 0)
    fields = cache.manifest.param_fields
    teacher = TeacherConfig(model="test_resnet", checkpoint=str(teacher_ckpt))
    counts = Counter()
    cells = st.tuples(st.integers(0, 359), st.integers(0, len(fields) - 1),
                      st.floats(width=32, allow_nan=True, allow_infinity=True) | st.sampled_from([-1.0, 1e9, 3e38, 0.5]))

    @SLOW_FUZZ
    @given(st.lists(cells, min_size=1, max_size=4))
    def check(changes):
        arrays = {name: array.copy() for name, array in original.items()}
        for row, column, value in changes:
            arrays["params"][row, column] = value
        CacheWriter(out).write_unit(0, 0, arrays)
        write_epoch_index(out, 0)
        changed = not np.array_equal(arrays["params"], original["params"], equal_nan=False)
        with time_limit(15):
            try:
                verify_cache(VerifyConfig(cache=str(out), data="digits:val", teacher=teacher, views=4), log=lambda m: None)
                counts["accepted"] += 1
                assert not changed, "forged parameters passed verify"
            except VerifyError as exc:
                assert "stored parameter" in str(exc) and "view (epoch 0, sample digits-" in str(exc), str(exc)
                counts["VerifyError"] += 1

    check()
    CacheWriter(out).write_unit(0, 0, original)
    write_epoch_index(out, 0)
    record_fuzz("fuzzed parameter arrays committed with valid checksums, then verify", counts)


@pytest.mark.parametrize("name", PRESETS)
def test_fuzzed_parameters_are_refused_by_the_check_or_replay_cleanly(name, digits_blocks):
    """Forged cells (NaN, infinities, huge, negative, fractional or plausible values) in a real block's parameters:
    either the range check refuses them with a FormatError, or every view that uses them replays on both paths
    to finite pixels, quickly. What the check lets through cannot crash a replay or allocate a huge image."""
    spec = preset(name, output_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    fields = param_fields(spec)
    members, images = digits_blocks[0]
    sizes = [(image.height, image.width) for image in images]
    original = sample_view_params(spec, seed=3, epoch=0, block_id=0, sample_ids=members, image_sizes=sizes)
    counts = Counter()
    values = (st.floats(width=32, allow_nan=True, allow_infinity=True)
              | st.sampled_from([-1.0, 0.0, 0.5, 1.0, 1e9, -1e9, 3e38, 7.0, 8.0, 9.0, 10.0, 14.0, 15.0, 31.0, 32.0, 33.0])
              | st.integers(-2, 40).map(float))
    cells = st.tuples(st.integers(0, len(members) - 1), st.integers(0, len(fields) - 1), values)

    def check_then_replay(params, rows, path):
        check_view_params(spec, params, image_sizes=sizes, block_size=len(members), where="epoch 0 block 0")
        views = replay_block(spec, params, images, positions=rows, path=path)
        assert views.shape == (len(rows), 3, 32, 32) and bool(torch.isfinite(views).all())

    @FUZZ
    @given(st.lists(cells, min_size=1, max_size=4), st.sampled_from(["pil", "tensor"]))
    def check(changes, path):
        params = original.copy()
        for row, column, value in changes:
            params[row, column] = value
        outcome_of(lambda: check_then_replay(params, sorted({row for row, _, _ in changes}), path), counts)

    check()
    record_fuzz(f"fuzzed parameter arrays ({name}): the range check, then replay of what passes", counts)
