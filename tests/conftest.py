"""Shared fixtures for the stage-one tests: a tiny deterministic teacher, configs, a small cache.

Everything runs on scikit-learn's digits and timm's ``test_resnet`` (pretrained=False) with one
intra-op thread: on a 2-core machine shared with subprocess ranks, more threads only contend.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import shutil
import socket
import sys
import threading
import types
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
from fashion_mnist import random_images, write_fashion_mnist
from threads import single_thread

#: The small configuration every stage-one test starts from (digits: 1,437 train images).
SMALL = dict(
    data="digits",
    augmentation="light",
    epochs=2,
    seed=0,
    topk=5,
    block_size=256,  # 6 blocks
    blocks_per_unit=2,  # 3 units per epoch
    batch_size=256,
)


@pytest.fixture
def one_thread():
    with single_thread():
        yield


def save_teacher(path: Path, *, seed: int = 0, num_classes: int = 10) -> Path:
    """A tiny timm teacher checkpoint with a 32x32 input and (0.5, 0.5, 0.5) normalisation."""
    import timm

    from kdcache.teacher import MODEL_META_KEY

    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=num_classes)
    meta = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear"}
    torch.save({"state_dict": model.state_dict(), MODEL_META_KEY: meta}, path)
    return path


@pytest.fixture(scope="session")
def make_teacher(tmp_path_factory):
    """``make_teacher(seed=0, num_classes=10) -> Path`` of a saved checkpoint (made once per arguments)."""
    folder = tmp_path_factory.mktemp("teachers")
    made: dict[tuple[int, int], Path] = {}

    def make(*, seed: int = 0, num_classes: int = 10) -> Path:
        if (seed, num_classes) not in made:
            made[seed, num_classes] = save_teacher(folder / f"test_resnet-s{seed}-c{num_classes}.pt", seed=seed, num_classes=num_classes)
        return made[seed, num_classes]

    return make


@pytest.fixture(scope="session")
def teacher_ckpt(make_teacher) -> Path:
    return make_teacher()


@pytest.fixture(scope="session")
def make_config(teacher_ckpt):
    """``make_config(output, **overrides) -> PrecomputeConfig`` on digits with small blocks."""
    from kdcache.precompute import PrecomputeConfig
    from kdcache.teacher import TeacherConfig

    def make(output, **overrides) -> PrecomputeConfig:
        fields = dict(SMALL)
        checkpoint = overrides.pop("checkpoint", teacher_ckpt)
        fields.update(overrides)
        teacher = TeacherConfig(model="test_resnet", checkpoint=str(checkpoint))
        return PrecomputeConfig(output=str(output), teacher=teacher, command="pytest", **fields)

    return make


@pytest.fixture(scope="session")
def precompute_argv(teacher_ckpt):
    """``precompute_argv(output, **overrides) -> list[str]``: the CLI arguments of ``make_config``."""

    def argv(output, **overrides) -> list[str]:
        fields = dict(SMALL)
        fields["checkpoint"] = teacher_ckpt
        fields.update(overrides)
        flags = {
            "data": "--data", "augmentation": "--augmentation", "epochs": "--epochs", "seed": "--seed",
            "topk": "--topk", "block_size": "--block-size", "blocks_per_unit": "--blocks-per-unit",
            "batch_size": "--batch-size", "checkpoint": "--teacher-checkpoint", "num_classes": "--num-classes",
            "teacher": "--teacher", "split": "--split",
        }
        args = ["precompute-logits", "--output", str(output), "--teacher", str(fields.pop("teacher", "test_resnet"))]
        resume = fields.pop("resume", False)
        for name, value in fields.items():
            args += [flags[name], str(value)]
        return args + (["--resume"] if resume else [])

    return argv


def run_precompute(config):
    """Run a precompute in this process; one bounded by ``max_units`` may leave the cache unfinished on purpose."""
    from kdcache.errors import UnfinishedCacheError
    from kdcache.precompute import precompute_logits

    with single_thread():
        try:
            return precompute_logits(config, log=lambda message: None)
        except UnfinishedCacheError as exc:
            if config.max_units is None:
                raise
            return exc.result


@pytest.fixture(scope="session")
def small_cache(tmp_path_factory, make_config) -> Path:
    """digits, light, 2 epochs, top-5: 6 blocks of 256, 3 units per epoch. Treat as read-only."""
    path = tmp_path_factory.mktemp("small") / "cache"
    run_precompute(make_config(path))
    return path


@pytest.fixture(scope="session")
def trained_teacher(tmp_path_factory):
    """``trained_teacher(seed=0) -> (checkpoint, top-1 on digits:val)``: test_resnet trained 6 epochs on digits at
    32x32 with loss ce (how teachers are made), once per seed for the whole session. Treat as read-only."""
    from kdcache.losses import LossConfig
    from kdcache.student import StudentConfig, train_student

    root = tmp_path_factory.mktemp("trained-teachers")
    made: dict[int, tuple[Path, float]] = {}

    def make(seed: int = 0) -> tuple[Path, float]:
        if seed not in made:
            run_dir = root / f"s{seed}"
            with single_thread():
                result = train_student(StudentConfig(
                    data="digits", model="test_resnet", run_dir=str(run_dir), loss=LossConfig(name="ce"), img_size=32,
                    epochs=6, seed=seed, val_data="digits:val", batch_size=64, lr=3e-3, weight_decay=0.01, amp="none",
                    device="cpu", log_every=100,
                ), log=lambda message: None)
            made[seed] = run_dir / "model.pt", result.final_top1
        return made[seed]

    return make


@pytest.fixture(scope="session")
def trained_cache(tmp_path_factory, trained_teacher) -> Path:
    """A 2-epoch top-5 cache of digits (blocks of 256, 2 per unit) by ``trained_teacher(0)``. Treat as read-only."""
    from kdcache.precompute import PrecomputeConfig
    from kdcache.teacher import TeacherConfig

    path = tmp_path_factory.mktemp("trained-cache") / "cache"
    checkpoint, _ = trained_teacher(0)
    run_precompute(PrecomputeConfig(data="digits", output=str(path), epochs=2, topk=5, block_size=256, blocks_per_unit=2,
                                    teacher=TeacherConfig(model="test_resnet", checkpoint=str(checkpoint))))
    return path


@pytest.fixture
def cache_copy(small_cache, tmp_path, helpers):
    """A private copy of small_cache, and its file hashes (to check that a refusal changes nothing)."""
    path = tmp_path / "cache"
    shutil.copytree(small_cache, path)
    return path, helpers.tree_hashes(path)


@pytest.fixture(scope="session")
def fashion_mnist_dir(tmp_path_factory) -> str:
    """A Fashion-MNIST directory as Debian lays it out (gzipped IDX files), with 40 train and 10 val
    images of 28x28, labels 0-9 in turn. Treat as read-only."""
    directory = tmp_path_factory.mktemp("fashion-mnist")
    write_fashion_mnist(directory, labels=np.arange(40) % 10, images=random_images(40, seed=1), compress=True)
    write_fashion_mnist(directory, split="val", labels=np.arange(10), images=random_images(10, seed=2), compress=True)
    return str(directory)


@pytest.fixture(scope="session")
def subprocess_env() -> dict:
    """The environment of a `kdcache` subprocess: offline, one thread per process."""
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def cli_command() -> list[str]:
    return [sys.executable, "-m", "kdcache_cli.main"]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def serve_directory():
    """``serve_directory(root) -> url``: a real http.server on 127.0.0.1 serving ``root`` until the test ends."""
    servers = []

    def serve(root) -> str:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tree_hashes(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path``, by relative path."""
    path = Path(path)
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def all_records(path) -> dict[tuple[int, int], dict[str, np.ndarray]]:
    """Every committed unit's record arrays (checksums verified), keyed by (epoch, unit)."""
    from kdcache.format import open_cache

    cache = open_cache(path)
    return {key: cache.read_unit(*key) for key in sorted(cache.ledger)}


def assert_same_records(got: dict, want: dict) -> None:
    """Same units, and all four arrays of each byte-identical (dtype, shape and bytes)."""
    assert sorted(got) == sorted(want)
    for key in want:
        for name, array in want[key].items():
            other = got[key][name]
            assert other.dtype == array.dtype and other.shape == array.shape, (key, name)
            assert other.tobytes() == array.tobytes(), f"epoch {key[0]} unit {key[1]}: {name} differs"


def assert_same_cache(remote, here) -> None:
    """Two opened caches (e.g. a served copy and the local one) hold the same manifest, plan and records."""
    assert remote.manifest == here.manifest and sorted(remote.ledger) == sorted(here.ledger)
    for name, array in here.samples().items():
        np.testing.assert_array_equal(remote.samples()[name], array)
    for epoch in sorted({e for e, _ in here.ledger}):
        for block in range(here.layout.num_blocks):
            for name, array in here.read_block(epoch, block).items():
                np.testing.assert_array_equal(remote.read_block(epoch, block)[name], array)


def redraw_first_sample(folder_cache: tuple[Path, Path], tmp_path: Path, block: int) -> tuple[Path, str]:
    """A copy of a cached image folder with the first sample of ``block`` redrawn; returns the copy and that sample's key."""
    from PIL import Image

    from kdcache.format import open_cache

    images, cache = folder_cache
    copy = tmp_path / "images"
    shutil.copytree(images, copy)
    c = open_cache(cache)
    key = str(c.samples()["key"][c.layout.block_slots(block)][0])
    Image.fromarray(np.full((12, 12, 3), 7, dtype=np.uint8)).save(copy / f"{key}.png")
    return copy, key


@pytest.fixture(scope="session")
def helpers():
    """The module-level helpers above, for test modules (conftest is not imported by name)."""

    functions = (tree_hashes, all_records, assert_same_records, assert_same_cache, run_precompute, cli_command, free_port, save_teacher,
                 redraw_first_sample)
    return types.SimpleNamespace(SMALL=SMALL, **{fn.__name__: fn for fn in functions})
