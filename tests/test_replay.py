"""Replay against timm's own transforms, on digits.

The crop: timm's ``RandomResizedCropAndInterpolation`` (inside ``create_transform``) given the
parameters its ``get_params`` drew must equal kdcache's replay of the same parameters. Random
erasing, the cutmix box, mixup and the soft targets: held against timm's code and the formulas.
A whole strong view (crop, flip, two RandAugment ops, erasing) against the same composition of
timm's transforms. The tensor path: close to the PIL path op by op, with the same signs.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from timm.data import create_transform
from timm.data.auto_augment import AugmentOp
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation

from kdcache import augment
from kdcache.augment import AugSpec, param_fields, preset, randaug_hparams, sample_view_params
from kdcache.replay import mix_pair, replay_base, replay_block, view_targets
from kdcache.sources import decode_sample, open_source

MEAN, STD = (0.5, 0.45, 0.4), (0.25, 0.2, 0.3)
SIZE = 32
KEEP_SEED = next(s for s in range(100) if random.Random(s).random() <= 0.5)
FLIP_SEED = next(s for s in range(100) if random.Random(s).random() > 0.5)


class PythonRandom:
    """kdcache's generator calls answered by Python's ``random`` exactly as timm draws them."""

    def uniform(self, low=0.0, high=1.0):
        return random.uniform(low, high)

    def integers(self, low, high):
        return random.randint(low, high - 1)


def digits(n: int, start: int = 0):
    source = open_source("digits")
    samples = source.read(range(start, start + n))
    return [decode_sample(s) for s in samples], np.array([s.label for s in samples])


def composite(height: int, width: int) -> Image.Image:
    """Three digits as R, G, B, resized to (height, width): a real, coloured, non-square image."""
    images, _ = digits(3, start=10)
    channels = np.stack([np.asarray(img.convert("L")) for img in images], axis=-1)
    return Image.fromarray(channels).resize((width, height), Image.BILINEAR)


def sample_images():
    images, _ = digits(4)
    return images + [composite(40, 24), composite(24, 40), composite(60, 60)]


# ---- the crop and flip against timm's create_transform ---------------------------------------


def timm_crop_flip(interpolation: str, flip: bool, crop):
    """timm's training transform (RRC, flip, ToTensor, Normalize) whose RRC returns ``crop``."""
    pipeline = create_transform(SIZE, is_training=True, hflip=1.0 if flip else 0.0, color_jitter=None,
                                interpolation=interpolation, mean=MEAN, std=STD)
    rrc = pipeline.transforms[0]
    assert isinstance(rrc, RandomResizedCropAndInterpolation)
    rrc.get_params = lambda img, scale, ratio: crop
    return pipeline


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
def test_crop_and_flip_replay_equals_timm_transform(interpolation):
    spec = AugSpec(output_size=SIZE, interpolation=interpolation, mean=MEAN, std=STD, hflip=0.5)
    assert param_fields(spec) == ("crop_top", "crop_left", "crop_height", "crop_width", "flip")
    checked = 0
    for img in sample_images():
        for seed in range(6):
            random.seed(seed)
            crop = RandomResizedCropAndInterpolation.get_params(img, spec.crop_scale, spec.crop_ratio)
            flip = seed % 2 == 1
            row = np.array([*crop, float(flip)], dtype=np.float32)
            want = timm_crop_flip(interpolation, flip, crop)(img)
            got = replay_base(spec, row, img)
            assert got.dtype == torch.float32 and got.shape == (3, SIZE, SIZE)
            assert torch.equal(got, want), (img.size, crop, flip)
            checked += 1
    assert checked == 42


def test_flip_mirrors_the_view():
    spec = AugSpec(output_size=SIZE, mean=MEAN, std=STD, hflip=0.5)
    img = composite(40, 24)
    plain = replay_base(spec, np.array([3, 2, 30, 20, 0], np.float32), img)
    flipped = replay_base(spec, np.array([3, 2, 30, 20, 1], np.float32), img)
    assert torch.equal(flipped, plain.flip(-1)) and not torch.equal(flipped, plain)


def test_none_preset_is_a_centre_crop():
    spec = preset("none", output_size=SIZE, mean=MEAN, std=STD)
    img = composite(40, 24)
    row = sample_view_params(spec, seed=0, epoch=0, block_id=0, sample_ids=np.array([0]), image_sizes=[(40, 24)])[0]
    assert row.tolist() == [2, 1, 35, 21, 0]  # 87.5% of 40 x 24, centred
    want = TF.normalize(TF.to_tensor(TF.resized_crop(img, 2, 1, 35, 21, [SIZE, SIZE], TF.InterpolationMode.BILINEAR)), MEAN, STD)
    assert torch.equal(replay_base(spec, row, img), want)


# ---- random erasing against timm's RandomErasing ----------------------------------------------


def test_erase_draw_and_replay_equal_timm_random_erasing():
    # timm's aspect range (0.3, 1/0.3), so that both draw from the same intervals
    spec = AugSpec(output_size=SIZE, mean=MEAN, std=STD, erase_prob=0.25, erase_ratio=(0.3, 1 / 0.3))
    img = composite(SIZE, SIZE)
    timm_erase = RandomErasing(spec.erase_prob, mode="const", device="cpu")
    applied = 0
    for seed in range(40):
        random.seed(seed)
        fields = augment._sample_erase(PythonRandom(), spec)
        base = np.array([0, 0, SIZE, SIZE, 0] + [0.0] * 5, np.float32)
        clean = replay_base(spec, base, img)
        random.seed(seed)
        want = timm_erase(clean.clone())
        got = replay_base(spec, np.array([0, 0, SIZE, SIZE, 0] + fields, np.float32), img)
        assert torch.equal(got, want), (seed, fields)
        applied += fields[0] == 1.0
        if fields[0] == 1.0:
            _, top, left, h, w = (int(v) for v in fields)
            assert (got[:, top : top + h, left : left + w] == 0).all() and h * w > 0
    assert 4 <= applied <= 20


# ---- a whole strong view against the same composition of timm's transforms --------------------


def test_strong_view_equals_timm_composition():
    # magnitude std 0, so that timm's AugmentOp can be given the magnitude the row's argument came from
    spec = AugSpec(name="strong-m9", output_size=SIZE, mean=MEAN, std=STD, hflip=0.5, randaug_n=2, randaug_m=9.0,
                   randaug_mstd=0.0, erase_prob=0.25, erase_ratio=(0.3, 1 / 0.3))
    images, _ = digits(64)
    params = sample_view_params(spec, seed=1, epoch=0, block_id=0, sample_ids=np.arange(64), image_sizes=[(8, 8)] * 64)
    col = {f: i for i, f in enumerate(param_fields(spec))}
    hparams = dict(randaug_hparams(spec), interpolation=Image.BILINEAR)
    seen_ops, erased, flipped = set(), 0, 0
    for row, img in zip(params, images):
        crop = tuple(int(v) for v in row[:4])
        x = timm_crop_flip("bilinear", bool(row[col["flip"]]), crop).transforms[0](img)
        if row[col["flip"]]:
            x = TF.hflip(x)
            flipped += 1
        for slot in range(spec.randaug_n):
            op_id = int(row[col[f"ra{slot}_op"]])
            if op_id < 0:
                continue
            name = spec.randaug_ops[op_id]
            seen_ops.add(name)
            random.seed(FLIP_SEED if row[col[f"ra{slot}_neg"]] > 0.5 else KEEP_SEED)
            x = AugmentOp(name, prob=1.0, magnitude=float(row[col[f"ra{slot}_mag"]]), hparams=hparams)(x)
        want = TF.normalize(TF.to_tensor(x), MEAN, STD)
        if row[col["erase"]]:
            top, left, h, w = (int(row[col[c]]) for c in ("erase_top", "erase_left", "erase_height", "erase_width"))
            want[:, top : top + h, left : left + w] = 0.0  # timm's RandomErasing, mode "const"
            erased += 1
        assert torch.equal(replay_base(spec, row, img), want), row
    assert len(seen_ops) >= 10 and erased >= 5 and flipped >= 16


# ---- mixing: mixup, cutmix, targets -------------------------------------------------------------


@pytest.fixture(scope="module")
def block():
    images, labels = digits(25)  # an odd block: one view has no partner
    return images, labels


def block_params(name: str, n: int = 25):
    spec = preset(name, output_size=SIZE, mean=MEAN, std=STD)
    params = sample_view_params(spec, seed=0, epoch=1, block_id=3, sample_ids=np.arange(100, 100 + n), image_sizes=[(8, 8)] * n)
    return spec, params


@pytest.mark.parametrize("name", ["funmatch", "cutmix"])
def test_partners_pair_up_within_the_block(name):
    spec, params = block_params(name)
    partner = augment.spec_field(spec, params, "mix_partner").astype(int)
    lam = augment.spec_field(spec, params, "mix_lam")
    alone = np.flatnonzero(partner < 0)
    assert len(alone) == 1 and lam[alone[0]] == 1.0
    paired = np.flatnonzero(partner >= 0)
    assert (partner[partner[paired]] == paired).all() and (partner[paired] != paired).all()
    assert 0.0 <= lam.min() and lam.max() <= 1.0 and lam.std() > 0.1


def test_mixup_view_is_the_lam_weighted_blend(block):
    images, _ = block
    spec, params = block_params("funmatch")
    views = replay_block(spec, params, images)
    partner = augment.spec_field(spec, params, "mix_partner").astype(int)
    lam = augment.spec_field(spec, params, "mix_lam")
    for i in range(len(images)):
        own = replay_base(spec, params[i], images[i])
        if partner[i] < 0:
            assert torch.equal(views[i], own)
            continue
        other = replay_base(spec, params[partner[i]], images[partner[i]])
        want = float(lam[i]) * own + (1.0 - float(lam[i])) * other
        assert torch.equal(views[i], want), i
        assert torch.equal(mix_pair(spec, params[i], own, other), want)


def test_cutmix_view_pastes_the_stored_box(block):
    images, _ = block
    spec, params = block_params("cutmix")
    views = replay_block(spec, params, images)
    col = {f: i for i, f in enumerate(param_fields(spec))}
    pasted = 0
    for i in range(len(images)):
        row = params[i]
        own = replay_base(spec, row, images[i])
        j = int(row[col["mix_partner"]])
        if j < 0:
            assert torch.equal(views[i], own)
            continue
        top, left, bottom, right = (int(row[col[c]]) for c in ("mix_top", "mix_left", "mix_bottom", "mix_right"))
        assert 0 <= top <= bottom <= SIZE and 0 <= left <= right <= SIZE
        assert row[col["mix_lam"]] == np.float32(1.0 - (bottom - top) * (right - left) / SIZE**2)  # timm's correct_lam
        want = own.clone()
        want[:, top:bottom, left:right] = replay_base(spec, params[j], images[j])[:, top:bottom, left:right]
        assert torch.equal(views[i], want), i
        pasted += (bottom - top) * (right - left) > 0
    assert pasted >= 15


@pytest.mark.parametrize("name", ["none", "light", "funmatch", "cutmix"])
def test_targets_are_lam_weighted_one_hots(block, name):
    _, labels = block
    spec, params = block_params(name)
    targets = view_targets(spec, params, labels, 10)
    assert targets.shape == (25, 10) and targets.dtype == torch.float32
    torch.testing.assert_close(targets.sum(-1), torch.ones(25))
    eye = torch.eye(10)
    for i in range(25):
        want = eye[labels[i]].clone()
        if spec.mixes and augment.spec_field(spec, params, "mix_partner")[i] >= 0:
            lam = float(augment.spec_field(spec, params, "mix_lam")[i])
            j = int(augment.spec_field(spec, params, "mix_partner")[i])
            want = lam * eye[labels[i]] + (1 - lam) * eye[labels[j]]
        torch.testing.assert_close(targets[i], want, rtol=0, atol=1e-7)
    some = [3, 0, 24]
    torch.testing.assert_close(view_targets(spec, params, labels, 10, positions=some), targets[some])


def test_replay_of_some_positions_touches_only_them_and_their_partners(block):
    images, _ = block
    spec, params = block_params("cutmix")
    whole = replay_block(spec, params, images)
    partner = augment.spec_field(spec, params, "mix_partner").astype(int)
    wanted = [2, 11, int(np.flatnonzero(partner < 0)[0])]
    needed = set(wanted) | {int(partner[p]) for p in wanted if partner[p] >= 0}
    sparse = [img if i in needed else None for i, img in enumerate(images)]
    assert torch.equal(replay_block(spec, params, sparse, positions=wanted), whole[wanted])


def test_cutmix_box_equals_timm_cutmix_bbox_and_lam():
    from timm.data.mixup import cutmix_bbox_and_lam

    class Fixed:
        def __init__(self, lam):
            self.lam = lam

        def beta(self, a, b):
            return self.lam

        def uniform(self, low=0.0, high=1.0):
            return 0.0

        def integers(self, low, high):
            return int(np.random.randint(low, high))

    spec = preset("cutmix", output_size=SIZE, mean=MEAN, std=STD)
    for seed, lam in enumerate(np.linspace(0.05, 0.95, 19)):
        np.random.seed(seed)
        (yl, yu, xl, xu), timm_lam = cutmix_bbox_and_lam((SIZE, SIZE), float(lam), correct_lam=True)
        np.random.seed(seed)
        _, ours_lam, top, left, bottom, right = augment._sample_mix(Fixed(float(lam)), spec, partner=1)
        assert (top, bottom, left, right) == (yl, yu, xl, xu) and ours_lam == pytest.approx(timm_lam), (seed, lam)


# ---- the tensor path -----------------------------------------------------------------------


@pytest.mark.parametrize("name", augment.DEFAULT_RANDAUG_OPS)
def test_tensor_path_op_is_close_to_pil_with_the_same_sign(name):
    spec = AugSpec(output_size=SIZE, mean=(0.5,) * 3, std=(0.5,) * 3, randaug_n=1, randaug_m=9.0, randaug_mstd=0.0)
    img = composite(SIZE, SIZE)
    op_id = spec.randaug_ops.index(name)
    rows = {sign: np.array([0, 0, SIZE, SIZE, 0, op_id, 9.0, float(sign < 0)], np.float32) for sign in (1, -1)}
    signed = name in ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
    for sign in (1, -1):
        pil = replay_base(spec, rows[sign], img, path="pil")
        tensor = replay_base(spec, rows[sign], img, path="tensor")
        assert tensor.dtype == torch.float32 and tensor.shape == pil.shape
        gap = (pil - tensor).abs().mean().item()
        assert gap < 0.02, f"{name} sign {sign}: mean |pil - tensor| {gap:.4f}"
        if signed:
            opposite = replay_base(spec, rows[-sign], img, path="pil")
            assert gap < 0.2 * (pil - opposite).abs().mean().item(), f"{name}: the tensor path turns the other way"


@pytest.mark.parametrize("name", augment.PRESETS)
def test_tensor_path_views_are_close_to_pil(block, name):
    images, _ = block
    spec, params = block_params(name)
    pil = replay_block(spec, params, images, path="pil")
    tensor = replay_block(spec, params, images, path="tensor")
    assert tensor.shape == pil.shape == (25, 3, SIZE, SIZE)
    gap = (pil - tensor).abs().mean(dim=(1, 2, 3))
    assert gap.max() < 0.15, gap
    if name == "strong":  # RandAugment ops differ in their details (geometric resampling, enhance rounding)
        assert gap.max() > 0


# ---- the same views at another size (a student at its own resolution) ---------------------------------


def manual_view(spec: AugSpec, row: np.ndarray, img: Image.Image, size: int) -> torch.Tensor:
    """Crop, flip and normalise with torchvision's functional ops directly, at ``size``."""
    col = {f: i for i, f in enumerate(param_fields(spec))}
    top, left, height, width = (int(row[col[c]]) for c in ("crop_top", "crop_left", "crop_height", "crop_width"))
    view = TF.resized_crop(img, top, left, height, width, [size, size], TF.InterpolationMode.BILINEAR)
    if row[col["flip"]] > 0.5:
        view = TF.hflip(view)
    x = torch.from_numpy(np.asarray(view.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).float()
    mean, std = torch.tensor(spec.mean).view(3, 1, 1), torch.tensor(spec.std).view(3, 1, 1)
    return x.div_(255).sub_(mean).div_(std)


@pytest.mark.parametrize("name", ["light", "funmatch"])
def test_student_size_view_is_the_same_view_replayed_at_its_size(block, name):
    """A 64 px spec's parameters replayed at 32 px: torchvision's ops at 32 px directly, and a 32 px spec's replay."""
    images, _ = block
    big = preset(name, output_size=64, mean=MEAN, std=STD)
    params = sample_view_params(big, seed=0, epoch=1, block_id=3, sample_ids=np.arange(100, 125), image_sizes=[(8, 8)] * 25)
    views = replay_block(big, params, images, size=32)
    assert views.shape == (25, 3, 32, 32)
    col = {f: i for i, f in enumerate(param_fields(big))}
    for i in range(len(images)):
        want = manual_view(big, params[i], images[i], 32)
        if big.mixes and params[i, col["mix_partner"]] >= 0:
            j, lam = int(params[i, col["mix_partner"]]), float(params[i, col["mix_lam"]])
            want = want * lam + manual_view(big, params[j], images[j], 32) * (1.0 - lam)
        assert torch.equal(views[i], want), i
    small = dataclasses.replace(big, output_size=32)  # drawn at 32 px from the same seed: the same parameters
    np.testing.assert_array_equal(
        sample_view_params(small, seed=0, epoch=1, block_id=3, sample_ids=np.arange(100, 125), image_sizes=[(8, 8)] * 25), params)
    assert torch.equal(replay_block(small, params, images), views)
    assert torch.equal(replay_block(big, params, images, size=64), replay_block(big, params, images))


BOX_COLUMNS = {"cutmix": ("mix_top", "mix_left", "mix_bottom", "mix_right"),
               "strong": ("erase_top", "erase_left", "erase_height", "erase_width")}


def scaled_params(spec: AugSpec, params: np.ndarray, size: int) -> np.ndarray:
    """The box columns as edges scaled to ``size`` (heights and widths as differences of scaled edges)."""
    from kdcache.replay import scale_edge

    col = {f: i for i, f in enumerate(param_fields(spec))}
    out = params.copy()
    for row in out:
        if spec.mixes:
            for c in BOX_COLUMNS["cutmix"]:
                row[col[c]] = scale_edge(int(row[col[c]]), size, spec.output_size)
        if spec.erase_prob > 0:
            top, left, height, width = (int(row[col[c]]) for c in BOX_COLUMNS["strong"])
            t, l = scale_edge(top, size, spec.output_size), scale_edge(left, size, spec.output_size)
            row[col["erase_top"]], row[col["erase_left"]] = t, l
            row[col["erase_height"]] = scale_edge(top + height, size, spec.output_size) - t
            row[col["erase_width"]] = scale_edge(left + width, size, spec.output_size) - l
    return out


@pytest.mark.parametrize("size", [32, 48, 20])
@pytest.mark.parametrize("name", ["cutmix", "strong"])
def test_boxes_at_another_size_are_at_the_same_relative_place(block, name, size):
    images, _ = block
    big = preset(name, output_size=64, mean=MEAN, std=STD)
    params = sample_view_params(big, seed=0, epoch=1, block_id=3, sample_ids=np.arange(100, 125), image_sizes=[(8, 8)] * 25)
    at_size = dataclasses.replace(big, output_size=size)
    want = replay_block(at_size, scaled_params(big, params, size), images)
    assert torch.equal(replay_block(big, params, images, size=size), want)
    assert not torch.equal(replay_block(at_size, params, images), want)  # unscaled boxes would sit elsewhere
    col = {f: i for i, f in enumerate(param_fields(big))}
    for c in BOX_COLUMNS[name][:2]:  # a box stored at 64 px is at the same fraction of a 32 px view, to half a pixel
        edges = params[:, col[c]]
        np.testing.assert_array_less(np.abs(scaled_params(big, params, size)[:, col[c]] - edges * size / 64), 0.5 + 1e-6)


def test_scaled_edges_are_exact_at_the_stored_size_and_stay_in_order():
    from kdcache.replay import scale_edge

    for stored in (7, 32, 64, 224):
        assert [scale_edge(e, stored, stored) for e in range(stored + 1)] == list(range(stored + 1))
        for size in (1, 5, 16, 33, 384):
            edges = [scale_edge(e, size, stored) for e in range(stored + 1)]
            assert edges[0] == 0 and edges[-1] == size and edges == sorted(edges)


def test_absolute_translation_moves_the_same_fraction_at_another_size():
    img = composite(60, 60)
    specs = {s: AugSpec(output_size=s, mean=(0.5,) * 3, std=(0.5,) * 3, randaug_n=1, randaug_m=9.0, randaug_mstd=0.0,
                        randaug_ops=("TranslateX", "TranslateY")) for s in (64, 32)}
    for op_id in (0, 1):
        row = np.array([0, 0, 60, 60, 0, op_id, 9.0, 0.0], np.float32)
        at_32 = replay_base(specs[64], row, img, size=32)
        assert torch.equal(at_32, replay_base(specs[32], row, img))  # 0.45 * 64 * 0.9 px at 64 is 0.45 * 32 * 0.9 px at 32
        assert not torch.equal(at_32, replay_base(specs[64], np.array([0, 0, 60, 60, 0, -1, 0, 0], np.float32), img, size=32))


def test_a_size_that_is_not_a_positive_integer_is_refused(block):
    from kdcache.errors import ConfigError

    images, _ = block
    spec, params = block_params("light")
    for bad in (0, -4, 2.5, True):
        with pytest.raises(ConfigError, match="view size"):
            replay_block(spec, params, images, size=bad)
