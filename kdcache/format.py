"""The on-disk cache format (v1): the only reader and writer of kdcache stores.

Layout (a zarr v3 hierarchy; docs/format.md is the spec):

    CACHE/zarr.json                  root group; attributes["kdcache"] = the manifest (written last, atomically),
                                     attributes["kdcache_subset"] = what a subset holds (optional, kdcache export)
    CACHE/values/                    fp16   [epochs, slots, k]   top-k teacher logits, sorted descending
    CACHE/indices/                   uint*  [epochs, slots, k]   their class indices
    CACHE/tail/                      fp16   [epochs, slots, 2]   tail summary (kdcache.record)
    CACHE/params/                    fp32   [epochs, slots, P]   augmentation parameters (manifest "param_fields")
    CACHE/samples/{source_index,label,digest,key}   [slots]      the plan: which sample sits in each slot
    CACHE/ledger/e{E:06d}-u{U:06d}.json                          one file per committed unit, with sha256 per shard file

Slots: block b occupies slots [b * block_capacity, b * block_capacity + size_b); the rest of
its capacity is padding (never read, compressed away). One inner zarr chunk holds one
(epoch, block); one zarr shard file holds one *unit* = (epoch, ``blocks_per_unit`` consecutive
blocks), the unit of work: exactly one writer per shard file, so concurrent ranks never share
a file. A unit exists for readers only once its ledger entry is on disk, and the ledger entry
is written only after the unit's shard files are durable (fsync) and their sha256 recorded.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import glob
import hashlib
import json
import os
import shutil
import socket
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kdcache.errors import ChecksumError, ConfigError, FormatError, IncompleteCacheError, MismatchError
from kdcache.location import Location, fsync_dir, atomic_write_bytes, fsync_file

FORMAT_VERSION = 1
MANIFEST_KEY = "kdcache"
SUBSET_KEY = "kdcache_subset"  # optional root attribute: what `kdcache export` kept (docs/format.md)
RECORD_ARRAYS = ("values", "indices", "tail", "params")
SAMPLE_ARRAYS = ("source_index", "label", "digest", "key")
LEDGER_DIR = "ledger"


# ---- manifest --------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class TeacherInfo:
    name: str
    source: str  # "timm" (timm name + checkpoint file) or "file" (a saved whole model)
    checkpoint: str | None
    weights_sha256: str
    num_classes: int
    class_names: list[str]
    input_size: list[int]
    interpolation: str
    mean: list[float]
    std: list[float]


@dataclass(frozen=True, kw_only=True)
class DatasetInfo:
    kind: str
    uri: str
    split: str
    num_samples: int
    num_classes: int
    class_names: list[str]
    digest: str  # sha256 over the per-sample digests in slot order
    shards: list[list] | None = None  # webdataset: [[url, n_samples], ...]


@dataclass(frozen=True, kw_only=True)
class BlockLayout:
    kind: str  # "permutation" (indexable sources) or "shards" (one block per webdataset shard)
    block_capacity: int
    blocks_per_unit: int
    sizes: list[int]
    permutation_seed: int | None = None

    @property
    def num_blocks(self) -> int:
        return len(self.sizes)

    @property
    def num_units(self) -> int:
        return -(-self.num_blocks // self.blocks_per_unit)

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_capacity

    def unit_blocks(self, unit: int) -> range:
        start = unit * self.blocks_per_unit
        return range(start, min(start + self.blocks_per_unit, self.num_blocks))

    def unit_of(self, block: int) -> int:
        return block // self.blocks_per_unit

    def block_slots(self, block: int) -> slice:
        start = block * self.block_capacity
        return slice(start, start + self.sizes[block])


@dataclass(frozen=True, kw_only=True)
class Manifest:
    format_version: int
    tool_version: str
    created: str
    command: str
    teacher: TeacherInfo
    dataset: DatasetInfo
    augmentation: dict
    seed: int
    epochs: int
    k: int
    dtypes: dict
    tail: dict
    param_fields: list[str]
    replay: dict
    blocks: BlockLayout
    libraries: dict
    compression: dict
    batch_size: int = 256  # the teacher's batch size in precompute; verify re-scores blocks in the same batches
    samples_sha256: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "manifest") -> "Manifest":
        if not isinstance(data, dict):
            raise FormatError(f"{where}: expected a JSON object, found {type(data).__name__}")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise FormatError(
                f"{where}: format_version {version!r} is not supported by this kdcache (reads version {FORMAT_VERSION}); "
                "upgrade kdcache or re-create the cache"
            )
        try:
            fields = dict(data)
            fields["teacher"] = _build(TeacherInfo, fields["teacher"], f"{where}.teacher")
            fields["dataset"] = _build(DatasetInfo, fields["dataset"], f"{where}.dataset")
            fields["blocks"] = _build(BlockLayout, fields["blocks"], f"{where}.blocks")
            manifest = _build(cls, fields, where)
        except KeyError as exc:
            raise FormatError(f"{where}: missing field {exc.args[0]!r}") from None
        manifest.validate(where)
        return manifest

    def validate(self, where: str = "manifest") -> None:
        def bad(name, value, expected):
            raise FormatError(f"{where}: field {name} = {value!r}; expected {expected}")

        for name in ("seed", "epochs", "k", "batch_size"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                bad(name, getattr(self, name), "an integer")
        for name, value in (("teacher.num_classes", self.teacher.num_classes), ("dataset.num_classes", self.dataset.num_classes),
                            ("dataset.num_samples", self.dataset.num_samples)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                bad(name, value, "a positive integer")
        size = self.teacher.input_size
        if not isinstance(size, list) or len(size) != 3 or not all(isinstance(v, int) and v > 0 for v in size):
            bad("teacher.input_size", size, "[channels, height, width] as positive integers")
        if not isinstance(self.replay, dict) or self.replay.get("path") not in ("pil", "tensor"):
            bad("replay", self.replay, "an object with path 'pil' or 'tensor'")
        tail = self.tail
        if not isinstance(tail, dict) or not isinstance(tail.get("betas"), list) or len(tail["betas"]) != 2:
            bad("tail", tail, "an object with two 'betas'")
        if not isinstance(self.augmentation, dict):
            bad("augmentation", self.augmentation, "an object (the augmentation spec)")
        if not isinstance(self.samples_sha256, dict):
            bad("samples_sha256", self.samples_sha256, "an object")
        if not isinstance(self.compression, dict):
            bad("compression", self.compression, "an object")
        if not isinstance(self.blocks.kind, str) or self.blocks.kind not in ("permutation", "shards"):
            bad("blocks.kind", self.blocks.kind, "'permutation' or 'shards'")
        if self.epochs < 1:
            bad("epochs", self.epochs, "at least 1")
        if not 1 <= self.k <= self.teacher.num_classes:
            bad("k", self.k, f"1..{self.teacher.num_classes}")
        if self.dataset.num_classes != self.teacher.num_classes:
            bad("dataset.num_classes", self.dataset.num_classes, f"the teacher's {self.teacher.num_classes}")
        layout = self.blocks
        if not isinstance(layout.sizes, list) or not layout.sizes or not all(isinstance(s, int) and s > 0 for s in layout.sizes):
            bad("blocks.sizes", layout.sizes, "a non-empty list of positive integers")
        if not isinstance(layout.block_capacity, int) or max(layout.sizes) > layout.block_capacity:
            bad("blocks.block_capacity", layout.block_capacity, f">= the largest block ({max(layout.sizes)})")
        if not isinstance(layout.blocks_per_unit, int) or layout.blocks_per_unit < 1:
            bad("blocks.blocks_per_unit", layout.blocks_per_unit, "a positive integer")
        if sum(layout.sizes) != self.dataset.num_samples:
            bad("blocks.sizes", f"sum {sum(layout.sizes)}", f"dataset.num_samples = {self.dataset.num_samples}")
        if not isinstance(self.param_fields, list) or not all(isinstance(f, str) for f in self.param_fields):
            bad("param_fields", self.param_fields, "a list of names")
        for name in RECORD_ARRAYS:
            try:
                np.dtype(self.dtypes[name])
            except (KeyError, TypeError, ValueError):
                bad(f"dtypes.{name}", self.dtypes.get(name) if isinstance(self.dtypes, dict) else self.dtypes, "a numpy dtype name")

    def spec(self):
        """The augmentation spec; the parameter columns it implies must be the manifest's ``param_fields``."""
        from kdcache.augment import AugSpec, param_fields

        spec = AugSpec.from_dict(self.augmentation)
        if list(param_fields(spec)) != self.param_fields:
            raise FormatError(f"manifest: field param_fields = {self.param_fields}, but the augmentation spec stores "
                              f"{list(param_fields(spec))}; the manifest was edited or damaged")
        return spec


def _build(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise FormatError(f"{where}: expected a JSON object, found {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise FormatError(f"{where}: unknown fields {unknown}")
    try:
        return cls(**data)
    except TypeError as exc:
        raise FormatError(f"{where}: {exc}") from None


@dataclass(frozen=True, kw_only=True)
class Subset:
    """What ``kdcache export`` kept of a cache: root attribute ``kdcache_subset`` (optional, docs/format.md).

    A cache without it is meant to hold every unit of every planned epoch; one with it holds
    exactly these epochs x units (whole units, so whole blocks), and readers use only those.
    """

    epochs: list[int]  # sorted, without repeats, each < manifest.epochs
    units: list[int]  # sorted, without repeats, each < the layout's num_units
    source: str  # where it was exported from (a path, URL or archive; for a merge, its inputs)
    exported: str  # UTC time of the export

    def blocks(self, layout: "BlockLayout") -> list[int]:
        return [b for u in self.units for b in layout.unit_blocks(u)]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def of(cls, manifest: "Manifest", units, *, source: "str | Location") -> "Subset | None":
        """The declaration of a cache holding ``units``, (epoch, unit) pairs making up epochs x units.

        None when they are every unit of every planned epoch: a whole cache declares nothing.
        ``source``: where it came from; a local location is recorded as an absolute path.
        """
        if isinstance(source, Location):
            source = str(source) if source.remote else os.path.abspath(source.path)
        pairs = {(int(e), int(u)) for e, u in units}
        epochs, kept = sorted({e for e, _ in pairs}), sorted({u for _, u in pairs})
        if len(pairs) != len(epochs) * len(kept):
            raise ValueError(f"units {sorted(pairs)} do not make up epochs x units")
        if epochs == list(range(manifest.epochs)) and kept == list(range(manifest.blocks.num_units)):
            return None
        return cls(epochs=epochs, units=kept, source=source, exported=now_iso())

    @classmethod
    def from_dict(cls, data: Any, manifest: "Manifest", *, where: str = SUBSET_KEY) -> "Subset":
        if not isinstance(data, dict):
            raise FormatError(f"{where}: expected a JSON object, found {type(data).__name__}")
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in data]
        if missing:
            raise FormatError(f"{where}: missing field {missing[0]!r}")
        subset = _build(cls, data, where)
        for name, limit in (("epochs", manifest.epochs), ("units", manifest.blocks.num_units)):
            value = getattr(subset, name)
            if (not isinstance(value, list) or not value
                    or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < limit for v in value)
                    or value != sorted(set(value))):
                raise FormatError(f"{where}: field {name} = {_short(value)}; expected a non-empty sorted list of distinct "
                                  f"integers in 0..{limit - 1}")
        for name in ("source", "exported"):
            if not isinstance(getattr(subset, name), str):
                raise FormatError(f"{where}: field {name} = {_short(getattr(subset, name))}; expected a string")
        return subset


def library_versions() -> dict:
    import numcodecs
    import torch
    import zarr

    return {
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "zarr": zarr.__version__,
        "numcodecs": numcodecs.__version__,
        "torch": torch.__version__,
    }


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


# ---- codecs and paths -------------------------------------------------------------------------

#: Compression per record array, chosen by measurement (benchmarks/storage.py, docs/benchmarks.md).
COMPRESSION = {
    "values": {"codec": "blosc", "cname": "zstd", "clevel": 9, "shuffle": "shuffle"},
    "indices": {"codec": "blosc", "cname": "zstd", "clevel": 9, "shuffle": "shuffle"},
    "tail": {"codec": "blosc", "cname": "zstd", "clevel": 9, "shuffle": "shuffle"},
    "params": {"codec": "blosc", "cname": "zstd", "clevel": 9, "shuffle": "shuffle"},
}


def _compressors(config: dict, dtype: np.dtype) -> list:
    from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

    if config["codec"] == "blosc":
        codec = BloscCodec(cname=config["cname"], clevel=config["clevel"], shuffle=config["shuffle"], typesize=dtype.itemsize)
    elif config["codec"] == "zstd":
        codec = ZstdCodec(level=config["clevel"])
    else:
        raise FormatError(f"compression codec {config['codec']!r}; expected blosc or zstd")
    return [codec, Crc32cCodec()]


def record_dtypes(num_classes: int) -> dict:
    from kdcache.record import index_dtype

    return {"values": "float16", "indices": index_dtype(num_classes).name, "tail": "float16", "params": "float32"}


def shard_key(array: str, epoch: int, unit: int) -> str:
    """The store key of one unit's shard file of a record array."""
    return f"{array}/c/{epoch}/{unit}/0"


def ledger_key(epoch: int, unit: int) -> str:
    return f"{LEDGER_DIR}/e{epoch:06d}-u{unit:06d}.json"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sample_array_sha256(name: str, data: np.ndarray) -> str:
    """Checksum of one plan array: keys as newline-joined UTF-8, numbers as their little-endian bytes."""
    if name == "key":
        return sha256_bytes("\n".join(str(k) for k in data.tolist()).encode())
    return sha256_bytes(np.ascontiguousarray(data).astype(data.dtype.newbyteorder("<")).tobytes())


def _read_json(location: Location, key: str, what: str) -> Any:
    data = location.read(key)
    if data is None:
        raise FormatError(f"{location}: {what} {key} is missing")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise FormatError(f"{location}: {what} {key} is not valid JSON ({exc})") from None


def read_root(location: Location) -> tuple[Manifest, Subset | None]:
    """The manifest and, for a subset made by ``kdcache export``, what it kept (else None)."""
    root = _read_json(location, "zarr.json", "root metadata")
    if not isinstance(root, dict) or not isinstance(root.get("attributes"), dict) or MANIFEST_KEY not in root["attributes"]:
        raise FormatError(f"{location}: not a kdcache cache (zarr.json has no attributes.{MANIFEST_KEY})")
    manifest = Manifest.from_dict(root["attributes"][MANIFEST_KEY], where=f"{location}: manifest")
    subset = root["attributes"].get(SUBSET_KEY)
    if subset is not None:
        subset = Subset.from_dict(subset, manifest, where=f"{location}: attributes.{SUBSET_KEY}")
    return manifest, subset


def read_manifest(location: Location) -> Manifest:
    return read_root(location)[0]


@dataclass(frozen=True)
class LedgerEntry:
    epoch: int
    unit: int
    files: dict  # shard key -> {"sha256": ..., "bytes": ...}
    views: int
    committed: str


def _parse_ledger(location: Location, name: str) -> LedgerEntry:
    data = _read_json(location, f"{LEDGER_DIR}/{name}", "ledger entry")
    try:
        entry = LedgerEntry(int(data["epoch"]), int(data["unit"]), dict(data["files"]), int(data["views"]), str(data["committed"]))
        if not all(isinstance(f, dict) and isinstance(f.get("sha256"), str) for f in entry.files.values()):
            raise ValueError("files: expected {shard key: {sha256, bytes}}")
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise FormatError(f"{location}: ledger entry {name} is malformed ({exc!r})") from None
    if f"{LEDGER_DIR}/{name}" != ledger_key(entry.epoch, entry.unit):
        raise FormatError(f"{location}: ledger entry {name} is malformed (it commits epoch {entry.epoch} unit {entry.unit})")
    return entry


# ---- the reader -------------------------------------------------------------------------------


class HeldUnits:
    """Which units a cache holds, from its ``ledger`` and ``subset`` (shared by Cache and kdcache.wds.WdsCache).

    A cache is meant to hold its *held* units: a subset's declared epochs x units, else every
    unit of every planned epoch. A held unit without a ledger entry is missing: a precompute
    still in flight (or killed), or a damaged subset. Committed units outside a subset are ignored.
    """

    manifest: Manifest
    layout: BlockLayout
    ledger: dict
    subset: Subset | None

    def unit_committed(self, epoch: int, unit: int) -> bool:
        return (epoch, unit) in self.ledger

    # Readers keep an LRU of read units (``_units``) and a lock; neither travels into DataLoader workers.
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_units"], state["_lock"] = OrderedDict(), None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def complete_epochs(self) -> list[int]:
        """Epochs with every unit of the layout committed (a block subset has none)."""
        units = self.layout.num_units
        return [e for e in range(self.manifest.epochs) if all((e, u) in self.ledger for u in range(units))]

    def present_units(self) -> tuple[list[int], list[int]]:
        """(epochs with any committed unit, units committed in any epoch), sorted."""
        return sorted({e for e, _ in self.ledger}), sorted({u for _, u in self.ledger})

    def held_units(self) -> tuple[list[int], list[int]]:
        """(epochs, units) the cache is meant to hold: a subset's declared ones, else every planned epoch and unit."""
        if self.subset is not None:
            return list(self.subset.epochs), list(self.subset.units)
        return list(range(self.manifest.epochs)), list(range(self.layout.num_units))

    def held_blocks(self) -> list[int]:
        return [b for u in self.held_units()[1] for b in self.layout.unit_blocks(u)]

    def missing_units(self) -> list[tuple[int, int]]:
        """The held (epoch, unit) pairs without a ledger entry, in order."""
        epochs, units = self.held_units()
        return [(e, u) for e in epochs for u in units if (e, u) not in self.ledger]


class Cache(HeldUnits):
    """A kdcache cache opened for reading (local path or URL)."""

    def __init__(self, location: str | os.PathLike, *, verify_checksums: bool = True):
        self.location = Location(location)
        self.manifest, self.subset = read_root(self.location)
        self.layout = self.manifest.blocks
        self.verify_checksums = verify_checksums
        self._array_meta: dict[str, bytes] = {}
        self._units: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        for array in RECORD_ARRAYS:
            self._meta(array)  # array metadata that disagrees with the manifest is refused here, naming the field
        self.refresh()

    def refresh(self) -> None:
        """Re-read the ledger (units committed since opening become visible)."""
        entries = {}
        for name in self.location.listdir(LEDGER_DIR):
            if name.endswith(".json"):
                entry = _parse_ledger(self.location, name)
                entries[(entry.epoch, entry.unit)] = entry
        self.ledger: dict[tuple[int, int], LedgerEntry] = entries

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
        width = {"values": ("k", m.k), "indices": ("k", m.k), "tail": ("tail", 2), "params": ("param_fields", len(m.param_fields))}[array]
        checks = [
            ("epochs", m.epochs, len(shape) == 3 and shape[0] >= m.epochs),  # more: a kill while adding epochs
            ("blocks.block_capacity", layout.block_capacity, chunks[1:2] == (layout.block_capacity,)),
            ("blocks.blocks_per_unit", layout.blocks_per_unit, shards[1:2] == (layout.block_capacity * layout.blocks_per_unit,)),
            ("blocks.sizes", layout.sizes, len(shape) == 3 and shape[1] == layout.num_slots),
            (width[0], width[1], len(shape) == 3 and shape[2] == width[1]),
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
        with self._lock:
            cached = None if fresh else self._units.get((epoch, unit))
            if cached is not None:
                self._units.move_to_end((epoch, unit))
                return cached
        entry = self.ledger.get((epoch, unit))
        if entry is None:
            raise IncompleteCacheError(
                f"{self.location}: {self._describe(epoch, unit)} is not committed; "
                "resume the precompute (kdcache precompute-logits --resume) to finish it"
            )
        files = {}
        for array in RECORD_ARRAYS:
            key = shard_key(array, epoch, unit)
            try:
                data = self.location.read(key)
            except ChecksumError:  # a zip archive's member failing its CRC-32
                raise ChecksumError(f"{self.location}: {self._describe(epoch, unit)}: file {key} is damaged in the archive "
                                    "(its CRC-32 does not match); fetch or export the archive again") from None
            if data is None:
                raise IncompleteCacheError(f"{self.location}: {self._describe(epoch, unit)}: file {key} is missing")
            expected = entry.files.get(key, {}).get("sha256")
            if (fresh or self.verify_checksums) and sha256_bytes(data) != expected:
                raise ChecksumError(
                    f"{self.location}: {self._describe(epoch, unit)}: file {key} does not match its ledger checksum; "
                    + self.repair_advice()
                )
            files[array] = data
        with self._lock:
            self._units[(epoch, unit)] = files
            while len(self._units) > 2:
                self._units.popitem(last=False)
        return files

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
        return {array: self._decode(array, epoch, unit, files[array], rows) for array in RECORD_ARRAYS}

    def read_block(self, epoch: int, block: int) -> dict[str, np.ndarray]:
        """The record arrays of one block, ``[block size, ...]``: one inner chunk of its (verified) unit."""
        unit = self.layout.unit_of(block)
        files = self._unit_bytes(epoch, unit)
        rows = self.layout.block_slots(block)
        return {array: self._decode(array, epoch, unit, files[array], rows) for array in RECORD_ARRAYS}

    def verify_unit(self, epoch: int, unit: int) -> None:
        """Re-hash one unit's files against the ledger (raises ChecksumError / IncompleteCacheError)."""
        self.read_unit(epoch, unit, fresh=True)


def _buffer(data: bytes):
    from zarr.core.buffer import default_buffer_prototype

    return default_buffer_prototype().buffer.from_bytes(data)


def open_cache(location: str | os.PathLike, *, verify_checksums: bool = True) -> Cache:
    """Open a cache for reading; raises FormatError if it is not a readable kdcache cache."""
    loc = Location(location)
    if not loc.remote and not loc.path.exists():
        raise FormatError(f"cache {location} does not exist")
    from kdcache.wds import open_wds  # a webdataset export (kdcache export --format wds) holds its own index

    exported = open_wds(loc, verify_checksums=verify_checksums)
    if exported is not None:
        return exported
    return Cache(location, verify_checksums=verify_checksums)


# ---- the writer -------------------------------------------------------------------------------


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

    def uncommit(self, epoch: int, unit: int) -> None:
        """Drop a unit's ledger entry (before recomputing a damaged unit)."""
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


def check_compatible(existing: Manifest, wanted: Manifest) -> None:
    """Refuse to resume/extend a cache with anything that changes its records; names the field."""
    pairs = [
        ("teacher.weights_sha256", existing.teacher.weights_sha256, wanted.teacher.weights_sha256),
        ("teacher.name", existing.teacher.name, wanted.teacher.name),
        ("dataset.num_samples", existing.dataset.num_samples, wanted.dataset.num_samples),
        ("dataset.digest", existing.dataset.digest, wanted.dataset.digest),
        ("seed", existing.seed, wanted.seed),
        ("k", existing.k, wanted.k),
        ("batch_size", existing.batch_size, wanted.batch_size),
        ("augmentation", existing.augmentation, wanted.augmentation),
        ("blocks", dataclasses.asdict(existing.blocks), dataclasses.asdict(wanted.blocks)),
        ("replay.path", existing.replay.get("path"), wanted.replay.get("path")),
    ]
    for name, old, new in pairs:
        where = first_difference(name, old, new)
        if where is not None:
            field_name, old_value, new_value = where
            raise MismatchError(
                f"cannot resume: {field_name} differs: the cache has {_short(old_value)}, this run has {_short(new_value)}"
            )


def first_difference(name: str, old: Any, new: Any) -> tuple[str, Any, Any] | None:
    """The first (dotted field, old, new) where two JSON-like values differ, or None."""
    old, new = json.loads(json.dumps(old)), json.loads(json.dumps(new))
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=lambda k: (k != "name", k)):  # a spec's name says the most
            found = first_difference(f"{name}.{key}", old.get(key), new.get(key))
            if found is not None:
                return found
        return None
    return None if old == new else (name, old, new)


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else repr(value)
    return text if len(text) <= 120 else text[:117] + "..."
