"""A student at its own size: the same views of a cache, replayed at the student's ``--img-size``.

The 64 px teacher's cache trains a 32 px student; the student's batches are the cache's stored
parameters replayed at 32 px (checked batch for batch), and equal the batches of a 32 px cache
drawn from the same seed (light and funmatch parameters do not depend on the size). verify of
the 64 px cache still passes. The box and translation scaling are in tests/test_replay.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from threads import single_thread

from cli_checks import invoke, one_error_line
from kdcache.augment import cache_spec
from kdcache.batches import CacheLoader
from kdcache.format import open_cache
from kdcache.losses import LossConfig
from kdcache.precompute import PrecomputeConfig
from kdcache.replay import replay_block
from kdcache.sources import decode_sample, open_source
from kdcache.student import StudentConfig, train_student
from kdcache.teacher import MODEL_META_KEY, TeacherConfig, load_teacher
from kdcache.verify import VerifyConfig, verify_cache


def sized_teacher(path: Path, size: int) -> Path:
    """The conftest teacher's weights (seed 0) declaring a ``size`` px input."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=10)
    meta = {"input_size": (3, size, size), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear"}
    torch.save({"state_dict": model.state_dict(), MODEL_META_KEY: meta}, path)
    return path


def make_cache(root: Path, size: int, augmentation: str, checkpoint: Path | None = None) -> Path:
    out = root / f"cache{size}-{augmentation}"
    checkpoint = checkpoint or sized_teacher(root / f"teacher{size}.pt", size)
    config = PrecomputeConfig(data="digits", output=str(out), augmentation=augmentation, epochs=1, topk=5, block_size=256,
                              blocks_per_unit=2, teacher=TeacherConfig(model="test_resnet", checkpoint=str(checkpoint)),
                              command="pytest")
    from kdcache.precompute import precompute_logits

    with single_thread():
        precompute_logits(config, log=lambda message: None)
    return out


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("sizes")
    return {(size, aug): make_cache(root, size, aug) for size in (64, 32) for aug in ("light", "funmatch")}


@pytest.mark.parametrize("augmentation", ["light", "funmatch"])
def test_a_32px_student_replays_the_64px_caches_parameters_at_32px(caches, augmentation, one_thread):
    cache = open_cache(caches[64, augmentation])
    spec, layout = cache_spec(cache.manifest), cache.manifest.blocks
    assert spec.output_size == 64
    loader = CacheLoader(cache, "digits", batch_size=64, image_size=32)
    assert loader.image_size == 32
    source = open_source("digits")
    plan = cache.samples()["source_index"]
    checked = 0
    for batch in loader.epoch(0):
        assert tuple(batch.images.shape) == (64, 3, 32, 32)
        for row, (epoch, slot) in enumerate(batch.views.tolist()[:8]):
            block, position = divmod(slot, layout.block_capacity)
            where = layout.block_slots(block)
            images = [decode_sample(s) for s in source.read(plan[where].tolist())]
            want = replay_block(spec, cache.read_block(epoch, block)["params"], images, positions=[position], size=32)[0]
            assert torch.equal(batch.images[row], want)
            checked += 1
    assert checked >= 8 * len(loader)


@pytest.mark.parametrize("augmentation", ["light", "funmatch"])
def test_the_student_view_of_a_64px_cache_is_the_32px_caches_view_from_the_same_seed(caches, augmentation, one_thread):
    big, small = open_cache(caches[64, augmentation]), open_cache(caches[32, augmentation])
    np.testing.assert_array_equal(big.read_block(0, 0)["params"], small.read_block(0, 0)["params"])
    a = list(CacheLoader(big, "digits", batch_size=64, image_size=32).epoch(0))
    b = list(CacheLoader(small, "digits", batch_size=64).epoch(0))
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert torch.equal(x.views, y.views)
        assert torch.equal(x.images, y.images)
        assert torch.equal(x.target, y.target)


def test_verify_of_the_64px_cache_still_passes(caches, one_thread):
    path = caches[64, "funmatch"]
    report = verify_cache(VerifyConfig(cache=str(path), data="digits", views=64, replay_path="pil",
                                       teacher=TeacherConfig(model="test_resnet",
                                                             checkpoint=str(path.parent / "teacher64.pt"))),
                          log=lambda message: None)
    assert report.ok and report.views_checked == 64, report.format()


@pytest.mark.slow
def test_a_64px_teacher_trains_a_32px_student(tmp_path, one_thread):
    """A teacher trained at 64 px (ce, as teachers are made), its 64 px cache, a 32 px KD student that learns."""
    common = dict(data="digits", val_data="digits:val", model="test_resnet", batch_size=64, log_every=100, amp="none",
                  device="cpu")
    teacher = train_student(StudentConfig(run_dir=str(tmp_path / "teacher"), loss=LossConfig(name="ce"), img_size=64,
                                          epochs=6, **common), log=lambda message: None)
    assert teacher.final_top1 > 0.75
    cache = make_cache(tmp_path, 64, "light", checkpoint=tmp_path / "teacher" / "model.pt")
    lines = []
    result = train_student(StudentConfig(run_dir=str(tmp_path / "student"), cache=str(cache), loss=LossConfig(name="kd"),
                                         img_size=32, epochs=3, **common), log=lines.append)
    assert any("at 32px on the teacher's 64px views" in line for line in lines), lines
    assert result.final_top1 > 0.5, result.final_top1
    student, info = load_teacher(TeacherConfig(model="test_resnet", checkpoint=str(tmp_path / "student" / "model.pt")))
    assert tuple(info.input_size) == (3, 32, 32)


def test_an_other_size_with_a_live_teacher_is_one_line(tmp_path, caches):
    cache = caches[64, "light"]
    result = invoke("train-student", "--cache", cache, "--data", "digits", "--model", "test_resnet", "--loss", "kd",
                    "--img-size", "32", "--teacher", "test_resnet", "--teacher-checkpoint", cache.parent / "teacher64.pt",
                    "--run-dir", tmp_path / "run", "--epochs", "1", "--device", "cpu", "--amp", "none")
    line = one_error_line(result, 4)
    assert "--img-size 32" in line and "64" in line and "--teacher" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("size", ["0", "-3"])
def test_a_size_that_is_not_positive_is_one_line(tmp_path, caches, size):
    result = invoke("train-student", "--cache", caches[64, "light"], "--data", "digits", "--model", "test_resnet",
                    "--loss", "kd", "--img-size", size, "--run-dir", tmp_path / "run", "--epochs", "1", "--device", "cpu",
                    "--amp", "none")
    line = one_error_line(result, 2)
    assert size in line
    assert not (tmp_path / "run").exists()


def test_cache_loader_refuses_a_size_that_is_not_a_positive_integer(caches):
    from kdcache.errors import ConfigError

    for bad in (0, 32.0, True, "32"):
        with pytest.raises(ConfigError, match="image_size"):
            CacheLoader(caches[64, "light"], "digits", batch_size=64, image_size=bad)
