"""Parquet datasets as the Hugging Face Hub keeps them: written with pyarrow and with ``datasets``, precomputed,
trained from, verified, and refused when one image changes."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SMALL, run_precompute
from PIL import Image

from kdcache.errors import ConfigError, MismatchError, SourceError, VerifyError
from kdcache.sources import ParquetSource, decode_sample, open_source

NAMES = [f"digit-{c}" for c in range(10)]


def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def digits_rows(n: int = 40):
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images[:n] * 255 / 16).astype(np.uint8)
    return [png(np.repeat(image[:, :, None], 3, axis=2)) for image in images], [int(v) for v in digits.target[:n]]


def hub_schema(names=NAMES):
    features = {"image": {"_type": "Image"}, "label": {"names": names, "_type": "ClassLabel"}}
    return pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("label", pa.int64())],
                     metadata={"huggingface": json.dumps({"info": {"features": features}})})


def write_hub_parquet(path, images, labels, *, paths=None, row_group_size=10, schema=None):
    """One parquet file in the Hub's layout: image {bytes, path}, label with ClassLabel names in the metadata."""
    paths = paths or [f"img-{i:04d}.png" for i in range(len(images))]
    table = pa.table({"image": [{"bytes": b, "path": p} for b, p in zip(images, paths)], "label": labels},
                     schema=schema or hub_schema())
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


@pytest.fixture
def parquet_dir(tmp_path):
    images, labels = digits_rows(40)
    root = tmp_path / "data"
    root.mkdir()
    write_hub_parquet(root / "train-00000-of-00002.parquet", images[:20], labels[:20], paths=[f"a/{i}.png" for i in range(20)])
    write_hub_parquet(root / "train-00001-of-00002.parquet", images[20:], labels[20:], paths=[f"b/{i}.png" for i in range(20)])
    return root


def test_layout_keys_classes_and_blocks_come_from_the_files(parquet_dir):
    source = open_source(f"parquet:{parquet_dir}")
    assert (source.kind, len(source), source.num_classes, source.class_names) == ("parquet", 40, 10, NAMES)
    shards = source.shards()
    assert [n for _, n in shards] == [10, 10, 10, 10]  # a block per row group, from the footers
    assert shards[0][0] == f"{parquet_dir / 'train-00000-of-00002.parquet'}#0"
    first = source.read_shard(0)
    images, labels = digits_rows(40)
    assert [s.key for s in first[:2]] == ["a/0.png", "a/1.png"]
    assert [s.data for s in first] == images[:10] and [s.label for s in first] == labels[:10]
    assert [s.key for s in source.read([39, 0])] == ["b/19.png", "a/0.png"]
    assert decode_sample(first[0]).size == (8, 8)
    # a DataLoader worker gets a copy that reads the same rows
    import pickle

    copy = pickle.loads(pickle.dumps(source))
    assert copy._last is None and [s.digest for s in copy.read_shard(2)] == [s.digest for s in source.read_shard(2)]
    # a glob and a single file open the same rows; the :val suffix sets the split
    assert len(open_source(f"parquet:{parquet_dir}/train-0000[01]-*.parquet")) == 40
    single = open_source(str(parquet_dir / "train-00001-of-00002.parquet") + ":val")
    assert (len(single), single.split) == (20, "val")


def test_rows_without_a_path_are_keyed_by_file_and_row_and_a_large_row_group_is_sliced(tmp_path, monkeypatch):
    import kdcache.sources.parquet as parquet

    monkeypatch.setattr(parquet, "MAX_BLOCK_ROWS", 16)
    images, labels = digits_rows(40)
    path = tmp_path / "one.parquet"
    write_hub_parquet(path, images, labels, paths=[None] * 40, row_group_size=40)
    source = ParquetSource(str(path))
    assert [n for _, n in source.shards()] == [16, 16, 8]
    assert source.shards()[1][0].endswith("one.parquet#0[16:32]")
    assert [s.key for s in source.read_shard(1)[:2]] == ["one.parquet:16", "one.parquet:17"]


def test_a_dataset_written_with_datasets_opens_with_its_class_names_and_is_precomputed(tmp_path, teacher_ckpt):
    import datasets  # how users write parquet (README's test install brings it)

    images, labels = digits_rows(12)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)})
    ds = datasets.Dataset.from_dict({"image": [Image.open(io.BytesIO(b)) for b in images], "label": labels},
                                    features=features)
    ds.to_parquet(str(tmp_path / "train.parquet"))
    data = f"parquet:{tmp_path / 'train.parquet'}"
    source = open_source(data)
    assert (len(source), source.class_names) == (12, NAMES)
    samples = list(source.iter_samples())
    assert [s.label for s in samples] == labels
    assert all(decode_sample(s).size == (8, 8) for s in samples)
    # precomputed and verified as it is
    from kdcache.precompute import PrecomputeConfig
    from kdcache.teacher import TeacherConfig
    from kdcache.verify import VerifyConfig, verify_cache

    teacher = TeacherConfig(model="test_resnet", checkpoint=str(teacher_ckpt))
    out = tmp_path / "cache"
    run_precompute(PrecomputeConfig(output=str(out), teacher=teacher, command="pytest", **{**SMALL, "data": data, "epochs": 1}))
    verify_cache(VerifyConfig(cache=str(out), data=data, teacher=teacher, views=4), log=lambda line: None)


@pytest.mark.parametrize("drop, message", [
    ("image", r"has no 'image' column \(columns: label\); expected the Hub's layout"),
    ("label", r"has no 'label' column \(columns: image\)"),
])
def test_a_file_without_an_image_or_label_column_is_one_line(tmp_path, drop, message):
    images, labels = digits_rows(4)
    table = pa.table({"image": [{"bytes": b, "path": None} for b in images], "label": labels}).drop_columns([drop])
    pq.write_table(table, tmp_path / "bad.parquet")
    with pytest.raises(SourceError, match=message):
        open_source(f"parquet:{tmp_path / 'bad.parquet'}")


def test_missing_files_and_missing_protocol_packages_are_one_line(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        open_source(f"parquet:{tmp_path / 'nothing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="matches no parquet files"):
        open_source(f"parquet:{tmp_path / 'empty'}")
    (tmp_path / "notes.parquet").write_text("not parquet at all")
    with pytest.raises(SourceError, match=r"parquet file '.*notes.parquet' cannot be read \("):
        open_source(f"parquet:{tmp_path / 'notes.parquet'}")
    with pytest.raises(ConfigError, match=r"gcs:// needs a package that is not installed: Please install gcsfs"):
        open_source("parquet:gcs://bucket/imagenet/train-*.parquet")


def test_precompute_train_verify_and_refuse_a_changed_image(parquet_dir, teacher_ckpt, tmp_path):
    from kdcache.losses import LossConfig
    from kdcache.precompute import PrecomputeConfig
    from kdcache.student import StudentConfig, train_student
    from kdcache.teacher import TeacherConfig
    from kdcache.verify import VerifyConfig, verify_cache

    data = f"parquet:{parquet_dir}"
    out = tmp_path / "cache"
    settings = {**SMALL, "data": data, "epochs": 1, "blocks_per_unit": 2}
    run_precompute(PrecomputeConfig(output=str(out), teacher=TeacherConfig(model="test_resnet", checkpoint=str(teacher_ckpt)),
                                    command="pytest", **settings))
    manifest = json.loads((out / "zarr.json").read_text())["attributes"]["kdcache"]
    dataset = manifest["dataset"]
    assert (dataset["kind"], dataset["uri"], dataset["num_samples"], dataset["class_names"]) == ("parquet", data, 40, NAMES)
    assert manifest["blocks"]["kind"] == "shards" and manifest["blocks"]["sizes"] == [10] * 4
    teacher = TeacherConfig(model="test_resnet", checkpoint=str(teacher_ckpt))
    verify_cache(VerifyConfig(cache=str(out), data=data, teacher=teacher, views=8), log=lambda line: None)
    result = train_student(StudentConfig(data=data, model="test_resnet", run_dir=str(tmp_path / "run"), cache=str(out),
                                         loss=LossConfig(name="kd"), epochs=1, batch_size=8, max_steps=3),
                           log=lambda line: None)
    assert result is not None and (tmp_path / "run" / "metrics.jsonl").is_file()
    # DataLoader workers read their own row groups from a pickled copy of the source
    train_student(StudentConfig(data=data, model="test_resnet", run_dir=str(tmp_path / "run-workers"), cache=str(out),
                                loss=LossConfig(name="kd"), epochs=1, batch_size=8, max_steps=2, num_workers=1),
                  log=lambda line: None)
    assert (tmp_path / "run-workers" / "metrics.jsonl").is_file()

    # one image changes (same key, same label, other pixels): verify and training refuse it by key
    images, labels = digits_rows(40)
    images[23] = png(np.zeros((8, 8, 3), dtype=np.uint8))
    write_hub_parquet(parquet_dir / "train-00001-of-00002.parquet", images[20:], labels[20:],
                      paths=[f"b/{i}.png" for i in range(20)])
    with pytest.raises(VerifyError, match="'b/3.png'"):
        verify_cache(VerifyConfig(cache=str(out), data=data, teacher=teacher, views=8), log=lambda line: None)
    with pytest.raises(MismatchError, match="'b/3.png'"):
        train_student(StudentConfig(data=data, model="test_resnet", run_dir=str(tmp_path / "run2"), cache=str(out),
                                    loss=LossConfig(name="kd"), epochs=1, batch_size=8), log=lambda line: None)


def test_an_image_that_does_not_decode_is_named_by_key_and_creates_nothing(tmp_path, teacher_ckpt):
    from kdcache.precompute import PrecomputeConfig
    from kdcache.teacher import TeacherConfig

    images, labels = digits_rows(20)
    images[7] = b"<html>not an image</html>"
    write_hub_parquet(tmp_path / "train.parquet", images, labels)
    out = tmp_path / "cache"
    with pytest.raises(SourceError, match="sample 'img-0007.png': cannot decode image"):
        run_precompute(PrecomputeConfig(output=str(out), teacher=TeacherConfig(model="test_resnet", checkpoint=str(teacher_ckpt)),
                                        command="pytest", **{**SMALL, "data": f"parquet:{tmp_path / 'train.parquet'}",
                                                             "epochs": 1}))
    assert not (out / "zarr.json").exists()


def test_sources_benchmark_plans_parquet_with_one_read_per_block():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "sources.py"
    done = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {line.split()[0]: line for line in done.stdout.splitlines() if line.split()[:1] in (["parquet"], ["tar"])}
    assert "(1.0 per block)" in rows["parquet"] and "(2.0 per block)" in rows["tar"]
