"""`kdcache show`: the picture of what the teacher saw, its size, its panels, the CLI and every error path."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from typer.testing import CliRunner

from kdcache.augment import cache_spec
from kdcache.errors import ConfigError, IncompleteCacheError, MismatchError
from kdcache.format import ledger_key, open_cache
from kdcache.precompute import PrecomputeConfig, precompute_logits
from kdcache.replay import replay_base
from kdcache.show import PANELS_PER_ROW, ShowConfig, collect_views, describe_params, image_size, render_views
from kdcache.sources import decode_sample, open_source
from kdcache.teacher import MODEL_META_KEY, TeacherConfig
from kdcache_cli.main import app

os.environ.setdefault("HF_HUB_OFFLINE", "1")
META = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear"}


def save_teacher(path, seed: int) -> str:
    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=10)
    torch.save({"state_dict": model.state_dict(), MODEL_META_KEY: META}, path)
    return str(path)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("show")


@pytest.fixture(scope="module")
def teacher(workdir) -> TeacherConfig:
    return TeacherConfig(model="test_resnet", checkpoint=save_teacher(workdir / "teacher.pt", seed=0))


def make_cache(workdir, teacher: TeacherConfig, augmentation: str) -> str:
    output = str(workdir / augmentation)
    precompute_logits(
        PrecomputeConfig(data="digits", output=output, teacher=teacher, augmentation=augmentation, epochs=1, topk=5,
                         block_size=256, blocks_per_unit=2, batch_size=256),
        log=lambda message: None,
    )
    return output


@pytest.fixture(scope="module")
def funmatch(workdir, teacher) -> str:
    return make_cache(workdir, teacher, "funmatch")


@pytest.fixture(scope="module")
def strong(workdir, teacher) -> str:
    return make_cache(workdir, teacher, "strong")


def config(cache: str, output, **kwargs) -> ShowConfig:
    return ShowConfig(cache=cache, data=kwargs.pop("data", "digits"), epoch=kwargs.pop("epoch", 0), output=str(output), **kwargs)


# ---- the picture -------------------------------------------------------------------------------


def test_png_size_and_panels_match_the_result(funmatch, tmp_path):
    result = render_views(config(funmatch, tmp_path / "views.png", count=3))
    with Image.open(result.output) as png:
        assert png.format == "PNG"
        assert png.size == result.size == image_size(3)
    assert (result.rows, result.panels_per_row, PANELS_PER_ROW) == (3, 3, 3)
    plan = open_cache(funmatch).samples()
    assert result.keys == plan["key"][:3].tolist()


def test_picture_grows_by_one_row_height_per_row(strong, tmp_path):
    one = render_views(config(strong, tmp_path / "one.png", count=1))
    two = render_views(config(strong, tmp_path / "two.png", count=2))
    with Image.open(one.output) as a, Image.open(two.output) as b:
        assert a.size == one.size and b.size == two.size
        assert a.width == b.width
        assert b.height - a.height == image_size(2)[1] - image_size(1)[1] > 0
    assert (one.panels_per_row, two.panels_per_row) == (3, 3)


def test_samples_by_key_and_slot_index_in_the_order_given(strong, tmp_path):
    cache = open_cache(strong)
    plan = cache.samples()
    far = cache.layout.block_slots(3).start + 7  # a sample of another block
    key = str(plan["key"][far])
    result = render_views(config(strong, tmp_path / "picked.png", samples=(key, "5", 2, key)))
    assert result.keys == [key, str(plan["key"][5]), str(plan["key"][2])]
    assert result.size == image_size(3)


def test_mixed_view_is_the_blend_of_its_own_view_and_the_shown_partner(funmatch):
    cache = open_cache(funmatch)
    m = cache.manifest
    spec = cache_spec(m)
    views = collect_views(config(funmatch, "unused.png", count=8), cache=cache)
    mixed = [v for v in views if v.partner_key is not None]
    assert mixed, "funmatch pairs every sample of an even block"
    source = open_source("digits")
    plan = cache.samples()
    for view in mixed:
        lam = float(view.params[m.param_fields.index("mix_lam")])
        own = replay_base(spec, view.params, decode_sample(source.read([int(plan["source_index"][view.slot])])[0]))
        own = (own * 0.5 + 0.5).permute(1, 2, 0).numpy()  # the spec's mean/std are 0.5
        np.testing.assert_allclose(view.view, lam * own + (1 - lam) * view.second, atol=1e-5)
        assert view.partner_key != view.key
        assert 0.0 < lam < 1.0


def test_probabilities_come_from_the_stored_record(funmatch):
    cache = open_cache(funmatch)
    stored = cache.read_block(0, 0)
    views = collect_views(config(funmatch, "unused.png", count=4), cache=cache)
    for position, view in enumerate(views):
        assert view.probs.shape == (cache.manifest.k + 1,)  # k stored classes + the tail bucket
        assert view.probs.sum() == pytest.approx(1.0, abs=1e-5)
        assert np.all(np.diff(view.probs[:-1]) <= 1e-7)  # stored logits are sorted
        np.testing.assert_array_equal(view.indices, stored["indices"][position])
        assert view.label == int(cache.samples()["label"][position])


def test_live_teacher_reproduces_the_stored_probabilities(strong, teacher, tmp_path):
    result = render_views(config(strong, tmp_path / "live.png", count=3, teacher=teacher))
    assert result.live_max_abs_diff is not None and result.live_max_abs_diff < 1e-2
    with Image.open(result.output) as png:
        assert png.size == image_size(3)


def test_row_titles_name_the_augmentation_parameters(strong, funmatch):
    for location, expected in ((strong, ("crop top", "RandAugment")), (funmatch, ("crop top", "mixup with digits-", "lambda"))):
        cache = open_cache(location)
        spec = cache_spec(cache.manifest)
        views = collect_views(config(location, "unused.png", count=8), cache=cache)
        texts = [describe_params(cache.manifest, spec, v.params, v.partner_key) for v in views]
        for word in expected:
            assert any(word in text for text in texts), (word, texts)
    cache = open_cache(strong)
    spec = cache_spec(cache.manifest)
    ops = [spec.randaug_ops[int(v.params[cache.manifest.param_fields.index("ra0_op")])]
           for v in collect_views(config(strong, "unused.png", count=8), cache=cache)
           if v.params[cache.manifest.param_fields.index("ra0_op")] >= 0]
    assert ops, "strong applies RandAugment to about half the views"
    text = " ".join(describe_params(cache.manifest, spec, v.params) for v in collect_views(config(strong, "u.png", count=8), cache=cache))
    assert all(op in text for op in ops)


def test_missing_output_directory_is_created(funmatch, tmp_path):
    output = tmp_path / "a" / "b" / "views.png"
    result = render_views(ShowConfig(cache=funmatch, data="digits", epoch=0, output=output, count=1))  # a Path is fine
    assert output.is_file() and result.output == str(output)


# ---- the command -------------------------------------------------------------------------------


def test_cli_show_writes_the_picture(funmatch, tmp_path):
    output = tmp_path / "cli" / "views.png"
    key = str(open_cache(funmatch).samples()["key"][300])
    result = CliRunner().invoke(app, ["show", funmatch, "--data", "digits", "--epoch", "0", "--samples", key,
                                      "--samples", "0", "--out", str(output)])
    assert result.exit_code == 0, result.output
    with Image.open(output) as png:
        assert png.size == image_size(2)
    assert str(output) in result.stdout


def test_cli_error_is_one_line_with_exit_code(funmatch, tmp_path):
    result = CliRunner().invoke(app, ["show", funmatch, "--data", "digits", "--epoch", "0", "--out", str(tmp_path / "v.jpg")])
    assert result.exit_code == ConfigError.exit_code
    assert result.stderr.strip().splitlines() == [f"error: --out {tmp_path / 'v.jpg'}: the picture is written as PNG; expected a path ending in .png"]
    result = CliRunner().invoke(app, ["show", funmatch, "--data", "digits", "--epoch", "3", "--out", str(tmp_path / "v.png")])
    assert result.exit_code == IncompleteCacheError.exit_code
    assert len(result.stderr.strip().splitlines()) == 1 and "epoch 3" in result.stderr


# ---- errors ------------------------------------------------------------------------------------


def test_epoch_beyond_the_cache_names_the_complete_ones(funmatch, tmp_path):
    with pytest.raises(IncompleteCacheError, match=r"epoch 1 is not complete .*complete epochs: 0\)"):
        render_views(config(funmatch, tmp_path / "v.png", epoch=1))


def test_epoch_with_an_uncommitted_unit_is_incomplete(funmatch, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(funmatch, broken)
    (broken / ledger_key(0, 2)).unlink()
    with pytest.raises(IncompleteCacheError, match=r"epoch 0 is not complete .*complete epochs: none"):
        render_views(config(str(broken), tmp_path / "v.png"))
    assert not (tmp_path / "v.png").exists()


@pytest.mark.parametrize(
    ("sample", "message"),
    [
        ("digits-9999", r"--samples 'digits-9999': no sample with this key in the cache"),
        ("5000", r"--samples 5000: slot 5000 is outside the cache's 1536 slots"),
        (1500, r"--samples 1500: slot 1500 is padding \(block 5 holds slots 1280\.\.1436\)"),
    ],
)
def test_unknown_sample_names_it(funmatch, tmp_path, sample, message):
    with pytest.raises(ConfigError, match=message):
        render_views(config(funmatch, tmp_path / "v.png", samples=("digits-0000", sample)))


def test_data_of_another_size_is_refused(funmatch, tmp_path):
    with pytest.raises(MismatchError, match=r"data digits:val has 360 samples, the cache was made from 1437 \(digits:train\)"):
        render_views(config(funmatch, tmp_path / "v.png", data="digits:val"))


def test_different_data_of_the_same_size_names_the_first_sample_that_differs(funmatch, tmp_path):
    source = open_source("digits")
    root = tmp_path / "folder"
    for sample in source.iter_samples():
        image = decode_sample(sample)
        folder = root / str(sample.label)
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{sample.key}.png")
    first = str(open_cache(funmatch).samples()["key"][0])
    with pytest.raises(MismatchError, match=rf"data imagefolder:{root} \(block 0\): sample '\d/digits-\d+' differs .*expected key '{first}'"):
        render_views(config(funmatch, tmp_path / "v.png", data=f"imagefolder:{root}"))


def test_teacher_with_other_weights_is_refused(funmatch, workdir, tmp_path):
    other = TeacherConfig(model="test_resnet", checkpoint=save_teacher(tmp_path / "other.pt", seed=1))
    with pytest.raises(MismatchError, match=rf"teacher {tmp_path / 'other.pt'} has weights sha256 [0-9a-f]+\.\.\., the cache was made with"):
        render_views(config(funmatch, tmp_path / "v.png", count=1, teacher=other))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"output": "views.jpg"}, r"--out views.jpg: the picture is written as PNG"),
        ({"output": "views"}, r"--out views: the picture is written as PNG"),
        ({"epoch": -1}, r"--epoch -1"),
        ({"count": 0}, r"--count 0; expected 1\.\.64"),
        ({"count": 65}, r"--count 65; expected 1\.\.64"),
        ({"samples": ("",)}, r"--samples ''"),
        ({"samples": tuple(str(i) for i in range(65))}, r"--samples names 65 samples; at most 64"),
    ],
)
def test_config_is_checked(kwargs, message):
    fields = {"cache": "c", "data": "digits", "epoch": 0, "output": "views.png", **kwargs}
    with pytest.raises(ConfigError, match=message):
        ShowConfig(**fields)


# ---- subsets (kdcache export) ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def block_subset(funmatch, workdir) -> str:
    """Blocks 2-5 of the funmatch cache (units 1-2 of 0-2), as `kdcache export --blocks 2-5` writes them."""
    from kdcache.export import ExportConfig, export_cache

    output = str(workdir / "funmatch-blocks-2-5")
    export_cache(ExportConfig(cache=funmatch, output=output, blocks=(2, 3, 4, 5)), log=lambda message: None)
    return output


def test_a_block_subset_shows_its_own_blocks(block_subset, funmatch, tmp_path):
    plan = open_cache(funmatch).samples()
    views = collect_views(config(block_subset, tmp_path / "v.png", count=2))
    assert [v.block for v in views] == [2, 2]  # block 0 is not in the subset: the first block it holds
    key = str(plan["key"][5 * 256])  # the first sample of block 5
    (view,) = collect_views(config(block_subset, tmp_path / "v.png", samples=(key,)))
    (whole,) = collect_views(config(funmatch, tmp_path / "v.png", samples=(key,)))
    assert view.block == 5 and np.array_equal(view.probs, whole.probs) and np.array_equal(view.view, whole.view)


def test_a_sample_of_a_block_the_subset_does_not_hold_is_refused_naming_it(block_subset, funmatch, tmp_path):
    key = str(open_cache(funmatch).samples()["key"][3])  # block 0
    with pytest.raises(ConfigError, match=rf"--samples {key}: slot 3 is in block 0, which this subset does not hold "
                                          r"\(it holds blocks 2-5\); pick a sample of those blocks"):
        render_views(config(block_subset, tmp_path / "v.png", samples=(key,)))
    with pytest.raises(IncompleteCacheError, match=r"epoch 1 is not in this subset \(it holds epochs 0, blocks 2-5\)"):
        render_views(config(block_subset, tmp_path / "v.png", epoch=1))
    assert not (tmp_path / "v.png").exists()
