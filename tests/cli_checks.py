"""The CLI in this process, and the check that a refusal is exactly one `error:` line (no traceback)."""

from typer.testing import CliRunner

from kdcache_cli.main import app


def quiet(message: str) -> None:
    pass


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_error_line(result, exit_code: int) -> str:
    assert result.exit_code == exit_code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]
