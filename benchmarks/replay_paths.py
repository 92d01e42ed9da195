"""Agreement of the tensor replay path (on CPU or GPU) with the reference PIL path.

    python benchmarks/replay_paths.py [--device cuda] [--data fashion-mnist] [--samples 2048]

For each preset: the same stored parameters replayed on both paths; reports the mean and max
absolute pixel difference (normalised units), the teacher's top-1 agreement and the largest
logit difference between the two paths (a random-weight ResNet-18 teacher: agreement of
outputs, not accuracy), and views/s of each path.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import timm  # noqa: E402

from kdcache.augment import PRESETS, preset, sample_view_params  # noqa: E402
from kdcache.replay import replay_block, to_uint8_tensor  # noqa: E402
from kdcache.sources import decode_sample, open_source  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    source = open_source(args.data)
    samples = source.read(list(range(min(args.samples, len(source)))))
    images = [decode_sample(s) for s in samples]
    tensors = [to_uint8_tensor(img, device) for img in images]
    torch.manual_seed(0)
    teacher = timm.create_model("resnet18", num_classes=source.num_classes).eval().to(device)
    print(f"{len(images)} samples of {args.data} at {args.size} px; tensor path on {device}")
    print(f"{'preset':<10}{'mean |dx|':>11}{'max |dx|':>10}{'top-1 agree':>13}{'max |dlogit|':>14}{'pil v/s':>9}{'tensor v/s':>12}")
    for name in PRESETS:
        spec = preset(name, output_size=args.size, mean=(0.5,) * 3, std=(0.5,) * 3)
        params = sample_view_params(spec, seed=0, epoch=0, block_id=0, sample_ids=np.arange(len(images)),
                                    image_sizes=[(img.height, img.width) for img in images])
        start = time.perf_counter()
        ref = replay_block(spec, params, images, path="pil")
        pil_rate = len(images) / (time.perf_counter() - start)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = replay_block(spec, params, tensors, path="tensor")
        if device.type == "cuda":
            torch.cuda.synchronize()
        tensor_rate = len(images) / (time.perf_counter() - start)
        diff = (out.cpu() - ref).abs()
        with torch.no_grad():
            a = torch.cat([teacher(ref[i : i + 256].to(device)) for i in range(0, len(ref), 256)])
            b = torch.cat([teacher(out[i : i + 256].to(device)) for i in range(0, len(out), 256)])
        agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
        print(f"{name:<10}{diff.mean().item():>11.4f}{diff.max().item():>10.3f}{100 * agree:>12.1f}%"
              f"{(a - b).abs().max().item():>14.4f}{pil_rate:>9.0f}{tensor_rate:>12.0f}")


if __name__ == "__main__":
    main()
