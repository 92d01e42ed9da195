"""The writer: creating a cache atomically, committing units through the ledger, extending it."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np

from kdcache.errors import ConfigError
from kdcache.location import Location, fsync_dir, atomic_write_bytes, fsync_file
from kdcache.format.manifest import LEDGER_DIR, MANIFEST_KEY, Manifest, RECORD_ARRAYS, SAMPLE_ARRAYS, SUBSET_KEY, Subset, now_iso
from kdcache.format.store import LedgerEntry, _compressors, ledger_key, read_root, sample_array_sha256, sha256_bytes, shard_key
from kdcache.format.reader import Cache


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


class CacheWriter:
    """Writes one local cache. Rank 0 creates or extends it; every rank commits its own units."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.manifest, self.subset = read_root(Location(self.path))
        self.layout = self.manifest.blocks

    @staticmethod
    def create(path: str | os.PathLike, manifest: Manifest, samples: dict[str, np.ndarray], *,
               subset: Subset | None = None, log=print) -> "CacheWriter":
        """Create the arrays, write the plan, then the manifest last (atomically), with ``subset`` for an export.

        Half-made caches that killed creations left beside it are removed first (see :func:`remove_stale_creations`).
        """
        import zarr
        from zarr.storage import LocalStore

        final = Path(path)
        if final.exists() and any(final.iterdir()):
            raise ConfigError(f"output {final} exists and is not empty; choose a new directory or pass --resume for a kdcache cache")
        # Built beside its final place and renamed in one step: a kill during creation leaves no half cache.
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_creations(final, log=log)
        path = creation_dir(final)
        if path.exists():
            shutil.rmtree(path)
        path.mkdir()
        layout = manifest.blocks
        group = zarr.open_group(LocalStore(path), mode="w")
        widths = {"values": manifest.k, "indices": manifest.k, "tail": 2, "params": len(manifest.param_fields)}
        for name in RECORD_ARRAYS:
            dtype = np.dtype(manifest.dtypes[name])
            group.create_array(
                name,
                shape=(manifest.epochs, layout.num_slots, widths[name]),
                chunks=(1, layout.block_capacity, widths[name]),
                shards=(1, layout.block_capacity * layout.blocks_per_unit, widths[name]),
                dtype=dtype,
                compressors=_compressors(manifest.compression[name], dtype),
                fill_value=0,
            )
        hashes = {}
        sample_group = group.require_group("samples")
        for name in SAMPLE_ARRAYS:
            data = samples[name]
            array = sample_group.create_array(name, shape=data.shape, dtype=str if name == "key" else data.dtype, chunks=data.shape)
            array[...] = data
            hashes[name] = sample_array_sha256(name, data)
        (path / LEDGER_DIR).mkdir(exist_ok=True)
        manifest = dataclasses.replace(manifest, samples_sha256=hashes)
        write_manifest(path, manifest, subset=subset)
        if final.exists():
            final.rmdir()
        os.replace(path, final)
        fsync_dir(final.parent)
        return CacheWriter(final)

    def extend_epochs(self, epochs: int) -> None:
        """Grow the cache to ``epochs`` epochs; earlier epochs are untouched."""
        import zarr
        from zarr.storage import LocalStore

        if epochs <= self.manifest.epochs:
            return
        for name in RECORD_ARRAYS:
            array = zarr.open_array(LocalStore(self.path / name), mode="r+")
            array.resize((epochs,) + array.shape[1:])
        self.manifest = dataclasses.replace(self.manifest, epochs=epochs)
        write_manifest(self.path, self.manifest, subset=self.subset)

    def committed(self) -> set[tuple[int, int]]:
        cache = Cache(self.path, verify_checksums=False)
        return set(cache.ledger)

    def write_unit(self, epoch: int, unit: int, arrays: dict[str, np.ndarray]) -> LedgerEntry:
        """Write one unit's record arrays (``[unit slots, ...]``), make them durable, then commit."""
        import zarr
        from zarr.storage import LocalStore

        blocks = self.layout.unit_blocks(unit)
        lo, hi = blocks.start * self.layout.block_capacity, blocks.stop * self.layout.block_capacity
        files = {}
        for name in RECORD_ARRAYS:
            data = arrays[name]
            if data.shape[0] != hi - lo:
                raise ValueError(f"unit {unit} of {name}: {data.shape[0]} rows, expected {hi - lo}")
            array = zarr.open_array(LocalStore(self.path / name), mode="r+")
            array[epoch, lo:hi] = data.astype(array.dtype, copy=False)
            key = shard_key(name, epoch, unit)
            fsync_file(self.path / key)
            content = (self.path / key).read_bytes()
            files[key] = {"sha256": sha256_bytes(content), "bytes": len(content)}
        views = int(sum(self.layout.sizes[b] for b in blocks))
        entry = LedgerEntry(epoch, unit, files, views, now_iso())
        atomic_write_bytes(self.path / ledger_key(epoch, unit), json.dumps(dataclasses.asdict(entry), indent=1).encode())
        return entry

    def write_epoch_index(self, epoch: int) -> str:
        """Write the epoch index of ``epoch`` once all its units are committed (kdcache.format.ledger.write_epoch_index)."""
        from kdcache.format.ledger import write_epoch_index

        return write_epoch_index(self.path, epoch)

    def uncommit(self, epoch: int, unit: int) -> None:
        """Drop a unit's ledger entry (before recomputing a damaged unit), and first its epoch's index."""
        from kdcache.format.ledger import remove_epoch_index

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
