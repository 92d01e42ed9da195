"""Checks on Debian's real Fashion-MNIST (the package dataset-fashion-mnist), run by .ci/run after it installs it.

README's test command does not collect this file (its name does not match test_*.py): a fresh machine
has no such package, and the suite tests the format and its error paths on IDX files it writes itself
(tests/fashion_mnist.py). Run it by name, as .ci/run does:

    python -m pytest -q tests/real_data.py

Without the package every test here fails, naming the directory it expected; none is skipped.
"""

from __future__ import annotations

import gzip
import os
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from kdcache.shards import brace_pattern
from kdcache.sources import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, decode_sample, open_source
from kdcache_cli.main import app

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"train": 60000, "val": 10000}


def raw_idx(split: str, kind: str) -> np.ndarray:
    """One of Debian's files, parsed here without kdcache: labels (n,) or images (n, 28, 28)."""
    prefix = "train" if split == "train" else "t10k"
    name = f"{prefix}-{kind}-idx{1 if kind == 'labels' else 3}-ubyte.gz"
    with gzip.open(os.path.join(FASHION_MNIST_DIR, name)) as f:
        raw = f.read()
    if kind == "labels":
        return np.frombuffer(raw, np.uint8, offset=8)
    return np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)


def refusal(result) -> str:
    """The one `error:` line of a refused command (non-zero exit, no traceback)."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), f"escaped: {result.exception!r}\n{result.output}"
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.stderr
    return errors[0]


@pytest.mark.parametrize("split", ["train", "val"])
def test_debians_files_read_in_full(split):
    source = open_source("fashion-mnist" if split == "train" else "fashion-mnist:val")
    labels, images = raw_idx(split, "labels"), raw_idx(split, "images")
    assert len(source) == len(labels) == len(images) == SIZES[split]
    assert source.uri == f"fashion-mnist:{FASHION_MNIST_DIR}:{split}"
    assert (source.class_names, source.num_classes) == (FASHION_MNIST_CLASSES, 10)
    samples = list(source.iter_samples(chunk_size=5000))
    np.testing.assert_array_equal([s.label for s in samples], labels)
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), [SIZES[split] // 10] * 10)  # balanced classes
    assert samples[-1].key == f"fmnist-{split}-{SIZES[split] - 1:05d}"
    for i in (0, SIZES[split] // 2, SIZES[split] - 1):
        image = decode_sample(samples[i])
        assert (image.mode, image.size) == ("RGB", (28, 28))
        np.testing.assert_array_equal(np.asarray(image)[..., 0], images[i])
    assert len({s.digest for s in samples}) > 0.99 * len(samples)  # digests tell images apart


def test_readme_make_shards_command_on_debians_files(tmp_path, monkeypatch):
    line = next(line for line in (ROOT / "README.md").read_text().splitlines() if "kdcache make-shards" in line)
    args = shlex.split(line.split("#")[0])
    assert args[:2] == ["kdcache", "make-shards"] and "--output" in args
    output = args.index("--output") + 1
    pattern = os.path.basename(args[output])
    args[output] = str(tmp_path / pattern)
    result = CliRunner().invoke(app, args[1:] + ["--max-samples", "2500"])
    assert result.exit_code == 0, result.output
    paths = result.stdout.split()
    assert paths == [str(tmp_path / pattern) % i for i in range(3)]  # 1000 samples per shard
    shards = open_source(brace_pattern(str(tmp_path / pattern), len(paths)))
    source = open_source("fashion-mnist")
    assert len(shards) == 2500 and shards.class_names == FASHION_MNIST_CLASSES
    copied, original = shards.read(range(0, 2500, 7)), source.read(range(0, 2500, 7))
    assert [(s.key, s.label) for s in copied] == [(s.key, s.label) for s in original]
    for a, b in zip(copied, original):
        np.testing.assert_array_equal(np.asarray(decode_sample(a)), np.asarray(decode_sample(b)))


def test_a_digits_cache_refuses_debians_fashion_mnist_before_anything_is_written(tmp_path, cache_copy, helpers,
                                                                                 precompute_argv):
    cache, before = cache_copy
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(app, ["train-student", "--cache", str(cache), "--data", "fashion-mnist",
                                      "--model", "test_resnet", "--run-dir", str(run_dir), "--epochs", "1",
                                      "--amp", "none", "--device", "cpu"])
    line = refusal(result)
    assert re.search(r"data fashion-mnist has 60000 samples, .* made from 1437", line), line
    assert result.exit_code == 4 and not run_dir.exists()
    result = CliRunner().invoke(app, precompute_argv(cache, data="fashion-mnist", resume=True))
    line = refusal(result)
    assert "cannot resume" in line and "60000" in line and "1437" in line, line
    assert result.exit_code == 4 and helpers.tree_hashes(cache) == before
