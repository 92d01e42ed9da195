"""train-student's defaults fit the schedule it is given: the warmup is a tenth of the epochs (at
most 5) unless set, and an explicit --warmup-epochs is honoured or refused in one line."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from kdcache.errors import ConfigError
from kdcache_cli.main import app

pytestmark = pytest.mark.usefixtures("one_thread")


def train_student(run_dir, *options):
    args = ["train-student", "--data", "digits", "--model", "test_resnet", "--loss", "ce", "--img-size", "8",
            "--device", "cpu", "--amp", "none", "--max-steps", "1", "--run-dir", str(run_dir), *options]
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize(("options", "warmup"), [(("--epochs", "6"), 0), (("--epochs", "20"), 2),
                                                 (("--epochs", "6", "--warmup-epochs", "3"), 3)])
def test_the_run_warms_up_for_the_default_or_the_given_epochs(tmp_path, options, warmup):
    result = train_student(tmp_path / "run", *options)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "config.json").read_text())["warmup_epochs"] == warmup


@pytest.mark.parametrize("warmup", ["7", "-1"])
def test_a_warmup_outside_the_schedule_is_one_line(tmp_path, warmup):
    result = train_student(tmp_path / "run", "--epochs", "6", "--warmup-epochs", warmup)
    assert result.exit_code == ConfigError.exit_code
    assert result.output.strip() == f"error: --warmup-epochs {warmup}; expected 0 to --epochs (6)"
    assert not (tmp_path / "run").exists()


def test_the_command_and_the_library_share_their_defaults():
    import dataclasses

    import typer.main

    from kdcache.student import StudentConfig

    command = typer.main.get_command(app).commands["train-student"]
    options = {param.name: param.default for param in command.params}
    library = {f.name: f.default for f in dataclasses.fields(StudentConfig) if f.default is not dataclasses.MISSING}
    for name in ("epochs", "batch_size", "lr", "weight_decay", "opt", "sched", "warmup_epochs", "seed", "augmentation"):
        assert options[name] == library[name], name
    assert (library["batch_size"], library["lr"], library["warmup_epochs"]) == (64, 3e-3, None)


def test_the_run_evaluates_every_eval_every_epochs_and_always_after_the_last(tmp_path):
    args = ["train-student", "--data", "digits", "--val-data", "digits:val", "--model", "test_resnet", "--loss", "ce",
            "--img-size", "8", "--device", "cpu", "--amp", "none", "--epochs", "5", "--eval-every", "2",
            "--run-dir", str(tmp_path / "run")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines if line["kind"] == "eval"] == [2, 4, 5]


@pytest.mark.parametrize("every", ["0", "-3"])
def test_an_eval_interval_below_one_is_one_line(tmp_path, every):
    result = train_student(tmp_path / "run", "--epochs", "6", "--eval-every", every)
    assert result.exit_code == ConfigError.exit_code
    assert result.output.strip() == f"error: --eval-every {every}; expected at least 1 (epochs between evaluations)"
    assert not (tmp_path / "run").exists()
