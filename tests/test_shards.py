"""Webdataset sources and write_shards: round trips, shard sizes, streaming, every error path."""

from __future__ import annotations

import functools
import http.server
import io
import os
import pickle
import tarfile
import threading

import numpy as np
import pytest
from PIL import Image

from kdcache.errors import ConfigError, SourceError
from kdcache.shards import brace_pattern, write_shards
from kdcache.sources import decode_sample, npy_bytes, open_source

VAL_SIZES = [100, 100, 100, 60]  # digits:val (360 samples) in shards of 100


def pixels(sample) -> np.ndarray:
    return np.asarray(decode_sample(sample))


def make_tar(path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def png(value: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((3, 3), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory):
    """digits:val written once as png shards of 100; returns (source, out_pattern, paths)."""
    source = open_source("digits:val")
    out_pattern = str(tmp_path_factory.mktemp("shards") / "digits-%06d.tar")
    return source, out_pattern, write_shards(source, out_pattern, samples_per_shard=100)


# --- round trips ----------------------------------------------------------------------------


def test_round_trip_keys_labels_pixels_order(digits_shards):
    source, out_pattern, paths = digits_shards
    assert paths == [out_pattern % i for i in range(4)]
    pattern = brace_pattern(out_pattern, len(paths))
    assert pattern.endswith("digits-{000000..000003}.tar")
    shards = open_source(pattern)
    assert (shards.kind, shards.uri) == ("webdataset", f"webdataset:{pattern}")
    assert len(shards) == len(source) == 360
    assert (shards.num_classes, shards.class_names) == (10, source.class_names)
    original, copied = source.read(range(360)), shards.read(range(360))
    assert [(s.key, s.label) for s in copied] == [(s.key, s.label) for s in original]
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(original, copied))
    assert all(s.data.startswith(b"\x89PNG") for s in copied)
    with open(os.path.join(os.path.dirname(paths[0]), "classes.txt")) as f:
        assert f.read() == "".join(f"{c}\n" for c in range(10))


def test_shard_sizes_and_read_shard_positions(digits_shards):
    _, out_pattern, paths = digits_shards
    shards = open_source(f"webdataset:{brace_pattern(out_pattern, len(paths))}")
    assert shards.shards() == list(zip(paths, VAL_SIZES))
    start = 0
    for s, size in enumerate(VAL_SIZES):
        streamed = shards.read_shard(s)
        assert [x.key for x in streamed] == [x.key for x in shards.read(range(start, start + size))]
        assert [x.digest for x in streamed] == [x.digest for x in shards.read(range(start, start + size))]
        start += size
    mixed = shards.read([359, 0, 150, 150])
    assert [x.key for x in mixed] == [shards.read_shard(3)[-1].key, shards.read_shard(0)[0].key] + [
        shards.read_shard(1)[50].key
    ] * 2
    with pytest.raises(IndexError, match=r"shard 4 outside \[0, 4\)"):
        shards.read_shard(4)


def test_given_shard_sizes_skip_the_scan_and_are_checked(digits_shards):
    _, out_pattern, paths = digits_shards
    pattern = brace_pattern(out_pattern, len(paths))
    wrong = open_source(pattern, shard_sizes=[100, 100, 100, 61])
    assert len(wrong) == 361  # taken as given: no scan
    assert len(wrong.read_shard(0)) == 100
    with pytest.raises(SourceError, match=r"shard '.*digits-000003.tar' holds 60 samples, expected 61"):
        wrong.read_shard(3)
    with pytest.raises(SourceError, match=r"shard '.*digits-000001.tar' holds more than 99 samples"):
        open_source(pattern, shard_sizes=[100, 99, 100, 60]).read_shard(1)
    with pytest.raises(ConfigError, match=r"shard_sizes must hold 4 non-negative integers .* got 3 entries"):
        open_source(pattern, shard_sizes=[100, 100, 160])
    with pytest.raises(SourceError, match="contains no samples"):
        open_source(pattern, shard_sizes=[0, 0, 0, 0])


def test_sources_pickle_for_dataloader_workers(digits_shards, tmp_path):
    _, out_pattern, paths = digits_shards
    (tmp_path / "c" / "a.png").parent.mkdir(parents=True)
    (tmp_path / "c" / "a.png").write_bytes(png(7))
    for spec in (brace_pattern(out_pattern, len(paths)), "digits:val", f"imagefolder:{tmp_path}"):
        source = open_source(spec)
        copy = pickle.loads(pickle.dumps(source))
        assert (copy.uri, len(copy), copy.read([0])[0].digest) == (source.uri, len(source), source.read([0])[0].digest)


def test_rewrite_a_webdataset_source_and_single_shard_pattern(digits_shards, tmp_path):
    source, out_pattern, paths = digits_shards
    shards = open_source(brace_pattern(out_pattern, len(paths)))
    again = write_shards(shards, str(tmp_path / "one-%d.tar"), samples_per_shard=1000)
    assert again == [str(tmp_path / "one-0.tar")]
    single = open_source(brace_pattern(str(tmp_path / "one-%d.tar"), 1))
    assert single.uri == f"webdataset:{tmp_path / 'one-0.tar'}"
    assert [(s.key, s.data) for s in single.iter_samples()] == [(s.key, s.data) for s in shards.iter_samples()]


@pytest.mark.parametrize("image_format", ["npy", "webp"])
def test_lossless_formats_round_trip_pixels(tmp_path, image_format):
    source = open_source("digits:val")
    paths = write_shards(source, str(tmp_path / "d-%02d.tar"), samples_per_shard=200, image_format=image_format)
    copied = open_source(brace_pattern(str(tmp_path / "d-%02d.tar"), len(paths)))
    original = source.read(range(0, 360, 7))
    back = copied.read(range(0, 360, 7))
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(original, back))
    if image_format == "npy":
        assert [s.data for s in back] == [s.data for s in original]  # npy passes through


def test_jpeg_passes_through_and_png_reencodes(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.full((4, 5, 3), 100, np.uint8)).save(buffer, format="JPEG")
    jpeg = buffer.getvalue()
    root = tmp_path / "folder"
    for relpath in ("b/x.jpg", "a/y.jpg"):
        (root / relpath).parent.mkdir(parents=True, exist_ok=True)
        (root / relpath).write_bytes(jpeg)
    source = open_source(f"imagefolder:{root}")
    write_shards(source, str(tmp_path / "j-%d.tar"), image_format="jpg")
    assert [s.data for s in open_source(str(tmp_path / "j-0.tar")).iter_samples()] == [jpeg, jpeg]
    write_shards(source, str(tmp_path / "p" / "p-%d.tar"), image_format="PNG")
    copied = open_source(str(tmp_path / "p" / "p-0.tar"))
    assert [(s.key, s.label) for s in copied.iter_samples()] == [("a/y", 0), ("b/x", 1)]
    assert np.array_equal(pixels(copied.read([0])[0]), pixels(source.read([0])[0]))
    assert copied.class_names == ["a", "b"]


def test_http_shards_round_trip(digits_shards):
    _, out_pattern, paths = digits_shards

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def handle(self):
            try:
                super().handle()
            except ConnectionError:  # a reader that stops early closes the connection
                pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=os.path.dirname(paths[0]))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        remote = open_source(f"{base}/digits-{{000000..000003}}.tar")
        assert remote.shards() == [(f"{base}/digits-{i:06d}.tar", n) for i, n in enumerate(VAL_SIZES)]
        assert remote.num_classes == 10
        local = open_source(brace_pattern(out_pattern, len(paths)))
        assert [s.digest for s in remote.read_shard(2)] == [s.digest for s in local.read_shard(2)]
        with pytest.raises(SourceError, match=f"shard '{base}/missing-0.tar' does not exist"):
            len(open_source(f"{base}/missing-{{0..1}}.tar"))
    finally:
        server.shutdown()
        server.server_close()


# --- classes and num_classes ----------------------------------------------------------------


def test_num_classes_from_labels_argument_or_classes_txt(tmp_path):
    shard = make_tar(tmp_path / "s.tar", [("a.png", png()), ("a.cls", b"4"), ("b.png", png()), ("b.cls", b" 2\n")])
    assert open_source(shard).num_classes == 5
    assert open_source(shard).class_names == ["0", "1", "2", "3", "4"]
    assert open_source(shard, num_classes=7).num_classes == 7
    with pytest.raises(SourceError, match=r"sample 'a' has label 4, expected 0 <= label < 3 \(from num_classes=3\)"):
        len(open_source(shard, num_classes=3))
    (tmp_path / "classes.txt").write_text("cat\ndog\nemu\nfox\ngnu\nhen\n\n")
    assert open_source(shard).class_names == ["cat", "dog", "emu", "fox", "gnu", "hen"]
    with pytest.raises(ConfigError, match=r"num_classes=5 does not match the 6 class names in '.*classes.txt'"):
        open_source(shard, num_classes=5)


def test_classes_txt_problems_are_named(tmp_path):
    shard = make_tar(tmp_path / "s.tar", [("a.png", png()), ("a.cls", b"4")])
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    with pytest.raises(SourceError, match=r"sample 'a' has label 4, expected 0 <= label < 2 \(from '.*classes.txt'\)"):
        open_source(shard).read([0])
    (tmp_path / "classes.txt").write_text("cat\n\ndog\n")
    with pytest.raises(SourceError, match=r"classes.txt' line 2 is empty"):
        open_source(shard)
    (tmp_path / "classes.txt").write_text("\n")
    with pytest.raises(SourceError, match=r"classes.txt' lists no class names"):
        open_source(shard)


# --- webdataset error paths -----------------------------------------------------------------


def test_missing_shard_is_named(tmp_path):
    make_tar(tmp_path / "s-0.tar", [("a.png", png()), ("a.cls", b"0")])
    with pytest.raises(SourceError, match=f"webdataset shard '{tmp_path / 's-1.tar'}' does not exist"):
        open_source(str(tmp_path / "s-{0..1}.tar"))


def test_group_without_image_names_shard_and_key(tmp_path):
    shard = make_tar(tmp_path / "s.tar", [("a.png", png()), ("a.cls", b"0"), ("b.json", b"{}"), ("b.cls", b"1")])
    with pytest.raises(SourceError, match=f"shard '{shard}': sample 'b' has no image \\(members: cls, json;"):
        len(open_source(shard))


def test_label_problems_name_shard_and_key(tmp_path):
    shard = make_tar(tmp_path / "s.tar", [("a.png", png()), ("a.cls", b"0"), ("b.png", png())])
    with pytest.raises(SourceError, match=f"shard '{shard}': sample 'b' has no 'cls' label member"):
        len(open_source(shard))
    shard = make_tar(tmp_path / "t.tar", [("a.png", png()), ("a.cls", b"dog")])
    with pytest.raises(SourceError, match=f"shard '{shard}': sample 'a': cls b'dog' is not an integer"):
        len(open_source(shard))
    shard = make_tar(tmp_path / "u.tar", [("a.png", png()), ("a.cls", b"-1")])
    with pytest.raises(SourceError, match=r"sample 'a' has label -1, expected 0 <= label$"):
        len(open_source(shard))


def test_duplicate_keys_are_named(tmp_path):
    make_tar(tmp_path / "s-0.tar", [("a.png", png()), ("a.cls", b"0"), ("k.png", png()), ("k.cls", b"1")])
    make_tar(tmp_path / "s-1.tar", [("k.png", png()), ("k.cls", b"1")])
    with pytest.raises(SourceError, match=r"duplicate key 'k' in shards '.*s-0.tar' and '.*s-1.tar'"):
        len(open_source(str(tmp_path / "s-{0..1}.tar")))
    shard = make_tar(tmp_path / "d.tar", [("k.png", png()), ("k.cls", b"0"), ("j.png", png()), ("j.cls", b"0"),
                                          ("k.cls", b"1"), ("k.png", png())])  # fmt: skip
    with pytest.raises(SourceError, match=f"shard '{shard}': duplicate key 'k'"):
        len(open_source(shard))
    shard = make_tar(tmp_path / "m.tar", [("k.png", png()), ("k.cls", b"0"), ("k.PNG", png())])
    with pytest.raises(SourceError, match=f"shard '{shard}': duplicate member 'k.PNG'"):
        len(open_source(shard))


def test_empty_and_corrupt_shards(tmp_path):
    empty = make_tar(tmp_path / "e.tar", [("__meta__", b"x"), ("README", b"no dot, no key")])
    with pytest.raises(SourceError, match=f"webdataset '{empty}' contains no samples"):
        len(open_source(empty))
    garbage = tmp_path / "g.tar"
    garbage.write_bytes(b"this is not a tar archive" * 50)
    with pytest.raises(SourceError, match=f"webdataset shard '{garbage}': cannot read tar"):
        len(open_source(str(garbage)))
    good = make_tar(tmp_path / "c.tar", [("a.png", png()), ("a.cls", b"0")] * 1)
    cut = tmp_path / "cut.tar"
    cut.write_bytes(open(good, "rb").read()[:700])
    with pytest.raises(SourceError, match=f"webdataset shard '{cut}': cannot read tar"):
        len(open_source(str(cut)))


def test_keys_with_directories_and_upper_case_extensions(tmp_path):
    members = [
        ("train/n01/x1.JPG", png(5)),
        ("train/n01/x1.cls", b"1"),
        ("train/n01/x1.json", b"{}"),
        ("train/n02/x2.npy", npy_bytes(np.ones((2, 2), np.uint8))),
        ("train/n02/x2.cls", b"0"),
    ]
    shard = make_tar(tmp_path / "s.tar", members)
    samples = open_source(f"webdataset:{shard}").read([0, 1])
    assert [(s.key, s.label) for s in samples] == [("train/n01/x1", 1), ("train/n02/x2", 0)]
    assert samples[0].data == png(5)


# --- write_shards refusals ------------------------------------------------------------------


def test_write_refuses_to_overwrite(digits_shards):
    source, out_pattern, _ = digits_shards
    with pytest.raises(ConfigError, match=f"shard file '{out_pattern % 0}' already exists"):
        write_shards(source, out_pattern, samples_per_shard=100)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"out_pattern": "x.tar"}, "out_pattern 'x.tar' must hold exactly one shard-number field"),
        ({"out_pattern": "x-%d-%d.tar"}, "out_pattern 'x-%d-%d.tar' must hold exactly one"),
        ({"out_pattern": "x-%s.tar"}, "must hold exactly one shard-number field"),
        ({"out_pattern": "x-%06d.zip"}, r"out_pattern 'x-%06d.zip' must end with \.tar"),
        ({"samples_per_shard": 0}, "samples_per_shard must be a positive integer, got 0"),
        ({"max_samples": 0}, "max_samples must be a positive integer, got 0"),
        ({"image_format": "gif"}, "image_format 'gif'; expected one of png, jpg, jpeg, webp, npy"),
    ],
)
def test_write_bad_options(tmp_path, kwargs, message):
    options = {"out_pattern": str(tmp_path / "x-%06d.tar"), **kwargs}
    with pytest.raises(ConfigError, match=message):
        write_shards(open_source("digits:val"), options.pop("out_pattern"), **options)


def test_write_keeps_only_the_first_max_samples(tmp_path):
    source = open_source("digits:val")
    paths = write_shards(source, str(tmp_path / "s-%02d.tar"), samples_per_shard=40, max_samples=100)
    assert [os.path.basename(p) for p in paths] == ["s-00.tar", "s-01.tar", "s-02.tar"]
    subset = open_source(f"webdataset:{tmp_path}/s-{{00..02}}.tar")
    assert len(subset) == 100
    assert [s.key for s in subset.read(range(100))] == [s.key for s in source.read(range(100))]


def test_write_refuses_keys_webdataset_cannot_store(tmp_path):
    root = tmp_path / "folder" / "cat"
    root.mkdir(parents=True)
    (root / "photo.2019.png").write_bytes(png())
    with pytest.raises(SourceError, match=r"sample 'cat/photo.2019': a webdataset key needs .* without '\.'"):
        write_shards(open_source(f"imagefolder:{tmp_path / 'folder'}"), str(tmp_path / "o-%d.tar"))


def test_write_refuses_conflicting_classes_txt(tmp_path):
    (tmp_path / "classes.txt").write_text("a\nb\n")
    with pytest.raises(ConfigError, match=f"'{tmp_path / 'classes.txt'}' exists with other class names"):
        write_shards(open_source("digits:val"), str(tmp_path / "o-%d.tar"))
    assert not (tmp_path / "o-0.tar").exists()


def test_write_names_an_undecodable_sample(tmp_path):
    root = tmp_path / "folder" / "cat"
    root.mkdir(parents=True)
    (root / "broken.png").write_bytes(b"not really a png")
    with pytest.raises(SourceError, match=r"sample 'cat/broken': cannot decode image"):
        write_shards(open_source(f"imagefolder:{tmp_path / 'folder'}"), str(tmp_path / "o-%d.tar"), image_format="jpg")
    assert not (tmp_path / "o-0.tar").exists()
