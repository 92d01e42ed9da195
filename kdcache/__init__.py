"""kdcache: an offline teacher-logit cache and a streaming student trainer for knowledge distillation."""

from kdcache.errors import (
    ChecksumError,
    ConfigError,
    FormatError,
    IncompleteCacheError,
    KdcacheError,
    MismatchError,
    SourceError,
    VerifyError,
)

__version__ = "0.1.0"

__all__ = [
    "ChecksumError",
    "ConfigError",
    "FormatError",
    "IncompleteCacheError",
    "KdcacheError",
    "MismatchError",
    "SourceError",
    "VerifyError",
    "__version__",
]
