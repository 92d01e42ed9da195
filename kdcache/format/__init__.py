"""The on-disk cache format (v1): the only reader and writer of kdcache stores (this package).

Layout (a zarr v3 hierarchy; docs/format.md is the spec):

    CACHE/zarr.json                  root group; attributes["kdcache"] = the manifest (written last, atomically),
                                     attributes["kdcache_subset"] = what a subset holds (optional, kdcache export)
    CACHE/values/                    fp16   [epochs, slots, k]   top-k teacher logits, sorted descending
    CACHE/indices/                   uint*  [epochs, slots, k]   their class indices
    CACHE/tail/                      fp16   [epochs, slots, 2]   tail summary (kdcache.record)
    CACHE/params/                    fp32   [epochs, slots, P]   augmentation parameters (manifest "param_fields")
    CACHE/samples/{source_index,label,digest,key}   [slots]      the plan: which sample sits in each slot
    CACHE/ledger/e{E:06d}-u{U:06d}.json                          one file per committed unit, with sha256 per shard file
    CACHE/claims/e{E:06d}-u{U:06d}.g{G}.json                     a writer's claim on a unit it computes (kdcache.format.claims)
    CACHE/teachers/NAME/{zarr.json,values,indices,tail,ledger,claims}  an added teacher's records (kdcache.format.group)

Slots: block b occupies slots [b * block_capacity, b * block_capacity + size_b); the rest of
its capacity is padding (never read, compressed away). One inner zarr chunk holds one
(epoch, block); one zarr shard file holds one *unit* = (epoch, ``blocks_per_unit`` consecutive
blocks), the unit of work, computed only by the process holding its claim and put in place
whole, so concurrent writers never share a file. A unit exists for readers only once its ledger entry is on disk, and the ledger entry
is written only after the unit's shard files are durable (fsync) and their sha256 recorded.

Modules: :mod:`~kdcache.format.manifest` (what a cache is), :mod:`~kdcache.format.store` (keys,
codecs, checksums, the JSON files), :mod:`~kdcache.format.ledger` (the ledger's entries and epoch
indexes), :mod:`~kdcache.format.digest` (the content digest), :mod:`~kdcache.format.reader` and
:mod:`~kdcache.format.writer`, :mod:`~kdcache.format.held` (what both readers share), :mod:`~kdcache.format.group` (added teachers' groups),
:mod:`~kdcache.format.wds` (the webdataset export: its reader and writer) and
:mod:`~kdcache.format.selection` (choosing epochs and units). The format imports nothing of
kdcache's but :mod:`kdcache.errors` and :mod:`kdcache.location`.
Everything is re-exported here: import from ``kdcache.format``.
"""

from kdcache.format.manifest import (
    BlockLayout,
    CLAIMS_DIR,
    DatasetInfo,
    FORMAT_VERSION,
    LEDGER_DIR,
    MANIFEST_KEY,
    Manifest,
    READ_VERSIONS,
    RECORD_ARRAYS,
    REPLAY_PATHS,
    SAMPLE_ARRAYS,
    SUBSET_KEY,
    Subset,
    TeacherInfo,
    check_compatible,
    first_difference,
    library_versions,
    now_iso,
    record_format_version,
    record_width,
)
from kdcache.format.store import (
    COMPRESSION,
    LedgerEntry,
    canonical_json,
    index_dtype,
    npy_bytes,
    parse_ledger,
    ledger_key,
    read_manifest,
    read_root,
    record_dtypes,
    sample_array_sha256,
    sha256_bytes,
    shard_key,
)
from kdcache.format.ledger import (
    epoch_index_key,
    index_cache,
    write_epoch_index,
)
from kdcache.format.digest import (
    check_digest_option,
    content_digest,
    require_digest,
)
from kdcache.format.held import AllTeachers, HeldUnits
from kdcache.format.group import (
    ALL,
    MAIN,
    TEACHER_ARRAYS,
    TEACHERS_DIR,
    TeacherGroup,
    check_teacher_name,
    group_dir,
)
from kdcache.format.reader import (
    Cache,
    TeacherRecords,
    open_cache,
)
from kdcache.format.selection import (
    default_selection,
    format_selection,
    parse_selection,
)
from kdcache.format.wds import (
    WdsCache,
    WdsExport,
    check_wds_output,
    is_wds,
    select_units,
    write_wds,
)
from kdcache.format.claims import (
    Claims,
    Holder,
    unit_claim,
)
from kdcache.format.writer import (
    CacheWriter,
    CreatedElsewhere,
    GroupWriter,
    creation_dir,
    remove_stale_creations,
    write_manifest,
)

__all__ = [
    "BlockLayout",
    "CLAIMS_DIR",
    "DatasetInfo",
    "FORMAT_VERSION",
    "LEDGER_DIR",
    "MANIFEST_KEY",
    "Manifest",
    "RECORD_ARRAYS",
    "record_width",
    "record_format_version",
    "READ_VERSIONS",
    "SAMPLE_ARRAYS",
    "SUBSET_KEY",
    "Subset",
    "TeacherInfo",
    "check_compatible",
    "first_difference",
    "library_versions",
    "now_iso",
    "COMPRESSION",
    "LedgerEntry",
    "parse_ledger",
    "ledger_key",
    "read_manifest",
    "read_root",
    "record_dtypes",
    "sample_array_sha256",
    "sha256_bytes",
    "shard_key",
    "npy_bytes",
    "index_dtype",
    "epoch_index_key",
    "index_cache",
    "write_epoch_index",
    "canonical_json",
    "check_digest_option",
    "content_digest",
    "require_digest",
    "Cache",
    "AllTeachers",
    "TeacherRecords",
    "ALL",
    "MAIN",
    "TEACHER_ARRAYS",
    "TEACHERS_DIR",
    "TeacherGroup",
    "check_teacher_name",
    "group_dir",
    "HeldUnits",
    "open_cache",
    "default_selection",
    "format_selection",
    "parse_selection",
    "WdsCache",
    "WdsExport",
    "check_wds_output",
    "is_wds",
    "select_units",
    "write_wds",
    "Claims",
    "Holder",
    "unit_claim",
    "CacheWriter",
    "CreatedElsewhere",
    "GroupWriter",
    "creation_dir",
    "remove_stale_creations",
    "write_manifest",
]
