"""README.md gives a new user two commands; CI must run exactly the test command."""

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
