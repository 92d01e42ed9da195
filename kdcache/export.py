"""`kdcache export`: a new cache holding some epochs and blocks of another, as a directory or one zip file.

A team that cannot take a whole cache takes a subset. Units are the only thing a cache stores,
so a subset is a cache with the source's manifest and plan, unchanged, whose ledger holds only
the chosen units (epochs keep their numbers: parameters are keyed by (seed, epoch), so ``verify``
re-draws them by the original number), and which says so: the root attribute ``kdcache_subset``
(:class:`kdcache.format.Subset`) records the epochs and units kept. Readers hold a subset to
exactly those (``train-student`` trains from those epochs, on the samples of those blocks); a
cache without it must hold every unit, so a precompute stopped early is never taken for a subset.

- ``--epochs 0,2-4`` picks epochs (default: those with any committed unit, or a subset's);
  ``--blocks 0-3`` picks blocks, which must make up whole units (a unit's blocks share one shard
  file per array, so only whole units can be stored); default: every block, or a subset's.
- Every chosen unit must be committed in the source; its four shard files are copied byte for
  byte, each checked against the source's ledger, and its ledger entry keeps its commit time.
  Every exported epoch then gets its epoch index (all its exported units are there), whether
  the source had one or not: the export opens in a few requests, and has the source's digest
  when it holds every unit.
- ``--format zarr`` writes a directory; ``--format zip`` writes one zip archive of the same
  files, stored uncompressed (the shard files are already compressed), which kdcache reads in
  place from a path or URL ending in ``.zip``.
- Added teachers (``teachers/NAME/``, kdcache.format.group) are carried: each group as made, with
  its committed units among the chosen ones, copied and checked the same way; ``--format wds``
  stores their records beside the first teacher's in each shard (kdcache.format.wds).

The output is built beside its final place and renamed into it at the end, so a failed export
leaves nothing at ``OUT``.
"""

from __future__ import annotations

import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

from kdcache.errors import ConfigError, IncompleteCacheError, MismatchError
from kdcache.format import (
    Cache,
    CacheWriter,
    GroupWriter,
    Manifest,
    Subset,
    WdsExport,
    check_wds_output,
    default_selection,
    format_selection,
    group_dir,
    is_wds,
    ledger_key,
    open_cache,
    select_units,
    write_wds,
)
from kdcache.format.ledger import epoch_index_bytes, epoch_index_key, index_epochs
from kdcache.location import fsync_dir, is_url
from kdcache.merge import check_entry, copy_teachers, copy_unit, ledger_entry_bytes, read_unit_files

#: Output formats: a cache directory, one zip archive of its files, or webdataset tar shards (kdcache.format.wds).
FORMATS = ("zarr", "zip", "wds")

@dataclass(frozen=True, kw_only=True)
class ExportConfig:
    cache: str  # the source: a path, a URL or a .zip
    output: str  # the cache to create: a directory, or for format "zip" a file ending in .zip
    epochs: tuple[int, ...] | None = None  # None: every epoch the source holds
    blocks: tuple[int, ...] | None = None  # None: every block the source holds; else whole units only
    format: str = "zarr"
    data: str | None = None  # format wds: the source the cache was made from, to store each view's image too

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"--format {self.format!r}; expected one of {', '.join(FORMATS)}")
        if self.data is not None and self.format != "wds":
            raise ConfigError(f"--data {self.data} stores images next to the records of a webdataset export; add --format wds")
        for name in ("epochs", "blocks"):
            chosen = getattr(self, name)
            if chosen is None:
                continue
            if not chosen:
                raise ConfigError(f"--{name} selects nothing; leave it out to take every {name[:-1]}")
            if any(not isinstance(n, int) or isinstance(n, bool) or n < 0 for n in chosen):
                raise ConfigError(f"--{name} {list(chosen)}; expected non-negative integers")
            object.__setattr__(self, name, tuple(sorted(set(chosen))))
        out = str(self.output)
        if is_url(out):
            raise ConfigError(f"output {out}: export writes a local directory or file, not a URL")
        is_zip = out.rstrip("/").lower().endswith(".zip")
        if self.format == "zip" and not is_zip:
            raise ConfigError(f"output {out}: a zip export must end in .zip (that is how kdcache recognises an archive)")
        if self.format == "zarr" and is_zip:
            raise ConfigError(f"output {out} ends in .zip but --format is zarr; pass --format zip for an archive, "
                              "or choose another name")
        if os.path.lexists(out):
            raise ConfigError(f"output {out} already exists; export writes a new cache, choose a new path")


@dataclass
class ExportResult:
    output: str
    format: str
    epochs: list[int]  # the epochs exported (all of them complete over the exported blocks)
    blocks: list[int]
    units: int  # (epoch, unit) pairs exported
    views: int
    bytes: int  # size of the output (the archive, or the directory's files)


def _select(cache: Cache, config: ExportConfig) -> tuple[list[int], list[int]]:
    """The epochs and units to export, checked against the source: (epochs, units)."""
    m, layout = cache.manifest, cache.layout
    wds = is_wds(cache)
    if wds and config.format != "wds":
        raise ConfigError(f"{cache.location} is a webdataset export; --format {config.format} copies the shard files of "
                          "a zarr cache (or its zip archive): export it again with --format wds, or export from the cache it came from")
    default_epochs, default_units = default_selection(cache)
    if config.epochs is None:
        epochs = default_epochs
    else:
        unknown = [e for e in config.epochs if e >= m.epochs]
        if unknown:
            raise ConfigError(f"--epochs {format_selection(config.epochs)}: {cache.location} has no epoch {unknown[0]} "
                              f"(its epochs are 0-{m.epochs - 1})")
        epochs = list(config.epochs)
    if config.blocks is None:
        units = default_units
    else:
        unknown = [b for b in config.blocks if b >= layout.num_blocks]
        if unknown:
            raise ConfigError(f"--blocks {format_selection(config.blocks)}: {cache.location} has no block {unknown[0]} "
                              f"(its blocks are 0-{layout.num_blocks - 1})")
        chosen = set(config.blocks)
        units = sorted({layout.unit_of(b) for b in chosen})
        for unit in units:
            whole = layout.unit_blocks(unit)
            if not set(whole) <= chosen:
                raise ConfigError(
                    f"--blocks {format_selection(config.blocks)} cuts unit {unit} (blocks {whole.start}..{whole.stop - 1}): "
                    f"only whole units can be exported, {layout.blocks_per_unit} blocks each; "
                    f"take --blocks {format_selection(b for u in units for b in layout.unit_blocks(u))} "
                    "or leave the cut unit out"
                )
    if not epochs or not cache.ledger:
        raise IncompleteCacheError(f"{cache.location}: no unit is committed; there is nothing to export")
    for epoch in epochs:
        for unit in units:
            if not cache.unit_committed(epoch, unit):
                whole = layout.unit_blocks(unit)
                if cache.subset is not None:
                    held = (f"the subset holds epochs {format_selection(cache.subset.epochs)}, "
                            f"blocks {format_selection(cache.held_blocks())})")
                else:
                    held = (f"complete epochs: {format_selection(cache.complete_epochs()) or 'none'}) "
                            "or finish the cache with kdcache precompute-logits --resume")
                raise IncompleteCacheError(
                    f"{cache.location}: epoch {epoch} unit {unit} (blocks {whole.start}..{whole.stop - 1}) is not committed, "
                    f"so it cannot be exported; choose other --epochs/--blocks ({held}"
                )
            if not wds:  # an export's index has one sha256 per shard; kdcache.format.wds checks it as it reads
                check_entry(str(cache.location), cache, cache.ledger[epoch, unit])
    return epochs, units


def _teachers_of(cache: Cache, keys: list[tuple[int, int]]) -> dict:
    """The added teachers to carry into an export of ``keys``: each with its committed units among them."""
    if is_wds(cache):
        return {}
    chosen, teachers = set(keys), {}
    for name, group in cache.groups.items():
        view = cache.teacher_records(name)
        teachers[name] = (group, [view], {key: 0 for key in view.ledger if key in chosen})
    return teachers


def _write_zip(staged: Path, cache: Cache, keys: list[tuple[int, int]], target: Path, teachers: dict) -> None:
    """One zip archive of the staged metadata plus the chosen units, members stored as they are."""

    def add(archive: zipfile.ZipFile, name: str, data: bytes) -> None:
        info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))  # a fixed time: the same export, the same bytes
        info.external_attr = 0o644 << 16
        archive.writestr(info, data, compress_type=zipfile.ZIP_STORED)

    name = str(cache.location)
    with open(target, "wb") as handle:
        with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            for path in sorted(p for p in staged.rglob("*") if p.is_file()):
                add(archive, path.relative_to(staged).as_posix(), path.read_bytes())
            for key in keys:
                entry = cache.ledger[key]
                for member, data in read_unit_files(name, cache, entry).items():
                    add(archive, member, data)
                add(archive, ledger_key(*key), ledger_entry_bytes(entry))
            for epoch in sorted({e for e, _ in keys}):  # every exported epoch holds all its units: one index each
                entries = [cache.ledger[key] for key in keys if key[0] == epoch]
                add(archive, epoch_index_key(epoch),
                    epoch_index_bytes(epoch, entries, sum(len(ledger_entry_bytes(e)) for e in entries)))
            for teacher, (_, (view,), owner) in sorted(teachers.items()):  # its group's metadata was staged with the root's
                prefix = f"{group_dir(teacher)}/"
                for key in sorted(owner):
                    entry = view.own_ledger[key]
                    for member, data in read_unit_files(f"{name} (teacher {teacher})", view, entry).items():
                        add(archive, prefix + member, data)
                    add(archive, prefix + ledger_key(*key), ledger_entry_bytes(entry))
                for epoch in sorted({e for e, _ in owner}):
                    entries = [view.own_ledger[key] for key in sorted(owner) if key[0] == epoch]
                    if len(entries) == cache.layout.num_units:  # a group's index lists every unit of its epoch
                        add(archive, prefix + epoch_index_key(epoch),
                            epoch_index_bytes(epoch, entries, sum(len(ledger_entry_bytes(e)) for e in entries)))
        handle.flush()
        os.fsync(handle.fileno())


def export_cache(config: ExportConfig, *, log=print) -> ExportResult:
    """Write the chosen epochs and blocks of ``config.cache`` as a new cache at ``config.output``."""
    cache = open_cache(config.cache)
    m, layout = cache.manifest, cache.layout
    epochs, units = _select(cache, config)
    plan = cache.samples()
    keys = [(e, u) for e in epochs for u in units]
    teachers = _teachers_of(cache, keys)
    blocks = [b for u in units for b in layout.unit_blocks(u)]
    subset = Subset.of(m, keys, source=cache.location)  # None: every unit of every epoch, a whole cache
    if len(units) < layout.num_units:
        log(f"a block subset: blocks {format_selection(blocks)} of {layout.num_blocks} "
            f"({sum(layout.sizes[b] for b in blocks)} of {m.dataset.num_samples} samples); train-student trains on these only")
    if config.format == "wds":  # tar shards plus an index (kdcache.format.wds)
        done = export_wds(cache, config.output, units=keys, data=config.data, log=log)
        return ExportResult(output=done.output, format="wds", epochs=epochs, blocks=blocks, units=len(keys), views=done.views,
                            bytes=done.bytes)

    out = Path(config.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = out.parent / f".{out.name}.exporting-{os.getpid()}"
    archive = out.parent / f".{out.name}.exporting-{os.getpid()}.zip"
    for leftover in (staged, archive):
        if leftover.is_dir():
            shutil.rmtree(leftover)
        elif leftover.exists():
            leftover.unlink()
    try:
        if config.format == "zip":
            CacheWriter.create(staged, m, plan, subset=subset)  # metadata and plan; units go straight into the archive
            for teacher, (group, _, _) in sorted(teachers.items()):
                GroupWriter.create(staged, group, log=log)
            _write_zip(staged, cache, keys, archive, teachers)
            final = archive
        else:
            CacheWriter.create(staged, m, plan, subset=subset)  # the source's manifest, unchanged: same teacher, epochs, layout
            for key in keys:
                copy_unit(str(cache.location), cache, cache.ledger[key], staged)
            copy_teachers(teachers, [str(cache.location)], staged, log=log)  # every added teacher, its units among these
            index_epochs(staged, log=log)
            final = staged
        if os.path.lexists(out):  # something appeared there meanwhile
            raise ConfigError(f"output {out} already exists; export writes a new cache, choose a new path")
        os.replace(final, out)
        fsync_dir(out.parent)
    finally:
        for leftover in (staged, archive):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            elif leftover.exists():
                leftover.unlink()
    size = out.stat().st_size if config.format == "zip" else sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    views = sum(cache.ledger[key].views for key in keys)
    log(f"{config.cache}: {len(keys)} unit(s) exported (epochs {format_selection(epochs)}, blocks {format_selection(blocks)})")
    return ExportResult(output=str(out), format=config.format, epochs=epochs, blocks=blocks, units=len(keys), views=views,
                        bytes=size)


# ---- the webdataset export -------------------------------------------------------------------


def _open_data(data: str, manifest: Manifest):
    from kdcache.sources import open_source

    shard_sizes = [n for _, n in manifest.dataset.shards] if manifest.dataset.shards else None
    source = open_source(data, split=manifest.dataset.split, **({"shard_sizes": shard_sizes} if shard_sizes else {}))
    if len(source) != manifest.dataset.num_samples:
        raise MismatchError(f"data {data} has {len(source)} samples, the cache was made from "
                            f"{manifest.dataset.num_samples} ({manifest.dataset.uri})")
    return source


def export_wds(cache, output_dir: str | os.PathLike, *, epochs=None, units=None, data: str | None = None,
               command: str = "", log=print) -> WdsExport:
    """Write a cache (a path, URL or opened cache) as webdataset tar shards plus an index in ``output_dir``.

    What is exported: ``units``, the (epoch, unit) pairs ``kdcache export`` chose, or else the
    ``epochs`` given (None: every epoch present) times the units present; each must be committed.
    The manifest is the cache's, unchanged (:func:`kdcache.format.write_wds`). ``data``: the
    source the cache was made from; each view's image bytes and label are then stored next to
    its block's records, every sample checked against the plan's digests as it is read.
    """
    from kdcache.plan import check_block, read_block
    from kdcache.sources import stored_format

    out = Path(output_dir)
    check_wds_output(out)
    cache = open_cache(cache, verify_checksums=True) if isinstance(cache, (str, os.PathLike)) else cache
    chosen = units if units is not None else select_units(cache, epochs)
    source = _open_data(data, cache.manifest) if data is not None else None
    layout, plan = cache.layout, cache.samples()

    def images(unit: int) -> dict[int, list]:
        views = {}
        for block in layout.unit_blocks(unit):
            where = layout.block_slots(block)
            samples = read_block(source, layout, block, plan["source_index"][where])
            check_block(samples, plan, where, what=f"data {data} (block {block})")
            views[block] = [(stored_format(s.data) or "bin", s.data, s.label, s.key) for s in samples]
        return views

    done = write_wds(cache, out, chosen, images=images if source is not None else None, command=command)
    log(f"exported {done.shards} shard(s) of {len(done.epochs)} epoch(s), {done.views} views"
        f"{' with images' if data is not None else ''}, {done.bytes / 1e6:.2f} MB to {out}")
    return done
