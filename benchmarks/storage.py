"""Bytes per view on disk, everything included, and the codec choice behind kdcache's format.

    python benchmarks/storage.py [--samples 8192] [--epochs 4] [--quick]

Writes real caches with kdcache's own writer (CacheWriter: zarr v3 shards, ledger, manifest,
plan) filled with structured synthetic 1000-class logits (benchmarks/logits.py) and ImageNet-like
crop parameters (image sizes around 500x375), for several codecs and k, and prints tables:
(1) codec comparison at k=10, (2) kdcache's bytes per view at k in {5, 10, 20, 100} next to the
record layouts of TinyViT and FKD for the same views.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from logits import synthetic_logits  # noqa: E402

from kdcache.augment import param_fields, preset, sample_view_params
from kdcache.format import (COMPRESSION, FORMAT_VERSION, BlockLayout, CacheWriter, DatasetInfo, Manifest,
                            TeacherInfo, library_versions, now_iso, record_dtypes)
from kdcache.location import Location
from kdcache.record import TAIL_BETAS, TEMPERATURE_RANGE, make_records
from kdcache.replay import replay_fingerprint

CODECS = {
    "blosc-zstd5-shuffle": {"codec": "blosc", "cname": "zstd", "clevel": 5, "shuffle": "shuffle"},
    "blosc-zstd9-bitshuffle": {"codec": "blosc", "cname": "zstd", "clevel": 9, "shuffle": "bitshuffle"},
    "blosc-zstd5-bitshuffle": {"codec": "blosc", "cname": "zstd", "clevel": 5, "shuffle": "bitshuffle"},
    "blosc-zstd9-shuffle": {"codec": "blosc", "cname": "zstd", "clevel": 9, "shuffle": "shuffle"},
    "blosc-lz4-shuffle": {"codec": "blosc", "cname": "lz4", "clevel": 5, "shuffle": "shuffle"},
    "zstd3": {"codec": "zstd", "clevel": 3},
    "zstd19": {"codec": "zstd", "clevel": 19},
}


def make_cache(path: Path, logits: np.ndarray, k: int, compression: dict, block: int, augmentation: str) -> dict:
    epochs, n, classes = logits.shape
    spec = preset(augmentation, output_size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    sizes = [min(block, n - s) for s in range(0, n, block)]
    layout = BlockLayout(kind="permutation", block_capacity=block, blocks_per_unit=8, sizes=sizes, permutation_seed=0)
    rng = np.random.default_rng(1)
    image_sizes = [(int(rng.integers(300, 500)), int(rng.integers(375, 640))) for _ in range(n)]
    plan = {
        "source_index": np.arange(layout.num_slots, dtype=np.int64),
        "label": np.zeros(layout.num_slots, dtype=np.int32),
        "digest": rng.integers(0, 2**63, size=layout.num_slots).astype(np.uint64),
        "key": np.array([f"n{i:08d}" for i in range(layout.num_slots)]),
    }
    teacher = TeacherInfo(name="synthetic", source="timm", checkpoint=None, weights_sha256="0" * 64, num_classes=classes,
                          class_names=[str(i) for i in range(classes)], input_size=[3, 224, 224], interpolation="bicubic",
                          mean=list(spec.mean), std=list(spec.std))
    manifest = Manifest(
        format_version=FORMAT_VERSION, tool_version="bench", created=now_iso(), command="benchmarks/storage.py",
        teacher=teacher, dataset=DatasetInfo(kind="synthetic", uri="synthetic", split="train", num_samples=n,
                                             num_classes=classes, class_names=teacher.class_names, digest="0" * 64),
        augmentation=spec.to_dict(), seed=0, epochs=epochs, k=k, dtypes=record_dtypes(classes),
        tail={"betas": list(TAIL_BETAS), "temperature_range": list(TEMPERATURE_RANGE)},
        param_fields=list(param_fields(spec)), replay=replay_fingerprint("pil"), blocks=layout,
        libraries=library_versions(), compression={name: compression for name in ("values", "indices", "tail", "params")},
    )
    writer = CacheWriter.create(path, manifest, plan)
    fixed = Location(path).size()
    per_array = {name: 0 for name in ("values", "indices", "tail", "params", "ledger")}
    for e in range(epochs):
        for unit in range(layout.num_units):
            rows = len(layout.unit_blocks(unit)) * block
            arrays = {
                "values": np.zeros((rows, k), np.float16), "indices": np.zeros((rows, k), record_dtypes(classes)["indices"]),
                "tail": np.zeros((rows, 2), np.float16), "params": np.zeros((rows, len(manifest.param_fields)), np.float32),
            }
            for b in layout.unit_blocks(unit):
                off = (b - layout.unit_blocks(unit).start) * block
                lo = b * block
                size = sizes[b]
                values, indices, tail = make_records(torch.from_numpy(logits[e, lo : lo + size]), k)
                arrays["values"][off : off + size] = values.numpy()
                arrays["indices"][off : off + size] = indices.numpy()
                arrays["tail"][off : off + size] = tail.numpy()
                arrays["params"][off : off + size] = sample_view_params(
                    spec, seed=0, epoch=e, block_id=b, sample_ids=np.arange(lo, lo + size), image_sizes=image_sizes[lo : lo + size])
            entry = writer.write_unit(e, unit, arrays)
            for key, info in entry.files.items():
                per_array[key.split("/")[0]] += info["bytes"]
    total = Location(path).size()
    per_array["ledger"] = sum(p.stat().st_size for p in (path / "ledger").iterdir())
    views = epochs * n
    return {"views": views, "total": total, "fixed": fixed, "per_array": per_array,
            "per_view": {name: value / views for name, value in per_array.items()},
            "bytes_per_view": total / views, "marginal_per_view": (total - fixed) / views,
            "files": sum(1 for p in path.rglob("*") if p.is_file())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--augmentation", default="light")
    parser.add_argument("--quick", action="store_true", help="CI size: fewer samples, fewer codecs")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    args = parser.parse_args()
    if args.quick:
        args.samples, args.epochs = 2048, 2
    logits = synthetic_logits(args.samples, 1000, epochs=args.epochs)
    results = {"codecs": {}, "k": {}}
    codecs = CODECS if not args.quick else {k: CODECS[k] for k in ("blosc-zstd9-shuffle", "zstd3")}
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{args.samples} samples x {args.epochs} epochs, C=1000, '{args.augmentation}' parameters, blocks of {args.block}")
        print("\n(1) codec, k=10: bytes per view by array (values, indices, tail, params, ledger) and in all")
        print(f"{'codec':<24}{'values':>8}{'indices':>8}{'tail':>6}{'params':>8}{'ledger':>8}{'all':>8}")
        for name, codec in codecs.items():
            r = make_cache(Path(tmp) / name, logits, 10, codec, args.block, args.augmentation)
            pv = r["per_view"]
            print(f"{name:<24}{pv['values']:>8.2f}{pv['indices']:>8.2f}{pv['tail']:>6.2f}{pv['params']:>8.2f}"
                  f"{pv['ledger']:>8.2f}{r['bytes_per_view']:>8.2f}")
            results["codecs"][name] = r
        print(f"\n(2) kdcache ({_codec_name()}) vs the record layouts of TinyViT and FKD, bytes per view, C=1000")
        print(f"{'k':>4}{'kdcache all':>13}{'kdcache marginal':>18}{'TinyViT':>9}{'TinyViT+keys':>14}{'FKD':>6}")
        for k in (5, 10, 20, 100):
            r = make_cache(Path(tmp) / f"k{k}", logits, k, COMPRESSION["values"], args.block, args.augmentation)
            tinyvit = 4 + 2 * k + 2 * k
            fkd = 4 * 4 + 1 + 4 * k + 4 * k  # box (4 float32), flip, top-k values and indices as float32
            print(f"{k:>4}{r['bytes_per_view']:>13.2f}{r['marginal_per_view']:>18.2f}{tinyvit:>9}{tinyvit + 14:>14}{fkd:>6}")
            results["k"][k] = r
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))


def _codec_name() -> str:
    c = COMPRESSION["values"]
    return f"{c['codec']}-{c.get('cname', '')}{c['clevel']}-{c.get('shuffle', '')}"


if __name__ == "__main__":
    main()
