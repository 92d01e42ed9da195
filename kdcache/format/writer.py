"""The writer: creating a cache atomically, committing units through the ledger, extending it."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np

from kdcache.errors import ConfigError
from kdcache.location import Location, fsync_dir, atomic_write_bytes
from kdcache.format.manifest import LEDGER_DIR, MANIFEST_KEY, Manifest, RECORD_ARRAYS, SAMPLE_ARRAYS, SUBSET_KEY, Subset, now_iso, record_width
from kdcache.format.store import LedgerEntry, _compressors, ledger_key, read_root, sample_array_sha256, sha256_bytes, shard_key
from kdcache.format.reader import Cache
from kdcache.format.group import TEACHER_ARRAYS, TeacherGroup, group_dir, group_root, read_group
from kdcache.format.claims import MANIFEST_CLAIM, Claims
from kdcache.format.ledger import remove_epoch_index, write_epoch_index


class CreatedElsewhere(ConfigError):
    """Another process created the cache while this one was creating it (a job started twice at once)."""


def creation_dir(final: Path) -> Path:
    """Where this process builds the cache ``final``: ``.NAME.creating-HOST-PID`` beside it."""
    return final.parent / f".{final.name}.creating-{socket.gethostname()}-{os.getpid()}"


def remove_stale_creations(final: Path, *, log=print) -> list[Path]:
    """Remove the ``.NAME.creating-HOST-PID`` directories beside ``final`` whose process no longer runs.

    A creation builds the cache in such a directory and renames it in one step, so one that was
    killed leaves it behind, never read. Only this host's directories are judged, by their PID; a
    directory whose process is alive (or cannot be told, or that another host made on a shared
    filesystem) is left alone: it may be a creation in progress. Returns what was removed, each logged.
    """
    removed, prefix, host = [], f".{final.name}.creating-", socket.gethostname()
    for stale in sorted(final.parent.glob(f"{glob.escape(prefix)}*")):
        maker, _, pid = stale.name[len(prefix):].rpartition("-")
        if maker != host or not pid.isdigit() or not 0 < int(pid) < 2**31 or int(pid) == os.getpid() or not stale.is_dir():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # alive
        except ProcessLookupError:
            pass
        except OSError:  # PermissionError: alive, another user's
            continue
        shutil.rmtree(stale, ignore_errors=True)
        removed.append(stale)
        log(f"removed {stale}: left by a cache creation (process {pid}) that no longer runs")
    return removed


def _create_record_arrays(group, manifest: Manifest, arrays) -> None:
    """The record arrays of a zarr group: epoch-major, one inner chunk per (epoch, block), one shard file per (epoch, unit)."""
    layout = manifest.blocks
    for name in arrays:
        width = record_width(manifest, name)
        dtype = np.dtype(manifest.dtypes[name])
        group.create_array(
            name,
            shape=(manifest.epochs, layout.num_slots, width),
            chunks=(1, layout.block_capacity, width),
            shards=(1, layout.block_capacity * layout.blocks_per_unit, width),
            dtype=dtype,
            compressors=_compressors(manifest.compression[name], dtype),
            fill_value=0,
        )


def _create_in_place(final: Path, build, *, log, what: str) -> None:
    """Build a new directory with ``build(path)`` beside ``final``, then rename it into place in one step.

    A kill during creation leaves no half-made directory at ``final`` (only one beside it, which
    the next creation removes: :func:`remove_stale_creations`). ``final`` may exist empty. Raises
    :class:`CreatedElsewhere` when another process put its own in place first.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_creations(final, log=log)
    path = creation_dir(final)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir()
    build(path)
    try:
        if final.exists():
            final.rmdir()  # empty (the callers check), unless another process created it meanwhile
        os.replace(path, final)
    except OSError:
        shutil.rmtree(path, ignore_errors=True)
        if not (final / "zarr.json").exists():
            raise
        raise CreatedElsewhere(f"{what}{final} was created by another process meanwhile") from None
    fsync_dir(final.parent)


class CacheWriter:
    """Writes one local cache. Rank 0 creates or extends it; every rank commits its own units."""

    #: The record arrays a unit's shard files hold.
    ARRAYS = RECORD_ARRAYS

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.manifest, self.subset = read_root(Location(self.path))
        self.layout = self.manifest.blocks
        self._array_meta: dict[str, dict] = {}

    @staticmethod
    def create(path: str | os.PathLike, manifest: Manifest, samples: dict[str, np.ndarray], *,
               subset: Subset | None = None, log=print) -> "CacheWriter":
        """Create the arrays, write the plan, then the manifest last (atomically), with ``subset`` for an export.

        Half-made caches that killed creations left beside it are removed first (see :func:`remove_stale_creations`).
        """
        import zarr
        from zarr.storage import LocalStore

        final = Path(path)
        if (final / "zarr.json").exists():
            raise CreatedElsewhere(f"output {final} was created by another process meanwhile")
        if final.exists() and any(final.iterdir()):
            raise ConfigError(f"output {final} exists and is not empty; choose a new directory or pass --resume for a kdcache cache")

        def build(path: Path) -> None:
            group = zarr.open_group(LocalStore(path), mode="w")
            _create_record_arrays(group, manifest, RECORD_ARRAYS)
            hashes = {}
            sample_group = group.require_group("samples")
            for name in SAMPLE_ARRAYS:
                data = samples[name]
                array = sample_group.create_array(name, shape=data.shape, dtype=str if name == "key" else data.dtype,
                                                  chunks=data.shape)
                array[...] = data
                hashes[name] = sample_array_sha256(name, data)
            (path / LEDGER_DIR).mkdir(exist_ok=True)
            write_manifest(path, dataclasses.replace(manifest, samples_sha256=hashes), subset=subset)

        _create_in_place(final, build, log=log, what="output ")
        return CacheWriter(final)

    def extend_epochs(self, epochs: int, claims: Claims, *, wait: float = 60.0) -> None:
        """Grow the cache to ``epochs`` epochs; earlier epochs are untouched, and so are units being written.

        Other writers may be committing units meanwhile: they never write the manifest or the array
        metadata, and their shard files do not depend on the epoch count. Two processes that add
        epochs take turns through the manifest claim, and each re-reads the manifest under it, so
        neither can shrink what the other added. Waits up to ``wait`` seconds for the claim.
        """
        deadline = time.monotonic() + wait
        while not claims.try_claim(MANIFEST_CLAIM):
            if time.monotonic() > deadline:
                holder = claims.live_holder(MANIFEST_CLAIM)
                raise ConfigError(f"cannot add epochs to {self.path}: {holder.describe() if holder else 'another writer'} "
                                  f"has been changing its manifest for {wait:.0f} s; run the same command again later")
            time.sleep(0.05)
        try:
            self.manifest, self.subset = read_root(Location(self.path))
            if epochs <= self.manifest.epochs:
                return
            for name in RECORD_ARRAYS:  # the metadata only: zarr's resize would also drop chunks beyond a smaller shape
                meta = json.loads((self.path / name / "zarr.json").read_bytes())
                if meta["shape"][0] < epochs:
                    meta["shape"][0] = epochs
                    atomic_write_bytes(self.path / name / "zarr.json", json.dumps(meta, indent=2).encode())
            self._array_meta.clear()
            self.manifest = dataclasses.replace(self.manifest, epochs=epochs)
            write_manifest(self.path, self.manifest, subset=self.subset)
        finally:
            claims.release(MANIFEST_CLAIM)

    def committed(self) -> set[tuple[int, int]]:
        cache = Cache(self.path, verify_checksums=False)
        return set(cache.ledger)

    def _shard_bytes(self, array: str, epoch: int, unit: int, data: np.ndarray) -> bytes:
        """One unit's shard file of ``array``, encoded in memory by zarr from the array's own metadata."""
        import zarr
        from zarr.storage import MemoryStore

        from kdcache.format.reader import _buffer

        if array not in self._array_meta:
            self._array_meta[array] = json.loads((self.path / array / "zarr.json").read_bytes())
        meta = dict(self._array_meta[array])
        meta["shape"] = [max(meta["shape"][0], epoch + 1), *meta["shape"][1:]]  # epochs added by another writer meanwhile
        store = MemoryStore({"zarr.json": _buffer(json.dumps(meta).encode())})
        target = zarr.open_array(store, mode="r+")
        blocks = self.layout.unit_blocks(unit)
        target[epoch, blocks.start * self.layout.block_capacity : blocks.stop * self.layout.block_capacity] = (
            data.astype(target.dtype, copy=False))
        encoded = store._store_dict.get(f"c/{epoch}/{unit}/0")
        if encoded is None:
            raise ValueError(f"epoch {epoch} unit {unit} of {array}: zarr wrote no shard")
        return encoded.to_bytes()

    def write_unit(self, epoch: int, unit: int, arrays: dict[str, np.ndarray]) -> LedgerEntry:
        """Write one unit's record arrays (``[unit slots, ...]``), make them durable, then commit.

        Each shard file is encoded in memory and put in place whole (a temporary file, fsync,
        rename), so a file on disk is always complete, whoever else writes the same unit.
        """
        blocks = self.layout.unit_blocks(unit)
        rows = (blocks.stop - blocks.start) * self.layout.block_capacity
        files = {}
        for name in self.ARRAYS:
            data = arrays[name]
            if data.shape[0] != rows:
                raise ValueError(f"unit {unit} of {name}: {data.shape[0]} rows, expected {rows}")
            content = self._shard_bytes(name, epoch, unit, data)
            key = shard_key(name, epoch, unit)
            atomic_write_bytes(self.path / key, content)
            files[key] = {"sha256": sha256_bytes(content), "bytes": len(content)}
        views = int(sum(self.layout.sizes[b] for b in blocks))
        entry = LedgerEntry(epoch, unit, files, views, now_iso())
        atomic_write_bytes(self.path / ledger_key(epoch, unit), json.dumps(dataclasses.asdict(entry), indent=1).encode())
        return entry

    def write_epoch_index(self, epoch: int) -> str:
        """Write the epoch index of ``epoch`` once all its units are committed (kdcache.format.ledger.write_epoch_index)."""
        return write_epoch_index(self.path, epoch)

    def uncommit(self, epoch: int, unit: int) -> None:
        """Drop a unit's ledger entry (before recomputing a damaged unit), and first its epoch's index."""
        remove_epoch_index(self.path, epoch)
        path = self.path / ledger_key(epoch, unit)
        if path.exists():
            path.unlink()
            fsync_dir(path.parent)


def write_manifest(path: Path, manifest: Manifest, *, subset: Subset | None = None) -> None:
    """The root group's zarr.json: the manifest, and for a subset what it kept (an attribute older readers ignore)."""
    attributes = {MANIFEST_KEY: manifest.to_dict()}
    if subset is not None:
        attributes[SUBSET_KEY] = subset.to_dict()
    root = {"zarr_format": 3, "node_type": "group", "attributes": attributes}
    atomic_write_bytes(Path(path) / "zarr.json", json.dumps(root, indent=1).encode())


class GroupWriter(CacheWriter):
    """Writes an added teacher's group ``teachers/NAME/`` of the local cache at ``path``, and nothing outside it.

    Its units are committed as a cache's are (shard files, then the ledger entry, in the group's
    own ``ledger/``); the root's manifest, records and ledger are only read.
    """

    ARRAYS = TEACHER_ARRAYS

    def __init__(self, path: str | os.PathLike, name: str):
        self.cache_path = Path(path)
        manifest, self.subset = read_root(Location(self.cache_path))
        self.group = read_group(Location(self.cache_path), name, manifest)
        self.path = self.cache_path / group_dir(name)
        self.manifest = self.group.records_manifest(manifest)
        self.layout = self.manifest.blocks
        self._array_meta = {}

    @staticmethod
    def create(path: str | os.PathLike, group: TeacherGroup, *, log=print) -> "GroupWriter":
        """Create ``teachers/NAME/`` of the cache at ``path`` atomically: built beside it, renamed into place.

        Raises :class:`CreatedElsewhere` when the group exists already (made by another process, maybe just now).
        """
        import zarr
        from zarr.storage import LocalStore

        cache = Path(path)
        final = cache / group_dir(group.name)
        if (final / "zarr.json").exists():
            raise CreatedElsewhere(f"{final} exists already")
        manifest = group.records_manifest(read_root(Location(cache))[0])

        def build(path: Path) -> None:
            _create_record_arrays(zarr.open_group(LocalStore(path), mode="w"), manifest, TEACHER_ARRAYS)
            (path / LEDGER_DIR).mkdir(exist_ok=True)
            atomic_write_bytes(path / "zarr.json", json.dumps(group_root(group), indent=1).encode())

        _create_in_place(final, build, log=log, what="")
        return GroupWriter(cache, group.name)

    def write_epoch_index(self, epoch: int) -> str:
        return write_epoch_index(self.path, epoch, units=range(self.layout.num_units))
