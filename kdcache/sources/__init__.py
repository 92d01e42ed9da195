"""Sources: the samples of an image-classification dataset, by position, with stable keys.

A :class:`Source` is an indexable, read-only dataset of :class:`Sample` (key, label, the raw
stored bytes of the image). :func:`open_source`, the one place that dispatches a spec string to
its kind, opens one, and a source's ``uri`` reopens the same data. Five kinds:

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
  (``/data/shard-{000000..000009}.tar``), read by :class:`kdcache.sources.webdataset.WebDatasetSource`
  (see there). :meth:`Source.read_shard` streams one shard in one sequential read.
- parquet as the Hugging Face Hub keeps datasets: ``parquet:PATH`` (a file, a directory or a
  glob, local or an fsspec URL such as ``hf://datasets/ORG/NAME@REVISION/data/train-*.parquet``)
  or any ``.parquet`` path, read by :class:`kdcache.sources.parquet.ParquetSource` (see there),
  one block per row group.

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
- a parquet file without an ``image`` or ``label`` column, or a row without image bytes or
  label: :class:`SourceError` naming the file (and the key);
- a URL whose fsspec protocol needs a package that is not installed (s3fs, gcsfs...):
  :class:`ConfigError` naming the package;
- an unknown spec, a bad split or an inconsistent ``num_classes`` / ``shard_sizes``:
  :class:`ConfigError` saying what is accepted.

An index outside ``[0, len(source))`` is a caller bug and raises :class:`IndexError`.

No sample is ever skipped: a cache's plan (which sample sits in which slot, with its label and
digest) is fixed when the cache is made, and a source that differs later (a sample added,
removed, replaced or relabelled) is refused naming the count or the first sample that differs
(:func:`kdcache.plan.check_block`), never planned around.
"""

from __future__ import annotations

from collections.abc import Sequence

from kdcache.errors import ConfigError
from kdcache.format.store import npy_bytes
from kdcache.sources.base import (
    DEVICE_DECODABLE,
    SPLITS,
    ImageHeader,
    Sample,
    Source,
    check_image_header,
    check_num_classes,
    decode_image,
    decode_native,
    decode_on_device,
    decode_sample,
    image_header,
    stored_format,
)
from kdcache.sources.builtin import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    IMAGE_FILE_EXTENSIONS,
    DigitsSource,
    FashionMnistSource,
    ImageFolderSource,
)
from kdcache.sources.parquet import ParquetSource
from kdcache.sources.webdataset import WebDatasetSource

__all__ = [
    "ACCEPTED_SPECS", "DEVICE_DECODABLE", "FASHION_MNIST_CLASSES", "FASHION_MNIST_DIR", "IMAGE_FILE_EXTENSIONS", "SPLITS",
    "DigitsSource", "FashionMnistSource", "ImageFolderSource", "ImageHeader", "ParquetSource", "Sample", "Source", "WebDatasetSource",
    "check_image_header", "check_num_classes", "decode_image", "decode_native", "decode_on_device", "decode_sample",
    "image_header", "npy_bytes", "open_source", "stored_format",
]

ACCEPTED_SPECS = (
    "digits[:train|val], fashion-mnist[:DIR][:train|val], imagefolder:DIR, "
    "webdataset:PATTERN, or a .tar path/URL/brace pattern such as /data/shard-{000000..000009}.tar, "
    "parquet:PATH (a file, directory or glob; local or a URL such as hf://datasets/ORG/NAME/...) or a .parquet path"
)

_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


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

    ``shard_sizes`` (webdataset and parquet) skips the scan of shard sizes (webdataset) or checks the
    footers' block sizes against them (parquet), e.g. with sizes a cache recorded.
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
        return WebDatasetSource(pattern, split=split, num_classes=num_classes, shard_sizes=shard_sizes)
    bare_parquet = kind not in ("digits", "fashion-mnist", "imagefolder") and _split_suffix(spec)[0].lower().endswith(".parquet")
    if kind == "parquet" or bare_parquet:
        path = rest if kind == "parquet" else spec
        path, chosen = _split_suffix(path)
        if not path:
            raise ConfigError(f"source spec {spec!r} names no files; expected parquet:PATH (a file, directory or glob)")
        return ParquetSource(path, split=chosen or split, num_classes=num_classes, shard_sizes=shard_sizes)
    if shard_sizes is not None:
        raise ConfigError(f"shard_sizes is for webdataset and parquet sources only, but the spec is {spec!r}")
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
