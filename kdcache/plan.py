"""Blocks and the plan: which sample sits in which slot of a cache.

A *block* is the unit of streaming: a webdataset tar shard, or a fixed slice of an indexable
source after a seeded permutation. The plan (per slot: source index, label, digest, key) is
made once when a cache is created and stored in it; every later read of a block checks the
samples' digests against it, so a cache refuses a different dataset and names the first sample
that differs.
"""

from __future__ import annotations

import hashlib

import numpy as np

from kdcache.errors import ConfigError, MismatchError, SourceError
from kdcache.format import BlockLayout, DatasetInfo
from kdcache.sources import Sample, Source, check_image_header


def plan_layout(source: Source, *, block_size: int, blocks_per_unit: int, seed: int) -> tuple[BlockLayout, list[np.ndarray]]:
    """The block layout and each block's member source indices, in block order."""
    if block_size < 1 or blocks_per_unit < 1:
        raise ConfigError(f"--block-size {block_size} and --blocks-per-unit {blocks_per_unit}; expected positive integers")
    shards = source.shards()
    if shards is not None:
        members, start = [], 0
        for url, size in shards:
            if size == 0:  # a block is never empty: the plan would have a hole that no later run can fill
                raise SourceError(f"webdataset shard '{url}' holds no samples; leave it out of the shard pattern")
            members.append(np.arange(start, start + size, dtype=np.int64))
            start += size
        sizes = [len(m) for m in members]
        layout = BlockLayout(kind="shards", block_capacity=max(sizes), blocks_per_unit=blocks_per_unit, sizes=sizes)
        return layout, members
    order = np.random.Generator(np.random.Philox(np.random.SeedSequence([seed, 0x626C6F636B]))).permutation(len(source))
    members = [order[i : i + block_size].astype(np.int64) for i in range(0, len(order), block_size)]
    sizes = [len(m) for m in members]
    layout = BlockLayout(
        kind="permutation", block_capacity=block_size, blocks_per_unit=blocks_per_unit, sizes=sizes, permutation_seed=seed
    )
    return layout, members


def read_block(source: Source, layout: BlockLayout, block: int, members: np.ndarray) -> list[Sample]:
    """The samples of one block, in block order (one sequential read for a tar shard)."""
    if layout.kind == "shards":
        return source.read_shard(block)
    return source.read([int(i) for i in members])


def scan_plan(source: Source, layout: BlockLayout, members: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Read every sample once: per slot source index (-1 padding), label, digest and key.

    Each sample's bytes must at least look like an image (its header), so a cache is never made
    around a file that is not one.
    """
    slots = layout.num_slots
    plan = {
        "source_index": np.full(slots, -1, dtype=np.int64),
        "label": np.full(slots, -1, dtype=np.int32),
        "digest": np.zeros(slots, dtype=np.uint64),
        "key": np.full(slots, "", dtype=object),
    }
    for block, block_members in enumerate(members):
        where = layout.block_slots(block)
        samples = read_block(source, layout, block, block_members)
        for sample in samples:
            check_image_header(sample)
        plan["source_index"][where] = block_members
        plan["label"][where] = [s.label for s in samples]
        plan["digest"][where] = [s.digest for s in samples]
        plan["key"][where] = [s.key for s in samples]
    plan["key"] = plan["key"].astype(str)
    return plan


def dataset_digest(plan: dict[str, np.ndarray]) -> str:
    used = plan["source_index"] >= 0
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(plan["digest"][used]).tobytes())
    digest.update(np.ascontiguousarray(plan["label"][used]).astype(np.int64).tobytes())
    return digest.hexdigest()


def dataset_info(source: Source, plan: dict[str, np.ndarray]) -> DatasetInfo:
    shards = source.shards()
    return DatasetInfo(
        kind=source.kind,
        uri=source.uri,
        split=source.split,
        num_samples=len(source),
        num_classes=source.num_classes,
        class_names=list(source.class_names),
        digest=dataset_digest(plan),
        shards=[[url, int(n)] for url, n in shards] if shards is not None else None,
    )


def check_block(samples: list[Sample], plan: dict[str, np.ndarray], where: slice, *, what: str) -> None:
    """Refuse a block whose samples differ from the plan, naming the first that differs."""
    keys, digests, labels = plan["key"][where], plan["digest"][where], plan["label"][where]
    if len(samples) != len(keys):
        raise MismatchError(f"{what}: the data has {len(samples)} samples in this block, the cache planned {len(keys)}")
    for sample, key, digest, label in zip(samples, keys, digests, labels):
        if sample.key != key or sample.digest != int(digest) or sample.label != int(label):
            raise MismatchError(
                f"{what}: sample {sample.key!r} differs from the cache's dataset (expected key {key!r}, "
                f"label {int(label)}, digest {int(digest):016x}; found label {sample.label}, digest {sample.digest:016x})"
            )
