"""The webdataset export of a cache: its teacher records in tar shards, with an index (container v1).

:func:`write_wds` writes a cache (any that :func:`kdcache.format.open_cache` opens) as plain tar
files (``kdcache export --format wds``, :func:`kdcache.export.export_wds`, adds the images), for teams whose data pipelines stream everything from tar shards; :class:`WdsCache`
reads such an export back through the subset of :class:`kdcache.format.Cache` that
``train-student``, ``verify``, ``info``, ``show`` and the loader use, so every command that reads
a cache takes an export too (path or URL); ``merge`` and ``export --format zarr|zip``, which copy
zarr shard files, refuse one. docs/format.md ("The webdataset export") is the spec.

    OUT/kdcache-wds.json          the index: container version, the cache's manifest (and, for an
                                  export of some epochs or units, the subset it declares), every file's sha256
    OUT/samples.tar               the plan: samples.{source_index,label,digest}.npy and samples.key.json
    OUT/eEEEEEE-uUUUUUU.tar       one shard per committed (epoch, unit): per block of the unit,
                                  eEEEEEE-bBBBBBB.{values,indices,tail,params}.npy, and with images
                                  per view eEEEEEE-bBBBBBB-pPPPPPP.{<image ext>,cls,key.txt}

One shard per (epoch, unit) because the unit is what a training read wants: the loader's
windows never cross a unit, so a window costs one sequential read of one file, verified once
(per (epoch, block) shards would cost ``window_blocks`` reads and, at ImageNet scale, about
375,000 files instead of 6,000). The unit is also the cache's unit of commit, so a shard is
exactly a committed ledger entry. Member names follow webdataset's grouping (key = the name up
to the first dot), so ``webdataset.WebDataset(urls)`` yields one dict per block and one per view.

The record arrays are stored as ``.npy`` (format 1.0) of the block's rows exactly as the cache
holds them (dtype, shape, bytes); padding slots are not stored. The format knowledge (record
arrays, dtypes, manifest, plan checksums) comes from the rest of :mod:`kdcache.format`.

The export is built in a hidden sibling directory, the index written last (atomically), and the
directory renamed into place: a killed or refused export leaves no output, and never an index
that claims missing shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from kdcache.errors import ChecksumError, ConfigError, FormatError, IncompleteCacheError
from kdcache.format.digest import content_digest
from kdcache.format.group import MAIN, TEACHER_ARRAYS, TeacherGroup
from kdcache.format.held import HeldUnits, SeveralTeachers
from kdcache.format.manifest import RECORD_ARRAYS, SAMPLE_ARRAYS, Manifest, Subset, now_iso, record_width
from kdcache.format.selection import default_selection, format_selection
from kdcache.format.store import LedgerEntry, npy_bytes, sample_array_sha256, sha256_bytes
from kdcache.location import Location, fsync_dir, atomic_write_bytes, is_url

#: The version of this container (the index's ``version``); the records inside follow the
#: cache format version of the manifest they carry.
WDS_VERSION = 1
#: The version of an export that holds added teachers' records too (an older reader refuses it rather than drop them).
WDS_TEACHERS_VERSION = 2
CONTAINER = "kdcache-wds"
INDEX_NAME = "kdcache-wds.json"
SAMPLES_NAME = "samples.tar"
_BLOCK_MEMBER = re.compile(r"e(\d{6,})-b(\d{6,})\.(\w+)\.npy$")
_VIEW_MEMBER = re.compile(r"e\d{6,}-b\d{6,}-p\d{6,}\.")
#: An added teacher's records of a block: ``eEEEEEE-bBBBBBB.teacher.NAME.{values,indices,tail}.npy``.
_TEACHER_MEMBER = re.compile(r"e(\d{6,})-b(\d{6,})\.teacher\.([A-Za-z0-9][A-Za-z0-9_.-]*)\.(values|indices|tail)\.npy$")


def shard_name(epoch: int, unit: int) -> str:
    return f"e{epoch:06d}-u{unit:06d}.tar"


def block_key(epoch: int, block: int) -> str:
    """The webdataset key of a block's record members."""
    return f"e{epoch:06d}-b{block:06d}"


def view_key(epoch: int, block: int, position: int) -> str:
    """The webdataset key of one view's image members (position = the sample's place in its block)."""
    return f"e{epoch:06d}-b{block:06d}-p{position:06d}"


def _load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


# ---- the writer -------------------------------------------------------------------------------


@dataclass
class WdsExport:
    output: str
    shards: int
    views: int
    epochs: list[int]
    images: bool
    bytes: int


def select_units(cache, epochs: Sequence[int] | None) -> list[tuple[int, int]]:
    """The (epoch, unit) pairs to export: the chosen epochs x every unit, as ``kdcache export`` chooses by default.

    Epochs None: those present (a subset's: those it holds). Units: all (a subset's: those it
    holds). A subset keeps the manifest; epochs keep their numbers. Each pair must be committed:
    an export has no holes.
    """
    m = cache.manifest
    present_epochs, units = default_selection(cache)
    chosen = present_epochs if epochs is None else sorted({int(e) for e in epochs})
    unknown = [e for e in chosen if not 0 <= e < m.epochs]
    if unknown:
        raise ConfigError(f"epochs {format_selection(chosen)}: {cache.location} has no epoch {unknown[0]} "
                          f"(its epochs are 0-{m.epochs - 1})")
    if not chosen or not cache.ledger:
        raise IncompleteCacheError(f"{cache.location}: no unit is committed; there is nothing to export")
    return [(e, u) for e in chosen for u in units]


def _check_committed(cache, units: list[tuple[int, int]]) -> None:
    for epoch, unit in units:
        if not cache.unit_committed(epoch, unit):
            blocks = cache.layout.unit_blocks(unit)
            raise IncompleteCacheError(
                f"{cache.location}: epoch {epoch} unit {unit} (blocks {blocks.start}..{blocks.stop - 1}) is not committed, "
                "so it cannot be exported; choose other epochs or finish the cache with kdcache precompute-logits --resume"
            )


def check_wds_output(output: Path) -> None:
    if is_url(str(output)):
        raise ConfigError(f"output {output}: the export writes a local directory, not a URL")
    if output.exists() and not output.is_dir():
        raise ConfigError(f"output {output} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()):
        raise ConfigError(f"output {output} exists and is not empty; choose a new directory")


def _write_tar(path: Path, groups) -> dict:
    """Write webdataset groups (dicts with ``__key__``) to ``path`` (temp, fsync, rename); its sha256 and size."""
    from webdataset import TarWriter

    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        with TarWriter(handle, encoder=False, mtime=0.0) as writer:  # mtime 0: the same cache gives the same bytes
            for group in groups:
                writer.write(group)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:  # hash what is on disk
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
            size += len(chunk)
    return {"sha256": digest.hexdigest(), "bytes": size}


def _plan_groups(plan: dict[str, np.ndarray]) -> list[dict]:
    members = {f"{name}.npy": npy_bytes(plan[name]) for name in SAMPLE_ARRAYS if name != "key"}
    members["key.json"] = json.dumps([str(k) for k in plan["key"].tolist()]).encode()
    return [{"__key__": "samples", **members}]


def _shard_groups(epoch: int, blocks: range, records: dict[int, dict], images: dict[int, list] | None, added=None):
    """``added``: each added teacher's records, name -> block -> arrays, stored beside the block's own."""
    for block in blocks:
        members = {f"{name}.npy": npy_bytes(records[block][name]) for name in RECORD_ARRAYS}
        for teacher, by_block in sorted((added or {}).items()):
            members.update({f"teacher.{teacher}.{name}.npy": npy_bytes(by_block[block][name]) for name in TEACHER_ARRAYS})
        yield {"__key__": block_key(epoch, block), **members}
        for position, (extension, data, label, key) in enumerate(images.get(block, []) if images else []):
            yield {
                "__key__": view_key(epoch, block, position),
                extension: data,
                "cls": str(label).encode("ascii"),
                "key.txt": key.encode("utf-8"),
            }


def write_wds(cache, output_dir: str | os.PathLike, units: Sequence[tuple[int, int]], *, images=None,
              command: str = "") -> WdsExport:
    """Write the committed ``units`` (epoch, unit) of an opened cache as a webdataset export in ``output_dir``.

    The manifest is the cache's, unchanged; the index is written last. ``images``: None, or a
    function of a unit giving, for each of its blocks, the views' image members as
    ``(extension, bytes, label, key)`` in block order, stored next to the block's records in
    every epoch's shard of that unit.
    """
    out = Path(output_dir)
    check_wds_output(out)
    m, layout = cache.manifest, cache.layout
    units = sorted({(int(e), int(u)) for e, u in units})
    _check_committed(cache, units)
    added = {name: cache.teacher_records(name) for name in getattr(cache, "teachers", [MAIN])[1:]}
    for teacher, records in added.items():  # every shard holds every teacher's records of its blocks
        lacking = [key for key in units if key not in records.ledger]
        if lacking:
            raise IncompleteCacheError(f"{cache.location}: the teacher records {teacher!r} lack epoch {lacking[0][0]} unit "
                                       f"{lacking[0][1]} ({len(lacking)} exported unit(s)); score them with kdcache "
                                       "add-teacher, or export other epochs or blocks")
    subset = Subset.of(m, units, source=cache.location)
    plan = cache.samples()

    tmp = out.parent / f".{out.name}.exporting-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        samples_file = {"file": SAMPLES_NAME, **_write_tar(tmp / SAMPLES_NAME, _plan_groups(plan))}
        shards, views, total = [], 0, samples_file["bytes"]
        by_unit: dict[int, list[int]] = {}
        for epoch, unit in units:
            by_unit.setdefault(unit, []).append(epoch)
        for unit in sorted(by_unit):
            blocks = layout.unit_blocks(unit)
            members = images(unit) if images is not None else None  # read once per unit, stored in each epoch's shard
            for epoch in by_unit[unit]:
                records = {block: cache.read_block(epoch, block) for block in blocks}
                others = {teacher: {block: view.read_block(epoch, block, arrays=list(TEACHER_ARRAYS)) for block in blocks}
                          for teacher, view in added.items()}
                name = shard_name(epoch, unit)
                written = _write_tar(tmp / name, _shard_groups(epoch, blocks, records, members, others))
                entry = cache.ledger[(epoch, unit)]
                shards.append({"file": name, "epoch": epoch, "unit": unit, "blocks": [blocks.start, blocks.stop - 1],
                               "views": entry.views, "committed": entry.committed, **written})
                views += entry.views
                total += written["bytes"]
        shards.sort(key=lambda s: (s["epoch"], s["unit"]))
        index = {
            "container": CONTAINER,
            "version": WDS_TEACHERS_VERSION if added else WDS_VERSION,
            "exported": now_iso(),
            "command": command,
            "source": str(cache.location),
            "images": images is not None,
            "manifest": m.to_dict(),
            **({"subset": subset.to_dict()} if subset is not None else {}),
            "arrays": {name: {"dtype": m.dtypes[name], "width": record_width(m, name)} for name in RECORD_ARRAYS},
            "samples": samples_file,
            "shards": shards,
            **({"teachers": {teacher: view.group.to_dict() for teacher, view in added.items()}} if added else {}),
        }
        atomic_write_bytes(tmp / INDEX_NAME, json.dumps(index, indent=1).encode())  # last: it commits the export
        check_wds_output(out)  # nothing appeared there meanwhile
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    exported = sorted({e for e, _ in units})
    return WdsExport(output=str(out), shards=len(shards), views=views, epochs=exported, images=images is not None, bytes=total)


# ---- the reader -------------------------------------------------------------------------------


def _fields(data: Any, where: str, required: dict[str, type]) -> dict:
    if not isinstance(data, dict):
        raise FormatError(f"{where}: expected a JSON object, found {type(data).__name__}")
    for name, kind in required.items():
        if name not in data:
            raise FormatError(f"{where}: missing field {name!r}")
        value = data[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise FormatError(f"{where}: field {name} = {value!r}; expected {kind.__name__}")
    return data


class WdsCache(SeveralTeachers, HeldUnits):
    """A webdataset export opened for reading (local path or URL): the Cache interface the commands use."""

    def __init__(self, location: str | os.PathLike | Location, *, verify_checksums: bool = True, index: bytes | None = None):
        self.location = location if isinstance(location, Location) else Location(location)
        self.verify_checksums = verify_checksums
        self._units: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self._load_index(index)

    def _load_index(self, data: bytes | None) -> None:
        where = f"{self.location}: {INDEX_NAME}"
        if data is None:
            data = self.location.read(INDEX_NAME)
        if data is None:
            raise FormatError(f"{where} is missing; not a kdcache webdataset export")
        try:
            index = json.loads(data)
        except ValueError as exc:
            raise FormatError(f"{where} is not valid JSON ({exc}); the export is damaged, export it again") from None
        if not isinstance(index, dict) or index.get("container") != CONTAINER:
            raise FormatError(f"{where}: not a kdcache webdataset index (container {_get(index, 'container')!r}, "
                              f"expected {CONTAINER!r})")
        known = [v for v in (WDS_VERSION, WDS_TEACHERS_VERSION) if v is not None]
        if index.get("version") not in known:
            raise FormatError(f"{where}: webdataset container version {index.get('version')!r} is not supported by this "
                              f"kdcache (reads {' and '.join(map(str, known))}); upgrade kdcache or export the cache again")
        _fields(index, where, {"manifest": dict, "arrays": dict, "samples": dict, "shards": list})
        self.manifest = Manifest.from_dict(index["manifest"], where=f"{where}: manifest")
        self.layout = self.manifest.blocks
        self.subset = None if index.get("subset") is None else Subset.from_dict(index["subset"], self.manifest, where=f"{where}: subset")
        for name in RECORD_ARRAYS:
            entry = _fields(index["arrays"].get(name), f"{where}: arrays.{name}", {"dtype": str, "width": int})
            if entry["dtype"] != self.manifest.dtypes[name]:
                raise FormatError(f"{where}: arrays.{name}.dtype = {entry['dtype']!r}; the manifest says {self.manifest.dtypes[name]!r}")
        self.arrays = index["arrays"]
        self.samples_file = _fields(index["samples"], f"{where}: samples", {"file": str, "sha256": str})
        ledger = {}
        for i, shard in enumerate(index["shards"]):
            s = _fields(shard, f"{where}: shards[{i}]",
                        {"file": str, "epoch": int, "unit": int, "views": int, "sha256": str, "bytes": int, "committed": str})
            if not (0 <= s["epoch"] < self.manifest.epochs and 0 <= s["unit"] < self.layout.num_units):
                raise FormatError(f"{where}: shards[{i}] is epoch {s['epoch']} unit {s['unit']}, outside the manifest's "
                                  f"{self.manifest.epochs} epoch(s) of {self.layout.num_units} unit(s)")
            if s["file"] != shard_name(s["epoch"], s["unit"]) or (s["epoch"], s["unit"]) in ledger:
                raise FormatError(f"{where}: shards[{i}] names {s['file']!r} for epoch {s['epoch']} unit {s['unit']}; "
                                  f"expected one entry named {shard_name(s['epoch'], s['unit'])!r}")
            ledger[(s["epoch"], s["unit"])] = LedgerEntry(s["epoch"], s["unit"], {s["file"]: {"sha256": s["sha256"], "bytes": s["bytes"]}},
                                                          s["views"], s["committed"])
        self.ledger: dict[tuple[int, int], LedgerEntry] = ledger
        self.images = bool(index.get("images"))
        self._index_bytes = len(data)
        teachers = index.get("teachers") if index.get("version") == WDS_TEACHERS_VERSION else None
        if teachers is not None and not isinstance(teachers, dict):
            raise FormatError(f"{where}: field teachers = {teachers!r}; expected an object of teacher groups")
        self.groups = {name: TeacherGroup.from_dict(group, self.manifest, where=f"{where}: teachers.{name}")
                       for name, group in sorted((teachers or {}).items())}
        for name, group in self.groups.items():
            if group.name != name:
                raise FormatError(f"{where}: teachers.{name} names the teacher {group.name!r}")
        self._teacher_views: dict = {}

    def _added_records(self, group: TeacherGroup) -> "WdsTeacherRecords":
        return WdsTeacherRecords(self, group)

    def digest(self) -> str:
        """The content digest over the export's own shard files, then each added teacher's group attributes."""
        return content_digest(self.manifest, self.subset, self.ledger.values(),
                              teachers=[(group, []) for group in self.groups.values()])

    def stored_size(self) -> tuple[int, int]:
        """(bytes, files) of the export, from its index's byte counts (no request per shard)."""
        shards = sum(meta.get("bytes") or 0 for entry in self.ledger.values() for meta in entry.files.values())
        return self._index_bytes + int(self.samples_file.get("bytes") or 0) + shards, 2 + len(self.ledger)

    def refresh(self) -> None:
        """Re-read the index (an export is written once, so this normally changes nothing)."""
        self._load_index(None)

    @property
    def num_classes(self) -> int:
        return self.manifest.teacher.num_classes

    def _array(self, name: str) -> SimpleNamespace:
        """Shape and dtype of a record array as the index declares them (what verify's structure check reads)."""
        entry = self.arrays[name]
        return SimpleNamespace(shape=(self.manifest.epochs, self.layout.num_slots, entry["width"]), dtype=np.dtype(entry["dtype"]))

    def samples(self) -> dict[str, np.ndarray]:
        """The plan: per slot, the source index (-1 for padding), label, digest and key (checked like a cache's)."""
        name = self.samples_file["file"]
        data = self.location.read(name)
        if data is None:
            raise FormatError(f"{self.location}: the plan {name} is missing")
        if self.verify_checksums and sha256_bytes(data) != self.samples_file["sha256"]:
            raise ChecksumError(f"{self.location}: the plan {name} does not match its sha256 in {INDEX_NAME}; export the cache again")
        members = _tar_members(data, f"{self.location}: the plan {name}")
        out = {}
        for array in SAMPLE_ARRAYS:
            member = f"samples.{array}.json" if array == "key" else f"samples.{array}.npy"
            if member not in members:
                raise FormatError(f"{self.location}: the plan {name} has no member {member}")
            try:
                if array == "key":
                    out[array] = np.array(json.loads(members[member]), dtype=np.dtypes.StringDType())
                else:
                    out[array] = _load_npy(members[member])
            except ValueError as exc:
                raise ChecksumError(f"{self.location}: the plan {name}: member {member} cannot be decoded ({exc})") from None
            expected = self.manifest.samples_sha256.get(array)
            if expected and sample_array_sha256(array, out[array]) != expected:
                raise ChecksumError(f"{self.location}: samples/{array} does not match its checksum in the manifest")
        return out

    def _describe(self, epoch: int, unit: int) -> str:
        blocks = self.layout.unit_blocks(unit)
        return f"epoch {epoch} unit {unit} (blocks {blocks.start}..{blocks.stop - 1}), shard {shard_name(epoch, unit)}"

    def _unit_blocks(self, epoch: int, unit: int, *, fresh: bool = False) -> dict[int, dict[str, np.ndarray]]:
        """One shard read whole (one sequential read), checked against the index, decoded per block (LRU of 2).

        ``fresh``: read again even if cached, and check the sha256 even if checks are off.
        """
        kept = self._kept_unit(epoch, unit, fresh)
        if kept is not None:
            return kept
        entry = self.ledger.get((epoch, unit))
        if entry is None:
            raise IncompleteCacheError(
                f"{self.location}: {self._describe(epoch, unit)} is not in this export; "
                "export it again from a cache where the unit is committed"
            )
        name = shard_name(epoch, unit)
        data = self.location.read(name)
        if data is None:
            raise IncompleteCacheError(f"{self.location}: {self._describe(epoch, unit)} is missing")
        if (fresh or self.verify_checksums) and sha256_bytes(data) != entry.files[name]["sha256"]:
            raise ChecksumError(f"{self.location}: {self._describe(epoch, unit)} does not match its sha256 in {INDEX_NAME}; "
                                "the file is damaged: fetch or export it again")
        return self._keep_unit(epoch, unit, self._decode(epoch, unit, data))

    def _decode(self, epoch: int, unit: int, data: bytes) -> dict[int, dict[str, np.ndarray]]:
        where = f"{self.location}: {self._describe(epoch, unit)}"
        wanted = self.layout.unit_blocks(unit)
        found: dict[int, dict[str, np.ndarray]] = {b: {} for b in wanted}
        for member, content in _tar_members(data, where, keep=lambda n: not _VIEW_MEMBER.match(n)).items():
            added = _TEACHER_MEMBER.match(member)
            if added is not None and int(added.group(1)) == epoch and int(added.group(2)) in found and added.group(3) in self.groups:
                try:
                    found[int(added.group(2))][f"teacher.{added.group(3)}.{added.group(4)}"] = _load_npy(content)
                except ValueError as exc:
                    raise ChecksumError(f"{where}: member {member} cannot be decoded ({exc})") from None
                continue
            match = _BLOCK_MEMBER.match(member)
            if match is None or int(match.group(1)) != epoch or int(match.group(2)) not in found or match.group(3) not in RECORD_ARRAYS:
                raise FormatError(f"{where}: unexpected member {member}")
            block, array = int(match.group(2)), match.group(3)
            try:
                found[block][array] = _load_npy(content)
            except ValueError as exc:
                raise ChecksumError(f"{where}: member {member} cannot be decoded ({exc})") from None
        m = self.manifest
        seen_by = {teacher: group.records_manifest(m) for teacher, group in self.groups.items()}
        for block, arrays in found.items():
            for array in RECORD_ARRAYS:
                member = f"{block_key(epoch, block)}.{array}.npy"
                if array not in arrays:
                    raise FormatError(f"{where}: block {block} has no member {member}")
                value = arrays[array]
                expected = (self.layout.sizes[block], record_width(m, array))
                if value.shape != expected or value.dtype != np.dtype(m.dtypes[array]):
                    raise FormatError(f"{where}: member {member} holds {value.dtype} {value.shape}; "
                                      f"the manifest says {m.dtypes[array]} {expected}")
            for teacher, group in self.groups.items():
                for array in TEACHER_ARRAYS:
                    member = f"{block_key(epoch, block)}.teacher.{teacher}.{array}.npy"
                    value = arrays.get(f"teacher.{teacher}.{array}")
                    expected = (self.layout.sizes[block], record_width(seen_by[teacher], array))
                    if value is None:
                        raise FormatError(f"{where}: block {block} has no member {member}")
                    if value.shape != expected or value.dtype != np.dtype(group.dtypes[array]):
                        raise FormatError(f"{where}: member {member} holds {value.dtype} {value.shape}; "
                                          f"its teacher group says {group.dtypes[array]} {expected}")
        return found

    def read_block(self, epoch: int, block: int, *, arrays=None) -> dict[str, np.ndarray]:
        """The record arrays (``arrays``, default all) of one block, ``[block size, ...]``, from its (verified) shard."""
        found = self._unit_blocks(epoch, self.layout.unit_of(block))[block]
        return {array: found[array] for array in (arrays or RECORD_ARRAYS)}

    def read_unit(self, epoch: int, unit: int, *, fresh: bool = False) -> dict[str, np.ndarray]:
        """All record arrays of one unit, ``[unit slots, ...]``, padding slots zero (as a cache stores them)."""
        blocks = self._unit_blocks(epoch, unit, fresh=fresh)
        capacity, m = self.layout.block_capacity, self.manifest
        span = self.layout.unit_blocks(unit)
        out = {}
        for array in RECORD_ARRAYS:
            full = np.zeros((len(span) * capacity, record_width(m, array)), dtype=m.dtypes[array])
            for i, block in enumerate(span):
                full[i * capacity : i * capacity + self.layout.sizes[block]] = blocks[block][array]
            out[array] = full
        return out

    def verify_unit(self, epoch: int, unit: int) -> None:
        """Re-hash one unit's shard against the index (raises ChecksumError / IncompleteCacheError)."""
        self._unit_blocks(epoch, unit, fresh=True)


class WdsTeacherRecords(HeldUnits):
    """An added teacher's records in a webdataset export: read like the export, from the members
    ``eEEEEEE-bBBBBBB.teacher.NAME.{values,indices,tail}.npy`` of its shards, with the export's params."""

    ARRAYS = TEACHER_ARRAYS

    def __init__(self, root: WdsCache, group: TeacherGroup):
        self.root, self.group, self.name = root, group, group.name
        self.location, self.subset, self.layout = root.location, root.subset, root.layout
        self.manifest = group.records_manifest(root.manifest)
        self.verify_checksums, self.ledger = root.verify_checksums, root.ledger  # every shard holds every teacher's records
        self.FINISH = "export it again from the cache, once the teacher's records are complete there"
        self._units, self._lock = OrderedDict(), threading.Lock()

    def samples(self) -> dict[str, np.ndarray]:
        return self.root.samples()

    def read_block(self, epoch: int, block: int, *, arrays=None) -> dict[str, np.ndarray]:
        found = self.root._unit_blocks(epoch, self.layout.unit_of(block))[block]
        return {array: found[array if array == "params" else f"teacher.{self.name}.{array}"] for array in (arrays or RECORD_ARRAYS)}

    def verify_unit(self, epoch: int, unit: int) -> None:
        self.root.verify_unit(epoch, unit)

    def _array(self, name: str) -> SimpleNamespace:
        width = record_width(self.manifest, name)
        return SimpleNamespace(shape=(self.manifest.epochs, self.layout.num_slots, width), dtype=np.dtype(self.group.dtypes[name]))

    def stored_size(self) -> tuple[int, int]:
        return self.root.stored_size()

    def digest(self) -> str:
        return self.root.digest()


def _get(data: Any, key: str) -> Any:
    return data.get(key) if isinstance(data, dict) else None


def _tar_members(data: bytes, where: str, *, keep=lambda name: True) -> dict[str, bytes]:
    """The regular members of a tar held in memory, by name (those ``keep`` accepts)."""
    members = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for info in tar:
                if info.isreg() and keep(info.name):
                    if info.name in members:
                        raise FormatError(f"{where}: member {info.name} appears twice")
                    members[info.name] = tar.extractfile(info).read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ChecksumError(f"{where} cannot be read as a tar ({exc})") from None
    return members


def is_wds(cache) -> bool:
    """Whether an opened cache is a webdataset export, not a zarr cache or its zip archive."""
    return isinstance(cache, WdsCache)


def open_wds(location: Location, *, verify_checksums: bool = True) -> WdsCache | None:
    """The export at ``location`` if it holds a webdataset index, else None (then it is some other cache)."""
    if not location.remote and not location.archive:
        if not (location.path / INDEX_NAME).is_file():
            return None
        return WdsCache(location, verify_checksums=verify_checksums)
    try:  # a URL, or a zip archive of an export's files
        index = location.read(INDEX_NAME)
    except FormatError:
        return None  # unreachable: the zarr reader tries again and reports it
    return None if index is None else WdsCache(location, verify_checksums=verify_checksums, index=index)
