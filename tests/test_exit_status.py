"""precompute-logits says how it ended: exit 0 only when the cache is complete or the rest is held by live writers.

Every way of stopping early (a unit budget, SIGTERM) exits 7 with one error line naming the
first missing unit and the command that finishes the cache; the last line counts this process's units.
"""

from __future__ import annotations

import json
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from kdcache.format import CLAIMS_DIR, Claims, Holder, open_cache, unit_claim
from kdcache.format.claims import _pid_start, claim_name
from kdcache.precompute import precompute_logits
from kdcache_cli.main import app
from threads import single_thread

UNITS = 6  # SMALL: 3 units per epoch, 2 epochs


def _lines(result) -> list[str]:
    return [line for line in result.stderr.strip().splitlines() if line.strip()]


def _run(argv: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_a_unit_budget_leaves_an_unfinished_cache_and_says_how_to_finish_it(tmp_path, precompute_argv, subprocess_env, helpers):
    out = tmp_path / "cache"
    result = _run([*helpers.cli_command(), *precompute_argv(out), "--max-units", "2"], subprocess_env)
    assert result.returncode == 7, result.stderr
    lines = _lines(result)
    assert lines[-1] == "computed 2 unit(s)"
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-2] == errors[0]
    assert f"cache {out}: epoch 0 unit 2 is not committed and no live writer holds it (4 such unit(s))" in errors[0]
    finish = errors[0].split("finish the cache with: ", 1)[1]
    assert finish.endswith(" --resume") and "--max-units 2" in finish
    args = shlex.split(finish)[1:]  # the command it names, run as given (its budget of 2, twice more)
    for remaining in (2, 0):
        result = _run([*helpers.cli_command(), *args], subprocess_env)
        assert _lines(result)[-1] == "computed 2 unit(s)"
        assert result.returncode == (7 if remaining else 0), result.stderr
    assert open_cache(out).complete_epochs() == [0, 1]


def test_units_held_by_a_live_writer_are_left_to_it_and_named(tmp_path, make_config, precompute_argv, one_thread):
    out = tmp_path / "cache"
    with single_thread():
        try:
            precompute_logits(replace(make_config(out), max_units=0), log=lambda _: None)
        except Exception:
            pass
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        time.sleep(0.2)
        holder = replace(Holder.this_process(120), pid=sleeper.pid, pid_start=_pid_start(sleeper.pid), token="other-writer")
        path = out / CLAIMS_DIR / claim_name(unit_claim(1, 2), 0)
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(holder.__dict__))
        result = CliRunner().invoke(app, precompute_argv(out, resume=True))
        assert result.exit_code == 0, result.output
        lines = _lines(result)
        assert f"1 unit(s) of this cache are still being computed by process {sleeper.pid} on {holder.host}" in result.stderr
        assert lines[-1] == f"computed {UNITS - 1} unit(s)"
        assert sorted(open_cache(out).missing_units()) == [(1, 2)]
    finally:
        sleeper.kill()
        sleeper.wait()
    result = CliRunner().invoke(app, precompute_argv(out, resume=True))  # its holder is gone: taken over at once
    assert result.exit_code == 0 and _lines(result)[-1] == "computed 1 unit(s)", result.output


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(4))
def test_sigterm_releases_the_claims_and_says_how_to_finish(trial, tmp_path, precompute_argv, subprocess_env, helpers):
    out = tmp_path / "cache"
    argv = [*helpers.cli_command(), *precompute_argv(out, epochs=6, block_size=128, blocks_per_unit=2)]
    process = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=subprocess_env)
    deadline = time.monotonic() + 120
    while not (out / "zarr.json").exists() or len(list((out / "ledger").glob("e*-u*.json"))) < trial:  # a few units in, or none
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.005)
    time.sleep(random.Random(trial).uniform(0, 0.3))  # anywhere inside a unit
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 7, stderr
    lines = stderr.strip().splitlines()
    done = len(re.findall(r"^committed epoch", stderr, flags=re.M))
    assert lines[-1] == f"computed {done} unit(s)" and lines[-2].startswith("error: interrupted: cache ")
    assert "finish the cache with: " in lines[-2]
    left = {p.name: p.read_text() for p in (out / CLAIMS_DIR).iterdir()}
    assert all("released" in text for text in left.values()), left  # nothing held by the stopped process
    with Claims(out) as claims:
        assert all(claims.live_holder(unit_claim(*key)) is None for key in open_cache(out).missing_units())
