"""Claims (kdcache.format.claims): exclusive, taken over from dead holders only, renewed, released.

The races are run in many real processes started at random offsets, and every process reports
what it won: exactly one may win each contested claim.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from kdcache.format import CLAIMS_DIR, Claims, Holder, unit_claim
from kdcache.format.claims import claim_name

KEY = unit_claim(3, 7)


def _claim_file(cache: Path, key: str = KEY, generation: int = 0) -> Path:
    return cache / CLAIMS_DIR / claim_name(key, generation)


def _write_claim(cache: Path, holder: Holder, *, key: str = KEY, generation: int = 0, age: float = 0.0) -> Path:
    path = _claim_file(cache, key, generation)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(holder)))
    then = time.time() - age
    os.utime(path, (then, then))
    return path


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_claim_is_exclusive_until_released(tmp_path):
    first, second = Claims(tmp_path), Claims(tmp_path)
    assert first.try_claim(KEY)
    assert not second.try_claim(KEY)
    assert second.live_holder(KEY).token == first.me.token
    assert first.still_held(KEY)
    first.release(KEY)  # not committed: marked released, its generation kept
    assert "released" in json.loads(_claim_file(tmp_path).read_text()) and second.live_holder(KEY) is None
    assert not first.still_held(KEY)
    assert second.try_claim(KEY)
    assert second.taken_over == 0 and not second.last_taken_over  # a released claim is free, not taken over
    assert not _claim_file(tmp_path, generation=0).exists() and _claim_file(tmp_path, generation=1).exists()
    second.release(KEY, committed=True)  # committed: removed
    second.close()
    first.close()
    assert not list((tmp_path / CLAIMS_DIR).iterdir())  # nothing left behind, not even temporaries


def test_a_claim_made_from_an_old_look_loses_to_a_higher_generation(tmp_path):
    """A process that judged generation 0 dead long ago makes generation 1 after others went on to 2: it must not hold."""
    late, current = Claims(tmp_path), Claims(tmp_path)
    _write_claim(tmp_path, replace(Holder.this_process(120), pid=_dead_pid(), token="dead"), generation=2)
    assert current.try_claim(KEY)  # generation 3
    real = late._generations  # the late process's look: only generation 0, held by a dead process
    late._generations = lambda key, calls=iter([[0]]): next(calls, None) or real(key)
    _write_claim(tmp_path, replace(Holder.this_process(120), pid=_dead_pid(), token="dead"), generation=0)
    assert not late.try_claim(KEY)
    assert not _claim_file(tmp_path, generation=1).exists()  # it removed what it made
    assert current.still_held(KEY) and current.live_holder(KEY).token == current.me.token
    late.close()
    current.close()


def test_forget_removes_only_released_and_dead_claims(tmp_path):
    with Claims(tmp_path) as live, Claims(tmp_path) as other:
        keys = [unit_claim(0, u) for u in range(3)]
        assert live.try_claim(keys[0]) and other.try_claim(keys[1])
        other.release(keys[1])
        _write_claim(tmp_path, replace(Holder.this_process(120), pid=_dead_pid(), token="dead"), key=keys[2])
        assert live.forget(keys) == 2
        assert [p.name for p in (tmp_path / CLAIMS_DIR).iterdir()] == [claim_name(keys[0], 0)]


def test_the_claim_file_says_who_holds_it(tmp_path):
    with Claims(tmp_path, lease_seconds=30) as claims:
        assert claims.try_claim(KEY)
        data = json.loads(_claim_file(tmp_path).read_text())
    assert data["pid"] == os.getpid() and data["lease_seconds"] == 30 and data["host"] and data["token"]
    assert data["pid_start"]  # read from /proc: a reused pid is told apart


def test_a_dead_holder_on_this_machine_is_taken_over_at_once(tmp_path):
    me = Holder.this_process(120)
    _write_claim(tmp_path, replace(me, pid=_dead_pid(), token="dead"))
    with Claims(tmp_path) as claims:
        assert claims.live_holder(KEY) is None
        assert claims.try_claim(KEY)
        assert claims.taken_over == 1 and claims.last_taken_over
        assert not _claim_file(tmp_path, generation=0).exists()  # the dead claim is removed
        assert json.loads(_claim_file(tmp_path, generation=1).read_text())["token"] == claims.me.token


def test_a_reused_pid_is_not_the_holder(tmp_path):
    me = Holder.this_process(120)
    _write_claim(tmp_path, replace(me, token="earlier", pid_start=str(int(me.pid_start) + 12345)))  # this pid, another start
    with Claims(tmp_path) as claims:
        assert claims.try_claim(KEY)


def test_a_live_holder_on_this_machine_is_never_taken_over(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.2)
        from kdcache.format.claims import _pid_start

        me = Holder.this_process(0.01)  # a lease long past: the pid decides on one machine, not the lease
        _write_claim(tmp_path, replace(me, pid=sleeper.pid, pid_start=_pid_start(sleeper.pid), token="sleeper"), age=3600)
        with Claims(tmp_path) as claims:
            assert not claims.try_claim(KEY)
            assert claims.live_holder(KEY).pid == sleeper.pid
    finally:
        sleeper.kill()
        sleeper.wait()
    with Claims(tmp_path) as claims:
        assert claims.try_claim(KEY)


@pytest.mark.parametrize("age, alive", [(5.0, True), (50.0, False)])
def test_another_machine_s_claim_lives_as_long_as_its_lease(tmp_path, age, alive):
    other = Holder("another-host", "another-boot", 4242, "1", "remote", "2026-01-01T00:00:00Z", 20.0)
    _write_claim(tmp_path, other, age=age)
    with Claims(tmp_path) as claims:
        assert (claims.live_holder(KEY) is not None) == alive
        assert claims.try_claim(KEY) == (not alive)


@pytest.mark.parametrize("age, alive", [(1.0, True), (3600.0, False)])
def test_an_unreadable_claim_is_judged_by_its_age(tmp_path, age, alive):
    path = _claim_file(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text('{"host": "half-writ')
    then = time.time() - age
    os.utime(path, (then, then))
    with Claims(tmp_path) as claims:
        assert claims.try_claim(KEY) == (not alive)


def test_the_lease_is_renewed_while_held(tmp_path):
    with Claims(tmp_path, lease_seconds=0.4) as claims:
        assert claims.try_claim(KEY)
        path = _claim_file(tmp_path)
        then = time.time() - 100
        os.utime(path, (then, then))
        time.sleep(0.5)  # about five renewals
        assert time.time() - path.stat().st_mtime < 0.4


def test_a_taken_over_claim_is_no_longer_held(tmp_path):
    with Claims(tmp_path, lease_seconds=0.2) as stalled, Claims(tmp_path) as other:
        assert stalled.try_claim(KEY)
        stalled._stop.set()  # a stalled process: it stops renewing
        path = _claim_file(tmp_path)
        # Seen from another machine, the lease has lapsed.
        data = json.loads(path.read_text())
        path.write_text(json.dumps(dict(data, host="stalled-host")))
        then = time.time() - 10
        os.utime(path, (then, then))
        assert other.try_claim(KEY)
        assert not stalled.still_held(KEY) and other.still_held(KEY)


def test_bad_lease_is_refused():
    with pytest.raises(ValueError, match="lease_seconds"):
        Claims("/nowhere", lease_seconds=0)


# ---- races between real processes --------------------------------------------------------------


def _contend(cache: str, keys: list[str], seed: int, start_at: float, results) -> None:
    rng = random.Random(seed)
    while time.time() < start_at:
        time.sleep(0.001)
    time.sleep(rng.uniform(0, 0.02))
    claims = Claims(cache)
    won = [key for key in keys if claims.try_claim(key)]
    results.put((os.getpid(), won))
    claims._stop.set()  # keep the claims (no release): the winners' files are counted afterwards


TRIALS = int(os.environ.get("KDCACHE_STRESS_TRIALS", "4")) * 5


@pytest.mark.slow
@pytest.mark.parametrize("stale", [False, True], ids=["fresh", "takeover"])
def test_exactly_one_of_many_processes_wins_each_claim(tmp_path, stale):
    """Processes race for the same claims at random offsets; with ``stale``, every claim starts held by a dead process."""
    context = multiprocessing.get_context("fork")
    keys = [unit_claim(0, u) for u in range(6)]
    for trial in range(TRIALS):
        cache = tmp_path / f"t{trial}"
        cache.mkdir()
        if stale:
            dead = replace(Holder.this_process(120), pid=_dead_pid(), token="dead")
            for key in keys:
                _write_claim(cache, dead, key=key, generation=trial % 3)
        results = context.Queue()
        start_at = time.time() + 0.3
        workers = [context.Process(target=_contend, args=(str(cache), keys, trial * 10 + i, start_at, results)) for i in range(4)]
        for worker in workers:
            worker.start()
        won = [results.get(timeout=60) for _ in workers]
        for worker in workers:
            worker.join()
        winners = {key: [pid for pid, keys_won in won if key in keys_won] for key in keys}
        assert all(len(pids) == 1 for pids in winners.values()), (trial, winners)
        files = sorted(p.name for p in (cache / CLAIMS_DIR).iterdir())
        assert len(files) == len(keys), files  # one claim file per key: the dead ones were removed, no temporaries


def test_claim_names_are_pinned():
    """docs/format.md: claims/eEEEEEE-uUUUUUU.gG.json and claims/manifest.gG.json."""
    from kdcache.format.claims import MANIFEST_CLAIM

    assert CLAIMS_DIR == "claims"
    assert claim_name(unit_claim(3, 7), 2) == "e000003-u000007.g2.json"
    assert claim_name(MANIFEST_CLAIM, 0) == "manifest.g0.json"
    assert sorted(Holder.__dataclass_fields__) == sorted(["host", "boot_id", "pid", "pid_start", "token", "claimed", "lease_seconds"])


def test_forget_removes_the_temporaries_of_writers_killed_while_claiming(tmp_path):
    folder = tmp_path / CLAIMS_DIR
    folder.mkdir()
    with Claims(tmp_path) as claims:
        host = claims.me.host
        dead = folder / f".{claim_name(KEY, 1)}.{host}-{_dead_pid()}-0a1b2c3d"
        mine = folder / f".{claim_name(KEY, 2)}.{host}-{os.getpid()}-0a1b2c3d"  # a live maker's: kept
        young = folder / f".{claim_name(KEY, 3)}.other.host.example-77-0a1b2c3d"  # another machine's, fresh: kept
        old = folder / f".{claim_name(KEY, 4)}.other.host.example-78-0a1b2c3d"  # another machine's, long stale
        for path in (dead, mine, young, old):
            path.write_text("{}")
        then = time.time() - 3600
        os.utime(old, (then, then))
        claims.forget([KEY])
    assert sorted(p.name for p in folder.iterdir()) == sorted([mine.name, young.name])
