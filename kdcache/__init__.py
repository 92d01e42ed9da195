"""kdcache: an offline teacher-logit cache and a streaming student trainer for knowledge distillation.

The public API is re-exported here; modules that import torch, timm or zarr load on first use,
so ``import kdcache`` stays cheap. The stage functions live in modules of the same name:
``kdcache.precompute.precompute``, ``kdcache.student.train_student``, ``kdcache.verify.verify``,
``kdcache.quickstart.quickstart``.
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
    "AugSpec": "kdcache.augment",
    "preset": "kdcache.augment",
    "Batch": "kdcache.batch",
    "Cache": "kdcache.format",
    "CacheWriter": "kdcache.format",
    "Claims": "kdcache.format",
    "FORMAT_VERSION": "kdcache.format",
    "Manifest": "kdcache.format",
    "Subset": "kdcache.format",
    "open_cache": "kdcache.format",
    "ExportConfig": "kdcache.export",
    "export_cache": "kdcache.export",
    "cache_info": "kdcache.info",
    "LoaderConfig": "kdcache.loader",
    "merge_caches": "kdcache.merge",
    "ViewLoader": "kdcache.loader",
    "LossConfig": "kdcache.losses",
    "LOSSES": "kdcache.losses",
    "compute_loss": "kdcache.losses",
    "MetaConfig": "kdcache.mkd",
    "MetaTemperatures": "kdcache.mkd",
    "meta_update": "kdcache.mkd",
    "PrecomputeConfig": "kdcache.precompute",
    "QuickstartConfig": "kdcache.quickstart",
    "TeacherRecord": "kdcache.record",
    "replay_block": "kdcache.replay",
    "write_shards": "kdcache.shards",
    "ShowConfig": "kdcache.show",
    "render_views": "kdcache.show",
    "Sample": "kdcache.sources",
    "Source": "kdcache.sources",
    "open_source": "kdcache.sources",
    "StudentConfig": "kdcache.student",
    "train_student": "kdcache.student",
    "TeacherConfig": "kdcache.teacher",
    "load_teacher": "kdcache.teacher",
    "RunResult": "kdcache.train",
    "TrainConfig": "kdcache.train",
    "VerifyConfig": "kdcache.verify",
    "WdsCache": "kdcache.wds",
    "export_wds": "kdcache.wds",
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
