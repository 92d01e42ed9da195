"""The batch that flows from the view loader into the trainer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
    finishes them on the target device (a quarter of the bytes to move, the same values).
    """

    images: torch.Tensor | None
    target: torch.Tensor
    labels: torch.Tensor
    record: TeacherRecord | None
    views: torch.Tensor
    pending: tuple[PendingViews, object] | None = None
    records: tuple[TeacherRecord, ...] | None = None

    def __len__(self) -> int:
        return self.labels.shape[0]

    def materialize(self, device=None) -> torch.Tensor:
        if self.images is None:
            views, spec = self.pending
            self.images, self.pending = views.materialize(spec, device), None
        return self.images

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
        )
