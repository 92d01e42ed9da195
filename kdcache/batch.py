"""The batch that flows from the view loader into the trainer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdcache.record import TeacherRecord


@dataclass
class Batch:
    """A batch of replayed views.

    ``images``: float32 ``[B, 3, H, W]``, normalised, exactly the tensors the teacher scored.
    ``target``: float32 ``[B, C]`` soft label (one-hot, or ``lam*y_i + (1-lam)*y_j`` for mixed views).
    ``labels``: int64 ``[B]``, each view's own label.
    ``record``: the teacher records of these views, or None when training without a cache.
    ``views``: int64 ``[B, 2]``: (cache epoch, sample position) of each view.
    """

    images: torch.Tensor
    target: torch.Tensor
    labels: torch.Tensor
    record: TeacherRecord | None
    views: torch.Tensor

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device, *, channels_last: bool = False) -> "Batch":
        images = self.images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return Batch(
            images=images,
            target=self.target.to(device, non_blocking=True),
            labels=self.labels.to(device, non_blocking=True),
            record=None if self.record is None else self.record.to(device),
            views=self.views,
        )
