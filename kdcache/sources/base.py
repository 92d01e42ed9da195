"""Samples and sources: what every source is, and how its image bytes are decoded.

A :class:`Source` is an indexable, read-only dataset of :class:`Sample` (key, label, the raw
stored bytes of the image); the kinds are in :mod:`kdcache.sources.builtin` and
:mod:`kdcache.sources.webdataset`, opened by :func:`kdcache.sources.open_source`. The error
policy is in :mod:`kdcache.sources`.
"""

from __future__ import annotations

import abc
import hashlib
import io
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
from PIL import Image

from kdcache.errors import ConfigError, SourceError

SPLITS = ("train", "val")
_NPY_MAGIC = b"\x93NUMPY"


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


# --- decoding on a device (the ``device`` replay path) -------------------------------------

#: What the device decoder takes: baseline or progressive 8-bit JPEG in YCbCr or grayscale.
DEVICE_DECODABLE = {("jpeg", "RGB"), ("jpeg", "L")}


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header says, read without decoding its pixels: format, PIL mode, height, width."""

    format: str
    mode: str
    height: int
    width: int
    ended: bool = True  # for a JPEG: its bytes end with the end-of-image marker (a truncated file does not)

    @property
    def device_decodable(self) -> bool:
        """Whether the device decoder takes it: a JPEG of a kind it decodes, ending where a JPEG ends.

        A JPEG without its end marker goes to the host decoder, which refuses it naming the
        sample, as the other paths do, rather than to a decoder that might fill in what is missing.
        """
        return (self.format, self.mode) in DEVICE_DECODABLE and self.ended


def image_header(sample: Sample) -> ImageHeader:
    """The format, mode and size of a sample's image from its header; SourceError naming the sample if it has none."""
    data = sample.data
    try:
        if not data:
            raise _Undecodable("empty data")
        if data.startswith(_NPY_MAGIC):
            image = _image_from_npy(data)  # .npy images are small arrays: reading them whole costs nothing
            return ImageHeader("npy", image.mode, image.height, image.width)
        try:
            with Image.open(io.BytesIO(data)) as opened:
                kind = str(opened.format).lower()
                ended = kind != "jpeg" or data.rstrip(b"\x00\r\n ")[-2:] == b"\xff\xd9"
                return ImageHeader(kind, opened.mode, opened.height, opened.width, ended)
        except Image.UnidentifiedImageError:
            raise _Undecodable(f"not a recognised image format (first bytes {data[:8]!r})") from None
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exn:
            raise _Undecodable(f"{type(exn).__name__}: {exn}") from None
    except _Undecodable as exn:
        raise SourceError(f"sample '{sample.key}': cannot decode image: {exn}") from None


def decode_on_device(samples: Sequence[Sample], headers: Sequence[ImageHeader], device, counts=None) -> list:
    """Decode samples to uint8 ``[3, H, W]`` RGB tensors on ``device``, in one batched call where it can.

    JPEGs the device decoder takes (:data:`DEVICE_DECODABLE`) are decoded by
    ``torchvision.io.decode_jpeg`` on ``device`` (nvJPEG on CUDA, libjpeg-turbo on the CPU); every
    other image (PNG, WebP, ``.npy``, CMYK or 16-bit files...) is decoded on the host by
    :func:`decode_sample` and moved, and so is a JPEG the device decoder refuses. The choice is a
    function of the bytes alone, so every stage decodes an image the same way. ``counts``: a
    ``collections.Counter`` to add one to per image, under ``device`` or ``host <format> <mode>``.
    """
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    out: list = [None] * len(samples)
    on_device = [i for i, h in enumerate(headers) if h.device_decodable]
    if on_device:
        data = [torch.frombuffer(bytearray(samples[i].data), dtype=torch.uint8) for i in on_device]
        if torch.device(device).type == "cuda":
            # torchvision's nvJPEG decoder allocates its outputs on the current stream, then writes them from a
            # stream of its own that does not wait for this one: a block freed here while kernels queued on this
            # stream still read it could be overwritten under them. With this stream drained first, none is.
            torch.cuda.current_stream(device).synchronize()
        try:
            decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one image the decoder refuses fails the batch: decode one by one
            decoded = []
            for tensor in data:
                try:
                    decoded.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    decoded.append(None)
        for i, image in zip(on_device, decoded):
            if image is not None and tuple(image.shape) != (3, headers[i].height, headers[i].width):
                raise SourceError(f"sample '{samples[i].key}': the device decoder gave an image of shape "
                                  f"{tuple(image.shape)}; its header says 3x{headers[i].height}x{headers[i].width}")
            out[i] = image
            if counts is not None and image is not None:
                counts["device"] += 1
    for i, image in enumerate(out):
        if image is None:
            array = np.asarray(decode_sample(samples[i]), dtype=np.uint8)
            out[i] = torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous().to(device)
            if counts is not None:
                header = headers[i]
                why = " (device decoder refused)" if header.device_decodable else "" if header.ended else " (no end marker)"
                counts[f"host {header.format} {header.mode}{why}"] += 1
    return out


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
    """An indexable dataset of samples. Concrete kinds: digits, fashion-mnist, imagefolder, webdataset, parquet.

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
        """``[(shard_url, n_samples), ...]`` for sources read block by block (tar shards, parquet row groups), else None."""
        return None

    def read_shard(self, shard_index: int) -> list[Sample]:
        """All samples of one tar shard or parquet row group (webdataset and parquet sources only)."""
        return list(self.iter_shard(shard_index))

    def iter_shard(self, shard_index: int) -> Iterator[Sample]:
        """Stream the samples of one tar shard or parquet row group (webdataset and parquet sources only)."""
        raise ConfigError(f"{self.kind} source '{self.uri}' has no tar shards or parquet row groups; only webdataset and parquet sources do")

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




def stored_format(data: bytes) -> str | None:
    """The image format of encoded bytes from their header (png, jpeg, webp, npy), or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data.startswith(b"\x93NUMPY"):
        return "npy"
    return None
