"""The cache format v1: round trips through the only reader and writer, the pinned manifest, and the
refusals (bad manifest, missing ledger entry, flipped byte, deleted shard file)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from kdcache.augment import cache_spec, preset, sample_view_params
from kdcache.errors import ChecksumError, FormatError, IncompleteCacheError
from kdcache.format import (
    COMPRESSION,
    FORMAT_VERSION,
    BlockLayout,
    CacheWriter,
    DatasetInfo,
    Manifest,
    TeacherInfo,
    epoch_index_key,
    ledger_key,
    open_cache,
    sample_array_sha256,
    shard_key,
)
from kdcache.record import make_records
from kdcache.replay import replay_block
from kdcache.sources import decode_sample, open_source
from kdcache.teacher import TeacherConfig, load_teacher, teacher_logits

pytestmark = pytest.mark.usefixtures("one_thread")

RECORD_ARRAYS = ("values", "indices", "tail", "params")

# ---- a hand-made cache: 13 samples in blocks of 5, 5, 3; 2 blocks per unit (units: [0, 1], [2]) ----

SIZES = [5, 5, 3]
CAPACITY = 5
PARAM_FIELDS = ["crop_top", "crop_left", "crop_height", "crop_width", "flip"]


def hand_manifest(*, epochs: int = 2, k: int = 3, num_classes: int = 7) -> Manifest:
    names = [f"class{c}" for c in range(num_classes)]
    return Manifest(
        format_version=FORMAT_VERSION,
        tool_version="0.0-test",
        created="2024-01-01T00:00:00+00:00",
        command="hand-made",
        teacher=TeacherInfo(
            name="hand", source="timm", checkpoint=None, weights_sha256="0" * 64, num_classes=num_classes,
            class_names=names, input_size=[3, 8, 8], interpolation="bilinear", mean=[0.5] * 3, std=[0.5] * 3,
        ),
        dataset=DatasetInfo(
            kind="hand", uri="hand:", split="train", num_samples=sum(SIZES), num_classes=num_classes,
            class_names=names, digest="1" * 64,
        ),
        augmentation=preset("light", output_size=8, mean=(0.5,) * 3, std=(0.5,) * 3).to_dict(),
        seed=3,
        epochs=epochs,
        k=k,
        dtypes={"values": "float16", "indices": "uint8", "tail": "float16", "params": "float32"},
        tail={"betas": [1.0, 0.25], "temperature_range": [0.5, 10.0]},
        param_fields=list(PARAM_FIELDS),
        replay={"path": "pil"},
        blocks=BlockLayout(kind="permutation", block_capacity=CAPACITY, blocks_per_unit=2, sizes=list(SIZES), permutation_seed=3),
        libraries={},
        compression=COMPRESSION,
    )


def hand_samples() -> dict[str, np.ndarray]:
    # blocks [12..8], [7..3], [2, 1, 0] + 2 padding slots (-1)
    index = np.array(list(range(12, -1, -1)) + [-1, -1], dtype=np.int64)
    return {
        "source_index": index,
        "label": np.where(index >= 0, index % 7, -1).astype(np.int32),
        "digest": np.where(index >= 0, index.astype(np.uint64) * np.uint64(1_000_003) + np.uint64(2**63), 0).astype(np.uint64),
        "key": np.array([f"s{i:02d}" if i >= 0 else "" for i in index]).astype(str),
    }


def hand_unit(rng: np.random.Generator, rows: int, k: int = 3) -> dict[str, np.ndarray]:
    values = np.sort(rng.normal(0, 4, size=(rows, k)).astype(np.float16), axis=1)[:, ::-1].copy()
    return {
        "values": values,
        "indices": rng.integers(0, 7, size=(rows, k)).astype(np.uint8),
        "tail": rng.normal(-5, 2, size=(rows, 2)).astype(np.float16),
        "params": rng.normal(0, 100, size=(rows, len(PARAM_FIELDS))).astype(np.float32),
    }


@pytest.fixture
def hand_cache(tmp_path):
    """A cache made by CacheWriter.create with every unit written by hand; returns (path, written)."""
    path = tmp_path / "hand"
    writer = CacheWriter.create(path, hand_manifest(), hand_samples())
    rng = np.random.default_rng(0)
    written = {}
    for epoch in range(2):
        for unit in range(writer.layout.num_units):
            rows = len(writer.layout.unit_blocks(unit)) * CAPACITY
            written[epoch, unit] = hand_unit(rng, rows)
            writer.write_unit(epoch, unit, written[epoch, unit])
    return path, written


def test_hand_written_units_read_back_exactly(hand_cache):
    path, written = hand_cache
    cache = open_cache(path)
    assert cache.layout.num_units == 2 and sorted(cache.ledger) == sorted(written)
    assert cache.complete_epochs() == [0, 1]
    for (epoch, unit), arrays in written.items():
        got = cache.read_unit(epoch, unit)
        assert set(got) == set(RECORD_ARRAYS)
        for name in RECORD_ARRAYS:
            assert got[name].dtype == np.dtype(hand_manifest().dtypes[name])
            np.testing.assert_array_equal(got[name], arrays[name])
    # blocks are slices of their unit, padding dropped: the last block has 3 of 5 slots
    for epoch in range(2):
        for block, size in enumerate(SIZES):
            unit = block // 2
            start = (block % 2) * CAPACITY
            got = cache.read_block(epoch, block)
            for name in RECORD_ARRAYS:
                assert got[name].shape[0] == size
                np.testing.assert_array_equal(got[name], written[epoch, unit][name][start : start + size])
    # the plan and the manifest come back as written
    for name, array in hand_samples().items():
        np.testing.assert_array_equal(cache.samples()[name], array)
    expected = dataclasses.replace(
        hand_manifest(), samples_sha256={n: sample_array_sha256(n, a) for n, a in hand_samples().items()}
    )
    assert cache.manifest.to_dict() == json.loads(json.dumps(expected.to_dict()))


def test_ledger_entry_records_every_shard_file_hash(hand_cache):
    path, _ = hand_cache
    entry = json.loads((path / ledger_key(1, 1)).read_text())
    assert set(entry) == {"epoch", "unit", "files", "views", "committed"}
    assert (entry["epoch"], entry["unit"], entry["views"]) == (1, 1, 3)
    assert set(entry["files"]) == {shard_key(a, 1, 1) for a in RECORD_ARRAYS}
    for key, meta in entry["files"].items():
        data = (path / key).read_bytes()
        assert meta == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def test_uncommitted_unit_is_absent_for_readers(tmp_path):
    writer = CacheWriter.create(tmp_path / "c", hand_manifest(), hand_samples())
    writer.write_unit(0, 1, hand_unit(np.random.default_rng(1), CAPACITY))
    cache = open_cache(tmp_path / "c")
    assert sorted(cache.ledger) == [(0, 1)]
    assert cache.complete_epochs() == []
    with pytest.raises(IncompleteCacheError, match=r"epoch 0 unit 0 \(blocks 0\.\.1\) is not committed"):
        cache.read_block(0, 1)
    assert cache.read_block(0, 2)["values"].shape == (3, 3)


def test_create_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("keep me")
    with pytest.raises(Exception, match="exists and is not empty"):
        CacheWriter.create(tmp_path / "c", hand_manifest(), hand_samples())
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["notes.txt"]


def test_write_unit_refuses_wrong_row_count(tmp_path):
    writer = CacheWriter.create(tmp_path / "c", hand_manifest(), hand_samples())
    with pytest.raises(ValueError, match="unit 1 of values: 10 rows, expected 5"):
        writer.write_unit(0, 1, hand_unit(np.random.default_rng(0), 10))
    assert not (tmp_path / "c" / ledger_key(0, 1)).exists()


# ---- precompute's records are the teacher's records of the replayed stored views ----------


def test_precompute_records_equal_teacher_on_replayed_stored_params(small_cache, teacher_ckpt):
    cache = open_cache(small_cache)
    manifest = cache.manifest
    spec = cache_spec(manifest)
    plan = cache.samples()
    source = open_source("digits")
    teacher, _ = load_teacher(TeacherConfig(model="test_resnet", checkpoint=str(teacher_ckpt)))
    for epoch, block in [(0, 0), (1, 5)]:  # a full block and the short last block
        where = cache.layout.block_slots(block)
        members = plan["source_index"][where]
        images = [decode_sample(s) for s in source.read([int(i) for i in members])]
        stored = cache.read_block(epoch, block)
        # the stored parameters are the ones the spec draws for these views
        drawn = sample_view_params(
            spec, seed=manifest.seed, epoch=epoch, block_id=block, sample_ids=members,
            image_sizes=[(im.height, im.width) for im in images],
        )
        np.testing.assert_array_equal(stored["params"], drawn)
        views = replay_block(spec, stored["params"], images, path=manifest.replay["path"])
        logits = torch.cat([teacher_logits(teacher, views[i : i + 256], "cpu") for i in range(0, len(views), 256)])
        values, indices, tail = make_records(logits, manifest.k)
        np.testing.assert_array_equal(stored["values"], values.numpy())
        np.testing.assert_array_equal(stored["indices"], indices.numpy().astype(np.uint8))
        np.testing.assert_array_equal(stored["tail"], tail.numpy())
        # and the stored logits are the teacher's top-k, sorted descending, at fp16 precision
        top = torch.topk(logits, manifest.k).values
        torch.testing.assert_close(torch.from_numpy(stored["values"]).float(), top, rtol=1e-3, atol=1e-3)


# ---- the manifest is pinned: any change to the format must fail here --------------------------

MANIFEST_KEYS = {
    "format_version", "tool_version", "created", "command", "teacher", "dataset", "augmentation", "seed",
    "epochs", "k", "dtypes", "tail", "param_fields", "replay", "blocks", "libraries", "compression",
    "batch_size", "samples_sha256",
}
NESTED_KEYS = {
    "teacher": {"name", "source", "checkpoint", "weights_sha256", "num_classes", "class_names", "input_size",
                "interpolation", "mean", "std"},  # + OPTIONAL_TEACHER_KEYS for published weights
    "dataset": {"kind", "uri", "split", "num_samples", "num_classes", "class_names", "digest", "shards"},
    "blocks": {"kind", "block_capacity", "blocks_per_unit", "sizes", "permutation_seed"},
    "dtypes": {"values", "indices", "tail", "params"},
    "tail": {"betas", "temperature_range"},
    "replay": {"path", "torch", "torchvision", "timm", "pillow"},
    "libraries": {"python", "numpy", "zarr", "numcodecs", "torch"},
    "compression": {"values", "indices", "tail", "params"},
    "samples_sha256": {"source_index", "label", "digest", "key"},
    "augmentation": {"name", "version", "output_size", "interpolation", "mean", "std", "crop", "crop_pct",
                     "crop_scale", "crop_ratio", "hflip", "color_jitter", "randaug_n", "randaug_m", "randaug_mstd",
                     "randaug_prob", "randaug_ops", "erase_prob", "erase_scale", "erase_ratio", "mix", "mix_alpha",
                     "mix_prob"},
}
#: Written only for a teacher with published weights (tests/test_pretrained.py makes such caches).
OPTIONAL_TEACHER_KEYS = {"repo", "revision"}
BASE_FIELDS = ["crop_top", "crop_left", "crop_height", "crop_width", "flip"]
PRESET_FIELDS = {
    "none": BASE_FIELDS,
    "light": BASE_FIELDS,
    "strong": BASE_FIELDS + ["ra0_op", "ra0_mag", "ra0_neg", "ra1_op", "ra1_mag", "ra1_neg", "erase", "erase_top", "erase_left",
                             "erase_height", "erase_width"],
    "funmatch": BASE_FIELDS + ["mix_partner", "mix_lam", "mix_top", "mix_left", "mix_bottom", "mix_right"],
    "cutmix": BASE_FIELDS + ["mix_partner", "mix_lam", "mix_top", "mix_left", "mix_bottom", "mix_right"],
}


def root_manifest(path: Path) -> dict:
    root = json.loads((Path(path) / "zarr.json").read_text())
    assert set(root) == {"zarr_format", "node_type", "attributes"}
    assert (root["zarr_format"], root["node_type"], set(root["attributes"])) == (3, "group", {"kdcache"})
    return root["attributes"]["kdcache"]


def test_manifest_is_pinned(small_cache, teacher_ckpt):
    m = root_manifest(small_cache)
    assert set(m) == MANIFEST_KEYS
    for name, keys in NESTED_KEYS.items():
        assert set(m[name]) == keys, name
    for name in RECORD_ARRAYS:
        assert m["compression"][name] == {"codec": "blosc", "cname": "zstd", "clevel": 9, "shuffle": "shuffle"}
    assert m["format_version"] == 1 and FORMAT_VERSION == 2  # a record that version 1 holds is written as version 1
    assert m["dtypes"] == {"values": "float16", "indices": "uint8", "tail": "float16", "params": "float32"}
    assert m["tail"] == {"betas": [1.0, 0.25], "temperature_range": [0.5, 10.0]}
    assert m["param_fields"] == BASE_FIELDS
    assert (m["seed"], m["epochs"], m["k"], m["command"], m["batch_size"]) == (0, 2, 5, "pytest", 256)
    assert m["replay"]["path"] == "pil"
    t = m["teacher"]
    assert (t["name"], t["source"], t["num_classes"], t["input_size"]) == ("test_resnet", "timm", 10, [3, 32, 32])
    assert (t["mean"], t["std"], t["interpolation"]) == ([0.5] * 3, [0.5] * 3, "bilinear")
    assert t["weights_sha256"] == hashlib.sha256(Path(teacher_ckpt).read_bytes()).hexdigest()
    assert t["checkpoint"] == str(Path(teacher_ckpt).resolve())
    assert t["class_names"] == [str(c) for c in range(10)]
    d = m["dataset"]
    assert (d["kind"], d["uri"], d["split"], d["num_samples"], d["num_classes"], d["shards"]) == (
        "digits", "digits:train", "train", 1437, 10, None)
    assert m["blocks"] == {"kind": "permutation", "block_capacity": 256, "blocks_per_unit": 2,
                           "sizes": [256] * 5 + [157], "permutation_seed": 0}
    a = m["augmentation"]
    assert (a["name"], a["version"], a["output_size"], a["crop"], a["hflip"], a["mix"]) == ("light", 1, 32, "rrc", 0.5, "none")
    plan = open_cache(small_cache).samples()
    assert m["samples_sha256"] == {n: sample_array_sha256(n, plan[n]) for n in plan}


def test_store_layout_is_pinned(small_cache):
    files = {str(p.relative_to(small_cache)) for p in Path(small_cache).rglob("*") if p.is_file()}
    expected = {"zarr.json", "samples/zarr.json"}
    expected |= {f"samples/{n}/{f}" for n in ("source_index", "label", "digest", "key") for f in ("zarr.json", "c/0")}
    for array in RECORD_ARRAYS:
        expected.add(f"{array}/zarr.json")
        expected |= {shard_key(array, e, u) for e in range(2) for u in range(3)}
    expected |= {ledger_key(e, u) for e in range(2) for u in range(3)}
    expected |= {epoch_index_key(e) for e in range(2)}  # precompute indexes each epoch once it is complete
    assert files == expected
    assert ledger_key(1, 2) == "ledger/e000001-u000002.json" and shard_key("tail", 1, 2) == "tail/c/1/2/0"
    assert epoch_index_key(1) == "ledger/epochs/e000001.json"
    widths = {"values": 5, "indices": 5, "tail": 2, "params": 5}
    dtypes = {"values": "float16", "indices": "uint8", "tail": "float16", "params": "float32"}
    for array in RECORD_ARRAYS:
        meta = json.loads((Path(small_cache) / array / "zarr.json").read_text())
        assert meta["shape"] == [2, 6 * 256, widths[array]]
        assert meta["data_type"] == dtypes[array]
        assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [1, 512, widths[array]]  # one shard = one unit
        (sharding,) = meta["codecs"]
        assert sharding["name"] == "sharding_indexed"
        assert sharding["configuration"]["chunk_shape"] == [1, 256, widths[array]]  # one chunk = one (epoch, block)
        assert [c["name"] for c in sharding["configuration"]["codecs"]] == ["bytes", "blosc", "crc32c"]


@pytest.mark.parametrize("name", sorted(PRESET_FIELDS))
def test_param_fields_of_each_preset_in_the_manifest(name, make_config, tmp_path, helpers):
    # max_units=0 creates the cache (manifest, plan) and computes nothing
    helpers.run_precompute(make_config(tmp_path / name, data="digits:val", augmentation=name, epochs=1, max_units=0))
    m = root_manifest(tmp_path / name)
    assert m["param_fields"] == PRESET_FIELDS[name]
    assert m["augmentation"]["name"] == name
    cache = open_cache(tmp_path / name)
    assert cache.ledger == {} and cache.complete_epochs() == []
    meta = json.loads((tmp_path / name / "params" / "zarr.json").read_text())
    assert meta["shape"][-1] == len(PRESET_FIELDS[name])


# ---- Manifest.from_dict refuses what it cannot read -----------------------------------------


@pytest.fixture(scope="module")
def manifest_dict():
    data = hand_manifest().to_dict()
    return json.loads(json.dumps(data))


def test_manifest_round_trips_through_json(manifest_dict):
    assert Manifest.from_dict(manifest_dict).to_dict() == manifest_dict


@pytest.mark.parametrize("version", [0, 3, "1", None, True])
def test_unknown_format_version_is_refused(manifest_dict, version):
    data = copy.deepcopy(manifest_dict)
    data["format_version"] = version
    with pytest.raises(FormatError, match=rf"format_version {version!r} is not supported.*reads versions 1, 2"):
        Manifest.from_dict(data)


def test_missing_format_version_is_refused(manifest_dict):
    data = copy.deepcopy(manifest_dict)
    del data["format_version"]
    with pytest.raises(FormatError, match="format_version None is not supported"):
        Manifest.from_dict(data)


@pytest.mark.parametrize(
    "path",
    [("seed",), ("epochs",), ("k",), ("dtypes",), ("teacher",), ("dataset",), ("blocks",), ("param_fields",),
     ("teacher", "weights_sha256"), ("teacher", "num_classes"), ("dataset", "digest"), ("blocks", "sizes")],
    ids=lambda p: ".".join(p),
)
def test_missing_field_is_refused_by_name(manifest_dict, path):
    data = copy.deepcopy(manifest_dict)
    node = data
    for part in path[:-1]:
        node = node[part]
    del node[path[-1]]
    with pytest.raises(FormatError) as info:
        Manifest.from_dict(data)
    assert repr(path[-1]) in str(info.value) or path[-1] in str(info.value)
    if len(path) > 1:
        assert f"manifest.{path[0]}" in str(info.value)


def test_published_weights_fields_round_trip_and_are_left_out_when_unset(manifest_dict):
    assert not OPTIONAL_TEACHER_KEYS & set(manifest_dict["teacher"])
    assert Manifest.from_dict(manifest_dict).to_dict() == manifest_dict
    data = copy.deepcopy(manifest_dict)
    data["teacher"].update(repo="timm/resnet50.a1_in1k", revision="0123456789abcdef0123456789abcdef01234567")
    manifest = Manifest.from_dict(data)
    assert (manifest.teacher.repo, manifest.teacher.revision) == ("timm/resnet50.a1_in1k", data["teacher"]["revision"])
    assert set(manifest.to_dict()["teacher"]) == NESTED_KEYS["teacher"] | OPTIONAL_TEACHER_KEYS
    assert manifest.to_dict() == data


def test_unknown_field_is_refused_by_name(manifest_dict):
    data = copy.deepcopy(manifest_dict)
    data["teacher"]["weights_md5"] = "x"
    with pytest.raises(FormatError, match=r"manifest.teacher: unknown fields \['weights_md5'\]"):
        Manifest.from_dict(data)


WRONG_TYPES = [
    (("seed",), "0", "seed"),
    (("epochs",), 2.0, "epochs"),
    (("k",), "3", "k"),
    (("k",), True, "k"),
    (("teacher",), [], "manifest.teacher"),
    (("dataset",), "digits", "manifest.dataset"),
    (("blocks",), 5, "manifest.blocks"),
    (("blocks", "sizes"), "5,5,3", "blocks.sizes"),
    (("blocks", "sizes"), [5, "5", 3], "blocks.sizes"),
    (("blocks", "block_capacity"), "5", "blocks.block_capacity"),
    (("blocks", "blocks_per_unit"), 2.5, "blocks.blocks_per_unit"),
    (("dataset", "num_classes"), "7", "dataset.num_classes"),
    (("dtypes",), ["float16"], "dtypes.values"),
    (("dtypes", "indices"), 8, "dtypes.indices"),
    (("dtypes", "values"), "half-precision", "dtypes.values"),
    (("param_fields",), "crop_top", "param_fields"),
    (("param_fields",), [1, 2], "param_fields"),
    (("teacher", "num_classes"), "7", "teacher.num_classes"),
    (("teacher", "num_classes"), None, "teacher.num_classes"),
    (("teacher", "revision"), 7, "teacher.revision"),
    (("teacher", "repo"), "", "teacher.repo"),
    (("replay",), "pil", "replay"),
    (("tail",), [1.0, 0.25], "tail"),
]


@pytest.mark.parametrize("path, value, named", WRONG_TYPES, ids=lambda v: ".".join(v) if isinstance(v, tuple) else None)
def test_wrong_type_is_refused_naming_the_field(manifest_dict, path, value, named):
    data = copy.deepcopy(manifest_dict)
    node = data
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    with pytest.raises(FormatError) as info:
        Manifest.from_dict(data)
    assert named in str(info.value)
    assert "\n" not in str(info.value)


def test_open_cache_refuses_what_is_not_a_cache(tmp_path):
    with pytest.raises(FormatError, match=f"cache {tmp_path / 'nowhere'} does not exist"):
        open_cache(tmp_path / "nowhere")
    (tmp_path / "plain").mkdir()
    with pytest.raises(FormatError, match="root metadata zarr.json is missing"):
        open_cache(tmp_path / "plain")
    (tmp_path / "plain" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    with pytest.raises(FormatError, match=r"not a kdcache cache \(zarr.json has no attributes.kdcache\)"):
        open_cache(tmp_path / "plain")
    (tmp_path / "plain" / "zarr.json").write_text("{not json")
    with pytest.raises(FormatError, match="zarr.json is not valid JSON"):
        open_cache(tmp_path / "plain")


def test_open_cache_refuses_a_future_format_version(small_cache, tmp_path):
    path = tmp_path / "future"
    shutil.copytree(small_cache, path)
    root = json.loads((path / "zarr.json").read_text())
    root["attributes"]["kdcache"]["format_version"] = 3
    (path / "zarr.json").write_text(json.dumps(root))
    with pytest.raises(FormatError, match=r"manifest: format_version 3 is not supported by this kdcache \(reads versions 1, 2\)"):
        open_cache(path)


# ---- damaged caches are refused, naming the epoch, unit and file -------------------------------


@pytest.fixture
def damaged(small_cache, tmp_path):
    path = tmp_path / "damaged"
    shutil.copytree(small_cache, path)
    return path


def test_missing_ledger_entry_makes_the_unit_absent(damaged):
    (damaged / ledger_key(1, 1)).unlink()
    cache = open_cache(damaged)
    assert (1, 1) not in cache.ledger and len(cache.ledger) == 5
    assert cache.complete_epochs() == [0]
    for read in (lambda: cache.read_unit(1, 1), lambda: cache.read_block(1, 2), lambda: cache.read_block(1, 3)):
        with pytest.raises(IncompleteCacheError, match=r"epoch 1 unit 1 \(blocks 2\.\.3\) is not committed.*--resume"):
            read()
    assert cache.read_block(1, 4)["values"].shape == (256, 5)  # the neighbours still read


@pytest.mark.parametrize("array", RECORD_ARRAYS)
def test_flipped_byte_in_a_shard_file_fails_its_checksum(damaged, array):
    key = shard_key(array, 1, 2)
    data = bytearray((damaged / key).read_bytes())
    data[len(data) // 3] ^= 0x01
    (damaged / key).write_bytes(bytes(data))
    cache = open_cache(damaged)
    with pytest.raises(ChecksumError) as info:
        cache.read_block(1, 5)
    message = str(info.value)
    assert "epoch 1 unit 2" in message and f"file {key}" in message and "ledger checksum" in message
    assert cache.read_unit(0, 2)[array].shape[0] == 512  # the same unit of the other epoch is fine
    with pytest.raises(ChecksumError, match=f"epoch 1 unit 2.*file {key}"):
        cache.verify_unit(1, 2)
    # without checksum verification, the codec's own crc32c still refuses the flipped byte
    with pytest.raises(ChecksumError, match=f"epoch 1 unit 2.*file {key}"):
        open_cache(damaged, verify_checksums=False).read_unit(1, 2)


def test_deleted_shard_file_is_refused(damaged):
    key = shard_key("indices", 0, 1)
    (damaged / key).unlink()
    cache = open_cache(damaged)
    with pytest.raises(IncompleteCacheError, match=rf"epoch 0 unit 1 \(blocks 2\.\.3\): file {key} is missing"):
        cache.read_unit(0, 1)
    with pytest.raises(IncompleteCacheError, match=f"file {key} is missing"):
        cache.read_block(0, 3)


def test_malformed_ledger_entry_is_a_format_error(damaged):
    (damaged / ledger_key(0, 0)).write_text('{"epoch": 0}')
    cache = open_cache(damaged)  # epoch 0 is read from its index; the entry is parsed when its unit is read
    with pytest.raises(FormatError, match="ledger entry e000000-u000000.json is malformed"):
        cache.read_block(0, 0)
    (damaged / epoch_index_key(0)).unlink()  # without the index, opening reads (and refuses) the entry
    with pytest.raises(FormatError, match="ledger entry e000000-u000000.json is malformed"):
        open_cache(damaged)


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    import errno
    import os

    from kdcache.location import atomic_write_bytes

    target = tmp_path / "entry.json"
    target.write_bytes(b"old")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["entry.json"]
