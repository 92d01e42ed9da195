"""The public API for a loop of one's own: CacheLoader's batches are train-student's, a rank's share of
a global batch is its slice, records match the cache, the loss modules equal the loss functions,
MKDLoss's meta step moves only the temperatures, and every bad argument is one clear error."""

from __future__ import annotations

import re

import numpy as np
import pytest
import timm
import torch

from kdcache import (
    CacheLoader,
    KDLoss,
    LossConfig,
    MKDLoss,
    TTMLoss,
    WTTMLoss,
    compute_loss,
    kd_loss,
    open_cache,
    teacher_records,
)
from kdcache.augment import cache_spec
from kdcache.distributed import Ranks
from kdcache.errors import ConfigError, IncompleteCacheError, KdcacheError, MismatchError
from kdcache.loader import LoaderConfig, ViewLoader
from kdcache.sources import open_source

pytestmark = pytest.mark.usefixtures("one_thread")


def view_loader(cache_path, *, batch_size, seed=0):
    """The loader train-student builds for the same cache and seed."""
    cache = open_cache(cache_path)
    m = cache.manifest
    return ViewLoader(source=open_source("digits"), layout=m.blocks, plan=cache.samples(), spec=cache_spec(m),
                      num_classes=10, config=LoaderConfig(batch_size=batch_size, seed=seed, replay_path=m.replay["path"]),
                      ranks=Ranks(), cache=cache, cache_epochs=list(range(m.epochs)), view_seed=seed)


def test_the_batches_are_the_ones_train_student_steps_on(small_cache):
    loader = CacheLoader(small_cache, "digits", batch_size=64, seed=3)
    reference = view_loader(small_cache, batch_size=64, seed=3)
    assert len(loader) == reference.batches_per_epoch == 1437 // 64
    for epoch in (1, 2):  # epoch 2 cycles back to the cache's epoch 0
        for ours, theirs in zip(loader.epoch(epoch), reference.epoch_batches(epoch), strict=True):
            torch.testing.assert_close(ours.images, theirs.images, rtol=0, atol=0)
            torch.testing.assert_close(ours.target, theirs.target, rtol=0, atol=0)
            assert torch.equal(ours.labels, theirs.labels) and torch.equal(ours.record.values, theirs.record.values)
    loader.set_epoch(1)
    assert torch.equal(next(iter(loader)).views, next(iter(loader.epoch(1))).views)
    assert (loader.num_classes, loader.image_size, len(loader.class_names)) == (10, 32, 10)


def test_two_ranks_take_the_two_halves_of_each_global_batch(small_cache):
    whole = list(CacheLoader(small_cache, "digits", batch_size=64).epoch(0))
    halves = [list(CacheLoader(small_cache, "digits", batch_size=32, rank=r, world_size=2).epoch(0)) for r in (0, 1)]
    assert len(halves[0]) == len(halves[1]) == len(whole)
    for batch, first, second in zip(whole, *halves):
        assert torch.equal(batch.views, torch.cat([first.views, second.views]))
        torch.testing.assert_close(batch.images, torch.cat([first.images, second.images]), rtol=0, atol=0)


def test_teacher_records_are_the_cached_block_in_slot_order(small_cache):
    cache = open_cache(small_cache)
    record = teacher_records(small_cache, 1, 2)
    stored = cache.read_block(1, 2)
    assert record.num_classes == 10 and record.k == 5 and record.indices.dtype == torch.int64
    assert np.array_equal(record.values.numpy(), stored["values"]) and np.array_equal(record.indices.numpy(), stored["indices"])
    assert len(record.values) == cache.layout.sizes[2]


def test_a_held_out_block_split_leaves_the_other_blocks(small_cache):
    full = CacheLoader(small_cache, "digits", batch_size=64)
    train = CacheLoader(small_cache, "digits", batch_size=64, blocks=full.blocks[:-1])
    held = CacheLoader(small_cache, "digits", batch_size=64, blocks=full.blocks[-1:])
    slots = lambda loader: {int(s) for b in loader.epoch(0) for s in b.views[:, 1]}  # noqa: E731
    capacity = open_cache(small_cache).layout.block_capacity
    assert {s // capacity for s in slots(held)} == {full.blocks[-1]}
    assert full.blocks[-1] not in {s // capacity for s in slots(train)}


def test_eval_batches_are_centre_crops_of_the_validation_split(small_cache):
    loader = CacheLoader(small_cache, "digits", batch_size=64)
    batches = list(loader.eval_batches("digits:val", batch_size=100))
    assert [len(b) for b in batches] == [100, 100, 100, 60] and batches[0].record is None
    assert batches[0].images.shape == (100, 3, 32, 32)


@pytest.mark.parametrize(("module", "name", "hyper"), [
    (KDLoss(alpha=0.5, temperature=2.0), "kd", {"alpha": 0.5, "temperature": 2.0}),
    (TTMLoss(beta=10.0, gamma=0.5, tail="uniform"), "ttm", {"beta": 10.0, "gamma": 0.5, "tail": "uniform"}),
    (WTTMLoss(), "wttm", {}),
], ids=["kd", "ttm", "wttm"])
def test_each_loss_module_is_its_function(small_cache, module, name, hyper):
    batch = next(iter(CacheLoader(small_cache, "digits", batch_size=64).epoch(0)))
    logits = torch.randn(len(batch), 10, generator=torch.Generator().manual_seed(0), requires_grad=True)
    expected = compute_loss(LossConfig(name=name, **hyper), logits, batch.record, batch.target)
    torch.testing.assert_close(module(logits, batch.record, batch.target), expected)
    if name == "kd":
        torch.testing.assert_close(expected, kd_loss(logits, batch.record, batch.target, alpha=0.5, temperature=2.0))


def test_mkd_loss_learns_its_temperatures_and_leaves_the_student_as_it_was(small_cache):
    full = CacheLoader(small_cache, "digits", batch_size=64)
    batch = next(iter(CacheLoader(small_cache, "digits", batch_size=64, blocks=full.blocks[:-1]).epoch(0)))
    held = next(iter(CacheLoader(small_cache, "digits", batch_size=64, blocks=full.blocks[-1:]).epoch(0)))
    torch.manual_seed(0)
    student = timm.create_model("test_resnet", pretrained=False, num_classes=10).train()
    criterion = MKDLoss(10)
    start = criterion(student(batch.images), batch.record, batch.target)
    torch.testing.assert_close(start, compute_loss(LossConfig(name="mkd"), student(batch.images), batch.record, batch.target,
                                                   temperatures=(torch.tensor(4.0), torch.tensor(4.0))))
    student.zero_grad(set_to_none=True)
    before = {k: v.clone() for k, v in student.state_dict().items()}  # weights and BatchNorm statistics
    stats = criterion.meta_step(student, batch.images, batch.record, batch.target, held.images, held.target, lr=0.5)
    assert stats["teacher_temperature"] != 4.0 and criterion.meta_optimizer.state  # Adam took a step
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert all(p.grad is None for p in student.parameters())


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"batch_size": 0}, ConfigError, "batch_size=0: expected a positive number of views per rank"),
    ({"batch_size": 32, "rank": 2, "world_size": 2}, ConfigError, "rank=2, world_size=2: expected 0 <= rank < world_size"),
    ({"batch_size": 32, "device": "gpu7"}, ConfigError, "device 'gpu7' is not a torch device"),
    ({"batch_size": 32, "device": "meta"}, ConfigError, "device 'meta': expected 'cpu' or a CUDA device"),
    ({"batch_size": 32, "num_workers": -1}, ConfigError, "num_workers=-1: expected 0 or more DataLoader workers"),
    ({"batch_size": 32, "blocks": [0, 9]}, ConfigError, "blocks 0,9: the cache"),
    ({"batch_size": 32, "blocks": "01"}, ConfigError, "blocks='01': expected a sequence of block numbers"),
    ({"batch_size": 32, "blocks": [0.5]}, ConfigError, "blocks=[0.5]: expected a sequence of block numbers"),
    ({"batch_size": 2000}, ConfigError, "batch size 2000 is larger than the"),
    ({"batch_size": 32, "data": "digits:val"}, MismatchError, "data digits:val has 360 samples"),
], ids=["batch-size", "rank", "device", "meta-device", "workers", "blocks", "blocks-text", "blocks-float", "too-large",
        "other-data"])
def test_a_bad_argument_is_one_clear_error(small_cache, kwargs, error, message):
    kwargs = {"data": "digits", **kwargs}
    with pytest.raises(error, match=None) as refused:
        CacheLoader(small_cache, kwargs.pop("data"), **kwargs)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_a_cuda_device_this_machine_lacks_is_one_clear_error(small_cache):
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    expected = "this machine has no CUDA device; use 'cpu'" if count == 0 else f"this machine has {count} CUDA device(s)"
    with pytest.raises(ConfigError, match=re.escape(f"device 'cuda:{count + 7}': {expected}")):
        CacheLoader(small_cache, "digits", batch_size=32, device=f"cuda:{count + 7}")


def test_a_bad_epoch_start_batch_or_validation_split_is_one_clear_error(small_cache, tmp_path):
    loader = CacheLoader(small_cache, "digits", batch_size=64)
    with pytest.raises(ConfigError, match=r"epoch=-1: expected a training epoch >= 0"):
        loader.epoch(-1)
    for start in (-3, len(loader) + 1):  # a resume point past the epoch, refused before it can hang the loader
        with pytest.raises(ConfigError, match=rf"start_batch={start}: expected 0 to the epoch's {len(loader)} batches"):
            loader.epoch(0, start_batch=start)
    assert list(loader.epoch(0, start_batch=len(loader))) == []
    resumed = [b.views for b in loader.epoch(1, start_batch=5)]
    assert all(torch.equal(a, b) for a, b in zip(resumed, [b.views for b in list(loader.epoch(1))[5:]], strict=True))
    for size in (0, -1):
        with pytest.raises(ConfigError, match=rf"batch_size={size}: expected a positive integer"):
            loader.eval_batches("digits:val", batch_size=size)
    with pytest.raises(KdcacheError, match="classes, the cache 10"):
        next(loader.eval_batches(f"imagefolder:{make_folder(tmp_path)}"))


@pytest.mark.parametrize(("epoch", "block", "message"), [
    (2, 0, "epoch=2: the cache {} has epochs 0 to 1"), (0, 6, "block=6: the cache {} has blocks 0 to 5"),
    (-1, 0, "epoch=-1: the cache {} has epochs 0 to 1"),
], ids=["epoch", "block", "negative"])
def test_teacher_records_outside_the_cache_is_one_clear_error(small_cache, epoch, block, message):
    with pytest.raises(ConfigError) as refused:
        teacher_records(small_cache, epoch, block)
    assert str(refused.value) == message.format(open_cache(small_cache).location)


def test_the_mkd_training_loss_trains_no_temperature_and_meta_must_be_a_config(small_cache):
    from kdcache import MetaConfig

    batch = next(iter(CacheLoader(small_cache, "digits", batch_size=64).epoch(0)))
    criterion = MKDLoss(10, meta=MetaConfig(every=5))
    logits = torch.randn(len(batch), 10, requires_grad=True)
    criterion(logits, batch.record, batch.target).backward()
    assert logits.grad is not None and all(p.grad is None for p in criterion.parameters())
    with pytest.raises(ConfigError, match=r"meta=\{'every': 5\}: expected a kdcache.MetaConfig"):
        MKDLoss(10, meta={"every": 5})


def test_an_unfinished_cache_is_refused_naming_its_first_missing_unit(small_cache, tmp_path):
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(small_cache, partial)
    (partial / "ledger" / "e000001-u000002.json").unlink()
    for index in (partial / "ledger" / "epochs").glob("*.json"):
        index.unlink()
    with pytest.raises(IncompleteCacheError, match=r"epoch 1 unit 2 is not committed \(5 of 6 units\)"):
        CacheLoader(partial, "digits", batch_size=64)


def make_folder(root):
    """An image folder of 3 classes, one image each."""
    from PIL import Image

    for name in ("a", "b", "c"):
        (root / "folder" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8), color=(10, 20, 30)).save(root / "folder" / name / "x.png")
    return root / "folder"


def test_with_workers_two_ranks_still_take_the_halves_of_each_global_batch(small_cache):
    whole = [b.views for b in CacheLoader(small_cache, "digits", batch_size=64, num_workers=2).epoch(1)]
    halves = [[b.views for b in CacheLoader(small_cache, "digits", batch_size=32, rank=r, world_size=2, num_workers=2).epoch(1)]
              for r in (0, 1)]
    assert len(whole) == len(halves[0]) == len(halves[1])
    assert all(torch.equal(w, torch.cat([a, b])) for w, a, b in zip(whole, *halves))
