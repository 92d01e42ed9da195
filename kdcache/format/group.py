"""Added teachers: the group ``teachers/NAME/`` of another teacher's records over the cache's views.

The first teacher's records stay at the root (record name ``main``). An added teacher NAME keeps
its own record arrays, ledger and claims under ``teachers/NAME/`` and no parameters: its views
are the root's. The group's ``zarr.json`` holds the attribute ``kdcache_teacher``
(:class:`TeacherGroup`). docs/format.md ("Several teachers") is the spec.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any

from kdcache.errors import ConfigError, FormatError
from kdcache.location import Location
from kdcache.format.manifest import Manifest, TeacherInfo, _build, _short, record_format_version, teacher_dict

TEACHERS_DIR = "teachers"
TEACHER_KEY = "kdcache_teacher"  # the group attribute
#: The arrays of an added teacher: the root's record arrays but ``params`` (its views are the root's).
TEACHER_ARRAYS = ("values", "indices", "tail")
#: The record name of the root's teacher, and the name that asks for every teacher at once.
MAIN, ALL = "main", "all"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_teacher_name(name: str, *, option: str = "--name") -> str:
    """Refuse a name an added teacher cannot have (the reserved ``main`` and ``all``, or characters outside the pattern)."""
    if not isinstance(name, str) or not _NAME.match(name) or len(name) > 100:
        raise ConfigError(f"{option} {name!r}: a teacher's record name is letters, digits, '_', '.' and '-', starting with a "
                          "letter or digit (at most 100 characters)")
    if name in (MAIN, ALL):
        raise ConfigError(f"{option} {name!r} is reserved ({MAIN!r} is the cache's first teacher, {ALL!r} asks for every "
                          "teacher); choose another name")
    return name


def group_dir(name: str) -> str:
    return f"{TEACHERS_DIR}/{name}"


@dataclass(frozen=True, kw_only=True)
class TeacherGroup:
    """An added teacher: group attribute ``kdcache_teacher`` of ``teachers/NAME/zarr.json``."""

    name: str  # its record name
    teacher: TeacherInfo  # the same fields as the manifest's teacher
    k: int
    dtypes: dict  # values, indices, tail
    compression: dict  # values, indices, tail
    replay: dict  # the replay fingerprint it scored on (the root's path)
    size: int  # the views' height and width it scored them at
    mean: list[float]
    std: list[float]
    batch_size: int  # the teacher's batch size; verify re-scores blocks in the same batches
    tool_version: str
    created: str
    command: str
    #: Its record's tail, as the manifest's ``tail`` (with the basis of its own tail code); None, and no such field,
    #: for the format-version-1 record (top k and a two-anchor summary), which every group made before holds.
    tail: dict | None = None

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["teacher"] = teacher_dict(self.teacher)
        if self.tail is None:
            data.pop("tail")
        return data

    def content(self) -> dict:
        """What the content digest covers: the attributes less their provenance (created, command)."""
        content = self.to_dict()
        content.pop("created")
        content.pop("command")
        return content

    @classmethod
    def from_dict(cls, data: Any, manifest: Manifest, *, where: str) -> "TeacherGroup":
        if not isinstance(data, dict):
            raise FormatError(f"{where}: expected a JSON object, found {type(data).__name__}")
        fields = dict(data)
        try:
            fields["teacher"] = _build(TeacherInfo, fields["teacher"], f"{where}.teacher")
        except KeyError:
            raise FormatError(f"{where}: missing field 'teacher'") from None
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in fields and f.default is dataclasses.MISSING]
        if missing:
            raise FormatError(f"{where}: missing field {missing[0]!r}")
        group = _build(cls, fields, where)
        group.validate(manifest, where)
        return group

    def validate(self, manifest: Manifest, where: str) -> None:
        def bad(name, value, expected):
            raise FormatError(f"{where}: field {name} = {_short(value)}; expected {expected}")

        if not isinstance(self.name, str) or not _NAME.match(self.name) or self.name in (MAIN, ALL):
            bad("name", self.name, "a teacher record name (not 'main' or 'all')")
        if self.teacher.num_classes != manifest.teacher.num_classes:
            bad("teacher.num_classes", self.teacher.num_classes, f"the cache's {manifest.teacher.num_classes}")
        if not isinstance(self.k, int) or isinstance(self.k, bool) or not 1 <= self.k <= self.teacher.num_classes:
            bad("k", self.k, f"1..{self.teacher.num_classes}")
        for name in ("size", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                bad(name, value, "a positive integer")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if not isinstance(value, list) or len(value) != 3 or not all(isinstance(v, (int, float)) for v in value):
                bad(name, value, "three numbers")
        if not isinstance(self.dtypes, dict) or any(self.dtypes.get(a) != manifest.dtypes[a] for a in TEACHER_ARRAYS):
            bad("dtypes", self.dtypes, f"the cache's {_short({a: manifest.dtypes[a] for a in TEACHER_ARRAYS})}")
        if not isinstance(self.compression, dict) or not all(isinstance(self.compression.get(a), dict) for a in TEACHER_ARRAYS):
            bad("compression", self.compression, "a codec per record array")
        if not isinstance(self.replay, dict) or self.replay.get("path") != manifest.replay.get("path"):
            bad("replay", self.replay, f"the cache's replay path {manifest.replay.get('path')!r}")
        if self.tail is not None:
            if not isinstance(self.tail, dict) or not isinstance(self.tail.get("betas"), list):
                bad("tail", self.tail, "an object with a list of 'betas'")
            self.records_manifest(manifest)._validate_tail(bad)  # the manifest's rules, on this teacher's k and classes

    def records_manifest(self, manifest: Manifest) -> Manifest:
        """The root's manifest as this teacher's records see it: its teacher, k, dtypes, compression (the plan and views
        the root's), and its own record's ``tail`` (with its own basis), whatever the root's record is; a group
        without one (every group made before groups kept their own) has the format-version-1 record (top k and a
        two-anchor tail summary). Its ``format_version`` is the one its record needs, at least the root's."""
        tail = self.tail
        if tail is None:
            tail = {"betas": [1.0, 0.25], "temperature_range": manifest.tail.get("temperature_range", [0.5, 10.0])}
        version = max(manifest.format_version, record_format_version(tail)) if isinstance(tail, dict) else manifest.format_version
        return dataclasses.replace(manifest, format_version=version, teacher=self.teacher, k=self.k, batch_size=self.batch_size,
                                   tail=tail, dtypes={**manifest.dtypes, **self.dtypes},
                                   compression={**manifest.compression, **self.compression})


def group_root(group: TeacherGroup) -> dict:
    """The group's zarr.json."""
    return {"zarr_format": 3, "node_type": "group", "attributes": {TEACHER_KEY: group.to_dict()}}


def read_group(location: Location, name: str, manifest: Manifest) -> TeacherGroup:
    """The attributes of ``teachers/NAME/zarr.json`` (``location``: the cache)."""
    key = f"{group_dir(name)}/zarr.json"
    data = location.read(key)
    if data is None:
        raise FormatError(f"{location}: {key} is missing")
    try:
        root = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise FormatError(f"{location}: {key} is not valid JSON ({exc})") from None
    if not isinstance(root, dict) or not isinstance(root.get("attributes"), dict) or TEACHER_KEY not in root["attributes"]:
        raise FormatError(f"{location}: {key} has no attributes.{TEACHER_KEY}; it is not an added teacher's group")
    group = TeacherGroup.from_dict(root["attributes"][TEACHER_KEY], manifest, where=f"{location}: {key}")
    if group.name != name:
        raise FormatError(f"{location}: {key} names the teacher {group.name!r}, not {name!r} (its folder)")
    return group


def list_groups(location: Location, manifest: Manifest) -> dict[str, TeacherGroup]:
    """Every added teacher of the cache at ``location``, by name (sorted): one listing of ``teachers/`` and one read per group."""
    names = [n for n in location.listdir(TEACHERS_DIR) if _NAME.match(n) and n not in (MAIN, ALL)]
    return {name: read_group(location, name, manifest) for name in sorted(names)}
