"""What a new user meets first: the defects and refusals of a first try, each fixed and pinned here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from kdcache_cli.main import app


def _invoke(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def _damage(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# ---- a run that failed before its first checkpoint ----------------------------------------------


def _train(cache, run_dir, *extra):
    return _invoke("train-student", "--data", "digits", "--model", "test_resnet", "--cache", cache, "--run-dir", run_dir,
                   "--epochs", "1", "--batch-size", "64", *extra)


@pytest.fixture
def failed_run(cache_copy, tmp_path, one_thread) -> Path:
    """A run that stopped at a damaged unit of epoch 0, before its first checkpoint (at the epoch's end)."""
    cache, _ = cache_copy
    _damage(cache / "values" / "c" / "0" / "2" / "0")
    run_dir = tmp_path / "run"
    result = _train(cache, run_dir)
    assert result.exit_code == 3 and "does not match its ledger checksum" in result.stderr, result.output
    assert sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(".")) == ["config.json", "metrics.jsonl"]
    return run_dir


@pytest.mark.parametrize("resume", [False, True])
def test_a_run_that_stopped_before_its_first_checkpoint_starts_again_and_says_so(failed_run, small_cache, resume, one_thread):
    result = _train(small_cache, failed_run, "--max-steps", "2", *(["--resume"] if resume else []))
    assert result.exit_code == 0, result.output
    assert (f"run dir {failed_run}: the run there stopped before its first checkpoint, so there is nothing to resume; "
            "starting it again") in result.stderr
    assert json.loads((failed_run / "config.json").read_text())["max_steps"] == 2
    steps = [json.loads(line) for line in (failed_run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in steps if line["kind"] == "train"][-1] == 2


def test_a_run_with_a_checkpoint_still_needs_resume(small_cache, tmp_path, one_thread):
    run_dir = tmp_path / "run"
    assert _train(small_cache, run_dir, "--max-steps", "1").exit_code == 0
    result = _train(small_cache, run_dir, "--max-steps", "2")
    assert result.exit_code == 2 and result.stderr.strip() == (
        f"error: run dir {run_dir} exists; pass --resume to continue it or choose another --run-dir")


# ---- a checkpoint that does not fit, and train-student's own checkpoint as a teacher ----------------


def _precompute(tmp_path, checkpoint, teacher="test_resnet"):
    return _invoke("precompute-logits", "--data", "digits", "-o", tmp_path / "cache", "--teacher", teacher,
                   "--teacher-checkpoint", checkpoint)


def test_a_checkpoint_of_another_shape_names_the_keys_and_shapes_that_differ(tmp_path, teacher_ckpt):
    import torch

    state = torch.load(teacher_ckpt, weights_only=True)
    state["state_dict"]["conv1.0.weight"] = torch.zeros(3, 3, 1, 1)
    del state["state_dict"]["bn1.bias"]
    state["state_dict"]["extra.weight"] = torch.zeros(2)
    torch.save(state, tmp_path / "bad.pt")
    result = _precompute(tmp_path, tmp_path / "bad.pt")
    assert result.exit_code == 4, result.output
    assert result.stderr.strip() == (
        f"error: teacher checkpoint {tmp_path / 'bad.pt'} does not fit 'test_resnet': 1 missing key(s) (bn1.bias); "
        "1 unexpected key(s) (extra.weight); 1 shape(s) differ (conv1.0.weight 3x3x1x1 (model: 16x3x3x3))")
    assert not (tmp_path / "cache").exists()


def test_a_checkpoint_of_another_architecture_gives_the_first_few_and_the_counts(tmp_path, teacher_ckpt):
    result = _precompute(tmp_path, teacher_ckpt, teacher="resnet18")
    assert result.exit_code == 4, result.output
    line = result.stderr.strip()
    assert line.startswith(f"error: teacher checkpoint {teacher_ckpt} does not fit 'resnet18': 64 missing key(s) (conv1.weight, ")
    assert "... (61 more)); 34 unexpected key(s) (conv1.0.weight, " in line and "48 shape(s) differ (bn1.weight 32 (model: 64), " in line


def test_a_train_student_checkpoint_as_teacher_names_the_run_s_model_pt(tmp_path, small_cache, one_thread):
    run_dir = tmp_path / "run"
    assert _train(small_cache, run_dir, "--max-steps", "1").exit_code == 0
    result = _precompute(tmp_path, run_dir / "checkpoint.pt")
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == (
        f"error: teacher checkpoint {run_dir / 'checkpoint.pt'} is a train-student checkpoint, kept to --resume the run; it "
        f"lacks the input size and normalisation a teacher needs. Use the run's {run_dir / 'model.pt'}, written when the run "
        "finishes (resume the run to finish it)")


# ---- show gives every size as width x height --------------------------------------------------------


@pytest.mark.parametrize("augmentation, described", [("strong", ("crop", "erase")), ("cutmix", ("crop", "mix"))])
def test_show_gives_crops_erase_boxes_and_cutmix_boxes_as_width_x_height(augmentation, described, tmp_path, make_config, helpers):
    import re

    from kdcache.augment import cache_spec
    from kdcache.format import open_cache
    from kdcache.show import describe_params

    path = tmp_path / augmentation
    helpers.run_precompute(make_config(path, augmentation=augmentation, epochs=1, block_size=128, blocks_per_unit=12))
    cache = open_cache(path)
    m, spec = cache.manifest, cache_spec(cache.manifest)
    params = cache.read_block(0, 0)["params"]
    col = {name: params[:, m.param_fields.index(name)].astype(int) for name in m.param_fields}
    boxes = {"crop": ("crop", "crop_width", "crop_height")}
    if "erase" in described:
        boxes["erase"] = ("erased", "erase_width", "erase_height")
    seen = set()
    for row in range(len(params)):
        text = describe_params(m, spec, params[row])
        for name, (word, width, height) in boxes.items():
            if f"{word} top" in text and col[width][row] != col[height][row]:
                assert re.search(rf"{word} top \d+ left \d+ {col[width][row]}x{col[height][row]}\b", text), text
                seen.add(name)
        if "mix" in described and col["mix_partner"][row] >= 0:
            w, h = col["mix_right"][row] - col["mix_left"][row], col["mix_bottom"][row] - col["mix_top"][row]
            if w != h:
                assert re.search(rf"box top \d+ left \d+ {w}x{h}\b", text), text
                seen.add("mix")
    assert seen == set(described), f"no view with a non-square box of each kind: {seen}"


# ---- MKD's meta split is the share asked for, whatever the block size -------------------------------


@pytest.mark.parametrize("block_size, fraction", [(64, 0.02), (1024, 0.02), (1024, 0.1)])
def test_the_meta_split_is_the_share_asked_for_whatever_the_block_size(block_size, fraction):
    from kdcache.plan import plan_layout
    from kdcache.sources import open_source
    from kdcache.student import meta_split

    layout, _ = plan_layout(open_source("digits"), block_size=block_size, blocks_per_unit=4, seed=0)
    held = meta_split(layout, list(range(layout.num_blocks)), fraction, seed=0)
    assert held.sum() == round(fraction * 1437)
    taken = np.flatnonzero(held)
    assert all(0 <= t % layout.block_capacity < layout.sizes[t // layout.block_capacity] for t in taken)  # real samples only
    assert np.array_equal(held, meta_split(layout, list(range(layout.num_blocks)), fraction, seed=0))


def test_the_student_never_trains_on_the_meta_split_and_meta_batches_are_only_it(small_cache):
    from kdcache.augment import cache_spec
    from kdcache.distributed import ranks_from_env
    from kdcache.format import open_cache
    from kdcache.loader import LoaderConfig, ViewLoader
    from kdcache.sources import open_source
    from kdcache.student import meta_split

    cache = open_cache(small_cache)
    m = cache.manifest
    held = meta_split(m.blocks, list(range(m.blocks.num_blocks)), 0.02, seed=0)
    common = dict(source=open_source("digits"), layout=m.blocks, plan=cache.samples(), spec=cache_spec(m), num_classes=10,
                  ranks=ranks_from_env(), cache=cache, cache_epochs=[0, 1])
    trained = ViewLoader(config=LoaderConfig(batch_size=64), slots=~held, **common)
    meta = ViewLoader(config=LoaderConfig(batch_size=int(held.sum())), slots=held, **common)
    seen = np.concatenate([batch.views[:, 1].numpy() for batch in trained.epoch_batches(0)])
    assert len(seen) == (1437 - 29) // 64 * 64 and len(np.unique(seen)) == len(seen)
    assert not held[seen].any()
    (batch,) = list(meta.epoch_batches(0))
    assert sorted(batch.views[:, 1].tolist()) == np.flatnonzero(held).tolist()


def test_mkd_says_how_many_images_its_meta_split_holds(small_cache, tmp_path, one_thread):
    result = _train(small_cache, tmp_path / "run", "--loss", "mkd", "--max-steps", "1")
    assert result.exit_code == 0, result.output
    assert ("MKD meta split: 29 of 1437 training images held out (2.0%, --meta-fraction 0.02); the student trains on the "
            "other 1408") in result.stderr
    result = _train(small_cache, tmp_path / "run2", "--loss", "mkd", "--meta-fraction", "1")
    assert result.exit_code == 2 and result.stderr.strip() == (
        "error: --meta-fraction 1.0; expected a share of the training samples between 0 and 1, e.g. 0.02")
    assert not (tmp_path / "run2").exists()


def test_a_meta_fraction_that_leaves_nothing_to_train_on_is_refused():
    from kdcache.errors import ConfigError
    from kdcache.plan import plan_layout
    from kdcache.sources import open_source
    from kdcache.student import meta_split

    layout, _ = plan_layout(open_source("digits:val"), block_size=64, blocks_per_unit=4, seed=0)
    with pytest.raises(ConfigError, match=r"^--meta-fraction 0.999 holds out 360 of the 360 training samples and leaves none"):
        meta_split(layout, list(range(layout.num_blocks)), 0.999, seed=0)


# ---- defaults that refuse a first try -----------------------------------------------------------------


def test_a_topk_above_the_class_count_stores_every_logit_and_says_so_once(tmp_path, precompute_argv, one_thread):
    from kdcache.format import open_cache

    out = tmp_path / "cache"
    result = _invoke(*precompute_argv(out, topk=11, epochs=1))
    assert result.exit_code == 0, result.output
    said = "--topk 11 is more than the teacher's 10 classes: storing all 10 logits of each view (as --topk full)"
    assert result.stderr.count(said) == 1, result.stderr
    cache = open_cache(out)
    assert cache.manifest.k == 10 and cache.read_block(0, 0)["values"].shape[1] == 10
    resumed = _invoke(*precompute_argv(out, topk=11, epochs=2, resume=True))  # the same command extends it
    assert resumed.exit_code == 0, resumed.output
    assert open_cache(out).complete_epochs() == [0, 1]


def test_a_batch_larger_than_the_views_takes_the_views_there_are(tmp_path, one_thread):
    run_dir = tmp_path / "run"
    result = _invoke("train-student", "--data", "digits:val", "--model", "test_resnet", "--loss", "ce", "--img-size", "16",
                     "--run-dir", run_dir, "--epochs", "1", "--batch-size", "512")
    assert result.exit_code == 0, result.output
    said = ("--batch-size 512 is more than the 360 training views per epoch: training with batches of 360 "
            "(set --batch-size 360 or less to choose it)")
    assert result.stderr.count(said) == 1, result.stderr
    assert json.loads((run_dir / "config.json").read_text())["batch_size"] == 360
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in steps if line["kind"] == "train"] == [1]


def test_the_default_amp_is_said_once_in_the_start_line_and_not_refused(tmp_path, one_thread):
    run_dir = tmp_path / "run"
    result = _invoke("train-student", "--data", "digits:val", "--model", "test_resnet", "--loss", "ce", "--img-size", "16",
                     "--run-dir", run_dir, "--epochs", "1", "--max-steps", "1")
    assert result.exit_code == 0, result.output
    assert "requested" not in result.stderr
    assert "training test_resnet with loss 'ce' on 1xcpu (float32, " in result.stderr
    asked = _invoke("train-student", "--data", "digits:val", "--model", "test_resnet", "--loss", "ce", "--img-size", "16",
                    "--run-dir", tmp_path / "asked", "--epochs", "1", "--max-steps", "1", "--amp", "bf16")
    assert asked.stderr.count("amp='bf16' requested; running with amp='none' on cpu") == 1, asked.stderr
    resumed = _invoke("train-student", "--data", "digits:val", "--model", "test_resnet", "--loss", "ce", "--img-size", "16",
                      "--run-dir", tmp_path / "asked", "--epochs", "1", "--max-steps", "2", "--resume")
    assert resumed.exit_code == 0, resumed.output  # a run started with --amp bf16 resumes with the default


# ---- threads ---------------------------------------------------------------------------------------------


def test_a_run_says_how_many_threads_it_uses_and_takes_threads(tmp_path, monkeypatch, precompute_argv):
    import os

    import torch

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # an idle machine
    args = ["train-student", "--data", "digits:val", "--model", "test_resnet", "--loss", "ce", "--img-size", "16",
            "--epochs", "1", "--max-steps", "1"]
    cores = len(os.sched_getaffinity(0))
    of = f"CPU thread(s) of the {cores} core(s) this process may use"
    result = _invoke(*args, "--run-dir", tmp_path / "default")
    assert (f"training test_resnet with loss 'ce' on 1xcpu (float32, {cores} {of}: 100% of the machine idle; "
            "--threads N to choose): 5 batches/epoch x 1 epochs") in result.stderr.splitlines()
    result = _invoke(*args, "--run-dir", tmp_path / "one", "--threads", "1")
    assert f"(float32, 1 {of}: --threads): " in result.stderr
    result = _invoke(*precompute_argv(tmp_path / "cache", epochs=1), "--threads", "1")
    assert result.stderr.splitlines().count(f"computing with 1 {of}: --threads") == 1, result.stderr
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    result = _invoke(*args, "--run-dir", tmp_path / "env")
    assert f"(float32, 1 {of}: OMP_NUM_THREADS): " in result.stderr
    torch.set_num_threads(before)
    assert torch.get_num_threads() == before  # the command restored what it found


def test_threads_below_one_are_refused(tmp_path, teacher_ckpt):
    result = _invoke("precompute-logits", "--data", "digits", "-o", tmp_path / "cache", "--teacher", "test_resnet",
                     "--teacher-checkpoint", teacher_ckpt, "--threads", "0")
    assert result.exit_code == 2 and result.stderr.strip() == "error: --threads 0; expected a positive number of CPU threads"
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("busy, local_ranks, idle", [(0.0, 1, 1.0), (0.5, 1, 0.5), (1.0, 1, 0.0), (3.0, 1, 0.0), (0.0, 2, 1.0)])
def test_the_default_is_the_idle_usable_cores_shared_among_local_ranks(monkeypatch, busy, local_ranks, idle):
    import os

    from kdcache.cpu import default_threads

    cores, machine = len(os.sched_getaffinity(0)), os.cpu_count()
    monkeypatch.setattr(os, "getloadavg", lambda: (busy * machine, 0.0, 0.0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_ranks))
    assert default_threads() == max(1, round(max(1, cores // local_ranks) * idle))


# ---- the run's plot names the run --------------------------------------------------------------------------


def test_run_png_is_titled_with_the_run_its_loss_and_its_cache(small_cache, tmp_path, one_thread):
    from PIL import Image

    run_dir = tmp_path / "wttm-run"
    assert _train(small_cache, run_dir, "--loss", "wttm", "--max-steps", "2").exit_code == 0
    with Image.open(run_dir / "run.png") as png:
        assert png.text["Title"] == f"wttm-run: test_resnet, loss wttm, cache {small_cache}"
    plain = tmp_path / "plain"
    result = _invoke("train-student", "--data", "digits:val", "--model", "test_resnet", "--loss", "ce", "--img-size", "16",
                     "--run-dir", plain, "--epochs", "1", "--max-steps", "1")
    assert result.exit_code == 0, result.output
    with Image.open(plain / "run.png") as png:
        assert png.text["Title"] == "plain: test_resnet, loss ce, no teacher, digits:val"
