"""Writing any source as webdataset tar shards (``kdcache make-shards``); :mod:`kdcache.sources.webdataset` reads them.

Writing (:func:`write_shards`): each sample becomes one member group ``{__key__,
<image_format>: image bytes, cls: label}``; images already in ``image_format`` pass through
byte for byte, others are re-encoded with Pillow (``png`` and ``webp`` losslessly,
``jpg``/``jpeg`` at quality 95; ``npy`` stores the uint8 array). A ``classes.txt`` (one class
name per line) is written beside the first shard. Reopening ``brace_pattern(out_pattern,
len(paths))`` gives the same keys, labels and order, and for lossless formats the same decoded
pixels. Each shard is written to a temporary name and renamed when complete, so a crash never
leaves a shard that looks finished; tar headers carry mtime 0, so the bytes are reproducible.
Existing shard files are never overwritten (:class:`ConfigError`).
"""

from __future__ import annotations

import io
import os
import re

import numpy as np

from kdcache.errors import ConfigError, SourceError
from kdcache.location import refuse_file_in_the_way
from kdcache.sources import Sample, Source, decode_native, npy_bytes, stored_format

#: Formats an image is stored in (see :func:`encode_image`).
IMAGE_FORMATS = ("png", "jpg", "jpeg", "webp", "npy")
JPEG_QUALITY = 95
_FIELD = re.compile(r"%(0\d+)?d")  # the shard-number field of an output pattern


def _check_pattern(out_pattern: str) -> re.Match:
    fields = list(_FIELD.finditer(out_pattern))
    if len(fields) != 1 or out_pattern.count("%") != 1 or "{" in out_pattern or "}" in out_pattern:
        raise ConfigError(
            f"out_pattern '{out_pattern}' must hold exactly one shard-number field such as %06d "
            "(and no other '%' or braces)"
        )
    if not out_pattern.endswith(".tar"):
        raise ConfigError(f"out_pattern '{out_pattern}' must end with .tar")
    return fields[0]


def brace_pattern(out_pattern: str, num_shards: int) -> str:
    """The brace pattern naming shards 0..num_shards-1 of ``out_pattern`` (``%06d`` -> ``{000000..000003}``)."""
    field = _check_pattern(out_pattern)
    if num_shards < 1:
        raise ConfigError(f"num_shards must be at least 1, got {num_shards}")
    if num_shards == 1:
        return out_pattern % 0
    numbers = f"{{{field.group(0) % 0}..{field.group(0) % (num_shards - 1)}}}"
    return out_pattern[: field.start()] + numbers + out_pattern[field.end() :]


def encode_image(sample: Sample, image_format: str) -> bytes:
    """The sample's image in ``image_format``: its own bytes when already so, else re-encoded."""
    target = "jpeg" if image_format == "jpg" else image_format
    if stored_format(sample.data) == target:
        return sample.data
    try:
        image = decode_native(sample.data)
    except SourceError as exn:
        raise SourceError(f"sample '{sample.key}': {exn}") from None
    if target == "npy":
        return npy_bytes(np.asarray(image))
    options = {"png": {}, "jpeg": {"quality": JPEG_QUALITY}, "webp": {"lossless": True}}[target]
    buffer = io.BytesIO()
    image.save(buffer, format=target.upper(), **options)
    return buffer.getvalue()


def _check_key(key: str) -> None:
    basename = key.rsplit("/", 1)[-1]
    if not basename or "." in basename or key.startswith("__"):
        raise SourceError(
            f"sample '{key}': a webdataset key needs a non-empty last path component without '.' "
            "(tar members are split into key and extension at the first dot) and no leading '__'"
        )


def _write_classes(path: str, names: list[str]) -> None:
    text = "".join(f"{name}\n" for name in names)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            if f.read() != text:
                raise ConfigError(f"'{path}' exists with other class names than the source's; remove it first")
        return
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(temporary, path)


def _write_shard(path: str, samples: list[Sample], image_format: str) -> None:
    from webdataset import TarWriter

    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.tmp"
    with open(temporary, "wb") as f:
        with TarWriter(f, encoder=False, mtime=0.0) as writer:
            for sample in samples:
                writer.write(
                    {
                        "__key__": sample.key,
                        image_format: encode_image(sample, image_format),
                        "cls": str(sample.label).encode("ascii"),
                    }
                )
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def write_shards(
    source: Source,
    out_pattern: str,
    *,
    samples_per_shard: int = 1000,
    image_format: str = "png",
    max_samples: int | None = None,
) -> list[str]:
    """Write ``source`` to tar shards named ``out_pattern % i``; return the paths written, in order.

    ``max_samples`` keeps only the source's first samples (a smaller dataset for quick studies).
    """
    _check_pattern(out_pattern)
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1):
        raise ConfigError(f"max_samples must be a positive integer, got {max_samples!r}")
    if isinstance(samples_per_shard, bool) or not isinstance(samples_per_shard, int) or samples_per_shard < 1:
        raise ConfigError(f"samples_per_shard must be a positive integer, got {samples_per_shard!r}")
    image_format = image_format.lower() if isinstance(image_format, str) else image_format
    if image_format not in IMAGE_FORMATS:
        raise ConfigError(f"image_format {image_format!r}; expected one of {', '.join(IMAGE_FORMATS)}")
    total = len(source) if max_samples is None else min(len(source), max_samples)
    paths = [os.path.abspath(os.path.expanduser(out_pattern % i)) for i in range(-(-total // samples_per_shard))]
    for path in paths:
        if os.path.exists(path):
            raise ConfigError(f"shard file '{path}' already exists; write_shards never overwrites (remove it first)")
    folder = os.path.dirname(paths[0])
    refuse_file_in_the_way(folder, "shard folder")
    os.makedirs(folder, exist_ok=True)
    _write_classes(os.path.join(os.path.dirname(paths[0]), "classes.txt"), source.class_names)

    written: list[str] = []
    batch: list[Sample] = []
    for count, sample in enumerate(source.iter_samples()):
        if count == total:
            break
        _check_key(sample.key)
        batch.append(sample)
        if len(batch) == samples_per_shard:
            _write_shard(paths[len(written)], batch, image_format)
            written.append(paths[len(written)])
            batch = []
    if batch:
        _write_shard(paths[len(written)], batch, image_format)
        written.append(paths[len(written)])
    return written
