"""`kdcache show`: a picture of what the teacher saw, to look at a cache instead of trusting it.

One row per chosen view of one epoch, three panels:

1. the view rebuilt from its stored parameters with :func:`kdcache.replay.replay_block` on the
   cache's replay path (the very tensor the teacher scored), un-normalised with the spec's
   mean/std for display;
2. for a mixed view (mixup/cutmix), the partner's own view with its key and the mixing weight;
   otherwise the decoded source image with the crop box drawn on it;
3. the teacher's top-5 classes at T=1 from the stored record (tail included in the
   normaliser), the true label marked, and for a mixed view the partner's label too. With a
   teacher given, the live teacher's probabilities of the same classes on the same view are
   drawn over the bars (they should sit on the bar ends).

Each row's title names the sample key, its label, the epoch, its slot and the augmentation
parameters (crop box, flip, RandAugment ops by name, erasing box, mixing partner and weight).
The figure has a fixed width and a fixed height per row, so the PNG's size in pixels follows
from the row count (:func:`image_size`).
"""

from __future__ import annotations

import os
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdcache.augment import AugSpec, cache_spec, check_view_params, partner_positions
from kdcache.errors import ConfigError, IncompleteCacheError, MismatchError
from kdcache.format import format_selection
from kdcache.format import Cache, Manifest, open_cache
from kdcache.location import refuse_file_in_the_way
from kdcache.plan import check_block, read_block
from kdcache.info import tail_words
from kdcache.record import stored_record
from kdcache.replay import EncodedImages, replay_base, replay_block
from kdcache.sources import decode_sample, open_source
from kdcache.teacher import TeacherConfig

#: Panels per row: replayed view, partner view or source image, teacher top-5.
PANELS_PER_ROW = 3
#: Classes in the bar chart (fewer when the cache stores fewer logits).
TOP_CLASSES = 5
#: Most rows in one picture (a taller PNG is no longer something to look at).
MAX_ROWS = 64
#: Figure geometry in inches at :data:`DPI`; binary-exact values so the pixel size is exact.
DPI = 100
WIDTH_IN = 11.0
HEADER_IN = 0.75
ROW_IN = 3.5
# Row layout in pixels (a row is ROW_IN * DPI = 350 px high, the figure WIDTH_IN * DPI = 1100 px wide).
_WIDTH_PX = WIDTH_IN * DPI
_IMAGE_PX = 200
_PANEL_BOTTOM_PX = 40
_IMAGE_LEFT_PX = (24, 264)
_BARS_LEFT_PX = 600
_BARS_RIGHT_PX = 1060

_TRUE = "#2e9e4f"
_PARTNER = "#e08a1e"
_OTHER = "#9aa3b2"
_BOX = "#ff3b30"


@dataclass(frozen=True, kw_only=True)
class ShowConfig:
    """What to draw: ``count`` views of the first block of ``epoch`` (or the named ``samples``) into ``output``.

    The first block is block 0, or for a subset (``kdcache export --blocks``) the first it holds;
    a named sample in a block the subset does not hold is refused, naming the block.

    ``samples`` are sample keys, or slot indices of the cache's plan (an int, or a string of
    digits that is not itself a key); when given, ``count`` is not used. ``teacher``, if given,
    is re-run on the drawn views and its probabilities are drawn over the stored ones.
    ``teacher_record``: whose stored records to draw (``main``, or an added teacher's name).
    """

    cache: str
    data: str
    epoch: int
    output: str
    samples: tuple[str | int, ...] = ()
    count: int = 8
    teacher: TeacherConfig | None = None
    teacher_record: str = "main"

    def __post_init__(self) -> None:
        object.__setattr__(self, "samples", tuple(self.samples or ()))
        if self.teacher_record == "all":
            raise ConfigError("--teacher-record all: show draws one teacher's records; name one (main, or an added teacher)")
        for name in ("cache", "output"):
            if isinstance(getattr(self, name), os.PathLike):
                object.__setattr__(self, name, os.fspath(getattr(self, name)))
        for name in ("cache", "data", "output"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ConfigError(f"show {name} {value!r}; expected a non-empty string")
        if not str(self.output).lower().endswith(".png"):
            raise ConfigError(f"--out {self.output}: the picture is written as PNG; expected a path ending in .png")
        refuse_file_in_the_way(Path(self.output).parent, "--out folder")
        if not _is_int(self.epoch) or self.epoch < 0:
            raise ConfigError(f"--epoch {self.epoch!r}; expected an epoch number (0 or more)")
        if not _is_int(self.count) or not 1 <= self.count <= MAX_ROWS:
            raise ConfigError(f"--count {self.count!r}; expected 1..{MAX_ROWS}")
        for sample in self.samples:
            if not (_is_int(sample) or (isinstance(sample, str) and sample)):
                raise ConfigError(f"--samples {sample!r}; expected a sample key or a slot index")
        if len(self.samples) > MAX_ROWS:
            raise ConfigError(f"--samples names {len(self.samples)} samples; at most {MAX_ROWS} fit in one picture")
        if self.teacher is not None and not isinstance(self.teacher, TeacherConfig):
            raise ConfigError(f"show teacher {self.teacher!r}; expected a TeacherConfig")


@dataclass(frozen=True)
class ShowResult:
    """The written picture: its path, rows, panels (axes counted in the figure) and size in pixels."""

    output: str
    rows: int
    panels_per_row: int
    width: int
    height: int
    keys: list[str]
    live_max_abs_diff: float | None = None  # largest |live - stored| probability over drawn classes

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height


def image_size(rows: int) -> tuple[int, int]:
    """(width, height) in pixels of a picture with ``rows`` rows."""
    return int(round(WIDTH_IN * DPI)), int(round((HEADER_IN + rows * ROW_IN) * DPI))


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


# ---- choosing the views ------------------------------------------------------------------------


def _check_epoch(cache: Cache, epoch: int) -> None:
    """The epoch must be whole: every unit committed, or for a subset (``kdcache export``) every unit it declares."""
    if cache.subset is not None:
        epochs, units = cache.held_units()
        held = f"it holds epochs {format_selection(epochs)}, blocks {format_selection(cache.held_blocks())}"
        if epoch not in epochs:
            raise IncompleteCacheError(f"{cache.location}: epoch {epoch} is not in this subset ({held}); pick one of its epochs")
        missing = [u for u in units if not cache.unit_committed(epoch, u)]
        if missing:
            blocks = cache.layout.unit_blocks(missing[0])
            raise IncompleteCacheError(f"{cache.location}: epoch {epoch} unit {missing[0]} (blocks {blocks.start}.."
                                       f"{blocks.stop - 1}) is missing from this subset ({held}); export it again "
                                       f"from {cache.subset.source}")
        return
    complete = cache.complete_epochs()
    if epoch not in complete:
        done = ", ".join(map(str, complete)) if complete else "none"
        raise IncompleteCacheError(
            f"{cache.location}: epoch {epoch} is not complete in the cache (it plans {cache.manifest.epochs} epoch(s); "
            f"complete epochs: {done}); pick a complete epoch, or finish or extend the cache with kdcache precompute-logits --resume"
        )


def _resolve_slots(config: ShowConfig, cache: Cache, plan: dict[str, np.ndarray]) -> list[int]:
    """The plan slots to draw, in the order asked (duplicates dropped)."""
    layout = cache.layout
    held = cache.held_blocks()  # a subset (kdcache export) holds only some blocks
    if not config.samples:
        start = layout.block_slots(held[0]).start
        return list(range(start, start + min(config.count, layout.sizes[held[0]])))
    keys = plan["key"]
    by_key = {str(k): i for i, k in enumerate(keys.tolist()) if plan["source_index"][i] >= 0}
    slots: list[int] = []
    for sample in config.samples:
        if isinstance(sample, str) and sample in by_key:
            slot = by_key[sample]
        elif _is_int(sample) or (isinstance(sample, str) and sample.isascii() and sample.isdigit()):
            slot = int(sample)
            if not 0 <= slot < layout.num_slots:
                raise ConfigError(
                    f"--samples {sample}: slot {slot} is outside the cache's {layout.num_slots} slots (0..{layout.num_slots - 1})"
                )
            if plan["source_index"][slot] < 0:
                block = slot // layout.block_capacity
                used = layout.block_slots(block)
                raise ConfigError(
                    f"--samples {sample}: slot {slot} is padding (block {block} holds slots {used.start}..{used.stop - 1})"
                )
        else:
            example = next(iter(by_key), "")
            raise ConfigError(f"--samples {sample!r}: no sample with this key in the cache (keys look like {example!r})")
        block = slot // layout.block_capacity
        if block not in held:
            raise ConfigError(f"--samples {sample}: slot {slot} is in block {block}, which this subset does not hold "
                              f"(it holds blocks {format_selection(held)}); pick a sample of those blocks")
        if slot not in slots:
            slots.append(slot)
    return slots


# ---- data for one row --------------------------------------------------------------------------


@dataclass
class ShownView:
    """One row of the picture: a view of the chosen epoch and what is drawn for it."""

    slot: int
    block: int
    position: int
    key: str
    label: int
    params: np.ndarray
    view: np.ndarray  # H x W x 3 in [0, 1]
    second: np.ndarray  # partner view or source image, H x W x 3 in [0, 1]
    partner_key: str | None
    partner_label: int | None
    probs: np.ndarray  # [k+1]: stored classes, then the tail bucket
    indices: np.ndarray  # [k]
    tensor: torch.Tensor | None = None  # the normalised view, for the live teacher
    live: np.ndarray | None = None  # live teacher probabilities of ``indices``


def _display(tensor: torch.Tensor, spec: AugSpec) -> np.ndarray:
    mean = torch.tensor(spec.mean, dtype=tensor.dtype).view(3, 1, 1)
    std = torch.tensor(spec.std, dtype=tensor.dtype).view(3, 1, 1)
    return (tensor * std + mean).clamp(0.0, 1.0).permute(1, 2, 0).numpy()


def _column(manifest: Manifest, params: np.ndarray, name: str) -> float:
    return float(params[manifest.param_fields.index(name)])


def _partner(manifest: Manifest, spec: AugSpec, params: np.ndarray) -> int:
    return int(_column(manifest, params, "mix_partner")) if spec.mixes else -1


def _load_views(config: ShowConfig, cache: Cache, plan: dict[str, np.ndarray], slots: list[int]) -> list[ShownView]:
    m = cache.manifest
    layout = cache.layout
    spec = cache_spec(m)
    path = m.replay["path"]
    shard_sizes = [n for _, n in m.dataset.shards] if m.dataset.shards else None
    source = open_source(config.data, split=m.dataset.split, **({"shard_sizes": shard_sizes} if shard_sizes else {}))
    if len(source) != m.dataset.num_samples:
        raise MismatchError(
            f"data {config.data} has {len(source)} samples, the cache was made from {m.dataset.num_samples} "
            f"({m.dataset.uri}); pass the data the cache was made from"
        )
    by_block: dict[int, list[int]] = {}
    for slot in slots:
        by_block.setdefault(slot // layout.block_capacity, []).append(slot)
    rows: dict[int, ShownView] = {}
    for block, block_slots in sorted(by_block.items()):
        where = layout.block_slots(block)
        samples = read_block(source, layout, block, plan["source_index"][where])
        check_block(samples, plan, where, what=f"data {config.data} (block {block})")
        stored = cache.read_block(config.epoch, block)
        params = stored["params"]
        positions = [slot - where.start for slot in block_slots]
        needed = set(positions) | set(partner_positions(spec, params, positions).tolist())
        images = [decode_sample(samples[p]) if p in needed else None for p in range(len(samples))]
        check_view_params(spec, params, image_sizes=[None if img is None else (img.height, img.width) for img in images],
                          block_size=len(samples), where=f"{cache.location}: epoch {config.epoch} block {block}")
        partners = {p: _partner(m, spec, params[p]) for p in positions}
        replayed = EncodedImages(samples) if path == "device" else images  # as scored: decoded where the device path decodes
        views = replay_block(spec, params, replayed, positions=positions, path=path)
        record = stored_record(stored["values"][positions].astype(np.float16), stored["indices"][positions].astype(np.int64),
                               stored["tail"][positions].astype(np.float16), m)
        probs = record.log_probs(1.0).exp().numpy()
        for i, (slot, position) in enumerate(zip(block_slots, positions)):
            partner = partners[position]
            if partner >= 0:
                second = _display(replay_base(spec, params[partner], images[partner], path=path), spec)
            else:
                second = np.asarray(images[position].convert("RGB"), dtype=np.float32) / 255.0
            rows[slot] = ShownView(
                slot=slot, block=block, position=position, key=samples[position].key, label=samples[position].label,
                params=params[position], view=_display(views[i], spec), second=second,
                partner_key=samples[partner].key if partner >= 0 else None,
                partner_label=samples[partner].label if partner >= 0 else None,
                probs=probs[i], indices=record.indices[i].numpy(), tensor=views[i],
            )
    return [rows[slot] for slot in slots]


def _live_teacher(config: ShowConfig, manifest: Manifest, views: list[ShownView]) -> None:
    """Re-run the teacher on the views; sets each view's ``live`` probabilities of its stored classes."""
    from kdcache.teacher import load_teacher, teacher_logits

    teacher, info = load_teacher(config.teacher, pinned=manifest.teacher)
    if info.weights_sha256 != manifest.teacher.weights_sha256:
        raise MismatchError(
            f"teacher {config.teacher.label} has weights sha256 {info.weights_sha256[:16]}..., "
            f"the cache was made with {manifest.teacher.weights_sha256[:16]}... ({manifest.teacher.checkpoint})"
        )
    logits = teacher_logits(teacher, torch.stack([v.tensor for v in views]), config.teacher.device).cpu()
    probs = torch.softmax(logits, dim=-1).numpy()
    for view, p in zip(views, probs):
        view.live = p[view.indices]


# ---- drawing -----------------------------------------------------------------------------------


def _fmt(value: float) -> str:
    return f"{value:.3g}"


def _class_name(names: list[str], index: int) -> str:
    name = names[index] if 0 <= index < len(names) else str(index)
    return name if name == str(index) else f"{name} ({index})"


def describe_params(manifest: Manifest, spec: AugSpec, params: np.ndarray, partner_key: str | None = None) -> str:
    """The augmentation parameters of one view in words: crop box, flip, jitter, RandAugment ops, erasing, mixing.

    Sizes are width x height, as the source image's size is given (and as PIL gives it).
    """
    from timm.data.auto_augment import LEVEL_TO_ARG

    def col(name: str) -> float:
        return _column(manifest, params, name)

    top, left, height, width = (int(col(c)) for c in ("crop_top", "crop_left", "crop_height", "crop_width"))
    parts = [f"crop top {top} left {left} {width}x{height}", "flipped" if col("flip") > 0.5 else "not flipped"]
    if spec.color_jitter > 0:
        parts.append("jitter b/c/s " + "/".join(_fmt(col(f"jitter_{c}")) for c in ("brightness", "contrast", "saturation")))
    if spec.randaug_n:
        ops = []
        for slot in range(spec.randaug_n):
            op_id = int(col(f"ra{slot}_op"))
            if op_id >= 0:
                name = spec.randaug_ops[op_id]
                sign = "-" if col(f"ra{slot}_neg") > 0.5 else "+"
                ops.append(name if LEVEL_TO_ARG[name] is None else f"{name}(m {sign}{_fmt(col(f'ra{slot}_mag'))})")
        parts.append("RandAugment " + (", ".join(ops) if ops else "none applied"))
    if spec.erase_prob > 0:
        if col("erase") > 0.5:
            e = [int(col(c)) for c in ("erase_top", "erase_left", "erase_height", "erase_width")]
            parts.append(f"erased top {e[0]} left {e[1]} {e[3]}x{e[2]}")
        else:
            parts.append("not erased")
    if spec.mixes:
        lam = col("mix_lam")
        partner = int(col("mix_partner"))
        if partner >= 0:
            parts.append(f"{spec.mix} with {partner_key or f'block position {partner}'}, lambda {lam:.3f}")
            if spec.mix == "cutmix":
                top, left, bottom, right = (int(col(c)) for c in ("mix_top", "mix_left", "mix_bottom", "mix_right"))
                parts.append(f"box top {top} left {left} {right - left}x{bottom - top}")
        else:
            parts.append(f"not mixed ({spec.mix} skipped)")
    return ", ".join(parts)


def _box(ax, top: float, left: float, height: float, width: float) -> None:
    from matplotlib.patches import Rectangle

    ax.add_patch(Rectangle((left - 0.5, top - 0.5), width, height, fill=False, edgecolor=_BOX, linewidth=2.0))


def _image_axis(sub, left_px: float, image: np.ndarray, title: str):
    row_px = ROW_IN * DPI
    ax = sub.add_axes((left_px / _WIDTH_PX, _PANEL_BOTTOM_PX / row_px, _IMAGE_PX / _WIDTH_PX, _IMAGE_PX / row_px))
    ax.imshow(image, interpolation="nearest", vmin=0.0, vmax=1.0)
    ax.set_title(title, fontsize=9, linespacing=1.3)
    ax.set_xticks([])
    ax.set_yticks([])
    return ax


def _draw_row(sub, row: ShownView, manifest: Manifest, spec: AugSpec, epoch: int, names: list[str]) -> None:
    mixed = row.partner_key is not None
    lam = _column(manifest, row.params, "mix_lam") if spec.mixes else 1.0
    size = spec.output_size

    def col(name: str) -> float:
        return _column(manifest, row.params, name)

    view_title = f"view as scored ({size}x{size})\n" + (f"{spec.mix}, \u03bb = {lam:.2f}" if mixed else "what the teacher saw")
    view_ax = _image_axis(sub, _IMAGE_LEFT_PX[0], row.view, view_title)
    if mixed:
        partner_title = f"partner {row.partner_key} ({_class_name(names, row.partner_label)})\nits own view, weight 1 - \u03bb = {1 - lam:.2f}"
        second_ax = _image_axis(sub, _IMAGE_LEFT_PX[1], row.second, partner_title)
        if spec.mix == "cutmix":
            top, left, bottom, right = (int(col(c)) for c in ("mix_top", "mix_left", "mix_bottom", "mix_right"))
            _box(view_ax, top, left, bottom - top, right - left)
            _box(second_ax, top, left, bottom - top, right - left)
    else:
        h, w = row.second.shape[:2]
        flipped = ", then flipped" if col("flip") > 0.5 else ""
        second_ax = _image_axis(sub, _IMAGE_LEFT_PX[1], row.second, f"source image ({w}x{h})\ncrop box{flipped}")
        _box(second_ax, *(col(c) for c in ("crop_top", "crop_left", "crop_height", "crop_width")))

    row_px = ROW_IN * DPI
    bar_ax = sub.add_axes((_BARS_LEFT_PX / _WIDTH_PX, _PANEL_BOTTOM_PX / row_px,
                           (_BARS_RIGHT_PX - _BARS_LEFT_PX) / _WIDTH_PX, _IMAGE_PX / row_px))
    shown = min(TOP_CLASSES, len(row.indices))
    classes = [int(c) for c in row.indices[:shown]]
    probs = row.probs[:shown]
    colours = [_TRUE if c == row.label else _PARTNER if mixed and c == row.partner_label else _OTHER for c in classes]
    y = np.arange(shown)
    bar_ax.barh(y, probs, color=colours, height=0.7)
    bar_ax.set_yticks(y, [_class_name(names, c) for c in classes], fontsize=9)
    for tick, colour in zip(bar_ax.get_yticklabels(), colours):
        if colour != _OTHER:  # the true (and partner's) label stays visible even when its bar is a sliver
            tick.set_color(colour)
            tick.set_fontweight("bold")
    bar_ax.set_ylim(shown - 0.5, -0.5)
    bar_ax.set_xlim(0.0, 1.0)
    bar_ax.tick_params(axis="x", labelsize=8)
    bar_ax.set_xlabel("teacher probability at T=1 (stored record)", fontsize=8, labelpad=2)
    for yi, p in zip(y, probs):
        inside = p > 0.85  # a label past the bar's end would leave the axes
        bar_ax.text(p - 0.012 if inside else p + 0.012, yi, f"{p:.1%}", va="center", ha="right" if inside else "left",
                    color="white" if inside else "black", fontsize=8.5)
    if row.live is not None:
        bar_ax.scatter(row.live[:shown], y, marker="|", s=300, linewidths=2.2, color="black", zorder=3)
    notes = []
    if len(row.indices) < manifest.teacher.num_classes:
        notes.append(f"top-{shown} of {manifest.teacher.num_classes} classes; tail ({manifest.teacher.num_classes - len(row.indices)} unstored): {row.probs[-1]:.1%}")
    notes.append(_where_label(row.label, row.indices, row.probs, shown, names, "true label"))
    if mixed and row.partner_label != row.label:
        notes.append(_where_label(row.partner_label, row.indices, row.probs, shown, names, "partner's label"))
    bar_ax.set_title(textwrap.fill("; ".join(n for n in notes if n), width=95), fontsize=8.5, linespacing=1.3)

    head = f"{row.key}    label {_class_name(names, row.label)}    epoch {epoch}    slot {row.slot} (block {row.block})"
    params = textwrap.fill(describe_params(manifest, spec, row.params, row.partner_key), width=150, max_lines=2, placeholder=" ...")
    sub.text(8 / _WIDTH_PX, 1 - 8 / row_px, head, fontsize=10, weight="bold", ha="left", va="top")
    sub.text(8 / _WIDTH_PX, 1 - 27 / row_px, params, fontsize=9, ha="left", va="top", linespacing=1.3)


def _where_label(label: int, indices: np.ndarray, probs: np.ndarray, shown: int, names: list[str], what: str) -> str:
    ranks = np.flatnonzero(indices == label)
    if ranks.size == 0:
        return f"{what} {_class_name(names, label)} is in the tail"
    rank = int(ranks[0])
    return "" if rank < shown else f"{what} {_class_name(names, label)}: rank {rank + 1}, {probs[rank]:.1%}"


def _figure(rows: list[ShownView], manifest: Manifest, config: ShowConfig, cache: Cache):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    spec = cache_spec(manifest)
    names = list(manifest.dataset.class_names or manifest.teacher.class_names)
    width, height = image_size(len(rows))
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    subs = fig.subfigures(len(rows) + 1, 1, height_ratios=[HEADER_IN] + [ROW_IN] * len(rows), hspace=0.0)
    header = subs[0]
    t = manifest.teacher
    header.text(
        8 / _WIDTH_PX, 0.88,
        f"{cache.location}    epoch {config.epoch}    augmentation {spec.name}    replay path {manifest.replay['path']}\n"
        f"teacher {t.name} (weights {t.weights_sha256[:12]}), top-{manifest.k} logits + {tail_words(manifest.tail)} "
        "stored per view",
        fontsize=10, ha="left", va="top", linespacing=1.4,
    )
    legend = [Patch(color=_TRUE, label="true label"), Patch(color=_OTHER, label="other class")]
    boxes = []
    if any(row.partner_key is not None for row in rows):
        legend.insert(1, Patch(color=_PARTNER, label="mixing partner's label"))
        boxes += ["cutmix box"] if spec.mix == "cutmix" else []
    if any(row.partner_key is None for row in rows):
        boxes.append("crop box")
    if boxes:
        legend.append(Line2D([], [], color=_BOX, linewidth=2, label=" / ".join(boxes)))
    if config.teacher is not None:
        legend.append(Line2D([], [], color="black", marker="|", markersize=12, markeredgewidth=2, linestyle="none",
                             label="live teacher on the same view"))
    header.legend(handles=legend, loc="lower right", bbox_to_anchor=(0.995, 0.0), ncols=len(legend), fontsize=8.5, frameon=False)
    for i, (sub, row) in enumerate(zip(subs[1:], rows)):
        sub.set_facecolor("#f3f4f7" if i % 2 == 0 else "white")
        _draw_row(sub, row, manifest, spec, config.epoch, names)
    return fig


def _open(config: ShowConfig):
    """The cache as the chosen teacher's records see it."""
    from kdcache.batches import teacher_view

    cache = teacher_view(open_cache(config.cache, verify_checksums=True), config.teacher_record)
    if config.teacher is not None and getattr(cache, "group", None) is not None:
        spec, group = cache_spec(cache.manifest), cache.group
        if (group.size, list(group.mean), list(group.std)) != (spec.output_size, list(spec.mean), list(spec.std)):
            raise ConfigError(f"teacher {config.teacher_record!r} scored the views at {group.size}px with mean {group.mean} "
                              f"std {group.std}, the picture shows them at {spec.output_size}px as the cache's spec normalises "
                              "them; draw it without --teacher (kdcache verify --teacher-record re-scores it)")
    return cache


def collect_views(config: ShowConfig, *, cache: Cache | None = None) -> list[ShownView]:
    """The views to draw, in row order, with their pixels, stored probabilities and (with a teacher) live ones."""
    cache = cache or _open(config)
    _check_epoch(cache, config.epoch)
    plan = cache.samples()
    views = _load_views(config, cache, plan, _resolve_slots(config, cache, plan))
    if config.teacher is not None:
        _live_teacher(config, cache.manifest, views)
    return views


def render_views(config: ShowConfig) -> ShowResult:
    """Draw the chosen views of one epoch of a cache into a PNG (see the module docstring)."""
    cache = _open(config)
    views = collect_views(config, cache=cache)
    fig = _figure(views, cache.manifest, config, cache)
    panels = len(fig.get_axes())
    output = Path(config.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=DPI, format="png")
    width, height = image_size(len(views))
    live = None
    if config.teacher is not None:
        live = max(float(np.abs(v.live - v.probs[: len(v.indices)]).max()) for v in views)
    return ShowResult(
        output=str(output), rows=len(views), panels_per_row=panels // len(views), width=width, height=height,
        keys=[v.key for v in views], live_max_abs_diff=live,
    )


__all__ = ["ShowConfig", "ShowResult", "ShownView", "collect_views", "describe_params", "image_size", "render_views"]
