"""Patience study: does consistent teaching win when the student is given many epochs?

Small data and long schedules (Beyer et al. 2022, "Knowledge distillation: A good teacher is
patient and consistent"). Every step is one of the project's own commands, run as a subprocess:

1. ``kdcache make-shards``: the student's training set, the first ``--samples`` training images,
   as PNG tar shards;
2. ``kdcache train-student --loss ce``: the teacher, on the whole training split;
3. ``kdcache precompute-logits``: a ``none`` cache (one epoch: a fixed teacher, one view per image)
   and ``light`` and ``funmatch`` caches holding one distinct epoch per epoch of the longest budget;
   ``kdcache export`` writes the first 1, 4, 16, ... epochs of the ``funmatch`` cache as caches of
   their own;
4. ``kdcache train-student``: each method of :data:`METHODS` at each budget and seed (a run with a
   budget of B epochs replays the cache's epochs 0..B-1); function matching at the longest budget
   from each smaller ``funmatch`` cache (cycled); function matching with the live teacher on the
   ``funmatch`` cache's views at one budget;
5. tables of final validation top-1 (mean +- std over seeds), ``results.json`` and two plots.

Every finished step leaves its output and a ``.done`` file, and a rerun skips it, so an interrupted
study resumes. Full size (Fashion-MNIST; on 2 CPU cores shared with other work, 2 runs at a time,
the table's 45 runs took about 2 hours and the rest did not fit; docs/benchmarks.md, "Patience")::

    python benchmarks/patience.py --out patience-fmnist

Reduced size, run in CI (digits, tiny models, a few short budgets)::

    python benchmarks/patience.py --quick --out /tmp/patience-quick
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from study import (add_common_arguments, eval_points, mean_std, parse_selection, step, step_seconds, student_shards,
                   threads_per_job)

#: method -> (cache preset, or None for fresh views without a cache; train-student arguments).
#: Hyper-parameters are the losses' defaults (docs/methods.md); nothing is tuned per method.
METHODS = {
    "ce": (None, ["--loss", "ce", "-a", "light"]),
    "fixed-kd": ("none", ["--loss", "kd"]),
    "light-kd": ("light", ["--loss", "kd"]),
    "funmatch-kd": ("funmatch", ["--loss", "kd"]),
    "funmatch-wttm": ("funmatch", ["--loss", "wttm"]),
}


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def curve_stats(curves: list[list[tuple[int, float]]]) -> tuple[list[int], list[float], list[float]]:
    """Epochs evaluated by every run, with the mean and std of top-1 over the runs."""
    epochs = sorted(set.intersection(*(set(e for e, _ in c) for c in curves)))
    stats = [mean_std([dict(c)[e] for c in curves]) for e in epochs]
    return epochs, [m for m, _ in stats], [s for _, s in stats]


def plot_curves(results: dict, methods: list[str], budgets: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(budgets), figsize=(5.5 * len(budgets), 4.5), squeeze=False)
    for ax, budget in zip(axes[0], budgets):
        for method in methods:
            epochs, mean, std = curve_stats(results["table"][method][str(budget)]["curves"])
            ax.plot(epochs, mean, marker="o", markersize=3, label=method)
            ax.fill_between(epochs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
        ax.set(xlabel="epoch", ylabel="val top-1 (%)", title=f"budget {budget} epochs")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"student {results['student']} on {results['samples']} images: mean and std over seeds "
                 f"{', '.join(map(str, results['seeds']))}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cached(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["cached"]["rows"]
    counts = [r["cached_epochs"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in rows:
        ax.scatter([r["cached_epochs"]] * len(r["final"]), r["final"], color="tab:blue", alpha=0.4, s=14)
    ax.errorbar(counts, [r["mean"] for r in rows], yerr=[r["std"] for r in rows], marker="o", capsize=3,
                label="funmatch-kd, mean (and each seed)")
    fixed = results["table"].get("fixed-kd", {}).get(str(results["cached"]["budget"]))
    if fixed:
        ax.axhline(fixed["mean"], color="tab:red", linestyle="--", label="fixed-kd (1 view, no augmentation)")
    ax.set_xscale("log")
    ax.set_xticks(counts, [f"{r['cached_epochs']}\n{r['bytes'] / 2**20:.1f} MiB" for r in rows])
    ax.set(xlabel="distinct epochs in the cache (and its size)", ylabel="val top-1 (%)",
           title=f"function matching, {results['cached']['budget']} training epochs, cached epochs cycled")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, out="patience-fmnist", samples=1000, budgets="30,100,300", topk="full")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--cached-epochs", default="1,4,16,64",
                        help="smaller funmatch caches, trained at the longest budget")
    parser.add_argument("--cached-seeds", default="0,1,2")
    parser.add_argument("--online-budget", type=int, default=100, help="budget of the live-teacher runs (0: none)")
    parser.add_argument("--online-seeds", default="0,1,2")
    parser.add_argument("--eval-every", default="",
                        help="epochs between evaluations of --val-data, one per budget (default: a tenth of each)")
    parser.add_argument("--quick", action="store_true",
                        help="CI size: digits, tiny models, budgets of 1 and 3 epochs, one seed")
    args = parser.parse_args()
    if args.quick:
        args.data, args.val_data, args.samples, args.teacher = "digits:train", "digits:val", 300, "test_resnet"
        args.teacher_epochs, args.img_size, args.budgets, args.seeds = 1, 32, "1,3", "0"
        args.cached_epochs, args.cached_seeds, args.online_budget, args.online_seeds, args.eval_every = "1", "0", 1, "0", "1,1"
    budgets, seeds, methods = parse_selection(args, METHODS)
    longest = max(budgets)
    spacing = [int(e) for e in args.eval_every.split(",")] if args.eval_every else [max(1, b // 10) for b in budgets]
    if len(spacing) != len(budgets) or min(spacing) < 1:
        raise SystemExit(f"--eval-every {args.eval_every}: expected one positive number per budget of {args.budgets}")
    eval_every = dict(zip(budgets, spacing))
    cached_counts = [int(c) for c in args.cached_epochs.split(",") if c] if args.cached_epochs else []
    if any(not 0 < c < longest for c in cached_counts):
        raise SystemExit(f"--cached-epochs must lie between 1 and {longest - 1} (the longest budget holds them all)")
    cached_seeds = [int(s) for s in args.cached_seeds.split(",") if s]
    online_seeds = [int(s) for s in args.online_seeds.split(",") if s] if args.online_budget else []
    if args.online_budget and args.online_budget not in budgets:
        raise SystemExit(f"--online-budget {args.online_budget} is not one of --budgets {args.budgets}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = threads_per_job(args.jobs)
    print(f"patience study in {out}: {len(methods)} methods x budgets {budgets} x seeds {seeds}; funmatch from "
          f"{cached_counts} cached epochs (seeds {cached_seeds}); live teacher at {args.online_budget or '-'} epochs "
          f"(seeds {online_seeds}); {args.jobs} job(s)", flush=True)

    data = student_shards(out, args.data, args.samples, threads=threads)
    common = ["--val-data", args.val_data, "--batch-size", "128", "--lr", args.lr, "--log-every", "100"]
    teacher_args = ["--teacher", args.teacher, "--teacher-checkpoint", str(out / "teacher" / "model.pt")]
    presets = {METHODS[m][0] for m in methods} - {None}
    presets = sorted(presets | ({"funmatch"} if cached_counts or online_seeds else set()))

    def teacher_and_caches() -> None:
        step(out, "teacher", "train-student", "--data", args.data, "--model", args.teacher, "--run-dir",
             str(out / "teacher"), "--loss", "ce", "-a", "light", "--img-size", str(args.img_size), "--epochs",
             str(args.teacher_epochs), *common, threads=threads)
        for preset in presets:
            step(out, f"cache-{preset}", "precompute-logits", "--data", data, *teacher_args, "--output",
                 str(out / f"cache-{preset}"), "--augmentation", preset, "--seed", "0", "--topk", args.topk,
                 "--epochs", str(1 if preset == "none" else longest), threads=threads)
        for count in cached_counts + [longest]:  # the whole cache too, so that every size is an export's
            step(out, f"cache-funmatch-e{count}", "export", str(out / "cache-funmatch"),
                 str(out / f"cache-funmatch-e{count}"), "--epochs", f"0-{count - 1}", threads=threads)

    def run(name: str, cache: str | None, extra: list[str], budget: int, seed: int) -> None:
        source = ["--cache", str(out / cache)] if cache else ["--img-size", str(args.img_size)]
        step(out, f"runs/{name}", "train-student", "--data", data, *source, "--model", args.student,
             "--run-dir", str(out / "runs" / name), "--epochs", str(budget), "--seed", str(seed),
             "--eval-every", str(eval_every[budget]), *extra, *common, threads=threads)

    # (name, cache, extra, budget, seed). Runs without a cache need no teacher and start at once; the
    # table's runs come first, then one seed of the cached-epochs runs, the live teacher, the other seeds.
    table_jobs = []
    for budget in sorted(budgets, reverse=True):  # longest first: two jobs finish closer together
        for seed in seeds:
            for method in methods:
                preset, extra = METHODS[method]
                table_jobs.append((f"{method}-e{budget}-s{seed}", preset and f"cache-{preset}", extra, budget, seed))
    cached_jobs = [[(f"funmatch-kd-e{longest}-c{count}-s{seed}", f"cache-funmatch-e{count}", ["--loss", "kd"],
                     longest, seed) for count in cached_counts] for seed in cached_seeds]
    online_jobs = [(f"online-funmatch-kd-e{args.online_budget}-s{seed}", "cache-funmatch", ["--loss", "kd", *teacher_args],
                    args.online_budget, seed) for seed in online_seeds]
    later_jobs = [*(cached_jobs[0] if cached_jobs else []), *online_jobs, *(j for js in cached_jobs[1:] for j in js)]
    with ThreadPoolExecutor(args.jobs) as pool:
        chain = pool.submit(teacher_and_caches)
        plain = [pool.submit(run, *job) for job in table_jobs if job[1] is None]
        chain.result()
        rest = [pool.submit(run, *job) for job in table_jobs + later_jobs if job[1] is not None]
        for future in plain + rest:
            future.result()

    teacher_top1 = eval_points(out / "teacher")[-1][1]
    results: dict = {"teacher": {"model": args.teacher, "epochs": args.teacher_epochs, "top1": teacher_top1,
                                 "seconds": step_seconds(out, "teacher")},
                     "student": args.student, "samples": args.samples, "budgets": budgets, "seeds": seeds, "table": {}}
    print(f"\nteacher {args.teacher} ({args.teacher_epochs} epochs on {args.data}): val top-1 {teacher_top1:.2f}")
    print(f"student {args.student} on the first {args.samples} images; val top-1 (%) at the end of the budget "
          f"(best epoch evaluated in brackets), mean +- std over seeds {args.seeds}")
    print(f"{'method':<15}" + "".join(f"{f'{b} epochs':>27}" for b in budgets))
    for method in methods:
        results["table"][method] = {}
        row = f"{method:<15}"
        for budget in budgets:
            names = [f"{method}-e{budget}-s{seed}" for seed in seeds]
            curves = [eval_points(out / "runs" / name) for name in names]
            final, best = [c[-1][1] for c in curves], [max(t for _, t in c) for c in curves]
            mean, std = mean_std(final)
            results["table"][method][str(budget)] = {
                "final": final, "mean": mean, "std": std, "best": best, "curves": curves,
                "seconds": [step_seconds(out, f"runs/{name}") for name in names]}
            row += f"{mean:>12.2f} +- {std:<4.2f} ({mean_std(best)[0]:5.2f})"
        print(row)

    if cached_counts and cached_seeds:
        rows = []
        for count in cached_counts + [longest]:
            names = [f"funmatch-kd-e{longest}-s{s}" if count == longest else f"funmatch-kd-e{longest}-c{count}-s{s}"
                     for s in cached_seeds]
            final = [eval_points(out / "runs" / name)[-1][1] for name in names]
            mean, std = mean_std(final)
            rows.append({"cached_epochs": count, "bytes": directory_bytes(out / f"cache-funmatch-e{count}"),
                         "final": final, "mean": mean, "std": std})
        results["cached"] = {"budget": longest, "seeds": cached_seeds, "rows": rows}
        print(f"\nfunmatch-kd at {longest} epochs from caches of fewer epochs (cycled), seeds {args.cached_seeds}:")
        print(f"{'cached epochs':>13} {'bytes':>12} {'val top-1 (%)':>16}   per seed")
        for r in rows:
            print(f"{r['cached_epochs']:>13} {r['bytes']:>12,} {r['mean']:>9.2f} +- {r['std']:<4.2f}   "
                  + " ".join(f"{v:.2f}" for v in r["final"]))
        plot_cached(results, out / "cached.png")

    if online_seeds:
        budget = args.online_budget
        online = [eval_points(out / "runs" / f"online-funmatch-kd-e{budget}-s{s}")[-1][1] for s in online_seeds]
        cached = [eval_points(out / "runs" / f"funmatch-kd-e{budget}-s{s}")[-1][1] for s in online_seeds]
        diffs = [a - b for a, b in zip(online, cached)]
        results["online"] = {"budget": budget, "seeds": online_seeds, "online": online, "cached": cached,
                             "diffs": diffs}
        print(f"\nfunmatch-kd at {budget} epochs, live teacher minus cache (same views), paired by seed "
              f"{args.online_seeds}: " + " ".join(f"{d:+.2f}" for d in diffs) + f"  (mean {mean_std(diffs)[0]:+.2f}; "
              f"live {mean_std(online)[0]:.2f}, cache {mean_std(cached)[0]:.2f})")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot_curves(results, methods, budgets, out / "curves.png")
    plots = [out / "curves.png"] + ([out / "cached.png"] if "cached" in results else [])
    print(f"\nwrote {out / 'results.json'} and " + " and ".join(map(str, plots)))


if __name__ == "__main__":
    main()
