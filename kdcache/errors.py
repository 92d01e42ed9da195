"""The few named errors kdcache raises at its boundaries.

Each message says what was found, what was expected and, where it helps, what to do.
The CLI prints ``str(error)`` on one line and exits with ``error.exit_code``.
"""

from __future__ import annotations


class KdcacheError(Exception):
    """Base class: a problem a user can act on (never a bug in kdcache)."""

    exit_code = 2
    #: Set by ``kdcache.precompute`` on what it raises: the units this process computed before it stopped.
    units_computed: int | None = None
    #: The CLI's line instead of the message, where the message was already shown (verify's report lists every problem).
    brief: str | None = None


class ConfigError(KdcacheError):
    """An option or a configuration value is invalid or inconsistent."""


class SourceError(KdcacheError):
    """A dataset source is missing, empty or unreadable."""


class FormatError(KdcacheError):
    """A cache is structurally wrong: missing files, bad manifest, unknown format version."""

    exit_code = 3


class ChecksumError(FormatError):
    """Stored bytes do not match the checksum recorded when they were committed."""


class IncompleteCacheError(FormatError):
    """A unit the caller needs has not been committed (or is missing from the store)."""


class MismatchError(KdcacheError):
    """Two things that must agree do not: a dataset, teacher or spec differs from the cache's."""

    exit_code = 4


class VerifyError(KdcacheError):
    """`kdcache verify` found a view that does not reproduce the stored teacher record."""

    exit_code = 5


class WriteError(KdcacheError):
    """A cache or run directory cannot be written: the disk is full, a quota is reached, it is read-only.

    What was committed before stays; the message says what to do (free space, then resume).
    """

    exit_code = 6


class UnfinishedCacheError(KdcacheError):
    """A precompute stopped with planned units uncommitted that no live writer holds: run it again to finish."""

    exit_code = 7


def describe_os_error(exc: OSError) -> str:
    """``No space left on device (ENOSPC)`` for an OSError, with the file when it names one."""
    import errno

    reason = exc.strerror or str(exc) or type(exc).__name__
    code = errno.errorcode.get(exc.errno) if exc.errno is not None else None
    text = f"{reason} ({code})" if code else reason
    return f"{text} writing {exc.filename}" if exc.filename else text
