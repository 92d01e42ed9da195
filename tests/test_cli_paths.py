"""Every command, given the wrong kind of path wherever it takes one, says so in one `error:` line.

Each path option is tried with a regular file, an empty file, a directory that is not what the
option wants and a path that does not exist: one line on stderr, the exit code of docs/cli.md's
table (2: configuration or input, 3: a cache that is not one) and no traceback.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdcache_cli.main import app

KINDS = ("file", "empty", "directory", "missing")


@pytest.fixture
def wrong_paths(tmp_path) -> dict[str, Path]:
    (tmp_path / "notes.txt").write_text("not a cache\n")
    (tmp_path / "empty.bin").write_bytes(b"")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "a.txt").write_text("x\n")
    return {"file": tmp_path / "notes.txt", "empty": tmp_path / "empty.bin", "directory": tmp_path / "plain",
            "missing": tmp_path / "nope"}


def _commands(out: Path, cache: Path, teacher: Path) -> dict[str, tuple[int, object]]:
    """name -> (exit code, argv for a path); each starts from arguments that work but for the path."""
    train = ["train-student", "--data", "digits", "--model", "test_resnet", "--max-steps", "1"]
    plain = [*train, "--loss", "ce", "--img-size", "32"]
    precompute = ["precompute-logits", "--data", "digits", "--teacher", "test_resnet"]
    return {
        "info CACHE": (3, lambda p: ["info", p]),
        "show CACHE": (3, lambda p: ["show", p, "--data", "digits", "--epoch", "0", "--out", out / "o.png"]),
        "verify CACHE": (3, lambda p: ["verify", p, "--quick"]),
        "export CACHE": (3, lambda p: ["export", p, out / "exported"]),
        "index CACHE": (3, lambda p: ["index", p]),
        "merge CACHE": (3, lambda p: ["merge", out / "merged", cache, p]),
        "add-teacher CACHE": (3, lambda p: ["add-teacher", p, "--data", "digits", "--name", "b", "--teacher", "test_resnet",
                                            "--teacher-checkpoint", teacher]),
        "train-student --cache": (3, lambda p: [*train, "--run-dir", out / "run", "--cache", p]),
        "train-student --data imagefolder:": (2, lambda p: [*plain, "--run-dir", out / "run", "--data", f"imagefolder:{p}"]),
        "train-student --val-data": (2, lambda p: [*plain, "--run-dir", out / "run", "--val-data", p]),
        "train-student --teacher-checkpoint": (2, lambda p: [*train, "--run-dir", out / "run", "--teacher", "test_resnet",
                                                             "--teacher-checkpoint", p, "--img-size", "32"]),
        "precompute-logits --data": (2, lambda p: [*precompute, "--teacher-checkpoint", teacher, "-o", out / "c", "--data", p]),
        "precompute-logits --teacher-checkpoint": (2, lambda p: [*precompute, "-o", out / "c", "--teacher-checkpoint", p]),
        "precompute-logits --teacher-file": (2, lambda p: ["precompute-logits", "--data", "digits", "-o", out / "c",
                                                           "--teacher-file", p]),
        "precompute-logits --augmentation": (2, lambda p: [*precompute, "--teacher-checkpoint", teacher, "-o", out / "c",
                                                           "-a", p]),
        "make-shards --data": (2, lambda p: ["make-shards", "--data", p, "-o", out / "shards" / "s-%06d.tar"]),
    }


#: Paths where a missing one (or an empty directory) is what the option wants: tried with the other kinds only.
NEW_PATHS = {
    "train-student --run-dir": (2, lambda teacher, cache, p: ["train-student", "--data", "digits", "--model", "test_resnet",
                                                              "--loss", "ce", "--img-size", "32", "--max-steps", "1", "--run-dir", p]),
    "precompute-logits --output": (2, lambda teacher, cache, p: ["precompute-logits", "--data", "digits", "--teacher", "test_resnet",
                                                                 "--teacher-checkpoint", teacher, "-o", p]),
    "make-shards --output": (2, lambda teacher, cache, p: ["make-shards", "--data", "digits", "-o", Path(p) / "s-%06d.tar"]),
    "quickstart --out": (2, lambda teacher, cache, p: ["quickstart", "--out", p]),
    "show --out": (2, lambda teacher, cache, p: ["show", cache, "--data", "digits", "--epoch", "0", "--out", Path(p) / "v.png"]),
    "export OUT": (2, lambda teacher, cache, p: ["export", cache, p]),
    "merge OUT": (2, lambda teacher, cache, p: ["merge", p, cache, cache]),
}


def _assert_one_error_line(result, code: int) -> str:
    assert isinstance(result.exception, SystemExit), f"escaped: {result.exception!r}\n{result.output}"
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert result.exit_code == code, result.stderr
    return errors[0]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("command", list(_commands(Path(), Path(), Path())))
def test_a_path_of_the_wrong_kind_is_one_error_line(command, kind, wrong_paths, tmp_path, small_cache, teacher_ckpt):
    out = tmp_path / "out"
    code, argv = _commands(out, small_cache, teacher_ckpt)[command]
    path = wrong_paths[kind]
    result = CliRunner().invoke(app, [str(a) for a in argv(str(path))])
    line = _assert_one_error_line(result, code)
    assert str(path) in line
    assert not out.exists() or not any(out.iterdir()), "a refused command left files behind"


@pytest.mark.parametrize("kind", ("file", "empty"))
@pytest.mark.parametrize("command", list(NEW_PATHS))
def test_a_file_where_a_new_directory_goes_is_one_error_line(command, kind, wrong_paths, teacher_ckpt, small_cache):
    code, argv = NEW_PATHS[command]
    path = wrong_paths[kind]
    before = path.read_bytes()
    result = CliRunner().invoke(app, [str(a) for a in argv(teacher_ckpt, small_cache, str(path))])
    line = _assert_one_error_line(result, code)
    assert str(path) in line
    assert path.read_bytes() == before


def test_a_cache_given_as_a_file_says_it_is_a_file(wrong_paths):
    result = CliRunner().invoke(app, ["info", str(wrong_paths["file"])])
    line = _assert_one_error_line(result, 3)
    assert line == (f"error: cache {wrong_paths['file']} is a file, not a cache directory (a cache is a directory "
                    "holding zarr.json, or a .zip archive of one)")
