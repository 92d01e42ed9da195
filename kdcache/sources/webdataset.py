"""Webdataset tar shards read as a source.

A :class:`WebDatasetSource` (, opened by :func:`kdcache.sources.open_source` from a
``.tar`` path, URL or brace pattern): local paths and URLs are opened with fsspec (http(s) as
one streamed GET) and read with ``tarfile`` in streaming mode, one sequential pass per shard.
Members are grouped by key as webdataset groups them (``webdataset.tariterators.base_plus_ext``:
the key is the path up to the first dot of the basename; extensions are lower-cased; metadata
members ``__*__`` are skipped). A sample's image is the first of ``jpg jpeg png webp npy``
present, its label the integer text of ``cls``. Shard sizes are scanned once on first need
(which also checks keys are unique across shards) or taken from ``shard_sizes`` (then every
streamed shard is checked against its recorded size). The class count comes from
``num_classes``, else a ``classes.txt`` beside the first shard, else the largest label + 1.
Errors follow the policy in :mod:`kdcache.sources`.
"""

from __future__ import annotations

import bisect
import os
import posixpath
import re
import tarfile
import zlib
from collections.abc import Iterator, Sequence

import numpy as np

from kdcache.errors import ConfigError, SourceError
from kdcache.hub import explain_hf_url
from kdcache.location import url_filesystem
from kdcache.sources.base import Sample, Source, check_num_classes

TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "npy")
_TAR_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, skipped as it does



def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _canonical_pattern(pattern: str) -> str:
    if pattern.startswith("file://"):
        pattern = pattern[len("file://") :]
    return pattern if _is_url(pattern) else os.path.abspath(os.path.expanduser(pattern))


def _open_read(url: str):
    import fsspec

    if url.startswith(("http://", "https://")):
        return fsspec.open(url, "rb", block_size=0)  # one streamed GET, no range requests
    return fsspec.open(url, "rb")


def _read_classes_txt(first_shard: str) -> tuple[str, list[str]] | None:
    if _is_url(first_shard):
        path = posixpath.join(posixpath.dirname(first_shard), "classes.txt")
    else:
        path = os.path.join(os.path.dirname(first_shard), "classes.txt")
        if not os.path.exists(path):
            return None
    try:
        with _open_read(path) as f:
            text = f.read().decode("utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError) as exn:
        raise SourceError(f"cannot read '{path}': {exn}") from None
    names = text.splitlines()
    while names and not names[-1].strip():
        names.pop()
    if not names:
        raise SourceError(f"'{path}' lists no class names (expected one name per line)")
    for line, name in enumerate(names, start=1):
        if not name.strip():
            raise SourceError(f"'{path}' line {line} is empty (expected one class name per line)")
    return path, [name.strip() for name in names]


class WebDatasetSource(Source):
    """Samples stored in webdataset tar shards, local or remote (fsspec)."""

    kind = "webdataset"

    def __init__(
        self,
        pattern: str,
        *,
        split: str = "train",
        num_classes: int | None = None,
        shard_sizes: Sequence[int] | None = None,
    ):
        import braceexpand

        num_classes = check_num_classes(num_classes)
        self.pattern = _canonical_pattern(pattern)
        self.uri = f"webdataset:{self.pattern}"
        self.split = split
        self.urls = list(braceexpand.braceexpand(self.pattern))
        for url in self.urls:
            if _is_url(url):
                url_filesystem(url, what="webdataset shard")  # a protocol whose package is missing: one line
            elif not os.path.isfile(url):
                raise SourceError(f"webdataset shard '{url}' does not exist")
        self._sizes: list[int] | None = None
        if shard_sizes is not None:
            sizes = list(shard_sizes)
            if len(sizes) != len(self.urls) or any(
                isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0 for n in sizes
            ):
                raise ConfigError(
                    f"shard_sizes must hold {len(self.urls)} non-negative integers (one per shard of "
                    f"'{self.pattern}'), got {len(sizes)} entries"
                )
            if sum(sizes) == 0:
                raise SourceError(f"webdataset '{self.pattern}' contains no samples (shard_sizes are all 0)")
            self._sizes = [int(n) for n in sizes]
        self._names: list[str] | None = None
        self._num_classes = num_classes
        self._num_classes_from = f"num_classes={num_classes}"
        listed = _read_classes_txt(self.urls[0])
        if listed is not None:
            path, names = listed
            if num_classes is not None and num_classes != len(names):
                raise ConfigError(
                    f"num_classes={num_classes} does not match the {len(names)} class names in '{path}'"
                )
            self._names, self._num_classes, self._num_classes_from = names, len(names), f"'{path}'"

    # Sizes and classes are known lazily: a scan reads every shard once.

    def _scan(self) -> None:
        sizes, owner, largest = [], {}, -1
        for s, url in enumerate(self.urls):
            n = 0
            for sample in self._iter_shard(s, expected=None):
                if sample.key in owner:
                    raise SourceError(
                        f"webdataset '{self.pattern}': duplicate key '{sample.key}' "
                        f"in shards '{owner[sample.key]}' and '{url}'"
                    )
                owner[sample.key] = url
                largest = max(largest, sample.label)
                n += 1
            if self._sizes is not None and self._sizes[s] != n:
                raise SourceError(f"webdataset shard '{url}' holds {n} samples, expected {self._sizes[s]}")
            sizes.append(n)
        if not owner:
            raise SourceError(f"webdataset '{self.pattern}' contains no samples")
        self._sizes = sizes
        if self._num_classes is None:
            self._num_classes, self._num_classes_from = largest + 1, "the largest label + 1"

    @property
    def num_classes(self) -> int:
        if self._num_classes is None:
            self._scan()
        return self._num_classes

    @property
    def class_names(self) -> list[str]:
        return list(self._names) if self._names is not None else [str(c) for c in range(self.num_classes)]

    def shards(self) -> list[tuple[str, int]]:
        if self._sizes is None:
            self._scan()
        return list(zip(self.urls, self._sizes))

    def __len__(self) -> int:
        return sum(n for _, n in self.shards())

    def iter_shard(self, shard_index: int) -> Iterator[Sample]:
        if not 0 <= shard_index < len(self.urls):
            raise IndexError(f"webdataset '{self.pattern}': shard {shard_index} outside [0, {len(self.urls)})")
        expected = None if self._sizes is None else self._sizes[shard_index]
        return self._iter_shard(shard_index, expected=expected)

    def iter_samples(self, *, chunk_size: int = 256) -> Iterator[Sample]:
        for s in range(len(self.urls)):
            yield from self.iter_shard(s)

    def read(self, indices: Sequence[int]) -> list[Sample]:
        positions = self._positions(indices)
        starts = np.cumsum([0] + self._sizes[:-1]).tolist()
        wanted: dict[int, set[int]] = {}
        for i in positions:
            s = bisect.bisect_right(starts, i) - 1
            wanted.setdefault(s, set()).add(i - starts[s])
        found: dict[int, Sample] = {}
        for s in sorted(wanted):
            last = max(wanted[s])
            for j, sample in enumerate(self.iter_shard(s)):
                if j in wanted[s]:
                    found[starts[s] + j] = sample
                if j == last:
                    break
        return [found[i] for i in positions]

    def _iter_shard(self, s: int, *, expected: int | None) -> Iterator[Sample]:
        url, keys = self.urls[s], set()
        for n, (key, members) in enumerate(_tar_groups(url), start=1):
            if expected is not None and n > expected:
                raise SourceError(f"webdataset shard '{url}' holds more than {expected} samples, expected {expected}")
            if key in keys:
                raise SourceError(f"webdataset shard '{url}': duplicate key '{key}'")
            keys.add(key)
            yield self._sample(url, key, members)
        if expected is not None and len(keys) != expected:
            raise SourceError(f"webdataset shard '{url}' holds {len(keys)} samples, expected {expected}")

    def _sample(self, url: str, key: str, members: dict[str, bytes]) -> Sample:
        where = f"webdataset shard '{url}': sample '{key}'"
        image = next((ext for ext in TAR_IMAGE_EXTENSIONS if ext in members), None)
        if image is None:
            raise SourceError(
                f"{where} has no image (members: {', '.join(sorted(members))}; "
                f"expected one of {', '.join(TAR_IMAGE_EXTENSIONS)})"
            )
        if "cls" not in members:
            raise SourceError(f"{where} has no 'cls' label member (members: {', '.join(sorted(members))})")
        try:
            label = int(members["cls"].decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            raise SourceError(f"{where}: cls {members['cls'][:20]!r} is not an integer") from None
        if label < 0 or (self._num_classes is not None and label >= self._num_classes):
            bound = "" if self._num_classes is None else f" < {self._num_classes} (from {self._num_classes_from})"
            raise SourceError(f"{where} has label {label}, expected 0 <= label{bound}")
        return Sample(key=key, label=label, data=members[image])


def _tar_groups(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream a tar shard as (key, {extension: bytes}) groups, grouped as webdataset groups them."""
    from webdataset.tariterators import base_plus_ext

    try:
        with _open_read(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            key, members = None, {}
            for info in tar:
                if not info.isreg() or _TAR_META.match(info.name):
                    continue
                prefix, suffix = base_plus_ext(info.name)
                if prefix is None:
                    continue
                data = tar.extractfile(info).read()
                tar.members = []  # streaming: keep no per-member state
                suffix = suffix.lower()
                if prefix != key:
                    if key is not None:
                        yield key, members
                    key, members = prefix, {}
                if suffix in members:
                    raise SourceError(f"webdataset shard '{url}': duplicate member '{info.name}'")
                members[suffix] = data
            if key is not None:
                yield key, members
    except FileNotFoundError:
        explain_hf_url(url, f"webdataset shard '{url}'")  # a gated or unknown Hub repository, said as such
        raise SourceError(f"webdataset shard '{url}' does not exist") from None
    except (tarfile.TarError, OSError, EOFError, zlib.error, ValueError) as exn:
        raise SourceError(f"webdataset shard '{url}': cannot read tar ({type(exn).__name__}: {exn})") from None
