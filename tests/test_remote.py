"""Caches read over http(s): a real http.server on 127.0.0.1 serves a cache directory."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from kdcache.errors import FormatError
from kdcache.format import open_cache
from kdcache.location import Location
from kdcache.losses import LossConfig
from kdcache.student import StudentConfig, train_student
from kdcache_cli.main import app

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def served(tmp_path, small_cache, serve_directory):
    """(url of a copy of small_cache served over http, local path of that copy)."""
    root = tmp_path / "www"
    shutil.copytree(small_cache, root / "cache")
    return f"{serve_directory(root)}/cache", root / "cache"


def test_a_cache_over_http_reads_the_same_records_as_the_local_copy(served, helpers):
    url, local = served
    helpers.assert_same_cache(open_cache(url), open_cache(local))


def test_info_and_verify_quick_take_a_url(served):
    url, _ = served
    result = CliRunner().invoke(app, ["info", url, "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["epochs_complete"] == [0, 1] and info["bytes_per_view"] > 0
    result = CliRunner().invoke(app, ["verify", url, "--quick"])
    assert result.exit_code == 0 and "result       OK" in result.stdout


def train_losses(run_dir) -> list[float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if line.get("kind") == "train"]


def test_train_student_from_a_url_steps_like_from_the_local_copy(served, tmp_path):
    url, local = served
    runs = {}
    for name, cache in (("local", str(local)), ("http", url)):
        config = StudentConfig(data="digits", model="test_resnet", run_dir=str(tmp_path / name), loss=LossConfig(name="kd"),
                               cache=cache, epochs=1, batch_size=64, log_every=1, max_steps=12)
        train_student(config, log=lambda _: None)
        runs[name] = train_losses(tmp_path / name)
    assert len(runs["http"]) == 12
    assert runs["http"] == runs["local"]


def test_a_missing_file_on_the_server_is_named(served):
    url, local = served
    (local / "values" / "c" / "0" / "1" / "0").unlink()
    with pytest.raises(FormatError, match=r"epoch 0 unit 1 .*file values/c/0/1/0 is missing"):
        open_cache(url).read_block(0, 2)


def test_an_unreachable_server_is_one_clear_error_after_retries(monkeypatch):
    monkeypatch.setattr(Location, "BACKOFF", 0.01)
    result = CliRunner().invoke(app, ["info", "http://127.0.0.1:9/cache"])
    assert result.exit_code == 3
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: http://127.0.0.1:9/cache: cannot read zarr.json after 4 attempts")
