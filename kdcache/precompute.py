"""Stage one: run the teacher once per augmentation seed and store every view's teacher record.

``precompute(config)`` plans blocks (or reads the plan of an existing cache), then works
through the uncommitted units (epoch, group of blocks): read and decode each block's samples,
draw the views' augmentation parameters, replay them, run the teacher, keep the top-k logits and
the tail summary, and commit the unit. Under torchrun each rank takes every world-th pending
unit, so ranks never share a shard file; rank 0 alone creates or extends the cache. Preparing
the next block (decode, replay) overlaps the teacher's forward pass on the current one.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdcache import __version__, distributed
from kdcache.augment import param_fields, resolve_spec, sample_view_params
from kdcache.errors import (
    ChecksumError,
    ConfigError,
    FormatError,
    IncompleteCacheError,
    KdcacheError,
    MismatchError,
    SourceError,
    WriteError,
    describe_os_error,
)
from kdcache.format import (
    COMPRESSION,
    FORMAT_VERSION,
    RECORD_ARRAYS,
    Cache,
    CacheWriter,
    Manifest,
    parse_ledger,
    check_compatible,
    ledger_key,
    library_versions,
    now_iso,
    read_manifest,
    record_dtypes,
    shard_key,
)
from kdcache.location import Location
from kdcache.plan import check_block, dataset_info, plan_layout, read_block, scan_plan
from kdcache.record import TAIL_BETAS, TEMPERATURE_RANGE, make_records
from kdcache.replay import replay_fingerprint, replay_pending
from kdcache.sources import Source, decode_sample, open_source
from kdcache.teacher import TeacherConfig, load_teacher, teacher_logits


@dataclass(frozen=True, kw_only=True)
class PrecomputeConfig:
    data: str
    output: str
    teacher: TeacherConfig
    split: str = "train"
    augmentation: str = "light"
    epochs: int = 1
    seed: int = 0
    topk: int | str = 10
    block_size: int = 1024
    blocks_per_unit: int = 64
    batch_size: int = 256
    replay_path: str = "pil"
    workers: int = 0
    resume: bool = False
    repair: bool = False
    max_units: int | None = None
    from_epoch: int = 0  # compute only epochs [from_epoch, epochs): a job's share of an epoch range (see `kdcache merge`)
    command: str = ""

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"--epochs {self.epochs}; expected at least 1")
        if not 0 <= self.from_epoch < self.epochs:
            raise ConfigError(f"--from-epoch {self.from_epoch}; expected 0 <= from-epoch < --epochs {self.epochs}")
        if self.workers < 0:
            raise ConfigError(f"--workers {self.workers}; expected 0 or more")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size {self.batch_size}; expected a positive integer")
        if not (self.topk == "full" or (isinstance(self.topk, int) and self.topk >= 1)):
            raise ConfigError(f"--topk {self.topk!r}; expected a positive integer or 'full'")
        if self.repair and not self.resume:
            raise ConfigError("--repair works on an existing cache; pass it together with --resume")


@dataclass
class PrecomputeResult:
    output: str
    units_done: int
    units_skipped: int
    views: int
    seconds: float
    epochs_complete: list[int]

    @property
    def views_per_second(self) -> float:
        return self.views / self.seconds if self.seconds else 0.0


def _resolve_k(topk: int | str, num_classes: int) -> int:
    if topk == "full":
        return num_classes
    if topk > num_classes:
        raise ConfigError(f"--topk {topk} exceeds the teacher's {num_classes} classes; use --topk full to keep all logits")
    return int(topk)


def build_manifest(config: PrecomputeConfig, source: Source, teacher_info, plan, layout, spec) -> Manifest:
    k = _resolve_k(config.topk, teacher_info.num_classes)
    return Manifest(
        format_version=FORMAT_VERSION,
        tool_version=__version__,
        created=now_iso(),
        command=config.command or " ".join(sys.argv),
        teacher=teacher_info,
        dataset=dataset_info(source, plan),
        augmentation=spec.to_dict(),
        seed=config.seed,
        epochs=config.epochs,
        k=k,
        dtypes=record_dtypes(teacher_info.num_classes),
        tail={"betas": list(TAIL_BETAS), "temperature_range": list(TEMPERATURE_RANGE)},
        param_fields=list(param_fields(spec)),
        replay=replay_fingerprint(config.replay_path),
        blocks=layout,
        libraries=library_versions(),
        compression=COMPRESSION,
        batch_size=config.batch_size,
    )


def _prepare_output(config, source, teacher_info, spec, log) -> None:
    """Rank 0: create the cache, or check and extend an existing one. Nothing is overwritten on error."""
    out = Path(config.output)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {out} exists and is not a directory")
    exists = out.is_dir() and any(out.iterdir())
    if exists and not (out / "zarr.json").exists():
        raise ConfigError(f"output {out} exists and is not a kdcache cache; choose a new directory")
    if exists:
        read_manifest(Location(out))  # damaged, edited or of another format version: a FormatError naming it
    layout, members = plan_layout(source, block_size=config.block_size, blocks_per_unit=config.blocks_per_unit, seed=config.seed)
    if not exists:
        log(f"planning {len(source)} samples in {layout.num_blocks} blocks ({layout.num_units} units per epoch)")
        plan = scan_plan(source, layout, members)
        CacheWriter.create(out, build_manifest(config, source, teacher_info, plan, layout, spec), plan, log=log)
        return
    if not config.resume:
        raise ConfigError(f"output {out} is already a kdcache cache; pass --resume to finish or extend it")
    if config.repair:
        _drop_malformed_ledger_entries(out, log)
    cache = Cache(out, verify_checksums=False)  # refuses array metadata that disagrees with the manifest
    if cache.subset is not None:
        raise ConfigError(f"{out} is a subset exported from {cache.subset.source}; resume or extend that cache "
                          "and export again")
    existing = cache.manifest
    plan = cache.samples()
    wanted = dataclasses.replace(
        build_manifest(config, source, teacher_info, plan, layout, spec),
        dataset=existing.dataset if existing.dataset.num_samples == len(source) else dataset_info(source, plan),
    )
    check_compatible(existing, wanted)
    first = existing.blocks
    check_block(read_block(source, first, 0, plan["source_index"][first.block_slots(0)]), plan, first.block_slots(0),
                what=f"data {config.data}")
    writer = CacheWriter(out)
    if config.epochs > existing.epochs:
        log(f"extending {out} from {existing.epochs} to {config.epochs} epochs")
        writer.extend_epochs(config.epochs)
    if config.repair:
        _repair(cache, writer, log)


def _drop_malformed_ledger_entries(out: Path, log) -> None:
    """--repair: a ledger entry that cannot be read (damaged on disk) makes its unit uncommitted."""
    location = Location(out)
    manifest = read_manifest(location)
    for epoch in range(manifest.epochs):
        for unit in range(manifest.blocks.num_units):
            key = ledger_key(epoch, unit)
            if not (out / key).exists():
                continue
            try:
                parse_ledger(location, key.split("/", 1)[1])
            except FormatError as exc:
                log(f"repair: {exc}")
                (out / key).unlink()


def _repair(cache: Cache, writer: CacheWriter, log) -> None:
    """Re-hash every committed unit; a damaged one is uncommitted (and recomputed by this run)."""
    damaged = []
    for epoch, unit in sorted(cache.ledger):
        try:
            cache.verify_unit(epoch, unit)
        except (ChecksumError, IncompleteCacheError) as exc:
            damaged.append((epoch, unit))
            log(f"repair: {exc}")
            writer.uncommit(epoch, unit)
    log(f"repair: {len(damaged)} damaged unit(s) will be recomputed")


def _discard_uncommitted_files(writer: CacheWriter, epoch: int, unit: int) -> None:
    """Remove what an earlier, interrupted or damaged write of an uncommitted unit left in its shard files.

    zarr merges a write into the shard file already there, so a torn or damaged one would make
    the rewrite fail; an uncommitted unit's files hold nothing a reader may use.
    """
    for array in RECORD_ARRAYS:
        (writer.path / shard_key(array, epoch, unit)).unlink(missing_ok=True)


class _BlockPreparer(torch.utils.data.Dataset):
    """Reads, checks, decodes and replays blocks: item ``i`` is job ``i`` = (epoch, block).

    A map-style dataset so that a DataLoader can prepare blocks in worker processes (in order)
    while the teacher scores the current one; it holds no model and pickles cheaply.
    """

    def __init__(self, config, source, manifest: Manifest, plan, jobs: list[tuple[int, int]]):
        self.data, self.source, self.manifest, self.plan, self.jobs = config.data, source, manifest, plan, jobs
        self.layout = manifest.blocks
        self.spec = manifest.spec()

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, index: int):
        epoch, block = self.jobs[index]
        where = self.layout.block_slots(block)
        members = self.plan["source_index"][where]
        samples = read_block(self.source, self.layout, block, members)
        check_block(samples, self.plan, where, what=f"data {self.data} (epoch {epoch} block {block})")
        try:
            images = [decode_sample(s) for s in samples]
        except SourceError as exc:  # the units committed so far stay; the plan cannot change to leave it out
            raise SourceError(f"data {self.data} (epoch {epoch} block {block}): {exc}; the cache's plan holds this "
                              "sample, so a cache without it must be created anew") from None
        params = sample_view_params(
            self.spec, seed=self.manifest.seed, epoch=epoch, block_id=block, sample_ids=members,
            image_sizes=[(img.height, img.width) for img in images],
        )
        return replay_pending(self.spec, params, images, path=self.manifest.replay["path"]), params


def _unit_arrays(manifest: Manifest, unit: int) -> dict[str, np.ndarray]:
    layout = manifest.blocks
    rows = len(layout.unit_blocks(unit)) * layout.block_capacity
    k = manifest.k
    return {
        "values": np.zeros((rows, k), dtype=manifest.dtypes["values"]),
        "indices": np.zeros((rows, k), dtype=manifest.dtypes["indices"]),
        "tail": np.zeros((rows, 2), dtype=manifest.dtypes["tail"]),
        "params": np.zeros((rows, len(manifest.param_fields)), dtype=manifest.dtypes["params"]),
    }


def precompute(config: PrecomputeConfig, *, log=print) -> PrecomputeResult:
    """Create (or resume, or extend) a cache. Returns what this rank did."""
    device = distributed.resolve_device("auto", distributed.ranks_from_env())
    ranks = distributed.init(device)
    source = open_source(config.data, split=config.split)
    teacher, teacher_info = load_teacher(
        dataclasses.replace(config.teacher, device=str(device)), class_names=list(source.class_names)
    )
    if source.num_classes != teacher_info.num_classes:
        if source.shards() is not None:  # a label beyond the teacher's classes: name its sample
            open_source(config.data, split=config.split, num_classes=teacher_info.num_classes).shards()
        raise MismatchError(
            f"data {config.data} has {source.num_classes} classes but the teacher has {teacher_info.num_classes}"
        )
    _resolve_k(config.topk, teacher_info.num_classes)
    spec = resolve_spec(
        config.augmentation, output_size=teacher_info.input_size[-1], mean=teacher_info.mean, std=teacher_info.std,
        interpolation=teacher_info.interpolation,
    )
    if len(source) == 0:
        raise ConfigError(f"data {config.data} contains no samples")
    failure: BaseException | None = None
    if ranks.main:
        try:
            try:
                _prepare_output(config, source, teacher_info, spec, log)
            except OSError as exc:
                raise WriteError(f"cannot write the cache {config.output}: {describe_os_error(exc)}; no unit was "
                                 "computed: free space, then run the same command (with --resume if the cache exists)") from None
        except KdcacheError as exc:
            failure = exc
    message = distributed.broadcast_object(None if failure is None else str(failure))
    if failure is not None:
        raise failure
    if message is not None:
        raise ConfigError(f"rank 0 could not prepare {config.output}: {message}")
    writer = CacheWriter(config.output)
    manifest = writer.manifest
    cache = Cache(config.output, verify_checksums=False)
    plan = cache.samples()
    committed = set(cache.ledger)
    layout = manifest.blocks
    pending = [(e, u) for e in range(config.from_epoch, manifest.epochs) for u in range(layout.num_units)
               if (e, u) not in committed]
    mine = pending[ranks.rank :: ranks.world]
    if config.max_units is not None:
        mine = mine[: config.max_units]
    if ranks.main:
        log(f"{len(committed)} unit(s) already committed, {len(pending)} to compute on {ranks.world} rank(s)")
    start = time.perf_counter()
    views_done = _run_units(config, source, teacher, device, manifest, plan, writer, mine, log)
    seconds = time.perf_counter() - start
    distributed.barrier()
    cache.refresh()
    return PrecomputeResult(
        output=str(config.output), units_done=len(mine), units_skipped=len(committed), views=views_done,
        seconds=seconds, epochs_complete=cache.complete_epochs(),
    )


def _run_units(config, source, teacher, device, manifest: Manifest, plan, writer: CacheWriter, units, log) -> int:
    """Compute and commit ``units``; blocks are prepared ahead (a thread, or ``workers`` processes)."""
    layout = manifest.blocks
    jobs = [(e, u, b) for e, u in units for b in layout.unit_blocks(u)]
    preparer = _BlockPreparer(config, source, manifest, plan, [(e, b) for e, _, b in jobs])
    views_done = 0
    arrays, current = None, None
    spec = manifest.spec()
    overlap = torch.device(device).type == "cuda"
    for (epoch, unit, block), (pending, params) in zip(jobs, _prepared(preparer, config.workers, overlap=overlap)):
        views = pending.materialize(spec, device)  # normalise, erase and mix where the teacher runs
        if current != (epoch, unit):
            arrays, current = _unit_arrays(manifest, unit), (epoch, unit)
        logits = torch.cat([teacher_logits(teacher, views[i : i + config.batch_size], device)
                            for i in range(0, len(views), config.batch_size)]).cpu()
        values, indices, tail = make_records(logits, manifest.k)
        offset = (block - layout.unit_blocks(unit).start) * layout.block_capacity
        rows = slice(offset, offset + len(views))
        arrays["values"][rows] = values.numpy()
        arrays["indices"][rows] = indices.numpy().astype(arrays["indices"].dtype)
        arrays["tail"][rows] = tail.numpy()
        arrays["params"][rows] = np.asarray(params)
        views_done += len(views)
        if block == layout.unit_blocks(unit)[-1]:
            try:
                _discard_uncommitted_files(writer, epoch, unit)
                writer.write_unit(epoch, unit, arrays)
            except OSError as exc:
                raise WriteError(f"cannot write epoch {epoch} unit {unit} of {config.output}: {describe_os_error(exc)}; "
                                 "the units committed before it are kept: free space, then resume with "
                                 "kdcache precompute-logits --resume") from None
            log(f"committed epoch {epoch} unit {unit} ({views_done} views so far)")
    return views_done


def _prepared(preparer: _BlockPreparer, workers: int, *, overlap: bool):
    """Prepared blocks in job order: through a DataLoader with worker processes, two ahead in a
    thread (``overlap``: the teacher runs on a GPU), or inline (a CPU teacher already uses every
    core; a preparing thread beside it only makes its threads wait)."""
    if workers == 0 and not overlap:
        for i in range(len(preparer)):
            yield preparer[i]
        return
    if workers > 0:
        loader = torch.utils.data.DataLoader(preparer, batch_size=None, shuffle=False, num_workers=workers,
                                             prefetch_factor=2, pin_memory=torch.cuda.is_available())
        yield from loader
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        ahead = [pool.submit(preparer.__getitem__, i) for i in range(min(2, len(preparer)))]
        for i in range(len(preparer)):
            if i + 2 < len(preparer):
                ahead.append(pool.submit(preparer.__getitem__, i + 2))
            yield ahead[i].result()
            ahead[i] = None
