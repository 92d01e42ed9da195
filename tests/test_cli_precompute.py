"""`kdcache precompute-logits` and `kdcache info` through the CLI: a successful run, and every bad
input refused with exactly one `error:` line naming the culprit, no traceback, nothing changed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from kdcache.format import open_cache
from kdcache_cli.main import app

pytestmark = pytest.mark.usefixtures("one_thread")



def invoke(args: list[str]):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_refused(result, *culprits: str, exit_code: int | None = None) -> str:
    """Non-zero exit, exactly one stderr line `error: ...` naming every culprit, no traceback."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), f"escaped: {result.exception!r}\n{result.output}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("error: ")
    for culprit in culprits:
        assert str(culprit) in line, f"{culprit!r} not named in: {line}"
    assert "Traceback" not in result.output and result.stdout == ""
    if exit_code is not None:
        assert result.exit_code == exit_code
    return line


def write_imagefolder(root: Path, classes: int, per_class: int) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(root / f"c{c}" / f"{i}.png")
    return root


# ---- a good run --------------------------------------------------------------------------------


def test_precompute_logits_writes_a_cache(tmp_path, precompute_argv):
    out = tmp_path / "val"
    result = invoke(precompute_argv(out, data="digits:val", block_size=64, epochs=1, topk="full"))
    assert result.exit_code == 0, result.output
    assert "planning 360 samples in 6 blocks (3 units per epoch)" in result.stderr
    assert "epochs complete: [0]" in result.stderr
    cache = open_cache(out)
    assert cache.complete_epochs() == [0] and cache.manifest.k == 10  # --topk full keeps all logits
    assert cache.manifest.command.startswith("kdcache")
    assert cache.read_block(0, 5)["values"].shape == (360 - 5 * 64, 10)


# ---- bad input: nothing is created, one line names the culprit ----------------------------------


def test_missing_imagefolder_is_refused(tmp_path, precompute_argv):
    missing = tmp_path / "no-such-dir"
    result = invoke(precompute_argv(tmp_path / "out", data=f"imagefolder:{missing}"))
    assert_refused(result, str(missing), "does not exist", exit_code=2)
    assert not (tmp_path / "out").exists()


def test_missing_fashion_mnist_directory_is_refused(tmp_path, precompute_argv):
    missing = tmp_path / "no-fmnist"
    result = invoke(precompute_argv(tmp_path / "out", data=f"fashion-mnist:{missing}"))
    assert_refused(result, str(missing), exit_code=2)
    assert not (tmp_path / "out").exists()


def test_empty_imagefolder_is_refused(tmp_path, precompute_argv):
    empty = tmp_path / "empty"
    for name in ("cat", "dog"):
        (empty / name).mkdir(parents=True)
    (empty / "cat" / "notes.txt").write_text("not an image")
    result = invoke(precompute_argv(tmp_path / "out", data=f"imagefolder:{empty}"))
    assert_refused(result, str(empty), "contains no samples", exit_code=2)
    assert not (tmp_path / "out").exists()


def test_unknown_source_spec_is_refused(tmp_path, precompute_argv):
    result = invoke(precompute_argv(tmp_path / "out", data="mnist"))
    assert_refused(result, "'mnist'", "unknown source spec", exit_code=2)


def test_unknown_teacher_is_refused(tmp_path, precompute_argv):
    result = invoke(precompute_argv(tmp_path / "out", teacher="no_such_resnet"))
    assert_refused(result, "unknown teacher model 'no_such_resnet'", exit_code=2)
    assert not (tmp_path / "out").exists()


def test_missing_teacher_checkpoint_is_refused(tmp_path, precompute_argv):
    missing = tmp_path / "missing.pt"
    result = invoke(precompute_argv(tmp_path / "out", checkpoint=missing))
    assert_refused(result, str(missing), "does not exist", exit_code=2)


def test_unreadable_teacher_checkpoint_is_refused(tmp_path, precompute_argv):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint\n" * 10)
    result = invoke(precompute_argv(tmp_path / "out", checkpoint=garbage))
    assert_refused(result, str(garbage), "cannot be read", exit_code=2)


def test_checkpoint_class_count_disagreeing_with_num_classes_is_refused(tmp_path, precompute_argv):
    result = invoke(precompute_argv(tmp_path / "out", num_classes=7))
    assert_refused(result, "has 10 classes", "--num-classes says 7", exit_code=4)
    assert not (tmp_path / "out").exists()


def test_checkpoint_class_count_disagreeing_with_the_data_is_refused(tmp_path, precompute_argv, make_teacher):
    seven = make_teacher(num_classes=7)
    result = invoke(precompute_argv(tmp_path / "out", checkpoint=seven))
    assert_refused(result, "data digits has 10 classes", "teacher has 7", exit_code=4)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("topk, named", [("0", "--topk 0"), ("ten", "--topk 'ten'")])
def test_bad_topk_is_refused(tmp_path, precompute_argv, topk, named):
    result = invoke(precompute_argv(tmp_path / "out", topk=topk))
    assert_refused(result, named, exit_code=2)
    assert not (tmp_path / "out").exists()


def test_existing_directory_that_is_not_a_cache_is_left_alone(tmp_path, precompute_argv, helpers):
    out = tmp_path / "mine"
    (out / "sub").mkdir(parents=True)
    (out / "results.csv").write_text("a,b\n1,2\n")
    (out / "sub" / "model.pt").write_bytes(b"\x00\x01weights")
    before = helpers.tree_hashes(out)
    for resume in (False, True):
        result = invoke(precompute_argv(out, resume=resume))
        assert_refused(result, str(out), "is not a kdcache cache", exit_code=2)
    assert helpers.tree_hashes(out) == before
    assert sorted(p.name for p in out.iterdir()) == ["results.csv", "sub"]


def test_existing_output_file_is_refused(tmp_path, precompute_argv):
    out = tmp_path / "file"
    out.write_text("keep")
    result = invoke(precompute_argv(out))
    assert_refused(result, str(out), "not a directory", exit_code=2)
    assert out.read_text() == "keep"


def test_existing_cache_without_resume_is_refused(cache_copy, precompute_argv, helpers):
    path, before = cache_copy
    result = invoke(precompute_argv(path))
    assert_refused(result, str(path), "already a kdcache cache", "--resume", exit_code=2)
    assert helpers.tree_hashes(path) == before


# ---- incompatible --resume: refused, naming the field, the cache byte-identical ------------------


def test_resume_with_another_teacher_checkpoint_is_refused(cache_copy, precompute_argv, make_teacher, helpers):
    path, before = cache_copy
    result = invoke(precompute_argv(path, checkpoint=make_teacher(seed=1), resume=True))
    assert_refused(result, "cannot resume", "teacher.weights_sha256 differs", exit_code=4)
    assert helpers.tree_hashes(path) == before


def test_resume_with_another_augmentation_is_refused(cache_copy, precompute_argv, helpers):
    path, before = cache_copy
    result = invoke(precompute_argv(path, augmentation="strong", resume=True))
    assert_refused(result, "cannot resume", "augmentation.name differs", exit_code=4)
    assert helpers.tree_hashes(path) == before


def test_resume_with_another_augmentation_says_what_differs(cache_copy, precompute_argv):
    path, _ = cache_copy
    result = invoke(precompute_argv(path, augmentation="strong", resume=True))
    assert_refused(result, "augmentation", "light", "strong", exit_code=4)


@pytest.mark.parametrize(
    "field, overrides, named",
    [
        pytest.param("seed", dict(seed=1), "seed differs: the cache has 0, this run has 1"),
        pytest.param("topk", dict(topk=3), "k differs: the cache has 5, this run has 3"),
        pytest.param("blocks", dict(block_size=128), "blocks.block_capacity differs"),
    ],
)
def test_resume_with_another_setting_is_refused_naming_it(cache_copy, precompute_argv, helpers, field, overrides, named):
    path, before = cache_copy
    result = invoke(precompute_argv(path, resume=True, **overrides))
    assert_refused(result, "cannot resume", named, exit_code=4)
    assert helpers.tree_hashes(path) == before


def test_resume_with_fashion_mnist_is_refused(cache_copy, precompute_argv, helpers, fashion_mnist_dir):
    path, before = cache_copy
    result = invoke(precompute_argv(path, data=f"fashion-mnist:{fashion_mnist_dir}", resume=True))
    assert_refused(result, "cannot resume", "dataset", "1437", "40", exit_code=4)
    assert helpers.tree_hashes(path) == before


def test_resume_with_an_imagefolder_is_refused(cache_copy, precompute_argv, helpers, tmp_path):
    path, before = cache_copy
    folder = write_imagefolder(tmp_path / "folder", classes=10, per_class=2)
    result = invoke(precompute_argv(path, data=f"imagefolder:{folder}", resume=True))
    assert_refused(result, "cannot resume", "dataset", "1437", "20", exit_code=4)
    assert helpers.tree_hashes(path) == before


def test_resume_with_the_other_digits_split_is_refused(cache_copy, precompute_argv, helpers):
    path, before = cache_copy
    result = invoke(precompute_argv(path, data="digits:val", resume=True))
    assert_refused(result, "cannot resume", "dataset", "1437", "360", exit_code=4)
    assert helpers.tree_hashes(path) == before


# ---- kdcache info ---------------------------------------------------------------------------------


def test_info_json(small_cache, teacher_ckpt):
    result = invoke(["info", small_cache, "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["teacher"]["name"] == "test_resnet" and info["teacher"]["num_classes"] == 10
    assert info["teacher"]["source"] == "timm"
    assert info["dataset"]["kind"] == "digits" and info["dataset"]["num_samples"] == 1437
    assert (info["epochs_complete"], info["epochs_planned"], info["k"]) == ([0, 1], 2, 5)
    assert (info["units_committed"], info["units_total"], info["views_committed"]) == (6, 6, 2874)
    size = sum(p.stat().st_size for p in Path(small_cache).rglob("*") if p.is_file())
    assert info["size_bytes"] == size
    assert info["bytes_per_view"] == pytest.approx(size / 2874)
    assert info["format_version"] == 1 and info["augmentation"]["name"] == "light"


def test_info_text(small_cache):
    result = invoke(["info", small_cache])
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "timm:test_resnet  10 classes  input 3x32x32" in text
    assert "digits digits:train (train): 1437 samples in 6 blocks" in text
    assert "2 of 2 complete (0-1); 6/6 units committed" in text
    assert "top-5 fp16 logits" in text and "bytes per view (2874 views)" in text


def test_info_on_a_partial_cache(tmp_path, make_config, helpers):
    out = tmp_path / "partial"
    helpers.run_precompute(make_config(out, data="digits:val", block_size=64, max_units=1))
    info = json.loads(invoke(["info", out, "--json"]).stdout)
    assert (info["epochs_complete"], info["units_committed"], info["units_total"]) == ([], 1, 6)
    assert info["views_committed"] == 128
    assert "0 of 2 complete (none); 1/6 units committed" in invoke(["info", out]).stdout


def test_info_refuses_what_is_not_a_cache(tmp_path):
    assert_refused(invoke(["info", tmp_path / "nowhere"]), str(tmp_path / "nowhere"), "does not exist", exit_code=3)
    (tmp_path / "plain").mkdir()
    assert_refused(invoke(["info", tmp_path / "plain", "--json"]), str(tmp_path / "plain"), "zarr.json", exit_code=3)


def test_cli_runs_as_a_module_and_as_a_script(small_cache, subprocess_env, helpers):
    run = subprocess.run(helpers.cli_command() + ["info", str(small_cache), "--json"], capture_output=True, text=True,
                         env=subprocess_env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["epochs_complete"] == [0, 1]
    # pip puts the console script in the interpreter's scripts directory (a venv's bin/), on PATH or not
    scripts = sysconfig.get_path("scripts")
    script = shutil.which("kdcache", path=scripts) or shutil.which("kdcache")
    assert script is not None, f"no kdcache console script in {scripts} or on PATH: is the package installed?"
    run = subprocess.run([script, "info", str(Path(small_cache) / "nope")], capture_output=True, text=True,
                         env=subprocess_env, timeout=120)
    assert run.returncode == 3
    assert run.stderr.strip().splitlines() == [f"error: cache {Path(small_cache) / 'nope'} does not exist"]
