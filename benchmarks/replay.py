"""What exact replay costs per view, next to timm's own transforms drawing at random.

    python benchmarks/replay.py [--quick] [--views 512] [--repeats 5]

On the same decoded images (Fashion-MNIST 28x28 upscaled to 64, or digits 8x8 when Fashion-MNIST
is not installed; and a synthetic 256x256 RGB set cropped to 224), for the presets `light`
(RRC + flip) and `strong` (RRC + flip + rand-m9-mstd0.5 + random erasing 0.25, const), measures
microseconds per view of:

- timm: ``timm.data.create_transform(is_training=True, ...)`` with the matching settings, one call
  per image (drawing its own random parameters), outputs stacked into a batch;
- draw + replay (pil): ``sample_view_params`` then ``replay_block`` on the PIL path, what
  precompute does per block;
- replay (pil): ``replay_block`` with the parameters given, what training does per view;
- replay (tensor): the same on the tensor path (PIL images in, converted inside, as the loader does).

One intra-op thread everywhere (PIL is single-threaded). Each number is CPU time per view, the
median of --repeats runs over --views views, the five measurements interleaved within each run;
the ratios divide kdcache's cost by timm's.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from PIL import Image

from kdcache.augment import preset, sample_view_params
from kdcache.replay import replay_block
from kdcache.sources import FASHION_MNIST_DIR, decode_sample, open_source

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def small_images(n: int) -> tuple[str, list[Image.Image], int]:
    """Fashion-MNIST (28 px, output 64) or, without it, digits (8 px, output 32)."""
    if os.path.isdir(FASHION_MNIST_DIR):
        source, name, size = open_source("fashion-mnist"), "fashion-mnist 28px -> 64", 64
    else:
        source, name, size = open_source("digits"), "digits 8px -> 32", 32
    return name, [decode_sample(s) for s in source.read(range(min(n, len(source))))], size


def synthetic_images(n: int, side: int = 256) -> list[Image.Image]:
    """Smooth colour fields with texture: JPEG-like content at ImageNet-like size."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    images = []
    for _ in range(n):
        a, b, c = rng.uniform(0.5, 4.0, size=3)
        base = np.stack([np.sin(a * 6 * xx + b), np.cos(b * 6 * yy + c), np.sin(c * 6 * (xx + yy) + a)], -1)
        noise = rng.normal(0.0, 0.15, size=(side, side, 3))
        array = np.clip((base * 0.4 + 0.5 + noise) * 255, 0, 255).astype(np.uint8)
        images.append(Image.fromarray(array))
    return images


def timm_transform(name: str, size: int):
    from timm.data import create_transform

    common = dict(is_training=True, hflip=0.5, color_jitter=None, interpolation="bilinear", mean=MEAN, std=STD)
    if name == "light":
        return create_transform(size, **common)
    return create_transform(size, auto_augment="rand-m9-mstd0.5", re_prob=0.25, re_mode="const", **common)


def median_us_per_view(functions: dict, views: int, repeats: int) -> dict[str, float]:
    """Median CPU time per view of each function, the functions interleaved in every repeat.

    CPU time of this (single-threaded) process rather than wall time: on a shared machine another
    process's load then lengthens no measurement, and interleaving exposes every function to the
    same cache and frequency conditions.
    """
    for fn in functions.values():
        fn()  # warm-up (imports, allocator)
    times: dict[str, list[float]] = {name: [] for name in functions}
    for r in range(repeats):
        for name, fn in functions.items():
            random.seed(r)
            np.random.seed(r)
            torch.manual_seed(r)
            start = time.process_time()
            fn()
            times[name].append(time.process_time() - start)
    return {name: statistics.median(t) / views * 1e6 for name, t in times.items()}


def measure(images: list[Image.Image], size: int, name: str, repeats: int) -> dict[str, float]:
    spec = preset(name, output_size=size, mean=MEAN, std=STD, interpolation="bilinear")
    timm = timm_transform(name, size)
    ids = np.arange(len(images), dtype=np.int64)
    sizes = [(img.height, img.width) for img in images]
    params = sample_view_params(spec, seed=0, epoch=0, block_id=0, sample_ids=ids, image_sizes=sizes)

    def run_timm():
        return torch.stack([timm(img) for img in images])

    def run_draw():
        return sample_view_params(spec, seed=0, epoch=0, block_id=0, sample_ids=ids, image_sizes=sizes)

    def run_draw_replay():
        drawn = sample_view_params(spec, seed=0, epoch=0, block_id=0, sample_ids=ids, image_sizes=sizes)
        return replay_block(spec, drawn, images, path="pil")

    assert replay_block(spec, params, images, path="pil").shape == run_timm().shape
    return median_us_per_view({
        "timm": run_timm,
        "draw": run_draw,
        "draw+pil": run_draw_replay,
        "pil": lambda: replay_block(spec, params, images, path="pil"),
        "tensor": lambda: replay_block(spec, params, images, path="tensor"),
    }, len(images), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="128 views (32 at 224 px), 3 repeats")
    parser.add_argument("--views", type=int, default=512, help="views per measurement (a quarter at 224 px)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    views, repeats = (128, 3) if args.quick else (args.views, args.repeats)
    torch.set_num_threads(1)

    small_name, small, small_size = small_images(views)
    datasets = [(small_name, small, small_size), ("synthetic 256px -> 224", synthetic_images(max(8, views // 4)), 224)]
    import PIL
    import timm
    import torchvision

    print(f"replay cost per view (CPU us, median of {repeats} interleaved runs), 1 thread, {platform.processor() or platform.machine()}; "
          f"torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, pillow {PIL.__version__}")
    header = (f"{'images':<26} {'preset':<7} {'views':>5} {'timm':>8} {'draw':>7} {'draw+pil':>9} {'pil':>8} {'tensor':>8}"
              f" {'pil/timm':>9} {'tensor/timm':>12}")
    print(header)
    print("-" * len(header))
    for name, images, size in datasets:
        for augmentation in ("light", "strong"):
            t = measure(images, size, augmentation, repeats)
            print(f"{name:<26} {augmentation:<7} {len(images):>5} {t['timm']:>8.1f} {t['draw']:>7.1f} {t['draw+pil']:>9.1f}"
                  f" {t['pil']:>8.1f} {t['tensor']:>8.1f} {t['pil'] / t['timm']:>9.2f} {t['tensor'] / t['timm']:>12.2f}",
                  flush=True)
    print("timm: create_transform(is_training=True) drawing at random; draw: sample_view_params alone; "
          "draw+pil: draw then replay (precompute); pil / tensor: replay of given parameters (training).")


if __name__ == "__main__":
    main()
