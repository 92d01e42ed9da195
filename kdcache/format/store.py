"""Codecs, file keys, checksums, and the JSON files of a cache: root attributes and ledger entries."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from kdcache.errors import FormatError
from kdcache.location import Location
from kdcache.format.manifest import LEDGER_DIR, MANIFEST_KEY, RECORD_ARRAYS, SAMPLE_ARRAYS, Manifest, SUBSET_KEY, Subset


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


def npy_bytes(array: np.ndarray) -> bytes:
    """The ``.npy`` bytes of an array, in format version 1.0 (a stable header)."""
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(array), version=(1, 0), allow_pickle=False)
    return buffer.getvalue()


def index_dtype(num_classes: int) -> np.dtype:
    """The smallest unsigned integer dtype that holds every class index."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if num_classes - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"num_classes={num_classes} does not fit in uint32")


def record_dtypes(num_classes: int) -> dict:
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


def entry_from_dict(data: Any, where: str) -> LedgerEntry:
    """A ledger entry from its JSON object (a ledger file, or one item of an epoch index)."""
    try:
        entry = LedgerEntry(int(data["epoch"]), int(data["unit"]), dict(data["files"]), int(data["views"]), str(data["committed"]))
        if not all(isinstance(f, dict) and isinstance(f.get("sha256"), str) for f in entry.files.values()):
            raise ValueError("files: expected {shard key: {sha256, bytes}}")
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise FormatError(f"{where} is malformed ({exc!r})") from None
    return entry


def entry_to_dict(entry: LedgerEntry) -> dict:
    return dataclasses.asdict(entry)


def parse_ledger_bytes(location: Location, name: str, data: bytes) -> LedgerEntry:
    """The ledger entry ``ledger/NAME`` from its bytes; it must commit the unit its name says."""
    where = f"{location}: ledger entry {name}"
    try:
        parsed = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise FormatError(f"{location}: ledger entry {LEDGER_DIR}/{name} is not valid JSON ({exc})") from None
    entry = entry_from_dict(parsed, where)
    if f"{LEDGER_DIR}/{name}" != ledger_key(entry.epoch, entry.unit):
        raise FormatError(f"{where} is malformed (it commits epoch {entry.epoch} unit {entry.unit})")
    return entry


def parse_ledger(location: Location, name: str) -> LedgerEntry:
    data = location.read(f"{LEDGER_DIR}/{name}")
    if data is None:
        raise FormatError(f"{location}: ledger entry {LEDGER_DIR}/{name} is missing")
    return parse_ledger_bytes(location, name, data)


def canonical_json(value: Any) -> bytes:
    """The one byte encoding of a JSON value that checksums and the content digest hash (docs/format.md).

    Keys sorted, no whitespace, ASCII only (other characters as lower-case ``\\uXXXX`` escapes),
    integers in decimal, floats as Python's ``repr``; NaN and infinities are refused.
    """
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def metadata_keys() -> list[str]:
    """Every file of a cache besides its shard files and its ledger: the root, the arrays' metadata, the plan."""
    keys = ["zarr.json", *(f"{array}/zarr.json" for array in RECORD_ARRAYS), "samples/zarr.json"]
    return keys + [f"samples/{name}/{file}" for name in SAMPLE_ARRAYS for file in ("zarr.json", "c/0")]
