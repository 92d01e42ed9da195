"""URLs in the default install: http(s) needs nothing beyond README's first command, and a protocol whose
fsspec package is missing is one line naming it."""

from __future__ import annotations

import tomllib
from pathlib import Path

from typer.testing import CliRunner

from kdcache_cli.main import app

ROOT = Path(__file__).resolve().parent.parent


def test_http_is_in_the_default_install():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {dep.split(">")[0].split("=")[0].split("[")[0].strip() for dep in project["dependencies"]}
    assert {"aiohttp", "requests", "fsspec", "pyarrow", "huggingface_hub"} <= names
    import fsspec

    fsspec.filesystem("https")  # HTTPFileSystem: its imports are satisfied


def test_a_cache_url_whose_protocol_package_is_missing_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["info", "gcs://bucket/caches/imagenet"])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == ["error: cache gcs://bucket/caches/imagenet: gcs:// needs a package that is not installed: "
                     "Please install gcsfs to access Google Storage"], result.output


def test_a_shard_url_whose_protocol_package_is_missing_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["precompute-logits", "--data", "gcs://bucket/shards/train-{0000..0003}.tar",
                                      "--teacher", "test_resnet", "--teacher-checkpoint", __file__,
                                      "--output", str(tmp_path / "out")])
    assert result.exit_code != 0
    assert "gcs:// needs a package that is not installed: Please install gcsfs" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()
