"""A 1000-class benchmark with a real tail: Fashion-MNIST pairs (C = 100) and triples (C = 1000).

An item is a square image of two or three Fashion-MNIST items placed on a fixed 2x2 grid of
28 px cells (56 x 56): a triple fills the top-left, top-right and bottom-left cells, a pair the
top row; the other cells stay black. Its class is the ordered tuple, ``a*100 + b*10 + c`` for a
triple (``a*10 + b`` for a pair), named ``T-shirt/top|Trouser|Bag``. Classes that share one or
two items look alike, as ImageNet's related classes do, so a teacher's probability outside its
top 10 has structure (the "dark knowledge" that KD passes on) instead of being noise.

Each cell's image is drawn from the source split of its item's class: train tuples from the
training images, val tuples from the test images, so no val item image was ever seen in
training. The draws come from NumPy's Philox generator keyed by (seed, arity, split), and the
order of the samples is shuffled by the same generator, so a shard holds many classes and the
same options give the same bytes. ``--source digits`` uses scikit-learn's 8x8 digits (shipped in
its wheel; 16 x 16 tuples) for quick runs and CI.

Steps (each resumable: a finished step is skipped when run again), all under ``--out``:

1. ``data``: webdataset shards ``OUT/triples/{train,val}-NNNNNN.tar`` (and ``OUT/pairs/``),
   written by :func:`kdcache.write_shards` (the writer of ``kdcache make-shards``), with
   ``classes.txt`` beside them, and the augmentation spec ``OUT/augmentation.json``: the
   ``light`` preset without its horizontal flip, which would swap the tuple's items and so its
   class, and with crops of at least a third of the image (a crop of 8% of it, ``light``'s
   lower bound, shows part of one item only).
2. ``teacher``: ``kdcache train-student --loss ce`` on the triples (and on the pairs with
   ``--pairs``), evaluated on val every epoch (``OUT/teacher-triples/metrics.jsonl``).
3. ``reference``: ``kdcache precompute-logits`` of the val tuples (one epoch, the spec above),
   then the teacher's float32 logits and penultimate features on the first ``--views`` views of
   that cache, replayed by :class:`kdcache.CacheLoader` exactly as precompute replayed them:
   ``OUT/reference-triples/logits.npy`` (float32 [N, C]), ``features.npy`` (float32 [N, D]),
   ``labels.npy`` (int64 [N]), ``views.npy`` (int64 [N, 2], epoch and slot) and ``reference.json``
   (teacher, data, views, top-1 and top-5 on the views and on val's centre crops, and how the
   float32 top-k agrees with the cache's fp16 records).
   The reference at T = 4 is the same logits divided by 4.
4. ``tail``: quantiles over the reference views of the teacher's top-1 and top-10 probability
   mass at T = 1 and T = 4, and of the mass outside the top 10 of softmax(gamma * v) at TTM's
   gamma = 0.25; then the mean mass on the classes that share 2, 1 or 0 items with the teacher's
   top-1 class (the tail's structure). Both also go to ``OUT/reference-NAME/tail.json``.

``all`` runs the four in order::

    apt-get install -y dataset-fashion-mnist
    python benchmarks/tuples.py all --out data/tuples           # about 25 min on 2 CPU cores
    python benchmarks/tuples.py tail --out data/tuples          # the quantiles again
    python benchmarks/tuples.py all --quick --out /tmp/tuples-quick   # digits, tiny sizes (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from study import evals, step  # noqa: E402

from kdcache.errors import ConfigError, KdcacheError  # noqa: E402
from kdcache.sources import DigitsSource, FashionMnistSource, Sample, Source, decode_sample  # noqa: E402
from kdcache.format.store import npy_bytes  # noqa: E402

#: name -> number of items per image
ARITIES = {"pairs": 2, "triples": 3}
#: cell (row, column) of each item on the 2x2 grid
CELLS = ((0, 0), (0, 1), (1, 0))
SPLIT_CODES = {"train": 0, "val": 1}
SOURCES = ("fashion-mnist", "digits")
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
GAMMA = 0.25


def base_source(name: str, split: str) -> Source:
    """The 10-class source the items come from: train tuples from its train split, val from its val split."""
    if name == "fashion-mnist":
        return FashionMnistSource(split=split)
    if name == "digits":
        return DigitsSource(split=split)
    raise ConfigError(f"source {name!r}; expected one of {', '.join(SOURCES)}")


class TupleSource(Source):
    """Tuples of ``arity`` items of a 10-class ``base`` source, ``per_class`` samples of each of the 10**arity classes.

    Sample ``i`` is composed when read; which base image fills each cell, and the order of the
    samples, are fixed at construction from ``seed`` (see the module docstring). It exists to be
    written as shards: its ``uri`` names it, but :func:`kdcache.open_source` opens the shards,
    not it.
    """

    kind = "tuples"

    def __init__(self, base: Source, *, arity: int, per_class: int, seed: int):
        if arity not in ARITIES.values():
            raise ConfigError(f"arity {arity!r}; expected 2 (pairs) or 3 (triples)")
        if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
            raise ConfigError(f"samples per class {per_class!r}; expected a positive integer")
        if base.num_classes != 10:
            raise ConfigError(f"the base source {base.uri} has {base.num_classes} classes; tuples need 10")
        self.base, self.arity, self.per_class, self.seed = base, arity, per_class, seed
        self.split = base.split
        self.num_classes = 10**arity
        self.class_names = ["|".join(base.class_names[d] for d in self.items_of(c)) for c in range(self.num_classes)]
        self.uri = f"tuples:{base.uri}:arity={arity}:per_class={per_class}:seed={seed}"
        labels = np.array([s.label for s in base.iter_samples()], dtype=np.int64)
        pools = [np.flatnonzero(labels == d) for d in range(10)]
        empty = [d for d in range(10) if pools[d].size == 0]
        if empty:
            raise ConfigError(f"the base source {base.uri} has no images of classes {empty}")
        rng = np.random.Generator(np.random.Philox(key=[seed, 2 * arity + SPLIT_CODES[base.split]]))
        #: int64 [N]: each sample's class, in sample order (shuffled, so a shard holds many classes)
        self.labels = rng.permutation(np.repeat(np.arange(self.num_classes), per_class))
        items = np.array([self.items_of(c) for c in range(self.num_classes)], dtype=np.int64)[self.labels]
        sizes = np.array([p.size for p in pools])[items]
        picks = np.minimum((rng.random(items.shape) * sizes).astype(np.int64), sizes - 1)
        offsets = np.cumsum([0] + [p.size for p in pools])
        #: int64 [N, arity]: the base source's index of the image in each cell
        self.members = np.concatenate(pools)[offsets[items] + picks]

    def items_of(self, label: int) -> tuple[int, ...]:
        """The base classes of a tuple class, in cell order (``123`` -> ``(1, 2, 3)``)."""
        return tuple(int(d) for d in f"{label:0{self.arity}d}")

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, indices: Sequence[int]) -> list[Sample]:
        positions = self._positions(indices)
        needed = sorted({int(j) for i in positions for j in self.members[i]})
        cells = {j: cell_image(sample) for j, sample in zip(needed, self.base.read(needed))}
        return [
            Sample(key=f"{self.split}-{i:07d}", label=int(self.labels[i]),
                   data=npy_bytes(compose([cells[int(j)] for j in self.members[i]])))
            for i in positions
        ]


def cell_image(sample: Sample) -> np.ndarray:
    """A base sample's image as grayscale uint8 (digits and Fashion-MNIST are grayscale already)."""
    return np.asarray(decode_sample(sample).convert("L"))


def compose(cells: Sequence[np.ndarray]) -> np.ndarray:
    """The items on the 2x2 grid, in the cells of :data:`CELLS`; the other cells black."""
    h, w = cells[0].shape
    grid = np.zeros((2 * h, 2 * w), dtype=np.uint8)
    for (row, col), cell in zip(CELLS, cells):
        grid[row * h : (row + 1) * h, col * w : (col + 1) * w] = cell
    return grid


def augmentation_spec(size: int) -> dict:
    """``light`` without the flip (it would change the class), crops of a third of the image or more."""
    from kdcache.augment import preset

    spec = preset("light", output_size=size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)).to_dict()
    return {**spec, "name": "tuples", "hflip": 0.0, "crop_scale": [1 / 3, 1.0]}


# --- steps ----------------------------------------------------------------------------------


def shard_pattern(out: Path, name: str, split: str) -> str:
    """The source spec of one split's shards, as written by :func:`write_data`."""
    from kdcache.shards import brace_pattern

    count = len(list((out / name).glob(f"{split}-*.tar")))
    if count == 0:
        raise SystemExit(f"error: no {split} shards in {out / name}; run the data step first")
    return "webdataset:" + brace_pattern(str(out / name / f"{split}-%06d.tar"), count)


def write_data(out: Path, args: argparse.Namespace) -> None:
    """Step 1: the shards of every tuple size in ``args.sizes``, and the augmentation spec."""
    from kdcache.shards import write_shards

    for name in args.sizes:
        done = out / name / ".done"
        options = {"source": args.source, "seed": args.seed, "train_per_class": args.train_per_class[name],
                   "val_per_class": args.val_per_class[name], "image_format": args.image_format}
        if done.exists():
            made = json.loads(done.read_text())
            if made != options:
                raise SystemExit(f"error: {out / name} holds data made with {made}, not {options}; "
                                 "give another --out or remove it")
            continue
        for split, per_class in (("train", args.train_per_class[name]), ("val", args.val_per_class[name])):
            start = time.perf_counter()
            source = TupleSource(base_source(args.source, split), arity=ARITIES[name], per_class=per_class,
                                 seed=args.seed)
            for stale in (out / name).glob(f"{split}-*.tar*"):
                stale.unlink()  # left by an interrupted run
            paths = write_shards(source, str(out / name / f"{split}-%06d.tar"),
                                 samples_per_shard=args.samples_per_shard, image_format=args.image_format)
            print(f"  {name} {split}: {len(source)} samples ({per_class} per class), {len(paths)} shards, "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
        done.write_text(json.dumps(options) + "\n")
    spec = out / "augmentation.json"
    size = 2 * (8 if args.source == "digits" else 28)
    spec.write_text(json.dumps(augmentation_spec(size), indent=1) + "\n")


def train_teacher(out: Path, args: argparse.Namespace, name: str) -> None:
    """Step 2: ``kdcache train-student --loss ce`` on one tuple size; its accuracy in result.json."""
    run = f"teacher-{name}"
    step(out, run, "train-student", "--data", shard_pattern(out, name, "train"), "--val-data",
         shard_pattern(out, name, "val"), "--model", args.teacher, "--run-dir", str(out / run), "--loss", "ce",
         "-a", str(out / "augmentation.json"), "--img-size", str(json.loads((out / "augmentation.json").read_text())["output_size"]),
         "--epochs", str(args.teacher_epochs), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
         "--log-every", "100", "--seed", str(args.seed), threads=args.threads)
    print(f"  teacher on the {name}: val top-1 {evals(out / run)[-1]:.2f}% after {args.teacher_epochs} epochs, "
          f"{float((out / f'{run}.done').read_text()):.0f} s", flush=True)


def reference(out: Path, args: argparse.Namespace, name: str) -> None:
    """Step 3: the teacher's float32 logits and features on the first ``args.views`` views of a val cache."""
    import torch

    from kdcache import CacheLoader, TeacherRecord, open_source
    from kdcache.teacher import TeacherConfig, load_teacher

    target = out / f"reference-{name}"
    if (target / "reference.json").exists():
        return
    checkpoint = out / f"teacher-{name}" / "model.pt"
    if not checkpoint.exists():
        raise SystemExit(f"error: no teacher checkpoint {checkpoint}; run the teacher step first")
    val = shard_pattern(out, name, "val")
    cache = step(out, f"cache-val-{name}", "precompute-logits", "--data", val, "--teacher", args.teacher,
                 "--teacher-checkpoint", str(checkpoint), "--output", str(out / f"cache-val-{name}"),
                 "-a", str(out / "augmentation.json"), "--epochs", "1", "--seed", str(args.seed), "--topk", "10",
                 threads=args.threads)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, info = load_teacher(TeacherConfig(model=args.teacher, checkpoint=str(checkpoint)))
    loader = CacheLoader(str(cache), val, batch_size=256, seed=args.seed)
    logits, features, labels, views, stored = [], [], [], [], []
    with torch.no_grad():
        for batch in loader.epoch(0):
            pooled = model.forward_head(model.forward_features(batch.images), pre_logits=True)
            logits.append(model.get_classifier()(pooled).float())
            if len(logits) == 1 and not torch.allclose(logits[0], model(batch.images).float(), rtol=1e-4, atol=1e-4):
                raise SystemExit(f"error: {args.teacher}'s classifier on its pooled features is not the model's output; "
                                 "the features would not be the penultimate layer")
            features.append(pooled.float())
            labels.append(batch.labels)
            views.append(batch.views)
            stored.append(batch.record)
            if sum(len(v) for v in views) >= args.views:
                break
    n = min(args.views, sum(len(v) for v in views))
    logits, features = torch.cat(logits)[:n], torch.cat(features)[:n]
    labels, views = torch.cat(labels)[:n], torch.cat(views)[:n]
    # The cache's fp16 top-10 records of the same views: what precompute stored against what replays here.
    mine = TeacherRecord.from_logits(logits, 10)
    cached_values = torch.cat([r.values.float() for r in stored])[:n]
    cached_indices = torch.cat([r.indices.long() for r in stored])[:n]
    same_indices = float((mine.indices.long() == cached_indices).all(-1).float().mean())
    value_error = float((mine.values.float() - cached_values).abs().max())
    ranked = logits.topk(5, -1).indices
    accuracy = {"top1": 100 * float((ranked[:, 0] == labels).float().mean()),
                "top5": 100 * float((ranked == labels[:, None]).any(-1).float().mean())}
    centre = {"hits1": 0, "hits5": 0, "count": 0}
    with torch.no_grad():
        for batch in loader.eval_batches(val):
            top = model(batch.images).topk(5, -1).indices
            centre["hits1"] += int((top[:, 0] == batch.labels).sum())
            centre["hits5"] += int((top == batch.labels[:, None]).any(-1).sum())
            centre["count"] += len(batch.labels)
    target.mkdir(parents=True, exist_ok=True)
    np.save(target / "logits.npy", logits.numpy().astype(np.float32))
    np.save(target / "features.npy", features.numpy().astype(np.float32))
    np.save(target / "labels.npy", labels.numpy().astype(np.int64))
    np.save(target / "views.npy", views.numpy().astype(np.int64))
    train_seconds = float((out / f"teacher-{name}.done").read_text())
    summary = {
        "teacher": {"model": args.teacher, "checkpoint": str(checkpoint), "weights_sha256": info.weights_sha256,
                    "epochs": args.teacher_epochs, "train_seconds": train_seconds, "num_features": features.shape[1],
                    "val_centre_crop": {"top1": 100 * centre["hits1"] / centre["count"],
                                        "top5": 100 * centre["hits5"] / centre["count"], "images": centre["count"]}},
        "data": {"train": shard_pattern(out, name, "train"), "val": val, "classes": info.num_classes,
                 **json.loads((out / name / ".done").read_text())},
        "views": {"count": n, "cache": str(cache), "epoch": 0, "loader_seed": args.seed,
                  "augmentation": json.loads((out / "augmentation.json").read_text()),
                  "files": {"logits.npy": f"float32 [{n}, {logits.shape[1]}]",
                            "features.npy": f"float32 [{n}, {features.shape[1]}] (the teacher's pooled penultimate features; "
                                            "logits = features @ W.T + b of its classifier)",
                            "labels.npy": f"int64 [{n}]", "views.npy": f"int64 [{n}, 2] (cache epoch, sample position)"}},
        "accuracy_on_views": accuracy,
        "against_the_cache": {"top10_indices_equal": same_indices, "top10_value_max_abs_error": value_error},
        "seconds": time.perf_counter() - start,
    }
    (target / "reference.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"  reference of the {name}: {n} views x {logits.shape[1]} classes, {features.shape[1]} features; "
          f"top-1 {accuracy['top1']:.2f}%, top-5 {accuracy['top5']:.2f}% on the views, "
          f"{summary['teacher']['val_centre_crop']['top1']:.2f}% / {summary['teacher']['val_centre_crop']['top5']:.2f}% "
          f"on val (centre crop); top-10 as the cache stored it on {100 * same_indices:.2f}% of views "
          f"(values within {value_error:.1e})", flush=True)


def tail_statistics(logits: np.ndarray) -> dict[str, np.ndarray]:
    """Per view: top-1 and top-10 mass at T = 1 and T = 4, and the mass outside the top 10 at TTM's gamma."""
    import torch

    v = torch.from_numpy(logits).double()
    out = {}
    for label, scale in (("T=1", 1.0), ("T=4", 0.25)):
        top = torch.softmax(v * scale, -1).topk(10, -1).values
        out[f"top-1 mass, {label}"] = top[:, 0].numpy()
        out[f"top-10 mass, {label}"] = top.sum(-1).numpy()
    out[f"outside top-10, gamma={GAMMA}"] = 1 - torch.softmax(v * GAMMA, -1).topk(10, -1).values.sum(-1).numpy()
    return out


def tail_structure(logits: np.ndarray) -> list[tuple[int, int, float, float]]:
    """Where the mass outside the top-1 class lies: ``(items shared with the top-1 class, classes, mean mass at T = 1, at T = 4)``.

    A tail with structure puts more mass per class on the classes that share items with the
    teacher's top-1 class (as ImageNet teachers put it on related classes) than on the others.
    """
    import torch

    arity = round(np.log10(logits.shape[1]))
    items = np.array([[int(d) for d in f"{c:0{arity}d}"] for c in range(logits.shape[1])])
    v = torch.from_numpy(logits).double()
    top = v.argmax(-1).numpy()
    shared = torch.from_numpy((items[None, :, :] == items[top][:, None, :]).sum(-1))  # [N, C]
    rows = []
    for count in range(arity - 1, -1, -1):
        mask = (shared == count).double()
        masses = [float((torch.softmax(v * scale, -1) * mask).sum(-1).mean()) for scale in (1.0, 0.25)]
        rows.append((count, int(mask[0].sum()), *masses))
    return rows


def print_tail(reference_dir: Path) -> None:
    """Step 4: quantiles over the reference views of :func:`tail_statistics`; also written to tail.json."""
    path = reference_dir / "logits.npy"
    if not path.exists():
        raise SystemExit(f"error: no reference logits {path}; run the reference step first")
    logits = np.load(path)
    stats = tail_statistics(logits)
    quantiles = {name: [float(q) for q in np.quantile(values, QUANTILES)] for name, values in stats.items()}
    print(f"\n{reference_dir.name}: {logits.shape[0]} views, C = {logits.shape[1]}; quantiles over views")
    print(f"{'':<28}" + "".join(f"{f'q{round(100 * q):02d}':>9}" for q in QUANTILES) + f"{'mean':>9}")
    for name, values in stats.items():
        print(f"{name:<28}" + "".join(f"{q:>9.3f}" for q in quantiles[name]) + f"{float(values.mean()):>9.3f}")
    structure = tail_structure(logits)
    print(f"\nmass on the other classes by the items they share with the top-1 class, mean over views")
    print(f"{'items shared':<14}{'classes':>8}{'mass, T=1':>11}{'mass, T=4':>11}{'per class, T=4':>16}")
    for count, classes, mass1, mass4 in structure:
        print(f"{count:<14}{classes:>8}{mass1:>11.4f}{mass4:>11.4f}{mass4 / classes:>16.2e}")
    (reference_dir / "tail.json").write_text(json.dumps({
        "quantiles": list(QUANTILES), "rows": quantiles, "means": {k: float(v.mean()) for k, v in stats.items()},
        "by_items_shared_with_top1": [{"items_shared": c, "classes": n, "mass_T1": m1, "mass_T4": m4}
                                      for c, n, m1, m4 in structure]}, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("steps", choices=("data", "teacher", "reference", "tail", "all"),
                        help="which step to run (all: the four in order; finished steps are skipped)")
    parser.add_argument("--out", default="data/tuples", help="where the shards, runs and reference go")
    parser.add_argument("--source", default="fashion-mnist", choices=SOURCES, help="where the items come from")
    parser.add_argument("--train-per-class", type=int, default=40, help="train triples per class (pairs: 10x as many)")
    parser.add_argument("--val-per-class", type=int, default=10, help="val triples per class (pairs: 10x as many)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the data, the teacher's run and the reference views")
    parser.add_argument("--image-format", default="npy", help="how the shards store images (npy is exact and fast to decode)")
    parser.add_argument("--samples-per-shard", type=int, default=2000)
    parser.add_argument("--teacher", default="test_resnet", help="timm model of the teacher")
    parser.add_argument("--teacher-epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--pairs", action="store_true", help="also train a teacher on the pairs and take its reference")
    parser.add_argument("--views", type=int, default=8192, help="reference views (at most the val tuples)")
    parser.add_argument("--threads", type=int, default=1, help="OpenMP threads of each command (more stall beside other work)")
    parser.add_argument("--quick", action="store_true", help="CI size: digits, 2 per class, 1 epoch, 256 views")
    args = parser.parse_args()
    if args.quick:
        args.source, args.train_per_class, args.val_per_class, args.teacher_epochs, args.views = "digits", 2, 1, 1, 256
        args.batch_size, args.samples_per_shard = 64, 500
    for name in ("train_per_class", "val_per_class", "views", "teacher_epochs", "samples_per_shard"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} is {getattr(args, name)}; expected at least 1")
    args.sizes = ("triples", "pairs")
    args.train_per_class = {"triples": args.train_per_class, "pairs": 10 * args.train_per_class}
    args.val_per_class = {"triples": args.val_per_class, "pairs": 10 * args.val_per_class}
    trained = ("triples", "pairs") if args.pairs else ("triples",)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        if args.steps in ("data", "all"):
            print(f"data in {out}", flush=True)
            write_data(out, args)
        if args.steps in ("teacher", "all"):
            for name in trained:
                train_teacher(out, args, name)
        if args.steps in ("reference", "all"):
            for name in trained:
                reference(out, args, name)
        if args.steps in ("tail", "all"):
            for name in trained:
                print_tail(out / f"reference-{name}")
    except KdcacheError as exn:
        raise SystemExit(f"error: {exn}") from None


if __name__ == "__main__":
    main()
