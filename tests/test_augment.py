"""The augmentation spec and its parameter sampling, held against timm's own ops and level functions.

RandAugment ops: timm's ``AugmentOp`` (prob 1, fixed magnitude, Python's ``random`` seeded so its
sign draw is known) must give the very image kdcache replays from a row holding the op id and the
signed argument. The generator: any view is drawn alone, in any order, from (seed, epoch, sample).
The spec: every bad value is refused naming its field; a JSON spec file round-trips.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from timm.data.auto_augment import LEVEL_TO_ARG, NAME_TO_OP, AugmentOp

from kdcache import augment
from kdcache.augment import (
    DEFAULT_RANDAUG_OPS,
    PRESETS,
    AugSpec,
    op_argument,
    param_fields,
    preset,
    randaug_hparams,
    resolve_spec,
    sample_view_params,
)
from kdcache.errors import ConfigError
from kdcache.replay import replay_base
from kdcache.sources import decode_sample, open_source

MEAN, STD = (0.5, 0.45, 0.4), (0.25, 0.2, 0.3)
TEACHER = dict(output_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear")

#: Seeds of Python's ``random`` whose first draw makes timm's ``_randomly_negate`` keep / flip the sign.
KEEP_SEED = next(s for s in range(100) if random.Random(s).random() <= 0.5)
FLIP_SEED = next(s for s in range(100) if random.Random(s).random() > 0.5)


def digit_images(n: int) -> list[Image.Image]:
    """The first ``n`` digits of the train split, decoded (8x8 RGB)."""
    source = open_source("digits")
    return [decode_sample(s) for s in source.read(range(n))]


def colour_digit(size: int = 32) -> Image.Image:
    """Three different digits as the R, G, B channels, upscaled: a real image whose colour ops do something."""
    channels = [np.asarray(img.convert("L")) for img in digit_images(3)]
    small = Image.fromarray(np.stack(channels, axis=-1))
    return small.resize((size, size), Image.BILINEAR)


# ---- RandAugment ops against timm's AugmentOp ---------------------------------------------------


def op_spec(magnitude: float) -> AugSpec:
    return AugSpec(output_size=32, mean=MEAN, std=STD, randaug_n=1, randaug_m=magnitude, randaug_mstd=0.0)


def timm_hparams(spec: AugSpec) -> dict:
    """What timm's create_transform gives RandAugment: kdcache's hparams plus the fixed interpolation."""
    return dict(randaug_hparams(spec), interpolation=Image.BILINEAR)


def timm_op_view(name: str, magnitude: float, spec: AugSpec, img: Image.Image, sign_seed: int) -> torch.Tensor:
    op = AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=timm_hparams(spec))
    assert op.magnitude_std == 0
    random.seed(sign_seed)
    out = op(img)
    return TF.normalize(TF.to_tensor(out), MEAN, STD)


def kdcache_op_row(name: str, magnitude: float, spec: AugSpec, sign_seed: int, dtype) -> np.ndarray:
    """A params row: the whole 32x32 image as crop, no flip, the op id, its magnitude and its sign."""
    negate = random.Random(sign_seed).random() > 0.5  # what timm's _randomly_negate draws after random.seed(sign_seed)
    assert param_fields(spec) == ("crop_top", "crop_left", "crop_height", "crop_width", "flip", "ra0_op", "ra0_mag", "ra0_neg")
    return np.array([0, 0, 32, 32, 0, spec.randaug_ops.index(name), magnitude, float(negate)], dtype=dtype)


#: Every timm op with a level function kdcache can replay (the default set and the *Increasing variants).
REPLAYABLE_OPS = sorted(name for name in NAME_TO_OP if name not in augment.UNREPLAYABLE_OPS and name != "Cutout")


def op_spec_for(name: str, magnitude: float) -> AugSpec:
    return AugSpec(output_size=32, mean=MEAN, std=STD, randaug_n=1, randaug_m=magnitude, randaug_mstd=0.0,
                   randaug_ops=(name,))


@pytest.mark.parametrize("magnitude", [9.0, 5.0])
@pytest.mark.parametrize("name", REPLAYABLE_OPS)
def test_stored_row_replays_timm_augment_op_exactly(name, magnitude):
    # the row as a cache holds it (float32), for both of timm's sign draws
    spec, img = op_spec_for(name, magnitude), colour_digit()
    views = {}
    for sign_seed in (KEEP_SEED, FLIP_SEED):
        want = timm_op_view(name, magnitude, spec, img, sign_seed)
        got = replay_base(spec, kdcache_op_row(name, magnitude, spec, sign_seed, np.float32), img)
        assert torch.equal(got, want), f"{name} at {magnitude}, sign seed {sign_seed}: {int((got != want).any(0).sum())} pixels differ"
        views[sign_seed] = got
    if magnitude == 9.0 and name in ("Rotate", "ShearX", "TranslateYRel", "BrightnessIncreasing", "ColorIncreasing"):
        assert not torch.equal(views[KEEP_SEED], views[FLIP_SEED]), f"the sign of {name} made no difference"


def test_default_randaug_ops_change_the_test_image():
    for name in DEFAULT_RANDAUG_OPS:
        if name in ("AutoContrast", "Sharpness"):  # these leave this image alone
            continue
        spec, img = op_spec_for(name, 9.0), colour_digit()
        identity = replay_base(spec, np.array([0, 0, 32, 32, 0, -1, 0.0, 0.0], np.float32), img)
        assert not torch.equal(timm_op_view(name, 9.0, spec, img, KEEP_SEED), identity), f"{name} did nothing"


@pytest.mark.parametrize("name", sorted(name for name, fn in LEVEL_TO_ARG.items() if fn is not None))
def test_op_argument_is_timm_level_function_with_the_sign_fixed(name):
    hparams = randaug_hparams(op_spec(9.0))
    for magnitude in (0.0, 2.5, 5.0, 9.0, 10.0):
        for sign_seed in (KEEP_SEED, FLIP_SEED):
            random.seed(sign_seed)
            (want,) = LEVEL_TO_ARG[name](magnitude, hparams)
            negate = random.Random(sign_seed).random() > 0.5
            assert op_argument(name, magnitude, hparams, negate=negate) == want, (name, magnitude, negate)
    state = random.getstate()
    op_argument(name, 9.0, hparams, negate=True)
    assert random.getstate() == state  # the global generator is neither read nor advanced


def test_ops_that_draw_randomness_inside_are_refused():
    with pytest.raises(ConfigError, match="GaussianBlurRand"):
        AugSpec(output_size=32, randaug_n=1, randaug_ops=("GaussianBlurRand",))



def test_default_ops_are_timm_rand_transforms():
    from timm.data.auto_augment import _RAND_TRANSFORMS

    assert DEFAULT_RANDAUG_OPS == tuple(_RAND_TRANSFORMS)


def test_op_argument_does_not_touch_the_global_random_state():
    random.seed(123)
    state = random.getstate()
    for name in DEFAULT_RANDAUG_OPS:
        op_argument(name, 9.0, randaug_hparams(op_spec(9.0)))
    assert random.getstate() == state


# ---- the presets against timm's create_transform -------------------------------------------------


def timm_pipeline(name: str):
    from timm.data import create_transform

    common = dict(is_training=True, hflip=0.5, color_jitter=None, interpolation="bilinear", mean=MEAN, std=STD)
    if name == "light":
        return create_transform(32, **common)
    return create_transform(32, auto_augment="rand-m9-mstd0.5", re_prob=0.25, re_mode="const", **common)


@pytest.mark.parametrize("name", ["light", "strong"])
def test_preset_settings_equal_timm_create_transform(name):
    from timm.data.auto_augment import RandAugment
    from timm.data.random_erasing import RandomErasing
    from timm.data.transforms import RandomResizedCropAndInterpolation
    from torchvision.transforms import RandomHorizontalFlip

    spec = preset(name, output_size=32, mean=MEAN, std=STD)
    parts = {type(t): t for t in timm_pipeline(name).transforms}
    rrc, flip = parts[RandomResizedCropAndInterpolation], parts[RandomHorizontalFlip]
    assert (spec.crop, spec.crop_scale, spec.crop_ratio, spec.hflip) == ("rrc", rrc.scale, rrc.ratio, flip.p)
    assert rrc.interpolation.value == spec.interpolation
    if name == "light":
        assert RandAugment not in parts and RandomErasing not in parts
        assert (spec.randaug_n, spec.erase_prob, spec.mix) == (0, 0.0, "none")
        return
    ra, erase = parts[RandAugment], parts[RandomErasing]
    assert spec.randaug_n == ra.num_layers and spec.randaug_ops == tuple(op.name for op in ra.ops)
    for op in ra.ops:
        assert (op.magnitude, op.magnitude_std, op.prob) == (spec.randaug_m, spec.randaug_mstd, spec.randaug_prob)
        assert op.kwargs["fillcolor"] == randaug_hparams(spec)["img_mean"]
    assert (spec.erase_prob, erase.mode, erase.min_count, erase.max_count) == (erase.probability, "const", 1, 1)
    assert spec.erase_scale == (erase.min_area, erase.max_area)


def test_strong_erase_ratio_equals_timm_random_erasing():
    from timm.data.random_erasing import RandomErasing

    spec = preset("strong", output_size=32, mean=MEAN, std=STD)
    erase = [t for t in timm_pipeline("strong").transforms if isinstance(t, RandomErasing)][0]
    assert tuple(np.log(spec.erase_ratio)) == pytest.approx(erase.log_aspect_ratio, abs=1e-12)


def test_randaug_hparams_equal_timm_create_transform():
    from timm.data.auto_augment import RandAugment

    spec = preset("strong", output_size=32, mean=MEAN, std=STD)
    ra = [t for t in timm_pipeline("strong").transforms if isinstance(t, RandAugment)][0]
    timm = ra.ops[0].hparams
    ours = randaug_hparams(spec)
    assert {k: timm[k] for k in ours} == ours


# ---- the counter-based generator --------------------------------------------------------------


def draw(spec, ids, *, seed=0, epoch=0, block=0, size=(8, 8)):
    ids = np.asarray(ids, dtype=np.int64)
    return sample_view_params(spec, seed=seed, epoch=epoch, block_id=block, sample_ids=ids, image_sizes=[size] * len(ids))


def non_mix_columns(spec) -> list[int]:
    return [i for i, f in enumerate(param_fields(spec)) if not f.startswith("mix_")]


@pytest.mark.parametrize("name", PRESETS)
def test_a_view_is_drawn_alone_from_seed_epoch_and_sample(name):
    spec = preset(name, **TEACHER)
    ids = np.arange(1000, 1256)
    whole = draw(spec, ids, seed=3, epoch=2, block=5)
    assert whole.dtype == np.float32 and whole.shape == (256, len(param_fields(spec)))
    subset = [7, 0, 255, 100, 31]
    alone = draw(spec, ids[subset], seed=3, epoch=2, block=5)
    columns = non_mix_columns(spec)  # the mix partner pairing is per block; everything else per view
    np.testing.assert_array_equal(alone[:, columns], whole[subset][:, columns])
    reversed_ids = draw(spec, ids[::-1], seed=3, epoch=2, block=5)
    np.testing.assert_array_equal(reversed_ids[:, columns], whole[::-1][:, columns])
    if name != "none":
        for other in (dict(seed=4, epoch=2), dict(seed=3, epoch=3)):
            changed = draw(spec, ids, block=5, **other)
            assert (changed[:, :4] != whole[:, :4]).any(axis=1).mean() > 0.8, other
    else:
        assert (whole[:, :4] == [0, 0, 7, 7]).all()  # center crop of 87.5%, nothing random


def test_parameters_do_not_depend_on_global_random_state():
    spec = preset("strong", **TEACHER)
    for seed in (0, 1):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        rows = draw(spec, range(64))
        if seed == 0:
            first = rows
    np.testing.assert_array_equal(rows, first)


def test_increasing_ops_do_not_depend_on_global_random_state():
    spec = AugSpec(output_size=32, randaug_n=1, randaug_prob=1.0, randaug_ops=("ColorIncreasing",))
    rows = []
    for seed in (KEEP_SEED, FLIP_SEED):
        random.seed(seed)
        rows.append(draw(spec, range(8)))
    np.testing.assert_array_equal(rows[0], rows[1])


def test_every_accepted_op_replays_deterministically():
    img = colour_digit()
    for name in NAME_TO_OP:
        try:
            spec = AugSpec(output_size=32, randaug_n=1, randaug_prob=1.0, randaug_ops=(name,))
        except ConfigError:
            continue
        row = draw(spec, [0], size=(32, 32))[0]
        random.seed(KEEP_SEED)
        first = replay_base(spec, row, img)
        random.seed(FLIP_SEED)
        assert torch.equal(replay_base(spec, row, img), first), name


def test_strong_draws_follow_the_spec_probabilities():
    spec = preset("strong", **TEACHER)
    params = draw(spec, range(4000), size=(8, 8))
    col = {f: i for i, f in enumerate(param_fields(spec))}
    assert 0.46 < params[:, col["flip"]].mean() < 0.54
    ops = params[:, [col["ra0_op"], col["ra1_op"]]]
    mags = params[:, [col["ra0_mag"], col["ra1_mag"]]]
    negs = params[:, [col["ra0_neg"], col["ra1_neg"]]]
    applied = ops >= 0
    assert 0.47 < applied.mean() < 0.53  # randaug_prob 0.5
    assert set(ops[applied].astype(int).tolist()) == set(range(len(DEFAULT_RANDAUG_OPS)))
    assert 0.44 < negs[applied].mean() < 0.56  # the sign is a fair coin
    assert (mags[~applied] == 0).all() and (negs[~applied] == 0).all()
    assert 8.9 < mags[applied].mean() < 9.1 and 0.4 < mags[applied].std() < 0.6  # N(9, 0.5)
    assert mags.min() >= 0.0 and mags.max() <= 10.0
    assert 0.22 < params[:, col["erase"]].mean() < 0.28
    crop = params[:, :4]
    assert (crop[:, 0] + crop[:, 2] <= 8).all() and (crop[:, 1] + crop[:, 3] <= 8).all() and (crop[:, 2:] >= 1).all()


def test_sample_crop_is_timm_get_params_drawn_from_the_view_generator():
    from timm.data.transforms import RandomResizedCropAndInterpolation

    class PythonRandom:
        """The two draws kdcache's sampler makes, answered by Python's random as timm draws them."""

        def uniform(self, low=0.0, high=1.0):
            return random.uniform(low, high)

        def integers(self, low, high):
            return random.randint(low, high - 1)

    spec = AugSpec(output_size=32)
    # square, tall, wide and very elongated images (the last ones hit timm's central-crop fallback)
    for height, width in [(8, 8), (40, 24), (24, 40), (100, 6), (6, 100)]:
        image = Image.new("RGB", (width, height))
        for seed in range(50):
            random.seed(seed)
            want = RandomResizedCropAndInterpolation.get_params(image, spec.crop_scale, spec.crop_ratio)
            random.seed(seed)
            assert augment.sample_crop(PythonRandom(), spec, height, width) == tuple(want), (height, width, seed)


# ---- the spec: validation and JSON ------------------------------------------------------------


def test_unknown_preset_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"unknown augmentation preset 'heavy'; expected one of none, light"):
        preset("heavy", **TEACHER)
    with pytest.raises(ConfigError, match=r"augmentation 'heavy' is neither a preset \(none, light, strong, funmatch, cutmix\)"):
        resolve_spec("heavy", **TEACHER)


def test_missing_spec_file_is_refused_by_path(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(ConfigError, match=rf"augmentation '{path}' is neither a preset .* nor a spec file"):
        resolve_spec(str(path), **TEACHER)


def test_spec_file_that_is_not_json_is_refused_by_path(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text("{output_size: 32")
    with pytest.raises(ConfigError, match=rf"augmentation spec file {path}: cannot read JSON"):
        resolve_spec(str(path), **TEACHER)


def write_spec(tmp_path, data) -> str:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_unknown_field_in_spec_file_is_refused_by_name(tmp_path):
    path = write_spec(tmp_path, {"output_size": 32, "hflip": 0.5, "vflip": 0.5})
    with pytest.raises(ConfigError, match=r"augmentation spec has unknown fields \['vflip'\]; known: \['color_jitter'"):
        resolve_spec(path, **TEACHER)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("hflip", 1.5, r"hflip=1.5; expected a probability in \[0, 1\]"),
        ("randaug_prob", -0.1, r"randaug_prob=-0.1; expected a probability"),
        ("erase_prob", 2, r"erase_prob=2; expected a probability"),
        ("mix_prob", 1.01, r"mix_prob=1.01; expected a probability"),
        ("randaug_ops", ["Rotate", "Wobble"], r"randaug_ops has unknown ops \['Wobble'\]; known: \['AutoContrast'"),
        ("interpolation", "lanczos", r"interpolation='lanczos'; expected one of nearest, bilinear, bicubic"),
        ("crop", "random", r"crop='random'; expected one of center, rrc"),
        ("mix", "mosaic", r"mix='mosaic'; expected one of none, mixup, cutmix"),
        ("output_size", 0, r"output_size=0; expected a positive integer"),
        ("crop_scale", [0.5, 0.1], r"crop_scale=\(0.5, 0.1\); expected 0 < low <= high"),
        ("crop_pct", 0.0, r"crop_pct=0.0; expected a value in \(0, 1\]"),
        ("randaug_m", 11, r"randaug_m=11.*expected n >= 0, 0 <= m <= 10"),
        ("mix_alpha", 0.0, r"mix_alpha=0.0; expected >= 0 and > 0"),
        ("std", [0.5, 0.5, 0.0], r"std=\(0.5, 0.5, 0.0\); expected 3 values each, std > 0"),
        ("version", 2, r"augmentation spec version 2 is not supported; expected 1"),
    ],
)
def test_bad_value_in_spec_file_is_refused_naming_the_field(tmp_path, field, value, message):
    data = dict(AugSpec(output_size=32).to_dict(), **{field: value})
    with pytest.raises(ConfigError, match=message):
        resolve_spec(write_spec(tmp_path, data), **TEACHER)
    with pytest.raises(ConfigError, match=message):  # and the same from Python
        AugSpec.from_dict(data)


@pytest.mark.parametrize(
    "field, value",
    [
        ("hflip", "yes"),
        ("mean", 0.5),
        ("crop_scale", [0.5]),
        ("randaug_n", 1.5),
        ("randaug_ops", []),
        ("output_size", "32"),
    ],
)
def test_malformed_value_in_spec_file_is_refused_naming_the_field(tmp_path, field, value):
    data = dict(AugSpec(output_size=32, randaug_n=2).to_dict(), **{field: value})
    with pytest.raises(ConfigError, match=rf"augmentation spec {field}"):
        resolve_spec(write_spec(tmp_path, data), **TEACHER)


def test_spec_file_without_output_size_names_it(tmp_path):
    with pytest.raises(ConfigError, match=r"augmentation spec is incomplete or malformed: .*'output_size'"):
        resolve_spec(write_spec(tmp_path, {"hflip": 0.5}), **TEACHER)


def test_spec_file_that_is_not_an_object_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"augmentation spec must be a JSON object, found list"):
        resolve_spec(write_spec(tmp_path, [1, 2]), **TEACHER)


@pytest.mark.parametrize("name", PRESETS)
def test_spec_round_trips_through_a_json_file(tmp_path, name):
    spec = preset(name, output_size=48, mean=MEAN, std=STD, interpolation="bicubic")
    path = write_spec(tmp_path, spec.to_dict())
    back = resolve_spec(path, **TEACHER)  # a file's own size and normalisation win over the teacher's
    assert back == spec and back.to_dict() == spec.to_dict()
    assert param_fields(back) == param_fields(spec)
    np.testing.assert_array_equal(draw(back, range(16)), draw(spec, range(16)))


def test_custom_spec_file_drives_the_parameter_layout(tmp_path):
    data = {"name": "jitter", "output_size": 32, "color_jitter": 0.4, "randaug_n": 1, "randaug_ops": ["Rotate", "Invert"],
            "erase_prob": 0.5, "mix": "cutmix"}
    spec = resolve_spec(write_spec(tmp_path, data), **TEACHER)
    assert param_fields(spec) == (
        "crop_top", "crop_left", "crop_height", "crop_width", "flip", "jitter_brightness", "jitter_contrast",
        "jitter_saturation", "ra0_op", "ra0_mag", "ra0_neg", "erase", "erase_top", "erase_left", "erase_height", "erase_width",
        "mix_partner", "mix_lam", "mix_top", "mix_left", "mix_bottom", "mix_right",
    )
    params = draw(spec, range(200))
    jitter = params[:, 5:8]
    assert (jitter >= 0.6).all() and (jitter <= 1.4).all() and jitter.std() > 0.1
    assert set(params[:, 8].astype(int).tolist()) <= {-1, 0, 1}


def spec_at_full_crop_view(spec: AugSpec, img: Image.Image, *, bits: int) -> torch.Tensor:
    from PIL import ImageOps

    out = TF.resized_crop(img, 0, 0, img.height, img.width, [32, 32], TF.InterpolationMode.BILINEAR)
    return TF.normalize(TF.to_tensor(ImageOps.posterize(out, bits)), spec.mean, spec.std)


def test_low_magnitude_posterize_keeps_one_bit():
    # timm's level function gives 0 bits below magnitude 2.5, which Pillow refuses: replay keeps 1 bit
    spec = AugSpec(output_size=32, randaug_n=1, randaug_m=2.0, randaug_mstd=0.0, randaug_prob=1.0, randaug_ops=("Posterize",))
    row = draw(spec, [0])[0]
    assert row[-3:].tolist()[:2] == [0.0, 2.0]  # op 0 (Posterize) at magnitude 2
    img = digit_images(1)[0]
    row[:5] = [0, 0, img.height, img.width, 0]  # the whole image, not flipped
    one_bit = spec_at_full_crop_view(spec, img, bits=1)
    assert torch.equal(replay_base(spec, row, img), one_bit)
