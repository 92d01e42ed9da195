"""Both replay paths with every interpolation a spec allows, from precompute to verify.

Teachers declare their interpolation (timm's configs say bicubic or bilinear). On the tensor
path every preset with a nearest, bilinear or bicubic teacher is precomputed and then verified
on the same path, every view of it. A cache made on the PIL path and verified on the tensor
path ends in a verify report, not a traceback. An interpolation no replay reproduces (timm's
per-image ``random``, Pillow's lanczos) is refused at planning, before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode
from typer.testing import CliRunner

from kdcache.augment import INTERPOLATIONS, PRESETS, AugSpec, cache_spec, param_fields, preset
from kdcache.errors import ConfigError, VerifyError
from kdcache.format import open_cache
from kdcache.replay import TENSOR_AFFINE_INTERPOLATION, replay_fingerprint, replay_uint8
from kdcache.sources import decode_sample, open_source
from kdcache.teacher import MODEL_META_KEY, TeacherConfig
from kdcache.verify import VerifyConfig, verify_cache
from kdcache_cli.main import app

#: 4 digits per class, 40 in all: blocks of 16 give 3 blocks, 2 units.
PER_CLASS = 4
VIEWS = 10 * PER_CLASS
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    """An imagefolder of 40 digits as RGB PNGs of varied, non-square sizes."""
    root = tmp_path_factory.mktemp("folder")
    source = open_source("digits")
    counts = [0] * 10
    for index in range(len(source)):
        sample = source.read([index])[0]
        if counts[sample.label] == PER_CLASS:
            continue
        size = (10 + 2 * counts[sample.label], 12 + sample.label % 3)  # (width, height)
        image = decode_sample(sample).convert("RGB").resize(size, Image.BILINEAR)
        (root / str(sample.label)).mkdir(exist_ok=True)
        image.save(root / str(sample.label) / f"{index:04d}.png")
        counts[sample.label] += 1
        if sum(counts) == VIEWS:
            break
    return f"imagefolder:{root}"


@pytest.fixture(scope="module")
def teacher_for(tmp_path_factory, teacher_ckpt):
    """``teacher_for(interpolation) -> Path``: the shared test teacher, declaring ``interpolation``."""
    root = tmp_path_factory.mktemp("teachers")

    def make(interpolation: str) -> Path:
        path = root / f"test_resnet-{interpolation}.pt"
        if not path.exists():
            state = torch.load(teacher_ckpt, map_location="cpu", weights_only=True)
            state[MODEL_META_KEY] = {**state[MODEL_META_KEY], "interpolation": interpolation}
            torch.save(state, path)
        return path

    return make


def cli(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def errors(output: str) -> list[str]:
    """The error lines of a command's output (precompute adds a count of units after them); none a traceback."""
    assert "Traceback" not in output
    return [line for line in output.splitlines() if line.startswith("error: ")]


def small(make_config, output, folder, checkpoint, **overrides):
    fields = dict(data=folder, epochs=1, block_size=16, blocks_per_unit=2, batch_size=64)
    fields.update(overrides)
    return make_config(output, checkpoint=checkpoint, **fields)


# ---- the tensor path: every preset with every interpolation ---------------------------------


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize("name", PRESETS)
def test_tensor_path_cache_verifies_every_view(tmp_path, make_config, helpers, folder, teacher_for, name, interpolation, one_thread):
    teacher = teacher_for(interpolation)
    output = tmp_path / "cache"
    helpers.run_precompute(small(make_config, output, folder, teacher, augmentation=name, replay_path="tensor"))
    cache = open_cache(output)
    m = cache.manifest
    assert (m.teacher.interpolation, cache_spec(m).interpolation, cache_spec(m).name) == (interpolation, interpolation, name)
    assert m.replay == replay_fingerprint("tensor")
    assert m.replay["affine_interpolation"][interpolation] == TENSOR_AFFINE_INTERPOLATION[interpolation]
    if name == "strong":  # the affine ops, where bicubic is substituted, were drawn and replayed
        spec = cache_spec(m)
        params = np.concatenate([cache.read_block(0, b)["params"] for b in range(m.blocks.num_blocks)])
        ops = params[:, [param_fields(spec).index(f"ra{slot}_op") for slot in range(spec.randaug_n)]]
        assert any(spec.randaug_ops[int(op)] in GEOMETRIC for op in ops.ravel() if op >= 0)
    report = verify_cache(VerifyConfig(cache=str(output), data=folder, views=VIEWS,
                                 teacher=TeacherConfig(model="test_resnet", checkpoint=str(teacher))), log=lambda line: None)
    assert report.ok, report.format()
    assert report.views_checked == VIEWS and report.replay_path == "tensor"


def test_tensor_path_affine_ops_of_a_bicubic_spec_are_bilinear_and_the_crop_bicubic():
    spec = AugSpec(output_size=32, interpolation="bicubic", randaug_n=1, randaug_mstd=0.0,
                   randaug_ops=("Rotate",), mean=(0.5,) * 3, std=(0.5,) * 3)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (13, 11, 3), dtype=np.uint8))
    row = np.array([1, 2, 10, 8, 0, 0, 9.0, 0], np.float32)  # crop (1, 2, 10, 8), no flip, Rotate at magnitude 9: 27 degrees
    tensor = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
    crop = F.resized_crop(tensor, 1, 2, 10, 8, [32, 32], InterpolationMode.BICUBIC, antialias=True)
    want = F.rotate(crop, 27.0, interpolation=InterpolationMode.BILINEAR, fill=[128.0] * 3)  # the fill: the mean, 0.5
    got = replay_uint8(spec, row, img, path="tensor")
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    bilinear_crop = F.resized_crop(tensor, 1, 2, 10, 8, [32, 32], InterpolationMode.BILINEAR, antialias=True)
    assert not torch.equal(crop, bilinear_crop)  # the crop keeps the declared bicubic


def test_only_the_tensor_path_records_a_substitution():
    assert "affine_interpolation" not in replay_fingerprint("pil")
    assert replay_fingerprint("tensor")["affine_interpolation"] == {"nearest": "nearest", "bilinear": "bilinear",
                                                                    "bicubic": "bilinear"}
    assert set(TENSOR_AFFINE_INTERPOLATION) == set(INTERPOLATIONS)


# ---- another path than the cache's ----------------------------------------------------------


def test_verify_on_the_tensor_path_of_a_strong_pil_cache_ends_in_a_report(tmp_path, make_config, helpers, folder,
                                                                          teacher_for, one_thread):
    teacher = teacher_for("bicubic")
    output = tmp_path / "cache"
    helpers.run_precompute(small(make_config, output, folder, teacher, augmentation="strong"))
    result = cli("verify", output, "--data", folder, "--teacher", "test_resnet", "--teacher-checkpoint", teacher,
                 "--views", VIEWS, "--replay-path", "tensor")
    assert isinstance(result.exception, SystemExit), result.exception  # no traceback
    replay = next(line for line in result.output.splitlines() if line.strip().startswith("replay "))
    assert f"{VIEWS} view(s) on path tensor (cache made with pil)" in replay
    matching = int(replay.split(": ")[1].split(" match")[0])
    if matching == VIEWS:
        assert result.exit_code == 0
    else:  # the paths differ in their resampling: the views that differ are named and the exit says so
        assert result.exit_code == VerifyError.exit_code and "FAILED" in result.output
    assert "Traceback" not in result.output


# ---- interpolations no replay reproduces ----------------------------------------------------


@pytest.mark.parametrize("path", ["pil", "tensor"])
@pytest.mark.parametrize("interpolation", ["random", "lanczos"])
def test_a_teacher_interpolation_replay_cannot_reproduce_is_refused_at_planning(tmp_path, folder, teacher_for, path,
                                                                                 interpolation):
    output = tmp_path / "cache"
    result = cli("precompute-logits", "--output", output, "--data", folder, "--teacher", "test_resnet",
                 "--teacher-checkpoint", teacher_for(interpolation), "--augmentation", "strong", "--replay-path", path)
    assert result.exit_code == ConfigError.exit_code, result.output
    (error,) = errors(result.output)
    assert f"interpolation {interpolation!r}" in error and "nearest, bilinear, bicubic" in error
    assert "--augmentation FILE" in error
    assert not output.exists()


def test_a_spec_file_overrides_the_teacher_interpolation(tmp_path, make_config, helpers, folder, teacher_for, one_thread):
    spec = preset("strong", output_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic")
    spec_file = tmp_path / "strong.json"
    spec_file.write_text(json.dumps(spec.to_dict()))
    output = tmp_path / "cache"
    helpers.run_precompute(small(make_config, output, folder, teacher_for("lanczos"), augmentation=str(spec_file),
                                 replay_path="tensor"))
    m = open_cache(output).manifest
    assert (m.teacher.interpolation, cache_spec(m).interpolation) == ("lanczos", "bicubic")


@pytest.mark.parametrize("interpolation", ["random", "box", "hamming", "lanczos"])
def test_a_spec_file_with_an_interpolation_replay_cannot_reproduce_is_refused(tmp_path, folder, teacher_ckpt, interpolation):
    data = preset("light", output_size=32, mean=(0.5,) * 3, std=(0.5,) * 3).to_dict()
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps({**data, "interpolation": interpolation}))
    output = tmp_path / "cache"
    result = cli("precompute-logits", "--output", output, "--data", folder, "--teacher", "test_resnet",
                 "--teacher-checkpoint", teacher_ckpt, "--augmentation", spec_file, "--replay-path", "tensor")
    assert result.exit_code == ConfigError.exit_code, result.output
    assert errors(result.output) == [f"error: augmentation spec interpolation={interpolation!r}; "
                                     "expected one of nearest, bilinear, bicubic"]
    assert not output.exists()


@pytest.mark.parametrize("path", ["pil", "tensor"])
def test_a_student_replays_on_the_path_its_cache_was_made_on(tmp_path, make_config, helpers, folder, teacher_for, path,
                                                              monkeypatch, one_thread):
    import kdcache.loader
    from kdcache.losses import LossConfig
    from kdcache.student import StudentConfig, train_student

    output = tmp_path / "cache"
    helpers.run_precompute(small(make_config, output, folder, teacher_for("bicubic"), augmentation="strong", replay_path=path))
    paths = []
    replay_pending = kdcache.loader.replay_pending

    def spy(*args, **kwargs):
        paths.append(kwargs["path"])
        return replay_pending(*args, **kwargs)

    monkeypatch.setattr(kdcache.loader, "replay_pending", spy)
    train_student(StudentConfig(data=folder, cache=str(output), model="test_resnet", run_dir=str(tmp_path / "run"),
                                loss=LossConfig(name="kd"), epochs=1, batch_size=16, amp="none", device="cpu"),
                  log=lambda line: None)
    assert paths and set(paths) == {path}
