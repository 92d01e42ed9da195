"""docs/python.md runs: every Python block in order in one directory, the torchrun block on 2 gloo ranks,
and the commands, docs/cli.md and docs/python.md name the same library function for each command."""

from __future__ import annotations

import contextlib
import inspect
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main

import kdcache
from kdcache_cli.main import app

DOCS = Path(__file__).resolve().parent.parent / "docs"
PYTHON_DOC = DOCS / "python.md"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```$", re.S | re.M)
pytestmark = pytest.mark.usefixtures("one_thread")  # threads that share the cores with other processes stall

#: What the plain loop must reach on digits:val: the quickstart's band (its students reach 87.5-90.6%).
BAND = 0.85


def blocks(path: Path) -> list[tuple[str, str, int]]:
    """(language, code, first line) of every fenced block of a Markdown page."""
    text = path.read_text()
    return [(m.group(1), m.group(2), text.count("\n", 0, m.start()) + 2) for m in FENCE.finditer(text)]


def top1_line(output: str, prefix: str) -> float:
    found = re.findall(rf"{re.escape(prefix)}: top-1 ([\d.]+)%", output)
    assert found, output
    return float(found[-1]) / 100


@pytest.mark.slow
def test_every_block_of_docs_python_md_runs_and_the_loops_learn(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    namespace: dict = {"__name__": "docs_python"}
    printed, commands = io.StringIO(), []
    for language, code, line in blocks(PYTHON_DOC):
        if language == "python" and code.startswith("# file: "):
            name = code.splitlines()[0].removeprefix("# file: ").strip()
            (tmp_path / name).write_text(code)
        elif language == "python":
            with contextlib.redirect_stdout(printed):
                exec(compile("\n" * (line - 1) + code, str(PYTHON_DOC), "exec"), namespace)
        elif language == "bash":
            done = subprocess.run(code, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
            assert done.returncode == 0, f"docs/python.md line {line}: {code}\n{done.stdout}\n{done.stderr}"
            commands.append(done.stdout)
    output = printed.getvalue()
    assert namespace["plain_top1"] >= BAND, output
    assert top1_line(output, "plain loop") == pytest.approx(namespace["plain_top1"], abs=1e-4)
    assert namespace["lightning_top1"] >= BAND, output
    if namespace["device"] == "cpu":  # the same views, seed and updates on one device
        assert namespace["lightning_top1"] == namespace["plain_top1"]
    assert len(commands) == 1 and top1_line(commands[0], "2 ranks") >= BAND, commands
    stats = namespace["stats"]  # MKD moved its temperatures from where they started
    assert (stats["teacher_temperature"], stats["student_temperature"]) != (4.0, 4.0)
    assert re.search(r"resnet10t: k=5 of 10 classes; sample \d+ of digits:train, first view: class \d", output), output


def test_the_docs_have_python_blocks_and_one_torchrun_command():
    found = blocks(PYTHON_DOC)
    assert sum(language == "python" for language, _, _ in found) >= 6
    assert [code.split()[0] for language, code, _ in found if language == "bash"] == ["torchrun"]


def command_functions() -> dict[str, list[str]]:
    """Command name -> the public kdcache functions its callback imports and calls."""
    out = {}
    for name, command in typer.main.get_command(app).commands.items():
        source = inspect.getsource(command.callback)
        public = []
        for match in re.finditer(r"from kdcache[\w.]* import ([^\n]+)", source):
            for part in match.group(1).split(","):
                function, _, alias = part.strip().partition(" as ")
                if function in kdcache.__all__ and not function[0].isupper() and re.search(rf"\b{alias or function}\(", source):
                    public.append(function)
        out[name] = public
    return out


def documented(path: Path, pattern: str) -> dict[str, str]:
    return dict(re.findall(pattern, path.read_text(), re.M))


def test_each_command_calls_the_one_function_docs_cli_md_and_docs_python_md_name():
    calls = command_functions()
    cli_doc = documented(DOCS / "cli.md", r"^## `kdcache ([\w-]+)[^`]*` \(`kdcache\.(\w+)`\)")
    python_doc = documented(PYTHON_DOC, r"^\| `kdcache ([\w-]+)` \| `kdcache\.(\w+)` \|")
    assert set(cli_doc) == set(python_doc) == set(calls)
    for command, function in cli_doc.items():
        assert python_doc[command] == function, command
        assert function in kdcache.__all__, function
        assert function in calls[command], (command, calls[command])


def test_the_public_api_is_what_kdcache_names_and_each_name_resolves():
    for name in kdcache.__all__:
        assert getattr(kdcache, name) is not None, name
    with pytest.raises(AttributeError, match="has no attribute 'ViewLoader'"):
        kdcache.ViewLoader  # noqa: B018  (internal: reached through CacheLoader)
