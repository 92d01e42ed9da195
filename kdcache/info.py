"""`kdcache info`: what a team receiving a cache needs to know at a glance.

Besides the manifest's essentials: what kind of location it is (a zarr cache, a webdataset
export, either as a zip archive), for a subset made by ``kdcache export``, which epochs and
blocks it holds and where it came from, and for a cache of several teachers each teacher with
its units held and its bytes.
"""

from __future__ import annotations

from kdcache.format import format_selection, is_wds
from kdcache.format import Cache, open_cache


def _added_teachers(cache, root_units: int) -> list[dict]:
    """Each added teacher: who it is, its units held (its and the root's committed) and, in a zarr cache, its own bytes
    (a webdataset export holds every teacher's records in one shard per unit: no bytes of its own)."""
    found = []
    for name in cache.teachers[1:]:
        records = cache.teacher_records(name)
        t = records.group.teacher
        size = records.stored_size() if isinstance(cache, Cache) else (None, None)
        views = sum(entry.views for entry in records.ledger.values())
        found.append({
            "name": name, "teacher": t.name, "source": t.source, "weights_sha256": t.weights_sha256, "k": records.group.k,
            "tail": {key: value for key, value in records.manifest.tail.items() if key != "basis"},  # its own record's
            "size": records.group.size, "mean": records.group.mean, "std": records.group.std,
            "units_held": len(records.ledger), "units_committed_by_root": root_units,
            "epochs_complete": records.complete_epochs(), "size_bytes": size[0], "files": size[1],
            "bytes_per_view": size[0] / views if views and size[0] is not None else None,
        })
    return found


def cache_info(location: str, *, cache: Cache | None = None) -> dict:
    """A JSON-ready summary of a cache: teacher, dataset, augmentation, epochs, k, size, bytes per view."""
    cache = cache or open_cache(location, verify_checksums=False)
    m = cache.manifest
    complete = cache.complete_epochs()
    views = sum(entry.views for entry in cache.ledger.values())
    size, files = cache.stored_size()  # from the ledger's byte counts: no request per file
    added = _added_teachers(cache, len(cache.ledger))
    indexed = None if is_wds(cache) else cache.indexed_epochs()
    subset = None
    if cache.subset is not None:
        epochs, units = cache.held_units()
        blocks = cache.held_blocks()
        subset = {
            **cache.subset.to_dict(),
            "blocks": blocks,
            "samples": sum(m.blocks.sizes[b] for b in blocks),
            "epochs_complete": [e for e in epochs if all(cache.unit_committed(e, u) for u in units)],
            "units_committed": sum(cache.unit_committed(e, u) for e in epochs for u in units),
            "units_total": len(epochs) * len(units),
        }
    return {
        "digest": cache.digest(),
        "location": str(cache.location),
        "container": "wds" if is_wds(cache) else "zarr",  # a zarr cache, or a webdataset export (kdcache export --format wds)
        "zip_archive": cache.location.archive,
        "subset": subset,
        "format_version": m.format_version,
        "tool_version": m.tool_version,
        "created": m.created,
        "command": m.command,
        "teacher": {
            "name": m.teacher.name,
            "source": m.teacher.source,
            "weights_sha256": m.teacher.weights_sha256,
            "num_classes": m.teacher.num_classes,
            "input_size": m.teacher.input_size,
            "mean": m.teacher.mean,
            "std": m.teacher.std,
            "interpolation": m.teacher.interpolation,
            **({"repo": m.teacher.repo, "revision": m.teacher.revision} if m.teacher.repo else {}),
        },
        "dataset": {
            "kind": m.dataset.kind,
            "uri": m.dataset.uri,
            "split": m.dataset.split,
            "num_samples": m.dataset.num_samples,
            "digest": m.dataset.digest,
        },
        "augmentation": m.augmentation,
        "seed": m.seed,
        "k": m.k,
        "tail": {name: value for name, value in m.tail.items() if name != "basis"},
        "epochs_planned": m.epochs,
        "epochs_complete": complete,
        "epochs_indexed": indexed,  # epochs read from an epoch index (a webdataset export: null, its index lists every shard)
        "units_committed": len(cache.ledger),
        "units_total": m.epochs * m.blocks.num_units,
        "blocks": m.blocks.num_blocks,
        "views_committed": views,
        "replay": m.replay,
        "size_bytes": size,  # the root's files: the first teacher's records, the parameters, the plan
        "files": files,
        "bytes_per_view": size / views if views else None,
        "teachers": added,  # the added teachers (teachers/NAME/), each with its own bytes
    }


def tail_words(tail: dict) -> str:
    """What a record keeps of its tail, in words."""
    words = [f"tail summary at T = {', '.join(f'{1 / b:g}' for b in tail['betas'])}"]
    if tail.get("rank"):
        words.append(f"a rank-{tail['rank']} tail code")
    if tail.get("samples"):
        words.append(f"{tail['samples']} sampled tail classes")
    return " + ".join(words)


def _ranges(epochs: list[int]) -> str:
    if not epochs:
        return "none"
    parts, start, prev = [], epochs[0], epochs[0]
    for e in epochs[1:] + [None]:
        if e is not None and e == prev + 1:
            prev = e
            continue
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
        if e is not None:
            start = prev = e
    return ", ".join(parts)


def format_info(info: dict) -> str:
    t, d, a = info["teacher"], info["dataset"], info["augmentation"]
    bpv = info["bytes_per_view"]
    kind = "webdataset export" if info["container"] == "wds" else "zarr cache"
    if info["zip_archive"]:
        kind = f"zip archive of a {kind}"
    sub = info["subset"]
    if sub is None:
        epochs = (f"epochs      {len(info['epochs_complete'])} of {info['epochs_planned']} complete ({_ranges(info['epochs_complete'])}); "
                  f"{info['units_committed']}/{info['units_total']} units committed")
    else:
        epochs = (f"subset      epochs {format_selection(sub['epochs'])} of {info['epochs_planned']}, blocks "
                  f"{format_selection(sub['blocks'])} of {info['blocks']} ({sub['samples']} of {d['num_samples']} samples); "
                  f"{len(sub['epochs_complete'])} of {len(sub['epochs'])} epochs whole, {sub['units_committed']}/{sub['units_total']} "
                  f"units committed\n"
                  f"            exported {sub['exported']} from {sub['source']}")
    if info["epochs_indexed"] is not None:
        indexed = info["epochs_indexed"]
        epochs += ("\nledger      epoch indexes of epochs " + _ranges(indexed) if indexed else
                   "\nledger      no epoch index (kdcache index adds them: the cache then opens in a few requests)")
    lines = [
        f"cache       {info['location']}: {kind} (format v{info['format_version']}, kdcache {info['tool_version']}, created {info['created']})",
        f"digest      {info['digest']}  (sha256 of the content: publish it with the cache)",
        f"teacher     {t['source']}:{t['name']}  {t['num_classes']} classes  input {'x'.join(map(str, t['input_size']))}  "
        f"{t['interpolation']}  mean {t['mean']} std {t['std']}",
        f"            weights sha256 {t['weights_sha256']}"
        + (f"\n            published {t['repo']} at revision {t['revision']}" if t.get("repo") else ""),
        f"dataset     {d['kind']} {d['uri']} ({d['split']}): {d['num_samples']} samples in {info['blocks']} blocks, digest {d['digest'][:16]}",
        f"augment     {a['name']}: crop {a['crop']}, flip {a['hflip']}, randaug n={a['randaug_n']}, erase {a['erase_prob']}, "
        f"mix {a['mix']}; output {a['output_size']}px; seed {info['seed']}",
        f"records     top-{info['k']} fp16 logits + {tail_words(info['tail'])}; replay path {info['replay']['path']}",
        epochs,
        f"size        {info['size_bytes'] / 1e6:.2f} MB in {info['files']} files; "
        + (f"{bpv:.1f} bytes per view ({info['views_committed']} views)" if bpv else "no views committed"),
    ]
    for added in info.get("teachers") or []:
        stored = ("" if added["size_bytes"] is None else f"; {added['size_bytes'] / 1e6:.2f} MB in {added['files']} files, "
                  + (f"{added['bytes_per_view']:.1f} bytes per view" if added["bytes_per_view"] else "no views"))
        lines.append(f"teacher {added['name']:<3} {added['source']}:{added['teacher']}  top-{added['k']} at {added['size']}px  "
                     f"mean {added['mean']} std {added['std']}; {added['units_held']}/{added['units_committed_by_root']} "
                     f"units held{stored}\n"
                     f"            records top-{added['k']} fp16 logits + {tail_words(added['tail'])}\n"
                     f"            weights sha256 {added['weights_sha256']}")
    if info.get("teachers"):
        lines.append(f"records     teacher records: main, {', '.join(a['name'] for a in info['teachers'])} "
                     "(train-student --teacher-record NAME or all)")
    return "\n".join(lines)
