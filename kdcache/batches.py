"""A cache's batches for your own training loop: :class:`CacheLoader` and :func:`teacher_records`.

``train-student`` is one loop over these batches; a team with its own loop (timm's train.py,
PyTorch Lightning, a script of its own) takes the same batches here::

    loader = CacheLoader("cache", data="digits", batch_size=64, rank=rank, world_size=world, device=device)
    for epoch in range(epochs):
        for batch in loader.epoch(epoch):
            logits = model(batch.images)
            loss = kd_loss(logits, batch.record, batch.target, alpha=0.9, temperature=4.0)

Each epoch's views are those ``train-student`` replays: the order is a function of (``seed``,
epoch) and never of the number of ranks; every global batch of ``batch_size * world_size``
views is cut into ``world_size`` equal slices, rank ``rank`` taking its own, so any number of
ranks steps on the views of one. Training epochs beyond the cached epochs cycle through them.

The data is checked against the cache as it streams: a sample that differs from the one the
teacher scored stops the epoch with a :class:`~kdcache.errors.MismatchError` before any batch
of its block is yielded. docs/python.md has worked examples.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from kdcache.augment import cache_spec
from kdcache.batch import Batch, batches_on_device
from kdcache.distributed import Ranks
from kdcache.errors import ConfigError, IncompleteCacheError, MismatchError
from kdcache.format import MAIN, AllTeachers, Cache, format_selection, open_cache
from kdcache.loader import LoaderConfig, ViewLoader, eval_batches
from kdcache.plan import check_block, read_block
from kdcache.record import TeacherRecord, stored_record
from kdcache.replay import PATHS
from kdcache.sources import Source, open_source


def open_training_data(cache: Cache, data: str | Source, *, cache_name: str | None = None) -> Source:
    """The source a cache was made from, opened with the shard sizes and split the cache recorded, and checked to fit it.

    Errors name the data and the cache as given (``cache_name``, else the cache's location).
    """
    m = cache.manifest
    name, cache_name = (data if isinstance(data, str) else data.uri), cache_name or cache.location
    if isinstance(data, Source):
        source = data
    else:
        shard_sizes = [n for _, n in m.dataset.shards] if m.dataset.shards else None
        source = open_source(data, split=m.dataset.split, **({"shard_sizes": shard_sizes} if shard_sizes else {}))
    if source.num_classes != m.teacher.num_classes:
        raise MismatchError(f"data {name} has {source.num_classes} classes, the cache {cache_name} has {m.teacher.num_classes}")
    if len(source) != m.dataset.num_samples:
        raise MismatchError(f"data {name} has {len(source)} samples, the cache {cache_name} was made from "
                            f"{m.dataset.num_samples}")
    return source


def held_views(cache: Cache, *, name: str | None = None) -> tuple[list[int], list[int]]:
    """(epochs, blocks) to train from: every unit of every planned epoch, or what a subset declares; a missing unit is refused.

    A precompute stopped early (even at an epoch boundary) is refused, naming the first missing
    unit; a subset made by ``kdcache export`` must hold every unit it declares.
    """
    m, name = cache.manifest, name or cache.location
    epochs, units = cache.held_units()
    missing = cache.missing_units()
    if missing and cache.subset is None:
        epoch, unit = missing[0]
        added = getattr(cache, "group", None) is not None or isinstance(cache, AllTeachers)  # an added teacher's gap
        finish = cache.FINISH if added else "finish it with kdcache precompute-logits --resume"
        raise IncompleteCacheError(
            f"cache {name}: epoch {epoch} unit {unit} is not committed ({len(cache.ledger)} of "
            f"{m.epochs * len(units)} units); {finish}"
        )
    if missing:
        epoch, unit = missing[0]
        blocks = m.blocks.unit_blocks(unit)
        raise IncompleteCacheError(
            f"cache {name}: epoch {epoch} unit {unit} (blocks {blocks.start}..{blocks.stop - 1}) is missing from "
            f"this subset (it declares epochs {format_selection(epochs)}, blocks {format_selection(cache.held_blocks())}); "
            f"export it again from {cache.subset.source}"
        )
    return epochs, cache.held_blocks()


def teacher_view(cache, teacher_record: str):
    """The cache as one teacher's records see it (``main``, an added teacher's name) or every teacher's (``all``)."""
    if not isinstance(teacher_record, str):
        raise ConfigError(f"teacher_record={teacher_record!r}: expected a teacher's record name, or 'all'")
    if teacher_record == MAIN:
        return cache
    return cache.teacher_records(teacher_record)  # a cache, or a webdataset export (which holds every teacher's records)


def check_all_samples(cache: Cache, source: Source, *, name: str | None = None) -> None:
    """Every sample's digest against the cache's plan, in one pass (the loader checks each block as it streams anyway)."""
    m, plan = cache.manifest, cache.samples()
    for block in range(m.blocks.num_blocks):
        where = m.blocks.block_slots(block)
        check_block(read_block(source, m.blocks, block, plan["source_index"][where]), plan, where,
                    what=f"data {name or source.uri} (block {block})")


def _device(device: str | torch.device) -> torch.device:
    try:
        found = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {device!r} is not a torch device; expected e.g. 'cpu' or 'cuda:0'") from None
    if found.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device {device!r}: this machine has no CUDA device; use 'cpu'")
        if found.index is not None and found.index >= count:
            raise ConfigError(f"device {device!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif found.type != "cpu":
        raise ConfigError(f"device {device!r}: expected 'cpu' or a CUDA device such as 'cuda:0'")
    return found


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what}={value!r}: expected a positive integer")
    return value


def _block_numbers(blocks) -> list[int]:
    if isinstance(blocks, (str, bytes)) or not isinstance(blocks, Sequence) or not all(
            isinstance(b, (int, np.integer)) and not isinstance(b, bool) for b in blocks):
        raise ConfigError(f"blocks={blocks!r}: expected a sequence of block numbers (integers)")
    return sorted({int(b) for b in blocks})


class CacheLoader:
    """One rank's batches of a cache's views, epoch by epoch, on ``device``.

    ``cache``: a path, URL or opened :class:`~kdcache.format.Cache`. ``data``: the source the
    cache was made from (spec string or :class:`~kdcache.sources.Source`). ``batch_size``: views
    per rank and step (the global batch is ``batch_size * world_size``). ``seed`` sets the order
    of views; ``blocks`` trains on some blocks only (e.g. all but a held-out meta split), in the
    cache's numbering. ``num_workers``: DataLoader workers that decode and replay. ``image_size``:
    the student's view size in pixels (default: the size the teacher scored them at); the views
    are the same views replayed at that size (docs/format.md, "Replay at another size"). Each
    batch is a :class:`~kdcache.batch.Batch` whose ``images``, ``target``, ``labels`` and
    ``record`` are on ``device``. ``teacher_record``: whose records (``main``, the cache's first
    teacher; an added teacher's name; or ``all``, every teacher's in ``batch.records``).
    ``replay_path``: default the cache's (what the teacher saw); ``device`` decodes and replays
    on ``device`` itself (:mod:`kdcache.device_replay`), counting in :attr:`decoded` where each
    image was decoded. Another path than the cache's gives slightly different pixels. On CUDA the
    next batch is moved (on the device path decoded and replayed) on a stream of its own while
    the current one is used (:func:`~kdcache.batch.batches_on_device`); the batches are the same.
    """

    def __init__(self, cache: str | Cache, data: str | Source, *, batch_size: int, rank: int = 0, world_size: int = 1,
                 device: str | torch.device = "cpu", seed: int = 0, num_workers: int = 0,
                 blocks: Sequence[int] | None = None, channels_last: bool = False, verify_checksums: bool = True,
                 image_size: int | None = None, teacher_record: str = MAIN, replay_path: str | None = None):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size={batch_size!r}: expected a positive number of views per rank")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigError(f"num_workers={num_workers!r}: expected 0 or more DataLoader workers")
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise ConfigError(f"rank={rank!r}, world_size={world_size!r}: expected 0 <= rank < world_size")
        if image_size is not None:
            _positive_int(image_size, "image_size")
        self.device, self.channels_last = _device(device), channels_last
        self.cache = open_cache(cache, verify_checksums=verify_checksums) if not isinstance(cache, Cache) else cache
        self.records = teacher_view(self.cache, teacher_record)
        self.source = open_training_data(self.cache, data)
        m = self.cache.manifest
        self.cache_epochs, held = held_views(self.records)
        if blocks is None:
            self.blocks = held
        else:
            self.blocks = _block_numbers(blocks)
            outside = [b for b in self.blocks if b not in set(held)]
            if not self.blocks or outside:
                raise ConfigError(f"blocks {format_selection(self.blocks) or '(none)'}: the cache {self.cache.location} holds "
                                  f"blocks {format_selection(held)}")
        self.spec = cache_spec(m)
        self._size = image_size or self.spec.output_size
        self.num_classes = m.teacher.num_classes
        self.class_names = list(m.dataset.class_names)
        if replay_path is not None and replay_path not in PATHS:
            raise ConfigError(f"replay_path={replay_path!r}: expected one of {', '.join(PATHS)} (default: the cache's)")
        self.replay_path = replay_path or m.replay["path"]
        on_gpu = self.device.type == "cuda"
        config = LoaderConfig(batch_size=batch_size * world_size, seed=seed, num_workers=num_workers, defer_finish=on_gpu,
                              pin_memory=on_gpu and num_workers > 0, replay_path=self.replay_path, view_size=self._size)
        self.decoded: Counter = Counter()  # the device path: where this loader's images were decoded
        self._loader = ViewLoader(source=self.source, layout=m.blocks, plan=self.cache.samples(), spec=self.spec,
                                  num_classes=self.num_classes, config=config, ranks=Ranks(rank=rank, world=world_size),
                                  cache=self.records, cache_epochs=self.cache_epochs, blocks=self.blocks, view_seed=seed)
        self._epoch = 0

    @property
    def image_size(self) -> int:
        """The views' height and width in pixels: ``image_size`` if given, else the size the teacher scored them at."""
        return self._size

    def __len__(self) -> int:
        """Batches per epoch on each rank (the same on every rank)."""
        return self._loader.batches_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """The epoch ``iter(loader)`` yields next, as with ``DistributedSampler.set_epoch``."""
        self._epoch = int(epoch)

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch(self._epoch)

    def epoch(self, epoch: int, *, start_batch: int = 0) -> Iterator[Batch]:
        """This rank's batches of training epoch ``epoch`` (from batch ``start_batch``, to resume)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ConfigError(f"epoch={epoch!r}: expected a training epoch >= 0")
        if isinstance(start_batch, bool) or not isinstance(start_batch, int) or not 0 <= start_batch <= len(self):
            raise ConfigError(f"start_batch={start_batch!r}: expected 0 to the epoch's {len(self)} batches")
        return self._batches(epoch, start_batch)

    def _batches(self, epoch: int, start_batch: int) -> Iterator[Batch]:
        moved = batches_on_device(self._loader.epoch_batches(epoch, start_batch), self.device,
                                  channels_last=self.channels_last)  # on CUDA the next batch moves while this one is used
        for batch in moved:
            if batch.decoded:
                self.decoded.update(batch.decoded)
            yield batch

    def eval_batches(self, data: str | Source, *, batch_size: int = 256) -> Iterator[Batch]:
        """Validation batches of ``data`` on the device: centre crop at the views' size and normalisation, no records.

        A spec string without a split (``digits``) opens its ``train`` split: name the one to
        evaluate on (``digits:val``).
        """
        _positive_int(batch_size, "batch_size")
        source = data if isinstance(data, Source) else open_source(data)
        return self._eval_batches(source, batch_size)

    def _eval_batches(self, source: Source, batch_size: int) -> Iterator[Batch]:
        if source.num_classes != self.num_classes:
            raise MismatchError(f"validation data {source.uri} has {source.num_classes} classes, the cache {self.num_classes}")
        for batch in eval_batches(source, self.spec, batch_size=batch_size, num_classes=self.num_classes, size=self._size):
            yield batch.to(self.device, channels_last=self.channels_last)


def teacher_records(cache: str | Cache, epoch: int, block: int, *, device: str | torch.device = "cpu",
                    teacher_record: str = MAIN) -> TeacherRecord:
    """The teacher records of one cached (epoch, block), in slot order: row ``i`` is the block's ``i``-th sample.

    The block's samples are ``cache.samples()["source_index"][cache.layout.block_slots(block)]``.
    ``teacher_record``: whose records (``main``, or an added teacher's name).
    """
    cache = open_cache(cache) if not isinstance(cache, Cache) else cache
    if teacher_record == "all":
        raise ConfigError("teacher_record='all': teacher_records gives one teacher's records; name one (main, or an added teacher)")
    cache = teacher_view(cache, teacher_record)
    epochs, blocks = cache.manifest.epochs, cache.layout.num_blocks
    for value, what, count in ((epoch, "epoch", epochs), (block, "block", blocks)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < count:
            raise ConfigError(f"{what}={value!r}: the cache {cache.location} has {what}s 0 to {count - 1}")
    arrays = cache.read_block(int(epoch), int(block))
    record = stored_record(arrays["values"], arrays["indices"].astype(np.int64), arrays["tail"], cache.manifest)
    return record.to(_device(device))
