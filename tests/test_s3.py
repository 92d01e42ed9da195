"""Caches read from an S3-compatible object store: moto's server on 127.0.0.1 stands in for the store.

The store is chosen the way a user chooses one: plain environment variables that botocore
honours (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION), and
an ``s3://bucket/prefix`` URL wherever kdcache takes a cache.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from moto import server as moto_server
from typer.testing import CliRunner

from kdcache.errors import ChecksumError
from kdcache.export import ExportConfig, export_cache
from kdcache.format import open_cache, shard_key
from kdcache.losses import LossConfig
from kdcache.student import StudentConfig, train_student
from kdcache_cli.main import app

pytestmark = pytest.mark.usefixtures("one_thread")

BUCKET = "kdcache-test"


@pytest.fixture(scope="module")
def store(helpers):
    """An s3fs filesystem on a moto server, with the endpoint and fake credentials in the environment."""
    import s3fs

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no request log on stderr
    port = helpers.free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        env.setenv("AWS_ACCESS_KEY_ID", "kdcache-test")
        env.setenv("AWS_SECRET_ACCESS_KEY", "kdcache-test")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.delenv("AWS_PROFILE", raising=False)
        s3fs.S3FileSystem.clear_instance_cache()  # a filesystem made before would keep another endpoint
        fs = s3fs.S3FileSystem()
        fs.mkdir(BUCKET)
        try:
            yield fs
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            server.stop()


@pytest.fixture(scope="module")
def uploaded(store, small_cache):
    """The url of a copy of small_cache uploaded to the store."""
    store.put(str(small_cache), f"{BUCKET}/cache", recursive=True)
    return f"s3://{BUCKET}/cache"


def test_the_upload_holds_every_file(store, uploaded, small_cache):
    local = sorted(str(p.relative_to(small_cache)) for p in small_cache.rglob("*") if p.is_file())
    remote = sorted(name.removeprefix(f"{BUCKET}/cache/") for name in store.find(f"{BUCKET}/cache"))
    assert remote == local


def test_a_cache_in_the_store_reads_the_same_records_as_the_local_copy(uploaded, small_cache, helpers):
    helpers.assert_same_cache(open_cache(uploaded), open_cache(small_cache))


def test_info_and_verify_quick_take_an_s3_url(uploaded):
    result = CliRunner().invoke(app, ["info", uploaded, "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["location"] == uploaded and info["epochs_complete"] == [0, 1] and info["bytes_per_view"] > 0
    result = CliRunner().invoke(app, ["verify", uploaded, "--quick"])
    assert result.exit_code == 0, result.output
    assert "6 unit(s) committed, 0 missing, 0 damaged" in result.stdout and "result       OK" in result.stdout


def train_losses(run_dir) -> list[float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if line.get("kind") == "train"]


def test_train_student_from_s3_steps_like_from_the_local_copy(uploaded, small_cache, tmp_path):
    runs = {}
    for name, cache in (("local", str(small_cache)), ("s3", uploaded)):
        config = StudentConfig(data="digits", model="test_resnet", run_dir=str(tmp_path / name), loss=LossConfig(name="kd"),
                               cache=cache, epochs=1, batch_size=64, log_every=1, max_steps=12, amp="none", device="cpu")
        train_student(config, log=lambda _: None)
        runs[name] = train_losses(tmp_path / name)
    assert len(runs["s3"]) == 12
    assert runs["s3"] == runs["local"]


@pytest.mark.parametrize("url", [f"s3://{BUCKET}/no-such-cache", "s3://no-such-bucket/cache"], ids=["key", "bucket"])
def test_a_missing_bucket_or_key_is_one_line_naming_the_url(store, url):
    result = CliRunner().invoke(app, ["info", url])
    assert result.exit_code == 3
    (line,) = result.stderr.strip().splitlines()
    assert line == f"error: {url}: root metadata zarr.json is missing"


def test_a_flipped_byte_in_an_uploaded_unit_names_epoch_and_unit(store, small_cache):
    store.put(str(small_cache), f"{BUCKET}/damaged", recursive=True)
    url, key = f"s3://{BUCKET}/damaged", shard_key("params", 1, 2)
    data = bytearray(store.cat_file(f"{BUCKET}/damaged/{key}"))
    data[len(data) // 2] ^= 0xFF
    store.pipe_file(f"{BUCKET}/damaged/{key}", bytes(data))
    result = CliRunner().invoke(app, ["verify", url, "--quick"])
    assert result.exit_code == 3
    assert result.stderr.strip() == f"error: cache {url} failed verification: 1 problem(s), listed above: 1 in the cache's files"
    (line,) = [line.split("FAILED", 1)[1].strip() for line in result.stdout.splitlines() if line.strip().startswith("FAILED")]
    assert line == (f"{url}: epoch 1 unit 2 (blocks 4..5): file {key} does not match its ledger checksum; "
                    "this copy is read-only (a URL or an archive): fetch a fresh copy, or tell whoever publishes "
                    "the cache (they can repair it with kdcache precompute-logits --resume --repair)")
    with pytest.raises(ChecksumError, match=r"epoch 1 unit 2 \(blocks 4\.\.5\)"):
        open_cache(url).read_block(1, 5)


def test_an_exported_zip_reads_in_place_from_the_store(store, small_cache, tmp_path):
    archive = tmp_path / "epoch1.zip"
    export_cache(ExportConfig(cache=str(small_cache), output=str(archive), epochs=(1,), format="zip"), log=lambda _: None)
    store.put_file(str(archive), f"{BUCKET}/epoch1.zip")
    url = f"s3://{BUCKET}/epoch1.zip"
    remote, here = open_cache(url), open_cache(small_cache)
    assert remote.manifest == here.manifest and sorted(remote.ledger) == [(1, 0), (1, 1), (1, 2)]
    for name, array in here.read_unit(1, 2).items():
        np.testing.assert_array_equal(remote.read_unit(1, 2)[name], array)
    result = CliRunner().invoke(app, ["verify", url, "--quick"])
    assert result.exit_code == 0 and "result       OK" in result.stdout
    missing = CliRunner().invoke(app, ["info", f"s3://{BUCKET}/none.zip"])
    assert missing.exit_code == 3 and missing.stderr.strip() == f"error: s3://{BUCKET}/none.zip: the archive does not exist"
