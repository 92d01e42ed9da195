"""Where a cache's bytes live: local paths (with durable, atomic writes) or URLs through fsspec.

:class:`Location` is the byte access every reader uses (plain file reads and one directory
listing), so a cache reads the same from disk, http(s) or an object store. It knows nothing of
the format: ``kdcache.format`` decides what the bytes mean.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from kdcache.errors import FormatError


def is_url(location: str) -> bool:
    return "://" in str(location) and not str(location).startswith("file://")


# ---- atomic local writes ---------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and rename, durable on return."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


# ---- where a cache lives -----------------------------------------------------------------------


class Location:
    """Byte access to a cache directory: a local path, or a URL through fsspec (read-only)."""

    def __init__(self, location: str | os.PathLike):
        self.raw = str(location)
        self.remote = is_url(self.raw)
        if self.remote:
            import fsspec

            self.fs, self.root = fsspec.core.url_to_fs(self.raw)
            self.root = self.root.rstrip("/")
        else:
            self.path = Path(self.raw.removeprefix("file://"))

    def __str__(self) -> str:
        return self.raw

    #: Attempts and first back-off (seconds, doubled each time) for a remote read that fails.
    ATTEMPTS, BACKOFF = 4, 0.25

    def read(self, key: str) -> bytes | None:
        """The bytes stored under ``key``, or None if there is no such file."""
        if not self.remote:
            try:
                return (self.path / key).read_bytes()
            except FileNotFoundError:
                return None
        return self._retry(key, lambda: self.fs.cat_file(f"{self.root}/{key}"))

    def _retry(self, key: str, call):
        for attempt in range(self.ATTEMPTS):
            try:
                return call()
            except FileNotFoundError:
                return None
            except Exception as exc:  # connection refused, reset, timeout, server error
                if attempt + 1 == self.ATTEMPTS:
                    raise FormatError(
                        f"{self.raw}: cannot read {key} after {self.ATTEMPTS} attempts "
                        f"({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else 'no message'})"
                    ) from None
                time.sleep(self.BACKOFF * 2**attempt)

    def listdir(self, key: str) -> list[str]:
        if not self.remote:
            folder = self.path / key
            return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []
        entries = self._retry(key, lambda: self.fs.ls(f"{self.root}/{key}", detail=False)) or []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries if not e.rstrip("/").rsplit("/", 1)[-1].startswith("."))

    def size(self) -> int:
        if self.remote:
            return int(sum(self.fs.du(self.root, total=False).values()))
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

    def file_count(self) -> int:
        if self.remote:
            return len(self.fs.find(self.root))
        return sum(1 for p in self.path.rglob("*") if p.is_file())
