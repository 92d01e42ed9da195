"""The built-in sources: scikit-learn's digits, Debian's Fashion-MNIST IDX files, and image folders.

Their spec strings and splits are described in :mod:`kdcache.sources`.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from collections.abc import Iterator, Sequence
from functools import lru_cache

import numpy as np

from kdcache.errors import SourceError
from kdcache.format.store import npy_bytes
from kdcache.sources.base import Sample, Source, _check_split, _fixed_num_classes

#: Default location of Debian's ``dataset-fashion-mnist`` package.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
#: File extensions an imagefolder source picks up (case-insensitive).
IMAGE_FILE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")

# --- digits ---------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images.astype(np.int64) * 255 // 16).astype(np.uint8)
    images.setflags(write=False)
    labels = digits.target.astype(np.int64)
    labels.setflags(write=False)
    return images, labels


class DigitsSource(Source):
    """scikit-learn's 8x8 digits with a fixed 1,437 / 360 train / val split (see module docstring)."""

    kind = "digits"
    TOTAL = 1797
    TRAIN = 1797 * 4 // 5  # 1,437

    def __init__(self, *, split: str = "train", num_classes: int | None = None):
        _check_split(split, self.kind)
        self.split = split
        self.uri = f"digits:{split}"
        self.class_names = [str(c) for c in range(10)]
        self.num_classes = _fixed_num_classes(num_classes, self.class_names, "digits")
        permutation = np.random.RandomState(0).permutation(self.TOTAL)
        chosen = permutation[: self.TRAIN] if split == "train" else permutation[self.TRAIN :]
        self._original = np.sort(chosen)

    def __len__(self) -> int:
        return len(self._original)

    def read(self, indices: Sequence[int]) -> list[Sample]:
        images, labels = _digits_arrays()
        samples = []
        for i in self._positions(indices):
            j = int(self._original[i])
            samples.append(Sample(key=f"digits-{j:04d}", label=int(labels[j]), data=npy_bytes(images[j])))
        return samples


# --- fashion-mnist --------------------------------------------------------------------------

_IDX_IMAGES = 0x00000803  # unsigned bytes, 3 dimensions
_IDX_LABELS = 0x00000801  # unsigned bytes, 1 dimension


def _read_idx(path: str, *, magic: int) -> np.ndarray:
    """An IDX file (gzipped or not) as a uint8 array; the magic number is checked."""
    ndim = magic & 0xFF
    try:
        with open(path, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
        with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as exn:
        raise SourceError(f"cannot read IDX file '{path}': {exn}") from None
    header = 4 + 4 * ndim
    found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if found != magic:
        shown = "none (file too short)" if found is None else f"0x{found:08x}"
        raise SourceError(f"'{path}' is not the expected IDX file: magic number {shown}, expected 0x{magic:08x}")
    if len(raw) < header:
        raise SourceError(f"'{path}': IDX header truncated ({len(raw)} bytes, expected {header})")
    shape = struct.unpack(">" + "I" * ndim, raw[4:header])
    body = np.frombuffer(raw, dtype=np.uint8, offset=header)
    if body.size != int(np.prod(shape)):
        raise SourceError(
            f"'{path}' holds {body.size} bytes of data, expected {int(np.prod(shape))} for shape {shape}"
        )
    return body.reshape(shape)


def _idx_path(directory: str, stem: str) -> str:
    for name in (f"{stem}.gz", stem):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise SourceError(f"fashion-mnist file '{os.path.join(directory, stem)}.gz' does not exist (nor uncompressed)")


class FashionMnistSource(Source):
    """Fashion-MNIST from IDX files; ``val`` is the 10,000-image t10k set."""

    kind = "fashion-mnist"

    def __init__(self, directory: str = FASHION_MNIST_DIR, *, split: str = "train", num_classes: int | None = None):
        _check_split(split, self.kind)
        self.directory = os.path.abspath(os.path.expanduser(directory))
        if not os.path.isdir(self.directory):
            raise SourceError(
                f"fashion-mnist directory '{self.directory}' does not exist "
                "(install Debian's dataset-fashion-mnist or pass fashion-mnist:DIR)"
            )
        self.split = split
        self.uri = f"fashion-mnist:{self.directory}:{split}"
        self.class_names = list(FASHION_MNIST_CLASSES)
        self.num_classes = _fixed_num_classes(num_classes, self.class_names, "fashion-mnist")
        prefix = "train" if split == "train" else "t10k"
        self._images_path = _idx_path(self.directory, f"{prefix}-images-idx3-ubyte")
        self._labels_path = _idx_path(self.directory, f"{prefix}-labels-idx1-ubyte")
        self._labels_array: np.ndarray | None = None
        self._images_array: np.ndarray | None = None

    def _key(self, i: int) -> str:
        return f"fmnist-{self.split}-{i:05d}"

    def _labels(self) -> np.ndarray:
        if self._labels_array is None:
            labels = _read_idx(self._labels_path, magic=_IDX_LABELS)
            if labels.size == 0:
                raise SourceError(f"fashion-mnist '{self._labels_path}' contains no samples")
            bad = np.flatnonzero(labels >= self.num_classes)
            if bad.size:
                i = int(bad[0])
                raise SourceError(
                    f"'{self._labels_path}': sample '{self._key(i)}' has label {int(labels[i])}, "
                    f"expected 0 <= label < {self.num_classes}"
                )
            self._labels_array = labels
        return self._labels_array

    def _images(self) -> np.ndarray:
        if self._images_array is None:
            images = _read_idx(self._images_path, magic=_IDX_IMAGES)
            if len(images) != len(self._labels()):
                raise SourceError(
                    f"'{self._images_path}' holds {len(images)} images but "
                    f"'{self._labels_path}' holds {len(self._labels())} labels"
                )
            self._images_array = images
        return self._images_array

    def __len__(self) -> int:
        return len(self._labels())

    def read(self, indices: Sequence[int]) -> list[Sample]:
        positions = self._positions(indices)
        images, labels = self._images(), self._labels()
        return [Sample(key=self._key(i), label=int(labels[i]), data=npy_bytes(images[i])) for i in positions]


# --- imagefolder ----------------------------------------------------------------------------


class ImageFolderSource(Source):
    """torchvision's ImageFolder layout: ``DIR/<class>/**/<name>.<ext>``."""

    kind = "imagefolder"

    def __init__(self, root: str, *, split: str = "train", num_classes: int | None = None):
        self.root = os.path.abspath(os.path.expanduser(root))
        if not os.path.exists(self.root):
            raise SourceError(f"imagefolder directory '{self.root}' does not exist")
        if not os.path.isdir(self.root):
            raise SourceError(f"imagefolder path '{self.root}' is not a directory")
        self.split = split
        self.uri = f"imagefolder:{self.root}"
        self.class_names = sorted(
            entry.name for entry in os.scandir(self.root) if entry.is_dir() and not entry.name.startswith(".")
        )
        self._paths: list[str] = []
        self._keys: list[str] = []
        labels: list[int] = []
        seen: dict[str, str] = {}
        for label, name in enumerate(self.class_names):
            for relpath in self._image_files(name):
                key = os.path.splitext(relpath)[0]
                if key in seen:
                    raise SourceError(
                        f"imagefolder '{self.root}': duplicate key '{key}' (files '{seen[key]}' and "
                        f"'{relpath}'); keys are paths without extension, keep one file per name"
                    )
                seen[key] = relpath
                self._paths.append(relpath)
                self._keys.append(key)
                labels.append(label)
        if not self._keys:
            raise SourceError(
                f"imagefolder '{self.root}' contains no samples (expected image files "
                f"{' '.join(IMAGE_FILE_EXTENSIONS)} in one subdirectory per class; "
                f"found {len(self.class_names)} class directories)"
            )
        self.num_classes = _fixed_num_classes(num_classes, self.class_names, f"imagefolder '{self.root}'")
        self._labels = np.asarray(labels, dtype=np.int64)

    def _image_files(self, class_name: str) -> Iterator[str]:
        """Image files under one class directory, relative to the root with '/', in sorted walk order."""
        for dirpath, dirnames, filenames in os.walk(os.path.join(self.root, class_name), followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for filename in sorted(filenames):
                if filename.startswith(".") or os.path.splitext(filename)[1].lower() not in IMAGE_FILE_EXTENSIONS:
                    continue
                yield os.path.relpath(os.path.join(dirpath, filename), self.root).replace(os.sep, "/")

    def __len__(self) -> int:
        return len(self._keys)

    def read(self, indices: Sequence[int]) -> list[Sample]:
        samples = []
        for i in self._positions(indices):
            path = os.path.join(self.root, self._paths[i])
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                raise SourceError(f"imagefolder file '{path}' does not exist (removed after the scan?)") from None
            except OSError as exn:
                raise SourceError(f"cannot read imagefolder file '{path}': {exn}") from None
            samples.append(Sample(key=self._keys[i], label=int(self._labels[i]), data=data))
        return samples
