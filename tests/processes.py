"""Run a command and SIGKILL it the moment a condition holds, and read what it committed (the kill-and-resume tests)."""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest


def kill_when(command: list[str], ready, *, what: str, log_path: Path, env: dict, timeout: float = 180) -> None:
    """Start ``command``; SIGKILL it as soon as ``ready()`` is true; fail if it ends first or never gets there."""
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + timeout
            while not ready():
                if process.poll() is not None:
                    pytest.fail(f"the process ended (rc {process.returncode}) before {what}: {log_path.read_text()}")
                if time.monotonic() > deadline:
                    pytest.fail(f"no {what} within {timeout:.0f} s")
                time.sleep(0.005)
            os.kill(process.pid, signal.SIGKILL)
        finally:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL


def ledger_entries(path: Path) -> dict[tuple[int, int], dict]:
    """A cache's ledger entries as written, keyed by (epoch, unit): a resume must leave the committed ones as they were."""
    entries = {}
    for file in sorted((Path(path) / "ledger").glob("e*-u*.json")):
        data = json.loads(file.read_text())
        entries[data["epoch"], data["unit"]] = data
    return entries


def units_by_rank(output: str, ranks: int = 2) -> dict[int, list[tuple[int, int]]]:
    """The (epoch, unit)s each rank of a torchrun job logged as committed (``--tee 3`` prefixes lines with the rank)."""
    by_rank: dict[int, list[tuple[int, int]]] = {rank: [] for rank in range(ranks)}
    for rank, epoch, unit in re.findall(r"^\[\D*(\d+)\]:committed epoch (\d+) unit (\d+)", output, flags=re.M):
        by_rank[int(rank)].append((int(epoch), int(unit)))
    return by_rank
