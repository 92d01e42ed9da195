"""The augmentation spec and the sampling of per-view augmentation parameters.

An :class:`AugSpec` is a declarative, versioned description of the pipeline (ops, ranges,
probabilities, output size, interpolation, mean/std). It is stored in every cache, and
training rebuilds the pipeline from it, never from flags.

Parameters are drawn from a counter-based generator (Philox) keyed by
``(seed, epoch, sample id, stream)``: there is no hidden sequence state, so any view can be
drawn alone, in any order, on any rank. The drawn values are then stored explicitly (one
float32 row per view, fields named by :func:`param_fields`), so replay never depends on an
RNG implementation. Parameters read back from a cache are checked against what the spec can
draw (:func:`check_view_params`) before anything replays them. The sampling algorithms follow timm's transforms
(``RandomResizedCropAndInterpolation.get_params``, ``RandAugment``/``AugmentOp``,
``RandomErasing``, ``Mixup``'s ``rand_bbox``); replay (:mod:`kdcache.replay`) applies the
stored values with timm's and torchvision's functional ops.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdcache.errors import ConfigError, FormatError

#: Version of the spec's schema and of the parameter layout it implies.
AUG_SPEC_VERSION = 1

PRESETS = ("none", "light", "strong", "funmatch", "cutmix")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
MIX_MODES = ("none", "mixup", "cutmix")
CROP_MODES = ("center", "rrc")

#: timm's RandAugment op set (``_RAND_TRANSFORMS``), the default for ``randaug_ops``.
DEFAULT_RANDAUG_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
    "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)
#: timm ops that draw randomness inside the op itself: their views cannot be replayed.
UNREPLAYABLE_OPS = frozenset({"GaussianBlurRand"})

# Streams of the counter-based generator.
_STREAM_VIEW = 0
_STREAM_PAIRS = 1


@dataclass(frozen=True, kw_only=True)
class AugSpec:
    """A declarative augmentation pipeline (see docs/format.md, "Augmentation spec")."""

    name: str = "custom"
    version: int = AUG_SPEC_VERSION
    output_size: int
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    crop: str = "rrc"
    crop_pct: float = 0.875
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.0
    color_jitter: float = 0.0
    randaug_n: int = 0
    randaug_m: float = 9.0
    randaug_mstd: float = 0.5
    randaug_prob: float = 0.5
    randaug_ops: tuple[str, ...] = DEFAULT_RANDAUG_OPS
    erase_prob: float = 0.0
    erase_scale: tuple[float, float] = (0.02, 1 / 3)
    erase_ratio: tuple[float, float] = (0.3, 1 / 0.3)
    mix: str = "none"
    mix_alpha: float = 1.0
    mix_prob: float = 1.0

    def __post_init__(self) -> None:
        for name, length in (("mean", 3), ("std", 3), ("crop_scale", 2), ("crop_ratio", 2), ("erase_scale", 2),
                             ("erase_ratio", 2)):
            value = getattr(self, name)
            if (not isinstance(value, (list, tuple)) or len(value) != length
                    or not all(_is_number(v) for v in value)):
                raise ConfigError(f"augmentation spec {name}={value!r}; expected {length} numbers")
            object.__setattr__(self, name, tuple(float(v) for v in value))
        if not isinstance(self.randaug_ops, (list, tuple)) or not all(isinstance(op, str) for op in self.randaug_ops):
            raise ConfigError(f"augmentation spec randaug_ops={self.randaug_ops!r}; expected a list of op names")
        object.__setattr__(self, "randaug_ops", tuple(self.randaug_ops))
        for name in ("hflip", "randaug_prob", "erase_prob", "mix_prob", "crop_pct", "color_jitter", "randaug_m",
                     "randaug_mstd", "mix_alpha"):
            if not _is_number(getattr(self, name)):
                raise ConfigError(f"augmentation spec {name}={getattr(self, name)!r}; expected a number")
        for name in ("version", "output_size", "randaug_n"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"augmentation spec {name}={value!r}; expected an integer")
        if self.randaug_n > 0 and not self.randaug_ops:
            raise ConfigError(f"augmentation spec randaug_ops is empty but randaug_n={self.randaug_n}; name at least one op")
        if self.version != AUG_SPEC_VERSION:
            raise ConfigError(f"augmentation spec version {self.version} is not supported; expected {AUG_SPEC_VERSION}")
        if not isinstance(self.output_size, int) or self.output_size < 1:
            raise ConfigError(f"augmentation spec output_size={self.output_size!r}; expected a positive integer")
        _check_choice("interpolation", self.interpolation, INTERPOLATIONS)
        _check_choice("crop", self.crop, CROP_MODES)
        _check_choice("mix", self.mix, MIX_MODES)
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError(f"augmentation spec mean={self.mean}, std={self.std}; expected 3 values each, std > 0")
        for name in ("hflip", "randaug_prob", "erase_prob", "mix_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"augmentation spec {name}={value}; expected a probability in [0, 1]")
        if not 0.0 < self.crop_pct <= 1.0:
            raise ConfigError(f"augmentation spec crop_pct={self.crop_pct}; expected a value in (0, 1]")
        for name in ("crop_scale", "crop_ratio", "erase_scale", "erase_ratio"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ConfigError(f"augmentation spec {name}={getattr(self, name)}; expected 0 < low <= high")
        if self.randaug_n < 0 or not 0 <= self.randaug_m <= 10 or self.randaug_mstd < 0:
            raise ConfigError(
                f"augmentation spec randaug_n={self.randaug_n}, randaug_m={self.randaug_m}, "
                f"randaug_mstd={self.randaug_mstd}; expected n >= 0, 0 <= m <= 10, mstd >= 0"
            )
        from timm.data.auto_augment import NAME_TO_OP

        unknown = [op for op in self.randaug_ops if op not in NAME_TO_OP]
        if unknown:
            raise ConfigError(f"augmentation spec randaug_ops has unknown ops {unknown}; known: {sorted(NAME_TO_OP)}")
        random_ops = [op for op in self.randaug_ops if op in UNREPLAYABLE_OPS]
        if random_ops:
            raise ConfigError(f"augmentation spec randaug_ops {random_ops} draw randomness inside the op and cannot be replayed")
        if self.color_jitter < 0 or self.mix_alpha <= 0:
            raise ConfigError(
                f"augmentation spec color_jitter={self.color_jitter}, mix_alpha={self.mix_alpha}; expected >= 0 and > 0"
            )

    def to_dict(self) -> dict:
        """JSON types only (tuples as lists), so a spec equals itself after a JSON round trip."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict) -> "AugSpec":
        if not isinstance(data, dict):
            raise ConfigError(f"augmentation spec must be a JSON object, found {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(data) - known)
        if extra:
            raise ConfigError(f"augmentation spec has unknown fields {extra}; known: {sorted(known)}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ConfigError(f"augmentation spec is incomplete or malformed: {exc}") from None

    @property
    def mixes(self) -> bool:
        return self.mix != "none"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"augmentation spec {name}={value!r}; expected one of {', '.join(choices)}")


def preset(name: str, *, output_size: int, mean, std, interpolation: str = "bilinear") -> AugSpec:
    """One of the named pipelines in :data:`PRESETS`, sized and normalised for a teacher."""
    common = dict(name=name, output_size=output_size, mean=tuple(mean), std=tuple(std), interpolation=interpolation)
    if name == "none":
        return AugSpec(crop="center", **common)
    if name == "light":
        return AugSpec(crop="rrc", hflip=0.5, **common)
    if name == "strong":
        return AugSpec(crop="rrc", hflip=0.5, randaug_n=2, randaug_m=9.0, randaug_mstd=0.5, erase_prob=0.25, **common)
    if name == "funmatch":
        return AugSpec(crop="rrc", hflip=0.5, mix="mixup", mix_alpha=1.0, **common)
    if name == "cutmix":
        return AugSpec(crop="rrc", hflip=0.5, mix="cutmix", mix_alpha=1.0, **common)
    raise ConfigError(f"unknown augmentation preset {name!r}; expected one of {', '.join(PRESETS)} or a JSON spec file")


def resolve_spec(value: str, *, output_size: int, mean, std, interpolation: str) -> AugSpec:
    """A preset name (sized, normalised and interpolated as the teacher declares), or the path of a JSON spec file."""
    if value in PRESETS:
        if interpolation not in INTERPOLATIONS:
            raise ConfigError(
                f"the teacher declares interpolation {interpolation!r}, which augmentation preset {value!r} would copy "
                f"into the spec's interpolation field; expected one of {', '.join(INTERPOLATIONS)} (the ones replay "
                "reproduces): give a JSON spec file (--augmentation FILE) with one of them"
            )
        return preset(value, output_size=output_size, mean=mean, std=std, interpolation=interpolation)
    path = Path(value)
    if not path.is_file():
        raise ConfigError(f"augmentation {value!r} is neither a preset ({', '.join(PRESETS)}) nor a spec file")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"augmentation spec file {path}: cannot read JSON: {exc}") from None
    return AugSpec.from_dict(data)


def cache_spec(manifest) -> AugSpec:
    """A cache's augmentation spec (its manifest's ``augmentation``); its parameter columns must be the manifest's."""
    spec = AugSpec.from_dict(manifest.augmentation)
    if list(param_fields(spec)) != manifest.param_fields:
        raise FormatError(f"manifest: field param_fields = {manifest.param_fields}, but the augmentation spec stores "
                          f"{list(param_fields(spec))}; the manifest was edited or damaged")
    return spec


def param_fields(spec: AugSpec) -> tuple[str, ...]:
    """Names of the stored parameter columns for views of this spec, in order."""
    names = ["crop_top", "crop_left", "crop_height", "crop_width", "flip"]
    if spec.color_jitter > 0:
        names += ["jitter_brightness", "jitter_contrast", "jitter_saturation"]
    for slot in range(spec.randaug_n):
        names += [f"ra{slot}_op", f"ra{slot}_mag", f"ra{slot}_neg"]
    if spec.erase_prob > 0:
        names += ["erase", "erase_top", "erase_left", "erase_height", "erase_width"]
    if spec.mixes:
        names += ["mix_partner", "mix_lam", "mix_top", "mix_left", "mix_bottom", "mix_right"]
    return tuple(names)


def param_columns(spec: AugSpec) -> dict[str, int]:
    """The column of each stored parameter field (:func:`param_fields`) in a parameter row."""
    return {name: i for i, name in enumerate(param_fields(spec))}


def randaug_call(spec: AugSpec, row: np.ndarray, cols: dict[str, int], slot: int, hparams: dict, size: int):
    """(op name, argument) of a RandAugment slot, or None when the op was not applied.

    The argument comes from timm's level function at the stored magnitude and sign, with the
    spec's hparams (its ``output_size`` sets ``translate_const``). Posterize keeps at least 1 bit
    (timm's level function gives 0 bits below magnitude 2.5, which Pillow refuses). At another
    ``size``, the absolute translations (``TranslateX``, ``TranslateY``: pixels of ``output_size``)
    are scaled to move the image by the same fraction; every other op's argument is free of the
    size (angles, shear factors, fractions of the width, colour factors).
    """
    op_id = int(row[cols[f"ra{slot}_op"]])
    if op_id < 0:
        return None
    name = spec.randaug_ops[op_id]
    arg = op_argument(name, float(row[cols[f"ra{slot}_mag"]]), hparams, negate=bool(row[cols[f"ra{slot}_neg"]] > 0.5))
    if name.startswith("Posterize") and arg is not None:
        arg = max(1, arg)
    if name in ("TranslateX", "TranslateY") and size != spec.output_size:
        arg = arg * size / spec.output_size
    return name, arg


def view_generator(seed: int, epoch: int, sample_id: int, stream: int = _STREAM_VIEW) -> np.random.Generator:
    """The counter-based generator of one view: Philox keyed by (seed, epoch, sample, stream)."""
    return np.random.Generator(np.random.Philox(np.random.SeedSequence([seed, epoch, sample_id, stream])))


def sample_crop(rng: np.random.Generator, spec: AugSpec, height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the crop in source pixels."""
    if spec.crop == "center":
        h = max(1, int(round(height * spec.crop_pct)))
        w = max(1, int(round(width * spec.crop_pct)))
        return (height - h) // 2, (width - w) // 2, h, w
    # timm RandomResizedCropAndInterpolation.get_params, drawn from the view's generator.
    area = height * width
    log_ratio = (math.log(spec.crop_ratio[0]), math.log(spec.crop_ratio[1]))
    for _ in range(10):
        target_area = rng.uniform(*spec.crop_scale) * area
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(spec.crop_ratio):
        w, h = width, int(round(width / min(spec.crop_ratio)))
    elif in_ratio > max(spec.crop_ratio):
        h, w = height, int(round(height * max(spec.crop_ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def randaug_hparams(spec: AugSpec) -> dict:
    """The hparams timm's ``create_transform`` gives RandAugment: fill colour from the mean, translate 45%."""
    from timm.data.auto_augment import _HPARAMS_DEFAULT

    hparams = dict(_HPARAMS_DEFAULT)
    hparams["img_mean"] = tuple(min(255, int(round(255 * m))) for m in spec.mean)
    hparams["translate_const"] = int(spec.output_size * 0.45)
    return hparams


class _FixedDraw:
    """Stands in for the ``random`` module inside timm's level functions: its one draw is fixed."""

    def __init__(self, value: float):
        self.value = value

    def random(self) -> float:
        return self.value


_LEVEL_LOCK = threading.Lock()


def op_argument(op: str, magnitude: float, hparams: dict, *, negate: bool = False):
    """The argument timm's level function gives ``op`` at ``magnitude``, with its random sign fixed.

    timm's level functions draw the sign from the global ``random`` module (``_randomly_negate``);
    kdcache draws it from the view's generator, stores it, and has timm's own function compute
    the argument with that sign (so ``*Increasing`` ops, whose sign acts inside a ``max``, are exact).
    """
    from timm.data import auto_augment

    level_fn = auto_augment.LEVEL_TO_ARG[op]
    if level_fn is None:
        return None
    with _LEVEL_LOCK:
        saved = auto_augment.random
        auto_augment.random = _FixedDraw(1.0 if negate else 0.0)  # `random.random() > 0.5` negates
        try:
            (arg,) = level_fn(float(magnitude), hparams)
        finally:
            auto_augment.random = saved
    return arg


def _sample_randaug(rng: np.random.Generator, spec: AugSpec) -> list[float]:
    out: list[float] = []
    for _ in range(spec.randaug_n):
        op_id = int(rng.integers(0, len(spec.randaug_ops)))
        applied = rng.uniform() <= spec.randaug_prob
        magnitude = rng.normal(spec.randaug_m, spec.randaug_mstd) if spec.randaug_mstd > 0 else spec.randaug_m
        magnitude = min(max(float(magnitude), 0.0), 10.0)
        negate = rng.uniform() > 0.5
        out += [float(op_id), magnitude, 1.0 if negate else 0.0] if applied else [-1.0, 0.0, 0.0]
    return out


def _sample_erase(rng: np.random.Generator, spec: AugSpec) -> list[float]:
    size = spec.output_size
    applied = rng.uniform() < spec.erase_prob
    log_ratio = (math.log(spec.erase_ratio[0]), math.log(spec.erase_ratio[1]))
    for _ in range(10):
        target_area = rng.uniform(*spec.erase_scale) * size * size
        aspect = math.exp(rng.uniform(*log_ratio))
        h = int(round(math.sqrt(target_area * aspect)))
        w = int(round(math.sqrt(target_area / aspect)))
        if h < size and w < size:
            top = int(rng.integers(0, size - h + 1))
            left = int(rng.integers(0, size - w + 1))
            return [1.0 if applied else 0.0, top, left, h, w]
    return [0.0, 0.0, 0.0, 0.0, 0.0]


def _sample_mix(rng: np.random.Generator, spec: AugSpec, partner: int) -> list[float]:
    size = spec.output_size
    lam = float(rng.beta(spec.mix_alpha, spec.mix_alpha))
    if rng.uniform() >= spec.mix_prob or partner < 0:
        return [-1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    if spec.mix == "mixup":
        return [float(partner), lam, 0.0, 0.0, 0.0, 0.0]
    # timm.data.mixup.rand_bbox + correct_lam
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(size * ratio), int(size * ratio)
    cy, cx = int(rng.integers(0, size)), int(rng.integers(0, size))
    top, bottom = int(np.clip(cy - cut_h // 2, 0, size)), int(np.clip(cy + (cut_h + 1) // 2, 0, size))
    left, right = int(np.clip(cx - cut_w // 2, 0, size)), int(np.clip(cx + (cut_w + 1) // 2, 0, size))
    lam = 1.0 - (bottom - top) * (right - left) / float(size * size)
    return [float(partner), lam, top, left, bottom, right]


def mix_partners(seed: int, epoch: int, block_id: int, n: int) -> np.ndarray:
    """Partner position (within the block) of each position: a seeded pairing, -1 for an odd one out."""
    order = view_generator(seed, epoch, block_id, _STREAM_PAIRS).permutation(n)
    partners = np.full(n, -1, dtype=np.int64)
    partners[order[0:-1:2]] = order[1::2]
    partners[order[1::2]] = order[0:-1:2]
    return partners


def sample_view_params(
    spec: AugSpec,
    *,
    seed: int,
    epoch: int,
    block_id: int,
    sample_ids: np.ndarray,
    image_sizes: list[tuple[int, int]],
) -> np.ndarray:
    """Parameters ``float32 [n, len(param_fields(spec))]`` of the views of one block in one epoch.

    ``sample_ids`` are the samples' stable ids (source positions); ``image_sizes`` their (height, width).
    """
    n = len(sample_ids)
    partners = mix_partners(seed, epoch, block_id, n) if spec.mixes else None
    rows = []
    for pos in range(n):
        rng = view_generator(seed, epoch, int(sample_ids[pos]))
        height, width = image_sizes[pos]
        row: list[float] = list(sample_crop(rng, spec, height, width))
        row.append(1.0 if rng.uniform() < spec.hflip else 0.0)
        if spec.color_jitter > 0:
            lo, hi = max(0.0, 1 - spec.color_jitter), 1 + spec.color_jitter
            row += [float(rng.uniform(lo, hi)) for _ in range(3)]
        row += _sample_randaug(rng, spec)
        if spec.erase_prob > 0:
            row += _sample_erase(rng, spec)
        if spec.mixes:
            row += _sample_mix(rng, spec, int(partners[pos]))
        rows.append(row)
    params = np.asarray(rows, dtype=np.float32).reshape(n, len(param_fields(spec)))
    return params


def partner_positions(spec: AugSpec, params: np.ndarray, positions) -> np.ndarray:
    """The block positions of the mix partners of the views at ``positions`` (none without mixing).

    Safe on parameters not yet checked: a stored partner that is not a position of the block is
    left out here, and :func:`check_view_params` names it.
    """
    if not spec.mixes:
        return np.zeros(0, dtype=np.int64)
    partners = np.asarray(params, dtype=np.float64)[np.asarray(positions, dtype=np.int64), param_fields(spec).index("mix_partner")]
    inside = np.isfinite(partners) & (partners == np.floor(partners)) & (partners >= 0) & (partners < len(params))
    return np.unique(partners[inside].astype(np.int64))


def check_view_params(spec: AugSpec, params: np.ndarray, *, image_sizes, block_size: int, where: str) -> None:
    """Refuse stored parameters that :func:`sample_view_params` cannot give for ``spec``, before any replay.

    ``params`` are one block's stored parameters ``[block_size, len(param_fields(spec))]`` for one
    epoch; ``image_sizes`` the (height, width) of the block's images in block order, or None for an
    image not decoded (its crop box is then checked for everything but the image's bounds: such a
    view must not be replayed). Every column is checked, vectorised over the block: finite; whole
    numbers where the sampler gives them; crop boxes of positive size inside the image; flags 0 or 1;
    jitter factors, RandAugment op ids and magnitudes in the spec's ranges; erase and cutmix boxes
    inside the output; a mix partner inside the block (not the view itself) and lam in [0, 1].
    Checksums cannot tell forged parameters from real ones; this keeps them from crashing a replay
    or allocating huge images. Raises :class:`FormatError` naming ``where`` (e.g. the cache, epoch
    and block), the first bad view's position, the field and its value.
    """
    fields = param_fields(spec)
    params = np.asarray(params)
    if params.shape != (block_size, len(fields)):
        raise FormatError(f"{where}: stored parameters have shape {params.shape}; expected ({block_size}, {len(fields)}) "
                          f"for {block_size} views and the spec's param_fields")
    if len(image_sizes) != block_size:
        raise ValueError(f"{len(image_sizes)} image sizes for a block of {block_size} views")
    with np.errstate(all="ignore"):  # NaN and infinities are what is looked for: no warnings
        _check_columns(spec, params, fields, image_sizes, block_size, where)


def _check_columns(spec: AugSpec, params: np.ndarray, fields: tuple[str, ...], image_sizes, block_size: int, where: str) -> None:
    x = {name: params[:, i].astype(np.float64) for i, name in enumerate(fields)}
    hw = np.array([(np.inf, np.inf) if s is None else s for s in image_sizes], dtype=np.float64).reshape(block_size, 2)
    size = float(spec.output_size)
    checks: list[tuple[str, np.ndarray, object]] = []  # (field, good rows, expected(row) -> text), in column order

    def whole(name: str, lo, hi, note="", good=True) -> None:
        """Whole numbers in [lo, hi] (per row); ``note`` a text, or a function of the row giving one."""
        v = x[name]
        lo, hi = np.broadcast_to(lo, v.shape), np.broadcast_to(hi, v.shape)
        ok = np.isfinite(v) & (v == np.floor(v)) & (v >= lo) & (v <= hi) & good
        checks.append((name, ok, lambda r: (f"a whole number in [{lo[r]:g}, {hi[r]:g}]" if np.isfinite(hi[r])
                                            else f"a whole number >= {lo[r]:g}") + (note if isinstance(note, str) else note(r))))

    def number(name: str, lo: float, hi: float) -> None:
        v = x[name]
        checks.append((name, np.isfinite(v) & (v >= lo) & (v <= hi), lambda r: f"a number in [{lo:.6g}, {hi:.6g}]"))

    def flag(name: str) -> None:
        checks.append((name, (x[name] == 0) | (x[name] == 1), lambda r: "0 or 1"))

    def image(r: int) -> str:
        return f" (the image is {hw[r, 0]:g}x{hw[r, 1]:g})" if np.isfinite(hw[r, 0]) else " (image not decoded)"

    output = f" (inside the {spec.output_size}x{spec.output_size} output)"
    whole("crop_top", 0, hw[:, 0] - 1, image)
    whole("crop_left", 0, hw[:, 1] - 1, image)
    whole("crop_height", 1, hw[:, 0] - x["crop_top"], image)
    whole("crop_width", 1, hw[:, 1] - x["crop_left"], image)
    flag("flip")
    if spec.color_jitter > 0:
        lo, hi = float(np.float32(max(0.0, 1 - spec.color_jitter))), float(np.float32(1 + spec.color_jitter))
        for name in ("jitter_brightness", "jitter_contrast", "jitter_saturation"):
            number(name, lo, hi)
    fixed = float(np.float32(spec.randaug_m))
    for slot in range(spec.randaug_n):
        op, mag = x[f"ra{slot}_op"], x[f"ra{slot}_mag"]
        whole(f"ra{slot}_op", -1, len(spec.randaug_ops) - 1,
              f" (-1: not applied, else one of the spec's {len(spec.randaug_ops)} RandAugment ops)")
        in_range = (mag >= 0) & (mag <= 10) & ((spec.randaug_mstd > 0) | (mag == fixed))
        checks.append((f"ra{slot}_mag", np.where(op >= 0, in_range, mag == 0), lambda r, op=op: (
            "0 (the op is not applied)" if op[r] < 0 else "a magnitude in [0, 10]" if spec.randaug_mstd > 0
            else f"the spec's magnitude {fixed:g} (randaug_mstd is 0)")))
        flag(f"ra{slot}_neg")
    if spec.erase_prob > 0:
        flag("erase")
        whole("erase_top", 0, size, output)
        whole("erase_left", 0, size, output)
        whole("erase_height", 0, size - x["erase_top"], output)
        whole("erase_width", 0, size - x["erase_left"], output)
    if spec.mixes:
        whole("mix_partner", -1, block_size - 1, " (-1: no partner, else another view's position in this block)",
              good=x["mix_partner"] != np.arange(block_size))
        number("mix_lam", 0.0, 1.0)
        whole("mix_top", 0, size, output)
        whole("mix_left", 0, size, output)
        whole("mix_bottom", x["mix_top"], size, output)
        whole("mix_right", x["mix_left"], size, output)
    first, bad_views = None, np.zeros(block_size, dtype=bool)
    for name, good, expected in checks:
        bad = np.flatnonzero(~good)
        if len(bad):
            bad_views[bad] = True
            if first is None or bad[0] < first[0]:
                first = (int(bad[0]), name, expected)
    if first is None:
        return
    row, name, expected = first
    others = int(bad_views.sum()) - 1
    raise FormatError(
        f"{where}, view at position {row}: stored parameter {name} = {params[row, fields.index(name)]:.6g}; "
        f"expected {expected(row)}" + (f"; {others} more view(s) of this block are out of range" if others else "")
        + "; the cache's parameters were not drawn from its augmentation spec (forged, or damaged before they were "
        "committed): do not train on it; kdcache verify names every such view"
    )


def spec_field(spec: AugSpec, params: np.ndarray, name: str) -> np.ndarray:
    """One named column of a parameter array."""
    return params[..., param_fields(spec).index(name)]
