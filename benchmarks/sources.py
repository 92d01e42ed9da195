"""Parquet against webdataset tar shards: opening a source, planning a cache, one streamed pass.

The same N random 32x32 PNG images (labels 0-9) are written as parquet in the Hugging Face
Hub's layout (5 files, row groups of ``--per-block`` rows) and as tar shards of as many samples.
For each it prints the seconds to open the source and count its samples, the seconds to plan a
cache (:func:`kdcache.plan.plan_layout` and :func:`kdcache.plan.scan_plan`: every sample's key,
label and digest), how many times a block was read while planning, and the samples per second of
one streamed pass. Parquet's counts come from the files' footers, so planning reads each block
once; a tar shard is read once to count it and once to plan it::

    python benchmarks/sources.py              # 5,000 images
    python benchmarks/sources.py --quick      # 500, for CI
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

import kdcache.sources.parquet as parquet
import kdcache.sources.webdataset as webdataset
from kdcache.plan import plan_layout, scan_plan
from kdcache.sources import open_source


def write_data(root: Path, n: int, per_block: int) -> tuple[str, str]:
    rng = np.random.default_rng(0)
    images = []
    for _ in range(n):
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (32, 32, 3)).astype(np.uint8)).save(out, format="PNG")
        images.append(out.getvalue())
    labels = [int(v) for v in rng.integers(0, 10, n)]
    features = {"image": {"_type": "Image"}, "label": {"names": [str(c) for c in range(10)], "_type": "ClassLabel"}}
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("label", pa.int64())],
                       metadata={"huggingface": json.dumps({"info": {"features": features}})})
    (root / "parquet").mkdir()
    (root / "tar").mkdir()
    files = 5
    for f in range(files):
        rows = range(f * n // files, (f + 1) * n // files)
        table = pa.table({"image": [{"bytes": images[i], "path": f"{i:06d}.png"} for i in rows],
                          "label": [labels[i] for i in rows]}, schema=schema)
        pq.write_table(table, root / "parquet" / f"train-{f:05d}-of-{files:05d}.parquet", row_group_size=per_block)
    shards = -(-n // per_block)
    for s in range(shards):
        with tarfile.open(root / "tar" / f"train-{s:04d}.tar", "w") as tar:
            for i in range(s * per_block, min(n, (s + 1) * per_block)):
                for suffix, data in (("png", images[i]), ("cls", str(labels[i]).encode())):
                    info = tarfile.TarInfo(f"{i:06d}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return f"parquet:{root / 'parquet'}", str(root / "tar" / f"train-{{0000..{shards - 1:04d}}}.tar")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--per-block", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="500 images")
    args = parser.parse_args(argv)
    n = 500 if args.quick else args.samples
    reads = {"parquet": 0, "tar": 0}
    read_row_group, tar_groups = parquet.ParquetSource._row_group, webdataset._tar_groups

    def counted_row_group(self, f, g):
        reads["parquet"] += 1
        return read_row_group(self, f, g)

    def counted_tar_groups(url):
        reads["tar"] += 1
        return tar_groups(url)

    parquet.ParquetSource._row_group = counted_row_group
    webdataset._tar_groups = counted_tar_groups
    with tempfile.TemporaryDirectory() as tmp:
        specs = write_data(Path(tmp), n, args.per_block)
        print(f"{n} PNG images of 32x32, {args.per_block} per block (row group or tar shard)")
        print(f"{'source':<8} {'open+count s':>12} {'plan s':>8} {'block reads in planning':>24} {'pass samples/s':>15}")
        for name, spec in zip(("parquet", "tar"), specs):
            start = time.perf_counter()
            source = open_source(spec, num_classes=10)
            count = len(source)
            opened = time.perf_counter()
            layout, members = plan_layout(source, block_size=1024, blocks_per_unit=64, seed=0)
            scan_plan(source, layout, members)
            planned = time.perf_counter()
            planning_reads = reads[name]
            per_block = planning_reads / layout.num_blocks
            start_pass = time.perf_counter()
            streamed = sum(1 for _ in source.iter_samples())
            rate = streamed / (time.perf_counter() - start_pass)
            assert count == streamed == n
            print(f"{name:<8} {opened - start:>12.3f} {planned - opened:>8.3f} "
                  f"{f'{planning_reads} ({per_block:.1f} per block)':>24} {rate:>15.0f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
