"""The ledger: one entry per committed unit, and one index per complete epoch.

Single entries (``ledger/eEEEEEE-uUUUUUU.json``) are the commit protocol: a unit exists once its
entry is on disk. Opening a cache by its entries alone costs one read per unit, which over a
network is minutes at ImageNet scale, so an epoch whose units are all committed also gets an
**epoch index**, ``ledger/epochs/eEEEEEE.json``: the same entries in one file, with a sha256 of
its own. Readers prefer the indexes and fetch single entries only for epochs without one (all
of them concurrently), so opening costs a number of requests that grows with epochs, not units.

An index never disagrees with the entries silently. On opening, every unit an index lists must
have its entry in the listing of ``ledger/``; if one lacks it (uncommitted since), the index is
ignored, its epoch read from the entries, and the reason kept (``Ledger.stale``). When a unit is
read with checks on, its entry is read as well and must equal the index's (:func:`check_agreement`),
else the read is refused. An index is derived data:
:func:`write_epoch_index` rebuilds it from the entries, and a reader that predates indexes
never looks into ``ledger/epochs/``. docs/format.md ("The epoch index") is the spec.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from kdcache.errors import ChecksumError, ConfigError, FormatError, IncompleteCacheError
from kdcache.location import Location, atomic_write_bytes, fsync_dir
from kdcache.format.digest import entry_content
from kdcache.format.group import group_dir, list_groups
from kdcache.format.manifest import LEDGER_DIR
from kdcache.format.store import (
    LedgerEntry,
    canonical_json,
    entry_from_dict,
    entry_to_dict,
    ledger_key,
    parse_ledger_bytes,
    read_root,
    sha256_bytes,
)

#: Where epoch indexes live, inside the ledger directory (older readers list ``ledger/`` for ``*.json`` only).
INDEX_DIR = f"{LEDGER_DIR}/epochs"
INDEX_KIND = "kdcache-epoch-index"
INDEX_VERSION = 1


def epoch_index_key(epoch: int) -> str:
    return f"{INDEX_DIR}/e{epoch:06d}.json"


def epoch_index_bytes(epoch: int, entries: list[LedgerEntry], ledger_bytes: int) -> bytes:
    """The epoch index of ``entries`` (all of epoch ``epoch``), as written: canonical JSON, so equal entries give equal bytes.

    ``ledger_bytes``: the total size of those entries' own files, so a reader knows the ledger's size without them.
    """
    body = {
        "kind": INDEX_KIND,
        "version": INDEX_VERSION,
        "epoch": epoch,
        "ledger_bytes": int(ledger_bytes),
        "entries": [entry_to_dict(e) for e in sorted(entries, key=lambda e: e.unit)],
    }
    body["sha256"] = sha256_bytes(canonical_json(body))
    return canonical_json(body)


@dataclass(frozen=True)
class EpochIndex:
    epoch: int
    entries: dict[int, LedgerEntry]  # unit -> entry
    ledger_bytes: int
    size: int  # bytes of the index file itself


def parse_epoch_index(location: Location, key: str, data: bytes, epoch: int) -> EpochIndex | None:
    """The index in ``data`` (None for an index version this reader does not know: its entries are read instead)."""
    where = f"{location}: epoch index {key}"
    try:
        body = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise FormatError(f"{where} is not valid JSON ({exc}); {_rebuild_advice(location)}") from None
    if not isinstance(body, dict) or body.get("kind") != INDEX_KIND:
        raise FormatError(f"{where} is not an epoch index (kind {body.get('kind') if isinstance(body, dict) else None!r}, "
                          f"expected {INDEX_KIND!r}); {_rebuild_advice(location)}")
    if body.get("version") != INDEX_VERSION:
        return None
    stated = body.pop("sha256", None)
    try:
        actual = sha256_bytes(canonical_json(body))
    except ValueError as exc:  # a NaN or infinity: no index holds one
        raise FormatError(f"{where} is malformed ({exc}); {_rebuild_advice(location)}") from None
    if stated != actual:
        raise ChecksumError(f"{where} does not match its own sha256 ({str(stated)[:16]}..., its content gives {actual[:16]}...); "
                            f"{_rebuild_advice(location)}")
    if body.get("epoch") != epoch or not isinstance(body.get("entries"), list) or not isinstance(body.get("ledger_bytes"), int):
        raise FormatError(f"{where} is malformed (epoch {body.get('epoch')!r}, expected {epoch}, with a list of entries and "
                          f"ledger_bytes); {_rebuild_advice(location)}")
    entries: dict[int, LedgerEntry] = {}
    for i, item in enumerate(body["entries"]):
        entry = entry_from_dict(item, f"{where}: entries[{i}]")
        if entry.epoch != epoch or entry.unit in entries:
            raise FormatError(f"{where}: entries[{i}] is malformed (epoch {entry.epoch} unit {entry.unit} in the index of "
                              f"epoch {epoch}, or listed twice); {_rebuild_advice(location)}")
        entries[entry.unit] = entry
    return EpochIndex(epoch, entries, body["ledger_bytes"], len(data))


def _rebuild_advice(location: Location) -> str:
    if location.local:
        return f"rebuild it from the ledger entries with kdcache index {location}"
    return "fetch the cache again, or tell whoever publishes it (kdcache index rebuilds it from the ledger entries)"


@dataclass
class Ledger:
    """A cache's committed units, and where each entry came from."""

    entries: dict[tuple[int, int], LedgerEntry] = field(default_factory=dict)
    indexes: dict[int, EpochIndex] = field(default_factory=dict)  # epoch -> its index, for the epochs read from one
    single_sizes: dict[tuple[int, int], int] = field(default_factory=dict)  # entries read from their own files: bytes
    stale: dict[int, str] = field(default_factory=dict)  # epoch -> why its index was ignored
    listed: int = 0  # single entry files in the listing of ledger/

    def indexed(self, epoch: int, unit: int) -> bool:
        return epoch in self.indexes and unit in self.indexes[epoch].entries

    @property
    def ledger_bytes(self) -> int:
        """Bytes of the ledger's files: every single entry (read, or counted by its index) and every index."""
        return (sum(self.single_sizes.values()) + sum(i.ledger_bytes for i in self.indexes.values())
                + sum(i.size for i in self.indexes.values()))

    @property
    def ledger_files(self) -> int:
        return self.listed + len(self.indexes)


def _entry_name(epoch: int, unit: int) -> str:
    return ledger_key(epoch, unit).split("/", 1)[1]


def load_ledger(location: Location) -> Ledger:
    """Every committed unit of the cache at ``location``: from epoch indexes where there are, else from single entries.

    Requests: a listing of ``ledger/`` and, if it has indexes, one of ``ledger/epochs/``; then the
    indexes and the single entries not covered by one, fetched concurrently.
    """
    names = location.listdir(LEDGER_DIR)
    singles = {name for name in names if name.endswith(".json")}
    ledger = Ledger(listed=len(singles))
    if INDEX_DIR.rsplit("/", 1)[1] in names:
        index_names = [n for n in location.listdir(INDEX_DIR) if n.endswith(".json")]
        keys = {f"{INDEX_DIR}/{n}": n for n in index_names}
        for key, data in location.read_many(list(keys)).items():
            name = keys[key]
            epoch = _index_epoch(location, key, name)
            if data is None:  # removed since the listing: its epoch is read from the entries
                continue
            index = parse_epoch_index(location, key, data, epoch)
            if index is None:
                continue
            lost = [unit for unit in index.entries if _entry_name(epoch, unit) not in singles]
            if lost:  # uncommitted after the index was written: the entries are what counts, the index is ignored
                ledger.stale[epoch] = (f"the epoch index {key} lists unit {lost[0]}, whose ledger entry "
                                       f"{ledger_key(epoch, lost[0])} is missing; the index is ignored")
                continue
            ledger.indexes[epoch] = index
            for unit, entry in index.entries.items():
                ledger.entries[epoch, unit] = entry
    covered = {_entry_name(*key) for key in ledger.entries}
    wanted = sorted(singles - covered)
    for key, data in location.read_many([f"{LEDGER_DIR}/{n}" for n in wanted]).items():
        name = key.split("/", 1)[1]
        if data is None:  # uncommitted since the listing
            continue
        entry = parse_ledger_bytes(location, name, data)
        ledger.entries[entry.epoch, entry.unit] = entry
        ledger.single_sizes[entry.epoch, entry.unit] = len(data)
    return ledger


def _index_epoch(location: Location, key: str, name: str) -> int:
    stem = name[:-len(".json")]
    if not (stem.startswith("e") and stem[1:].isdigit() and len(stem) >= 7):
        raise FormatError(f"{location}: {key} is not an epoch index name (expected {INDEX_DIR}/eEEEEEE.json)")
    return int(stem[1:])


def check_agreement(location: Location, index_entry: LedgerEntry, data: bytes | None) -> None:
    """Refuse a unit whose own ledger entry (``data``) says other than its epoch index, naming both files and the field.

    What is compared is what the content digest covers (views and every file's sha256 and size), not the commit
    time: two writers that both commit a unit (a lease that lapsed) write the same files at other times. A
    ChecksumError (two records of one unit that disagree), or IncompleteCacheError when the entry is gone.
    """
    epoch, unit = index_entry.epoch, index_entry.unit
    key, index_key = ledger_key(epoch, unit), epoch_index_key(epoch)
    if data is None:
        raise IncompleteCacheError(f"{location}: epoch {epoch} unit {unit}: its ledger entry {key} is missing, but the epoch index "
                                   f"{index_key} lists it; " + _rebuild_advice(location))
    own, listed = entry_content(parse_ledger_bytes(location, key.split("/", 1)[1], data)), entry_content(index_entry)
    if own != listed:
        field_name = next(f for f in ("files", "views") if own[f] != listed[f])
        if field_name == "files":
            field_name = next((f"files.{k}" for k in sorted(set(own["files"]) | set(listed["files"]))
                               if own["files"].get(k) != listed["files"].get(k)), "files")
        raise ChecksumError(f"{location}: epoch {epoch} unit {unit}: its ledger entry {key} and the epoch index {index_key} "
                            f"disagree ({field_name}); the ledger was changed after the index was written: run kdcache verify, "
                            "then " + _rebuild_advice(location).replace("rebuild it", "rebuild the index"))


# ---- writing ------------------------------------------------------------------------------


def held_units_of_epoch(path: Path, epoch: int) -> list[int] | None:
    """The units an index of ``epoch`` lists: every unit, or a subset's declared ones (None: the subset lacks the epoch)."""
    manifest, subset = read_root(Location(path))
    if subset is not None:
        return list(subset.units) if epoch in subset.epochs else None
    return list(range(manifest.blocks.num_units)) if 0 <= epoch < manifest.epochs else None


def write_epoch_index(path: str | Path, epoch: int, *, units=None) -> str:
    """Write the index of ``epoch`` of the local cache at ``path`` if all its held units are committed.

    ``units``: the units the index lists (an added teacher's group, whose folder has no manifest), else the held ones.

    Returns ``"incomplete"`` (a held unit has no entry: nothing written), ``"unchanged"`` (the
    index on disk already says exactly this), ``"written"`` or ``"rewritten"`` (it differed from
    the entries, which are what counts). Idempotent, and safe when several processes write the
    same index at once: they write the same bytes, each through its own temporary file and a rename.
    """
    path = Path(path)
    units = held_units_of_epoch(path, epoch) if units is None else list(units)
    if units is None:
        return "incomplete"
    location = Location(path)
    entries, ledger_bytes = [], 0
    for unit in units:
        key = ledger_key(epoch, unit)
        try:
            data = (path / key).read_bytes()
        except FileNotFoundError:
            return "incomplete"
        entries.append(parse_ledger_bytes(location, key.split("/", 1)[1], data))
        ledger_bytes += len(data)
    content = epoch_index_bytes(epoch, entries, ledger_bytes)
    target = path / epoch_index_key(epoch)
    try:
        existing = target.read_bytes()
    except FileNotFoundError:
        existing = None
    if existing == content:
        return "unchanged"
    atomic_write_bytes(target, content)  # a temporary name of its own per call: concurrent writers never share one
    return "written" if existing is None else "rewritten"


def remove_epoch_index(path: str | Path, epoch: int) -> None:
    """Drop the index of ``epoch`` (before one of its units is uncommitted: an index must never outlive an entry)."""
    target = Path(path) / epoch_index_key(epoch)
    if target.exists():
        target.unlink()
        fsync_dir(target.parent)


def index_epochs(path: str | Path, *, log=print) -> dict[str, list[int]]:
    """Write the index of every epoch of the local cache at ``path`` whose held units are all committed.

    Returns the epochs by outcome (see :func:`write_epoch_index`); a rewritten index is logged.
    """
    manifest, subset = read_root(Location(path))
    epochs = subset.epochs if subset is not None else range(manifest.epochs)
    outcome: dict[str, list[int]] = {"written": [], "rewritten": [], "unchanged": [], "incomplete": []}
    for epoch in epochs:
        done = write_epoch_index(path, epoch)
        outcome[done].append(epoch)
        if done == "rewritten":
            log(f"{path}: the index of epoch {epoch} disagreed with its ledger entries; rewritten from them")
    return outcome



def index_cache(location: str | Path, *, log=print) -> dict[str, list[int]]:
    """``kdcache index``: add the missing epoch indexes of a local cache in place (see :func:`index_epochs`)."""
    where = Location(location)
    if not where.local:
        raise ConfigError(f"{location}: kdcache index writes into a local cache directory, not a URL or an archive; "
                          "index the cache it came from, or export it (kdcache export writes the indexes)")
    if not where.path.is_dir():
        raise FormatError(f"cache {location} " + ("is a file, not a cache directory" if where.path.exists() else "does not exist"))
    if (where.path / "kdcache-wds.json").is_file():
        raise ConfigError(f"{location} is a webdataset export: its index (kdcache-wds.json) already lists every shard")
    done = index_epochs(where.path, log=log)
    manifest, _ = read_root(where)
    for name in list_groups(where, manifest):  # each added teacher's own ledger: an index per epoch it holds whole
        group = where.path / group_dir(name)
        units = range(manifest.blocks.num_units)
        outcome = [write_epoch_index(group, epoch, units=units) for epoch in range(manifest.epochs)]
        log(f"{location}: teacher {name}: epoch indexes {outcome.count('written')} written, {outcome.count('rewritten')} "
            f"rewritten, {outcome.count('unchanged')} already up to date; {outcome.count('incomplete')} epoch(s) not complete")
    return done
