"""Structured synthetic 1000-class teacher logits, for storage and tail measurements.

No ImageNet teacher weights can be downloaded here, so 1000-class logits are synthesised with
the structure that matters for compression and for the tail: each sample has a true class and
a neighbourhood of related classes at nearby indices (ImageNet's classes are ordered by the
WordNet hierarchy, so related classes sit at nearby indices: e.g. dog breeds are 151-268), a
dominant top-1 logit around 15, related classes a few units lower, and a Gaussian bulk. Views of
one sample in different epochs perturb the same base logits (augmentation changes the image,
not the object). The Fashion-MNIST teacher's real logits are measured separately.
"""

from __future__ import annotations

import numpy as np


def synthetic_logits(num_samples: int, num_classes: int = 1000, *, epochs: int = 1, seed: int = 0) -> np.ndarray:
    """float32 ``[epochs, num_samples, num_classes]``."""
    rng = np.random.default_rng(seed)
    base = rng.normal(0.0, 1.5, size=(num_samples, num_classes)).astype(np.float32)
    true = rng.integers(0, num_classes, size=num_samples)
    for i in range(num_samples):
        width = int(rng.integers(5, 60))
        lo = max(0, true[i] - width)
        hi = min(num_classes, true[i] + width)
        related = rng.choice(np.arange(lo, hi), size=min(15, hi - lo), replace=False)
        base[i, related] += rng.uniform(2.0, 8.0, size=len(related))
        base[i, true[i]] += rng.uniform(8.0, 14.0)
    out = np.empty((epochs, num_samples, num_classes), dtype=np.float32)
    for e in range(epochs):
        out[e] = base + rng.normal(0.0, 1.0, size=base.shape) * 0.8
        out[e] += rng.normal(0.0, 1.5, size=(num_samples, 1))  # per-view logit shift
    return out
