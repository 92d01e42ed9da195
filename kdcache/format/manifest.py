"""The manifest of a cache (format versions 1 and 2): its dataclasses, their checks, and the compatibility rules."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kdcache.errors import FormatError, MismatchError
from kdcache.location import Location


FORMAT_VERSION = 2
#: The format versions this kdcache reads. A cache is written as version 1 when its record is one
#: (top k and a two-anchor tail summary), so that an older kdcache still reads it; a record with
#: more (sampled tail classes, a tail code, other anchors) makes it version 2.
READ_VERSIONS = (1, 2)
#: The ``tail`` fields of a version-2 manifest beyond version 1's ``betas`` and ``temperature_range``.
TAIL_FIELDS_V2 = ("samples", "proposal_beta", "uniform_share", "rank", "basis", "code_levels", "code_beta", "code_floor", "code_check")
MANIFEST_KEY = "kdcache"
SUBSET_KEY = "kdcache_subset"  # optional root attribute: what `kdcache export` kept (docs/format.md)
RECORD_ARRAYS = ("values", "indices", "tail", "params")
SAMPLE_ARRAYS = ("source_index", "label", "digest", "key")
LEDGER_DIR = "ledger"
#: The replay paths a manifest's ``replay.path`` may name (kdcache.replay implements them).
REPLAY_PATHS = ("pil", "tensor", "device")
CLAIMS_DIR = "claims"  # claim files of the writers computing units now (kdcache.format.claims)


def record_width(manifest: "Manifest", array: str) -> int:
    """The last axis of record array ``array``.

    ``values`` and ``indices``: k plus the sampled tail classes; ``tail``: one column per anchor,
    one for the draw's scale when classes are sampled, then the tail code's coordinates; ``params``:
    one per parameter field.
    """
    samples, rank = manifest.tail.get("samples", 0), manifest.tail.get("rank", 0)
    return {"values": manifest.k + samples, "indices": manifest.k + samples,
            "tail": len(manifest.tail["betas"]) + (1 if samples else 0) + rank, "params": len(manifest.param_fields)}[array]


def record_format_version(tail: dict) -> int:
    """The format version a cache of this ``tail`` is written as: 1 where version 1 can hold its record, else 2."""
    return 2 if any(tail.get(name) for name in TAIL_FIELDS_V2) or len(tail.get("betas", [])) != 2 else 1


@dataclass(frozen=True, kw_only=True)
class TeacherInfo:
    name: str
    source: str  # the kind: timm, torchvision, hf, python, torchscript, export, or file (a pickled whole model)
    checkpoint: str | None
    weights_sha256: str
    num_classes: int
    class_names: list[str]
    input_size: list[int]
    interpolation: str
    mean: list[float]
    std: list[float]
    # Published weights (optional, written only when set): the Hub repository id (torchvision: the weights' URL)
    # and the commit its revision resolved to (torchvision: the weights enum). docs/format.md, "The manifest".
    repo: str | None = None
    revision: str | None = None


#: TeacherInfo fields written only when set, so that a manifest without them is byte for byte what it was.
OPTIONAL_TEACHER_FIELDS = ("repo", "revision")


def teacher_dict(info: TeacherInfo) -> dict:
    """A teacher's manifest entry: its fields, less the optional ones that are not set."""
    data = dataclasses.asdict(info)
    for name in OPTIONAL_TEACHER_FIELDS:
        if data[name] is None:
            del data[name]
    return data


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
        data = dataclasses.asdict(self)
        data["teacher"] = teacher_dict(self.teacher)
        return data

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "manifest") -> "Manifest":
        if not isinstance(data, dict):
            raise FormatError(f"{where}: expected a JSON object, found {type(data).__name__}")
        version = data.get("format_version")
        if isinstance(version, bool) or version not in READ_VERSIONS:
            raise FormatError(
                f"{where}: format_version {version!r} is not supported by this kdcache (reads versions "
                f"{', '.join(map(str, READ_VERSIONS))}); upgrade kdcache or re-create the cache"
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
        for name in OPTIONAL_TEACHER_FIELDS:
            value = getattr(self.teacher, name)
            if value is not None and (not isinstance(value, str) or not value):
                bad(f"teacher.{name}", value, "a non-empty string, or no such field")
        size = self.teacher.input_size
        if not isinstance(size, list) or len(size) != 3 or not all(isinstance(v, int) and v > 0 for v in size):
            bad("teacher.input_size", size, "[channels, height, width] as positive integers")
        if not isinstance(self.replay, dict) or self.replay.get("path") not in REPLAY_PATHS:
            bad("replay", self.replay, "an object with path " + ", ".join(f"'{p}'" for p in REPLAY_PATHS))
        if self.replay.get("path") == "device" and self.replay.get("device") not in ("cpu", "cuda"):
            bad("replay.device", self.replay.get("device"), "'cpu' or 'cuda', where the device path ran")
        self._validate_tail(bad)
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


    def _validate_tail(self, bad) -> None:
        tail = self.tail
        if not isinstance(tail, dict) or not isinstance(tail.get("betas"), list):
            bad("tail", _short(tail), "an object with a list of 'betas'")
        if self.format_version == 1:
            if len(tail["betas"]) != 2 or any(tail.get(name) for name in TAIL_FIELDS_V2):
                bad("tail", _short(tail), "two 'betas' and nothing sampled or coded in a format-version-1 cache")
            return
        if not tail["betas"] or not all(_is_number(b) and b > 0 for b in tail["betas"]):
            bad("tail.betas", tail["betas"], "positive numbers")
        for name in ("samples", "rank"):
            value = tail.get(name, 0)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                bad(f"tail.{name}", value, "a whole number >= 0")
        if tail.get("samples", 0):
            if self.k + tail["samples"] >= self.teacher.num_classes:
                bad("tail.samples", tail["samples"], f"fewer than the {self.teacher.num_classes - self.k} classes outside the top k")
            if not (_is_number(tail.get("proposal_beta")) and tail["proposal_beta"] >= 0):
                bad("tail.proposal_beta", tail.get("proposal_beta"), "a number >= 0")
            if not (_is_number(tail.get("uniform_share")) and 0 <= tail["uniform_share"] <= 1):
                bad("tail.uniform_share", tail.get("uniform_share"), "a number in [0, 1]")
        if "code_levels" in tail and not (isinstance(tail["code_levels"], int) and not isinstance(tail["code_levels"], bool)
                                          and 1 <= tail["code_levels"] <= 2048):
            bad("tail.code_levels", tail["code_levels"], "a whole number in [1, 2048]")
        if "code_beta" in tail and not (_is_number(tail["code_beta"]) and tail["code_beta"] >= 0):
            bad("tail.code_beta", tail["code_beta"], "a number >= 0")
        if "code_floor" in tail and not (_is_number(tail["code_floor"]) and 0 <= tail["code_floor"] <= 1
                                         and (tail["code_floor"] > 0 or not tail.get("code_beta"))):
            bad("tail.code_floor", tail["code_floor"], "a number in [0, 1], above 0 with a code_beta")
        if "code_check" in tail:
            check = tail["code_check"]
            if not (isinstance(check, dict) and isinstance(check.get("temperatures"), list) and check["temperatures"]
                    and isinstance(check.get("shape_tv_median"), list) and len(check["shape_tv_median"]) == len(check["temperatures"])
                    and all(_is_number(t) and t > 0 for t in check["temperatures"])
                    and all(_is_number(e) and 0 <= e <= 1 for e in check["shape_tv_median"])):
                bad("tail.code_check", _short(check), "'temperatures' (> 0) and as many 'shape_tv_median' in [0, 1]")
        if tail.get("rank", 0):
            expected = (tail["rank"] + 1) * self.teacher.num_classes * 4
            if not isinstance(tail.get("basis"), str) or len(tail["basis"]) != 4 * ((expected + 2) // 3):
                bad("tail.basis", _short(tail.get("basis")), f"base64 of {expected} bytes (the tail code's float32 basis)")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


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


#: The ``tail`` fields a cache fits on its teacher's logits when it is made, not ones a run asks for.
FITTED_TAIL_FIELDS = ("basis", "code_check")


def asked_tail(tail: dict) -> dict:
    """A ``tail`` less its :data:`FITTED_TAIL_FIELDS`: the record a run asks for, to compare with the one a cache holds."""
    return {name: value for name, value in tail.items() if name not in FITTED_TAIL_FIELDS}


def check_compatible(existing: Manifest, wanted: Manifest) -> None:
    """Refuse to resume/extend a cache with anything that changes its records; names the field."""
    pairs = [
        ("teacher.weights_sha256", existing.teacher.weights_sha256, wanted.teacher.weights_sha256),
        ("teacher.name", existing.teacher.name, wanted.teacher.name),
        ("dataset.num_samples", existing.dataset.num_samples, wanted.dataset.num_samples),
        ("dataset.digest", existing.dataset.digest, wanted.dataset.digest),
        ("seed", existing.seed, wanted.seed),
        ("k", existing.k, wanted.k),
        ("tail", asked_tail(existing.tail), asked_tail(wanted.tail)),
        ("batch_size", existing.batch_size, wanted.batch_size),
        ("augmentation", existing.augmentation, wanted.augmentation),
        ("blocks", dataclasses.asdict(existing.blocks), dataclasses.asdict(wanted.blocks)),
        ("replay.path", existing.replay.get("path"), wanted.replay.get("path")),
        ("replay.device", existing.replay.get("device"), wanted.replay.get("device")),  # the device path's pixels
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
