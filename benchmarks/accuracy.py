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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from study import add_common_arguments, evals, mean_std, parse_selection, step, student_shards, threads_per_job

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
    add_common_arguments(parser, out="study-fmnist", samples=10000, budgets="3,6", topk="5")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--quick", action="store_true", help="CI size: digits, tiny teacher, one budget of 2 epochs, one seed")
    args = parser.parse_args()
    if args.quick:
        args.data, args.val_data, args.samples, args.teacher = "digits:train", "digits:val", 1000, "test_resnet"
        args.teacher_epochs, args.img_size, args.budgets, args.seeds, args.jobs = 2, 32, "2", "0", 1
    budgets, seeds, methods = parse_selection(args, METHODS)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = threads_per_job(args.jobs)
    print(f"study in {out}: {len(methods)} methods x budgets {budgets} x seeds {seeds}, {args.jobs} job(s)", flush=True)

    data = student_shards(out, args.data, args.samples, threads=threads)
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
