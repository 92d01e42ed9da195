"""docs/cli.md agrees with the commands: every option `--help` shows is documented under its command, with its default.

The options and defaults are read from the typer app itself, so an option added or a default
changed in cli/main.py fails here until docs/cli.md says so.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer

from kdcache_cli.main import app

DOC = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
COMMANDS = typer.main.get_command(app).commands


def _section(command: str) -> str:
    """The text under ``## `kdcache COMMAND ...``` up to the next heading of that level, heading line included."""
    match = re.search(rf"^## `kdcache {re.escape(command)}\b.*$", DOC, flags=re.M)
    assert match, f"docs/cli.md has no section for kdcache {command}"
    end = DOC.find("\n## ", match.end())
    return DOC[match.start() : end if end > 0 else len(DOC)]


def _options(command: str) -> list:
    """The options `kdcache COMMAND --help` shows."""
    return [p for p in COMMANDS[command].params if p.param_type_name == "option" and not p.hidden]


def _spellings(value) -> set[str]:
    """How a default may be written: 10, 120 for 120.0, 3e-3 for 0.003, light."""
    spellings = {str(value)}
    if isinstance(value, float):
        spellings |= {f"{value:g}", f"{value:.0e}".replace("e-0", "e-").replace("e+0", "e")}
    return spellings


def _documents_default(lines: list[str], name: str, default) -> bool:
    for line in lines:
        for text in _spellings(default):
            forms = (f"`{name} {text}`", f"default {text}", f"default `{text}`", f"default: {text}", f"default: `{text}`")
            if any(form in line for form in forms):
                return True
    return False


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_is_documented_under_its_command_with_its_default(command):
    section = _section(command)
    problems = []
    for option in _options(command):
        name = max(option.opts, key=len)
        mentions = re.compile(rf"(?<![\w-]){re.escape(name)}(?![\w-])")
        lines = [line for line in section.splitlines() if mentions.search(line)]
        if not lines and name.startswith("--teacher-"):  # "`--teacher...`": the teacher spec options as a group
            lines = [line for line in section.splitlines() if "`--teacher...`" in line]
        if not lines:
            problems.append(f"{name} is not mentioned")
            continue
        default = option.default
        if option.required or default is None or default is False or option.multiple:
            continue
        if not _documents_default(lines, name, default):
            problems.append(f"{name}: its default {default!r} is not given (as `{name} {default}` or 'default {default}')")
    assert not problems, f"docs/cli.md, kdcache {command}: " + "; ".join(problems)
