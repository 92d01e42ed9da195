"""What every reader of a cache shares (:class:`Cache` and the webdataset export's :class:`WdsCache`)."""

from __future__ import annotations

import threading
from collections import OrderedDict

from kdcache.errors import ConfigError
from kdcache.format.digest import content_digest
from kdcache.format.group import ALL, MAIN, TEACHER_ARRAYS
from kdcache.format.manifest import BlockLayout, Manifest, Subset


class HeldUnits:
    """What the two readers share (Cache and kdcache.format.wds.WdsCache): which units a cache holds, from its
    ``ledger`` and ``subset``, and the small LRU of units read last.

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

    # Readers keep an LRU of read units (``_units``, the last UNITS_KEPT) and a lock; neither travels into
    # DataLoader workers.
    UNITS_KEPT = 2

    def _kept_unit(self, epoch: int, unit: int, fresh: bool):
        """The unit's cached read (None if absent, or when ``fresh`` asks to read again)."""
        with self._lock:
            kept = None if fresh else self._units.get((epoch, unit))
            if kept is not None:
                self._units.move_to_end((epoch, unit))
            return kept

    def _keep_unit(self, epoch: int, unit: int, value):
        with self._lock:
            self._units[(epoch, unit)] = value
            while len(self._units) > self.UNITS_KEPT:
                self._units.popitem(last=False)
        return value

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

    def digest(self) -> str:
        """The content digest (kdcache.format.digest): the manifest, what a subset declares, every ledger entry."""
        return content_digest(self.manifest, self.subset, self.ledger.values())


class SeveralTeachers:
    """What both readers of a cache of several teachers share: its record names and how one teacher's records are read.

    A reader has ``groups`` (the added teachers' :class:`~kdcache.format.TeacherGroup` by name),
    ``_teacher_views`` (a dict) and ``_added_records(group)``, its reader of one added teacher.
    """

    @property
    def teachers(self) -> list[str]:
        """Every teacher's record name: ``main`` (the root's teacher), then the added ones in name order."""
        return [MAIN, *self.groups]

    def teacher_records(self, name: str):
        """The cache as teacher ``name``'s records see it: ``main`` is this cache; ``all`` every teacher at once
        (:class:`AllTeachers`); an added teacher's records with the root's plan and parameters."""
        if name == MAIN:
            return self
        if name not in self._teacher_views:
            if name == ALL:
                self._teacher_views[name] = AllTeachers(self)
            elif name in self.groups:
                self._teacher_views[name] = self._added_records(self.groups[name])
            else:
                raise ConfigError(f"{self.location} has no teacher records named {name!r}; it has {', '.join(self.teachers)}"
                                  f"{' (or all)' if len(self.teachers) > 1 else ''}")
        return self._teacher_views[name]


class AllTeachers(HeldUnits):
    """Every teacher's records over the cache's views at once (record name ``all``).

    ``read_block`` gives the root's arrays with ``teachers``: one ``{values, indices, tail}`` per
    teacher, in the root's ``teachers`` order. A unit is held when every teacher has committed it.
    ``root``: a :class:`~kdcache.format.Cache` or a webdataset export of several teachers.
    """

    FINISH = ("training from every teacher needs each one's records of every unit: finish the precompute "
              "(kdcache precompute-logits --resume) and each kdcache add-teacher")

    def __init__(self, root):
        self.root, self.names = root, root.teachers
        self.views = [root.teacher_records(name) for name in self.names]
        self.location, self.manifest, self.subset, self.layout = root.location, root.manifest, root.subset, root.layout
        self.verify_checksums = root.verify_checksums
        self._units, self._lock = OrderedDict(), threading.Lock()
        self.ledger = {key: entry for key, entry in root.ledger.items() if all(key in view.ledger for view in self.views[1:])}

    def samples(self) -> dict:
        return self.root.samples()

    def read_block(self, epoch: int, block: int) -> dict:
        records = self.root.read_block(epoch, block)
        records["teachers"] = [{a: records[a] for a in TEACHER_ARRAYS}] + [
            view.read_block(epoch, block, arrays=list(TEACHER_ARRAYS)) for view in self.views[1:]]
        return records

    def digest(self) -> str:
        return self.root.digest()
