"""Where a cache's bytes live: local paths (with durable, atomic writes) or URLs through fsspec.

:class:`Location` is the byte access every reader uses (plain file reads and one directory
listing), so a cache reads the same from disk, http(s) or an object store, or from one zip
archive of its files (a location ending in ``.zip``, local or remote, read through fsspec's
ZipFileSystem). It knows nothing of the format: ``kdcache.format`` decides what the bytes mean.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kdcache.errors import ChecksumError, ConfigError, FormatError, KdcacheError


def is_url(location: str) -> bool:
    return "://" in str(location) and not str(location).startswith("file://")


def url_filesystem(url: str, *, what: str = "URL"):
    """``(fsspec filesystem, path)`` of a path or URL; a protocol whose package is missing is one line naming it.

    http(s) comes with kdcache's own dependencies (aiohttp, requests); s3, gcs, hf and the others
    need their fsspec package (s3fs, gcsfs, huggingface_hub...), which the message names.
    """
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as exc:
        protocol = url.split("://", 1)[0]
        from fsspec.registry import known_implementations

        known = known_implementations.get(protocol, {})
        hint = known.get("err") or str(exc).strip().splitlines()[0]
        raise ConfigError(f"{what} {url}: {protocol}:// needs a package that is not installed: {hint}") from None
    except ValueError as exc:  # fsspec's "Protocol not known"
        raise ConfigError(f"{what} {url}: {exc}") from None


def is_archive(location: str) -> bool:
    """A zip archive of a cache's files: a location ending in ``.zip`` (a local directory of that name is not one)."""
    raw = str(location).rstrip("/")
    if not raw.lower().endswith(".zip"):
        return False
    return is_url(raw) or not Path(raw.removeprefix("file://")).is_dir()


# ---- atomic local writes ---------------------------------------------------------------------


def refuse_file_in_the_way(folder: str | os.PathLike, what: str) -> None:
    """Refuse, before anything is written, a folder to create whose path runs through a regular file."""
    folder = Path(folder)
    for path in (folder, *folder.parents):
        if path.exists():
            if not path.is_dir():
                raise ConfigError(f"{what} '{folder}' cannot be made: '{path}' is a file")
            return


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and rename, durable on return."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Unique to this process on any host (a shared file system), so two writers never share a temporary.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{socket.gethostname()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk or an interrupt leaves neither a torn file nor the temporary
        raise
    fsync_dir(path.parent)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


# ---- where a cache lives -----------------------------------------------------------------------


class Location:
    """Byte access to a cache: a local directory, a URL through fsspec, or a zip archive of either (read-only)."""

    def __init__(self, location: str | os.PathLike):
        self.raw = str(location)
        self.remote = is_url(self.raw)
        self.archive = is_archive(self.raw)
        self.local = not (self.remote or self.archive)  # reads go to the path directly, else through fsspec
        self._fs, self.root = None, ""
        if not self.remote:
            self.path = Path(self.raw.removeprefix("file://"))
        if self.remote and not self.archive:
            self._fs, self.root = url_filesystem(self.raw, what="cache")
            self.root = self.root.rstrip("/")

    @property
    def fs(self):
        """The fsspec filesystem; an archive's is opened (its central directory read) on first use."""
        if self._fs is None:
            fs = self._retry("the archive's directory", self._open_archive)
            if fs is None:
                raise FormatError(f"{self.raw}: the archive does not exist")
            self._fs = fs
        return self._fs

    #: Bytes fetched per remote archive read: about one unit's shard files, not s3fs's 50 MB default block.
    ARCHIVE_BLOCK = 4 << 20

    def _open_archive(self):
        from fsspec.implementations.zip import ZipFileSystem

        try:
            if self.remote:
                fs, path = url_filesystem(self.raw.rstrip("/"), what="cache")
                return ZipFileSystem(fo=fs.open(path, "rb", block_size=self.ARCHIVE_BLOCK))
            return ZipFileSystem(fo=str(self.path))
        except zipfile.BadZipFile as exc:
            raise FormatError(f"{self.raw}: not a zip archive ({exc})") from None

    def child(self, prefix: str) -> "Location":
        """The same byte access, rooted at the folder ``prefix`` inside this location (shares an archive's or URL's filesystem)."""
        prefix = prefix.strip("/")
        child = object.__new__(Location)
        child.__dict__.update(self.__dict__)
        child.raw = f"{self.raw.rstrip('/')}/{prefix}"
        if not self.remote:
            child.path = self.path / prefix
        if not self.local:  # an archive's directory is read once, here, and shared
            child._fs, child.root = self.fs, self._key(prefix)
        return child

    def _key(self, key: str) -> str:
        return f"{self.root}/{key}" if self.root else key

    def __str__(self) -> str:
        return self.raw

    #: Attempts and first back-off (seconds, doubled each time) for a remote read that fails.
    ATTEMPTS, BACKOFF = 4, 0.25

    def read(self, key: str) -> bytes | None:
        """The bytes stored under ``key``, or None if there is no such file."""
        if self.local:
            try:
                return (self.path / key).read_bytes()
            except FileNotFoundError:
                return None
        return self._retry(key, lambda: self.fs.cat_file(self._key(key)))

    #: Files fetched at once when many are read from a URL (ledger entries, epoch indexes, a unit's shard files).
    #: Not more than a small server's listen backlog (Python's http.server: 5): beyond it, some connections wait a
    #: second for the kernel to send them again (300 files from http.server on 127.0.0.1: 8 at once stalled in
    #: 5 of 10 rounds, 4 in none, and took 0.2 s).
    FETCH_WORKERS = 4

    def read_many(self, keys: list[str]) -> dict[str, bytes | None]:
        """``read`` of every key: concurrently from a URL (each file retried on its own), in turn from a path or an archive."""
        if not self.remote or self.archive or len(keys) < 2:
            return {key: self.read(key) for key in keys}
        with ThreadPoolExecutor(max_workers=min(self.FETCH_WORKERS, len(keys))) as pool:
            return dict(zip(keys, pool.map(self.read, keys)))

    def sizes(self, keys: list[str]) -> dict[str, int | None]:
        """The size of each file (None if there is none): a stat, the archive's directory, or from a URL one
        metadata request per file, concurrently."""
        if self.local:
            def size(key):
                try:
                    return (self.path / key).stat().st_size
                except FileNotFoundError:
                    return None
            return {key: size(key) for key in keys}

        def remote_size(key):
            info = self._retry(key, lambda: self.fs.info(self._key(key)))
            return None if info is None or info.get("size") is None else int(info["size"])

        if self.archive:
            return {key: remote_size(key) for key in keys}
        with ThreadPoolExecutor(max_workers=min(self.FETCH_WORKERS, max(1, len(keys)))) as pool:
            return dict(zip(keys, pool.map(remote_size, keys)))

    def _retry(self, key: str, call):
        for attempt in range(self.ATTEMPTS):
            try:
                return call()
            except FileNotFoundError:
                return None
            except KdcacheError:
                raise
            except zipfile.BadZipFile as exc:  # a damaged archive member: reading again will not help
                raise ChecksumError(f"{self.raw}: {key} is damaged in the archive ({exc})") from None
            except Exception as exc:  # connection refused, reset, timeout, server error
                if attempt + 1 == self.ATTEMPTS:
                    raise FormatError(
                        f"{self.raw}: cannot read {key} after {self.ATTEMPTS} attempts "
                        f"({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else 'no message'})"
                    ) from None
                time.sleep(self.BACKOFF * 2**attempt)

    def listdir(self, key: str) -> list[str]:
        if self.local:
            folder = self.path / key
            return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []
        if not self.archive:
            self.fs.invalidate_cache(self._key(key))  # an object store's listing is cached by fsspec
        entries = self._retry(key, lambda: self.fs.ls(self._key(key), detail=False)) or []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries if not e.rstrip("/").rsplit("/", 1)[-1].startswith("."))

    def size(self) -> int:
        if not self.local:
            return int(sum(self.fs.du(self.root, total=False).values()))
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

    def file_count(self) -> int:
        if not self.local:
            return len(self.fs.find(self.root))
        return sum(1 for p in self.path.rglob("*") if p.is_file())
