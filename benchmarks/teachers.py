"""Several teachers per cache, side by side in one run: add-teacher against bare inference of the same teacher on the
same replayed views, and the bytes per view each teacher's records take on disk.

    python benchmarks/teachers.py               # CPU size (docs/benchmarks.md): digits, 1 epoch, resnet50 teachers at 64 px
    python benchmarks/teachers.py --quick       # CI size

1. A cache is made with teacher A (precompute-logits, `light`, top-10).
2. In alternating rounds, on a fresh copy of that cache each time: **add-teacher** with teacher B
   (other weights, the same architecture) scores every committed view (read the stored
   parameters, decode, replay, teacher, top-k, commit), against **bare inference** of B on the
   same views already replayed into memory, in the same batches. The median of each, and their ratio.
3. Bytes per view, from the stored shard files of the last copy: each teacher's record files
   (values, indices, tail), the parameters (stored once, shared by every teacher) and each
   teacher's ledger.

The teachers' weights are random (no checkpoint can be downloaded here): throughput does not
depend on them. One thread unless --threads says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")  # as the kdcache commands set it, before torch starts its threads

import torch  # noqa: E402

import timm  # noqa: E402

from kdcache.add_teacher import AddTeacherConfig, add_teacher  # noqa: E402
from kdcache.augment import cache_spec  # noqa: E402
from kdcache.errors import UnfinishedCacheError  # noqa: E402
from kdcache.format import TEACHER_ARRAYS, open_cache  # noqa: E402
from kdcache.plan import read_block  # noqa: E402
from kdcache.precompute import PrecomputeConfig, precompute_logits  # noqa: E402
from kdcache.replay import replay_block  # noqa: E402
from kdcache.sources import decode_sample, open_source  # noqa: E402
from kdcache.teacher import MODEL_META_KEY, TeacherConfig, load_teacher, teacher_logits  # noqa: E402


def quiet(message: str) -> None:
    pass


def save_teacher(path: Path, model: str, classes: int, size: int, seed: int) -> TeacherConfig:
    torch.manual_seed(seed)
    net = timm.create_model(model, pretrained=False, num_classes=classes)
    meta = {"input_size": (3, size, size), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear"}
    torch.save({"state_dict": net.state_dict(), MODEL_META_KEY: meta}, path)
    return TeacherConfig(model=model, checkpoint=str(path))


def replayed_views(data: str, cache_path: Path) -> torch.Tensor:
    """Every committed view of the cache, replayed into memory from its stored parameters (what add-teacher scores)."""
    cache = open_cache(cache_path)
    m, layout = cache.manifest, cache.layout
    source, plan, spec = open_source(data, split=m.dataset.split), cache.samples(), cache_spec(m)
    views = []
    for epoch, unit in sorted(cache.ledger):
        for block in layout.unit_blocks(unit):
            samples = read_block(source, layout, block, plan["source_index"][layout.block_slots(block)])
            images = [decode_sample(s) for s in samples]
            views.append(replay_block(spec, cache.read_block(epoch, block)["params"], images, path=m.replay["path"]))
    return torch.cat(views)


def bare_inference(model, views: torch.Tensor, batch: int, blocks: list[int]) -> float:
    """Views/s of the teacher alone on views in memory, block by block in add-teacher's batches."""
    start, offset = time.perf_counter(), 0
    for size in blocks:
        block = views[offset : offset + size]
        for i in range(0, size, batch):
            teacher_logits(model, block[i : i + batch], torch.device("cpu"))
        offset += size
    return len(views) / (time.perf_counter() - start)


def stored_bytes(path: Path) -> dict:
    """Bytes per view of each teacher's record files, the shared parameters and each teacher's ledger."""
    cache = open_cache(path)
    views = sum(entry.views for entry in cache.ledger.values())

    def files(entries, arrays):
        return sum(meta["bytes"] for entry in entries for key, meta in entry.files.items() if key.split("/")[0] in arrays)

    def ledger(folder: Path) -> int:
        return sum(p.stat().st_size for p in (folder / "ledger").rglob("*.json"))

    out = {"views": views, "params": files(cache.ledger.values(), ("params",)) / views,
           "teachers": {"main": {"records": files(cache.ledger.values(), TEACHER_ARRAYS) / views, "ledger": ledger(path) / views}}}
    for name in cache.teachers[1:]:
        records = cache.teacher_records(name)
        out["teachers"][name] = {"records": files(records.own_ledger.values(), TEACHER_ARRAYS) / views,
                                 "ledger": ledger(path / "teachers" / name) / views}
    return out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="digits")
    parser.add_argument("--teacher", default="resnet50")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--topk", type=int, default=10)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="alternating add-teacher / bare-inference measurements")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="test_resnet teachers, one epoch, one round (CI size)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.teacher, args.size, args.epochs, args.rounds, args.batch = "test_resnet", 32, 1, 1, 64
    torch.set_num_threads(args.threads)
    results: dict = {"args": vars(args) | {"json": None}, "cpu": cpu_model()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        classes = open_source(args.data).num_classes
        a = save_teacher(tmp / "a.pt", args.teacher, classes, args.size, seed=0)
        b = save_teacher(tmp / "b.pt", args.teacher, classes, args.size, seed=1)
        base = tmp / "cache"
        precompute_logits(PrecomputeConfig(data=args.data, output=str(base), teacher=a, augmentation="light", epochs=args.epochs,
                                           topk=args.topk, block_size=args.block, blocks_per_unit=2, batch_size=args.batch),
                          log=quiet)

        def added(name: str, **extra):
            copy = tmp / name
            shutil.copytree(base, copy)
            return copy, add_teacher(AddTeacherConfig(cache=str(copy), data=args.data, teacher=b, name="B", **extra), log=quiet)

        try:  # imports and first calls, paid before any measurement
            added("warm", max_units=1)
        except UnfinishedCacheError:
            pass
        views = replayed_views(args.data, base)
        model, _ = load_teacher(b)
        layout = open_cache(base).layout
        blocks = [layout.sizes[block] for _, unit in sorted(open_cache(base).ledger) for block in layout.unit_blocks(unit)]
        bare_inference(model, views[: 2 * args.batch], args.batch, [2 * args.batch])  # its first calls, too
        rates = {"add-teacher": [], "bare": []}
        for round_ in range(args.rounds):
            copy, done = added(f"round{round_}")
            rates["add-teacher"].append(done.views_per_second)
            rates["bare"].append(bare_inference(model, views, args.batch, blocks))
        results["rounds"] = rates
        results["add_teacher_views_per_s"] = statistics.median(rates["add-teacher"])
        results["bare_inference_views_per_s"] = statistics.median(rates["bare"])
        results["ratio"] = results["add_teacher_views_per_s"] / results["bare_inference_views_per_s"]
        results["bytes_per_view"] = stored_bytes(copy)
    print(f"cpu {results['cpu']}, {args.threads} thread(s); teacher {args.teacher} at {args.size} px, batch {args.batch}; "
          f"{len(views)} views ({args.data}, light, {args.epochs} epoch(s), top-{args.topk})")
    print(f"add-teacher vs bare inference: median of {args.rounds} alternating round(s) "
          f"(add-teacher {', '.join(f'{r:.0f}' for r in rates['add-teacher'])}; bare {', '.join(f'{r:.0f}' for r in rates['bare'])} views/s)")
    print(f"{'measure':<58}{'views/s':>10}{'ratio':>8}")
    print(f"{'bare teacher inference (views in memory)':<58}{results['bare_inference_views_per_s']:>10.0f}{1:>8.2f}")
    print(f"{'add-teacher (read params, decode, replay, teacher, store)':<58}{results['add_teacher_views_per_s']:>10.0f}"
          f"{results['ratio']:>8.2f}")
    stored = results["bytes_per_view"]
    print(f"{'bytes per view':<58}{'records':>10}{'ledger':>8}")
    for name, sizes in stored["teachers"].items():
        print(f"{'teacher ' + name + (' (root)' if name == 'main' else ' (teachers/' + name + '/)'):<58}"
              f"{sizes['records']:>10.2f}{sizes['ledger']:>8.2f}")
    print(f"{'parameters (root, shared by every teacher)':<58}{stored['params']:>10.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
