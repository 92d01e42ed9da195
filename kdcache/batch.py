"""The batch that flows from the view loader into the trainer."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from kdcache.ahead import on_stream, run_ahead, wait_for
from kdcache.record import TeacherRecord
from kdcache.replay import PendingViews


@dataclass
class Batch:
    """A batch of replayed views.

    ``images``: float32 ``[B, 3, H, W]``, normalised, exactly the tensors the teacher scored.
    ``target``: float32 ``[B, C]`` soft label (one-hot, or ``lam*y_i + (1-lam)*y_j`` for mixed views).
    ``labels``: int64 ``[B]``, each view's own label.
    ``record``: the teacher records of these views, or None when training without a cache.
    ``records``: with every teacher at once (``teacher_record="all"``), each teacher's records of
    these views, in the cache's teacher order (``record`` is then the first, ``main``); else None.
    ``views``: int64 ``[B, 2]``: (cache epoch, sample position) of each view.
    ``pending``: instead of ``images``, the views' uint8 stage and their spec; :meth:`to`
    finishes them on the target device (a quarter of the bytes to move, the same values). On
    the device path it holds the encoded images, decoded and replayed there: no image makes a
    round trip through the host.
    ``decoded``: where the batch's images were decoded (``device``, or ``host <format> <mode>``
    for the device path's fallbacks), once :meth:`materialize` has run; None on the other paths.
    """

    images: torch.Tensor | None
    target: torch.Tensor
    labels: torch.Tensor
    record: TeacherRecord | None
    views: torch.Tensor
    pending: tuple[PendingViews, object] | None = None
    records: tuple[TeacherRecord, ...] | None = None
    decoded: Counter | None = None

    def __len__(self) -> int:
        return self.labels.shape[0]

    def materialize(self, device=None) -> torch.Tensor:
        if self.images is None:
            views, spec = self.pending
            counts = Counter() if views.base is None else None
            self.images, self.pending = views.materialize(spec, device, counts), None
            if counts is not None:
                self.decoded = counts
        return self.images

    def pin_memory(self) -> "Batch":
        """For a DataLoader with ``pin_memory``: the batch's host tensors in page-locked memory."""
        pin = lambda t: t if t is None or t.is_cuda else t.pin_memory()  # noqa: E731
        if self.pending is not None:
            self.pending[0].pin_memory()
        return Batch(images=pin(self.images), target=pin(self.target), labels=pin(self.labels), record=self.record,
                     views=self.views, pending=self.pending, records=self.records, decoded=self.decoded)

    def to(self, device, *, channels_last: bool = False) -> "Batch":
        images = self.materialize(device).to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return Batch(
            images=images,
            target=self.target.to(device, non_blocking=True),
            labels=self.labels.to(device, non_blocking=True),
            record=None if self.record is None else self.record.to(device),
            views=self.views,
            records=None if self.records is None else tuple(r.to(device) for r in self.records),
            decoded=self.decoded,
        )

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the batch holds (images, targets, labels and records)."""
        records = [self.record] if self.records is None else list(self.records)
        found = [self.images, self.target, self.labels]
        found += [t for r in records if r is not None for t in (r.values, r.indices, r.tail)]
        return [t for t in found if t is not None]


def batches_on_device(batches: Iterable[Batch], device, *, channels_last: bool = False,
                      ahead: bool | None = None) -> Iterator[Batch]:
    """The batches moved to ``device`` (:meth:`Batch.to`): on the device path decoded and replayed there.

    ``ahead`` (default: on CUDA) moves the next batch while the caller works on this one: in a
    thread of its own, on a CUDA stream of its own, so the next batch's copies, decoding and replay
    overlap the student's step on the GPU; the caller's stream waits for a batch's event before
    it is used. Elsewhere a batch is moved when it is asked for (on the CPU the replay would
    only take cores from the student).
    """
    device = torch.device(device)
    if ahead is None:
        ahead = device.type == "cuda"
    if not ahead:
        for batch in batches:
            yield batch.to(device, channels_last=channels_last)
        return
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def move(batch: Batch):
        if stream is None:
            return batch.to(device, channels_last=channels_last), None
        return on_stream(stream, batch.to, device, channels_last)

    for moved, ready in run_ahead(batches, move, depth=1):
        if ready is not None:
            wait_for(ready, moved.tensors(), device)
        yield moved
