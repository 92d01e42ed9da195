"""The command line leaves the Hugging Face client online unless the user says otherwise.

Published teachers and Hub datasets download on a user's machine; only the tests set
``HF_HUB_OFFLINE=1`` (tests/conftest.py). A command must not set it for the user.
"""

from __future__ import annotations

import os

from typer.testing import CliRunner

from kdcache_cli.main import app


def test_a_command_does_not_turn_the_hub_client_offline(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    result = CliRunner().invoke(app, ["info", str(tmp_path / "no-such-cache")])
    assert result.exit_code != 0 and "error: " in result.output
    assert "HF_HUB_OFFLINE" not in os.environ
