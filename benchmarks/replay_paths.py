"""Agreement of the tensor and device replay paths (on CPU or GPU) with the reference PIL path.

    python benchmarks/replay_paths.py [--device cuda] [--data fashion-mnist] [--samples 2048]
    python benchmarks/photos.py --out photos --count 2048 && \
        python benchmarks/replay_paths.py --data imagefolder:photos/images --size 224 [--device cuda]

For each preset: the same stored parameters replayed on every path; reports, for the tensor and
the device path against pil, the mean and max absolute pixel difference (normalised units), the
teacher's top-1 agreement and the largest logit difference (a random-weight ResNet-18 teacher:
agreement of outputs, not accuracy), and views/s of each path. The pil and tensor paths replay
images decoded beforehand; the device path's rate includes decoding the stored bytes on the device.
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
from kdcache.replay import EncodedImages, replay_block, to_uint8_tensor  # noqa: E402
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
    encoded = EncodedImages(samples)
    print(f"{len(images)} samples of {args.data} at {args.size} px; tensor and device paths on {device}")
    print(f"{'preset':<10}{'path':<8}{'mean |dx|':>11}{'max |dx|':>10}{'top-1 agree':>13}{'max |dlogit|':>14}{'v/s':>9}"
          f"{'pil v/s':>9}")
    for name in PRESETS:
        spec = preset(name, output_size=args.size, mean=(0.5,) * 3, std=(0.5,) * 3)
        params = sample_view_params(spec, seed=0, epoch=0, block_id=0, sample_ids=np.arange(len(images)),
                                    image_sizes=[(img.height, img.width) for img in images])
        start = time.perf_counter()
        ref = replay_block(spec, params, images, path="pil")
        pil_rate = len(images) / (time.perf_counter() - start)
        with torch.no_grad():
            a = torch.cat([teacher(ref[i : i + 256].to(device)) for i in range(0, len(ref), 256)])
        for path, inputs in (("tensor", tensors), ("device", encoded)):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = replay_block(spec, params, inputs, path=path, device=device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            rate = len(images) / (time.perf_counter() - start)
            diff = (out.cpu() - ref).abs()
            with torch.no_grad():
                b = torch.cat([teacher(out[i : i + 256].to(device)) for i in range(0, len(out), 256)])
            agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
            print(f"{name:<10}{path:<8}{diff.mean().item():>11.4f}{diff.max().item():>10.3f}{100 * agree:>12.1f}%"
                  f"{(a - b).abs().max().item():>14.4f}{rate:>9.0f}{pil_rate:>9.0f}")

if __name__ == "__main__":
    main()
