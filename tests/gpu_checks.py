"""Checks of the CUDA-only parts of the device path, for a GPU host: nvJPEG, side streams, bf16, channels-last.

README's test command does not collect this file (its name does not match test_*.py): CI has no
GPU. On a machine with one, run it by name (a few minutes; a small photo folder and a tiny teacher):

    python -m pytest -q tests/gpu_checks.py

Without CUDA every test here fails saying so; none is skipped. Each check is one that the CPU
suite makes on CPU tensors (tests/test_device_replay.py), made again where the code differs:

- a cache made on the device path on CUDA records nvjpeg and channels-last and verifies exactly;
- a view's pixels do not depend on its batch on CUDA either, for every preset and op;
- train-student's and CacheLoader's batches, moved a batch ahead on a stream of their own, are the
  teacher's views, bit for bit, and the same as batches moved in series;
- precompute with worker processes (decoded ahead in a thread on its own stream) writes the
  records of precompute without them;
- torchvision's nvJPEG decoder writes its outputs from a stream that does not wait for the
  caller's (docs/reliability.md): ``decode_on_device`` must never let it overwrite memory that
  queued kernels still read.

``KDCACHE_CHECK_DEVICE=cpu`` runs the same checks on the CPU (all but the nvJPEG one), to try this
file on a machine without a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from kdcache import CacheLoader, open_cache
from kdcache.augment import DEFAULT_RANDAUG_OPS, PRESETS, AugSpec, cache_spec, preset, sample_view_params
from kdcache.batch import batches_on_device
from kdcache.losses import LossConfig
from kdcache.precompute import PrecomputeConfig, precompute_logits
from kdcache.replay import EncodedImages, replay_block
from kdcache.sources import decode_on_device, image_header, open_source
from kdcache.student import StudentConfig, train_student
from kdcache.teacher import TeacherConfig
from kdcache.verify import VerifyConfig, verify_cache

ROOT = Path(__file__).resolve().parents[1]
DEVICE = torch.device(os.environ.get("KDCACHE_CHECK_DEVICE", "cuda"))
JPEGS = 30  # photos.py --count; --odd 1 adds a PNG, a palette PNG, a 16-bit PNG and a CMYK JPEG
ODD = Counter({"host png RGB": 1, "host png P": 1, "host png I;16": 1, "host jpeg CMYK": 1})


@pytest.fixture(scope="module", autouse=True)
def needs_the_device():
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        pytest.fail("tests/gpu_checks.py checks the CUDA paths and this machine has no CUDA device "
                    "(torch.cuda.is_available() is False); on a CPU, tests/test_device_replay.py checks the same code")
    if DEVICE.type == "cpu" and torch.cuda.is_available():
        pytest.fail("KDCACHE_CHECK_DEVICE=cpu on a machine with CUDA: precompute and verify would run on CUDA anyway")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("photos")
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "photos.py"), "--out", str(out), "--count", str(JPEGS),
                    "--odd", "1", "--photos", "sklearn"], check=True, capture_output=True)
    return out / "images"


def make_cache(out: Path, photos: Path, teacher: TeacherConfig, **options):
    config = PrecomputeConfig(data=f"imagefolder:{photos}", output=str(out), teacher=teacher, augmentation="strong",
                              epochs=2, topk=2, block_size=8, blocks_per_unit=2, batch_size=16, replay_path="device",
                              command="gpu_checks", **options)
    return precompute_logits(config, log=lambda line: None)


@pytest.fixture(scope="module")
def device_cache(tmp_path_factory, photos, make_teacher):
    """The photos' cache on the device path, made where precompute runs (CUDA on a GPU host)."""
    out = tmp_path_factory.mktemp("device-cache") / "cache"
    teacher = TeacherConfig(model="test_resnet", checkpoint=str(make_teacher(num_classes=2)))
    return out, teacher, make_cache(out, photos, teacher)


def test_the_cache_records_where_it_was_decoded_and_replayed(device_cache):
    out, _, result = device_cache
    replay = open_cache(out).manifest.replay
    on_cuda = DEVICE.type == "cuda"
    assert (replay["path"], replay["device"]) == ("device", DEVICE.type)
    assert replay["decoder"] == ("nvjpeg" if on_cuda else "libjpeg-turbo")
    assert bool(replay.get("teacher_channels_last")) == on_cuda
    assert result.decoded == {"device": 2 * JPEGS, **{kind: 2 * n for kind, n in ODD.items()}}


def test_the_cache_verifies_exactly_where_it_was_made(device_cache, photos):
    out, teacher, _ = device_cache
    lines = []
    report = verify_cache(VerifyConfig(cache=str(out), data=f"imagefolder:{photos}", teacher=teacher,
                                       views=2 * (JPEGS + 4)), log=lines.append)
    print(lines[-1])
    assert report.ok and report.views_checked == 2 * (JPEGS + 4) and report.replay_path == "device"
    assert report.max_abs_diff == 0.0  # the same pixels, the same bf16 channels-last teacher, the same batches


def specs() -> dict[str, AugSpec]:
    found = {name: preset(name, output_size=64, mean=(0.5,) * 3, std=(0.5,) * 3) for name in PRESETS}
    for op in DEFAULT_RANDAUG_OPS:
        found[op] = AugSpec(output_size=64, randaug_n=2, randaug_prob=1.0, randaug_ops=(op,), randaug_mstd=3.0)
    return found


SPECS = specs()


@pytest.mark.parametrize("name", list(SPECS))
def test_a_view_is_the_same_tensor_in_any_batch(photos, name):
    spec = SPECS[name]
    source = open_source(f"imagefolder:{photos}")
    images = EncodedImages(source.read(range(len(source))))
    params = sample_view_params(spec, seed=3, epoch=0, block_id=0, sample_ids=np.arange(len(images)),
                                image_sizes=images.sizes())
    whole = replay_block(spec, params, images, path="device", device=DEVICE)
    assert whole.device.type == DEVICE.type
    rng = np.random.default_rng(0)
    for size in (1, 5, 11):
        positions = np.sort(rng.choice(len(images), size=size, replace=False))
        part = replay_block(spec, params, images, positions=positions, path="device", device=DEVICE)
        torch.testing.assert_close(part, whole[positions], rtol=0, atol=0)
    torch.testing.assert_close(replay_block(spec, params, images, path="device", device=DEVICE), whole, rtol=0, atol=0)


def test_the_students_batches_are_the_teachers_views(device_cache, photos):
    """CacheLoader on the device: each batch moved a batch ahead, on its own stream, while the last one is used."""
    out, _, _ = device_cache
    cache = open_cache(out)
    m, spec, plan = cache.manifest, cache_spec(cache.manifest), cache.samples()
    source = open_source(f"imagefolder:{photos}")
    loader = CacheLoader(str(out), f"imagefolder:{photos}", batch_size=6, seed=4, device=DEVICE)
    checked = 0
    for epoch in (0, 1):
        for batch in loader.epoch(epoch):
            assert batch.images.device.type == DEVICE.type and batch.record.values.device.type == DEVICE.type
            for view, image in zip(batch.views.tolist(), batch.images):
                cache_epoch, slot = view
                block, position = divmod(slot, m.blocks.block_capacity)
                samples = source.read(plan["source_index"][m.blocks.block_slots(block)])
                want = replay_block(spec, cache.read_block(cache_epoch, block)["params"], EncodedImages(samples),
                                    positions=[position], path="device", device=DEVICE)[0]
                torch.testing.assert_close(image, want, rtol=0, atol=0)
                checked += 1
    assert checked == 2 * ((JPEGS + 4) // 6) * 6
    assert loader.decoded["device"] > 0


def test_moving_a_batch_ahead_changes_no_value(device_cache, photos):
    out, _, _ = device_cache
    loader = CacheLoader(str(out), f"imagefolder:{photos}", batch_size=6, seed=5, device=DEVICE)
    inline = list(batches_on_device(loader._loader.epoch_batches(0, 0), DEVICE, ahead=False))
    ahead = list(batches_on_device(loader._loader.epoch_batches(0, 0), DEVICE, ahead=True))
    assert len(inline) == len(ahead) > 0
    for want, got in zip(inline, ahead):
        for a, b in zip(want.tensors(), got.tensors(), strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_workers_write_the_records_of_no_workers(device_cache, photos, tmp_path):
    out, teacher, _ = device_cache
    other = tmp_path / "with-workers"
    result = make_cache(other, photos, teacher, workers=2)
    assert result.decoded == {"device": 2 * JPEGS, **{kind: 2 * n for kind, n in ODD.items()}}  # decoded in this process
    first, second = open_cache(out), open_cache(other)
    for epoch in range(2):
        for block in range(first.layout.num_blocks):
            a, b = first.read_block(epoch, block), second.read_block(epoch, block)
            for name in ("values", "indices", "tail", "params"):
                assert np.array_equal(a[name], b[name]), (epoch, block, name)


def test_train_student_on_the_device_path_says_where_it_decoded(device_cache, photos, tmp_path):
    out, _, _ = device_cache
    lines = []
    result = train_student(StudentConfig(data=f"imagefolder:{photos}", model="test_resnet", run_dir=str(tmp_path / "run"),
                                         cache=str(out), loss=LossConfig(name="kd"), epochs=2, batch_size=8,
                                         device=DEVICE.type),
                           log=lines.append)
    assert result.images_per_s > 0
    assert any(f"decoded on {DEVICE.type}" in line for line in lines), lines


def test_nvjpeg_never_writes_memory_that_queued_kernels_still_read(photos):
    """Blocks freed while queued kernels still read them, then a decode: the kernels must read what was there."""
    if DEVICE.type != "cuda":
        pytest.fail("the nvJPEG check needs CUDA")
    source = open_source(f"imagefolder:{photos}")
    samples = [s for s in source.read(range(len(source))) if image_header(s).device_decodable]
    headers = [image_header(s) for s in samples]

    def corrupted(decode) -> int:
        wrong = 0
        for trial in range(10):
            filled = [torch.full((3, h.height, h.width), 7 + trial, dtype=torch.uint8, device=DEVICE) for h in headers]
            torch.cuda.synchronize(DEVICE)
            torch.cuda._sleep(200_000_000)  # a long kernel first, so the sums below are still queued at the decode
            sums = [t.sum(dtype=torch.int64) for t in filled]
            expected = [(7 + trial) * t.numel() for t in filled]
            del filled  # their blocks are free for the next allocation on this stream, the sums still to run
            decode()
            torch.cuda.synchronize(DEVICE)
            wrong += sum(int(s) != e for s, e in zip(sums, expected))
        return wrong

    from torchvision.io import ImageReadMode, decode_jpeg

    data = [torch.frombuffer(bytearray(s.data), dtype=torch.uint8) for s in samples]
    print(f"torchvision's decode_jpeg alone: {corrupted(lambda: decode_jpeg(data, mode=ImageReadMode.RGB, device=DEVICE))} "
          f"of {10 * len(samples)} sums read overwritten memory")
    assert corrupted(lambda: decode_on_device(samples, headers, DEVICE)) == 0
