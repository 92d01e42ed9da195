"""README.md gives a new user two commands; CI runs exactly the test command, then the checks a fresh machine cannot make."""

import importlib.machinery
import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [block.strip() for block in blocks[:2]]


def test_readme_has_main_job_and_test_command():
    main_job, test_command = _commands()
    assert "kdcache quickstart" in main_job and "pip install" in main_job
    assert "pytest" in test_command and "pip install" in test_command


def test_ci_runs_the_readme_test_command():
    _, test_command = _commands()
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci.splitlines()


def test_ci_then_checks_debians_data_and_a_fresh_clone():
    _, test_command = _commands()
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    later = lines[lines.index(test_command) + 1:]
    assert "python -m pytest -q tests/real_data.py" in later
    assert "python .ci/fresh-clone" in later


def test_ci_runs_every_test_that_readmes_command_leaves_out():
    """README's command deselects the tests marked slow, and nothing else; CI runs exactly those next."""
    _, test_command = _commands()
    pytest_command = test_command.split(" && ")[1]
    assert re.findall(r' -m ("[^"]*"|\S+)', pytest_command) == ["pytest", '"not slow"']  # one marker expression
    assert " -k " not in pytest_command and "--deselect" not in pytest_command and "--ignore" not in pytest_command
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    later = lines[lines.index(test_command) + 1:]
    assert pytest_command.replace(' -m "not slow"', " -m slow") in later


def test_fresh_clone_reads_the_commands_out_of_readme():
    loader = importlib.machinery.SourceFileLoader("fresh_clone", str(ROOT / ".ci" / "fresh-clone"))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    main_job, test_command = _commands()
    (main_install, quickstart), (test_install, pytest_command) = module.readme_commands()
    assert main_job == f"{main_install} && {quickstart}" and test_command == f"{test_install} && {pytest_command}"
    assert quickstart.startswith("kdcache quickstart") and pytest_command.startswith("python -m pytest")
