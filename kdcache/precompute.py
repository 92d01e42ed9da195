"""Stage one: run the teacher once per augmentation seed and store every view's teacher record.

``precompute(config)`` plans blocks (or reads the plan of an existing cache), then works
through the uncommitted units (epoch, group of blocks): claim the unit, read and decode each
block's samples, draw the views' augmentation parameters, replay them, run the teacher, keep the
top-k logits and the tail summary, commit the unit and release its claim. Any number of ranks
(torchrun) and independent jobs share one cache through the claims (kdcache.format.claims): a
unit is computed only by the live process holding its claim, and the claims of dead processes
are taken over. Rank 0 of a job alone creates or extends the cache. Preparing the next block
(decode, replay) overlaps the teacher's forward pass on the current one.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdcache import __version__, distributed
from kdcache.ahead import on_stream, run_ahead, wait_for
from kdcache.augment import cache_spec, param_fields, resolve_spec, sample_view_params
from kdcache.cpu import thread_note
from kdcache.errors import (
    ChecksumError,
    ConfigError,
    FormatError,
    IncompleteCacheError,
    KdcacheError,
    MismatchError,
    SourceError,
    UnfinishedCacheError,
    WriteError,
    describe_os_error,
)
from kdcache.format import (
    COMPRESSION,
    record_format_version,
    RECORD_ARRAYS,
    LEDGER_DIR,
    Cache,
    CacheWriter,
    Claims,
    CreatedElsewhere,
    Manifest,
    parse_ledger,
    check_compatible,
    ledger_key,
    library_versions,
    now_iso,
    read_manifest,
    record_dtypes,
    record_width,
    unit_claim,
)
from kdcache.format.claims import DEFAULT_LEASE
from kdcache.location import Location
from kdcache.plan import check_block, dataset_info, plan_layout, read_block, scan_plan
from kdcache.record import DEFAULT_TAIL, MIN_CODED_TAIL, V1_TAIL, TailSpec, code_check, encode_basis, fit_tail_basis, make_records, record_basis, \
    tail_spec_of, view_uniforms
from kdcache.replay import EncodedImages, PendingViews, replay_fingerprint, replay_pending
from kdcache.sources import Source, decode_sample, open_source
from kdcache.teacher import TeacherConfig, load_teacher, teacher_logits, to_channels_last


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
    lease_seconds: float = DEFAULT_LEASE  # how long another machine's claim stays valid without renewal
    tail_rank: int | None = None  # the tail code's rank (None: the default record, or the cache's on --resume)
    tail_samples: int | None = None  # tail classes sampled per view (None: the default record, or the cache's)
    command: str = ""

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"--epochs {self.epochs}; expected at least 1")
        if not 0 <= self.from_epoch < self.epochs:
            raise ConfigError(f"--from-epoch {self.from_epoch}; expected 0 <= from-epoch < --epochs {self.epochs}")
        if self.max_units is not None and self.max_units < 0:
            raise ConfigError(f"--max-units {self.max_units}; expected 0 or more")
        if self.workers < 0:
            raise ConfigError(f"--workers {self.workers}; expected 0 or more")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size {self.batch_size}; expected a positive integer")
        if not (self.topk == "full" or (isinstance(self.topk, int) and self.topk >= 1)):
            raise ConfigError(f"--topk {self.topk!r}; expected a positive integer or 'full'")
        if not self.lease_seconds > 0:
            raise ConfigError(f"--lease {self.lease_seconds}; expected a positive number of seconds")
        if self.repair and not self.resume:
            raise ConfigError("--repair works on an existing cache; pass it together with --resume")
        check_tail_options(self.tail_rank, self.tail_samples)

    def tail_spec(self, k: int, num_classes: int) -> TailSpec:
        """The record this run asks for: the default's, with --tail-rank and --tail-samples applied (:func:`record_tail_spec`)."""
        return record_tail_spec(self.tail_rank, self.tail_samples, k, num_classes)

    @property
    def tail_asked(self) -> bool:
        return self.tail_rank is not None or self.tail_samples is not None

    def finishing_command(self) -> str:
        """The command that finishes the cache: this one, with --resume."""
        command = self.command or "kdcache precompute-logits"
        return command if " --resume" in f"{command} " else f"{command} --resume"


def check_tail_options(tail_rank: int | None, tail_samples: int | None) -> None:
    """Refuse a --tail-rank or --tail-samples that is not a whole number >= 0 (None: not given)."""
    for name, value in (("--tail-rank", tail_rank), ("--tail-samples", tail_samples)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ConfigError(f"{name} {value!r}; expected a whole number >= 0")


def record_tail_spec(tail_rank: int | None, tail_samples: int | None, k: int, num_classes: int) -> TailSpec:
    """The record a run asks for with ``--tail-rank`` and ``--tail-samples`` (None: not given) for k of C classes:
    the default record's, with those applied (precompute-logits and add-teacher alike).

    The default code has rank 40 where the tail has over 80 classes, half the tail (rounded
    down, less one) where it has 41 to 80, and none below.
    """
    if tail_rank == 0 and tail_samples in (None, 0):
        return V1_TAIL
    spec = dataclasses.replace(DEFAULT_TAIL, **{name: value for name, value in
                                                (("rank", tail_rank), ("samples", tail_samples)) if value is not None})
    if tail_rank is None and MIN_CODED_TAIL < num_classes - k <= 2 * spec.rank:
        spec = dataclasses.replace(spec, rank=(num_classes - k - 1) // 2)  # the default rank, fitted to a smaller tail
    if tail_rank and num_classes - k <= 2 * tail_rank:
        raise ConfigError(f"--tail-rank {tail_rank} needs more than {2 * tail_rank} classes outside the top {k}; "
                          f"the teacher has {num_classes - k}: use --tail-rank 0 or --topk full")
    if spec.samples and spec.samples >= num_classes - k:
        raise ConfigError(f"--tail-samples {spec.samples}: the tail has only {num_classes - k} classes outside the "
                          f"top {k}; use --topk full to keep every logit")
    return spec.for_classes(k, num_classes)


@dataclass
class PrecomputeResult:
    output: str
    units_done: int
    units_skipped: int
    views: int
    seconds: float
    epochs_complete: list[int]
    unheld: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # uncommitted, no live writer holds them
    held_elsewhere: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # uncommitted, held by live writers
    taken_over: int = 0  # units this process computed again because their writer died holding them
    decoded: dict = dataclasses.field(default_factory=dict)  # the device path: images decoded per place ("device", "host png RGB")

    @property
    def views_per_second(self) -> float:
        return self.views / self.seconds if self.seconds else 0.0


def prepare_on_rank0(ranks, prepare, *, where: str) -> None:
    """Run ``prepare()`` on rank 0 only, then on every rank raise what it raised (other ranks: one ConfigError line).

    Rank 0 creates or checks the output before any rank claims a unit; the other ranks wait at
    the broadcast, so none of them starts on an output that rank 0 refused.
    """
    failure: KdcacheError | None = None
    if ranks.main:
        try:
            prepare()
        except KdcacheError as exc:
            failure = exc
    message = distributed.broadcast_object(None if failure is None else str(failure))
    if failure is not None:
        raise failure
    if message is not None:
        raise ConfigError(f"rank 0 could not prepare {where}: {message}")


def resolve_k(topk: int | str, num_classes: int, *, log=None) -> int:
    """The k that ``--topk`` asks for with a teacher of ``num_classes`` classes: ``full``, or any k of at
    least the class count, keeps all of them (``log`` says so)."""
    if topk == "full":
        return num_classes
    if topk >= num_classes:
        if log is not None and topk > num_classes:
            log(f"--topk {topk} is more than the teacher's {num_classes} classes: storing all {num_classes} logits of "
                "each view (as --topk full)")
        return num_classes
    return int(topk)


def run_fingerprint(path: str, device) -> dict:
    """The manifest's ``replay``: the replay fingerprint, and on CUDA that the teacher ran channels-last."""
    fingerprint = replay_fingerprint(path, device)
    if torch.device(device).type == "cuda":
        fingerprint["teacher_channels_last"] = True  # verify runs it the same way, so its values agree
    return fingerprint


def build_manifest(config: PrecomputeConfig, source: Source, teacher_info, plan, layout, spec, device="cpu") -> Manifest:
    k = resolve_k(config.topk, teacher_info.num_classes)
    tail = config.tail_spec(k, teacher_info.num_classes).to_json()
    return Manifest(
        format_version=record_format_version(tail),
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
        tail=tail,
        param_fields=list(param_fields(spec)),
        replay=run_fingerprint(config.replay_path, device),
        blocks=layout,
        libraries=library_versions(),
        compression=COMPRESSION,
        batch_size=config.batch_size,
    )


def _recorded_teacher(config):
    """The teacher of the cache a ``--resume`` extends (its Hub revision is the one to load), else None."""
    if not config.resume or not (Path(config.output) / "zarr.json").is_file():
        return None
    try:
        return read_manifest(Location(config.output)).teacher
    except KdcacheError:  # damaged or of another format: _prepare_output names it
        return None


#: Views of epoch 0 (in block order) whose logits fit the tail code's basis when a cache is created.
CALIBRATION_VIEWS = 4096


def calibrate_tail(config, source, teacher, manifest: Manifest, plan, device, log, *, size: int | None = None,
                   finish=None) -> Manifest:
    """The manifest with its tail code's basis, fitted on the teacher's logits of the first views of epoch 0.

    The views are replayed and scored exactly as their units will be (they are scored again
    there), so the basis is a function of the teacher, the data, the seed and the spec alone.
    ``manifest``: the cache's, or an added teacher's records manifest (kdcache add-teacher), whose
    views are drawn from the same spec and seed and replayed at its ``size`` and normalised by
    ``finish`` (default: the cache's spec).
    """
    spec = tail_spec_of(manifest.tail)
    if not spec.rank:
        return manifest
    preparer = BlockPreparer(config, source, manifest, plan, size=size)
    layout, aug = manifest.blocks, finish if finish is not None else cache_spec(manifest)
    logits = []
    for block in range(layout.num_blocks):
        if sum(len(x) for x in logits) >= CALIBRATION_VIEWS:
            break
        pending, _ = preparer[(0, layout.unit_of(block), block)]
        views = pending.materialize(aug, device, counts=Counter())
        logits += [teacher_logits(teacher, views[i : i + manifest.batch_size], device).cpu()
                   for i in range(0, len(views), manifest.batch_size)]
    logits = torch.cat(logits)[:CALIBRATION_VIEWS]
    if len(logits) <= spec.rank:
        raise ConfigError(f"--tail-rank {spec.rank} needs more than {spec.rank} views to fit its basis; the data has "
                          f"{len(logits)}: use a smaller --tail-rank (or 0)")
    basis = fit_tail_basis(logits, spec.rank, spec.code_levels)
    check = code_check(logits, manifest.k, spec, basis)
    shape = dict(zip(check["temperatures"], check["shape_tv_median"]))
    log(f"tail code: rank {spec.rank}, basis fitted on the teacher's logits of {len(logits)} view(s) of epoch 0; "
        f"the code's shape of their tail is off by {100 * shape[1.0]:.1f}% at T = 1 and {100 * shape[4.0]:.1f}% at T = 4 "
        "(total variation, median)")
    tail = dict(manifest.tail, basis=encode_basis(basis), code_check=check)
    return dataclasses.replace(manifest, tail=tail)


def _prepare_output(config, source, teacher_info, spec, claims: Claims, log, device="cpu", teacher=None) -> None:
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
        manifest = calibrate_tail(config, source, teacher, build_manifest(config, source, teacher_info, plan, layout, spec, device),
                                  plan, device, log)
        try:
            CacheWriter.create(out, manifest, plan, log=log)
            return
        except CreatedElsewhere as exc:
            if not config.resume:
                raise ConfigError(f"{exc}; pass --resume to share its work") from None
            log(f"{exc}: joining it")
    if not config.resume:
        raise ConfigError(f"output {out} is already a kdcache cache; pass --resume to finish or extend it")
    if config.repair:
        drop_malformed_ledger_entries(out, log)
    cache = Cache(out, verify_checksums=False)  # refuses array metadata that disagrees with the manifest
    if cache.subset is not None:
        raise ConfigError(f"{out} is a subset exported from {cache.subset.source}; resume or extend that cache "
                          "and export again")
    existing = cache.manifest
    plan = cache.samples()
    wanted = dataclasses.replace(
        build_manifest(config, source, teacher_info, plan, layout, spec, device),
        dataset=existing.dataset if existing.dataset.num_samples == len(source) else dataset_info(source, plan),
    )
    if not config.tail_asked:  # the record the cache was made with, whatever the default is now
        wanted = dataclasses.replace(wanted, tail=existing.tail)
    check_compatible(existing, wanted)
    first = existing.blocks
    check_block(read_block(source, first, 0, plan["source_index"][first.block_slots(0)]), plan, first.block_slots(0),
                what=f"data {config.data}")
    writer = CacheWriter(out)
    if config.epochs > existing.epochs:
        log(f"extending {out} from {existing.epochs} to {config.epochs} epochs")
        writer.extend_epochs(config.epochs, claims)
    if config.repair:
        repair_units(cache, writer, log)


def drop_malformed_ledger_entries(out: Path, log, *, manifest: Manifest | None = None) -> None:
    """--repair: a ledger entry that cannot be read (damaged on disk) makes its unit uncommitted.

    ``out``: the folder of the ledger (a cache, or an added teacher's group, which passes the ``manifest`` it lacks)."""
    location = Location(out)
    manifest = manifest or read_manifest(location)
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


def repair_units(cache: Cache, writer: CacheWriter, log, *, outcome: str = "will be recomputed") -> None:
    """Re-hash every committed unit of ``cache``; a damaged one is uncommitted by ``writer`` (and recomputed by this run)."""
    damaged = []
    for epoch, unit in sorted(cache.ledger):
        try:
            cache.verify_unit(epoch, unit)
        except (ChecksumError, IncompleteCacheError) as exc:
            damaged.append((epoch, unit))
            log(f"repair: {exc}")
            writer.uncommit(epoch, unit)
    log(f"repair: {len(damaged)} damaged unit(s) {outcome}")


class BlockPreparer:
    """Reads, checks, decodes and replays blocks: item ``(epoch, unit, block)`` is that block's views.

    It holds no model and pickles cheaply, so DataLoader workers can prepare blocks (in order)
    while the teacher scores the current one. The views' parameters are drawn from the spec and
    the seed (:meth:`view_params`; ``kdcache add-teacher`` reads the stored ones instead), and
    replayed at ``size`` (default: the spec's ``output_size``).

    On the ``device`` path a block's images stay encoded (their headers give the sizes the
    parameters need) and are decoded and replayed where the teacher runs, by :meth:`realize`: in
    :meth:`__getitem__` itself when ``device`` is set (in the preparing thread, on a CUDA stream of
    its own, so the next block is decoded and replayed while the teacher scores this one). Worker
    processes get no ``device``: they read the blocks, and the parent process realizes them (in a
    thread, on a GPU) or materialises them. ``counts`` counts where each image was decoded.
    """

    def __init__(self, config, source, manifest: Manifest, plan, *, size: int | None = None):
        self.data, self.source, self.manifest, self.plan, self.size = config.data, source, manifest, plan, size
        self.layout = manifest.blocks
        self.spec = cache_spec(manifest)
        self.path = manifest.replay["path"]
        self.device = None
        self.counts: Counter = Counter()
        self._stream = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_stream"] = None  # a CUDA stream does not pickle
        return state

    def view_params(self, epoch: int, block: int, members: np.ndarray, sizes: list[tuple[int, int]]) -> np.ndarray:
        """The parameters of the block's views, one row per sample in slot order; ``sizes``: the images' (height, width)."""
        return sample_view_params(self.spec, seed=self.manifest.seed, epoch=epoch, block_id=block, sample_ids=members,
                                  image_sizes=sizes)

    def __getitem__(self, job: tuple[int, int, int]):
        epoch, _, block = job
        where = self.layout.block_slots(block)
        members = self.plan["source_index"][where]
        samples = read_block(self.source, self.layout, block, members)
        check_block(samples, self.plan, where, what=f"data {self.data} (epoch {epoch} block {block})")
        try:
            images = EncodedImages(samples) if self.path == "device" else [decode_sample(s) for s in samples]
        except SourceError as exc:  # the units committed so far stay; the plan cannot change to leave it out
            raise SourceError(f"data {self.data} (epoch {epoch} block {block}): {exc}; the cache's plan holds this "
                              "sample, so a cache without it must be created anew") from None
        sizes = images.sizes() if self.path == "device" else [(img.height, img.width) for img in images]
        params = self.view_params(epoch, block, members, sizes)
        pending = replay_pending(self.spec, params, images, path=self.path, size=self.size)
        if self.path == "device" and self.device is not None:
            pending = self.realize(job, pending, self.device)
        return pending, params

    def realize(self, job: tuple[int, int, int], pending: PendingViews, device) -> PendingViews:
        """The device path: job ``(epoch, unit, block)``'s views decoded and replayed on ``device``
        (on CUDA on a stream of this preparer's, with ``pending.ready`` its event)."""
        if pending.base is not None:
            return pending
        where = f"data {self.data} (epoch {job[0]} block {job[2]})"
        device = torch.device(device)
        try:
            if device.type != "cuda":
                return pending.realize(self.spec, device, self.counts)
            if self._stream is None:
                self._stream = torch.cuda.Stream(device)
            realized, ready = on_stream(self._stream, pending.realize, self.spec, device, self.counts)
            realized.ready = ready  # the teacher's stream waits for it (UnitWork.run)
            return realized
        except SourceError as exc:
            raise SourceError(f"{where}: {exc}; the cache's plan holds this sample, so a cache without it must be "
                              "created anew") from None


def _unit_arrays(manifest: Manifest, unit: int, names=RECORD_ARRAYS) -> dict[str, np.ndarray]:
    layout = manifest.blocks
    rows = len(layout.unit_blocks(unit)) * layout.block_capacity
    return {name: np.zeros((rows, record_width(manifest, name)), dtype=manifest.dtypes[name]) for name in names}


def precompute_logits(config: PrecomputeConfig, *, log=print, progress: bool = False,
               stop: threading.Event | None = None) -> PrecomputeResult:
    """Create (or resume, or extend) a cache and compute the units this process can claim.

    Returns what this process did. Raises :class:`UnfinishedCacheError` (with ``result``) when units
    of the planned range are left uncommitted with no live writer holding them: ``max_units``
    reached, ``stop`` set, or a KeyboardInterrupt (Ctrl-C). An error raised
    once units are being claimed carries ``units_computed`` (bad input refused before that does
    not). ``progress``: a bar on a terminal. ``stop``: once set (the CLI sets it on SIGTERM), the
    process stops at the next block boundary, releases its claims and ends as interrupted.
    """
    device = distributed.resolve_device("auto", distributed.ranks_from_env())
    ranks = distributed.init(device)
    source = open_source(config.data, split=config.split)
    teacher, teacher_info = load_teacher(
        dataclasses.replace(config.teacher, device=str(device)), class_names=list(source.class_names), log=log,
        pinned=_recorded_teacher(config),
    )
    if source.num_classes != teacher_info.num_classes:
        if source.shards() is not None:  # a label beyond the teacher's classes: name its sample
            open_source(config.data, split=config.split, num_classes=teacher_info.num_classes).shards()
        raise MismatchError(
            f"data {config.data} has {source.num_classes} classes but the teacher has {teacher_info.num_classes}"
        )
    resolve_k(config.topk, teacher_info.num_classes, log=log if ranks.main else None)
    spec = resolve_spec(
        config.augmentation, output_size=teacher_info.input_size[-1], mean=teacher_info.mean, std=teacher_info.std,
        interpolation=teacher_info.interpolation,
    )
    if len(source) == 0:
        raise ConfigError(f"data {config.data} contains no samples")
    with Claims(config.output, lease_seconds=config.lease_seconds) as claims:
        def prepare() -> None:
            try:
                _prepare_output(config, source, teacher_info, spec, claims, log, device, teacher)
            except OSError as exc:
                raise WriteError(f"cannot write the cache {config.output}: {describe_os_error(exc)}; no unit was "
                                 "computed: free space, then run the same command (with --resume if the cache exists)") from None

        prepare_on_rank0(ranks, prepare, where=config.output)
        work = UnitWork(config, ranks, claims, log, progress, stop)
        interrupted = False
        try:
            work.run(source, teacher, device, BlockPreparer(config, source, work.manifest, work.cache.samples()))
        except KdcacheError as exc:
            exc.units_computed = work.units_done
            raise
        except KeyboardInterrupt:  # Ctrl-C, or ``stop`` set (SIGTERM from a scheduler, through the CLI)
            interrupted = True
    return work.finish(interrupted=interrupted)


class UnitWork:
    """One process's share of the units of a cache (or of an added teacher's group): claim a pending unit,
    score it, commit it, release it; repeat.

    ``writer`` and ``cache`` are where units are committed and how the committed ones are read
    (default: the cache ``config.output``; ``kdcache add-teacher`` passes a group's). ``planned``:
    the units to commit (default: every unit of epochs ``config.from_epoch`` on). ``config`` needs
    ``max_units``, ``batch_size``, ``workers``, ``output`` and ``finishing_command()`` (and
    ``from_epoch`` when ``planned`` is not given).
    """

    def __init__(self, config, ranks, claims: Claims, log, progress: bool, stop: threading.Event | None, *,
                 writer: CacheWriter | None = None, cache: Cache | None = None, planned=None):
        self.config, self.ranks, self.claims, self.log, self.stop = config, ranks, claims, log, stop
        self.writer = writer if writer is not None else CacheWriter(config.output)
        self.manifest = self.writer.manifest
        self.cache = cache if cache is not None else Cache(config.output, verify_checksums=False)
        self.layout = self.manifest.blocks
        self._plan = None  # read on the first block that draws sampled tail classes
        # One snapshot for every rank (rank 0's): it orders the work; the claims decide who does what.
        committed = distributed.broadcast_object(sorted(self.cache.ledger))
        if planned is None:
            planned = [(e, u) for e in range(config.from_epoch, self.manifest.epochs) for u in range(self.layout.num_units)]
        self.planned = list(planned)
        done = set(committed)
        pending = [key for key in self.planned if key not in done]
        mine = pending[ranks.rank :: ranks.world]  # each rank starts on its own share, then helps with the rest
        first = set(mine)
        self.order = mine + [key for key in pending if key not in first]
        self.already = len(self.planned) - len(pending)
        self.units_done = self.views_done = self.units_taken_over = 0
        if ranks.main:
            log(f"{self.already} unit(s) already committed, {len(pending)} to compute; "
                f"{ranks.world} rank(s) here, and any other job on this cache, share them through claims")
            log(f"computing with {thread_note()}")
        self.start = time.perf_counter()
        self.bar = _Progress(self, bar=progress and ranks.main)

    def records(self, logits: torch.Tensor, epoch: int, block: int):
        """The block's teacher records as the manifest's ``tail`` asks: (values, indices, tail) tensors."""
        manifest = self.manifest
        spec = tail_spec_of(manifest.tail)
        uniforms = None
        if spec.samples:
            if self._plan is None:
                self._plan = self.cache.samples()
            members = self._plan["source_index"][self.layout.block_slots(block)]
            uniforms = view_uniforms(manifest.seed, epoch, members)
        return make_records(logits, manifest.k, spec, uniforms=uniforms, basis=record_basis(manifest))

    def _committed(self, epoch: int, unit: int) -> bool:
        return (self.writer.path / ledger_key(epoch, unit)).exists()

    def claimed_units(self):
        """The units this process claims, one at a time as the pipeline asks for them.

        Passes over the uncommitted units until every one left is held by another live writer: a
        unit skipped because a live writer held it is tried again, so units that writer released or
        died with are taken over.
        """
        order = self.order
        while order:
            claimed = False
            for epoch, unit in order:
                if self.config.max_units is not None and self.units_claimed >= self.config.max_units:
                    return
                if self._committed(epoch, unit) or not self.claims.try_claim(unit_claim(epoch, unit)):
                    continue
                if self._committed(epoch, unit):  # committed between the look and the claim
                    self.claims.release(unit_claim(epoch, unit), committed=True)
                    continue
                claimed = True
                self.units_claimed += 1
                self.units_taken_over += self.claims.last_taken_over  # its writer died with it uncommitted: computed again
                yield epoch, unit
            order = [key for key in order if not self._committed(*key)]
            if not claimed and all(self.claims.live_holder(unit_claim(*key)) for key in order):
                return

    def run(self, source, teacher, device, preparer, *, spec=None) -> None:
        """Score the claimed units' blocks: ``preparer[(epoch, unit, block)]`` gives a block's (pending views, params);
        ``spec`` finishes the views where the teacher runs (default: the cache's)."""
        config, manifest, layout = self.config, self.manifest, self.layout
        self.units_claimed = 0
        jobs = ((e, u, b) for e, u in self.claimed_units() for b in layout.unit_blocks(u))
        spec = spec if spec is not None else cache_spec(manifest)
        overlap = torch.device(device).type == "cuda"
        if overlap:
            to_channels_last(teacher)
        if config.workers == 0:  # the device path decodes and replays in this process, a block ahead on a GPU
            preparer.device = device
        self.decoded = preparer.counts
        arrays, current = None, None
        try:
            for (epoch, unit, block), pending, params in _prepared(preparer, jobs, config.workers, device, overlap=overlap):
                if self.stop is not None and self.stop.is_set():  # between blocks: no claim is half made or half released
                    raise KeyboardInterrupt
                if getattr(pending, "ready", None) is not None:  # replayed on the preparing thread's stream
                    wait_for(pending.ready, [pending.base], device)
                views = pending.materialize(spec, device, counts=self.decoded)  # normalise, erase and mix where the teacher runs
                if current != (epoch, unit):
                    arrays, current = _unit_arrays(manifest, unit, self.writer.ARRAYS), (epoch, unit)
                logits = torch.cat([teacher_logits(teacher, views[i : i + config.batch_size], device, channels_last=overlap)
                                    for i in range(0, len(views), config.batch_size)]).cpu()  # one sync per block
                values, indices, tail = self.records(logits, epoch, block)
                offset = (block - layout.unit_blocks(unit).start) * layout.block_capacity
                rows = slice(offset, offset + len(views))
                arrays["values"][rows] = values.numpy()
                arrays["indices"][rows] = indices.numpy().astype(arrays["indices"].dtype)
                arrays["tail"][rows] = tail.numpy()
                if "params" in arrays:
                    arrays["params"][rows] = np.asarray(params)
                self.views_done += len(views)
                if block == layout.unit_blocks(unit)[-1]:
                    self._commit(epoch, unit, arrays)
        finally:
            self.bar.close()

    def _commit(self, epoch: int, unit: int, arrays) -> None:
        key = unit_claim(epoch, unit)
        if not self.claims.still_held(key):  # a lease that lapsed under a stalled process: the files are whole either way
            self.log(f"warning: the claim on epoch {epoch} unit {unit} was taken over; committing this copy too")
        try:
            self.writer.write_unit(epoch, unit, arrays)
            self.writer.write_epoch_index(epoch)  # once every unit of the epoch is committed: its index (else nothing)
        except OSError as exc:
            raise WriteError(f"cannot write epoch {epoch} unit {unit} of {self.writer.path}: {describe_os_error(exc)}; "
                             "the units committed before it are kept: free space, then resume with "
                             f"{self.config.finishing_command()}") from None
        self.claims.release(key, committed=True)
        self.units_done += 1
        self.bar.committed(epoch, unit)

    def finish(self, *, interrupted: bool = False) -> PrecomputeResult:
        seconds = time.perf_counter() - self.start
        if not interrupted:  # an interrupted job's other ranks may be gone: no barrier to wait at
            distributed.barrier()
        self.cache.refresh()
        missing = [key for key in self.planned if key not in self.cache.ledger]
        held = {key: self.claims.live_holder(unit_claim(*key)) for key in missing}
        if any(holder is None for holder in held.values()):
            # A writer commits a unit before it releases the claim, so a unit uncommitted at the first look whose claim
            # was gone at the second may have been committed in between: the ledger read after the claims is exact.
            self.cache.refresh()
            missing = [key for key in missing if key not in self.cache.ledger]
            held = {key: held[key] for key in missing}
        self.claims.forget(unit_claim(*key) for key in self.cache.ledger)  # what killed writers left on committed units
        for epoch in sorted(set(self.cache.complete_epochs()) - set(self.cache.indexed_epochs())):
            self.writer.write_epoch_index(epoch)  # its last unit's writer was killed before indexing it
        result = PrecomputeResult(
            output=str(self.config.output), units_done=self.units_done, units_skipped=self.already, views=self.views_done,
            seconds=seconds, epochs_complete=self.cache.complete_epochs(),
            unheld=[key for key in missing if held[key] is None], taken_over=self.units_taken_over,
            held_elsewhere=[key for key in missing if held[key] is not None],
        )
        if self.units_taken_over:
            self.log(f"took over {self.units_taken_over} unit(s) from writers that died computing them")
        decoded = getattr(self, "decoded", None)
        if decoded:  # the device path: where this process decoded its images
            host = {where[5:]: n for where, n in sorted(decoded.items()) if where != "device"}
            self.log(f"decoded {decoded['device']} image(s) on the device, {sum(host.values())} on the host"
                     + (f" ({', '.join(f'{n} {kind}' for kind, n in host.items())})" if host else ""))
        result.decoded = dict(decoded or {})
        if result.held_elsewhere:
            holders = sorted({held[key].describe() for key in result.held_elsewhere})
            self.log(f"{len(result.held_elsewhere)} unit(s) of this cache are still being computed by "
                     f"{', '.join(holders[:4])}{' and others' if len(holders) > 4 else ''}")
        if result.unheld:
            epoch, unit = result.unheld[0]
            why = "interrupted: " if interrupted else ""
            error = UnfinishedCacheError(
                f"{why}cache {self.config.output}: epoch {epoch} unit {unit} is not committed and no live writer holds it "
                f"({len(result.unheld)} such unit(s)); finish the cache with: {self.config.finishing_command()}")
            error.units_computed, error.result = self.units_done, result
            raise error
        if interrupted:
            raise KeyboardInterrupt
        return result


_LEDGER_ENTRY = re.compile(r"^e(\d{6})-u(\d{6})\.json$")


class _Progress:
    """Progress of the cache's planned units: a tqdm bar on a terminal, else one line per committed unit.

    Units committed by other processes count too (read from the ledger), so the ETA is the cache's.
    Only the planned units count: an add-teacher of some epochs does not count the others its group holds.
    """

    def __init__(self, work: UnitWork, *, bar: bool):
        self.work, self.planned = work, set(work.planned)
        self.bar = None
        if bar:
            from tqdm import tqdm

            self.bar = tqdm(total=len(work.planned), initial=work.already, unit="unit", dynamic_ncols=True,
                            desc=getattr(work.config, "command_name", "precompute"), smoothing=0.1)

    def _units_committed(self) -> int:
        ledger = self.work.writer.path / LEDGER_DIR
        return sum(1 for name in os.listdir(ledger)
                   if (entry := _LEDGER_ENTRY.match(name)) and (int(entry.group(1)), int(entry.group(2))) in self.planned)

    def committed(self, epoch: int, unit: int) -> None:
        work = self.work
        seconds = time.perf_counter() - work.start
        rate = work.views_done / seconds if seconds else 0.0
        done = self._units_committed()
        if self.bar is not None:
            self.bar.set_postfix_str(f"{work.views_done} views, {rate:.0f} views/s", refresh=False)
            self.bar.update(done - self.bar.n)
            return
        left = len(work.planned) - done
        eta = f", ETA {_clock(left * seconds / work.units_done)}" if work.units_done and left else ""
        work.log(f"committed epoch {epoch} unit {unit} ({done}/{len(work.planned)} units; {work.views_done} views here, "
                 f"{rate:.0f} views/s{eta})")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _prepared(preparer: "BlockPreparer", jobs, workers: int, device, *, overlap: bool):
    """``(job, pending, params)`` for the jobs (epoch, unit, block) in order: through a DataLoader
    with worker processes, two ahead in a thread (``overlap``: the teacher runs on a GPU), or
    inline (a CPU teacher already uses every core; a preparing thread beside it only makes its
    threads wait). Jobs are drawn from ``jobs`` only as they are prepared (claims are taken then).

    With workers on the device path, the workers read the blocks and keep the views encoded (the
    preparer's ``device`` is unset: a worker never touches the GPU); with ``overlap`` a thread here
    decodes and replays them on ``device``, two blocks ahead, as it does without workers.
    """
    if workers == 0 and not overlap:
        for job in jobs:
            yield (job, *preparer[job])
        return
    if workers == 0:
        yield from run_ahead(jobs, lambda job: (job, *preparer[job]), depth=2)
        return
    loader = torch.utils.data.DataLoader(_Keyed(preparer), batch_size=None, sampler=_Jobs(jobs), num_workers=workers,
                                         prefetch_factor=2, pin_memory=torch.cuda.is_available())
    read = ((tuple(int(x) for x in job), pending, params) for job, pending, params in loader)
    if not (overlap and preparer.path == "device"):
        yield from read
        return
    yield from run_ahead(read, lambda item: (item[0], preparer.realize(item[0], item[1], device), item[2]), depth=2)


class _Jobs(torch.utils.data.Sampler):
    """The DataLoader's sampler: the jobs as the loader asks for them (so units are claimed lazily)."""

    def __init__(self, jobs):
        self.jobs = jobs

    def __iter__(self):
        return iter(self.jobs)


class _Keyed(torch.utils.data.Dataset):
    """A worker's item: the job with its prepared block, so the order of results names their units."""

    def __init__(self, preparer: "BlockPreparer"):
        self.preparer = preparer

    def __getitem__(self, job):
        return (job, *self.preparer[job])
