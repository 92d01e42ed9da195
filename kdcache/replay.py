"""Replay: rebuild a view's tensor from its stored augmentation parameters.

``replay`` is a pure, deterministic function of (spec, stored parameters, decoded images);
precompute, train-student and verify all call this module, so the student sees the very
tensor the teacher scored. Two paths:

- ``pil`` (reference, CPU): timm's and torchvision's PIL functional ops, exactly what timm's
  own transforms do with the same parameters.
- ``tensor`` (batched-friendly, any device): torchvision ``transforms.v2.functional`` ops on
  uint8 tensors; pixels differ from ``pil`` by interpolation details, which `kdcache verify`
  measures against the teacher. The resized crop uses the spec's interpolation; torchvision's
  tensor affine ops (RandAugment's Rotate, Shear and Translate) have no bicubic, so there a
  bicubic spec is replayed bilinear (:data:`TENSOR_AFFINE_INTERPOLATION`, recorded in the
  fingerprint).

The path and the versions of the libraries that shape the pixels are recorded in the cache
(:func:`replay_fingerprint`).

**Another size.** Every function takes ``size`` (default: the spec's ``output_size``), the side
of the views to make. A view replayed at another size is the same view: the same crop region of
the source image resized to ``size``, the same flip, jitter and RandAugment ops at the same
magnitudes, the same mix partner and weight, and erase and cutmix boxes at the same relative
place (their stored edges, in pixels of ``output_size``, scaled by :func:`scale_edge`). Only the
pixels differ: they are a resampling at ``size``, not the pixels the teacher saw. At
``output_size`` every value is the stored one, so the views are exactly the teacher's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from kdcache.augment import AugSpec, op_argument, param_fields, randaug_hparams
from kdcache.errors import ConfigError

PATHS = ("pil", "tensor")

#: The interpolation the tensor path's affine ops (Rotate, ShearX/Y, Translate*) use for each
#: interpolation a spec may declare: torchvision's tensor affine has nearest and bilinear only.
TENSOR_AFFINE_INTERPOLATION = {"nearest": "nearest", "bilinear": "bilinear", "bicubic": "bilinear"}


def replay_fingerprint(path: str) -> dict:
    """What determines the replayed pixels besides the parameters: the path, its substitutions, library versions."""
    import PIL
    import timm
    import torchvision

    if path not in PATHS:
        raise ConfigError(f"replay path {path!r}; expected one of {', '.join(PATHS)}")
    fingerprint = {
        "path": path,
        "torch": torch.__version__.split("+")[0],
        "torchvision": torchvision.__version__.split("+")[0],
        "timm": timm.__version__,
        "pillow": PIL.__version__,
    }
    if path == "tensor":
        fingerprint["affine_interpolation"] = dict(TENSOR_AFFINE_INTERPOLATION)
    return fingerprint


def scale_edge(edge: int, size: int, output_size: int) -> int:
    """A box edge stored in pixels of ``output_size``, at the same relative place in a ``size`` view.

    ``round(edge * size / output_size)`` with halves rounded up, in integers: exact at
    ``size == output_size``, and a box of edges ``a <= b`` keeps ``a' <= b'`` inside ``[0, size]``.
    """
    return (2 * int(edge) * size + output_size) // (2 * output_size)


def _scaled_box(spec: AugSpec, size: int, top: int, left: int, bottom: int, right: int) -> tuple[int, int, int, int]:
    s = spec.output_size
    return scale_edge(top, size, s), scale_edge(left, size, s), scale_edge(bottom, size, s), scale_edge(right, size, s)


def _columns(spec: AugSpec) -> dict[str, int]:
    return {name: i for i, name in enumerate(param_fields(spec))}


def _interpolation(spec: AugSpec):
    from torchvision.transforms import InterpolationMode

    return InterpolationMode(spec.interpolation)


def _tensor_affine_interpolation(spec: AugSpec):
    from torchvision.transforms import InterpolationMode

    return InterpolationMode(TENSOR_AFFINE_INTERPOLATION[spec.interpolation])


def _pil_base(spec: AugSpec, row: np.ndarray, cols: dict[str, int], img: Image.Image, size: int) -> torch.Tensor:
    import torchvision.transforms.functional as F
    from timm.data.auto_augment import NAME_TO_OP

    top, left, height, width = (int(row[cols[c]]) for c in ("crop_top", "crop_left", "crop_height", "crop_width"))
    img = F.resized_crop(img, top, left, height, width, [size, size], _interpolation(spec))
    if row[cols["flip"]] > 0.5:
        img = F.hflip(img)
    if spec.color_jitter > 0:
        img = F.adjust_brightness(img, float(row[cols["jitter_brightness"]]))
        img = F.adjust_contrast(img, float(row[cols["jitter_contrast"]]))
        img = F.adjust_saturation(img, float(row[cols["jitter_saturation"]]))
    if spec.randaug_n:
        hparams = randaug_hparams(spec)
        kwargs = {"fillcolor": hparams["img_mean"], "resample": _pil_resample(spec)}
        for slot in range(spec.randaug_n):
            op = _randaug_op(spec, row, cols, slot, hparams, size)
            if op is not None:
                name, arg = op
                img = NAME_TO_OP[name](img, **kwargs) if arg is None else NAME_TO_OP[name](img, arg, **kwargs)
    return to_uint8_tensor(img)


def _pil_resample(spec: AugSpec) -> int:
    return {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[spec.interpolation]


def _randaug_op(spec: AugSpec, row: np.ndarray, cols: dict[str, int], slot: int, hparams: dict, size: int):
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


# ---- tensor path -------------------------------------------------------------------------


def _tensor_op(name: str, img: torch.Tensor, arg, fill: list[float], interpolation) -> torch.Tensor:
    import torchvision.transforms.v2.functional as F

    if name == "AutoContrast":
        return F.autocontrast(img)
    if name == "Equalize":
        return F.equalize(img)
    if name == "Invert":
        return F.invert(img)
    if name == "Rotate":
        return F.rotate(img, arg, interpolation=interpolation, fill=fill)
    if name.startswith("Posterize"):
        return F.posterize(img, max(0, min(8, int(arg)))) if arg < 8 else img
    if name.startswith("SolarizeAdd"):
        added = (img.int() + int(arg)).clamp(max=255).to(img.dtype)
        return torch.where(img < 128, added, img)
    if name.startswith("Solarize"):
        return img if arg > 255 else F.solarize(img, float(arg))  # PIL inverts pixels >= threshold: none at 256
    if name.startswith("Color"):
        return F.adjust_saturation(img, arg)
    if name.startswith("Contrast"):
        return F.adjust_contrast(img, arg)
    if name.startswith("Brightness"):
        return F.adjust_brightness(img, arg)
    if name.startswith("Sharpness"):
        return F.adjust_sharpness(img, arg)
    size = img.shape[-1]
    if name in ("ShearX", "ShearY"):
        shear = [math.degrees(math.atan(arg)), 0.0] if name == "ShearX" else [0.0, math.degrees(math.atan(arg))]
        return F.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, interpolation=interpolation, fill=fill, center=[0, 0])
    if name in ("TranslateXRel", "TranslateYRel", "TranslateX", "TranslateY"):
        pixels = arg * size if name.endswith("Rel") else arg
        translate = [-pixels, 0] if name.startswith("TranslateX") else [0, -pixels]
        return F.affine(img, angle=0.0, translate=translate, scale=1.0, shear=[0.0, 0.0], interpolation=interpolation, fill=fill)
    raise ConfigError(f"RandAugment op {name!r} has no tensor-path replay; use --replay-path pil")


def _tensor_base(spec: AugSpec, row: np.ndarray, cols: dict[str, int], img: torch.Tensor, size: int) -> torch.Tensor:
    import torchvision.transforms.v2.functional as F

    interpolation = _interpolation(spec)
    top, left, height, width = (int(row[cols[c]]) for c in ("crop_top", "crop_left", "crop_height", "crop_width"))
    img = F.resized_crop(img, top, left, height, width, [size, size], interpolation, antialias=True)
    if row[cols["flip"]] > 0.5:
        img = F.horizontal_flip(img)
    if spec.color_jitter > 0:
        img = F.adjust_brightness(img, float(row[cols["jitter_brightness"]]))
        img = F.adjust_contrast(img, float(row[cols["jitter_contrast"]]))
        img = F.adjust_saturation(img, float(row[cols["jitter_saturation"]]))
    if spec.randaug_n:
        hparams = randaug_hparams(spec)
        fill = [float(v) for v in hparams["img_mean"]]
        affine = _tensor_affine_interpolation(spec)
        for slot in range(spec.randaug_n):
            op = _randaug_op(spec, row, cols, slot, hparams, size)
            if op is not None:
                img = _tensor_op(op[0], img, op[1], fill, affine)
    return img


def to_uint8_tensor(img: Image.Image, device="cpu") -> torch.Tensor:
    """An RGB PIL image as a uint8 ``[3, H, W]`` tensor on ``device``."""
    array = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous().to(device)


# ---- block-level replay ------------------------------------------------------------------


def _size(spec: AugSpec, size: int | None) -> int:
    if size is None:
        return spec.output_size
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ConfigError(f"view size {size!r}; expected a positive whole number of pixels")
    return size


def replay_uint8(spec: AugSpec, row: np.ndarray, img, *, path: str = "pil", size: int | None = None) -> torch.Tensor:
    """One sample's view up to its pixels: uint8 ``[3, size, size]`` (crop, flip, jitter, RandAugment)."""
    cols, size = _columns(spec), _size(spec, size)
    if path == "pil":
        return _pil_base(spec, row, cols, img, size)
    if path == "tensor":
        if isinstance(img, Image.Image):
            img = to_uint8_tensor(img)
        return _tensor_base(spec, row, cols, img, size)
    raise ConfigError(f"replay path {path!r}; expected one of {', '.join(PATHS)}")


@dataclass
class PendingViews:
    """Views replayed up to their uint8 pixels; normalising, erasing and mixing are still to do.

    The uint8 stage is per sample (PIL or tensor ops); :meth:`materialize` finishes a whole batch
    at once on any device, with the same float32 operations as the CPU path, so moving it to the
    GPU moves a quarter of the bytes and changes no value. ``base`` holds each distinct sample
    view once; output view ``r`` is ``base[own[r]]``, mixed with ``base[partner[r]]`` if
    ``partner[r] >= 0`` as ``view_params[r]`` says.
    """

    base: torch.Tensor
    base_params: np.ndarray
    own: np.ndarray
    partner: np.ndarray
    view_params: np.ndarray

    def __len__(self) -> int:
        return len(self.own)

    def select(self, rows) -> "PendingViews":
        """Only the output views ``rows``, with only the base views they use."""
        rows = np.asarray(rows, dtype=np.int64)
        own, partner = self.own[rows], self.partner[rows]
        used = np.unique(np.concatenate([own, partner[partner >= 0]]))
        remap = np.full(len(self.base_params), -1, dtype=np.int64)
        remap[used] = np.arange(len(used))
        return PendingViews(
            base=self.base[torch.from_numpy(used)], base_params=self.base_params[used], own=remap[own],
            partner=np.where(partner >= 0, remap[np.maximum(partner, 0)], -1), view_params=self.view_params[rows],
        )

    @staticmethod
    def cat(parts: list["PendingViews"]) -> "PendingViews":
        offsets = np.cumsum([0] + [len(p.base_params) for p in parts[:-1]])
        return PendingViews(
            base=torch.cat([p.base for p in parts]),
            base_params=np.concatenate([p.base_params for p in parts]),
            own=np.concatenate([p.own + o for p, o in zip(parts, offsets)]),
            partner=np.concatenate([np.where(p.partner >= 0, p.partner + o, -1) for p, o in zip(parts, offsets)]),
            view_params=np.concatenate([p.view_params for p in parts]),
        )

    def materialize(self, spec: AugSpec, device=None) -> torch.Tensor:
        """float32 ``[m, 3, S, S]`` views: to [0, 1], normalise, erase (per sample), then mix.

        ``S`` is the base views' size: erase and cutmix boxes, stored in pixels of the spec's
        ``output_size``, are scaled to it (:func:`scale_edge`). The spec's ``mean`` and ``std``
        normalise; a spec with only those replaced normalises as another model expects.
        """
        cols = _columns(spec)
        size = int(self.base.shape[-1])
        x = self.base.to(device, non_blocking=True).float()
        mean = torch.tensor(spec.mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(spec.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        x.div_(255).sub_(mean).div_(std)
        if spec.erase_prob > 0:
            for i in np.flatnonzero(self.base_params[:, cols["erase"]] > 0.5):
                top, left, height, width = (int(self.base_params[i, cols[c]])
                                            for c in ("erase_top", "erase_left", "erase_height", "erase_width"))
                top, left, bottom, right = _scaled_box(spec, size, top, left, top + height, left + width)
                x[i, :, top:bottom, left:right] = 0.0
        if np.array_equal(self.own, np.arange(len(self.base_params))):
            out = x if not spec.mixes else x.clone()
        else:
            out = x.index_select(0, torch.from_numpy(self.own).to(x.device))
        if not spec.mixes:
            return out
        mixed = np.flatnonzero(self.partner >= 0)
        if len(mixed) == 0:
            return out
        if spec.mix == "mixup":
            rows = torch.from_numpy(mixed).to(x.device)
            lam = torch.from_numpy(self.view_params[mixed, cols["mix_lam"]].astype(np.float32)).to(x.device).view(-1, 1, 1, 1)
            partner = x.index_select(0, torch.from_numpy(self.partner[mixed]).to(x.device))
            out[rows] = out[rows] * lam + partner * (1.0 - lam)
            return out
        for r in mixed:
            top, left, bottom, right = _scaled_box(spec, size, *(int(self.view_params[r, cols[c]])
                                                                 for c in ("mix_top", "mix_left", "mix_bottom", "mix_right")))
            out[r, :, top:bottom, left:right] = x[int(self.partner[r]), :, top:bottom, left:right]
        return out


def replay_pending(spec: AugSpec, params: np.ndarray, images, *, positions=None, path: str = "pil",
                   size: int | None = None) -> PendingViews:
    """The uint8 stage of the views of a block at ``positions`` (default: all) and of their mix partners.

    ``params`` are the block's stored parameters ``[n, P]`` for one epoch; ``images`` the block's
    decoded images in block order (PIL images for ``pil``; PIL or uint8 tensors for ``tensor``).
    Only the images of the requested views and their partners are touched. ``size``: the views'
    side (default the spec's ``output_size``; see "Another size" above).
    """
    n = params.shape[0]
    positions = np.arange(n) if positions is None else np.asarray(positions, dtype=np.int64)
    cols = _columns(spec)
    partners = params[positions, cols["mix_partner"]].astype(np.int64) if spec.mixes else np.full(len(positions), -1)
    needed = np.unique(np.concatenate([positions, partners[partners >= 0]]))
    index = {int(p): i for i, p in enumerate(needed)}
    base = torch.stack([replay_uint8(spec, params[p], images[int(p)], path=path, size=size) for p in needed])
    return PendingViews(
        base=base, base_params=params[needed], own=np.array([index[int(p)] for p in positions], dtype=np.int64),
        partner=np.array([index[int(p)] if p >= 0 else -1 for p in partners], dtype=np.int64), view_params=params[positions],
    )


def replay_block(spec: AugSpec, params: np.ndarray, images, *, positions=None, path: str = "pil", device=None,
                 size: int | None = None) -> torch.Tensor:
    """Finished views ``[m, 3, S, S]`` (float32, normalised, mixed) of a block at ``positions``; ``S``: ``size``."""
    return replay_pending(spec, params, images, positions=positions, path=path, size=size).materialize(spec, device)


def replay_base(spec: AugSpec, row: np.ndarray, img, *, path: str = "pil", size: int | None = None) -> torch.Tensor:
    """One sample's own view before mixing: float32 ``[3, S, S]``, normalised and erased."""
    pending = PendingViews(base=replay_uint8(spec, row, img, path=path, size=size)[None], base_params=np.asarray(row)[None],
                           own=np.zeros(1, np.int64), partner=np.full(1, -1, np.int64), view_params=np.asarray(row)[None])
    return pending.materialize(spec)[0]


def mix_pair(spec: AugSpec, row: np.ndarray, own: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
    """Mix a finished view with its partner's finished view as the stored parameters say (at the views' size)."""
    cols = _columns(spec)
    if not spec.mixes or int(row[cols["mix_partner"]]) < 0:
        return own
    lam = float(row[cols["mix_lam"]])
    if spec.mix == "mixup":
        return own * lam + partner * (1.0 - lam)
    top, left, bottom, right = _scaled_box(spec, int(own.shape[-1]), *(int(row[cols[c]])
                                                         for c in ("mix_top", "mix_left", "mix_bottom", "mix_right")))
    mixed = own.clone()
    mixed[:, top:bottom, left:right] = partner[:, top:bottom, left:right]
    return mixed


def view_targets(spec: AugSpec, params: np.ndarray, labels: np.ndarray, num_classes: int, positions=None) -> torch.Tensor:
    """Soft targets ``[m, C]`` of views: one-hot, or ``lam*y_i + (1-lam)*y_j`` for mixed views."""
    n = params.shape[0]
    positions = np.arange(n) if positions is None else np.asarray(positions, dtype=np.int64)
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    target = torch.nn.functional.one_hot(labels[positions], num_classes).float()
    if spec.mixes:
        cols = _columns(spec)
        partners = params[positions, cols["mix_partner"]].astype(np.int64)
        lam = torch.as_tensor(params[positions, cols["mix_lam"]], dtype=torch.float32)
        has = torch.as_tensor(partners >= 0)
        partner_labels = labels[np.where(partners >= 0, partners, positions)]
        other = torch.nn.functional.one_hot(partner_labels, num_classes).float()
        lam = torch.where(has, lam, torch.ones_like(lam)).unsqueeze(-1)
        target = lam * target + (1 - lam) * other
    return target
