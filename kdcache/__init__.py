"""kdcache: an offline teacher-logit cache and a streaming student trainer for knowledge distillation.

The public API is what is named here (docs/python.md documents it); everything else is private
and may change. Modules that import torch, timm or zarr load on first use, so ``import kdcache``
stays cheap.

- The commands, one function each: :func:`precompute_logits`, :func:`add_teacher`, :func:`train_student`,
  :func:`verify_cache`, :func:`cache_info`, :func:`render_views`, :func:`merge_caches`,
  :func:`export_cache`, :func:`index_cache`, :func:`write_shards`, :func:`run_quickstart`,
  each with its config dataclass.
- Your own training loop: :class:`CacheLoader` (a rank's batches of a cache, epoch by epoch,
  on a device), :class:`Batch`, :class:`TeacherRecord`, :func:`teacher_records`,
  :func:`open_cache`, :func:`open_source`; the losses as functions (:func:`kd_loss`, ...) and
  as modules (:class:`KDLoss`, ..., :class:`MKDLoss` with its learnt temperatures).
"""

from importlib import import_module

from kdcache.errors import (
    ChecksumError,
    ConfigError,
    FormatError,
    IncompleteCacheError,
    KdcacheError,
    MismatchError,
    SourceError,
    UnfinishedCacheError,
    VerifyError,
    WriteError,
)

__version__ = "0.1.0"

_LAZY = {
    # the commands
    "PrecomputeConfig": "kdcache.precompute",
    "precompute_logits": "kdcache.precompute",
    "AddTeacherConfig": "kdcache.add_teacher",
    "add_teacher": "kdcache.add_teacher",
    "StudentConfig": "kdcache.student",
    "train_student": "kdcache.student",
    "RunResult": "kdcache.train_config",
    "VerifyConfig": "kdcache.verify",
    "verify_cache": "kdcache.verify",
    "cache_info": "kdcache.info",
    "format_info": "kdcache.info",
    "ShowConfig": "kdcache.show",
    "render_views": "kdcache.show",
    "merge_caches": "kdcache.merge",
    "ExportConfig": "kdcache.export",
    "export_cache": "kdcache.export",
    "index_cache": "kdcache.format",
    "write_shards": "kdcache.shards",
    "QuickstartConfig": "kdcache.quickstart",
    "run_quickstart": "kdcache.quickstart",
    "TeacherConfig": "kdcache.teacher",
    "load_teacher": "kdcache.teacher",
    # your own training loop
    "CacheLoader": "kdcache.batches",
    "teacher_records": "kdcache.batches",
    "Batch": "kdcache.batch",
    "TeacherRecord": "kdcache.record",
    "Cache": "kdcache.format",
    "open_cache": "kdcache.format",
    "Source": "kdcache.sources",
    "Sample": "kdcache.sources",
    "open_source": "kdcache.sources",
    "AugSpec": "kdcache.augment",
    # the losses: functions, modules, and MKD's temperatures
    "ce_loss": "kdcache.losses",
    "kd_loss": "kdcache.losses",
    "ttm_loss": "kdcache.losses",
    "wttm_loss": "kdcache.losses",
    "mkd_loss": "kdcache.losses",
    "compute_loss": "kdcache.losses",
    "LossConfig": "kdcache.losses",
    "KDLoss": "kdcache.losses",
    "TTMLoss": "kdcache.losses",
    "WTTMLoss": "kdcache.losses",
    "MKDLoss": "kdcache.mkd",
    "MetaConfig": "kdcache.mkd",
    "MetaTemperatures": "kdcache.mkd",
    "meta_update": "kdcache.mkd",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kdcache' has no attribute {name!r}")


__all__ = [
    "ChecksumError", "ConfigError", "FormatError", "IncompleteCacheError", "KdcacheError", "MismatchError",
    "SourceError", "UnfinishedCacheError", "VerifyError", "WriteError", "__version__", *_LAZY,
]
