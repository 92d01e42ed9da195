"""Throughput, side by side in one run: precompute vs bare teacher inference; training from the
cache vs plain `ce` vs online distillation (with the ideal speed-up); cache reads vs training.

    python benchmarks/throughput.py                 # CPU size (docs/benchmarks.md)
    python benchmarks/throughput.py --quick         # CI size
    python benchmarks/throughput.py --gpu           # ResNet-50 teacher and student at 224 px, bf16

The teacher's weights are random (no checkpoint can be downloaded here): throughput does not
depend on them. Every figure is measured in this one process, on the same data and views.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# As `kdcache precompute-logits` does: spinning OpenMP threads (the same policy for every measurement
# here). Set before torch starts its threads.
os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import timm  # noqa: E402

from kdcache.augment import cache_spec  # noqa: E402
from kdcache.errors import UnfinishedCacheError  # noqa: E402
from kdcache.format import open_cache  # noqa: E402
from kdcache.losses import LossConfig  # noqa: E402
from kdcache.precompute import PrecomputeConfig, precompute_logits  # noqa: E402
from kdcache.replay import replay_block  # noqa: E402
from kdcache.plan import read_block  # noqa: E402
from kdcache.sources import decode_sample, open_source  # noqa: E402
from kdcache.student import StudentConfig, train_student  # noqa: E402
from kdcache.teacher import MODEL_META_KEY, TeacherConfig, load_teacher, teacher_logits  # noqa: E402


def save_teacher(path: Path, model: str, classes: int, size: int) -> TeacherConfig:
    torch.manual_seed(0)
    net = timm.create_model(model, pretrained=False, num_classes=classes)
    meta = {"input_size": (3, size, size), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear"}
    torch.save({"state_dict": net.state_dict(), MODEL_META_KEY: meta}, path)
    return TeacherConfig(model=model, checkpoint=str(path))


def subset_source(args, tmp: Path) -> str:
    """Write the first --samples samples of the data as webdataset shards (the streaming path)."""
    from kdcache.shards import brace_pattern, write_shards

    source = open_source(args.data)

    class Subset(type(source)):
        pass

    n = min(args.samples, len(source))
    samples = source.read(list(range(n)))

    class _Slice:
        kind, uri, split = source.kind, source.uri, source.split
        num_classes, class_names = source.num_classes, source.class_names

        def __len__(self):
            return n

        def read(self, indices):
            return [samples[i] for i in indices]

        def shards(self):
            return None

        def iter_samples(self, chunk_size=256):
            return iter(samples)

    paths = write_shards(_Slice(), str(tmp / "data-%06d.tar"), samples_per_shard=args.block, image_format="png")
    return brace_pattern(str(tmp / "data-%06d.tar"), len(paths))


def replayed_views(data, cache_path, limit: int) -> torch.Tensor:
    """The cache's epoch-0 views, replayed into memory (up to ``limit``)."""
    cache = open_cache(cache_path)
    m = cache.manifest
    source = open_source(data, shard_sizes=[n for _, n in m.dataset.shards] if m.dataset.shards else None)
    plan = cache.samples()
    views = []
    for block in range(m.blocks.num_blocks):
        if sum(len(v) for v in views) >= limit:
            break
        where = m.blocks.block_slots(block)
        images = [decode_sample(s) for s in read_block(source, m.blocks, block, plan["source_index"][where])]
        views.append(replay_block(cache_spec(m), cache.read_block(0, block)["params"], images))
    return torch.cat(views)


def bare_inference(teacher, views: torch.Tensor, args) -> float:
    """Views/s of the teacher alone on views already in memory, in precompute's batches."""
    device = torch.device(args.device)
    teacher_logits(teacher, views[: args.batch], device)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(0, len(views), args.batch):
        teacher_logits(teacher, views[i : i + args.batch], device).cpu()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(views) / (time.perf_counter() - start)


def step_times(args, classes: int) -> dict:
    """Seconds per batch: teacher forward, student train step, on synthetic data already on the device."""
    device = torch.device(args.device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (args.batch,), device=device)
    teacher = timm.create_model(args.teacher, num_classes=classes).to(device).eval().to(memory_format=torch.channels_last)
    student = timm.create_model(args.student, num_classes=classes).to(device).train().to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)

    def t_step():
        with torch.no_grad(), amp:
            teacher(x)

    def s_step():
        with amp:
            loss = torch.nn.functional.cross_entropy(student(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    out = {}
    for name, fn in (("teacher_forward", t_step), ("student_step", s_step)):
        for _ in range(3):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.repeats):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out[name] = (time.perf_counter() - start) / args.repeats
    return out


def cache_reads(cache_path: str, *, verify_checksums: bool = True) -> float:
    """Views/s reading every block's records of every epoch from a fresh reader, on one core."""
    cache = open_cache(cache_path, verify_checksums=verify_checksums)
    start = time.perf_counter()
    views = 0
    for epoch in cache.complete_epochs():
        for block in range(cache.layout.num_blocks):
            views += len(cache.read_block(epoch, block)["values"])
    return views / (time.perf_counter() - start)


def warm_up_precompute(args, data: str, teacher: TeacherConfig, tmp: Path) -> None:
    """One unit first, so the measured precompute pays for no imports or first calls (the rest stays unfinished)."""
    try:
        precompute_logits(PrecomputeConfig(data=data, output=str(tmp / "warm-cache"), teacher=teacher, augmentation="light", epochs=1,
                                    topk=5, block_size=args.block, blocks_per_unit=4, batch_size=args.batch, max_units=1),
                   log=lambda _: None)
    except UnfinishedCacheError:
        pass


def train_runs(args, data: str, teacher: TeacherConfig, cache: str, tmp: Path, *, max_steps=None, prefix="") -> dict:
    runs = {}
    for name, loss, use_cache, live in (("cache kd", "kd", True, False), ("plain ce", "ce", False, False),
                                        ("online kd", "kd", True, True)):
        result = train_student(StudentConfig(
            data=data, model=args.student, run_dir=str(tmp / (prefix + name.replace(" ", "-"))), loss=LossConfig(name=loss),
            cache=cache if use_cache else None, teacher=teacher if live else None, img_size=None if use_cache else args.size,
            epochs=1, batch_size=args.batch, num_workers=args.workers, log_every=10**9, device=args.device,
            max_steps=max_steps, amp="bf16" if args.device == "cuda" else "none"), log=lambda _: None)
        runs[name] = result.images_per_s
    return runs


def http_cache_reads(cache_path: str) -> float:
    """Views/s reading every record of the cache from Python's http.server on 127.0.0.1, one core."""
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    root = Path(cache_path).parent
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        return cache_reads(f"http://127.0.0.1:{server.server_address[1]}/{Path(cache_path).name}")
    finally:
        server.shutdown()
        server.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--teacher", default="resnet50")
    parser.add_argument("--student", default="resnet18")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--block", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bare-views", type=int, default=8192, help="views replayed into memory for bare inference")
    parser.add_argument("--rounds", type=int, default=3, help="alternating precompute / bare-inference measurements")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.data, args.samples, args.teacher, args.student, args.size, args.batch, args.block, args.repeats = (
            "digits", 512, "test_resnet", "test_resnet", 32, 64, 256, 2)
        args.rounds = 1
    if args.gpu:
        args.device, args.teacher, args.student, args.size, args.batch = "cuda", "resnet50", "resnet50", 224, 256
        args.samples, args.epochs, args.workers = max(args.samples, 32768), 2, max(args.workers, 12)
    results = {"args": vars(args) | {"json": None}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = subset_source(args, tmp)
        classes = open_source(data).num_classes
        teacher = save_teacher(tmp / "teacher.pt", args.teacher, classes, args.size)
        cache = str(tmp / "cache")
        warm_up_precompute(args, data, teacher, tmp)
        # Alternate the two measurements `--rounds` times and keep each one's median: a burst of
        # noise on this shared machine then moves one sample, not the ratio.
        precompute_rates, bare_rates, views, model = [], [], None, None
        for round_ in range(args.rounds):
            out = cache if round_ == 0 else str(tmp / f"cache-{round_}")
            made = precompute_logits(PrecomputeConfig(data=data, output=out, teacher=teacher, augmentation="light",
                                               epochs=args.epochs, topk=min(10, classes), block_size=args.block,
                                               blocks_per_unit=4, batch_size=args.batch, workers=args.workers),
                              log=lambda _: None)
            precompute_rates.append(made.views_per_second)
            if views is None:
                views = replayed_views(data, cache, args.bare_views)
                model, _ = load_teacher(TeacherConfig(model=teacher.model, checkpoint=teacher.checkpoint, device=args.device))
            bare_rates.append(bare_inference(model, views, args))
        results["precompute_views_per_s"] = float(np.median(precompute_rates))
        results["bare_inference_views_per_s"] = float(np.median(bare_rates))
        results["rounds"] = {"precompute": precompute_rates, "bare": bare_rates}
        results["cache_read_views_per_s"] = cache_reads(cache)
        results["cache_read_unverified_views_per_s"] = cache_reads(cache, verify_checksums=False)
        results["http_cache_read_views_per_s"] = http_cache_reads(cache)
        train_runs(args, data, teacher, cache, tmp, max_steps=2, prefix="warm-")  # imports and first calls
        runs = train_runs(args, data, teacher, cache, tmp)
        results["train_images_per_s"] = runs
        results["step_seconds"] = step_times(args, classes)
    st = results["step_seconds"]
    ideal = (st["teacher_forward"] + st["student_step"]) / st["student_step"]
    ceiling = args.batch / st["student_step"]
    print(f"device {args.device}; teacher {args.teacher}, student {args.student}, {args.size} px, batch {args.batch}, "
          f"{args.samples} samples of {args.data}, {args.workers} workers")
    print(f"{'measure':<44}{'views/s':>10}{'ratio':>8}")
    bare = results["bare_inference_views_per_s"]
    print(f"precompute vs bare inference: median of {args.rounds} alternating rounds "
          f"(precompute {', '.join(f'{r:.0f}' for r in results['rounds']['precompute'])}; "
          f"bare {', '.join(f'{r:.0f}' for r in results['rounds']['bare'])} views/s)")
    print(f"{'bare teacher inference (views in memory)':<44}{bare:>10.0f}{1:>8.2f}")
    print(f"{'precompute-logits (decode+replay+teacher+store)':<44}{results['precompute_views_per_s']:>10.0f}"
          f"{results['precompute_views_per_s'] / bare:>8.2f}")
    ce = runs["plain ce"]
    print(f"{'train: plain ce (no teacher)':<44}{ce:>10.0f}{1:>8.2f}")
    print(f"{'train: from the cache (kd)':<44}{runs['cache kd']:>10.0f}{runs['cache kd'] / ce:>8.2f}")
    print(f"{'train: online kd (live teacher)':<44}{runs['online kd']:>10.0f}{runs['online kd'] / ce:>8.2f}")
    print(f"{'train: student step on synthetic data (ceiling)':<44}{ceiling:>10.0f}{ceiling / ce:>8.2f}")
    print(f"{'cache reads alone (one core)':<44}{results['cache_read_views_per_s']:>10.0f}")
    print(f"{'  the same without sha256 checks':<44}{results['cache_read_unverified_views_per_s']:>10.0f}")
    print(f"{'cache reads over http on 127.0.0.1':<44}{results['http_cache_read_views_per_s']:>10.0f}")
    print(f"cache vs online speed-up {runs['cache kd'] / runs['online kd']:.2f}x; ideal (teacher+student)/student = {ideal:.2f}x")
    results["ideal_speedup"] = ideal
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
