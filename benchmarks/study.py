"""What the study scripts share: running one kdcache command as a resumable step, and reading runs.

A step is one of the project's own commands, run as a subprocess, whose output is ``OUT/NAME``.
When it finishes, ``OUT/NAME.done`` records its wall time and a rerun skips it; an output left by
an interrupted step is removed and made again.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def kdcache(*args: str, log: Path, threads: int) -> None:
    """Run ``kdcache ARGS`` with ``threads`` OpenMP threads, its output to ``log``."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(threads))
    command = [sys.executable, "-m", "kdcache_cli.main", *args]
    with open(log, "w") as out:
        out.write(" ".join(["kdcache", *args]) + "\n")
        out.flush()
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    if done.returncode:
        tail = log.read_text().splitlines()[-5:]
        raise SystemExit(f"kdcache {args[0]} failed (exit {done.returncode}); see {log}:\n" + "\n".join(tail))


def step(out: Path, name: str, *args: str, threads: int) -> Path:
    """Run one command whose output is ``out/name``, unless an earlier run finished it."""
    target, done = out / name, out / f"{name}.done"
    if done.exists():
        return target
    if target.is_dir():
        shutil.rmtree(target)  # left by an interrupted run of this step
    elif target.exists():
        target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    kdcache(*args, log=out / f"{name}.log", threads=threads)
    done.write_text(f"{time.perf_counter() - start:.1f}\n")
    print(f"  {name}: {float(done.read_text()):.0f} s", flush=True)
    return target


def step_seconds(out: Path, name: str) -> float:
    """The wall time a finished step took."""
    return float((out / f"{name}.done").read_text())


def eval_points(run_dir: Path) -> list[tuple[int, float]]:
    """``(epoch, val top-1 in %)`` for every evaluation of a train-student run."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(line["epoch"], 100 * line["top1"]) for line in lines if line["kind"] == "eval"]


def evals(run_dir: Path) -> list[float]:
    """Val top-1 (%) of every evaluation of a train-student run, in order."""
    return [top1 for _, top1 in eval_points(run_dir)]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def add_common_arguments(parser: argparse.ArgumentParser, *, out: str, samples: int, budgets: str, topk: str) -> None:
    """The options every study has: data, teacher, student, budgets, seeds, cache and optimiser."""
    parser.add_argument("--out", default=out)
    parser.add_argument("--data", default="fashion-mnist:train", help="training split (the teacher's data)")
    parser.add_argument("--val-data", default="fashion-mnist:val")
    parser.add_argument("--samples", type=int, default=samples, help="the student's training set: the first N images")
    parser.add_argument("--teacher", default="resnet10t")
    parser.add_argument("--teacher-epochs", type=int, default=4)
    parser.add_argument("--student", default="test_resnet")
    parser.add_argument("--img-size", type=int, default=28)
    parser.add_argument("--budgets", default=budgets, help="student epoch budgets")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--topk", default=topk)
    parser.add_argument("--lr", default="2e-3")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel, one thread each")


def student_shards(out: Path, data: str, samples: int, *, threads: int) -> str:
    """``kdcache make-shards`` of the first ``samples`` images as 10 PNG tar shards; their source spec."""
    shards = step(out, "shards", "make-shards", "--data", data, "-o", str(out / "shards" / "part-%04d.tar"),
                  "--max-samples", str(samples), "--samples-per-shard", str(max(100, samples // 10)),
                  "--image-format", "png", threads=threads)
    return "webdataset:" + str(shards / ("part-{0000..%04d}.tar" % (len(list(shards.glob("part-*.tar"))) - 1)))


def parse_selection(args: argparse.Namespace, known: dict) -> tuple[list[int], list[int], list[str]]:
    """``--budgets``, ``--seeds`` and ``--methods`` as lists, the methods checked against ``known``."""
    budgets = [int(b) for b in args.budgets.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; expected some of {', '.join(known)}")
    return budgets, seeds, methods


def threads_per_job(jobs: int) -> int:
    """The cores of one job. OpenMP threads that share cores with other processes spin and stall
    (a teacher epoch ran 9x slower with 2 threads beside other work on 2 cores)."""
    return max(1, (os.cpu_count() or 1) // jobs)
