"""What sharing a cache costs: 2 jobs on one cache against 2 jobs on caches of their own, and the claims' share of a unit.

    python benchmarks/writers.py [--rounds 3] [--epochs 4] [--quick]

1. Throughput: the same total work (digits, light, top-5, blocks of 64, one block a unit, one
   thread a job) done by 2 jobs sharing one cache of E epochs, and by 2 jobs each making a cache
   of its own with E/2 epochs (no sharing, nothing to coordinate). Rounds alternate; each figure
   is the views computed divided by the wall time from the first start to the last exit
   (process start-up included, the same for both). Their ratio is what sharing costs.
2. Claims: the time of one unit's claim protocol (look at the ledger, claim, check, look again,
   still held, release), measured on this disk, against one unit's compute time at the default
   unit size (64 blocks of 1,024 views) at the per-job rate measured in 1.

Prints a JSON summary; docs/benchmarks.md quotes it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))


def _argv(output: Path, teacher: Path, epochs: int) -> list[str]:
    return [sys.executable, "-m", "kdcache_cli.main", "precompute-logits", "--data", "digits", "--teacher", "test_resnet",
            "--teacher-checkpoint", str(teacher), "--topk", "5", "--augmentation", "light", "--epochs", str(epochs),
            "--block-size", "64", "--blocks-per-unit", "1", "--output", str(output), "--resume"]


def run_jobs(outputs: list[Path], teacher: Path, epochs: int) -> tuple[float, list[int]]:
    """Wall seconds for one single-threaded job per output (the same output twice: a shared cache), and their units."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    start = time.perf_counter()
    processes = [subprocess.Popen(_argv(output, teacher, epochs), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True) for output in outputs]
    texts = [p.communicate()[1] for p in processes]
    seconds = time.perf_counter() - start
    for process, text in zip(processes, texts):
        if process.returncode != 0:
            raise SystemExit(f"a job failed: {text[-2000:]}")
    return seconds, [int(text.strip().splitlines()[-1].split()[1]) for text in texts]


def claim_cost(folder: Path, count: int) -> float:
    """Median seconds of one unit's claim protocol on this disk."""
    from kdcache.format import Claims, ledger_key, unit_claim

    folder.mkdir(parents=True)
    (folder / "ledger").mkdir()
    times = []
    with Claims(folder) as claims:
        for unit in range(count):
            key = unit_claim(0, unit)
            start = time.perf_counter()
            (folder / ledger_key(0, unit)).exists()
            claims.try_claim(key)
            (folder / ledger_key(0, unit)).exists()
            claims.still_held(key)
            claims.release(key, committed=True)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="one round of two epochs (CI size)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.epochs = 1, 2
    from conftest import save_teacher

    if args.epochs % 2:
        raise SystemExit("--epochs must be even: the unshared jobs make half of them each")
    units = args.epochs * 23
    views = args.epochs * 1437
    shared, apart = "2 jobs, one shared cache", "2 jobs, a cache each"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        teacher = save_teacher(tmp / "teacher.pt")
        rows = {shared: [], apart: []}
        split = []
        for round_ in range(args.rounds):
            seconds, computed = run_jobs([tmp / f"{round_}-shared"] * 2, teacher, args.epochs)
            if sum(computed) != units:
                raise SystemExit(f"{shared}: {sum(computed)} units computed for {units} planned")
            rows[shared].append(views / seconds)
            split.append(computed)
            seconds, computed = run_jobs([tmp / f"{round_}-a", tmp / f"{round_}-b"], teacher, args.epochs // 2)
            if sum(computed) != units:
                raise SystemExit(f"{apart}: {sum(computed)} units computed for {units} planned")
            rows[apart].append(views / seconds)
        claim = claim_cost(tmp / "claims-bench", 200)
    per_job = statistics.median(rows[apart]) / 2
    unit_seconds = 64 * 1024 / per_job
    summary = {
        "views_per_s": {name: [round(v, 1) for v in values] for name, values in rows.items()},
        "median_ratio_shared_over_apart": round(statistics.median(rows[shared]) / statistics.median(rows[apart]), 3),
        "units_per_job_when_shared": split,
        "claim_protocol_ms": round(claim * 1000, 3),
        "default_unit_seconds_at_one_job_rate": round(unit_seconds, 1),
        "claims_share_of_default_unit": f"{claim / unit_seconds:.2e}",
        "cpu": _cpu(),
    }
    print(json.dumps(summary, indent=1))


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{os.cpu_count()} cores"


if __name__ == "__main__":
    main()
