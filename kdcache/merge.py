"""`kdcache merge`: combine caches made by separate jobs into one new cache.

Jobs that share a cache's recipe (teacher, data, seed, k, augmentation, layout...) but ran on
other machines, over other epoch ranges (``--from-epoch``) or over other units (``max_units``)
each hold some committed units of the same logical cache. ``merge_caches`` checks that the
inputs agree on everything that determines the records, then builds a new cache with the first
input's manifest (epochs: the largest of the inputs) and plan, and copies every committed unit's
shard files byte for byte, each checked against its input's ledger; every complete epoch of the
output gets its epoch index. A unit committed in more
than one input must have the same files in each (it is copied once). The result is built in a
hidden sibling directory and renamed into place at the end: a failed merge leaves no output.

Added teachers (``teachers/NAME/``) are carried too: a teacher of one name must be the same
teacher in every input that has it (weights, k, size, normalisation, batch size), and its units
come from whichever inputs hold them.

Subsets made by ``kdcache export`` merge like any inputs. The output declares a subset only when
every input is one and together they hold epochs x units; when it holds every unit it is a whole
cache, and otherwise a partial one. A webdataset export is refused: merge copies zarr shard files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdcache.errors import ChecksumError, ConfigError, IncompleteCacheError, MismatchError
from kdcache.format import (
    RECORD_ARRAYS,
    Cache,
    CacheWriter,
    GroupWriter,
    TeacherGroup,
    LedgerEntry,
    Manifest,
    Subset,
    first_difference,
    ledger_key,
    now_iso,
    open_cache,
    sha256_bytes,
    shard_key,
)
from kdcache.format.ledger import index_epochs
from kdcache.location import atomic_write_bytes, is_url
from kdcache.format import WdsCache


@dataclass
class MergeResult:
    output: str
    units_copied: dict[str, int]  # input -> units taken from it (a unit held by several inputs counts for the first)
    epochs_complete: list[int]

    @property
    def units(self) -> int:
        return sum(self.units_copied.values())


def _record_fields(manifest: Manifest) -> list[tuple[str, Any]]:
    """Everything that determines a cache's records, most telling first (a new seed also moves the digest)."""
    return [
        ("format_version", manifest.format_version),
        ("teacher.weights_sha256", manifest.teacher.weights_sha256),
        ("teacher.name", manifest.teacher.name),
        ("seed", manifest.seed),
        ("k", manifest.k),
        ("tail", manifest.tail),  # the record's spec, and the tail code's basis: codes on two bases cannot be mixed
        ("batch_size", manifest.batch_size),
        ("augmentation", manifest.augmentation),
        ("replay.path", manifest.replay.get("path")),
        ("dataset.num_samples", manifest.dataset.num_samples),
        ("dataset.digest", manifest.dataset.digest),
        ("blocks", dataclasses.asdict(manifest.blocks)),
        ("dtypes", manifest.dtypes),
        ("compression", manifest.compression),
        ("param_fields", manifest.param_fields),
        ("samples_sha256", manifest.samples_sha256),
    ]


def _show(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def check_mergeable(first_name: str, first: Manifest, name: str, other: Manifest) -> None:
    """Refuse to merge ``other`` into ``first`` if anything that determines the records differs; names the field."""
    for (field, mine), (_, theirs) in zip(_record_fields(first), _record_fields(other)):
        found = first_difference(field, mine, theirs)
        if found is not None:
            where, a, b = found
            raise MismatchError(f"cannot merge {name}: {where} differs: {first_name} has {_show(a)}, {name} has {_show(b)}")


def _check_output(output: Path) -> None:
    if is_url(str(output)):
        raise ConfigError(f"output {output}: merge writes a local directory, not a URL")
    if output.exists() and not output.is_dir():
        raise ConfigError(f"output {output} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()):
        raise ConfigError(f"output {output} exists and is not empty; choose a new directory")


def check_entry(name: str, cache: Cache, entry: LedgerEntry) -> None:
    """Refuse a ledger entry outside the cache's epochs and units, or without a checksum for each shard file."""
    layout, epochs = cache.layout, cache.manifest.epochs
    if not (0 <= entry.epoch < epochs and 0 <= entry.unit < layout.num_units):
        raise IncompleteCacheError(
            f"{name}: ledger entry epoch {entry.epoch} unit {entry.unit} is outside the cache "
            f"({epochs} epochs, {layout.num_units} units per epoch)"
        )
    for array in getattr(cache, "ARRAYS", RECORD_ARRAYS):  # an added teacher's units hold no params
        if "sha256" not in entry.files.get(shard_key(array, entry.epoch, entry.unit), {}):
            raise IncompleteCacheError(
                f"{name}: ledger entry epoch {entry.epoch} unit {entry.unit} has no checksum for "
                f"{shard_key(array, entry.epoch, entry.unit)}"
            )


def _plan_units(names: list[str], caches: list, *, ledger=lambda cache: cache.ledger) -> dict[tuple[int, int], int]:
    """(epoch, unit) -> index of the first input holding it; refuses units that differ between inputs.

    ``ledger``: which entries of an input (an added teacher's group: its own ledger's)."""
    owner: dict[tuple[int, int], int] = {}
    for i, (name, cache) in enumerate(zip(names, caches)):
        for key, entry in sorted(ledger(cache).items()):
            check_entry(name, cache, entry)
            if key not in owner:
                owner[key] = i
                continue
            held = ledger(caches[owner[key]])[key]
            for array in getattr(cache, "ARRAYS", RECORD_ARRAYS):
                file = shard_key(array, *key)
                if held.files[file]["sha256"] != entry.files[file]["sha256"]:
                    raise MismatchError(
                        f"epoch {key[0]} unit {key[1]} differs between {names[owner[key]]} and {name} "
                        f"({file} has other bytes); they were not made by the same recipe and code"
                    )
    return owner


def read_unit_files(name: str, cache: Cache, entry: LedgerEntry) -> dict[str, bytes]:
    """One committed unit's shard files (store key -> bytes) read whole, each checked against its ledger entry
    (and that entry, if read from an epoch index, against the unit's own entry)."""
    cache.check_own_entry(entry.epoch, entry.unit)
    files = {}
    for array in getattr(cache, "ARRAYS", RECORD_ARRAYS):
        key = shard_key(array, entry.epoch, entry.unit)
        data = cache.location.read(key)
        if data is None:
            raise IncompleteCacheError(f"{name}: epoch {entry.epoch} unit {entry.unit}: file {key} is missing")
        if sha256_bytes(data) != entry.files[key]["sha256"]:
            raise ChecksumError(
                f"{name}: epoch {entry.epoch} unit {entry.unit}: file {key} does not match its ledger checksum; "
                f"{cache.repair_advice()}, then try again"
            )
        files[key] = data
    return files


def ledger_entry_bytes(entry: LedgerEntry) -> bytes:
    """A ledger entry as committed (JSON), original commit time included."""
    return json.dumps(dataclasses.asdict(entry), indent=1).encode()


def copy_unit(name: str, cache: Cache, entry: LedgerEntry, out: Path) -> None:
    """Copy one unit's shard files, checked against the input's ledger, then commit it (ledger entry last)."""
    for key, data in read_unit_files(name, cache, entry).items():
        expected = entry.files[key]["sha256"]
        atomic_write_bytes(out / key, data)
        if sha256_bytes((out / key).read_bytes()) != expected:
            raise ChecksumError(f"{out}: the copy of {key} (epoch {entry.epoch} unit {entry.unit}) from {name} does not "
                                "read back with its checksum; check the output disk")
    atomic_write_bytes(out / ledger_key(entry.epoch, entry.unit), ledger_entry_bytes(entry))


#: What an added teacher's records depend on, most telling first (not where its weights file was, nor the kdcache version).
#: Its record's ``tail`` with the basis: codes fitted on another basis read as other logits.
_TEACHER_RECIPE = ("teacher.weights_sha256", "teacher.num_classes", "k", "size", "mean", "std", "batch_size", "replay.path",
                   "dtypes", "compression", "tail")


def _teacher_recipe(group: TeacherGroup) -> list:
    return [group.teacher.weights_sha256, group.teacher.num_classes, group.k, group.size, group.mean, group.std,
            group.batch_size, group.replay.get("path"), group.dtypes, group.compression, group.tail]


def _plan_teachers(names: list[str], caches: list[Cache]) -> dict[str, tuple[TeacherGroup, list, dict]]:
    """Every added teacher of the inputs: name -> (its group, its records in each input or None, unit -> input).

    A teacher of one name must be the same in every input that has it (weights, k, size, ...),
    else the merge is refused naming the field; its units come from whichever inputs hold them.
    """
    found: dict[str, tuple[TeacherGroup, list, dict]] = {}
    first_with: dict[str, int] = {}
    for i, (name, cache) in enumerate(zip(names, caches)):
        for teacher, group in cache.groups.items():
            if teacher not in found:
                found[teacher], first_with[teacher] = (group, [None] * len(caches), {}), i
            differs = next((d for d in (first_difference(f"{teacher}.{f}", old, new) for f, old, new in
                                         zip(_TEACHER_RECIPE, _teacher_recipe(found[teacher][0]), _teacher_recipe(group)))
                            if d is not None), None)
            if differs is not None:
                field_name, old, new = differs
                raise MismatchError(f"the teacher records {teacher!r} differ between {names[first_with[teacher]]} and {name} "
                                    f"({field_name}: {_show(old)} against {_show(new)}); they are not the same teacher: "
                                    "rename one (merge them apart) or drop it")
            found[teacher][1][i] = cache.teacher_records(teacher)
    for teacher, (group, views, _) in found.items():
        held = [(names[i], view) for i, view in enumerate(views) if view is not None]
        owner = _plan_units([n for n, _ in held], [v for _, v in held], ledger=lambda view: view.own_ledger)
        index = [i for i, view in enumerate(views) if view is not None]
        found[teacher] = (group, views, {key: index[j] for key, j in owner.items()})
    return found


def copy_teachers(teachers: dict[str, tuple[TeacherGroup, list, dict]], names: list[str], out: Path, *, log=print) -> None:
    """Write each added teacher's group into the new cache ``out``: its attributes as they are, its units copied
    byte for byte (each checked against its input's ledger), then the epoch index of each complete epoch."""
    for teacher, (group, views, owner) in sorted(teachers.items()):
        writer = GroupWriter.create(out, group, log=log)
        for key in sorted(owner):
            view = views[owner[key]]
            copy_unit(f"{names[owner[key]]} (teacher {teacher})", view, view.own_ledger[key], writer.path)
        for epoch in sorted({e for e, _ in owner}):
            writer.write_epoch_index(epoch)


def _merged_subset(manifest: Manifest, names: list[str], caches: list[Cache], owner) -> Subset | None:
    """The output's subset declaration: only when every input is a subset and together they hold epochs x units.

    A merge that holds every unit of every epoch is a whole cache (no declaration). Otherwise, if
    any input is a plain (partial) cache, or the subsets do not add up to epochs x units, the
    output is a partial cache: ``precompute-logits --resume`` finishes it, or ``kdcache export``
    takes a subset of it.
    """
    if any(cache.subset is None for cache in caches):
        return None
    held = {(e, u) for cache in caches for e in cache.subset.epochs for u in cache.subset.units}
    try:
        return Subset.of(manifest, held, source="merge of " + ", ".join(n if is_url(n) else os.path.abspath(n) for n in names))
    except ValueError:  # not epochs x units
        return None


def merge_caches(output: str, inputs: list[str], *, command: str = "", log=print) -> MergeResult:
    """Combine the committed units of compatible ``inputs`` into a new cache at ``output``."""
    names = [str(i) for i in inputs]
    if len(names) < 2:
        raise ConfigError(f"merge needs at least two caches to combine, got {len(names)}")
    out = Path(output)
    _check_output(out)
    caches = [open_cache(name) for name in names]
    for name, cache in zip(names, caches):
        if isinstance(cache, WdsCache):
            raise ConfigError(f"{name} is a webdataset export; merge takes zarr caches (or their zip archives): "
                              "merge the caches it was exported from")
    first = caches[0].manifest
    for name, cache in zip(names[1:], caches[1:]):
        check_mergeable(names[0], first, name, cache.manifest)
    plan = caches[0].samples()
    for cache in caches[1:]:
        cache.samples()  # each input's plan must match its own manifest checksum (compared above)
    owner = _plan_units(names, caches)
    teachers = _plan_teachers(names, caches)

    epochs = max(cache.manifest.epochs for cache in caches)
    manifest = dataclasses.replace(first, epochs=epochs, created=now_iso(), command=command or f"kdcache merge {output}")
    subset = _merged_subset(manifest, names, caches, owner)
    tmp = out.parent / f".{out.name}.merging-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        CacheWriter.create(tmp, manifest, plan, subset=subset)
        for key in sorted(owner):
            i = owner[key]
            copy_unit(names[i], caches[i], caches[i].ledger[key], tmp)
        copy_teachers(teachers, names, tmp, log=log)  # every input's added teachers, under the same names
        index_epochs(tmp, log=log)  # every complete epoch gets its index, whether the inputs had one or not
        _check_output(out)  # nothing appeared there meanwhile
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    copied = dict.fromkeys(names, 0)
    for i in owner.values():
        copied[names[i]] += 1
    for name, count in copied.items():
        log(f"{name}: {count} unit(s) copied")
    return MergeResult(output=str(out), units_copied=copied, epochs_complete=Cache(out).complete_epochs())
