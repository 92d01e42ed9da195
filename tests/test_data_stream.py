"""Training starts without a pass over the data: sample digests are checked as blocks stream, and a
sample that differs stops the run before the step that would use it, naming the sample, its block and
the cache. ``--check-data`` keeps the full check before the first step."""

from __future__ import annotations


import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from kdcache.checkpoint import CHECKPOINT_NAME, load_checkpoint
from kdcache.format import open_cache
from kdcache.loader import LoaderConfig, _EpochPlan
from kdcache.runlog import read_metrics
from kdcache.teacher import TeacherConfig
from kdcache_cli.main import app

pytestmark = pytest.mark.usefixtures("one_thread")

BATCH = 8


@pytest.fixture(scope="module")
def folder_cache(tmp_path_factory, teacher_ckpt, helpers):
    """10 classes x 4 PNG images, cached in blocks of 16, 16 and 8 (one unit each), one epoch."""
    from kdcache.precompute import PrecomputeConfig

    root = tmp_path_factory.mktemp("stream")
    rng = np.random.default_rng(0)
    for c in range(10):
        (root / "images" / f"c{c}").mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / "images" / f"c{c}" / f"{i}.png")
    helpers.run_precompute(PrecomputeConfig(data=f"imagefolder:{root / 'images'}", output=str(root / "cache"), block_size=16,
                                            blocks_per_unit=1, epochs=1, topk=5,
                                            teacher=TeacherConfig(model="test_resnet", checkpoint=str(teacher_ckpt))))
    return root / "images", root / "cache"


def steps_before(cache_path, block: int) -> int:
    """Batches of training epoch 0 (seed 0, no workers) that come before the first one holding a view of ``block``."""
    cache = open_cache(cache_path)
    views = type("Views", (), {"layout": cache.layout})()  # the epoch plan reads only the layout
    plan = _EpochPlan(views, list(range(cache.layout.num_blocks)), LoaderConfig(batch_size=BATCH), 0, 0)
    done = 0
    for members in plan.windows:
        if block in set(members[:, 0].tolist()):
            return done
        done += len(members) // BATCH
    raise AssertionError(f"block {block} is never read")


def train_args(cache, data, run_dir, *extra) -> list[str]:
    return [str(a) for a in ["train-student", "--cache", cache, "--data", data, "--model", "test_resnet", "--run-dir", run_dir,
                             "--epochs", 1, "--batch-size", BATCH, "--device", "cpu", "--amp", "none", "--log-every", 1,
                             "--checkpoint-every", 1, *extra]]


def test_a_replaced_image_stops_training_at_its_block_naming_it(folder_cache, tmp_path, helpers):
    _, cache = folder_cache
    order = sorted(range(3), key=lambda b: steps_before(cache, b))
    last = order[-1]  # read last: some steps run first, on the other blocks
    copy, key = helpers.redraw_first_sample(folder_cache, tmp_path, last)
    data = f"imagefolder:{copy}"
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(app, train_args(cache, data, run_dir))
    assert result.exit_code == 4, result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: data {data} block {last} of the cache {cache}: sample {key!r} differs from the cache's dataset")
    assert line.endswith("; training stopped before any step on this block") and "Traceback" not in result.output
    expected = steps_before(cache, last)
    assert expected > 0
    steps = [m["step"] for m in read_metrics(run_dir / "metrics.jsonl") if m["kind"] == "train"]
    assert steps == list(range(1, expected + 1))  # every step before the block, none after
    assert load_checkpoint(run_dir / CHECKPOINT_NAME)["position"]["step"] == expected


def test_a_replaced_image_in_the_first_block_read_stops_before_the_first_step(folder_cache, tmp_path, helpers):
    _, cache = folder_cache
    first = min(range(3), key=lambda b: steps_before(cache, b))
    copy, key = helpers.redraw_first_sample(folder_cache, tmp_path, first)
    data = f"imagefolder:{copy}"
    result = CliRunner().invoke(app, train_args(cache, data, tmp_path / "run"))
    assert result.exit_code == 4 and repr(key) in result.stderr and f"block {first} " in result.stderr
    assert not (tmp_path / "run" / CHECKPOINT_NAME).exists()


def test_check_data_refuses_before_anything_is_written(folder_cache, tmp_path, helpers):
    _, cache = folder_cache
    last = max(range(3), key=lambda b: steps_before(cache, b))
    copy, key = helpers.redraw_first_sample(folder_cache, tmp_path, last)
    data = f"imagefolder:{copy}"
    result = CliRunner().invoke(app, train_args(cache, data, tmp_path / "run", "--check-data"))
    assert result.exit_code == 4 and repr(key) in result.stderr and f"block {last})" in result.stderr
    assert not (tmp_path / "run").exists()
