"""Students from records: full logits against the top-10 bucket against the tail code, on the triples (C = 1000).

Item 4 of the records work: the frontier (benchmarks/records.py) measures gradients; this trains
students. Every step is one of the project's own commands, run as a resumable subprocess
(benchmarks/study.py), under ``--out``, which benchmarks/tuples.py filled first:

1. the data and the teacher: ``tuples.py data teacher`` (skipped where ``--out`` holds them);
2. the student's training set: the first ``--shards`` train shards of the triples (2,000 shuffled
   triples each, so about 10 per class in 10,000: the regime where the teacher's tail matters);
3. one cache per record, by ``kdcache precompute-logits`` with the trained teacher, the triples'
   augmentation spec and as many epochs as the students train (one set of views per epoch):
   ``full`` (``--topk full``: every logit, the reference), ``top10-bucket`` (``--topk 10
   --tail-rank 0``: the format-1 record, today's bucket), ``topN-bucket`` (``--topk N --tail-rank
   0``, N = ``--same-bytes-topk``: a bucket at about the tail code's bytes) and ``top10-code``
   (``--topk 10``: the default record, top 10 and the rank-20 tail code);
4. ``kdcache train-student`` for each loss of :data:`LOSSES`, record and seed, plus a ``ce``
   student per seed for scale. Every student of one seed sees the same views in the same batches
   from the same initial weights, so a difference between two of them is the record's;
5. a table of final val top-1 (all 10,000 val triples, centre crops) per loss and record, the mean
   and std over seeds, each record's paired difference from ``full`` by seed, and the bytes per
   view of each cache (its record and parameter arrays, compressed, over its views).

Full size, about 45 minutes on an idle 2-core machine, 70 beside other work (after tuples.py's 25);
``--epochs 8`` or ``--shards 10`` makes it about 90::

    python benchmarks/tuples.py all --out data/tuples
    python benchmarks/record_students.py --out data/tuples --no-ce --records full,top10-bucket,top10-code

CI size (digits triples, tiny sizes, one seed; a few minutes)::

    python benchmarks/record_students.py --quick --out /tmp/tuples-quick
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study import evals, mean_std, step, threads_per_job  # noqa: E402

#: loss -> train-student arguments: KD at its usual T = 4, WTTM at gamma = 0.25 (TTM's CIFAR range;
#: the setting where the transform flattens the teacher most). Other hyper-parameters are the
#: losses' defaults (docs/methods.md).
LOSSES = {"kd-t4": ["--loss", "kd", "--temperature", "4"], "wttm-g0.25": ["--loss", "wttm", "--gamma", "0.25"]}
REFERENCE = "full"


def records(same_bytes_topk: int) -> dict[str, list[str]]:
    """record name -> precompute-logits arguments."""
    return {"full": ["--topk", "full"], "top10-bucket": ["--topk", "10", "--tail-rank", "0"],
            f"top{same_bytes_topk}-bucket": ["--topk", str(same_bytes_topk), "--tail-rank", "0"],
            "top10-code": ["--topk", "10"]}


def shard_list(out: Path, split: str, count: int | None) -> str:
    """The webdataset spec of the first ``count`` shards of the triples' ``split`` (all with None)."""
    shards = sorted((out / "triples").glob(f"{split}-*.tar"))
    if not shards:
        raise SystemExit(f"error: no triples shards in {out / 'triples'}; run benchmarks/tuples.py data first")
    if count is not None and count > len(shards):
        raise SystemExit(f"error: --shards {count}, but {out / 'triples'} holds {len(shards)} {split} shards")
    shards = shards[: count or len(shards)]
    return "webdataset:" + str(out / "triples" / f"{split}-{{000000..{len(shards) - 1:06d}}}.tar")


def bytes_per_view(cache: Path) -> float:
    """Bytes per committed view of a cache's record and parameter arrays (``values``, ``indices``, ``tail``,
    ``params``): what grows with the views, and what training reads; the manifest, plan and ledger are left out
    (a run's reads may add epoch indexes to the ledger)."""
    done = subprocess.run([sys.executable, "-m", "kdcache_cli.main", "info", str(cache), "--json"],
                          capture_output=True, text=True, check=True)
    views = json.loads(done.stdout)["views_committed"]
    size = sum(f.stat().st_size for array in ("values", "indices", "tail", "params") for f in (cache / array).rglob("*")
               if f.is_file())
    return size / views


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/tuples", help="benchmarks/tuples.py's --out; the study goes to OUT/students")
    parser.add_argument("--shards", type=int, default=5, help="the student's training set: the first N train shards")
    parser.add_argument("--epochs", type=int, default=4, help="student epochs (and cache epochs)")
    parser.add_argument("--student", default="test_resnet")
    parser.add_argument("--teacher", default="test_resnet", help="the teacher tuples.py trained")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--losses", default=",".join(LOSSES))
    parser.add_argument("--records", help="a subset of the records, comma-separated (default: all four)")
    parser.add_argument("--same-bytes-topk", type=int, default=22, help="k of the bucket record at about the tail code's bytes")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", default="3e-3")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel, one thread each")
    parser.add_argument("--no-ce", action="store_true", help="leave out the ce students (the scale of KD's gain)")
    parser.add_argument("--quick", action="store_true", help="CI size: digits triples, all their shards, 1 epoch, seed 0")
    args = parser.parse_args()
    if args.quick:
        args.shards, args.epochs, args.seeds, args.jobs, args.batch_size = None, 1, "0", 1, 64
    seeds = [int(s) for s in args.seeds.split(",")]
    losses = args.losses.split(",")
    unknown = [name for name in losses if name not in LOSSES]
    if unknown or args.epochs < 1 or args.same_bytes_topk < 1:
        raise SystemExit(f"error: --losses takes some of {', '.join(LOSSES)}; --epochs and --same-bytes-topk at least 1")
    out = Path(args.out)
    threads = threads_per_job(args.jobs)
    if not (out / "teacher-triples.done").exists():
        tuples = [sys.executable, str(Path(__file__).resolve().parent / "tuples.py"), "--out", str(out),
                  "--threads", str(threads), *(["--quick"] if args.quick else [])]
        for name in ("data", "teacher"):
            subprocess.run([*tuples[:2], name, *tuples[2:]], check=True)
    study = out / "students"
    study.mkdir(parents=True, exist_ok=True)
    spec = out / "augmentation.json"
    img_size = str(json.loads(spec.read_text())["output_size"])
    data, val = shard_list(out, "train", args.shards), shard_list(out, "val", None)
    checkpoint = out / "teacher-triples" / "model.pt"
    kinds = records(args.same_bytes_topk)
    if args.records:
        chosen = args.records.split(",")
        if REFERENCE not in chosen or any(name not in kinds for name in chosen):
            raise SystemExit(f"error: --records takes {REFERENCE} and some of {', '.join(kinds)}")
        kinds = {name: kinds[name] for name in chosen}
    print(f"students in {study}: {len(losses)} losses x {len(kinds)} records x seeds {seeds}" + ("" if args.no_ce else " (+ ce)") + ", "
          f"{args.epochs} epochs of {data}", flush=True)
    for name, extra in kinds.items():
        step(study, f"cache-{name}", "precompute-logits", "--data", data, "--teacher", args.teacher,
             "--teacher-checkpoint", str(checkpoint), "--output", str(study / f"cache-{name}"), "-a", str(spec),
             "--epochs", str(args.epochs), "--seed", "0", *extra, threads=2 * threads if args.jobs > 1 else threads)
    sizes = {name: bytes_per_view(study / f"cache-{name}") for name in kinds}

    common = ["--data", data, "--val-data", val, "--model", args.student, "--img-size", img_size, "--epochs",
              str(args.epochs), "--batch-size", str(args.batch_size), "--lr", args.lr, "--log-every", "100",
              "--eval-every", str(args.epochs)]
    (study / "runs").mkdir(exist_ok=True)

    def run(job: tuple[str, str, int]) -> None:
        loss, record, seed = job
        name = f"runs/{loss}-{record}-s{seed}"
        extra = ["--loss", "ce"] if loss == "ce" else LOSSES[loss]
        step(study, name, "train-student", "--cache", str(study / f"cache-{record}"), "--run-dir", str(study / name),
             "--seed", str(seed), *extra, *common, threads=threads)

    jobs = [(loss, record, seed) for seed in seeds for loss in losses for record in kinds]
    if not args.no_ce:
        jobs += [("ce", REFERENCE, seed) for seed in seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(run, jobs))

    final = {job: evals(study / f"runs/{job[0]}-{job[1]}-s{job[2]}")[-1] for job in jobs}
    results: dict = {"data": data, "val": val, "epochs": args.epochs, "student": args.student, "seeds": seeds,
                     "teacher_top1": evals(out / "teacher-triples")[-1], "bytes_per_view": sizes,
                     "ce": None if args.no_ce else [final[("ce", REFERENCE, s)] for s in seeds], "losses": {}}
    ce = "" if args.no_ce else "; ce alone {:.2f} +- {:.2f}".format(*mean_std(results["ce"]))
    print(f"\nteacher {args.teacher}: val top-1 {results['teacher_top1']:.2f}%; student {args.student}, "
          f"{args.epochs} epochs; val top-1 (%), mean +- std over {len(seeds)} seed(s){ce}")
    print(f"| loss | record | bytes/view | top-1 | minus {REFERENCE}, by seed | mean difference |")
    print("|---|---|---|---|---|---|")
    for loss in losses:
        results["losses"][loss] = {}
        for record in kinds:
            tops = [final[(loss, record, s)] for s in seeds]
            diffs = [t - final[(loss, REFERENCE, s)] for t, s in zip(tops, seeds)]
            mean, std = mean_std(tops)
            results["losses"][loss][record] = {"top1": tops, "mean": mean, "std": std, "minus_full": diffs}
            by_seed = " " + " ".join(f"{d:+.2f}" for d in diffs) if record != REFERENCE else " -"
            print(f"| {loss} | {record} | {sizes[record]:.1f} | {mean:.2f} +- {std:.2f} |{by_seed} | "
                  + (f"{mean_std(diffs)[0]:+.2f}" if record != REFERENCE else "-") + " |")
    (study / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwrote {study / 'results.json'}")


if __name__ == "__main__":
    main()
