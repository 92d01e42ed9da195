"""Sources: the samples of an image-classification dataset, by position, with stable keys.

A :class:`Source` is an indexable, read-only dataset of :class:`Sample` (key, label, the raw
stored bytes of the image). :func:`open_source` opens one from a spec string, and a source's
``uri`` reopens the same data. Four kinds:

- ``digits[:train|val]``: scikit-learn's 8x8 digits (shipped in its wheel). A fixed split: a
  ``numpy.random.RandomState(0)`` permutation of the 1,797 images (the legacy generator, whose
  stream NumPy keeps stable), the first 1,437 are ``train``, the other 360 ``val``; inside a
  split the samples keep their original order. Keys ``digits-0042`` use the original index.
- ``fashion-mnist[:DIR][:train|val]``: the IDX files of Debian's ``dataset-fashion-mnist``
  (``train-*`` for train, ``t10k-*`` for val; gzipped or not), read lazily and then kept in
  memory. Keys ``fmnist-train-00000``.
- ``imagefolder:DIR``: one subdirectory per class (sorted names are the class names), image
  files found recursively in sorted order; hidden files and directories are skipped. The key
  is the path relative to DIR without its extension, the bytes are the file's.
- webdataset tar shards: ``webdataset:PATTERN`` or any ``.tar`` path, URL or brace pattern
  (``/data/shard-{000000..000009}.tar``), read by :class:`kdcache.shards.WebDatasetSource`
  (see there). :meth:`Source.read_shard` streams one shard in one sequential read.

Digits and Fashion-MNIST store each image as NumPy ``.npy`` bytes of a uint8 array, exact and
independent of any image codec; :func:`decode_image` reads those and anything Pillow reads.

Error policy (checked when a source is opened or its data first read, never with ``assert``):

- a missing path, directory or file: :class:`SourceError` naming the path;
- a source with zero samples: :class:`SourceError` "... contains no samples";
- an empty tar shard among others: :class:`SourceError` naming the shard when blocks are
  planned (a block is never empty);
- a label outside ``[0, num_classes)``: :class:`SourceError` naming the key and the label;
- two samples with the same key: :class:`SourceError` naming the key;
- a tar member group without an image, without a ``cls``, or with a non-integer ``cls``, or
  an unreadable shard: :class:`SourceError` naming the shard (and the key);
- bytes that are not an image at all (no image header: a text file, an error page, an empty
  file): :class:`SourceError` naming the key when a cache's plan is made, before anything is
  written (:func:`check_image_header`);
- an image whose body cannot be decoded (a truncated file): :class:`SourceError` naming the
  key when the sample is first decoded (:func:`decode_sample`); precompute stops there, keeps
  the units it committed and names the epoch and block;
- an unknown spec, a bad split or an inconsistent ``num_classes`` / ``shard_sizes``:
  :class:`ConfigError` saying what is accepted.

An index outside ``[0, len(source))`` is a caller bug and raises :class:`IndexError`.

No sample is ever skipped: a cache's plan (which sample sits in which slot, with its label and
digest) is fixed when the cache is made, and a source that differs later (a sample added,
removed, replaced or relabelled) is refused naming the count or the first sample that differs
(:func:`kdcache.plan.check_block`), never planned around.
"""

from __future__ import annotations

import abc
import gzip
import hashlib
import io
import operator
import os
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import ClassVar

import numpy as np
from PIL import Image

from kdcache.errors import ConfigError, SourceError

SPLITS = ("train", "val")
#: Default location of Debian's ``dataset-fashion-mnist`` package.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
#: File extensions an imagefolder source picks up (case-insensitive).
IMAGE_FILE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
ACCEPTED_SPECS = (
    "digits[:train|val], fashion-mnist[:DIR][:train|val], imagefolder:DIR, "
    "webdataset:PATTERN, or a .tar path/URL/brace pattern such as /data/shard-{000000..000009}.tar"
)

_NPY_MAGIC = b"\x93NUMPY"
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


# --- samples and decoding -------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Sample:
    """One item of a source: a key unique within the source, a label, the stored image bytes."""

    key: str
    label: int
    data: bytes = field(repr=False)

    @property
    def digest(self) -> int:
        """Content digest of ``data``: blake2b with 8-byte output, big-endian, as an unsigned int."""
        return int.from_bytes(hashlib.blake2b(self.data, digest_size=8).digest(), "big")


class _Undecodable(Exception):
    """Internal: why some bytes are not an image (turned into a SourceError by the callers)."""


def npy_bytes(array: np.ndarray) -> bytes:
    """The ``.npy`` bytes of an array, in format version 1.0 (a stable header)."""
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(array), version=(1, 0), allow_pickle=False)
    return buffer.getvalue()


def _image_from_npy(data: bytes) -> Image.Image:
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exn:
        raise _Undecodable(f"bad .npy data ({exn})") from None
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    shape_ok = array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))
    if array.dtype != np.uint8 or not shape_ok or array.size == 0:
        raise _Undecodable(
            f".npy array of dtype {array.dtype} and shape {array.shape}, "
            "expected uint8 of shape HxW or HxWxC with C in 1, 3, 4"
        )
    return Image.fromarray(array)


def decode_native(data: bytes) -> Image.Image:
    """Decode image bytes to a loaded image of mode ``L`` or ``RGB`` (other modes become RGB).

    Raises :class:`SourceError` ("cannot decode image: <reason>") on undecodable bytes.
    """
    try:
        return _decode_native(data)
    except _Undecodable as exn:
        raise SourceError(f"cannot decode image: {exn}") from None


def _decode_native(data: bytes) -> Image.Image:
    if not data:
        raise _Undecodable("empty data")
    if data.startswith(_NPY_MAGIC):
        image = _image_from_npy(data)
    else:
        try:
            with Image.open(io.BytesIO(data)) as opened:
                opened.load()
                image = opened.copy()
        except Image.UnidentifiedImageError:
            raise _Undecodable(f"not a recognised image format (first bytes {data[:8]!r})") from None
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exn:
            raise _Undecodable(f"{type(exn).__name__}: {exn}") from None
    return image if image.mode in ("L", "RGB") else image.convert("RGB")


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes (``.npy`` or any format Pillow reads) to an ``RGB`` image.

    Raises :class:`SourceError` ("cannot decode image: <reason>") on undecodable bytes;
    prefer :func:`decode_sample`, whose message names the sample.
    """
    return decode_native(data).convert("RGB")


def check_image_header(sample: Sample) -> None:
    """Refuse bytes that are not an image at all, naming the sample; cheap (the header only, no pixels).

    A file whose header reads but whose body is damaged passes; :func:`decode_sample` names it later.
    """
    data = sample.data
    try:
        if not data:
            raise _Undecodable("empty data")
        if data.startswith(_NPY_MAGIC):
            _image_from_npy(data)  # .npy images are small arrays: checking them whole costs nothing
            return
        try:
            with Image.open(io.BytesIO(data)):
                pass
        except Image.UnidentifiedImageError:
            raise _Undecodable(f"not a recognised image format (first bytes {data[:8]!r})") from None
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exn:
            raise _Undecodable(f"{type(exn).__name__}: {exn}") from None
    except _Undecodable as exn:
        raise SourceError(f"sample '{sample.key}': cannot decode image: {exn}") from None


def decode_sample(sample: Sample) -> Image.Image:
    """Decode a sample's image to ``RGB``; a SourceError names the sample's key."""
    try:
        return _decode_native(sample.data).convert("RGB")
    except _Undecodable as exn:
        raise SourceError(f"sample '{sample.key}': cannot decode image: {exn}") from None


# --- the source interface -------------------------------------------------------------------


def check_num_classes(num_classes: int | None) -> int | None:
    """``num_classes`` as an int (None stays None); ConfigError unless it is a positive integer."""
    if num_classes is None:
        return None
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    return int(num_classes)


def _fixed_num_classes(num_classes: int | None, names: list[str], what: str) -> int:
    """A source with its own class list: ``num_classes``, if given, must agree with it."""
    num_classes = check_num_classes(num_classes)
    if num_classes is not None and num_classes != len(names):
        raise ConfigError(
            f"num_classes={num_classes} does not match the {len(names)} classes of {what}; "
            f"pass {len(names)} or leave it unset"
        )
    return len(names)


def _check_split(split: str, kind: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"{kind} split {split!r}; expected one of {', '.join(SPLITS)}")


class Source(abc.ABC):
    """An indexable dataset of samples. Concrete kinds: digits, fashion-mnist, imagefolder, webdataset.

    Attributes: ``kind``, ``uri`` (reopens the same data with :func:`open_source`), ``split``,
    ``num_classes``, ``class_names``.
    """

    kind: ClassVar[str]
    uri: str
    split: str
    num_classes: int
    class_names: list[str]

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def read(self, indices: Sequence[int]) -> list[Sample]:
        """The samples at these global positions, in the order given (repeats allowed)."""

    def shards(self) -> list[tuple[str, int]] | None:
        """``[(shard_url, n_samples), ...]`` for tar-sharded sources, else None."""
        return None

    def read_shard(self, shard_index: int) -> list[Sample]:
        """All samples of one tar shard (webdataset sources only)."""
        return list(self.iter_shard(shard_index))

    def iter_shard(self, shard_index: int) -> Iterator[Sample]:
        """Stream the samples of one tar shard (webdataset sources only)."""
        raise ConfigError(f"{self.kind} source '{self.uri}' has no tar shards; only webdataset sources do")

    def iter_samples(self, *, chunk_size: int = 256) -> Iterator[Sample]:
        """Every sample in position order (webdataset sources stream shard by shard)."""
        n = len(self)
        for start in range(0, n, chunk_size):
            yield from self.read(range(start, min(n, start + chunk_size)))

    def _positions(self, indices: Sequence[int]) -> list[int]:
        n = len(self)
        positions = [operator.index(i) for i in indices]
        for i in positions:
            if not 0 <= i < n:
                raise IndexError(f"{self.kind} source '{self.uri}': index {i} outside [0, {n})")
        return positions

    def __repr__(self) -> str:
        return f"{type(self).__name__}(uri={self.uri!r}, split={self.split!r})"


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


# --- opening a spec -------------------------------------------------------------------------


def _split_suffix(rest: str) -> tuple[str, str | None]:
    for split in SPLITS:
        if rest == split:
            return "", split
        if rest.endswith(":" + split):
            return rest[: -len(split) - 1], split
    return rest, None


def _looks_like_tar(spec: str) -> bool:
    return spec.lower().endswith(_TAR_SUFFIXES)


def open_source(
    spec: str,
    *,
    split: str = "train",
    num_classes: int | None = None,
    shard_sizes: Sequence[int] | None = None,
) -> Source:
    """Open a source from a spec string (see the module docstring); a ``:train|:val`` suffix overrides ``split``.

    ``shard_sizes`` (webdataset only) skips the scan of shard sizes, e.g. with sizes a cache recorded.
    """
    spec = spec.strip() if isinstance(spec, str) else spec
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"source spec {spec!r} is empty; expected {ACCEPTED_SPECS}")
    if not isinstance(split, str) or not split:
        raise ConfigError(f"split {split!r} must be a non-empty string")
    kind, _, rest = spec.partition(":")
    source: Source
    if kind == "webdataset" or (kind not in ("digits", "fashion-mnist", "imagefolder") and _looks_like_tar(spec)):
        pattern = rest if kind == "webdataset" else spec
        if not pattern:
            raise ConfigError(f"source spec {spec!r} names no shards; expected webdataset:PATTERN")
        from kdcache.shards import WebDatasetSource

        return WebDatasetSource(pattern, split=split, num_classes=num_classes, shard_sizes=shard_sizes)
    if shard_sizes is not None:
        raise ConfigError(f"shard_sizes is for webdataset sources only, but the spec is {spec!r}")
    if kind == "digits":
        _, chosen = _split_suffix(rest)
        if rest and chosen is None:
            raise ConfigError(
                f"source spec {spec!r}: unknown split {rest!r}; expected digits, digits:train or digits:val"
            )
        source = DigitsSource(split=chosen or split, num_classes=num_classes)
    elif kind == "fashion-mnist":
        directory, chosen = _split_suffix(rest)
        source = FashionMnistSource(directory or FASHION_MNIST_DIR, split=chosen or split, num_classes=num_classes)
    elif kind == "imagefolder":
        if not rest:
            raise ConfigError(f"source spec {spec!r} names no directory; expected imagefolder:DIR")
        source = ImageFolderSource(rest, split=split, num_classes=num_classes)
    else:
        raise ConfigError(f"unknown source spec {spec!r}; expected one of {ACCEPTED_SPECS}")
    return source
