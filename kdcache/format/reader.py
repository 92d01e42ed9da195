"""The reader: :class:`Cache` (zarr stores by path or URL, and zip archives of them) and :func:`open_cache`."""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict

import numpy as np

from kdcache.errors import ChecksumError, FormatError, IncompleteCacheError
from kdcache.location import Location
from kdcache.format.manifest import RECORD_ARRAYS, SAMPLE_ARRAYS, _short, record_width
from kdcache.format.group import TEACHER_ARRAYS, TeacherGroup, group_dir, list_groups
from kdcache.format.digest import content_digest
from kdcache.format.held import HeldUnits, SeveralTeachers
from kdcache.format.ledger import Ledger, check_agreement, load_ledger
from kdcache.format.store import LedgerEntry, ledger_key, metadata_keys, read_root, sample_array_sha256, sha256_bytes, shard_key


class Cache(SeveralTeachers, HeldUnits):
    """A kdcache cache opened for reading (local path or URL).

    Its records are the first teacher's (record name ``main``); :attr:`teachers` names every
    teacher and :meth:`teacher_records` reads another's.
    """

    #: The record arrays a unit's shard files hold (an added teacher's: all but params).
    ARRAYS = RECORD_ARRAYS
    #: How to finish a unit that is not committed.
    FINISH = "resume the precompute (kdcache precompute-logits --resume) to finish it"

    def __init__(self, location: str | os.PathLike, *, verify_checksums: bool = True):
        self.location = Location(location)
        self.manifest, self.subset = read_root(self.location)
        self.layout = self.manifest.blocks
        self.verify_checksums = verify_checksums
        self._array_meta: dict[str, bytes] = {}
        self._units: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self._groups: dict[str, TeacherGroup] | None = None
        self._teacher_views: dict = {}
        for array in self.ARRAYS:
            self._meta(array)  # array metadata that disagrees with the manifest is refused here, naming the field
        self.refresh()

    def refresh(self) -> None:
        """Re-read the ledger (units committed since opening become visible): epoch indexes, then the other entries."""
        self._ledger: Ledger = load_ledger(self.location)
        self.ledger: dict[tuple[int, int], LedgerEntry] = self._ledger.entries

    @property
    def groups(self) -> dict[str, TeacherGroup]:
        """The added teachers' group attributes, by name (one listing of ``teachers/``, on first use)."""
        if self._groups is None:
            self._groups = list_groups(self.location, self.manifest)
        return self._groups

    def _added_records(self, group: TeacherGroup) -> "TeacherRecords":
        return TeacherRecords(self, group)

    def stale_indexes(self) -> list[str]:
        """Why each ignored epoch index was ignored (it lists a unit whose own ledger entry is gone)."""
        return [self._ledger.stale[e] for e in sorted(self._ledger.stale)]

    def indexed_epochs(self) -> list[int]:
        """The epochs whose ledger entries were read from an epoch index."""
        return sorted(self._ledger.indexes)

    def stored_size(self) -> tuple[int, int]:
        """(bytes, files) of the cache's files, from the ledger's byte counts and one size per metadata file:
        no request per unit. The claims of writers at work are not part of the cache and are not counted."""
        sizes = self.location.sizes(metadata_keys())
        shards = [meta.get("bytes") or 0 for entry in self.ledger.values() for meta in entry.files.values()]
        size = sum(shards) + self._ledger.ledger_bytes + sum(v for v in sizes.values() if v is not None)
        files = len(shards) + self._ledger.ledger_files + sum(v is not None for v in sizes.values())
        return size, files

    def digest(self) -> str:
        """The content digest (kdcache.format.digest): the root's lines, then each added teacher's, in name order."""
        teachers = [(group, self.teacher_records(name).own_ledger.values()) for name, group in self.groups.items()]
        return content_digest(self.manifest, self.subset, self.ledger.values(), teachers=teachers)

    @property
    def num_classes(self) -> int:
        return self.manifest.teacher.num_classes

    def samples(self) -> dict[str, np.ndarray]:
        """The plan: per slot, the source index (-1 for padding), label, digest and key."""
        out = {}
        for name in SAMPLE_ARRAYS:
            try:
                out[name] = self._array(f"samples/{name}", chunk_keys=("c/0",))[...]
            except FormatError:
                raise
            except Exception as exc:  # a damaged chunk fails to decode
                raise ChecksumError(f"{self.location}: samples/{name} cannot be decoded ({exc})") from None
            expected = self.manifest.samples_sha256.get(name)
            if expected and sample_array_sha256(name, out[name]) != expected:
                raise ChecksumError(f"{self.location}: samples/{name} does not match its checksum in the manifest")
        planned = out["source_index"] >= 0
        for block in range(self.layout.num_blocks):  # the manifest's block sizes must be the plan's
            held = int(planned[block * self.layout.block_capacity : (block + 1) * self.layout.block_capacity].sum())
            if len(planned) != self.layout.num_slots or held != self.layout.sizes[block] or not planned[self.layout.block_slots(block)].all():
                raise FormatError(f"{self.location}: manifest field blocks.sizes says block {block} holds {self.layout.sizes[block]} "
                                  f"samples, the plan (samples/source_index) {held}; the manifest was edited or damaged")
        return out

    def _array(self, name: str, *, chunk_keys: tuple[str, ...] = ()):
        """Array ``name`` from its metadata and the given chunk files, read through the Location (any store)."""
        import zarr
        from zarr.storage import MemoryStore

        meta = self.location.read(f"{name}/zarr.json")
        if meta is None:
            raise FormatError(f"{self.location}: array {name} is missing ({name}/zarr.json)")
        contents = {"zarr.json": _buffer(meta)}
        for key in chunk_keys:
            data = self.location.read(f"{name}/{key}")
            if data is None:
                raise FormatError(f"{self.location}: array {name} is missing its chunk {name}/{key}")
            contents[key] = _buffer(data)
        try:
            return zarr.open_array(MemoryStore(contents), mode="r")
        except Exception as exc:  # zarr raises several types for corrupt metadata
            raise FormatError(f"{self.location}: array {name} cannot be opened ({exc})") from None

    def _meta(self, array: str) -> bytes:
        """A record array's metadata, kept only once it is found to agree with the manifest."""
        if array not in self._array_meta:
            data = self.location.read(f"{array}/zarr.json")
            if data is None:
                raise FormatError(f"{self.location}: array metadata {array}/zarr.json is missing")
            self._check_meta(array, data)
            self._array_meta[array] = data
        return self._array_meta[array]

    def _check_meta(self, array: str, data: bytes) -> None:
        """Refuse array metadata that cannot be read or that disagrees with the manifest, naming the field."""
        import zarr
        from zarr.storage import MemoryStore

        try:
            opened = zarr.open_array(MemoryStore({"zarr.json": _buffer(data)}), mode="r")
            shape, dtype, chunks, shards = tuple(opened.shape), np.dtype(opened.dtype), tuple(opened.chunks), tuple(opened.shards or ())
        except Exception as exc:  # zarr raises several types for corrupt metadata
            raise FormatError(f"{self.location}: array metadata {array}/zarr.json cannot be read ({exc})") from None
        m, layout = self.manifest, self.layout
        width = {"values": "k", "indices": "k", "tail": "tail", "params": "param_fields"}[array], record_width(m, array)
        checks = [
            ("epochs", m.epochs, len(shape) == 3 and shape[0] >= m.epochs),  # more: a kill while adding epochs
            ("blocks.block_capacity", layout.block_capacity, chunks[1:2] == (layout.block_capacity,)),
            ("blocks.blocks_per_unit", layout.blocks_per_unit, shards[1:2] == (layout.block_capacity * layout.blocks_per_unit,)),
            ("blocks.sizes", layout.sizes, len(shape) == 3 and shape[1] == layout.num_slots),
            (width[0], getattr(m, width[0]), len(shape) == 3 and shape[2] == width[1]),
            (f"dtypes.{array}", m.dtypes[array], dtype == np.dtype(m.dtypes[array])),
        ]
        for name, value, agrees in checks:
            if not agrees:
                raise FormatError(f"{self.location}: manifest field {name} = {_short(value)} disagrees with {array}/zarr.json "
                                  f"(shape {list(shape)}, dtype {dtype}, chunks {list(chunks)}, shards {list(shards)}); "
                                  "the manifest or the array metadata was edited or damaged")

    def _describe(self, epoch: int, unit: int) -> str:
        blocks = self.layout.unit_blocks(unit)
        return f"epoch {epoch} unit {unit} (blocks {blocks.start}..{blocks.stop - 1})"

    def repair_advice(self) -> str:
        """What to do about a damaged unit: repair a local cache; a URL or an archive is someone else's copy."""
        if self.location.local:
            return "recompute it with kdcache precompute-logits --resume --repair"
        return ("this copy is read-only (a URL or an archive): fetch a fresh copy, or tell whoever publishes the cache "
                "(they can repair it with kdcache precompute-logits --resume --repair)")

    def _unit_bytes(self, epoch: int, unit: int, *, fresh: bool = False) -> dict[str, bytes]:
        """The shard files of one committed unit, read whole and checked against the ledger (LRU of 2).

        ``fresh``: read again even if cached, and check the sha256 even if checks are off.
        """
        kept = self._kept_unit(epoch, unit, fresh)
        if kept is not None:
            return kept
        entry = self.ledger.get((epoch, unit))
        if entry is None:
            raise IncompleteCacheError(
                f"{self.location}: {self._describe(epoch, unit)} is not committed; "
                + self.FINISH
            )
        files = {}
        keys = [shard_key(array, epoch, unit) for array in self.ARRAYS]
        check = fresh or self.verify_checksums
        agree = check and self._ledger.indexed(epoch, unit)  # its own entry must say what the epoch index says
        try:
            fetched = self.location.read_many(keys + [ledger_key(epoch, unit)] if agree else keys)
        except ChecksumError as exc:  # a zip archive's member failing its CRC-32
            key = next((k for k in keys if k in str(exc)), None)
            if key is None:
                raise
            raise ChecksumError(f"{self.location}: {self._describe(epoch, unit)}: file {key} is damaged in the archive "
                                "(its CRC-32 does not match); fetch or export the archive again") from None
        if agree:
            check_agreement(self.location, entry, fetched[ledger_key(epoch, unit)])
        for array, key in zip(self.ARRAYS, keys):
            data = fetched[key]
            if data is None:
                raise IncompleteCacheError(f"{self.location}: {self._describe(epoch, unit)}: file {key} is missing")
            expected = entry.files.get(key, {}).get("sha256")
            if check and sha256_bytes(data) != expected:
                raise ChecksumError(
                    f"{self.location}: {self._describe(epoch, unit)}: file {key} does not match its ledger checksum; "
                    + self.repair_advice()
                )
            files[array] = data
        return self._keep_unit(epoch, unit, files)

    def _decode(self, array: str, epoch: int, unit: int, data: bytes, rows: slice) -> np.ndarray:
        import zarr
        from zarr.storage import MemoryStore

        store = MemoryStore({"zarr.json": _buffer(self._meta(array)), f"c/{epoch}/{unit}/0": _buffer(data)})
        try:
            return zarr.open_array(store, mode="r")[epoch, rows]
        except Exception as exc:  # a damaged chunk fails its crc32c or cannot be decompressed
            raise ChecksumError(
                f"{self.location}: {self._describe(epoch, unit)}: file {shard_key(array, epoch, unit)} cannot be decoded ({exc})"
            ) from None

    def read_unit(self, epoch: int, unit: int, *, fresh: bool = False) -> dict[str, np.ndarray]:
        """All record arrays of one committed unit, ``[unit slots, ...]``, checksums verified."""
        blocks = self.layout.unit_blocks(unit)
        rows = slice(blocks.start * self.layout.block_capacity, blocks.stop * self.layout.block_capacity)
        files = self._unit_bytes(epoch, unit, fresh=fresh)
        return {array: self._decode(array, epoch, unit, files[array], rows) for array in self.ARRAYS}

    def read_block(self, epoch: int, block: int, *, arrays=None) -> dict[str, np.ndarray]:
        """The record arrays (``arrays``, default all) of one block, ``[block size, ...]``: one inner chunk of its (verified) unit."""
        unit = self.layout.unit_of(block)
        files = self._unit_bytes(epoch, unit)
        rows = self.layout.block_slots(block)
        return {array: self._decode(array, epoch, unit, files[array], rows) for array in (arrays or self.ARRAYS)}

    def check_own_entry(self, epoch: int, unit: int) -> None:
        """A unit read from an epoch index: its own ledger entry must say the same (kdcache.format.ledger.check_agreement)."""
        if self._ledger.indexed(epoch, unit):
            check_agreement(self.location, self.ledger[epoch, unit], self.location.read(ledger_key(epoch, unit)))

    def verify_unit(self, epoch: int, unit: int) -> None:
        """Re-hash one unit's files against the ledger (raises ChecksumError / IncompleteCacheError)."""
        self.read_unit(epoch, unit, fresh=True)


class TeacherRecords(Cache):
    """An added teacher's records (``teachers/NAME/``) over the root's views: read like a cache.

    Its manifest is the root's with this teacher's fields (:meth:`TeacherGroup.records_manifest`);
    ``read_block`` gives its values, indices and tail with the root's params; the plan is the root's.
    A unit is held only when both the root and this teacher have committed it (``ledger``);
    ``own_ledger`` is every entry of the group's own ledger.
    """

    ARRAYS = TEACHER_ARRAYS

    def __init__(self, root: Cache, group: TeacherGroup):
        self.root, self.group, self.name = root, group, group.name
        self.location = root.location.child(group_dir(group.name))
        self.FINISH = f"score it with kdcache add-teacher {root.location} --name {group.name} (it resumes)"
        self.manifest, self.subset = group.records_manifest(root.manifest), root.subset
        self.layout = self.manifest.blocks
        self.verify_checksums = root.verify_checksums
        self._array_meta, self._units, self._lock = {}, OrderedDict(), threading.Lock()
        self._groups, self._teacher_views = {}, {}
        for array in self.ARRAYS:
            self._meta(array)
        self.refresh()

    def refresh(self) -> None:
        self.root.refresh()
        self._ledger = load_ledger(self.location)
        self.own_ledger: dict[tuple[int, int], LedgerEntry] = self._ledger.entries
        self.ledger = {key: entry for key, entry in self.own_ledger.items() if key in self.root.ledger}

    def _meta(self, array: str) -> bytes:
        if array not in self._array_meta:
            data = self.location.read(f"{array}/zarr.json")
            if data is None:
                raise FormatError(f"{self.location}: array metadata {array}/zarr.json is missing")
            try:  # the root may have more epochs than when this group was made: its arrays grow as it scores them
                meta = json.loads(data)
                meta["shape"][0] = max(int(meta["shape"][0]), self.manifest.epochs)
                data = json.dumps(meta).encode()
            except (ValueError, TypeError, KeyError, IndexError, RecursionError):
                pass  # refused, naming the file, by the check below
            self._check_meta(array, data)
            self._array_meta[array] = data
        return self._array_meta[array]

    def samples(self) -> dict[str, np.ndarray]:
        return self.root.samples()

    def read_block(self, epoch: int, block: int, *, arrays=None) -> dict[str, np.ndarray]:
        """This teacher's records of one block, with the root's params of its views."""
        wanted = arrays or RECORD_ARRAYS
        records = super().read_block(epoch, block, arrays=[a for a in wanted if a != "params"])
        if "params" in wanted:
            records["params"] = self.root.read_block(epoch, block, arrays=["params"])["params"]
        return records

    def stored_size(self) -> tuple[int, int]:
        """(bytes, files) of this teacher's group: its shard files, ledger and metadata."""
        keys = ["zarr.json", *(f"{array}/zarr.json" for array in self.ARRAYS)]
        sizes = self.location.sizes(keys)
        shards = [meta.get("bytes") or 0 for entry in self.own_ledger.values() for meta in entry.files.values()]
        size = sum(shards) + self._ledger.ledger_bytes + sum(v for v in sizes.values() if v is not None)
        return size, len(shards) + self._ledger.ledger_files + sum(v is not None for v in sizes.values())

    def repair_advice(self) -> str:
        if self.location.local:
            return "score it again with kdcache add-teacher ... --repair"
        return "this copy is read-only (a URL or an archive): fetch a fresh copy, or tell whoever publishes the cache"

    def digest(self) -> str:
        return self.root.digest()


def _buffer(data: bytes):
    from zarr.core.buffer import default_buffer_prototype

    return default_buffer_prototype().buffer.from_bytes(data)


def open_cache(location: str | os.PathLike, *, verify_checksums: bool = True) -> Cache:
    """Open a cache for reading; raises FormatError if it is not a readable kdcache cache."""
    loc = Location(location)
    if not loc.remote and not loc.path.exists():
        raise FormatError(f"cache {location} does not exist")
    if loc.local and not loc.path.is_dir():
        raise FormatError(f"cache {location} is a file, not a cache directory (a cache is a directory holding zarr.json, "
                          "or a .zip archive of one)")
    from kdcache.format.wds import open_wds  # a webdataset export (kdcache export --format wds) holds its own index

    exported = open_wds(loc, verify_checksums=verify_checksums)
    if exported is not None:
        return exported
    return Cache(location, verify_checksums=verify_checksums)
