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

- ``device`` (batched, on the device that runs the model): the images are decoded there
  (``torchvision.io.decode_jpeg``: nvJPEG on CUDA; other formats on the host, counted) and every
  view of a batch is replayed in batched tensor ops (:mod:`kdcache.device_replay`), so no image
  makes a round trip through the host. Its views do not depend on the batch they are replayed in.

The path and the versions of the libraries that shape the pixels are recorded in the cache
(:func:`replay_fingerprint`; for ``device`` also the device type it ran on).

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

from kdcache.augment import AugSpec, param_columns, randaug_call, randaug_hparams
from kdcache.errors import ConfigError
from kdcache.format import REPLAY_PATHS

PATHS = REPLAY_PATHS  # the format lists them; this module replays each

#: The interpolation the tensor path's affine ops (Rotate, ShearX/Y, Translate*) use for each
#: interpolation a spec may declare: torchvision's tensor affine has nearest and bilinear only.
TENSOR_AFFINE_INTERPOLATION = {"nearest": "nearest", "bilinear": "bilinear", "bicubic": "bilinear"}


def replay_fingerprint(path: str, device=None) -> dict:
    """What determines the replayed pixels besides the parameters: the path, its substitutions, library versions.

    ``device``: where the ``device`` path runs (its pixels differ a little between CUDA and the CPU).
    """
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
    if path in ("tensor", "device"):
        fingerprint["affine_interpolation"] = dict(TENSOR_AFFINE_INTERPOLATION)
    if path == "device":
        kind = torch.device(device if device is not None else "cpu").type
        fingerprint["device"] = kind
        fingerprint["decoder"] = "nvjpeg" if kind == "cuda" else "libjpeg-turbo"
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
            op = randaug_call(spec, row, cols, slot, hparams, size)
            if op is not None:
                name, arg = op
                img = NAME_TO_OP[name](img, **kwargs) if arg is None else NAME_TO_OP[name](img, arg, **kwargs)
    return to_uint8_tensor(img)


def _pil_resample(spec: AugSpec) -> int:
    return {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[spec.interpolation]


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
            op = randaug_call(spec, row, cols, slot, hparams, size)
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
    cols, size = param_columns(spec), _size(spec, size)
    if path == "pil":
        return _pil_base(spec, row, cols, img, size)
    if path == "tensor":
        if isinstance(img, Image.Image):
            img = to_uint8_tensor(img)
        return _tensor_base(spec, row, cols, img, size)
    if path == "device":
        from kdcache.device_replay import replay_on_device

        image = to_uint8_tensor(img) if isinstance(img, Image.Image) else img
        return replay_on_device(spec, np.asarray(row)[None], [image], size=size,
                                affine_interpolation=TENSOR_AFFINE_INTERPOLATION[spec.interpolation])[0]
    raise ConfigError(f"replay path {path!r}; expected one of {', '.join(PATHS)}")


class EncodedImages:
    """A block's images as their stored bytes, with headers: the device path decodes them where it replays.

    Indexable like a list of decoded images (item ``p`` is sample ``p``), and
    :meth:`sizes` reads the sizes from the headers, decoding nothing.
    """

    def __init__(self, samples):
        from kdcache.sources import image_header

        self.samples = list(samples)
        self.headers = [image_header(s) for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, position: int):
        return self.samples[position]

    def sizes(self, positions=None) -> list[tuple[int, int] | None]:
        wanted = range(len(self)) if positions is None else {int(p) for p in positions}
        return [(h.height, h.width) if p in wanted else None for p, h in enumerate(self.headers)]


@dataclass
class PendingViews:
    """Views replayed up to their uint8 pixels; normalising, erasing and mixing are still to do.

    The uint8 stage is per sample (PIL or tensor ops); :meth:`materialize` finishes a whole batch
    at once on any device, with the same float32 operations as the CPU path, so moving it to the
    GPU moves a quarter of the bytes and changes no value. ``base`` holds each distinct sample
    view once; output view ``r`` is ``base[own[r]]``, mixed with ``base[partner[r]]`` if
    ``partner[r] >= 0`` as ``view_params[r]`` says.

    On the device path ``base`` is None until :meth:`realize`: ``sources`` then holds each base
    view's image, as a :class:`~kdcache.sources.Sample` still to decode (``headers`` its header)
    or a decoded uint8 tensor, and ``size`` the views' side.
    """

    base: torch.Tensor | None
    base_params: np.ndarray
    own: np.ndarray
    partner: np.ndarray
    view_params: np.ndarray
    sources: list | None = None
    headers: list | None = None
    size: int | None = None

    def __len__(self) -> int:
        return len(self.own)

    def pin_memory(self) -> "PendingViews":
        """For a DataLoader with ``pin_memory``: the uint8 views in page-locked memory."""
        if self.base is not None and not self.base.is_cuda:
            self.base = self.base.pin_memory()
        return self

    def select(self, rows) -> "PendingViews":
        """Only the output views ``rows``, with only the base views they use."""
        rows = np.asarray(rows, dtype=np.int64)
        own, partner = self.own[rows], self.partner[rows]
        used = np.unique(np.concatenate([own, partner[partner >= 0]]))
        remap = np.full(len(self.base_params), -1, dtype=np.int64)
        remap[used] = np.arange(len(used))
        return PendingViews(
            base=None if self.base is None else self.base[torch.from_numpy(used).to(self.base.device)],
            base_params=self.base_params[used], own=remap[own],
            partner=np.where(partner >= 0, remap[np.maximum(partner, 0)], -1), view_params=self.view_params[rows],
            sources=None if self.sources is None else [self.sources[i] for i in used],
            headers=None if self.headers is None else [self.headers[i] for i in used], size=self.size,
        )

    @staticmethod
    def cat(parts: list["PendingViews"]) -> "PendingViews":
        offsets = np.cumsum([0] + [len(p.base_params) for p in parts[:-1]])
        encoded = parts[0].base is None
        return PendingViews(
            base=None if encoded else torch.cat([p.base for p in parts]),
            base_params=np.concatenate([p.base_params for p in parts]),
            own=np.concatenate([p.own + o for p, o in zip(parts, offsets)]),
            partner=np.concatenate([np.where(p.partner >= 0, p.partner + o, -1) for p, o in zip(parts, offsets)]),
            view_params=np.concatenate([p.view_params for p in parts]),
            sources=[s for p in parts for s in p.sources] if encoded else None,
            headers=[h for p in parts for h in p.headers] if encoded else None, size=parts[0].size,
        )

    def realize(self, spec: AugSpec, device=None, counts=None) -> "PendingViews":
        """The device path's uint8 stage, on ``device``: decode what is still encoded, then replay in batched ops.

        ``counts``: a Counter given one per decoded image, by where it was decoded
        (:func:`kdcache.sources.decode_on_device`).
        """
        if self.base is not None:
            return self
        from kdcache.device_replay import replay_on_device
        from kdcache.sources import Sample, decode_on_device

        device = torch.device(device if device is not None else "cpu")
        images = list(self.sources)
        encoded = [i for i, item in enumerate(images) if isinstance(item, Sample)]
        if encoded:
            decoded = decode_on_device([images[i] for i in encoded], [self.headers[i] for i in encoded], device, counts)
            for i, image in zip(encoded, decoded):
                images[i] = image
        images = [image.to(device) for image in images]
        base = replay_on_device(spec, self.base_params, images, size=self.size,
                                affine_interpolation=TENSOR_AFFINE_INTERPOLATION[spec.interpolation])
        return PendingViews(base=base, base_params=self.base_params, own=self.own, partner=self.partner,
                            view_params=self.view_params)

    def materialize(self, spec: AugSpec, device=None, counts=None) -> torch.Tensor:
        """float32 ``[m, 3, S, S]`` views: to [0, 1], normalise, erase (per sample), then mix.

        On the device path, :meth:`realize` first (``counts`` goes to it).

        ``S`` is the base views' size: erase and cutmix boxes, stored in pixels of the spec's
        ``output_size``, are scaled to it (:func:`scale_edge`). The spec's ``mean`` and ``std``
        normalise; a spec with only those replaced normalises as another model expects.
        """
        if self.base is None:
            return self.realize(spec, device, counts).materialize(spec, device)
        cols = param_columns(spec)
        size = int(self.base.shape[-1])
        base = self.base
        if device is not None and torch.device(device).type == "cuda" and not base.is_cuda and not base.is_pinned():
            base = base.pin_memory()  # page-locked, so the copy below does not wait for the host
        x = base.to(device, non_blocking=True).float()
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
    decoded images in block order (PIL images for ``pil``; PIL or uint8 tensors for ``tensor``; for
    ``device``, an :class:`EncodedImages` of the block's samples, or decoded images).
    Only the images of the requested views and their partners are touched. ``size``: the views'
    side (default the spec's ``output_size``; see "Another size" above).
    """
    n = params.shape[0]
    positions = np.arange(n) if positions is None else np.asarray(positions, dtype=np.int64)
    cols = param_columns(spec)
    partners = params[positions, cols["mix_partner"]].astype(np.int64) if spec.mixes else np.full(len(positions), -1)
    needed = np.unique(np.concatenate([positions, partners[partners >= 0]]))
    index = {int(p): i for i, p in enumerate(needed)}
    own = np.array([index[int(p)] for p in positions], dtype=np.int64)
    partner = np.array([index[int(p)] if p >= 0 else -1 for p in partners], dtype=np.int64)
    if path == "device":  # decoded and replayed later, where the views are used (PendingViews.realize)
        sources = [images[int(p)] for p in needed]
        sources = [to_uint8_tensor(item) if isinstance(item, Image.Image) else item for item in sources]
        headers = [images.headers[int(p)] for p in needed] if isinstance(images, EncodedImages) else None
        return PendingViews(base=None, base_params=params[needed], own=own, partner=partner, view_params=params[positions],
                            sources=sources, headers=headers, size=_size(spec, size))
    base = torch.stack([replay_uint8(spec, params[p], images[int(p)], path=path, size=size) for p in needed])
    return PendingViews(base=base, base_params=params[needed], own=own, partner=partner, view_params=params[positions])


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
    cols = param_columns(spec)
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
        cols = param_columns(spec)
        partners = params[positions, cols["mix_partner"]].astype(np.int64)
        lam = torch.as_tensor(params[positions, cols["mix_lam"]], dtype=torch.float32)
        has = torch.as_tensor(partners >= 0)
        partner_labels = labels[np.where(partners >= 0, partners, positions)]
        other = torch.nn.functional.one_hot(partner_labels, num_classes).float()
        lam = torch.where(has, lam, torch.ones_like(lam)).unsqueeze(-1)
        target = lam * target + (1 - lam) * other
    return target
