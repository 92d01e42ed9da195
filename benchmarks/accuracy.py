"""Accuracy study: what a student learns from the cache, against ce, a fixed teacher and online KD.

Every step is one of the project's own commands, run as a subprocess:

1. ``kdcache make-shards``: the student's training set as PNG tar shards (the streaming path),
   the first ``--samples`` images of the training split;
2. ``kdcache train-student --loss ce``: the teacher, on the whole training split;
3. ``kdcache precompute-logits``: three caches of the shards, ``none`` (one epoch: a fixed
   teacher, one view per image), ``light`` and ``funmatch`` (as many epochs as the longest budget);
4. ``kdcache train-student``: for each budget (epochs) and seed, the methods of :data:`METHODS`;
   ``online-kd`` runs the live teacher on the very views of the ``light`` cache (full logits);
5. a table of final validation top-1 (mean +- std over seeds) and a plot of accuracy vs epoch.

Every finished step leaves its output directory, and a rerun skips it, so an interrupted study
resumes. Full size (Fashion-MNIST, a few CPU-hours of work spread over ``--jobs`` processes)::

    python benchmarks/accuracy.py --out study-fmnist

Reduced size, run in CI (digits, tiny models, one seed)::

    python benchmarks/accuracy.py --quick --out /tmp/study-quick
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

#: method -> (cache preset or None, extra train-student arguments). Hyper-parameters are the
#: losses' defaults (docs/methods.md); nothing is tuned per method.
METHODS = {
    "ce": ("light", ["--loss", "ce"]),
    "fixed-kd": ("none", ["--loss", "kd"]),
    "light-kd": ("light", ["--loss", "kd"]),
    "funmatch-kd": ("funmatch", ["--loss", "kd"]),
    "online-kd": ("light", ["--loss", "kd", "ONLINE"]),
    "light-ttm": ("light", ["--loss", "ttm"]),
    "light-wttm": ("light", ["--loss", "wttm"]),
    "light-mkd": ("light", ["--loss", "mkd"]),
    "light-full-kd": ("light:full", ["--loss", "kd"]),
}


def cache_name(key: str) -> str:
    """``light`` -> ``cache-light`` (top-k of --topk); ``light:full`` -> ``cache-light-full`` (every logit)."""
    preset, _, topk = key.partition(":")
    return f"cache-{preset}" + (f"-{topk}" if topk else "")


def kdcache(*args: str, log: Path, threads: int) -> None:
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
    start = time.perf_counter()
    kdcache(*args, log=out / f"{name}.log", threads=threads)
    done.write_text(f"{time.perf_counter() - start:.1f}\n")
    print(f"  {name}: {float(done.read_text()):.0f} s", flush=True)
    return target


def evals(run_dir: Path) -> list[float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [100 * line["top1"] for line in lines if line["kind"] == "eval"]


def mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def plot(results: dict, budgets: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(budgets), figsize=(6 * len(budgets), 4.5), squeeze=False)
    for ax, budget in zip(axes[0], budgets):
        for method in results:
            curves = [c for c in results[method][str(budget)]["curves"] if c]
            if not curves:
                continue
            epochs = range(1, min(map(len, curves)) + 1)
            stats = [mean_std([c[e - 1] for c in curves]) for e in epochs]
            mean = [m for m, _ in stats]
            ax.plot(epochs, mean, marker="o", markersize=3, label=method)
            ax.fill_between(epochs, [m - s for m, s in stats], [m + s for m, s in stats], alpha=0.15)
        ax.set_xticks(range(1, budget + 1))
        ax.set(xlabel="epoch", ylabel="val top-1 (%)", title=f"budget {budget} epochs (mean +- std over seeds)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="study-fmnist")
    parser.add_argument("--data", default="fashion-mnist:train", help="training split (the teacher's data)")
    parser.add_argument("--val-data", default="fashion-mnist:val")
    parser.add_argument("--samples", type=int, default=10000, help="the student's training set: the first N images")
    parser.add_argument("--teacher", default="resnet10t")
    parser.add_argument("--teacher-epochs", type=int, default=4)
    parser.add_argument("--student", default="test_resnet")
    parser.add_argument("--img-size", type=int, default=28)
    parser.add_argument("--budgets", default="3,6", help="student epoch budgets")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--topk", default="5")
    parser.add_argument("--lr", default="2e-3")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel, one thread each")
    parser.add_argument("--quick", action="store_true", help="CI size: digits, tiny teacher, one budget of 2 epochs, one seed")
    args = parser.parse_args()
    if args.quick:
        args.data, args.val_data, args.samples, args.teacher = "digits:train", "digits:val", 1000, "test_resnet"
        args.teacher_epochs, args.img_size, args.budgets, args.seeds, args.jobs = 2, 32, "2", "0", 1
    budgets = [int(b) for b in args.budgets.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; expected some of {', '.join(METHODS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Every step gets the cores of one job: OpenMP threads that share cores with other processes
    # spin and stall (a teacher epoch ran 9x slower with 2 threads beside other work on 2 cores).
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    print(f"study in {out}: {len(methods)} methods x budgets {budgets} x seeds {seeds}, {args.jobs} job(s)", flush=True)

    shards = step(out, "shards", "make-shards", "--data", args.data, "-o", str(out / "shards" / "part-%04d.tar"),
                  "--max-samples", str(args.samples), "--samples-per-shard", str(max(100, args.samples // 10)),
                  "--image-format", "png", threads=threads)
    data = "webdataset:" + str(shards / ("part-{0000..%04d}.tar" % (len(list(shards.glob("part-*.tar"))) - 1)))
    common = ["--val-data", args.val_data, "--img-size", str(args.img_size), "--batch-size", "128", "--lr", args.lr,
              "--log-every", "100"]
    teacher = step(out, "teacher", "train-student", "--data", args.data, "--model", args.teacher, "--run-dir",
                   str(out / "teacher"), "--loss", "ce", "-a", "light", "--epochs", str(args.teacher_epochs), *common,
                   threads=threads)
    teacher_args = ["--teacher", args.teacher, "--teacher-checkpoint", str(teacher / "model.pt")]
    for key in sorted({METHODS[m][0] for m in methods}):
        preset, _, topk = key.partition(":")
        step(out, cache_name(key), "precompute-logits", "--data", data, *teacher_args, "--output",
             str(out / cache_name(key)), "--augmentation", preset, "--epochs", str(1 if preset == "none" else max(budgets)),
             "--seed", "0", "--topk", topk or args.topk, threads=threads)

    def run(job):
        method, budget, seed = job
        preset, extra = METHODS[method]
        extra = [a for e in extra for a in (teacher_args if e == "ONLINE" else [e])]
        name = f"runs/{method}-e{budget}-s{seed}"
        (out / "runs").mkdir(exist_ok=True)
        step(out, name, "train-student", "--data", data, "--cache", str(out / cache_name(preset)), "--model", args.student,
             "--run-dir", str(out / name), "--epochs", str(budget), "--seed", str(seed), *extra,
             *common, threads=threads)

    jobs = [(m, b, s) for b in budgets for s in seeds for m in methods]
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(run, jobs))

    teacher_top1 = evals(teacher)[-1]
    results: dict = {"teacher": {"model": args.teacher, "epochs": args.teacher_epochs, "top1": teacher_top1},
                     "student": args.student, "samples": args.samples, "budgets": budgets, "seeds": seeds}
    print(f"\nteacher {args.teacher} ({args.teacher_epochs} epochs on {args.data}): val top-1 {teacher_top1:.2f}")
    print(f"student {args.student} on the first {args.samples} images; val top-1 (%) at the end of the budget, "
          f"mean +- std over {len(seeds)} seed(s)")
    print(f"{'method':<14}" + "".join(f"{f'{b} epochs':>18}" for b in budgets))
    for method in methods:
        results[method] = {}
        row = f"{method:<14}"
        for budget in budgets:
            curves = [evals(out / f"runs/{method}-e{budget}-s{seed}") for seed in seeds]
            final = [c[-1] for c in curves]
            mean, std = mean_std(final)
            results[method][str(budget)] = {"final": final, "mean": mean, "std": std, "curves": curves}
            row += f"{mean:>11.2f} +- {std:<4.2f}"
        print(row)
    # Same views, same batches, same initial weights: each pair differs only in the teacher record
    # (top-k + tail from the cache, every logit from the cache, or every logit from the live teacher).
    for first, second in (("online-kd", "light-kd"), ("online-kd", "light-full-kd"), ("light-full-kd", "light-kd")):
        if first not in results or second not in results:
            continue
        print(f"\n{first} minus {second}, paired by seed:")
        for budget in budgets:
            a, b = results[first][str(budget)], results[second][str(budget)]
            diffs = [x - y for x, y in zip(a["final"], b["final"])]
            print(f"  {budget} epochs: " + " ".join(f"{d:+.2f}" for d in diffs) + f"  (mean {mean_std(diffs)[0]:+.2f}; "
                  f"seed-to-seed std {a['std']:.2f} and {b['std']:.2f})")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot({m: results[m] for m in methods}, budgets, out / "accuracy.png")
    print(f"\nwrote {out / 'results.json'} and {out / 'accuracy.png'}")


if __name__ == "__main__":
    main()
