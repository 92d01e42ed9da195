"""The content digest: one sha256 that names what a cache holds, whatever its container.

It covers the manifest (less its provenance: when and by which command line it was made), what
a subset declares it holds, and every ledger entry (less its commit time). Every shard file's
sha256 is in its ledger entry, so the digest pins every stored record; the plan is pinned by the
manifest's ``samples_sha256``. A directory, its zip export, the merge of its halves and a copy
computed on any number of ranks therefore share one digest, and any change of the recipe or of
any unit changes it. docs/format.md ("The content digest") gives the encoding exactly.
"""

from __future__ import annotations

import hashlib
import re

from kdcache.errors import ConfigError, MismatchError
from kdcache.format.manifest import Manifest, Subset
from kdcache.format.store import LedgerEntry, canonical_json

#: The first line hashed: names this encoding, so a future one cannot collide with it.
DIGEST_PREFIX = b"kdcache-content-digest-1\n"
#: Manifest fields that record how a cache came about, not what it holds (a merge or a copy sets new ones).
PROVENANCE_FIELDS = ("created", "command")

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def manifest_content(manifest: Manifest) -> dict:
    content = manifest.to_dict()
    for name in PROVENANCE_FIELDS:
        content.pop(name)
    return content


def entry_content(entry: LedgerEntry) -> dict:
    files = {key: {"sha256": meta.get("sha256"), "bytes": meta.get("bytes")} for key, meta in entry.files.items()}
    return {"epoch": entry.epoch, "unit": entry.unit, "views": entry.views, "files": files}


def content_digest(manifest: Manifest, subset: Subset | None, entries, *, teachers=()) -> str:
    """sha256 hex of: the prefix line, then one canonical JSON line each for the manifest's content, the
    subset's ``{epochs, units}`` (or ``null``), and every ledger entry's content in (epoch, unit) order.

    ``teachers``: the added teachers, ``(group, its ledger entries)`` in name order; each adds a line of
    its group attributes' content, then its entries' lines in the same form. Without any, the digest
    is what it was before caches could hold several teachers.
    """
    digest = hashlib.sha256(DIGEST_PREFIX)
    digest.update(canonical_json(manifest_content(manifest)) + b"\n")
    declared = None if subset is None else {"epochs": list(subset.epochs), "units": list(subset.units)}
    digest.update(canonical_json(declared) + b"\n")
    for entry in sorted(entries, key=lambda e: (e.epoch, e.unit)):
        digest.update(canonical_json(entry_content(entry)) + b"\n")
    for group, group_entries in sorted(teachers, key=lambda pair: pair[0].name):
        digest.update(canonical_json(group.content()) + b"\n")
        for entry in sorted(group_entries, key=lambda e: (e.epoch, e.unit)):
            digest.update(canonical_json(entry_content(entry)) + b"\n")
    return digest.hexdigest()


def recipe_digest(manifest: Manifest, groups=()) -> str:
    """sha256 hex of what makes a cache's records what they are, less how many epochs it holds: the
    manifest's content without ``epochs``, then the content of each added teacher's group in
    ``groups`` (whose records are read). A cache extended by more epochs, its exports and its merges
    keep it; another teacher, dataset, augmentation, seed, k or block layout changes it. A resumed
    training run is refused a cache of another recipe.
    """
    content = manifest_content(manifest)
    content.pop("epochs")
    digest = hashlib.sha256(b"kdcache-recipe-1\n" + canonical_json(content) + b"\n")
    for group in sorted(groups, key=lambda g: g.name):
        digest.update(canonical_json(group.content()) + b"\n")
    return digest.hexdigest()


def check_digest_option(expected: str | None, option: str = "--expect-digest") -> str | None:
    """A digest given by a user, lower-cased; refuses anything but 64 hex digits, naming the option."""
    if expected is None:
        return None
    value = expected.strip().lower()
    if not _HEX64.match(value):
        raise ConfigError(f"{option} {expected!r}: expected the 64 hexadecimal digits of a cache digest (kdcache info prints it)")
    return value


def require_digest(cache, expected: str | None) -> None:
    """Refuse ``cache`` (any opened cache) unless its content digest is ``expected``; the message names both."""
    if expected is None:
        return
    actual = cache.digest()
    if actual != expected:
        raise MismatchError(f"{cache.location}: the cache's digest is {actual}, not the expected {expected} (--expect-digest); "
                            "this is not the cache that was published with that digest")
