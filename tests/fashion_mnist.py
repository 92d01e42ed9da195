"""Fashion-MNIST's IDX files, written by the tests themselves: no test needs Debian's dataset-fashion-mnist.

The files have the names and layout that package installs (``train-*`` and ``t10k-*``, gzipped or
not), so every option and error path of the fashion-mnist source is tested on data made here.
tests/real_data.py reads the real package, in .ci/run only.
"""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np

IDX_IMAGES = 0x803  # unsigned bytes, 3 dimensions
IDX_LABELS = 0x801  # unsigned bytes, 1 dimension


def write_idx(path, magic: int, array: np.ndarray, *, compress: bool) -> None:
    raw = struct.pack(">I", magic) + struct.pack(">" + "I" * array.ndim, *array.shape) + array.tobytes()
    with (gzip.open(path, "wb") if compress else open(path, "wb")) as f:
        f.write(raw)


def write_fashion_mnist(directory, *, labels=(3, 1, 4), images=None, split: str = "train", compress: bool = False,
                        label_magic: int = IDX_LABELS) -> str:
    """One split's image and label files in ``directory``; returns the directory.

    ``images`` defaults to 2x2 images holding 0, 1, 2, ... in order; ``label_magic`` writes a wrong
    magic number into the label file.
    """
    os.makedirs(directory, exist_ok=True)
    labels = np.asarray(labels, np.uint8)
    if images is None:
        images = np.arange(len(labels) * 4, dtype=np.uint8).reshape(len(labels), 2, 2)
    prefix = {"train": "train", "val": "t10k"}[split]
    suffix = ".gz" if compress else ""
    write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte{suffix}"), IDX_IMAGES, images, compress=compress)
    write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte{suffix}"), label_magic, labels, compress=compress)
    return str(directory)


def random_images(n: int, *, seed: int = 0) -> np.ndarray:
    """``n`` random 28x28 uint8 images, the shape of Fashion-MNIST's."""
    return np.random.default_rng(seed).integers(0, 256, (n, 28, 28), dtype=np.uint8)
