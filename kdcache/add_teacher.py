"""``kdcache add-teacher``: score a cache's existing views with another teacher, beside the first one's records.

The plan, the views and their parameters are the cache's: each block's stored parameters are
replayed (never drawn again), at the teacher's own input size (the same view geometry,
kdcache.replay "Another size") and normalised with its own mean and std; its top-k records go to its own group
``teachers/NAME/`` (kdcache.format.group), unit by unit, through the same claims, commit protocol
and work loop as ``precompute-logits`` (:class:`kdcache.precompute.UnitWork`). Nothing outside
that group is written, so the root's files stay byte-identical. Units the root has not committed
are not scored; any number of ranks and jobs share the rest, and a killed run resumes by running
it again.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from kdcache import __version__, distributed
from kdcache.augment import cache_spec, check_view_params
from kdcache.errors import (
    ConfigError,
    FormatError,
    KdcacheError,
    MismatchError,
    WriteError,
    describe_os_error,
)
from kdcache.format import (
    COMPRESSION,
    LEDGER_DIR,
    TEACHER_ARRAYS,
    Cache,
    Claims,
    CreatedElsewhere,
    GroupWriter,
    TeacherGroup,
    check_teacher_name,
    format_selection,
    now_iso,
    parse_selection,
)
from kdcache.format.claims import DEFAULT_LEASE
from kdcache.format.group import read_group, group_dir
from kdcache.format.manifest import asked_tail, first_difference, record_format_version, _short
from kdcache.location import Location
from kdcache.plan import check_block, read_block
from kdcache.precompute import (
    BlockPreparer,
    PrecomputeResult,
    UnitWork,
    calibrate_tail,
    check_tail_options,
    drop_malformed_ledger_entries,
    prepare_on_rank0,
    record_tail_spec,
    repair_units,
    resolve_k,
)
from kdcache.replay import replay_fingerprint
from kdcache.sources import open_source
from kdcache.teacher import TeacherConfig, load_teacher


@dataclass(frozen=True, kw_only=True)
class AddTeacherConfig:
    cache: str
    data: str
    teacher: TeacherConfig
    name: str
    topk: int | str | None = None  # None: the cache's k
    epochs: str | None = None  # a selection such as 0,2-4; None: every epoch
    batch_size: int | None = None  # None: the cache's
    workers: int = 0
    repair: bool = False  # re-hash its committed units first; the damaged ones are scored again
    max_units: int | None = None
    lease_seconds: float = DEFAULT_LEASE
    tail_rank: int | None = None  # the tail code's rank (None: the default record, or the group's when it exists)
    tail_samples: int | None = None  # tail classes sampled per view (None: the default record, or the group's)
    command: str = ""

    def __post_init__(self) -> None:
        check_teacher_name(self.name)
        check_tail_options(self.tail_rank, self.tail_samples)
        if self.epochs is not None:
            parse_selection(self.epochs, "--epochs")
        if self.max_units is not None and self.max_units < 0:
            raise ConfigError(f"--max-units {self.max_units}; expected 0 or more")
        if self.workers < 0:
            raise ConfigError(f"--workers {self.workers}; expected 0 or more")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"--batch-size {self.batch_size}; expected a positive integer")
        if not (self.topk is None or self.topk == "full" or (isinstance(self.topk, int) and self.topk >= 1)):
            raise ConfigError(f"--topk {self.topk!r}; expected a positive integer or 'full'")
        if not self.lease_seconds > 0:
            raise ConfigError(f"--lease {self.lease_seconds}; expected a positive number of seconds")

    # What UnitWork reads of its config.
    command_name = "add-teacher"  # the progress bar's title (precompute's otherwise)

    @property
    def output(self) -> str:
        return str(Path(self.cache) / group_dir(self.name))

    @property
    def tail_asked(self) -> bool:
        return self.tail_rank is not None or self.tail_samples is not None

    def tail(self, k: int, num_classes: int) -> dict | None:
        """The group's ``tail`` this run asks for (before its basis is fitted): None for the format-version-1 record."""
        tail = record_tail_spec(self.tail_rank, self.tail_samples, k, num_classes).to_json()
        return tail if record_format_version(tail) > 1 else None

    def finishing_command(self) -> str:
        """The command that finishes the teacher's records: this one again (it resumes)."""
        return self.command or f"kdcache add-teacher {self.cache} --data {self.data} --name {self.name} ..."


class _StoredViews(BlockPreparer):
    """Precompute's block preparer with the block's *stored* parameters, checked against the spec, for its drawn ones.

    Pickles cheaply (the cache it reads is opened again in a DataLoader worker).
    """

    def __init__(self, config: AddTeacherConfig, source, cache: Cache, size: int):
        super().__init__(config, source, cache.manifest, cache.samples(), size=size)
        self.cache = cache

    def view_params(self, epoch: int, block: int, members, sizes: list):
        params = self.cache.read_block(epoch, block, arrays=["params"])["params"]
        check_view_params(self.spec, params, image_sizes=sizes, block_size=len(sizes),
                          where=f"{self.cache.location}: epoch {epoch} block {block}")
        return params


def _group_for(config: AddTeacherConfig, cache: Cache, info, batch_size: int, device="cpu") -> TeacherGroup:
    m = cache.manifest
    replay = {key: value for key, value in m.replay.items() if key != "teacher_channels_last"}
    if replay["path"] == "device":  # this teacher's views are decoded and replayed here: this device's pixels
        fingerprint = replay_fingerprint("device", device)
        replay.update(device=fingerprint["device"], decoder=fingerprint["decoder"])
    if torch.device(device).type == "cuda":
        replay["teacher_channels_last"] = True  # this teacher runs channels-last here, whatever the root's did
    k = resolve_k(config.topk if config.topk is not None else m.k, info.num_classes)
    return TeacherGroup(
        name=config.name, teacher=info, k=k,
        dtypes={a: m.dtypes[a] for a in TEACHER_ARRAYS}, compression={a: COMPRESSION[a] for a in TEACHER_ARRAYS},
        replay=replay, size=int(info.input_size[-1]), mean=[float(v) for v in info.mean], std=[float(v) for v in info.std],
        batch_size=batch_size, tool_version=__version__, created=now_iso(), command=config.command or " ".join(sys.argv),
        tail=config.tail(k, info.num_classes),
    )


def _check_same_record(config: AddTeacherConfig, existing: TeacherGroup) -> None:
    """A run that asks for a record (--tail-rank, --tail-samples) joins a group only where it has that record."""
    if not config.tail_asked:  # the record the group was made with, whatever the default is now
        return
    def record(tail):  # the version-1 record (no tail of its own) takes its temperature range from the root
        return {n: v for n, v in asked_tail(tail or {"betas": [1.0, 0.25]}).items() if n != "temperature_range"}

    found = first_difference("tail", record(existing.tail), record(config.tail(existing.k, existing.teacher.num_classes)))
    if found is not None:
        name, old, new = found
        raise MismatchError(f"{config.cache}: the teacher records {config.name!r} were made with {name} {_short(old)}, "
                            f"this run asks for {_short(new)}; run it without --tail-rank and --tail-samples to keep "
                            "its record, or choose another --name for this teacher")


def _check_same_teacher(config: AddTeacherConfig, existing: TeacherGroup, wanted: TeacherGroup) -> None:
    """A group made by another teacher (or with another k or batch size, or on another device on the device path)
    is refused: its records would change."""
    made, here = existing.replay.get("device"), wanted.replay.get("device")
    if made != here:
        raise MismatchError(f"{config.cache}: the teacher records {config.name!r} were replayed on the device path on "
                            f"{made}, this run would replay on {here} (pixels differ between devices); join it on "
                            f"{made}, or choose another --name for this teacher")
    for name, old, new in (("teacher.weights_sha256", existing.teacher.weights_sha256, wanted.teacher.weights_sha256),
                           ("teacher.name", existing.teacher.name, wanted.teacher.name),
                           ("k", existing.k, wanted.k), ("size", existing.size, wanted.size),
                           ("mean", existing.mean, wanted.mean), ("std", existing.std, wanted.std),
                           ("batch_size", existing.batch_size, wanted.batch_size)):
        if old != new:
            shown = (lambda v: f"{v[:16]}...") if name.endswith("sha256") else repr
            raise MismatchError(f"{config.cache}: the teacher records {config.name!r} were made with {name} {shown(old)}, "
                                f"this teacher has {shown(new)}; choose another --name for this teacher")


def _fit_basis(config: AddTeacherConfig, cache: Cache, group: TeacherGroup, source, teacher, device, log) -> TeacherGroup:
    """The group with its tail code's basis, fitted as precompute fits the root's (kdcache.precompute.calibrate_tail) on
    this teacher's logits of the first views of epoch 0, replayed at its size and normalised as it expects."""
    if group.tail is None or not group.tail.get("rank"):
        return group
    finish = dataclasses.replace(cache_spec(cache.manifest), mean=tuple(group.mean), std=tuple(group.std))
    fitted = calibrate_tail(config, source, teacher, group.records_manifest(cache.manifest), cache.samples(), device, log,
                            size=group.size, finish=finish)
    return dataclasses.replace(group, tail=fitted.tail)


def _prepare_group(config: AddTeacherConfig, cache: Cache, group: TeacherGroup, log, *, fit=lambda group: group) -> None:
    """Rank 0: create the group (``fit`` gives it its tail code's basis), or check that the existing one was made by
    this teacher with the record this run asks for (joining it)."""
    path = Path(config.cache)
    if not (path / group_dir(config.name) / "zarr.json").exists():
        try:
            GroupWriter.create(path, fit(group), log=log)
            log(f"created the teacher records {config.name!r} in {config.cache}")
            return
        except CreatedElsewhere:
            pass
    existing = read_group(Location(path), config.name, cache.manifest)
    # Without --topk or --batch-size, a run joins the group with what it was made with.
    _check_same_teacher(config, existing, dataclasses.replace(
        group, k=existing.k if config.topk is None else group.k,
        batch_size=existing.batch_size if config.batch_size is None else group.batch_size))
    _check_same_record(config, existing)
    log(f"joining the teacher records {config.name!r} of {config.cache}")


def _repair_group(config: AddTeacherConfig, log) -> None:
    """--repair: unreadable ledger entries, and committed units whose files fail their checksums, are uncommitted.

    The group's epoch indexes are dropped first (they only repeat the entries; the run writes them again).
    """
    writer = GroupWriter(config.cache, config.name)
    for index in sorted((writer.path / LEDGER_DIR / "epochs").glob("e*.json")):
        index.unlink()
    drop_malformed_ledger_entries(writer.path, log, manifest=writer.manifest)
    repair_units(Cache(config.cache).teacher_records(config.name), writer, log,
                 outcome=f"of the teacher records {config.name!r} will be scored again")


def add_teacher(config: AddTeacherConfig, *, log=print, progress: bool = False,
                stop: threading.Event | None = None) -> PrecomputeResult:
    """Score the committed views of the cache ``config.cache`` with ``config.teacher`` into ``teachers/NAME/``.

    Returns what this process did, as precompute does; raises :class:`UnfinishedCacheError` when
    units of the range are left uncommitted with no live writer holding them.
    """
    location = Location(config.cache)
    if not location.local:
        raise ConfigError(f"{config.cache}: kdcache add-teacher writes into a local cache directory, not a URL or an archive")
    if not location.path.is_dir():
        raise FormatError(f"cache {config.cache} " + ("is a file, not a cache directory" if location.path.exists() else "does not exist"))
    if (location.path / "kdcache-wds.json").is_file():
        raise ConfigError(f"{config.cache} is a webdataset export; add the teacher to the cache it was exported from, then export again")
    cache = Cache(config.cache)  # the stored parameters it replays are checked against the ledger
    if cache.subset is not None:
        raise ConfigError(f"{config.cache} is a subset exported from {cache.subset.source}; add the teacher to that cache "
                          "and export again")
    m = cache.manifest
    spec = cache_spec(m)
    device = distributed.resolve_device("auto", distributed.ranks_from_env())
    ranks = distributed.init(device)
    source = open_source(config.data, split=m.dataset.split,
                         **({"shard_sizes": [n for _, n in m.dataset.shards]} if m.dataset.shards else {}))
    if len(source) != m.dataset.num_samples:
        raise MismatchError(f"data {config.data} has {len(source)} samples, the cache {config.cache} was made from "
                            f"{m.dataset.num_samples}")
    plan, first = cache.samples(), m.blocks.block_slots(0)  # another dataset of as many samples: refused before the group is made
    check_block(read_block(source, m.blocks, 0, plan["source_index"][first]), plan, first, what=f"data {config.data}")
    teacher, info = load_teacher(dataclasses.replace(config.teacher, device=str(device)), class_names=list(m.dataset.class_names))
    if info.num_classes != m.teacher.num_classes:
        raise MismatchError(f"teacher {config.teacher.label} has {info.num_classes} classes, the cache {config.cache} "
                            f"{m.teacher.num_classes}")
    if info.input_size[-1] != info.input_size[-2]:
        raise ConfigError(f"teacher {config.teacher.label} takes {info.input_size[-2]}x{info.input_size[-1]} images; the cache's "
                          "views are square, so a teacher added to it must take square images")
    group = _group_for(config, cache, info, config.batch_size or m.batch_size, device)
    committed = sorted(cache.ledger)
    epochs = parse_selection(config.epochs, "--epochs") if config.epochs is not None else None
    if epochs is not None and max(epochs) >= m.epochs:
        raise ConfigError(f"--epochs {config.epochs}: the cache {config.cache} has epochs 0 to {m.epochs - 1}")
    planned = [key for key in committed if epochs is None or key[0] in epochs]
    if not planned:
        raise ConfigError(f"the cache {config.cache} has no committed unit{'' if epochs is None else f' in epochs {config.epochs}'} "
                          "to score; finish it with kdcache precompute-logits --resume first")

    def prepare() -> None:
        try:
            _prepare_group(config, cache, group, log, fit=lambda made: _fit_basis(config, cache, made, source, teacher, device, log))
            if config.repair:
                _repair_group(config, log)
        except OSError as exc:
            raise WriteError(f"cannot write {config.output}: {describe_os_error(exc)}; no unit was scored") from None

    prepare_on_rank0(ranks, prepare, where=config.output)
    if ranks.main and len(planned) < m.epochs * m.blocks.num_units:
        log(f"the cache has {len(committed)} committed unit(s); scoring {len(planned)} "
            f"(epochs {format_selection(sorted({e for e, _ in planned}))})")
    writer = GroupWriter(config.cache, config.name)
    group, records = writer.group, cache.teacher_records(config.name)  # as made (a run that joins takes its k)
    run_config = dataclasses.replace(config, batch_size=group.batch_size)
    finish_spec = dataclasses.replace(spec, mean=tuple(group.mean), std=tuple(group.std))
    with Claims(config.output, lease_seconds=config.lease_seconds) as claims:
        work = UnitWork(run_config, ranks, claims, log, progress, stop, writer=writer, cache=records, planned=planned)
        interrupted = False
        try:
            work.run(source, teacher, device, _StoredViews(config, source, cache, group.size), spec=finish_spec)
        except KdcacheError as exc:
            exc.units_computed = work.units_done
            raise
        except KeyboardInterrupt:
            interrupted = True
    return work.finish(interrupted=interrupted)
