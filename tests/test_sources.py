"""Sources: digits, Fashion-MNIST, imagefolder; decoding; spec parsing and every error path."""

from __future__ import annotations

import hashlib
import io
import os
import re
import struct

import numpy as np
import pytest
from fashion_mnist import random_images, write_fashion_mnist
from PIL import Image

import kdcache.sources
from kdcache.errors import ConfigError, SourceError
from kdcache.sources import (
    Sample,
    decode_image,
    decode_sample,
    npy_bytes,
    open_source,
)


def png_bytes(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


# --- digits ---------------------------------------------------------------------------------


def test_digits_split_sizes_and_disjoint():
    train, val = open_source("digits"), open_source("digits", split="val")
    assert (len(train), len(val)) == (1437, 360)
    train_keys = {s.key for s in train.iter_samples()}
    val_keys = {s.key for s in val.iter_samples()}
    assert not train_keys & val_keys
    assert len(train_keys | val_keys) == 1797
    assert (train.num_classes, train.class_names) == (10, [str(c) for c in range(10)])
    assert (train.kind, train.uri, val.uri, train.split) == ("digits", "digits:train", "digits:val", "train")


def test_digits_split_suffix_overrides_argument():
    assert open_source("digits:val", split="train").split == "val"
    assert len(open_source("digits:train", split="val")) == 1437


def test_digits_keys_labels_digests_are_pinned():
    train, val = open_source("digits"), open_source("digits:val")
    assert [s.key for s in train.read(range(3))] == ["digits-0000", "digits-0001", "digits-0002"]
    assert [s.key for s in val.read(range(3))] == ["digits-0011", "digits-0023", "digits-0024"]
    first = train.read([0])[0]
    assert (first.label, first.digest) == (0, 0xF364AB531D009A22)
    assert first.digest == int.from_bytes(hashlib.blake2b(first.data, digest_size=8).digest(), "big")
    summary = hashlib.blake2b(digest_size=8)
    for s in train.iter_samples():
        summary.update(s.key.encode() + s.label.to_bytes(1, "big") + s.digest.to_bytes(8, "big"))
    assert summary.hexdigest() == "425cb1b06648c25e"


def test_digits_deterministic_across_opens():
    a, b = open_source("digits:val"), open_source(open_source("digits:val").uri)
    assert [(s.key, s.label, s.digest) for s in a.iter_samples()] == [
        (s.key, s.label, s.digest) for s in b.iter_samples()
    ]


def test_digits_data_is_npy_and_decodes_to_rgb_8x8():
    from sklearn.datasets import load_digits

    sample = open_source("digits").read([5])[0]
    original = int(sample.key.split("-")[1])
    assert sample.data.startswith(b"\x93NUMPY")
    image = decode_sample(sample)
    assert (image.mode, image.size) == ("RGB", (8, 8))
    expected = (load_digits().images[original].astype(np.int64) * 255 // 16).astype(np.uint8)
    pixels = np.asarray(image)
    assert np.array_equal(pixels[..., 0], expected) and np.array_equal(pixels[..., 2], expected)
    assert sample.label == int(load_digits().target[original])


def test_read_keeps_order_and_repeats():
    source = open_source("digits")
    keys = [s.key for s in source.read(range(8))]
    assert [s.key for s in source.read([7, 2, 7])] == [keys[7], keys[2], keys[7]]
    assert [s.key for s in source.read(np.array([3, 1]))] == [keys[3], keys[1]]
    assert source.read([]) == []


def test_read_out_of_range_names_index():
    source = open_source("digits:val")
    with pytest.raises(IndexError, match=r"index 360 outside \[0, 360\)"):
        source.read([360])
    with pytest.raises(IndexError, match="index -1"):
        source.read([-1])


def test_digits_bad_split_is_config_error():
    with pytest.raises(ConfigError, match="'test'"):
        open_source("digits:test")
    with pytest.raises(ConfigError, match="digits split 'test'"):
        open_source("digits", split="test")


def test_num_classes_must_match_a_fixed_class_list():
    assert open_source("digits", num_classes=10).num_classes == 10
    with pytest.raises(ConfigError, match="num_classes=5 does not match the 10 classes of digits"):
        open_source("digits", num_classes=5)
    with pytest.raises(ConfigError, match="positive integer, got 0"):
        open_source("digits", num_classes=0)


# --- decoding -------------------------------------------------------------------------------


def test_decode_image_formats_give_rgb():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    rgb = np.stack([gray, gray // 2, 255 - gray], axis=-1)
    for data in (png_bytes(gray), png_bytes(rgb), png_bytes(rgb, "WEBP"), npy_bytes(gray), npy_bytes(rgb)):
        image = decode_image(data)
        assert (image.mode, image.size) == ("RGB", (4, 3))
    assert np.array_equal(np.asarray(decode_image(npy_bytes(rgb))), rgb)
    assert np.array_equal(np.asarray(decode_image(png_bytes(rgb))), rgb)
    assert decode_image(png_bytes(gray, "JPEG")).mode == "RGB"
    assert decode_image(npy_bytes(gray[..., None])).size == (4, 3)


def test_decode_sample_names_the_key():
    with pytest.raises(SourceError, match=r"sample 'bad-1': cannot decode image: not a recognised image format"):
        decode_sample(Sample(key="bad-1", label=0, data=b"garbage bytes"))
    with pytest.raises(SourceError, match=r"sample 'empty': cannot decode image: empty data"):
        decode_sample(Sample(key="empty", label=0, data=b""))
    with pytest.raises(SourceError, match=r"sample 'f32': .*dtype float32"):
        decode_sample(Sample(key="f32", label=0, data=npy_bytes(np.zeros((2, 2), np.float32))))
    truncated = png_bytes(np.zeros((16, 16), np.uint8))[:40]
    with pytest.raises(SourceError, match=r"sample 'cut': cannot decode image"):
        decode_sample(Sample(key="cut", label=0, data=truncated))
    with pytest.raises(SourceError, match=r"^cannot decode image: not a recognised"):
        decode_image(b"nope")


# --- fashion-mnist --------------------------------------------------------------------------


def test_fashion_mnist_splits_keys_classes_and_uri(tmp_path):
    images, val_images = random_images(4, seed=0), random_images(2, seed=1)
    directory = write_fashion_mnist(tmp_path / "fm", labels=(9, 0, 0, 3), images=images, compress=True)
    write_fashion_mnist(directory, split="val", labels=(1, 7), images=val_images, compress=True)
    train, val = open_source(f"fashion-mnist:{directory}"), open_source(f"fashion-mnist:{directory}:val")
    assert (len(train), len(val)) == (4, 2)
    assert [(s.key, s.label) for s in train.iter_samples()] == [
        ("fmnist-train-00000", 9), ("fmnist-train-00001", 0), ("fmnist-train-00002", 0), ("fmnist-train-00003", 3),
    ]  # fmt: skip
    image = decode_sample(train.read([3])[0])
    assert (image.mode, image.size) == ("RGB", (28, 28))
    pixels = np.asarray(image)
    assert all(np.array_equal(pixels[..., c], images[3]) for c in range(3))
    assert [(s.key, s.label) for s in val.read([1])] == [("fmnist-val-00001", 7)]
    assert np.array_equal(np.asarray(decode_sample(val.read([1])[0]))[..., 0], val_images[1])
    assert train.class_names[0] == "T-shirt/top" and train.class_names[9] == "Ankle boot" and train.num_classes == 10
    assert (train.kind, train.uri) == ("fashion-mnist", f"fashion-mnist:{directory}:train")
    reopened = open_source(val.uri)
    assert (reopened.uri, reopened.split) == (f"fashion-mnist:{directory}:val", "val")
    assert [s.digest for s in reopened.read([0, 1])] == [s.digest for s in val.read([0, 1])]


def test_fashion_mnist_split_argument_suffix_and_num_classes(tmp_path):
    directory = write_fashion_mnist(tmp_path / "fm", labels=(1, 2, 3))
    write_fashion_mnist(directory, split="val", labels=(4,))
    assert len(open_source(f"fashion-mnist:{directory}", split="val")) == 1
    assert len(open_source(f"fashion-mnist:{directory}:train", split="val")) == 3  # the suffix wins
    assert open_source(f"fashion-mnist:{directory}", num_classes=10).num_classes == 10
    with pytest.raises(ConfigError, match="num_classes=5 does not match the 10 classes of fashion-mnist; pass 10"):
        open_source(f"fashion-mnist:{directory}", num_classes=5)
    with pytest.raises(ConfigError, match="fashion-mnist split 'test'; expected one of train, val"):
        open_source(f"fashion-mnist:{directory}", split="test")


def test_fashion_mnist_default_directory_is_debians(tmp_path, monkeypatch):
    assert kdcache.sources.FASHION_MNIST_DIR == "/usr/share/datasets/fashion-mnist"
    directory = write_fashion_mnist(tmp_path / "fm", labels=(5, 6), compress=True)
    write_fashion_mnist(directory, split="val", labels=(8,), compress=True)
    monkeypatch.setattr(kdcache.sources, "FASHION_MNIST_DIR", directory)
    assert [s.key for s in open_source("fashion-mnist").iter_samples()] == ["fmnist-train-00000", "fmnist-train-00001"]
    val = open_source("fashion-mnist:val")
    assert (val.uri, len(val)) == (f"fashion-mnist:{directory}:val", 1)
    monkeypatch.setattr(kdcache.sources, "FASHION_MNIST_DIR", str(tmp_path / "not-installed"))
    message = (f"fashion-mnist directory '{tmp_path / 'not-installed'}' does not exist "
               r"\(install Debian's dataset-fashion-mnist or pass fashion-mnist:DIR\)")
    with pytest.raises(SourceError, match=message):
        open_source("fashion-mnist")


@pytest.mark.parametrize("compress", [False, True])
def test_fashion_mnist_tiny_idx_files(tmp_path, compress):
    directory = write_fashion_mnist(tmp_path / "fm", compress=compress)
    source = open_source(f"fashion-mnist:{directory}")
    assert len(source) == 3
    samples = source.read([2, 0])
    assert [(s.key, s.label) for s in samples] == [("fmnist-train-00002", 4), ("fmnist-train-00000", 3)]
    assert np.array_equal(np.asarray(decode_sample(samples[0]))[..., 1], [[8, 9], [10, 11]])


def test_fashion_mnist_missing_directory_and_file(tmp_path):
    with pytest.raises(SourceError, match=f"directory '{tmp_path / 'nowhere'}' does not exist"):
        open_source(f"fashion-mnist:{tmp_path / 'nowhere'}")
    directory = write_fashion_mnist(tmp_path / "fm")
    with pytest.raises(SourceError, match=r"t10k-images-idx3-ubyte\.gz' does not exist"):
        open_source(f"fashion-mnist:{directory}:val")


def test_fashion_mnist_wrong_file_is_named(tmp_path):
    directory = write_fashion_mnist(tmp_path / "fm", label_magic=0x803)
    message = r"train-labels-idx1-ubyte' is not the expected IDX file: magic number 0x00000803, expected 0x00000801"
    with pytest.raises(SourceError, match=message):
        len(open_source(f"fashion-mnist:{directory}"))


def test_fashion_mnist_truncated_and_mismatched_counts(tmp_path):
    directory = write_fashion_mnist(tmp_path / "fm", images=np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(SourceError, match=r"train-images-idx3-ubyte' holds 2 images but .*labels-idx1-ubyte' holds 3"):
        open_source(f"fashion-mnist:{directory}").read([0])
    path = os.path.join(directory, "train-labels-idx1-ubyte")
    with open(path, "r+b") as f:
        f.truncate(10)
    with pytest.raises(SourceError, match=r"train-labels-idx1-ubyte' holds 2 bytes of data, expected 3"):
        len(open_source(f"fashion-mnist:{directory}"))


def test_fashion_mnist_unreadable_and_short_files_are_named(tmp_path):
    directory = write_fashion_mnist(tmp_path / "fm", compress=True)
    labels = tmp_path / "fm" / "train-labels-idx1-ubyte.gz"
    whole = labels.read_bytes()
    labels.write_bytes(whole[: len(whole) // 2])  # a gzip stream cut in the middle
    with pytest.raises(SourceError, match=f"cannot read IDX file '{re.escape(str(labels))}'"):
        len(open_source(f"fashion-mnist:{directory}"))
    labels.write_bytes(b"\x00\x00")
    with pytest.raises(SourceError, match=r"magic number none \(file too short\), expected 0x00000801"):
        len(open_source(f"fashion-mnist:{directory}"))
    labels.write_bytes(struct.pack(">I", 0x801))  # the magic number, then no dimension
    with pytest.raises(SourceError, match=r"IDX header truncated \(4 bytes, expected 8\)"):
        len(open_source(f"fashion-mnist:{directory}"))


def test_fashion_mnist_bad_label_names_key_and_label(tmp_path):
    directory = write_fashion_mnist(tmp_path / "fm", labels=(1, 12, 3))
    with pytest.raises(SourceError, match=r"sample 'fmnist-train-00001' has label 12, expected 0 <= label < 10"):
        len(open_source(f"fashion-mnist:{directory}"))


def test_fashion_mnist_empty_contains_no_samples(tmp_path):
    directory = write_fashion_mnist(tmp_path / "fm", labels=(), images=np.zeros((0, 2, 2), np.uint8))
    with pytest.raises(SourceError, match=r"train-labels-idx1-ubyte' contains no samples"):
        len(open_source(f"fashion-mnist:{directory}"))


# --- imagefolder ----------------------------------------------------------------------------


def make_folder(root, files: dict[str, bytes]) -> str:
    for relpath, data in files.items():
        path = os.path.join(root, relpath)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    return str(root)


def test_imagefolder_layout_keys_labels_bytes(tmp_path):
    red = png_bytes(np.full((5, 6, 3), (255, 0, 0), np.uint8))
    gray = png_bytes(np.full((4, 4), 90, np.uint8), "JPEG")
    root = make_folder(
        tmp_path / "data",
        {
            "dog/b.png": red,
            "dog/a.JPG": gray,
            "dog/nested/c.webp": png_bytes(np.zeros((2, 2, 3), np.uint8), "WEBP"),
            "dog/notes.txt": b"not an image",
            "dog/.hidden.png": red,
            "cat/z.jpeg": gray,
            ".cache/x.png": red,
        },
    )
    source = open_source(f"imagefolder:{root}", split="val")
    assert (source.class_names, source.num_classes, source.split) == (["cat", "dog"], 2, "val")
    assert source.uri == f"imagefolder:{root}"
    samples = source.read(range(len(source)))
    assert [(s.key, s.label) for s in samples] == [
        ("cat/z", 0), ("dog/a", 1), ("dog/b", 1), ("dog/nested/c", 1),
    ]  # fmt: skip
    assert samples[2].data == red
    assert decode_sample(samples[2]).size == (6, 5)
    reopened = open_source(source.uri)
    assert [s.digest for s in reopened.read(range(4))] == [s.digest for s in samples]
    assert source.shards() is None


def test_imagefolder_missing_and_not_a_directory(tmp_path):
    with pytest.raises(SourceError, match=f"imagefolder directory '{tmp_path / 'gone'}' does not exist"):
        open_source(f"imagefolder:{tmp_path / 'gone'}")
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(SourceError, match=f"'{tmp_path / 'file'}' is not a directory"):
        open_source(f"imagefolder:{tmp_path / 'file'}")


def test_imagefolder_empty_contains_no_samples(tmp_path):
    root = make_folder(tmp_path / "data", {"cat/readme.txt": b"x"})
    with pytest.raises(SourceError, match=f"imagefolder '{root}' contains no samples .*found 1 class"):
        open_source(f"imagefolder:{root}")


def test_imagefolder_duplicate_key_is_named(tmp_path):
    image = png_bytes(np.zeros((2, 2), np.uint8))
    root = make_folder(tmp_path / "data", {"cat/a.png": image, "cat/a.jpg": image})
    with pytest.raises(SourceError, match=r"duplicate key 'cat/a' \(files 'cat/a.jpg' and 'cat/a.png'\)"):
        open_source(f"imagefolder:{root}")


def test_imagefolder_num_classes_mismatch_and_vanished_file(tmp_path):
    root = make_folder(tmp_path / "data", {"cat/a.png": png_bytes(np.zeros((2, 2), np.uint8))})
    with pytest.raises(ConfigError, match=f"num_classes=3 does not match the 1 classes of imagefolder '{root}'"):
        open_source(f"imagefolder:{root}", num_classes=3)
    source = open_source(f"imagefolder:{root}")
    os.remove(os.path.join(root, "cat", "a.png"))
    with pytest.raises(SourceError, match=r"cat/a.png' does not exist"):
        source.read([0])


def test_read_shard_is_for_webdataset_only():
    with pytest.raises(ConfigError, match="digits source 'digits:train' has no tar shards"):
        open_source("digits").read_shard(0)


# --- specs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["mnist", "imagenet:/data", "/data/images", "cifar10:train"])
def test_unknown_spec_lists_accepted_forms(spec):
    message = f"unknown source spec '{spec}'; expected one of digits.*fashion-mnist.*imagefolder:DIR.*\\.tar"
    with pytest.raises(ConfigError, match=message):
        open_source(spec)


def test_malformed_specs():
    with pytest.raises(ConfigError, match="is empty"):
        open_source("  ")
    with pytest.raises(ConfigError, match="names no directory"):
        open_source("imagefolder:")
    with pytest.raises(ConfigError, match="names no shards"):
        open_source("webdataset:")
    with pytest.raises(ConfigError, match="shard_sizes is for webdataset and parquet sources only"):
        open_source("digits", shard_sizes=[1])
