"""Many writers, one cache: torchrun ranks and independent jobs, started at random offsets and killed at random.

Every trial checks, against a cache made by one process:
- the final cache's record shards and plan are byte-identical, its ledger and manifest equal
  (commit and creation times aside), and no claim is left on a committed unit;
- no unit was computed twice: the units each process logged as committed are disjoint between
  processes, and a process that exits by itself says ``computed N unit(s)`` with N its own count;
  the units nobody logged are at most one per process killed (killed after its commit, before
  its log line), and the units recomputed because their writer was killed are counted;
- no process exits 0 while the cache is incomplete, unless it says that live writers hold the rest.

Size: ``KDCACHE_STRESS_TRIALS`` (default 2: CI size) torchrun trials, and half as many (at
least 2) trials of independent jobs; 20 gives the full size of docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

TRIALS = int(os.environ.get("KDCACHE_STRESS_TRIALS", "2"))
HERE = Path(__file__).resolve().parent
EPOCHS, UNITS_PER_EPOCH = 2, 23  # digits: 1,437 samples in 23 blocks of 64, one block per unit
PLANNED = {(e, u) for e in range(EPOCHS) for u in range(UNITS_PER_EPOCH)}
REPORT = os.environ.get("KDCACHE_STRESS_REPORT")  # a JSON-lines file of per-trial counts, for docs/reliability.md


def _argv(output: Path, teacher: Path) -> list[str]:
    return ["precompute-logits", "--data", "digits", "--teacher", "test_resnet", "--teacher-checkpoint", str(teacher),
            "--topk", "3", "--augmentation", "light", "--seed", "7", "--epochs", str(EPOCHS), "--block-size", "64",
            "--blocks-per-unit", "1", "--batch-size", "64", "--output", str(output), "--resume"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, teacher_ckpt, subprocess_env, helpers):
    out = tmp_path_factory.mktemp("reference") / "cache"
    run = subprocess.run([*helpers.cli_command(), *_argv(out, teacher_ckpt)], capture_output=True, text=True,
                         env=subprocess_env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stderr.strip().splitlines()[-1] == f"computed {len(PLANNED)} unit(s)"
    return _content(out)


def _content(path: Path) -> dict:
    """What must equal a one-process cache: record shards and plan byte for byte; ledger and manifest without
    times; the content digest, which the epoch indexes must agree with (checked as the cache opens)."""
    from kdcache.format import open_cache

    cache = open_cache(path)
    content = {"digest": cache.digest(), "indexed epochs": cache.indexed_epochs(), "stale indexes": cache.stale_indexes()}
    for file in sorted(path.rglob("*")):
        name = str(file.relative_to(path))
        if not file.is_file() or name.startswith(("claims/", "ledger/epochs/")) or "/." in f"/{name}":
            continue
        data = file.read_bytes()
        if name.startswith("ledger/"):
            entry = json.loads(data)
            entry.pop("committed")
            content[name] = entry
        elif name == "zarr.json":
            manifest = json.loads(data)["attributes"]["kdcache"]
            content[name] = {k: v for k, v in manifest.items() if k not in ("created", "command")}
        else:
            content[name] = data
    return content


def _committed(path: Path) -> set[tuple[int, int]]:
    found = set()
    for file in (path / "ledger").glob("e*-u*.json") if (path / "ledger").is_dir() else []:
        match = re.match(r"e(\d+)-u(\d+)\.json$", file.name)
        found.add((int(match.group(1)), int(match.group(2))))
    return found


def _logged(text: str) -> list[tuple[int, int]]:
    return [(int(e), int(u)) for e, u in re.findall(r"^committed epoch (\d+) unit (\d+)", text, flags=re.M)]


class _Process:
    """One writer process of a trial: its log, its pid file, whether it was killed, its exit and what it logged."""

    def __init__(self, name: str, command: list[str], folder: Path, env: dict, delays: list[float]):
        self.name, self.folder = name, folder
        folder.mkdir(parents=True)
        self.popen = subprocess.Popen([sys.executable, str(HERE / "start_rank.py"), str(folder), ",".join(f"{d:.3f}" for d in delays),
                                       *command], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.killed = False

    def logs(self) -> dict[str, str]:
        return {p.stem: p.read_text(errors="replace") for p in sorted(self.folder.glob("*.log"))}

    def pids(self) -> dict[str, int]:
        return {p.stem: int(p.read_text()) for p in sorted(self.folder.glob("*.pid")) if p.read_text().strip()}


def _check_counts(processes: list[_Process], killed: int, cache: Path) -> dict:
    """Disjoint work, honest last lines; returns the counts of the trial."""
    seen: dict[tuple[int, int], str] = {}
    logged_total = taken_over = 0
    for process in processes:
        for rank, text in process.logs().items():
            who = f"{process.name}/{rank}"
            units = _logged(text)
            logged_total += len(units)
            taken_over += sum(int(n) for n in re.findall(r"^took over (\d+) unit\(s\) from writers that died", text, flags=re.M))
            for key in units:
                assert key not in seen, f"epoch {key[0]} unit {key[1]} computed by both {seen[key]} and {who}"
                seen[key] = who
            last = [line for line in text.strip().splitlines() if line.startswith("computed ")]
            if last:  # a process that stopped by itself, or through SIGTERM
                assert last[-1] == f"computed {len(units)} unit(s)", (who, text[-2000:])
                assert text.strip().splitlines()[-1] == last[-1], (who, text[-2000:])
    assert set(seen) <= _committed(cache) <= PLANNED
    unlogged = _committed(cache) - set(seen)
    assert len(unlogged) <= killed, f"{len(unlogged)} committed unit(s) nobody logged, {killed} process(es) killed"
    return {"logged": logged_total, "unlogged": len(unlogged), "taken_over": taken_over}


def _finish(cache: Path, teacher: Path, env: dict, helpers) -> int:
    """Rerun one job to finish the cache; it must compute exactly what is missing. Returns that count."""
    missing = PLANNED - _committed(cache)
    run = subprocess.run([*helpers.cli_command(), *_argv(cache, teacher)], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stderr.strip().splitlines()[-1] == f"computed {len(missing)} unit(s)", run.stderr
    return len(missing), sum(int(n) for n in re.findall(r"^took over (\d+) unit\(s\)", run.stderr, flags=re.M))


def _final_checks(cache: Path, reference: dict) -> None:
    assert _committed(cache) == PLANNED
    got = _content(cache)
    assert sorted(got) == sorted(reference)
    for name, value in reference.items():
        assert got[name] == value, f"{name} differs from the one-process cache"
    assert not list((cache / "claims").glob("*")) if (cache / "claims").is_dir() else True  # no claim outlives its commit


def _report(row: dict) -> None:
    if REPORT:
        with open(REPORT, "a") as handle:
            handle.write(json.dumps(row) + "\n")


@pytest.mark.parametrize("trial", range(TRIALS))
def test_torchrun_ranks_with_random_delays_and_kills(trial, tmp_path, teacher_ckpt, subprocess_env, reference, helpers):
    rng = random.Random(1000 + trial)
    world = 2 + trial % 3  # 2, 3 and 4 ranks in turn
    delays = [rng.uniform(0, 3) for _ in range(world)]
    kill = trial % 2 == 1  # every other trial: SIGKILL one rank at a random moment
    cache = tmp_path / "cache"
    command = ["-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_addr", "127.0.0.1",
               "--master_port", str(helpers.free_port()), str(HERE / "start_rank.py")]
    folder = tmp_path / "ranks"
    folder.mkdir()
    job = subprocess.Popen([sys.executable, *command, str(folder), ",".join(f"{d:.3f}" for d in delays), *_argv(cache, teacher_ckpt)],
                           env=subprocess_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    process = _Process.__new__(_Process)
    process.name, process.folder, process.popen, process.killed = "torchrun", folder, job, False
    killed = 0
    if kill:  # once a random number of units is committed (0: during start-up), then after a random delay within a unit
        after = rng.choice([0, rng.randrange(1, len(PLANNED) - 4)])
        deadline = time.monotonic() + 300
        while job.poll() is None and len(_committed(cache)) < after and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.3))
        victim = f"rank-{rng.randrange(world)}"
        pid = process.pids().get(victim)
        if job.poll() is None and pid is not None:
            os.kill(pid, signal.SIGKILL)
            killed = world  # the others are stopped by torchrun (SIGTERM): any may stop between commit and log line
    job.wait(timeout=400)
    _committed_before = _committed(cache)
    complete_at_exit = _committed_before == PLANNED
    if job.returncode == 0:
        assert complete_at_exit, "a torchrun job exited 0 with an incomplete cache"
    else:
        assert killed, f"torchrun failed without a kill: {process.logs()}"
        for rank, text in process.logs().items():  # every rank that was not killed says how to finish, in one error line
            errors = [line for line in text.splitlines() if line.startswith("error:")]
            assert len(errors) <= 1, (rank, errors)
            if errors and "finish the cache with:" not in errors[0]:
                assert "interrupted" in errors[0] or "rank 0 could not prepare" in errors[0], (rank, errors)
    counts = _check_counts([process], killed, cache)
    rerun, rerun_taken = (0, 0) if complete_at_exit else _finish(cache, teacher_ckpt, subprocess_env, helpers)
    _final_checks(cache, reference)
    recomputed = counts["taken_over"] + rerun_taken
    assert recomputed <= (1 if killed else 0)  # only the killed rank's unit in flight: the others were stopped by SIGTERM
    assert counts["logged"] + rerun + counts["unlogged"] == len(PLANNED)
    _report({"kind": "torchrun", "trial": trial, "ranks": world, "killed_rank": bool(killed), "rc": job.returncode,
             "planned": len(PLANNED), "committed_when_it_ended": len(_committed_before), **counts,
             "rerun_computed": rerun, "recomputed_after_kill": recomputed})


@pytest.mark.parametrize("trial", range(max(2, TRIALS // 2)))
def test_independent_jobs_at_random_offsets_some_killed_and_restarted(trial, tmp_path, teacher_ckpt, subprocess_env,
                                                                      reference, helpers):
    rng = random.Random(2000 + trial)
    jobs = 2 + trial % 2
    cache = tmp_path / "cache"
    argv = _argv(cache, teacher_ckpt)
    processes: list[_Process] = []
    start = time.monotonic()
    plan = sorted((rng.uniform(0, 4), i) for i in range(jobs))
    # a victim is killed once the cache holds a random number of units, then after a random delay within a unit
    victims = {i: rng.randrange(0, len(PLANNED) - 4) for i in range(jobs) if trial % 2 == 1 or rng.random() < 0.3}
    delays = {i: rng.uniform(0, 0.3) for i in victims}
    due: dict[int, float] = {}
    launched = 0
    killed = 0
    exits_checked: set[int] = set()
    while launched < len(plan) or any(p.popen.poll() is None for p in processes):
        now = time.monotonic() - start
        while launched < len(plan) and plan[launched][0] <= now:
            processes.append(_Process(f"job-{plan[launched][1]}", argv, tmp_path / f"job-{plan[launched][1]}", subprocess_env, [0]))
            launched += 1
        for index, process in enumerate(processes):
            number = int(process.name.split("-")[1])
            if number in victims and number not in due and process.pids() and len(_committed(cache)) >= victims[number]:
                due[number] = now + delays[number]
            if process.popen.poll() is None and number in due and now >= due[number] and not process.killed:
                process.popen.send_signal(signal.SIGKILL)
                process.killed = True
                killed += 1
                del victims[number], due[number]
                # the scheduler restarts it: a new job on the same cache, while the others still run
                processes.append(_Process(f"job-{len(processes) + 10}", argv, tmp_path / f"job-{len(processes) + 10}", subprocess_env, [0]))
            if process.popen.poll() is not None and index not in exits_checked:
                exits_checked.add(index)
                done = _committed(cache)
                text = "\n".join(process.logs().values())
                if process.popen.returncode == 0:
                    if "still being computed by" not in text:
                        assert done == PLANNED, f"{process.name} exited 0 with {len(PLANNED - done)} unit(s) missing, no holder named"
                elif not process.killed:  # a holder that died after this job's last look: it says how to finish
                    assert process.popen.returncode == 7 and "finish the cache with:" in text, text[-3000:]
        if time.monotonic() - start > 600:
            pytest.fail("the jobs did not finish within 600 s")
        time.sleep(0.02)
    counts = _check_counts(processes, killed, cache)
    rerun, rerun_taken = (0, 0) if _committed(cache) == PLANNED else _finish(cache, teacher_ckpt, subprocess_env, helpers)
    _final_checks(cache, reference)
    recomputed = counts["taken_over"] + rerun_taken
    assert recomputed <= killed  # a killed job held one unit at most
    assert counts["logged"] + rerun + counts["unlogged"] == len(PLANNED)
    _report({"kind": "jobs", "trial": trial, "jobs": jobs, "killed": killed, "processes": len(processes),
             "planned": len(PLANNED), **counts, "rerun_computed": rerun, "recomputed_after_kill": recomputed})


def test_epochs_added_while_another_job_writes(tmp_path, teacher_ckpt, subprocess_env, helpers):
    """A job that extends the cache to 3 epochs starts while another still computes the first 2: no unit lost or redone."""
    one = tmp_path / "one"
    run = subprocess.run([*helpers.cli_command(), *_argv(one, teacher_ckpt)[:-1], "--epochs", "3"], capture_output=True,
                         text=True, env=subprocess_env, timeout=300)
    assert run.returncode == 0, run.stderr
    cache = tmp_path / "cache"
    two = _Process("job-two", _argv(cache, teacher_ckpt), tmp_path / "job-two", subprocess_env, [0])
    deadline = time.monotonic() + 120
    while len(_committed(cache)) < 5 and time.monotonic() < deadline and two.popen.poll() is None:
        time.sleep(0.02)
    three = _Process("job-three", [*_argv(cache, teacher_ckpt), "--epochs", "3"], tmp_path / "job-three", subprocess_env, [0])
    assert two.popen.wait(timeout=300) == 0, two.logs()
    assert three.popen.wait(timeout=300) == 0, three.logs()
    assert "extending" in three.logs()["rank-0"]
    logged = [_logged(text) for process in (two, three) for text in process.logs().values()]
    assert not set(logged[0]) & set(logged[1]) and len(logged[0]) + len(logged[1]) == 3 * UNITS_PER_EPOCH
    got, want = _content(cache), _content(one)
    assert sorted(got) == sorted(want) and all(got[name] == want[name] for name in want)


def test_a_unit_committed_while_the_last_look_runs_is_not_reported_unfinished(tmp_path, make_config, monkeypatch):
    """The race of a job's last look: it reads the ledger (a unit is not committed), another writer commits that unit
    and releases its claim, then the job asks who holds the unit (no one). The unit is committed, not orphaned, and the
    job must finish without error. Here the other writer runs exactly in that gap, as a real second precompute."""
    from kdcache.errors import UnfinishedCacheError
    from kdcache.format import Claims, open_cache
    from kdcache.precompute import precompute_logits
    from threads import single_thread

    path = tmp_path / "cache"
    original = Claims.live_holder
    others = []

    def live_holder(self, key):
        if not others:  # the first look at an uncommitted unit: the other writer commits every unit left, and releases
            others.append(precompute_logits(make_config(path, resume=True), log=lambda message: None))
        return original(self, key)

    with single_thread():
        with pytest.raises(UnfinishedCacheError):
            precompute_logits(make_config(path, max_units=0), log=lambda message: None)  # the cache, no unit yet
        monkeypatch.setattr(Claims, "live_holder", live_holder)
        mine = precompute_logits(make_config(path, resume=True, max_units=2), log=lambda message: None)
    assert mine.units_done == 2 and others[0].units_done == 4 and not mine.unheld
    assert mine.epochs_complete == [0, 1] and len(open_cache(path).ledger) == 6
