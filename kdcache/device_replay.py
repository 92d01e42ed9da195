"""The ``device`` replay path: a whole batch of views replayed on one device in batched tensor ops.

The ``pil`` and ``tensor`` paths replay one image at a time on the host, in DataLoader workers.
This path takes the decoded images already on the device (CUDA, or CPU tensors: the same code)
and replays every view of a batch there, so images never make a round trip through the host:

1. the resized crop, one call per image (every view has its own box and source size), with the
   spec's interpolation and antialiasing, as the ``tensor`` path does; then the views are one
   ``[n, 3, S, S]`` uint8 batch;
2. flip, colour jitter and every RandAugment op on the whole batch at once, each view with its
   own factor: views are grouped by op, and each group is one batched call.

**Exact for itself.** A view's pixels depend on its own parameters and image only, never on the
other views of its batch: every float operation is a separate elementwise tensor op (no fused
multiply-add whose use could change with a view's place in memory), sums of pixels are exact
(integers in float64), and RandAugment's blur is integer arithmetic. So the teacher's views in
precompute's blocks and the student's views in shuffled training batches are the same tensors.
The ops compute what torchvision's ``transforms.v2`` ops compute (the ``tensor`` path); they
differ from them only where torchvision fuses a multiply and an add, by at most one level in
rare pixels (tests/test_device_replay.py measures it). Pixels on CUDA and on the CPU differ
slightly (interpolation kernels, the JPEG decoder), so a cache records the device it ran on.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from kdcache.augment import AugSpec, param_columns, randaug_call, randaug_hparams

#: Ops whose pixels move: replayed in one batched grid sample per op.
AFFINE_OPS = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel")


def _per_view(values, like: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Per-view scalars as a ``[m, 1, 1, 1]`` tensor on ``like``'s device."""
    return torch.as_tensor(np.asarray(values, dtype=np.float64), dtype=dtype, device=like.device).view(-1, 1, 1, 1)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.clamp_(0, 255).to(torch.uint8)


def blend(image: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """``image * ratio + other * (1 - ratio)`` per view, clamped and truncated to uint8 (torchvision's ``_blend``)."""
    return _to_uint8(image.float() * ratio + other * (1.0 - ratio))


def grayscale(image: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of uint8 RGB views, floored: float32 ``[m, 1, S, S]`` (torchvision's weights)."""
    x = image.float()
    luma = x[:, 0:1] * 0.2989 + x[:, 1:2] * 0.587
    return (luma + x[:, 2:3] * 0.114).floor_()


def brightness(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _to_uint8(image.float() * factor)


def contrast(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    gray = grayscale(image)
    mean = (gray.double().sum(dim=(-3, -2, -1), keepdim=True) / gray[0].numel()).float()  # exact sums: any batch
    return blend(image, mean, factor)


def saturation(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return blend(image, grayscale(image), factor)


def sharpness(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's SMOOTH kernel (1s around a 5, over 13), rounded, blended inside a one-pixel border."""
    if image.shape[-1] <= 2 or image.shape[-2] <= 2:
        return image
    x = image.to(torch.int32)
    total = 4 * x[..., 1:-1, 1:-1]
    for dy in range(3):
        for dx in range(3):
            total = total + x[..., dy : dy + x.shape[-2] - 2, dx : dx + x.shape[-1] - 2]
    blurred = torch.div(2 * total + 13, 26, rounding_mode="floor").float()  # round(total / 13): never a half
    inner = image[..., 1:-1, 1:-1].float()
    out = image.clone()
    out[..., 1:-1, 1:-1] = _to_uint8(inner + (blurred - inner) * (1.0 - factor))
    return out


def posterize(image: torch.Tensor, bits: np.ndarray) -> torch.Tensor:
    bits = np.clip(np.asarray(bits, dtype=np.int64), 0, 8)
    masks = ((1 << bits) - 1) << (8 - bits)
    return image & torch.as_tensor(masks.astype(np.uint8), device=image.device).view(-1, 1, 1, 1)


def solarize(image: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    return torch.where(image >= threshold, image.bitwise_not(), image)


def solarize_add(image: torch.Tensor, added: np.ndarray) -> torch.Tensor:
    plus = (image.int() + _per_view(np.asarray(added, dtype=np.int64), image, torch.int32)).clamp(max=255).to(torch.uint8)
    return torch.where(image < 128, plus, image)


def _inverse_matrix(name: str, arg: float, size: int) -> list[float] | None:
    """The inverse affine matrix torchvision's tensor ``rotate``/``affine`` would build for this op, or None for
    a rotation torchvision replays exactly (0, 90, 180 or 270 degrees)."""
    from torchvision.transforms.functional import _get_inverse_affine_matrix

    if name == "Rotate":
        angle = arg % 360
        if angle in (0, 90, 180, 270):
            return None
        return _get_inverse_affine_matrix([0.0, 0.0], -angle, [0.0, 0.0], 1.0, [0.0, 0.0])
    if name in ("ShearX", "ShearY"):
        degrees = math.degrees(math.atan(arg))
        shear = [degrees, 0.0] if name == "ShearX" else [0.0, degrees]
        return _get_inverse_affine_matrix([-size * 0.5, -size * 0.5], 0.0, [0.0, 0.0], 1.0, shear)
    pixels = arg * size if name.endswith("Rel") else arg
    translate = [-float(pixels), 0.0] if name.startswith("TranslateX") else [0.0, -float(pixels)]
    return _get_inverse_affine_matrix([0.0, 0.0], 0.0, translate, 1.0, [0.0, 0.0])


def affine(image: torch.Tensor, name: str, args: list[float], fill: list[float], mode: str) -> torch.Tensor:
    """One affine RandAugment op on every view, each with its own argument: one batched ``grid_sample``.

    The grid is torchvision's (pixel centres, the matrix rescaled to [-1, 1]), computed with one
    elementwise op per term; the fill colour enters through a mask channel, as in torchvision.
    """
    size = image.shape[-1]
    out = image.clone()
    matrices = [_inverse_matrix(name, float(a), size) for a in args]
    exact = [i for i, m in enumerate(matrices) if m is None]
    for i in exact:  # quarter turns are transposes, as in torchvision
        out[i] = torch.rot90(image[i], k=int(float(args[i]) % 360) // 90, dims=(-2, -1))
    moved = [i for i, m in enumerate(matrices) if m is not None]
    if not moved:
        return out
    theta = torch.tensor([matrices[i] for i in moved], dtype=torch.float64).view(-1, 2, 3)
    theta = (theta / torch.tensor([0.5 * size, 0.5 * size], dtype=torch.float64).view(1, 2, 1)).float().to(image.device)
    steps = torch.linspace((1.0 - size) * 0.5, (size - 1.0) * 0.5, steps=size, device=image.device)
    xs, ys = steps.view(1, 1, size), steps.view(1, size, 1)
    grid_x = xs * theta[:, 0, 0].view(-1, 1, 1) + ys * theta[:, 0, 1].view(-1, 1, 1)
    grid_y = xs * theta[:, 1, 0].view(-1, 1, 1) + ys * theta[:, 1, 1].view(-1, 1, 1)
    grid = torch.stack([grid_x + theta[:, 0, 2].view(-1, 1, 1), grid_y + theta[:, 1, 2].view(-1, 1, 1)], dim=-1)
    rows = torch.as_tensor(moved, device=image.device)
    source = image.index_select(0, rows).float()
    source = torch.cat([source, torch.ones_like(source[:, :1])], dim=1)
    sampled = torch.nn.functional.grid_sample(source, grid, mode=mode, padding_mode="zeros", align_corners=False)
    pixels, mask = sampled[:, :3], sampled[:, 3:].expand(-1, 3, -1, -1)
    fill_image = torch.tensor(fill, dtype=torch.float32, device=image.device).view(1, 3, 1, 1)
    if mode == "nearest":
        pixels = torch.where(mask < 0.5, fill_image.expand_as(pixels), pixels)
    else:
        pixels = (pixels - fill_image) * mask + fill_image
    out[rows] = pixels.round_().to(torch.uint8)
    return out


def _randaug_group(name: str, image: torch.Tensor, args: list, fill: list[float], mode: str) -> torch.Tensor:
    """One RandAugment op on a group of views, each with its own argument (what ``replay._tensor_op`` does per view)."""
    import torchvision.transforms.v2.functional as F

    if name == "AutoContrast":
        return F.autocontrast(image)
    if name == "Equalize":
        return F.equalize(image)
    if name == "Invert":
        return image.bitwise_not()
    if name.startswith("Posterize"):
        return posterize(image, [int(a) if a < 8 else 8 for a in args])
    if name.startswith("SolarizeAdd"):
        return solarize_add(image, [int(a) for a in args])
    if name.startswith("Solarize"):
        return solarize(image, _per_view(args, image))
    if name.startswith("Color"):
        return saturation(image, _per_view(args, image))
    if name.startswith("Contrast"):
        return contrast(image, _per_view(args, image))
    if name.startswith("Brightness"):
        return brightness(image, _per_view(args, image))
    if name.startswith("Sharpness"):
        return sharpness(image, _per_view(args, image))
    if name in AFFINE_OPS:
        return affine(image, name, args, fill, mode)
    from kdcache.errors import ConfigError

    raise ConfigError(f"RandAugment op {name!r} has no device-path replay; use --replay-path pil")


def replay_on_device(spec: AugSpec, rows: np.ndarray, images: list[torch.Tensor], *, size: int,
                     affine_interpolation: str) -> torch.Tensor:
    """The uint8 stage of views ``[n, 3, size, size]`` from their parameter rows and decoded uint8 images.

    ``images[i]`` is view ``i``'s decoded RGB image ``[3, H, W]`` on the device the replay runs on.
    ``affine_interpolation``: what RandAugment's affine ops resample with (nearest or bilinear).
    """
    import torchvision.transforms.v2.functional as F
    from torchvision.transforms import InterpolationMode

    cols = param_columns(spec)
    rows = np.asarray(rows)
    interpolation = InterpolationMode(spec.interpolation)
    crops = rows[:, [cols["crop_top"], cols["crop_left"], cols["crop_height"], cols["crop_width"]]].astype(np.int64)
    x = torch.stack([F.resized_crop(img, int(t), int(l), int(h), int(w), [size, size], interpolation, antialias=True)
                     for img, (t, l, h, w) in zip(images, crops)])
    flip = torch.as_tensor(rows[:, cols["flip"]] > 0.5, device=x.device).view(-1, 1, 1, 1)
    x = torch.where(flip, x.flip(-1), x)
    if spec.color_jitter > 0:
        x = brightness(x, _per_view(rows[:, cols["jitter_brightness"]], x))
        x = contrast(x, _per_view(rows[:, cols["jitter_contrast"]], x))
        x = saturation(x, _per_view(rows[:, cols["jitter_saturation"]], x))
    if spec.randaug_n:
        hparams = randaug_hparams(spec)
        fill = [float(v) for v in hparams["img_mean"]]
        for slot in range(spec.randaug_n):
            groups: dict[str, tuple[list[int], list]] = {}
            for i, row in enumerate(rows):
                op = randaug_call(spec, row, cols, slot, hparams, size)
                if op is not None:
                    views, args = groups.setdefault(op[0], ([], []))
                    views.append(i)
                    args.append(op[1])
            for name, (views, args) in groups.items():
                index = torch.as_tensor(views, device=x.device)
                x[index] = _randaug_group(name, x.index_select(0, index), args, fill, affine_interpolation)
    return x
