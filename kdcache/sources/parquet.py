"""Parquet files as the Hugging Face Hub keeps image-classification datasets, read as a source.

A :class:`ParquetSource` (``parquet:PATH``, opened by :func:`kdcache.sources.open_source`) reads
one file, a directory (every ``*.parquet`` under it, sorted) or a glob, local or through any fsspec
URL, ``hf://datasets/ORG/NAME@REVISION/...`` included (huggingface_hub's file system, with
``HF_TOKEN`` for gated repositories). The layout is the Hub's: an ``image`` column, a struct of
``bytes`` and ``path`` (or plain binary), and an integer ``label`` column, whose ClassLabel names
the schema's ``huggingface`` metadata holds (``info.features.label.names``).

Files are read with pyarrow row group by row group, never whole. Each row group is one block
(a "shard" of the layout, like a tar shard), cut into slices of at most :data:`MAX_BLOCK_ROWS`
rows when it is larger; the row counts come from the files' footers, so planning a cache reads
each image once. A sample's key is its image's ``path``, else ``FILE:ROW`` (the file's name and
the row's index in it); its digest is over the image bytes, as for every source. The class count
comes from the ClassLabel names, else ``num_classes``, else the largest label + 1 (the label
column alone is read for it). Errors follow the policy in :mod:`kdcache.sources`; a file without
an ``image`` or ``label`` column, or a row without image bytes or label, is named in one line.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import posixpath
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from kdcache.errors import ConfigError, SourceError
from kdcache.hub import explain_hf_url, first_line
from kdcache.location import url_filesystem
from kdcache.sources.base import Sample, Source, check_num_classes

#: The most rows one block holds: a larger row group is read as slices of this many rows.
MAX_BLOCK_ROWS = 1024
IMAGE_COLUMN, LABEL_COLUMN = "image", "label"
#: Footers read at once when a source is opened (a remote dataset has hundreds of files).
FOOTER_READS = 8


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _class_names(schema) -> list[str] | None:
    """The ClassLabel names the ``huggingface`` schema metadata holds for the label column, if any."""
    metadata = schema.metadata or {}
    raw = metadata.get(b"huggingface")
    if raw is None:
        return None
    try:
        info = json.loads(raw)
    except ValueError:
        return None
    features = (info.get("info") or {}).get("features") or info.get("features") or {}
    label = features.get(LABEL_COLUMN) or {}
    names = label.get("names")
    return [str(n) for n in names] if isinstance(names, list) and names else None


class ParquetSource(Source):
    """Image-classification samples in parquet files, local or remote (fsspec)."""

    kind = "parquet"

    def __init__(self, path: str, *, split: str = "train", num_classes: int | None = None,
                 shard_sizes: Sequence[int] | None = None):
        num_classes = check_num_classes(num_classes)
        if path.startswith("file://"):
            path = path[len("file://"):]
        self.path = path if _is_url(path) else os.path.abspath(os.path.expanduser(path))
        self.uri = f"parquet:{self.path}"
        self.split = split
        self.fs, self.files = self._find_files()
        self._blocks: list[tuple[int, int, int, int]] = []  # (file, row group, first row, stop row) per block
        self._file_rows: list[list[int]] = []  # per file: the first row of each row group
        self._group_rows: dict[tuple[int, int], int] = {}  # rows per (file, row group), from the footers
        names = None
        with ThreadPoolExecutor(max_workers=FOOTER_READS) as pool:  # remote footers: a few requests each, concurrently
            footers = list(pool.map(self._footer, self.files))
        for f, (name, (metadata, schema)) in enumerate(zip(self.files, footers)):
            self._check_columns(name, schema)
            names = names or _class_names(schema)
            starts, row = [], 0
            for g in range(metadata.num_row_groups):
                rows = metadata.row_group(g).num_rows
                starts.append(row)
                self._group_rows[f, g] = rows
                for start in range(0, rows, MAX_BLOCK_ROWS):
                    self._blocks.append((f, g, start, min(rows, start + MAX_BLOCK_ROWS)))
                row += rows
            self._file_rows.append(starts)
        if not self._blocks:
            raise SourceError(f"parquet '{self.path}' contains no samples")
        self._sizes = [stop - start for _, _, start, stop in self._blocks]
        if shard_sizes is not None:
            recorded = [int(n) for n in shard_sizes]
            if recorded != self._sizes:
                raise SourceError(f"parquet '{self.path}' has {len(self._sizes)} blocks of {sum(self._sizes)} rows in all; "
                                  f"the cache recorded {len(recorded)} blocks of {sum(recorded)} rows")
        if names is not None:
            if num_classes is not None and num_classes != len(names):
                raise ConfigError(f"num_classes={num_classes} does not match the {len(names)} ClassLabel names of "
                                  f"'{self.path}'")
            self._names, self._num_classes, self._from = names, len(names), "its ClassLabel names"
        else:
            self._names, self._num_classes, self._from = None, num_classes, f"num_classes={num_classes}"
        self._starts = np.cumsum([0] + self._sizes[:-1]).tolist()
        self._last: tuple[tuple[int, int], object] | None = None  # the row group read last, for slices of it

    # --- files, footers and row groups ----------------------------------------------------------

    def _find_files(self):
        fs, root = url_filesystem(self.path, what="parquet data")
        try:
            if any(c in root for c in "*?["):
                found = sorted(fs.glob(root))
            elif fs.isdir(root):
                found = sorted(p for p in fs.find(root) if p.endswith(".parquet")
                               and not any(part.startswith(".") for part in p[len(root):].split("/")))
            elif fs.isfile(root):
                found = [root]
            else:
                explain_hf_url(self.path, f"parquet '{self.path}'")
                raise SourceError(f"parquet '{self.path}' does not exist")
        except (OSError, ValueError) as exn:
            explain_hf_url(self.path, f"parquet '{self.path}'")  # a gated or unknown repository, said as such
            if isinstance(exn, FileNotFoundError):
                raise SourceError(f"parquet '{self.path}' does not exist") from None
            raise SourceError(f"parquet '{self.path}': cannot list files ({type(exn).__name__}: {first_line(exn)})") from None
        if not found:
            explain_hf_url(self.path, f"parquet '{self.path}'")
            raise SourceError(f"parquet '{self.path}' matches no parquet files")
        return fs, found

    def _name(self, f: int) -> str:
        """A file as messages and shard names give it: a URL for remote data, else the path."""
        name = self.files[f]
        return self.fs.unstrip_protocol(name) if _is_url(self.path) else name

    @contextlib.contextmanager
    def _open(self, name: str):
        """A ``pyarrow.parquet.ParquetFile`` of one file (its footer read), closed afterwards."""
        import pyarrow.parquet as pq

        try:
            with self.fs.open(name, "rb") as handle:
                yield pq.ParquetFile(handle)
        except FileNotFoundError:
            raise SourceError(f"parquet file '{name}' does not exist") from None
        except (OSError, ValueError) as exn:  # pyarrow's ArrowInvalid is a ValueError: not a parquet file
            raise SourceError(f"parquet file '{name}' cannot be read ({type(exn).__name__}: {first_line(exn)})") from None

    def _footer(self, name: str):
        with self._open(name) as parquet:
            return parquet.metadata, parquet.schema_arrow

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_last"] = None  # a DataLoader worker reads its own row groups
        return state

    @staticmethod
    def _check_columns(name: str, schema) -> None:
        import pyarrow as pa

        columns = schema.names
        for column in (IMAGE_COLUMN, LABEL_COLUMN):
            if column not in columns:
                raise SourceError(f"parquet file '{name}' has no '{column}' column (columns: {', '.join(columns)}); "
                                  "expected the Hub's layout: an image struct of bytes and path, and an integer label")
        image = schema.field(IMAGE_COLUMN).type
        if not (pa.types.is_binary(image) or pa.types.is_large_binary(image)
                or (pa.types.is_struct(image) and image.get_field_index("bytes") >= 0)):
            raise SourceError(f"parquet file '{name}': column 'image' is {image}; expected a struct of bytes and path, "
                              "or binary")
        if not pa.types.is_integer(schema.field(LABEL_COLUMN).type):
            raise SourceError(f"parquet file '{name}': column 'label' is {schema.field(LABEL_COLUMN).type}; "
                              "expected integers (a ClassLabel)")

    def _row_group(self, f: int, g: int):
        if self._last is not None and self._last[0] == (f, g):
            return self._last[1]
        try:
            with self._open(self.files[f]) as parquet:
                table = parquet.read_row_group(g, columns=[IMAGE_COLUMN, LABEL_COLUMN])
        except OSError as exn:
            raise SourceError(f"parquet file '{self._name(f)}' row group {g} cannot be read "
                              f"({type(exn).__name__}: {exn})") from None
        image = table.column(IMAGE_COLUMN).combine_chunks()
        paths = [None] * len(table)
        if hasattr(image, "field"):  # the Hub's struct of bytes and path
            if image.type.get_field_index("path") >= 0:
                paths = image.field("path").to_pylist()
            data = image.field("bytes").to_pylist()
        else:
            data = image.to_pylist()
        rows = (data, paths, table.column(LABEL_COLUMN).to_pylist())
        self._last = ((f, g), rows)
        return rows

    # --- the source interface ------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        if self._num_classes is None:
            import pyarrow.compute as pc

            largest = -1
            for name in self.files:
                with self._open(name) as parquet:
                    labels = parquet.read(columns=[LABEL_COLUMN]).column(LABEL_COLUMN)
                top = pc.max(labels).as_py()
                largest = max(largest, -1 if top is None else int(top))
            self._num_classes, self._from = largest + 1, "the largest label + 1"
        return self._num_classes

    @property
    def class_names(self) -> list[str]:
        return list(self._names) if self._names is not None else [str(c) for c in range(self.num_classes)]

    def shards(self) -> list[tuple[str, int]]:
        out = []
        for (f, g, start, stop), n in zip(self._blocks, self._sizes):
            whole = start == 0 and stop == self._group_rows[f, g]
            out.append((f"{self._name(f)}#{g}" + ("" if whole else f"[{start}:{stop}]"), n))
        return out

    def __len__(self) -> int:
        return sum(self._sizes)

    def iter_shard(self, shard_index: int) -> Iterator[Sample]:
        if not 0 <= shard_index < len(self._blocks):
            raise IndexError(f"parquet '{self.path}': block {shard_index} outside [0, {len(self._blocks)})")
        f, g, start, stop = self._blocks[shard_index]
        data, paths, labels = self._row_group(f, g)
        if len(labels) < stop:
            raise SourceError(f"parquet file '{self._name(f)}' row group {g} holds {len(labels)} rows, its footer says "
                              f"at least {stop}")
        first = self._file_rows[f][g]
        keys = set()
        for row in range(start, stop):
            sample = self._sample(f, first + row, data[row], paths[row], labels[row])
            if sample.key in keys:
                raise SourceError(f"parquet file '{self._name(f)}': duplicate key '{sample.key}'")
            keys.add(sample.key)
            yield sample

    def iter_samples(self, *, chunk_size: int = 256) -> Iterator[Sample]:
        for s in range(len(self._blocks)):
            yield from self.iter_shard(s)

    def read(self, indices: Sequence[int]) -> list[Sample]:
        positions = self._positions(indices)
        found: dict[int, Sample] = {}
        wanted: dict[int, set[int]] = {}
        for i in positions:
            s = bisect.bisect_right(self._starts, i) - 1
            wanted.setdefault(s, set()).add(i)
        for s in sorted(wanted):
            for offset, sample in enumerate(self.iter_shard(s)):
                if self._starts[s] + offset in wanted[s]:
                    found[self._starts[s] + offset] = sample
        return [found[i] for i in positions]

    def _sample(self, f: int, row: int, data, path, label) -> Sample:
        key = str(path) if path else f"{posixpath.basename(self.files[f])}:{row}"
        where = f"parquet file '{self._name(f)}': sample '{key}'"
        if not data:
            raise SourceError(f"{where} has no image bytes")
        if label is None:
            raise SourceError(f"{where} has no label")
        if label < 0 or (self._num_classes is not None and label >= self._num_classes):
            bound = "" if self._num_classes is None else f" < {self._num_classes} (from {self._from})"
            raise SourceError(f"{where} has label {label}, expected 0 <= label{bound}")
        return Sample(key=key, label=int(label), data=bytes(data))
