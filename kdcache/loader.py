"""The view loader: streams blocks, replays views, and yields batches with their teacher records.

For each training epoch the order of views is a pure function of (train seed, training epoch,
number of DataLoader workers), never of the number of ranks:

1. blocks are taken in a seeded order (units shuffled, then the blocks inside each unit, so
   consecutive windows share a unit's records) and grouped into *windows* of ``window_blocks``
   blocks;
2. inside a window the views are shuffled (a seeded shuffle buffer the size of the window) and
   cut into global batches; the few views left over in each window are shuffled together into
   final *tail windows*;
3. window ``w`` goes to DataLoader worker ``w mod n``, so each block is decoded once per epoch
   by one worker (tail views a second time); the DataLoader interleaves the workers' batches
   round-robin;
4. every global batch is split into ``world`` equal slices, one per rank, so a 2-rank run steps
   on exactly the views of a 1-rank run with the same global batch.

Teacher records are read by whole units (one contiguous, checksum-verified read per array) in a
prefetch thread one window ahead; from a cache of several teachers read as ``all``
(:class:`kdcache.format.AllTeachers`), every teacher's records of each view, in ``Batch.records``. Training epochs beyond the cached epochs cycle through them.
Without a cache (``--loss ce``, or an online teacher) the parameters are drawn from the spec
and the seed, exactly as precompute draws them. ``LoaderConfig.view_size`` replays the same
views at a student's own size (:mod:`kdcache.replay`, "Another size").
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from kdcache.augment import AugSpec, check_view_params, partner_positions, preset, sample_view_params
from kdcache.batch import Batch
from kdcache.distributed import Ranks
from kdcache.errors import ConfigError, KdcacheError, MismatchError
from kdcache.format import BlockLayout, Cache
from kdcache.plan import check_block, read_block
from kdcache.record import TeacherRecord, stored_record
from kdcache.replay import EncodedImages, PendingViews, replay_block, replay_pending, view_targets
from kdcache.sources import Source, decode_sample


@dataclass(frozen=True, kw_only=True)
class LoaderConfig:
    batch_size: int
    seed: int = 0
    window_blocks: int = 4
    num_workers: int = 0
    replay_path: str = "pil"
    view_size: int | None = None  # the views' side; None: the spec's output_size (the teacher's views)
    drop_last: bool = True
    defer_finish: bool = False  # yield uint8 views (or, on the device path, encoded images), finished by Batch.to()
    pin_memory: bool = False  # DataLoader workers' batches in page-locked memory (for a CUDA device)

    def __post_init__(self) -> None:
        if self.view_size is not None and (isinstance(self.view_size, bool) or not isinstance(self.view_size, int)
                                           or self.view_size < 1):
            raise ConfigError(f"view_size={self.view_size!r}; expected a positive whole number of pixels")
        if self.batch_size < 1 or self.window_blocks < 1 or self.num_workers < 0:
            raise ConfigError(
                f"batch_size={self.batch_size}, window_blocks={self.window_blocks}, num_workers={self.num_workers}; "
                "expected positive batch size and window, non-negative workers"
            )


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.Philox(np.random.SeedSequence([int(k) for k in key])))


class _Views:
    """What the loader needs to know about the views: layout, plan, spec, and where records come from."""

    def __init__(self, *, layout: BlockLayout, plan: dict, spec: AugSpec, num_classes: int, cache: Cache | None,
                 cache_epochs: list[int], seed: int, source: Source):
        self.layout, self.plan, self.spec, self.num_classes = layout, plan, spec, num_classes
        self.cache, self.cache_epochs, self.seed, self.source = cache, cache_epochs, seed, source


def _block_positions(layout: BlockLayout, blocks: list[int]) -> np.ndarray:
    """``[(block, position)]`` of every view of ``blocks``, block by block: built in numpy (1.28M views in milliseconds)."""
    sizes = np.array([layout.sizes[b] for b in blocks], dtype=np.int64)
    members = np.empty((int(sizes.sum()), 2), dtype=np.int64)
    members[:, 0] = np.repeat(np.asarray(blocks, dtype=np.int64), sizes)
    members[:, 1] = np.arange(len(members)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    return members


class _EpochPlan:
    """The epoch's windows: lists of (block, position) and how they are cut into global batches."""

    def __init__(self, views: _Views, blocks: list[int], config: LoaderConfig, train_epoch: int, num_workers: int,
                 slots: np.ndarray | None = None):
        layout = views.layout
        # Blocks in a seeded order that keeps each unit's blocks together (units shuffled, then the
        # blocks inside each): a unit's records are read once per epoch, by one worker.
        units: dict[int, list[int]] = {}
        for b in blocks:
            units.setdefault(layout.unit_of(b), []).append(b)
        unit_order = list(units)
        unit_order = [unit_order[i] for i in _rng(config.seed, train_epoch, 0x6F72646572).permutation(len(unit_order))]
        self.windows: list[np.ndarray] = []
        leftovers = []
        batch = config.batch_size
        workers = max(1, num_workers)
        for unit in unit_order:
            members_of_unit = units[unit]
            order = [members_of_unit[i] for i in _rng(config.seed, train_epoch, unit, 0x626C6B).permutation(len(members_of_unit))]
            for w in range(0, len(order), config.window_blocks):
                members = _block_positions(layout, order[w : w + config.window_blocks])
                members = members[_rng(config.seed, train_epoch, unit, w, 0x77696E).permutation(len(members))]
                if slots is not None:  # some views of these blocks only (e.g. all but MKD's meta split)
                    members = members[slots[members[:, 0] * layout.block_capacity + members[:, 1]]]
                cut = len(members) - len(members) % batch
                self.windows.append(members[:cut])
                leftovers.append(members[cut:])
        tail = np.concatenate(leftovers) if leftovers else np.zeros((0, 2), dtype=np.int64)
        tail = tail[_rng(config.seed, train_epoch, 0x7461696C).permutation(len(tail))]
        if not config.drop_last and len(tail) % batch:
            pad = batch - len(tail) % batch
            tail = np.concatenate([tail, tail[:pad]]) if len(tail) >= pad else np.resize(tail, (len(tail) + pad, 2))
        tail = tail[: len(tail) - len(tail) % batch]
        # The leftovers form tail windows of about a window's size, so no worker gets them all.
        per_tail = max(batch, (config.window_blocks * layout.block_capacity) // batch * batch)
        self.windows += [tail[i : i + per_tail] for i in range(0, len(tail), per_tail)]
        # Windows go to workers round-robin: balanced, and a worker's consecutive windows often share a unit.
        self.owner = [w % workers for w in range(len(self.windows))]
        self.batch = batch
        self.num_workers = workers
        per_worker = [0] * self.num_workers
        for w, members in enumerate(self.windows):
            per_worker[self.owner[w]] += len(members) // batch
        self.per_worker = per_worker
        self.num_batches = sum(per_worker)

    def resume_point(self, start_batch: int) -> tuple[list[int], int]:
        """After ``start_batch`` batches of the round-robin: batches done per worker, and the worker due next."""
        if not 0 <= start_batch <= self.num_batches:
            raise ConfigError(f"start_batch={start_batch}: expected 0 to the epoch's {self.num_batches} batches")
        done = [0] * self.num_workers
        remaining = list(self.per_worker)
        worker, delivered = 0, 0
        while delivered < start_batch:
            if remaining[worker] > 0:
                remaining[worker] -= 1
                done[worker] += 1
                delivered += 1
            worker = (worker + 1) % self.num_workers
        return done, worker


class _EpochStream(IterableDataset):
    """One training epoch of one rank, as an IterableDataset that splits windows over workers."""

    def __init__(self, views: _Views, config: LoaderConfig, ranks: Ranks, train_epoch: int, blocks: list[int], start_batch: int,
                 slots: np.ndarray | None = None):
        self.views, self.config, self.ranks = views, config, ranks
        self.train_epoch, self.start_batch = train_epoch, start_batch
        self.plan = _EpochPlan(views, blocks, config, train_epoch, config.num_workers, slots)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        done, due = self.plan.resume_point(self.start_batch)
        # A fresh DataLoader starts its round-robin at worker 0: worker 0 takes the role of the one due next.
        role = (worker + due) % workers
        skip = done[role] if workers > 1 else self.start_batch
        windows = [w for w in range(len(self.plan.windows)) if self.plan.owner[w] == role]
        reader = _WindowReader(self.views, self.config, self.train_epoch)
        try:
            yield from reader.batches(self.plan, windows, self.ranks, skip)
        except KdcacheError as exc:
            if info is None:
                raise
            yield _WorkerError(type(exc), str(exc))  # re-raised as itself in the main process


@dataclass(frozen=True)
class _WorkerError:
    """A kdcache error raised in a DataLoader worker, carried to the main process unwrapped."""

    kind: type
    message: str


def _unwrap_worker_errors(batches):
    for item in batches:
        if isinstance(item, _WorkerError):
            raise item.kind(item.message)
        yield item


class _WindowReader:
    """Reads records, decodes images and replays views for one window at a time."""

    def __init__(self, views: _Views, config: LoaderConfig, train_epoch: int):
        self.v, self.config, self.train_epoch = views, config, train_epoch
        self.cache_epoch = views.cache_epochs[train_epoch % len(views.cache_epochs)] if views.cache else train_epoch

    def _records(self, blocks: list[int]) -> dict[int, dict]:
        """The teacher records and parameters of a window's blocks (whole units, verified, cached)."""
        if self.v.cache is None:
            return {}
        return {b: self.v.cache.read_block(self.cache_epoch, b) for b in blocks}

    def batches(self, plan: _EpochPlan, windows: list[int], ranks: Ranks, skip: int):
        batch, world = plan.batch, ranks.world
        if batch % world:
            raise ConfigError(f"global batch size {batch} is not divisible by the {world} ranks")
        share = batch // world
        with ThreadPoolExecutor(max_workers=1) as prefetch:
            pending, pending_for = None, None
            for i, w in enumerate(windows):
                members = plan.windows[w]
                count = len(members) // batch
                if skip >= count:
                    skip -= count
                    continue
                blocks = sorted(set(members[:, 0].tolist()))
                records = pending.result() if pending is not None and pending_for == w else self._records(blocks)
                if i + 1 < len(windows):
                    nxt = windows[i + 1]
                    pending, pending_for = prefetch.submit(self._records, sorted(set(plan.windows[nxt][:, 0].tolist()))), nxt
                mine = np.concatenate([members[j * batch + ranks.rank * share : j * batch + (ranks.rank + 1) * share]
                                       for j in range(skip, count)]) if count > skip else members[:0]
                views = self._replay(mine, records)
                for j in range(count - skip):
                    rows = slice(j * share, (j + 1) * share)
                    yield self._batch(mine[rows], views, records)
                skip = 0

    def _replay(self, mine: np.ndarray, records: dict[int, dict]) -> dict:
        """The uint8 stage of every view this rank needs from the window, per block, and targets/labels."""
        v = self.v
        out = {}
        for block in sorted(set(mine[:, 0].tolist())):
            positions = np.unique(mine[mine[:, 0] == block, 1])
            where = v.layout.block_slots(block)
            members = v.plan["source_index"][where]
            samples = read_block(v.source, v.layout, block, members)
            if v.cache is not None:  # every sample's digest, before any view of the block is replayed or stepped on
                try:
                    check_block(samples, v.plan, where, what=f"data {v.source.uri} block {block} of the cache {v.cache.location}")
                except MismatchError as exc:
                    raise MismatchError(f"{exc}; training stopped before any step on this block") from None
            images = EncodedImages(samples) if self.config.replay_path == "device" else _LazyImages(samples)
            if v.cache is not None:
                params = records[block]["params"]
                # Stored parameters are checked before replay: valid checksums do not make them drawable.
                replayed = np.union1d(positions, partner_positions(v.spec, params, positions))
                check_view_params(v.spec, params, image_sizes=images.sizes(replayed), block_size=len(samples),
                                  where=f"{v.cache.location}: epoch {self.cache_epoch} block {block}")
            else:
                params = sample_view_params(v.spec, seed=v.seed, epoch=self.cache_epoch, block_id=block, sample_ids=members,
                                            image_sizes=images.sizes())
            labels = np.array([s.label for s in samples], dtype=np.int64)
            pending = replay_pending(v.spec, params, images, positions=positions, path=self.config.replay_path,
                                     size=self.config.view_size)
            targets = view_targets(v.spec, params, labels, v.num_classes, positions=positions)
            out[block] = (pending, {int(p): row for row, p in enumerate(positions.tolist())}, targets, labels)
        return out

    def _batch(self, members: np.ndarray, views: dict, records: dict[int, dict]) -> Batch:
        v = self.v
        targets, labels = [], []
        # Gather per view, in batch order, from each block's pending views.
        rows_by_block: dict[int, list[int]] = {}
        order = []
        for b, p in members:
            b, p = int(b), int(p)
            pending, row_of, block_targets, block_labels = views[b]
            rows_by_block.setdefault(b, []).append(row_of[p])
            order.append((b, len(rows_by_block[b]) - 1))
            targets.append(block_targets[row_of[p]])
            labels.append(int(block_labels[p]))
        blocks = list(rows_by_block)
        selected = [views[b][0].select(rows_by_block[b]) for b in blocks]
        offsets = dict(zip(blocks, np.cumsum([0] + [len(s) for s in selected[:-1]])))
        pending = PendingViews.cat(selected).select([offsets[b] + i for b, i in order])
        record, every = None, None
        if v.cache is not None:
            record = _gather_record(records, members, v.cache.manifest)
            if "teachers" in records[int(members[0, 0])]:  # every teacher's records (teacher_record "all")
                manifests = [view.manifest for view in v.cache.views]
                every = tuple(_gather_record({b: r["teachers"][t] for b, r in records.items()}, members, manifest)
                              for t, manifest in enumerate(manifests))
                record = every[0]
        slots = members[:, 0] * v.layout.block_capacity + members[:, 1]
        batch = Batch(
            images=None,
            target=torch.stack(targets),
            labels=torch.tensor(labels, dtype=torch.long),
            record=record,
            views=torch.from_numpy(np.stack([np.full(len(members), self.cache_epoch), slots], axis=1)),
            pending=(pending, v.spec),
            records=every,
        )
        if not self.config.defer_finish:
            batch.materialize()
        return batch


def _gather_record(records: dict[int, dict], members: np.ndarray, manifest) -> TeacherRecord:
    """The teacher records of the views ``members`` (block, position), in their order, from per-block arrays
    (``manifest``: the records' own, which says what their tail holds)."""
    rows = [{k: records[int(b)][k][int(p)] for k in ("values", "indices", "tail")} for b, p in members]
    return stored_record(np.stack([r["values"] for r in rows]), np.stack([r["indices"] for r in rows]).astype(np.int64),
                         np.stack([r["tail"] for r in rows]), manifest)


class _LazyImages:
    """A block's images, each decoded on first use (a rank decodes only the views it needs)."""

    def __init__(self, samples):
        self.samples = samples
        self.decoded: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, position: int):
        if position not in self.decoded:
            self.decoded[position] = decode_sample(self.samples[position])
        return self.decoded[position]

    def sizes(self, positions=None) -> list[tuple[int, int] | None]:
        """(height, width) of each image in block order; with ``positions``, None for the others (not decoded)."""
        wanted = range(len(self)) if positions is None else {int(p) for p in positions}
        return [(self[p].height, self[p].width) if p in wanted else None for p in range(len(self))]


class ViewLoader:
    """This rank's batches of one training epoch, deterministic in (train epoch, start batch)."""

    def __init__(self, *, source: Source, layout: BlockLayout, plan: dict, spec: AugSpec, num_classes: int,
                 config: LoaderConfig, ranks: Ranks, cache: Cache | None = None, cache_epochs: list[int] | None = None,
                 blocks: list[int] | None = None, view_seed: int = 0, slots: np.ndarray | None = None):
        if cache is not None and not cache_epochs:
            raise ConfigError(f"cache {cache.location} has no complete epoch to train from")
        self.views = _Views(layout=layout, plan=plan, spec=spec, num_classes=num_classes, cache=cache,
                            cache_epochs=list(cache_epochs or []), seed=view_seed, source=source)
        self.config, self.ranks = config, ranks
        self.blocks = list(range(layout.num_blocks)) if blocks is None else list(blocks)
        self.slots = slots  # bool per slot of the layout (block * block_capacity + position): these views only
        self.batches_per_epoch = _EpochPlan(self.views, self.blocks, config, 0, config.num_workers, slots).num_batches
        if self.batches_per_epoch == 0:
            raise ConfigError(f"batch size {config.batch_size} is larger than the {sum(layout.sizes[b] for b in self.blocks)} "
                              "training views per epoch")

    def epoch_batches(self, train_epoch: int, start_batch: int = 0):
        stream = _EpochStream(self.views, self.config, self.ranks, train_epoch, self.blocks, start_batch, self.slots)
        if self.config.num_workers == 0:
            return iter(stream)
        return _unwrap_worker_errors(DataLoader(stream, batch_size=None, num_workers=self.config.num_workers,
                                                persistent_workers=False, prefetch_factor=2,
                                                pin_memory=self.config.pin_memory))


def eval_batches(source: Source, spec: AugSpec, *, batch_size: int, num_classes: int, size: int | None = None):
    """Evaluation batches: centre crop at ``size`` (default the spec's) and the spec's normalisation, no teacher records."""
    eval_spec = preset("none", output_size=size or spec.output_size, mean=spec.mean, std=spec.std,
                       interpolation=spec.interpolation)
    n = len(source)
    for start in range(0, n, batch_size):
        samples = source.read(list(range(start, min(n, start + batch_size))))
        images = [decode_sample(s) for s in samples]
        params = sample_view_params(eval_spec, seed=0, epoch=0, block_id=0, sample_ids=np.arange(len(samples)),
                                    image_sizes=[(img.height, img.width) for img in images])
        labels = torch.tensor([s.label for s in samples], dtype=torch.long)
        yield Batch(
            images=replay_block(eval_spec, params, images),
            target=torch.nn.functional.one_hot(labels, num_classes).float(),
            labels=labels,
            record=None,
            views=torch.zeros(len(samples), 2, dtype=torch.long),
        )
