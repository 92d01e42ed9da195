"""Datasets on the Hugging Face Hub, through huggingface_hub's file system against a Hub on 127.0.0.1:
parquet (``parquet:hf://datasets/...``) and webdataset tar shards (``hf://datasets/...tar``), a gated
repository with and without a token, and an unknown repository or revision."""

from __future__ import annotations

import io
import tarfile

import pytest
from conftest import SMALL, run_precompute
from hub import COMMIT, TOKEN, FakeHub
from test_parquet import digits_rows, write_hub_parquet

from kdcache.errors import ConfigError, SourceError
from kdcache.sources import open_source

REPO = "testorg/digits"


def parquet_bytes(tmp_path, images, labels, name="part.parquet") -> bytes:
    return write_hub_parquet(tmp_path / name, images, labels).read_bytes()


def tar_bytes(images, labels, start: int) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for i, (image, label) in enumerate(zip(images, labels), start=start):
            for suffix, data in (("png", image), ("cls", str(label).encode())):
                info = tarfile.TarInfo(f"sample{i:04d}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.fixture
def hub(monkeypatch):
    from huggingface_hub import HfFileSystem, constants

    with FakeHub() as fake:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", fake.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", fake.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.delenv("HF_TOKEN", raising=False)
        HfFileSystem.clear_instance_cache()  # its listings and repository checks are cached per instance
        yield fake
        HfFileSystem.clear_instance_cache()


def test_parquet_on_the_hub_is_precomputed_and_verified(hub, tmp_path, teacher_ckpt):
    from kdcache.precompute import PrecomputeConfig
    from kdcache.teacher import TeacherConfig
    from kdcache.verify import VerifyConfig, verify_cache

    images, labels = digits_rows(40)
    hub.datasets[REPO] = {"commit": COMMIT, "files": {
        "README.md": b"# digits",
        "data/train-00000-of-00002.parquet": parquet_bytes(tmp_path, images[:20], labels[:20], "a.parquet"),
        "data/train-00001-of-00002.parquet": parquet_bytes(tmp_path, images[20:], labels[20:], "b.parquet"),
    }}
    data = f"parquet:hf://datasets/{REPO}@{COMMIT}/data/train-*.parquet"
    source = open_source(data)
    assert (len(source), [n for _, n in source.shards()]) == (40, [10, 10, 10, 10])
    assert [s.data for s in source.read_shard(3)] == images[30:]
    out = tmp_path / "cache"
    teacher = TeacherConfig(model="test_resnet", checkpoint=str(teacher_ckpt))
    run_precompute(PrecomputeConfig(output=str(out), teacher=teacher, command="pytest", **{**SMALL, "data": data, "epochs": 1}))
    verify_cache(VerifyConfig(cache=str(out), data=data, teacher=teacher, views=8), log=lambda line: None)


def test_tar_shards_on_the_hub_are_urls(hub):
    images, labels = digits_rows(8)
    hub.datasets["testorg/digits-wds"] = {"commit": COMMIT, "files": {
        "train-0000.tar": tar_bytes(images[:4], labels[:4], 0), "train-0001.tar": tar_bytes(images[4:], labels[4:], 4)}}
    source = open_source("hf://datasets/testorg/digits-wds/train-{0000..0001}.tar", num_classes=10)
    assert (source.kind, len(source)) == ("webdataset", 8)
    assert [s.key for s in source.read_shard(1)] == ["sample0004", "sample0005", "sample0006", "sample0007"]
    assert [s.data for s in source.iter_samples()] == images


def test_a_gated_dataset_needs_the_token_and_never_shows_it(hub, tmp_path, monkeypatch):
    from huggingface_hub import HfFileSystem

    images, labels = digits_rows(10)
    hub.datasets[REPO] = {"commit": COMMIT, "gated": True,
                          "files": {"data/train.parquet": parquet_bytes(tmp_path, images, labels),
                                    "train-0000.tar": tar_bytes(images, labels, 0)}}
    with pytest.raises(ConfigError, match=f"the Hub repository {REPO} is gated: .* set HF_TOKEN") as caught:
        open_source(f"parquet:hf://datasets/{REPO}/data/train.parquet")
    assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match="is gated"):
        list(open_source(f"hf://datasets/{REPO}/train-0000.tar", num_classes=10).iter_samples())
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    HfFileSystem.clear_instance_cache()
    assert len(open_source(f"parquet:hf://datasets/{REPO}/data/train.parquet")) == 10
    assert len(list(open_source(f"hf://datasets/{REPO}/train-0000.tar", num_classes=10).iter_samples())) == 10
    with pytest.raises(ConfigError) as caught:  # a failure with the token set does not show it
        open_source(f"parquet:hf://datasets/{REPO}@v9/data/train.parquet")
    assert f"the Hub repository {REPO} has no revision 'v9'" in str(caught.value) and TOKEN not in str(caught.value)


def test_an_unknown_dataset_or_path_is_one_line(hub, tmp_path):
    images, labels = digits_rows(10)
    hub.datasets[REPO] = {"commit": COMMIT, "files": {"data/train.parquet": parquet_bytes(tmp_path, images, labels)}}
    with pytest.raises(ConfigError, match="no repository testorg/missing on the Hub"):
        open_source("parquet:hf://datasets/testorg/missing/data/train.parquet")
    with pytest.raises(SourceError, match=f"parquet 'hf://datasets/{REPO}/data/other.parquet' does not exist"):
        open_source(f"parquet:hf://datasets/{REPO}/data/other.parquet")
