"""benchmarks/tuples.py: the pairs and triples shards hold the items of their class, reproducibly."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kdcache import ConfigError
from kdcache.shards import write_shards
from kdcache.sources import DigitsSource, decode_native, open_source

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import tuples  # noqa: E402


def write(out: Path, name: str, *, seed: int = 0, train: int = 1, val: int = 1) -> None:
    args = argparse.Namespace(sizes=(name,), source="digits", seed=seed, train_per_class={name: train},
                              val_per_class={name: val}, samples_per_shard=400, image_format="npy")
    tuples.write_data(out, args)


def cells(image: np.ndarray) -> list[np.ndarray]:
    h, w = image.shape[0] // 2, image.shape[1] // 2
    return [image[r * h : (r + 1) * h, c * w : (c + 1) * w] for r in range(2) for c in range(2)]


@pytest.mark.parametrize("name, classes", [("triples", 1000), ("pairs", 100)])
def test_each_shard_sample_shows_the_items_of_its_class(tmp_path, name, classes):
    write(tmp_path, name, train=1, val=2)
    arity = tuples.ARITIES[name]
    digits = {split: DigitsSource(split=split) for split in ("train", "val")}
    base = {split: [(np.asarray(decode_native(s.data)), s.label) for s in d.iter_samples()] for split, d in digits.items()}
    for split, per_class in (("train", 1), ("val", 2)):
        source = open_source(tuples.shard_pattern(tmp_path, name, split))
        assert source.num_classes == classes and len(source) == classes * per_class
        assert source.class_names[classes - 1] == "|".join(["9"] * arity)
        samples = list(source.iter_samples())
        assert np.bincount([s.label for s in samples], minlength=classes).tolist() == [per_class] * classes
        assert len({s.label for s in samples[:20]}) > 10  # shuffled: a shard holds many classes
        images = {image.tobytes(): label for image, label in base[split]}
        for sample in samples:
            image = np.asarray(decode_native(sample.data))
            assert image.shape == (16, 16)
            items = cells(image)[:arity]
            # each cell is an image of the split's own digits whose class is that item of the tuple
            assert [images[cell.tobytes()] for cell in items] == [int(d) for d in f"{sample.label:0{arity}d}"]
            assert all(not cell.any() for cell in cells(image)[arity:])


def test_the_same_seed_gives_the_same_bytes_and_another_seed_others(tmp_path):
    for run, seed in (("a", 0), ("b", 0), ("c", 1)):
        write(tmp_path / run, "triples", seed=seed)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert Path("triples/train-000002.tar") in files and Path("triples/classes.txt") in files
    for path in files:
        assert (tmp_path / "a" / path).read_bytes() == (tmp_path / "b" / path).read_bytes(), path
    assert (tmp_path / "a/triples/train-000000.tar").read_bytes() != (tmp_path / "c/triples/train-000000.tar").read_bytes()


def test_tuples_refuse_a_base_source_without_ten_classes(tmp_path):
    write(tmp_path, "pairs")
    with pytest.raises(ConfigError, match="has 100 classes; tuples need 10"):
        tuples.TupleSource(open_source(tuples.shard_pattern(tmp_path, "pairs", "val")), arity=3, per_class=1, seed=0)
    write_shards(DigitsSource(split="val"), str(tmp_path / "few" / "part-%02d.tar"), max_samples=5)
    with pytest.raises(ConfigError, match=r"has no images of classes \["):
        tuples.TupleSource(open_source(str(tmp_path / "few" / "part-00.tar")), arity=2, per_class=1, seed=0)


def test_data_made_with_other_options_is_refused_not_mixed(tmp_path):
    write(tmp_path, "pairs", seed=0)
    before = (tmp_path / "pairs" / "train-000000.tar").read_bytes()
    write(tmp_path, "pairs", seed=0)  # the same options: the finished step is skipped
    with pytest.raises(SystemExit, match=r"error: .*pairs holds data made with .*'seed': 0.*'seed': 1.*remove it"):
        write(tmp_path, "pairs", seed=1)
    assert (tmp_path / "pairs" / "train-000000.tar").read_bytes() == before


@pytest.mark.parametrize("arity, per_class, message", [(4, 1, "arity 4"), (3, 0, "samples per class 0")])
def test_tuples_refuse_bad_sizes(arity, per_class, message):
    with pytest.raises(ConfigError, match=message):
        tuples.TupleSource(DigitsSource(split="val"), arity=arity, per_class=per_class, seed=0)


@pytest.mark.parametrize("args, message", [
    (["teacher"], "error: no train shards in"),
    (["tail"], "error: no reference logits"),
    (["data", "--train-per-class", "0"], "error: --train-per-class is 0; expected at least 1"),
    (["data", "--quick", "--image-format", "gif"], "error: image_format 'gif'"),
])
def test_the_script_says_what_is_missing_in_one_line(tmp_path, args, message):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tuples.py"), *args, "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode != 0
    assert done.stderr.strip().startswith(message) and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_quick_run_leaves_a_reference_that_agrees_with_its_cache(tmp_path):
    import json

    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tuples.py"), "all", "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    reference = tmp_path / "reference-triples"
    logits, features = np.load(reference / "logits.npy"), np.load(reference / "features.npy")
    labels, views = np.load(reference / "labels.npy"), np.load(reference / "views.npy")
    assert logits.shape == (256, 1000) and logits.dtype == np.float32
    assert features.shape[0] == 256 and features.dtype == np.float32
    assert labels.shape == (256,) and views.shape == (256, 2) and len({tuple(v) for v in views.tolist()}) == 256
    summary = json.loads((reference / "reference.json").read_text())
    # the views replayed through CacheLoader are the ones precompute scored: the same top-10, bit for bit in fp16
    assert summary["against_the_cache"] == {"top10_indices_equal": 1.0, "top10_value_max_abs_error": 0.0}
    assert summary["data"]["classes"] == 1000 and summary["views"]["count"] == 256
    assert "outside top-10, gamma=0.25" in done.stdout and "top-10 mass, T=4" in done.stdout
    tail = json.loads((reference / "tail.json").read_text())
    assert 0 <= tail["rows"]["top-1 mass, T=1"][2] <= tail["rows"]["top-10 mass, T=1"][2] <= 1
    groups = tail["by_items_shared_with_top1"]
    assert [(g["items_shared"], g["classes"]) for g in groups] == [(2, 27), (1, 243), (0, 729)]
    assert 0 < sum(g["mass_T4"] for g in groups) < 1  # all but the top-1 class


def test_tail_structure_counts_the_mass_by_items_shared_with_the_top1_class():
    logits = np.full((1, 100), -50.0, dtype=np.float32)
    logits[0, [12, 13, 42, 99]] = [5.0, 3.0, 3.0, 3.0]  # top-1 "12"; 13 shares 1 item, 42 shares 1, 99 none
    rows = tuples.tail_structure(logits)
    assert [(count, classes) for count, classes, _, _ in rows] == [(1, 18), (0, 81)]
    p = np.exp(np.array([5.0, 3.0, 3.0, 3.0])) / np.exp(np.array([5.0, 3.0, 3.0, 3.0])).sum()
    assert rows[0][2] == pytest.approx(p[1] + p[2], rel=1e-6) and rows[1][2] == pytest.approx(p[3], rel=1e-6)
