"""`kdcache verify`: a gate, not a log line.

Checks, in order: structure (manifest, array shapes and dtypes against the manifest), the
ledger (every unit committed, every committed unit's files matching their sha256; a subset
made by ``kdcache export`` declares the epochs and units it holds, and must hold those),
the dataset (every sample's digest against the plan, when the data is given) and replay
fidelity (the teacher re-run on randomly chosen views rebuilt from the stored parameters
must give the stored record: the same class indices, values equal up to fp16 rounding).
Any failure raises :class:`VerifyError` naming the view, unit or sample and what differed.

A cache of several teachers (``kdcache add-teacher``) has every teacher's structure and ledger
checked, and the views re-scored for the teachers whose records the given teacher made (each
added one at its own input size and normalisation); ``teacher_record`` checks one teacher only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from kdcache import distributed
from kdcache.errors import ChecksumError, ConfigError, FormatError, IncompleteCacheError, KdcacheError, MismatchError, VerifyError
from kdcache.format import format_selection
from kdcache.format import ALL, MAIN, RECORD_ARRAYS, Cache, TeacherRecords, open_cache, record_width
from kdcache.format.digest import check_digest_option, require_digest
from kdcache.plan import check_block, dataset_digest, read_block
from kdcache.record import make_records, record_basis, tail_spec_of, view_uniforms
from kdcache.replay import PATHS, EncodedImages, replay_block
from kdcache.sources import decode_sample, open_source
from kdcache.teacher import TeacherConfig, load_teacher, teacher_logits, to_channels_last
from kdcache.augment import cache_spec, check_view_params, sample_view_params


@dataclass(frozen=True, kw_only=True)
class VerifyConfig:
    cache: str
    data: str | None = None
    teacher: TeacherConfig | None = None
    views: int = 64
    seed: int = 0
    replay_path: str | None = None
    quick: bool = False
    check_params: bool = True
    batch_size: int | None = None  # None: the cache's, so a correct cache gives equal values, not merely close ones
    expect_digest: str | None = None  # refuse a cache whose content digest is another, before any other check
    teacher_record: str | None = None  # one teacher's records (main, an added name); None or all: every teacher's

    def __post_init__(self) -> None:
        object.__setattr__(self, "expect_digest", check_digest_option(self.expect_digest))
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"--batch-size {self.batch_size}; expected a positive integer")
        if self.views < 0:
            raise ConfigError(f"--views {self.views}; expected 0 or more")
        if self.replay_path is not None and self.replay_path not in PATHS:
            raise ConfigError(f"--replay-path {self.replay_path!r}; expected one of {', '.join(PATHS)}")
        if not self.quick and self.views > 0 and (self.data is None or self.teacher is None):
            raise ConfigError("replay fidelity needs --data and the teacher (--teacher/--teacher-checkpoint or --teacher-file); "
                              "or pass --quick for structure and checksums only")


@dataclass
class VerifyReport:
    cache: str
    checks: list[tuple[str, str]] = field(default_factory=list)  # (check, outcome)
    failures: list[str] = field(default_factory=list)
    codes: list[int] = field(default_factory=list)  # each failure's exit code, by its kind (docs/cli.md's table)
    near_ties: list[str] = field(default_factory=list)  # reported, not failures (see compare_records)
    views_checked: int = 0
    top1_agree: int = 0  # views whose recomputed top-1 class is the stored one
    max_abs_diff: float = 0.0
    replay_path: str = ""
    digest: str = ""  # the cache's content digest, shown first

    @property
    def ok(self) -> bool:
        return not self.failures

    def add(self, check: str, outcome: str) -> None:
        self.checks.append((check, outcome))

    def fail(self, message: str, code: int = FormatError.exit_code) -> None:
        """A problem, with the exit code of its kind: 3 the cache's files, 4 a mismatch, 5 a view that does not reproduce."""
        self.failures.append(message)
        self.codes.append(code)

    def error(self) -> VerifyError:
        """The error that ends a failed verify: named by its first problem, with that problem's exit code; the CLI
        prints a summary instead, since the report lists every problem."""
        more = f" (and {len(self.failures) - 1} more)" if len(self.failures) > 1 else ""
        error = VerifyError(f"{self.failures[0]}{more}")
        error.exit_code = self.codes[0]
        kinds = {FormatError.exit_code: "in the cache's files", MismatchError.exit_code: "of data or teacher that do not match",
                 VerifyError.exit_code: "of views that do not reproduce their records"}
        counts = ", ".join(f"{self.codes.count(code)} {kinds.get(code, 'other')}" for code in dict.fromkeys(self.codes))
        error.brief = f"cache {self.cache} failed verification: {len(self.failures)} problem(s), listed above: {counts}"
        return error

    def format(self) -> str:
        width = max([12] + [len(check) for check, _ in self.checks])  # an added teacher's checks carry its name
        lines = [f"verify {self.cache}"] + ([f"  {'digest':<{width}} {self.digest}"] if self.digest else [])
        lines += [f"  {check:<{width}} {outcome}" for check, outcome in self.checks]
        lines += [f"  {'near-tie':<{width}} {tie}" for tie in self.near_ties[:5]]
        lines += [f"  {'FAILED':<{width}} {failure}" for failure in self.failures[:20]]
        if len(self.failures) > 20:
            lines.append(f"  ... and {len(self.failures) - 20} more failures")
        lines.append(f"  {'result':<{width}} " + ("OK" if self.ok else f"FAILED ({len(self.failures)} problem(s))"))
        return "\n".join(lines)


def fp16_ulp(values: np.ndarray) -> np.ndarray:
    """The spacing of fp16 numbers at each value (what one rounding step can change)."""
    values = np.abs(values.astype(np.float16))
    return np.spacing(values).astype(np.float32)


def compare_records(stored: dict, values: np.ndarray, indices: np.ndarray, logits: np.ndarray | None = None) -> tuple[str | None, bool]:
    """(what differed or None, whether it is only a near-tie) for a recomputed record against the stored one.

    Values must agree within fp16 rounding. The classes may differ only as near-ties do: an order
    of classes whose logits are within fp16 rounding of each other, or a swap at the k-th place
    between near-equal logits. That is judged from the recomputed full ``logits`` (float32, [C]):
    every stored class's logit must be within rounding of the recomputed value at its rank. Without
    ``logits``, only a reordering of the same classes is a near-tie.
    """
    s_values = stored["values"].astype(np.float32)
    s_indices = stored["indices"].astype(np.int64)
    tolerance = np.maximum(fp16_ulp(s_values), fp16_ulp(values))
    diff = np.abs(s_values - values.astype(np.float32))
    if np.any(diff > tolerance):
        i = int(np.argmax(diff - tolerance))
        return (f"logit of class {int(s_indices[i])} is {values[i]:.6g}, stored {s_values[i]:.6g} (|diff| {diff[i]:.3g} "
                f"> fp16 rounding {tolerance[i]:.3g})"), False
    if np.array_equal(s_indices, indices):
        return None, False
    if logits is not None and np.all(s_indices < len(logits)):
        near = np.abs(logits.astype(np.float32)[s_indices] - values.astype(np.float32)) <= tolerance
    else:
        near = np.full(len(s_indices), set(s_indices.tolist()) == set(indices.tolist()))
    i = int(np.flatnonzero(s_indices != indices)[0])
    described = (f"class at rank {i} is {int(indices[i])} (logit {values[i]:.4g}), stored {int(s_indices[i])} "
                 f"(logit {s_values[i]:.4g})")
    if np.all(near):
        return described, True
    return described, False


def compare_tail(stored: dict, position: int, k: int, spec, logits: np.ndarray, indices: np.ndarray,
                 tail: np.ndarray) -> tuple[str | None, bool]:
    """(what differed or None, whether it is only a near-tie) for a view's sampled classes and tail code.

    Each stored sampled class's logit must be the recomputed one within fp16 rounding. The classes
    drawn may differ only where the recomputed logits moved a boundary of the draw: a near-tie,
    reported, when every stored class still has its logit. The code's whole-number coordinates must
    agree within one step plus 1% of the code's norm (they are a rounded projection of all C logits,
    whose last bits move with the batch and the hardware).
    """
    s_classes = stored["indices"][position][k:].astype(np.int64)
    s_values = stored["values"][position][k:].astype(np.float32)
    if spec.samples:
        truth = logits.astype(np.float32)[s_classes]
        tolerance = np.maximum(fp16_ulp(s_values), fp16_ulp(truth))
        diff = np.abs(s_values - truth)
        if np.any(diff > tolerance):
            i = int(np.argmax(diff - tolerance))
            return (f"sampled tail class {int(s_classes[i])} has logit {truth[i]:.6g}, stored {s_values[i]:.6g} "
                    f"(|diff| {diff[i]:.3g} > fp16 rounding {tolerance[i]:.3g})"), False
        if not np.array_equal(s_classes, indices[k:]):
            return (f"sampled tail classes {s_classes.tolist()} were drawn as {indices[k:].tolist()} from the "
                    "recomputed logits (a boundary of the draw moved within rounding)"), True
    if spec.rank:
        s_code = stored["tail"][position][-spec.rank:].astype(np.float32)
        code = tail[-spec.rank:]
        tolerance = 1.0 + 0.01 * float(np.linalg.norm(code))
        diff = float(np.abs(s_code - code).max())
        if diff > tolerance:
            return f"tail code differs by {diff:.3g} (tolerance {tolerance:.3g})", False
    return None, False


def _added(cache) -> bool:
    """Whether ``cache`` is an added teacher's records (of a cache or of a webdataset export)."""
    return getattr(cache, "group", None) is not None


def _label(check: str, cache) -> str:
    """A check's name in the report: an added teacher's checks carry its name."""
    return f"{check} [{cache.name}]" if _added(cache) else check


def _check_structure(cache: Cache, report: VerifyReport) -> None:
    m = cache.manifest
    failed = len(report.failures)
    added = isinstance(cache, TeacherRecords)  # its arrays' epoch axis grows as it scores epochs the root added
    for name in getattr(cache, "ARRAYS", RECORD_ARRAYS):
        try:
            array = cache._array(name)
        except KdcacheError as exc:
            report.fail(str(exc), exc.exit_code)
            continue
        expected = (m.epochs, m.blocks.num_slots, record_width(m, name))
        shape = (m.epochs if added and array.shape[0] <= m.epochs else array.shape[0], *array.shape[1:])
        if tuple(shape) != expected or np.dtype(array.dtype) != np.dtype(m.dtypes[name]):
            report.fail(f"array {cache.location}/{name}: shape {tuple(array.shape)} dtype {array.dtype}; "
                        f"{'its group' if added else 'manifest'} says {expected} {m.dtypes[name]}")
    try:
        cache_spec(m)
    except KdcacheError as exc:
        report.fail(f"manifest augmentation: {exc}")
    report.add(_label("structure", cache), "ok" if len(report.failures) == failed else "FAILED")


def _check_ledger(cache: Cache, report: VerifyReport) -> None:
    """Every held unit committed and re-hashed: every planned one, or for a subset (``kdcache export``) the declared ones."""
    m = cache.manifest
    missing, damaged = 0, 0
    epochs, units = cache.held_units()
    if not cache.ledger:
        report.fail("no unit is committed")
        report.add("ledger", f"0 unit(s) committed, {len(epochs) * len(units)} missing")
        return
    for epoch in epochs:
        for unit in units:
            if not cache.unit_committed(epoch, unit):
                missing += 1
                whose = f"{cache.location}: " if _added(cache) else ""
                report.fail(f"{whose}epoch {epoch} unit {unit} (blocks {m.blocks.unit_blocks(unit).start}.."
                            f"{m.blocks.unit_blocks(unit).stop - 1}) is not committed"
                            + (f"; {cache.FINISH}" if _added(cache) else ""))
                continue
            try:
                cache.verify_unit(epoch, unit)  # with its epoch index, if any: the unit's own entry must agree with it
            except (ChecksumError, IncompleteCacheError) as exc:  # damage; a server that fails is an error, not damage
                damaged += 1
                report.fail(str(exc), exc.exit_code)
    held = ""
    if cache.subset is not None:  # say what it holds
        held = (f" (a subset: epochs {format_selection(epochs)} of {m.epochs}, "
                f"units {format_selection(units)} of {m.blocks.num_units})")
    report.add(_label("ledger", cache), f"{len(cache.ledger)} unit(s) committed, {missing} missing, {damaged} damaged{held}")
    for reason in cache.stale_indexes() if isinstance(cache, Cache) else []:  # its unit is missing: failed above
        report.add("ledger", reason)


def _check_dataset(cache: Cache, source, plan, report: VerifyReport, data: str) -> None:
    layout = cache.layout
    for block in range(layout.num_blocks):
        where = layout.block_slots(block)
        try:
            check_block(read_block(source, layout, block, plan["source_index"][where]), plan, where, what=f"data {data} block {block}")
        except (MismatchError, KdcacheError) as exc:
            report.fail(str(exc), exc.exit_code)
            report.add("dataset", "FAILED")
            return
    report.add("dataset", f"{cache.manifest.dataset.num_samples} sample digests match")


def _pick_views(cache: Cache, count: int, seed: int) -> dict[tuple[int, int], list[int]]:
    """``count`` distinct random committed views, from about count/32 random blocks: {(epoch, block): positions}.

    Whole blocks are re-scored (in precompute's batches, so the teacher computes exactly what it
    computed then); concentrating the views in a few blocks bounds that cost.
    """
    layout = cache.layout
    epochs, units = cache.held_units()  # a subset's committed units outside its declaration are not read
    candidates = [(e, b) for (e, u) in sorted(cache.ledger) if e in epochs and u in units for b in layout.unit_blocks(u)]
    if not candidates or count == 0:
        return {}
    rng = np.random.default_rng(seed)
    chosen = [candidates[i] for i in rng.permutation(len(candidates))]
    picked: dict[tuple[int, int], list[int]] = {}
    wanted = min(count, sum(layout.sizes[b] for _, b in chosen))
    blocks = []
    for key in chosen:
        blocks.append(key)
        if len(blocks) >= max(1, -(-count // 32)) and sum(layout.sizes[b] for _, b in blocks) >= wanted:
            break
    pool = [(key, p) for key in blocks for p in range(layout.sizes[key[1]])]
    for index in rng.choice(len(pool), size=wanted, replace=False):
        key, position = pool[int(index)]
        picked.setdefault(key, []).append(position)
    return {key: sorted(value) for key, value in picked.items()}


def _check_replay(cache: Cache, config: VerifyConfig, source, plan, report: VerifyReport, teacher, device) -> None:
    m = cache.manifest
    spec = cache_spec(m)
    size = None
    if _added(cache):  # an added teacher scored the views at its own size, normalised as it expects
        spec = dataclasses.replace(spec, mean=tuple(cache.group.mean), std=tuple(cache.group.std))
        size = cache.group.size
    scored = cache.group.replay if _added(cache) else m.replay  # how this teacher's views were replayed and scored
    path = config.replay_path or scored["path"]
    here = torch.device(device).type
    same = path == scored["path"] and (path != "device" or scored.get("device") == here)
    report.replay_path = path if path == scored["path"] else f"{path} (cache made with {scored['path']})"
    if path == "device" and path == scored["path"] and not same:  # the device path's pixels differ between devices
        report.replay_path = f"device on {here} (cache made on {scored.get('device')})"
    layout = cache.layout
    bad = 0
    for (epoch, block), positions in sorted(_pick_views(cache, config.views, config.seed).items()):
        stored = cache.read_block(epoch, block)
        where = layout.block_slots(block)
        members = plan["source_index"][where]
        samples = read_block(source, layout, block, members)
        images = EncodedImages(samples) if path == "device" else [decode_sample(s) for s in samples]
        sizes = images.sizes() if path == "device" else [(img.height, img.width) for img in images]
        if config.check_params:
            drawn = sample_view_params(spec, seed=m.seed, epoch=epoch, block_id=block, sample_ids=members, image_sizes=sizes)
            differs = np.flatnonzero(np.any(drawn != stored["params"], axis=1))  # the whole block: all of it is replayed
            if len(differs):
                row = next((p for p in positions if p in differs), int(differs[0]))  # a picked view first
                col = int(np.flatnonzero(drawn[row] != stored["params"][row])[0])
                report.fail(f"view (epoch {epoch}, sample {plan['key'][where][row]}): stored parameter "
                            f"{m.param_fields[col]} = {stored['params'][row, col]:.6g}, the spec and seed give {drawn[row, col]:.6g}",
                            VerifyError.exit_code)
                bad += 1
                continue  # parameters the spec cannot give are not replayed (they may not be replayable at all)
        try:  # without the re-draw (check_params off), parameters outside the spec's ranges are still never replayed
            check_view_params(spec, stored["params"], image_sizes=sizes, block_size=len(samples),
                              where=f"{cache.location}: epoch {epoch} block {block}")
        except FormatError as exc:
            report.fail(str(exc), exc.exit_code)
            bad += 1
            continue
        views = replay_block(spec, stored["params"], images, path=path, device=device, size=size)
        batch = config.batch_size or m.batch_size
        channels_last = bool(scored.get("teacher_channels_last")) and torch.device(device).type == "cuda"
        if channels_last:
            to_channels_last(teacher)
        logits = torch.cat([teacher_logits(teacher, views[i : i + batch], device, channels_last=channels_last)
                            for i in range(0, len(views), batch)]).cpu()
        tail_spec = tail_spec_of(m.tail)
        uniforms = view_uniforms(m.seed, epoch, members) if tail_spec.samples else None
        values, indices, tails = make_records(logits, m.k, tail_spec, uniforms=uniforms,
                                              basis=record_basis(m))
        k = m.k
        for position in positions:
            record = {name: stored[name][position][:k] for name in ("values", "indices")}
            recomputed = values[position][:k].float().numpy()
            problem, near_tie = compare_records(record, recomputed, indices[position][:k].numpy(), logits[position].numpy())
            if problem is None and (tail_spec.samples or tail_spec.rank):
                problem, near_tie = compare_tail(stored, position, k, tail_spec, logits[position].numpy(),
                                                 indices[position].numpy(), tails[position].float().numpy())
            report.max_abs_diff = max(report.max_abs_diff, float(np.abs(record["values"].astype(np.float32) - recomputed).max()))
            report.views_checked += 1
            report.top1_agree += int(indices[position][0]) == int(record["indices"][0])
            where_view = f"view (epoch {epoch}, sample {plan['key'][where][position]}, block {block})"
            if near_tie:
                report.near_ties.append(f"{where_view}: {problem}")
            elif problem:
                bad += 1
                report.fail(f"{where_view}: {problem}", VerifyError.exit_code)
    ties = f", {len(report.near_ties)} near-tie(s) (classes within fp16 rounding, not a failure)" if report.near_ties else ""
    agreement = ""
    if not same and report.views_checked:  # how far another path reproduces the teacher, as figures
        agreement = (f" ({100 * (report.views_checked - bad) / report.views_checked:.1f}%), top-1 agreement "
                     f"{100 * report.top1_agree / report.views_checked:.1f}%")
    report.add(_label("replay", cache), f"{report.views_checked} view(s) on path {report.replay_path}: "
                                        f"{report.views_checked - bad} match{agreement}{ties}, max |diff| {report.max_abs_diff:.3g}")


def _name(view) -> str:
    return f"teacher {view.name!r}" if _added(view) else f"teacher {MAIN!r}"


def _teacher_views(cache, teacher_record: str | None) -> list:
    """The records to check: one teacher's (``teacher_record``), or every teacher's (None or ``all``)."""
    if teacher_record is not None and teacher_record != ALL:
        return [cache.teacher_records(teacher_record)]
    return [cache.teacher_records(name) for name in cache.teachers]


def verify_cache(config: VerifyConfig, *, log=print) -> VerifyReport:
    """Run every check; raises VerifyError (after logging the report) if any failed."""
    cache = open_cache(config.cache, verify_checksums=True)
    require_digest(cache, config.expect_digest)
    report = VerifyReport(cache=str(cache.location), digest=cache.digest() + (" (as expected)" if config.expect_digest else ""))
    views = _teacher_views(cache, config.teacher_record)
    for view in views:
        _check_structure(view, report)
        _check_ledger(view, report)
    plan = cache.samples()
    if dataset_digest(plan) != cache.manifest.dataset.digest:
        report.fail(f"manifest field dataset.digest = {cache.manifest.dataset.digest[:16]}... does not match the plan's samples "
                    f"({dataset_digest(plan)[:16]}...); the manifest was edited or damaged")
    if config.data is not None and not config.quick:
        m = cache.manifest
        shard_sizes = [n for _, n in m.dataset.shards] if m.dataset.shards else None
        kwargs = {"shard_sizes": shard_sizes} if shard_sizes else {}
        source = open_source(config.data, split=m.dataset.split, **kwargs)
        if len(source) != m.dataset.num_samples:
            report.fail(f"data {config.data} has {len(source)} samples, the cache was made from {m.dataset.num_samples} "
                        f"({m.dataset.uri})", MismatchError.exit_code)
            report.add("dataset", "FAILED")
        else:
            _check_dataset(cache, source, plan, report, config.data)
        if config.views and report.ok:
            device = distributed.resolve_device("auto", distributed.ranks_from_env())
            teacher, info = load_teacher(dataclasses.replace(config.teacher, device=str(device)), pinned=[view.manifest.teacher for view in views])
            scored = [view for view in views if view.manifest.teacher.weights_sha256 == info.weights_sha256]
            if not scored:  # the views are re-scored anyway, so the report says how far the records are off
                made = (f"{views[0].manifest.teacher.weights_sha256[:16]}..." if len(views) == 1 else
                        ", ".join(f"{_name(view)} {view.manifest.teacher.weights_sha256[:16]}..." for view in views))
                report.fail(f"teacher weights differ: {config.teacher.label} has sha256 {info.weights_sha256[:16]}..., "
                            f"the cache{' was' if len(views) == 1 else chr(39) + 's records were'} made with {made}",
                            MismatchError.exit_code)
                scored = views
            for view in scored:  # every teacher whose records this teacher made
                _check_replay(view, config, source, plan, report, teacher, device)
    log(report.format())
    if not report.ok:
        raise report.error()
    return report
