"""Both stages on one GPU, from a folder of JPEG photos, side by side in one run: every replay path.

    python benchmarks/gpu.py                      # a GPU: resnet50 teacher; resnet18 and resnet50 students; 224 px, bf16
    python benchmarks/gpu.py --quick              # CI size, on the CPU: test_resnet, 32 px, 64 photos
    python benchmarks/gpu.py --photos DIR         # an image folder of your own instead of benchmarks/photos.py's

Printed, in this order, all measured in this one process on the same photos:

1. bare teacher inference: the teacher alone on views already in device memory (the ceiling of
   precompute), in precompute's batches, bf16 and channels-last on CUDA;
2. precompute-logits on each replay path: ``pil`` and ``tensor`` (decoded and replayed in
   ``--workers`` DataLoader processes) and ``device`` (decoded with nvJPEG and replayed in
   batched ops on the GPU, a block ahead of the teacher);
3. per student: its training step on synthetic data already on the device (the ceiling), plain
   ``ce``, training from the cache (kd) and online kd (the teacher run live on the same views),
   each on the ``device`` path, and the ideal speed-up of the cache over online kd,
   (teacher forward + student step) / student step;
4. the CPU path's data rate alone (no model) against the number of DataLoader workers: how many
   workers a GPU needs where the ``pil`` path stays.

The teacher's and students' weights are random: throughput does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")  # as `kdcache precompute-logits` does

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from photos import make_photos  # noqa: E402
from throughput import save_teacher, step_times  # noqa: E402

from kdcache import CacheLoader  # noqa: E402
from kdcache.augment import cache_spec  # noqa: E402
from kdcache.errors import UnfinishedCacheError  # noqa: E402
from kdcache.format import open_cache  # noqa: E402
from kdcache.losses import LossConfig  # noqa: E402
from kdcache.plan import read_block  # noqa: E402
from kdcache.precompute import PrecomputeConfig, precompute_logits  # noqa: E402
from kdcache.replay import EncodedImages, replay_block  # noqa: E402
from kdcache.sources import open_source  # noqa: E402
from kdcache.student import StudentConfig, train_student  # noqa: E402
from kdcache.teacher import TeacherConfig, load_teacher, teacher_logits, to_channels_last  # noqa: E402

PATHS = ("pil", "tensor", "device")
TARGETS = {"precompute": 0.9, "cache_training": 0.9, "speedup": 0.9}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_views(data: str, cache_path: str, limit: int, device: torch.device) -> torch.Tensor:
    """The cache's epoch-0 views, replayed on the device path into device memory (up to ``limit``)."""
    cache = open_cache(cache_path)
    m = cache.manifest
    source, plan, views = open_source(data), cache.samples(), []
    for block in range(m.blocks.num_blocks):
        if sum(len(v) for v in views) >= limit:
            break
        samples = read_block(source, m.blocks, block, plan["source_index"][m.blocks.block_slots(block)])
        views.append(replay_block(cache_spec(m), cache.read_block(0, block)["params"], EncodedImages(samples),
                                  path="device", device=device))
    return torch.cat(views)[:limit]


def bare_inference(teacher, views: torch.Tensor, batch: int, device: torch.device, repeats: int) -> float:
    """Views/s of the teacher alone on views in device memory, in precompute's batches (one sync at the end)."""
    channels_last = device.type == "cuda"
    if channels_last:
        to_channels_last(teacher)
    teacher_logits(teacher, views[:batch], device, channels_last=channels_last)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        for i in range(0, len(views), batch):
            teacher_logits(teacher, views[i : i + batch], device, channels_last=channels_last)
    sync(device)
    return repeats * len(views) / (time.perf_counter() - start)


def precompute(args, data: str, teacher: TeacherConfig, out: Path, path: str, *, max_units=None) -> float:
    config = PrecomputeConfig(data=data, output=str(out), teacher=teacher, augmentation=args.augmentation, epochs=1,
                              topk=min(10, args.classes), block_size=args.block, blocks_per_unit=4, batch_size=args.batch,
                              replay_path=path, workers=0 if path == "device" else args.workers, max_units=max_units)
    try:
        return precompute_logits(config, log=lambda _: None).views_per_second
    except UnfinishedCacheError:  # a warm-up bounded by max_units
        return 0.0


def train_rate(args, data: str, student: str, cache: str | None, teacher: TeacherConfig | None, run_dir: Path,
               *, max_steps=None) -> float:
    loss = "ce" if cache is None else "kd"
    result = train_student(StudentConfig(
        data=data, model=student, run_dir=str(run_dir), loss=LossConfig(name=loss), cache=cache, teacher=teacher,
        img_size=None if cache else args.size, augmentation=args.augmentation, epochs=1, batch_size=args.batch,
        num_workers=0, log_every=10**9, device=args.device, max_steps=max_steps, replay_path="device",
        amp="bf16" if args.device == "cuda" else "none"), log=lambda _: None)
    return result.images_per_s


def loader_rate(cache: str, data: str, batch: int, workers: int) -> float:
    """Views/s of the pil path's loader alone (decode and replay in ``workers`` processes, no model), one epoch."""
    loader = CacheLoader(cache, data, batch_size=batch, num_workers=workers, replay_path="pil")
    start, views = time.perf_counter(), 0
    for batch_ in loader.epoch(0):
        views += len(batch_)
    return views / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", help="an image folder (default: benchmarks/photos.py's, made in a temporary folder)")
    parser.add_argument("--count", type=int, default=8192, help="photos to make")
    parser.add_argument("--teacher", default="resnet50")
    parser.add_argument("--students", default="resnet18,resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--block", type=int, default=512)
    parser.add_argument("--augmentation", default="light")
    parser.add_argument("--workers", type=int, default=12, help="DataLoader workers of the pil and tensor paths")
    parser.add_argument("--workers-table", default="0,1,2,4,8,12,16")
    parser.add_argument("--bare-views", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.count, args.teacher, args.students, args.size, args.batch, args.block = 64, "test_resnet", "test_resnet", 32, 16, 16
        args.workers, args.workers_table, args.bare_views, args.repeats = 1, "0,1", 64, 2
    device = torch.device(args.device)
    workers_table = [int(w) for w in args.workers_table.split(",")]
    results: dict = {"args": vars(args) | {"json": None}, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
                     else f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = Path(args.photos) if args.photos else make_photos(tmp / "photos", count=args.count)
        data = f"imagefolder:{folder}"
        args.classes = open_source(data).num_classes
        teacher = save_teacher(tmp / "teacher.pt", args.teacher, args.classes, args.size)
        precompute(args, data, teacher, tmp / "warm", "device", max_units=1)  # imports and first calls
        rates = {path: precompute(args, data, teacher, tmp / f"cache-{path}", path) for path in PATHS}
        model, _ = load_teacher(TeacherConfig(model=teacher.model, checkpoint=teacher.checkpoint, device=str(device)))
        views = device_views(data, str(tmp / "cache-device"), args.bare_views, device)
        bare = bare_inference(model, views, args.batch, device, args.repeats)
        del model, views
        results["precompute"] = {"bare": bare, **rates}
        students = {}
        for student in args.students.split(","):
            args.student = student
            steps = step_times(args, args.classes)
            cache = str(tmp / "cache-device")
            train_rate(args, data, student, cache, None, tmp / f"warm-{student}", max_steps=2)
            students[student] = {
                "ceiling": args.batch / steps["student_step"],
                "ideal_speedup": (steps["teacher_forward"] + steps["student_step"]) / steps["student_step"],
                "plain_ce": train_rate(args, data, student, None, None, tmp / f"ce-{student}"),
                "cache_kd": train_rate(args, data, student, cache, None, tmp / f"kd-{student}"),
                "online_kd": train_rate(args, data, student, cache, teacher, tmp / f"online-{student}"),
            }
        results["students"] = students
        results["workers"] = {w: loader_rate(str(tmp / "cache-pil"), data, args.batch, w) for w in workers_table}
        results["photos"] = len(open_source(data))
    report(args, results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def rate(value: float) -> str:
    """views/s, with a decimal where the rate is small (a CPU)."""
    return f"{value:>10.0f}" if value >= 100 else f"{value:>10.1f}"


def report(args, results: dict) -> None:
    pre, met = results["precompute"], lambda ratio, key: "met" if ratio >= TARGETS[key] else "not met"
    print(f"{results['device']}; teacher {args.teacher}, {args.size} px, batch {args.batch}, {results['photos']} JPEG photos, "
          f"augmentation {args.augmentation}; pil and tensor paths with {args.workers} workers")
    print(f"{'measure':<52}{'views/s':>10}{'ratio':>8}")
    print(f"{'bare teacher inference (views in device memory)':<52}{rate(pre['bare'])}{1:>8.2f}")
    for path in PATHS:
        ratio = pre[path] / pre["bare"]
        print(f"{'precompute-logits, replay path ' + path:<52}{rate(pre[path])}{ratio:>8.2f}"
              + (f"   target {TARGETS['precompute']}x: {met(ratio, 'precompute')}" if path == "device" else ""))
    for student, s in results["students"].items():
        print(f"student {student} (device path)")
        print(f"{'  student step on synthetic data (ceiling)':<52}{rate(s['ceiling'])}{1:>8.2f}")
        print(f"{'  train: plain ce':<52}{rate(s['plain_ce'])}{s['plain_ce'] / s['ceiling']:>8.2f}")
        ratio = s["cache_kd"] / s["ceiling"]
        print(f"{'  train: from the cache (kd)':<52}{rate(s['cache_kd'])}{ratio:>8.2f}"
              f"   target {TARGETS['cache_training']}x: {met(ratio, 'cache_training')}")
        print(f"{'  train: online kd (live teacher)':<52}{rate(s['online_kd'])}{s['online_kd'] / s['ceiling']:>8.2f}")
        speedup = s["cache_kd"] / s["online_kd"]
        print(f"  cache over online speed-up {speedup:.2f}x; ideal {s['ideal_speedup']:.2f}x; "
              f"{speedup / s['ideal_speedup']:.2f} of the ideal (target {TARGETS['speedup']}: "
              f"{met(speedup / s['ideal_speedup'], 'speedup')})")
    print("the pil path's loader alone (decode + replay, no model): DataLoader workers -> views/s")
    for workers, views in results["workers"].items():
        print(f"  {workers:>3} workers {rate(views)}")


if __name__ == "__main__":
    main()
