"""The training engine on a tiny problem: scikit-learn's 8x8 digits and timm's ``test_resnet``.

``DigitsLoader`` stands in for the view loader here only: it serves the loader contract
(``batches_per_epoch``, deterministic ``epoch_batches(epoch, start_batch)``) from memory.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from sklearn.datasets import load_digits

from kdcache.batch import Batch
from kdcache.checkpoint import CHECKPOINT_NAME, load_checkpoint
from kdcache.errors import ConfigError
from kdcache.losses import LossConfig
from kdcache.runlog import Progress, read_metrics
from kdcache.train import train
from kdcache.train_config import TrainConfig, default_warmup_epochs

NUM_CLASSES = 10
BATCH = 64


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).div_(16.0)
    images = images.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    return images, torch.tensor(digits.target, dtype=torch.int64)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these tiny models run faster so, above all on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


IMAGES, LABELS = _digits()
TRAIN = slice(0, 1400)
META = slice(1400, 1600)
VAL = slice(1600, None)


def _batch(images: torch.Tensor, labels: torch.Tensor, epoch: int, positions: torch.Tensor) -> Batch:
    views = torch.stack([torch.full_like(positions, epoch), positions], dim=1)
    target = torch.nn.functional.one_hot(labels, NUM_CLASSES).float()
    return Batch(images=images, target=target, labels=labels, record=None, views=views)


class DigitsLoader:
    """A seeded per-epoch permutation of the training split, cut into full global batches;
    rank ``rank`` of ``world`` gets its slice of each global batch."""

    def __init__(self, split: slice = TRAIN, batch_size: int = BATCH, seed: int = 0, rank: int = 0, world: int = 1) -> None:
        self.images, self.labels = IMAGES[split], LABELS[split]
        self.batch_size = batch_size
        self.seed = seed
        self.rank, self.world = rank, world
        self.batches_per_epoch = len(self.labels) // batch_size

    def epoch_batches(self, train_epoch: int, start_batch: int = 0):
        order = torch.randperm(len(self.labels), generator=torch.Generator().manual_seed(self.seed * 100_003 + train_epoch))
        per_rank = self.batch_size // self.world
        for b in range(start_batch, self.batches_per_epoch):
            first = b * self.batch_size + self.rank * per_rank
            positions = order[first : first + per_rank]
            yield _batch(self.images[positions], self.labels[positions], train_epoch, positions)


def _fixed_batches(split: slice, batch_size: int = 100) -> list[Batch]:
    images, labels = IMAGES[split], LABELS[split]
    positions = torch.arange(len(labels))
    return [
        _batch(images[i : i + batch_size], labels[i : i + batch_size], 0, positions[i : i + batch_size])
        for i in range(0, len(labels), batch_size)
    ]


VAL_BATCHES = _fixed_batches(VAL)
META_BATCHES = _fixed_batches(META, batch_size=50)


def _config(run_dir, **overrides) -> TrainConfig:
    settings = dict(
        model="test_resnet",
        num_classes=NUM_CLASSES,
        img_size=8,
        epochs=2,
        batch_size=BATCH,
        lr=3e-3,
        weight_decay=0.01,
        warmup_epochs=0,
        min_lr=1e-5,
        amp="bf16",
        device="cpu",
        seed=0,
        run_dir=str(run_dir),
        checkpoint_every=0,
        log_every=1,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def _teacher() -> torch.nn.Module:
    torch.manual_seed(123)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, NUM_CLASSES))


def _quiet(message: str) -> None:
    pass


class _Crash(RuntimeError):
    pass


def _crash_at(step_to_crash: int):
    def on_step(step: int) -> None:
        if step == step_to_crash:
            raise _Crash(f"simulated kill at step {step}")

    return on_step


def _assert_same_state(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_ce_training_learns_digits_and_writes_the_run_record(tmp_path):
    config = _config(tmp_path / "run", epochs=3, ema=True, ema_decay=0.9)
    result = train(config, DigitsLoader(), val_batches=VAL_BATCHES, log=_quiet)

    assert result.completed and result.steps == 3 * DigitsLoader().batches_per_epoch
    assert result.final_top1 > 0.6, result  # chance is 0.1
    assert result.best_top1 >= result.final_top1
    assert result.final_ema_top1 is not None and result.images_per_s > 0

    run_dir = tmp_path / "run"
    assert json.loads((run_dir / "config.json").read_text()) == config.to_dict()
    assert TrainConfig.from_dict(config.to_dict()) == config
    lines = read_metrics(run_dir / "metrics.jsonl")
    kinds = [line["kind"] for line in lines]
    assert kinds[0] == "start" and kinds[-1] == "end" and kinds.count("eval") == 3
    start = lines[0]
    assert start["amp"] == "none" and start["amp_requested"] == "bf16"  # bf16 autocast is CUDA-only
    assert start["device"] == "cpu" and start["world_size"] == 1
    steps = [line for line in lines if line["kind"] == "train"]
    assert [line["step"] for line in steps] == list(range(1, result.steps + 1))
    assert {"step", "epoch", "batch", "loss", "lr", "images_per_s", "time"} <= steps[0].keys()
    evals = [line for line in lines if line["kind"] == "eval"]
    assert [line["epoch"] for line in evals] == [1, 2, 3]
    assert {"top1", "ema_top1", "step"} <= evals[0].keys()

    saved = json.loads((run_dir / "result.json").read_text())
    assert {"final_top1", "best_top1", "final_ema_top1", "steps", "wall_time_s", "images_per_s", "run_dir", "amp"} <= saved.keys()
    assert saved["final_top1"] == pytest.approx(result.final_top1)
    assert (run_dir / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_online_teacher_kd_runs_and_logs(tmp_path):
    config = _config(tmp_path / "run", epochs=1, loss=LossConfig(name="kd", alpha=0.5, temperature=2.0), log_every=5)
    result = train(config, DigitsLoader(), val_batches=VAL_BATCHES, teacher=_teacher(), log=_quiet)

    assert result.completed and result.final_top1 is not None
    lines = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert lines[0]["online_teacher"] is True and lines[0]["loss"] == "kd"
    losses = [line["loss"] for line in lines if line["kind"] == "train"]
    assert losses and all(isinstance(value, float) and value == value for value in losses)


def test_kd_without_teacher_records_is_a_config_error(tmp_path):
    config = _config(tmp_path / "run", epochs=1, loss=LossConfig(name="kd"))
    with pytest.raises(ConfigError, match="needs teacher records"):
        train(config, DigitsLoader(), log=_quiet)


def test_existing_run_dir_is_refused_without_resume(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="exists; pass --resume"):
        train(_config(run_dir), DigitsLoader(), log=_quiet)
    assert sorted(p.name for p in run_dir.iterdir()) == ["notes.txt"]
    assert (run_dir / "notes.txt").read_text() == "keep me"


def test_resume_refuses_changed_settings(tmp_path):
    run_dir = tmp_path / "run"
    train(_config(run_dir, epochs=1, max_steps=3), DigitsLoader(), log=_quiet)
    with pytest.raises(ConfigError, match="lr="):
        train(_config(run_dir, epochs=1, lr=1e-2, resume=True), DigitsLoader(), log=_quiet)


@pytest.mark.parametrize("bad", [dict(amp="fp16"), dict(epochs=0), dict(lr=-1.0), dict(opt="nope"), dict(model="no_such_model")])
def test_bad_config_fields_are_named(tmp_path, bad):
    (field,) = bad
    with pytest.raises(ConfigError, match=f"TrainConfig.{field}="):
        _config(tmp_path / "run", **bad)


# ---- the warmup fits the schedule -------------------------------------------------------------


@pytest.mark.parametrize(("epochs", "warmup"), [(1, 0), (3, 0), (6, 0), (9, 0), (10, 1), (19, 1), (30, 3), (50, 5),
                                                (300, 5)])
def test_an_unset_warmup_is_a_tenth_of_the_epochs_and_at_most_5(tmp_path, epochs, warmup):
    assert default_warmup_epochs(epochs) == warmup
    config = TrainConfig(model="test_resnet", num_classes=NUM_CLASSES, run_dir=str(tmp_path / "run"), epochs=epochs)
    assert config.warmup_epochs == warmup
    assert TrainConfig.from_dict(config.to_dict()) == config  # config.json holds the warmup the run used


def test_an_explicit_warmup_is_honoured(tmp_path):
    assert _config(tmp_path / "run", epochs=6, warmup_epochs=4).warmup_epochs == 4
    assert _config(tmp_path / "run", epochs=300, warmup_epochs=0).warmup_epochs == 0
    with pytest.raises(ConfigError, match="TrainConfig.warmup_epochs=7: expected at most epochs=6"):
        _config(tmp_path / "run", epochs=6, warmup_epochs=7)


def _first_lrs(run_dir, **overrides) -> list[float]:
    train(_config(run_dir, max_steps=3, **overrides), DigitsLoader(), log=_quiet)
    return [line["lr"] for line in read_metrics(run_dir / "metrics.jsonl") if line["kind"] == "train"]


def test_the_scheduler_warms_up_only_when_the_schedule_has_room(tmp_path):
    short = _first_lrs(tmp_path / "short", epochs=6, warmup_epochs=None)
    assert short[0] == pytest.approx(3e-3)  # no warmup in 6 epochs: the first step runs at the full rate
    long = _first_lrs(tmp_path / "long", epochs=20, warmup_epochs=None)  # 2 warmup epochs of 21 steps
    assert long[0] < 1e-4 and long[0] < long[1] < long[2] < 3e-3


# ---- progress on a terminal -------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _screen(text: str) -> list[str]:
    """The lines a terminal shows for ``text``: a carriage return goes back to the line's start,
    and what follows overwrites it (the bar's line, not yet ended, is the last)."""
    assert "\x1b" not in text, "a single bar needs no cursor movement"
    lines, line, column = [], [], 0
    for char in text:
        if char == "\n":
            lines.append("".join(line).rstrip())
            line, column = [], 0
        elif char == "\r":
            column = 0
        else:
            line[column:column + 1] = [char]
            column += 1
    return lines + ["".join(line).rstrip()]


def _run_with_stderr(tmp_path, monkeypatch, stream) -> str:
    monkeypatch.setattr(sys, "stderr", stream)
    train(_config(tmp_path / "run", epochs=3), DigitsLoader(), val_batches=VAL_BATCHES,
          log=lambda message: sys.stderr.write(message + "\n"))
    return stream.getvalue()


def test_epoch_lines_do_not_break_the_progress_bar_on_a_terminal(tmp_path, monkeypatch):
    screen = _screen(_run_with_stderr(tmp_path, monkeypatch, _Terminal()))
    steps = 3 * DigitsLoader().batches_per_epoch
    epochs = [line for line in screen if "top-1" in line and not line.startswith("finished")]
    assert len(epochs) == 3
    for number, line in enumerate(epochs, start=1):
        assert re.fullmatch(rf"epoch {number}/3: top-1 \d+\.\d\d%", line), line  # whole, with nothing of the bar
    bars = [line for line in screen if f"/{steps} [" in line]
    assert bars and all("top-1" not in line for line in bars)
    assert f"100%" in bars[-1] and f"{steps}/{steps}" in bars[-1] and bars[-1].startswith("epoch 3/3")
    assert screen.index(bars[-1]) > screen.index(epochs[-1])  # the finished bar stays below the last epoch line
    assert screen[-2].startswith(f"finished at step {steps}") and screen[-1] == ""


def test_without_a_terminal_there_is_no_bar_and_the_lines_are_plain(tmp_path, monkeypatch):
    text = _run_with_stderr(tmp_path, monkeypatch, io.StringIO())
    assert "\r" not in text and "%|" not in text
    lines = text.splitlines()
    assert [line for line in lines if line.startswith("epoch")] == [
        line for line in lines if re.fullmatch(r"epoch \d/3: top-1 \d+\.\d\d%", line)]
    assert len([line for line in lines if line.startswith("epoch")]) == 3


def test_ranks_other_than_0_show_no_bar_and_say_nothing(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    said = []
    progress = Progress(said.append, total=10, enabled=False)
    progress.say("epoch 1/1: top-1 50.00%")
    progress.step(loss="1.0")
    progress.close()
    assert said == [] and terminal.getvalue() == ""


def test_killed_and_resumed_run_ends_with_identical_weights(tmp_path):
    settings = dict(epochs=2, ema=True, ema_decay=0.9, checkpoint_every=5, warmup_epochs=1)
    reference = train(_config(tmp_path / "a", **settings), DigitsLoader(), val_batches=VAL_BATCHES, log=_quiet)

    # Killed mid-epoch 2 (step 28), two steps after the checkpoint at step 25, then resumed.
    with pytest.raises(_Crash):
        train(_config(tmp_path / "b", **settings), DigitsLoader(), val_batches=VAL_BATCHES, log=_quiet,
              on_step=_crash_at(28))
    assert load_checkpoint(tmp_path / "b" / CHECKPOINT_NAME)["position"]["step"] == 25
    resumed = train(_config(tmp_path / "b", resume=True, **settings), DigitsLoader(), val_batches=VAL_BATCHES, log=_quiet)

    # Stopped cleanly by max_steps mid-epoch 1, then resumed.
    stopped = train(_config(tmp_path / "c", max_steps=12, **settings), DigitsLoader(), log=_quiet)
    assert not stopped.completed and stopped.steps == 12
    assert not (tmp_path / "c" / "result.json").exists()
    finished = train(_config(tmp_path / "c", resume=True, **settings), DigitsLoader(), val_batches=VAL_BATCHES, log=_quiet)

    final = {name: load_checkpoint(tmp_path / name / CHECKPOINT_NAME) for name in ("a", "b", "c")}
    for other in ("b", "c"):
        for part in ("model", "ema"):
            _assert_same_state(final["a"]["parts"][part], final[other]["parts"][part])
        assert final[other]["position"] == final["a"]["position"]
    assert resumed.steps == finished.steps == reference.steps
    assert resumed.final_top1 == finished.final_top1 == reference.final_top1

    # The metrics of the resumed run hold each step once.
    steps = [line["step"] for line in read_metrics(tmp_path / "b" / "metrics.jsonl") if line["kind"] == "train"]
    assert steps == list(range(1, reference.steps + 1))


def test_mkd_learns_temperatures_checkpoints_and_resumes_them(tmp_path):
    settings = dict(
        epochs=1,
        loss=LossConfig(name="mkd", alpha=0.9, temperature=4.0),
        mkd_meta_every=2,
        mkd_meta_lr=0.05,
        mkd_per_class=True,
        checkpoint_every=4,
    )
    teacher = _teacher()
    reference = train(_config(tmp_path / "a", **settings), DigitsLoader(), meta_batches=META_BATCHES,
                      teacher=teacher, log=_quiet)
    assert reference.completed

    lines = read_metrics(tmp_path / "a" / "metrics.jsonl")
    metas = [line for line in lines if line["kind"] == "meta"]
    assert [line["step"] for line in metas] == list(range(1, reference.steps + 1, 2))
    trained = [line for line in lines if line["kind"] == "train"]
    assert {"teacher_temperature", "student_temperature", "student_temperature_min"} <= trained[-1].keys()
    assert trained[-1]["teacher_temperature"] != pytest.approx(4.0, abs=1e-3)
    state = load_checkpoint(tmp_path / "a" / CHECKPOINT_NAME)
    temps = state["parts"]["temps"]
    assert temps["log_student"].shape == (NUM_CLASSES,)
    assert temps["log_teacher"].exp().item() == pytest.approx(trained[-1]["teacher_temperature"], rel=1e-5)
    assert state["parts"]["meta_optimizer"]["state"], "the meta optimizer's moments are checkpointed"
    assert state["position"]["meta_batches"] == len(metas)

    with pytest.raises(_Crash):
        train(_config(tmp_path / "b", **settings), DigitsLoader(), meta_batches=META_BATCHES, teacher=teacher,
              log=_quiet, on_step=_crash_at(11))
    train(_config(tmp_path / "b", resume=True, **settings), DigitsLoader(), meta_batches=META_BATCHES,
          teacher=teacher, log=_quiet)
    resumed = load_checkpoint(tmp_path / "b" / CHECKPOINT_NAME)
    for part in ("model", "temps"):
        _assert_same_state(state["parts"][part], resumed["parts"][part])
    assert resumed["position"] == state["position"]
    metas_b = [line["step"] for line in read_metrics(tmp_path / "b" / "metrics.jsonl") if line["kind"] == "meta"]
    assert metas_b == [line["step"] for line in metas]


def test_mkd_without_meta_batches_is_a_config_error(tmp_path):
    config = _config(tmp_path / "run", epochs=1, loss=LossConfig(name="mkd"))
    with pytest.raises(ConfigError, match="meta"):
        train(config, DigitsLoader(), teacher=_teacher(), log=_quiet)


# ---------------------------------------------------------------------------------------------
# Two ranks under torchrun (gloo on CPU): a killed and resumed DDP run matches an unbroken one.
# ---------------------------------------------------------------------------------------------


def _ddp_main(run_dir: str, crash_at: int, resume: bool) -> None:
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    config = _config(run_dir, epochs=1, ema=True, ema_decay=0.9, checkpoint_every=5, resume=resume,
                     loss=LossConfig(name="mkd", temperature=4.0), mkd_meta_every=3, mkd_meta_lr=0.05)
    try:
        train(config, DigitsLoader(rank=rank, world=world), val_batches=VAL_BATCHES, meta_batches=META_BATCHES,
              teacher=_teacher(), log=_quiet, on_step=_crash_at(crash_at))
    except _Crash:
        sys.exit(17)


def _torchrun(run_dir: Path, crash_at: int, resume: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               __file__, str(run_dir), str(crash_at), str(int(resume))]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_ddp_two_ranks_resume_exactly(tmp_path):
    done = _torchrun(tmp_path / "a", crash_at=-1, resume=False)
    assert done.returncode == 0, done.stderr[-3000:]
    done = _torchrun(tmp_path / "b", crash_at=8, resume=False)  # both ranks killed at step 8
    assert done.returncode != 0
    assert load_checkpoint(tmp_path / "b" / CHECKPOINT_NAME)["position"]["step"] == 5, done.stderr[-3000:]
    done = _torchrun(tmp_path / "b", crash_at=-1, resume=True)
    assert done.returncode == 0, done.stderr[-3000:]

    first, second = (load_checkpoint(tmp_path / name / CHECKPOINT_NAME) for name in ("a", "b"))
    assert len(first["rng"]) == 2 and first["position"] == second["position"]
    for part in ("model", "ema", "temps"):
        _assert_same_state(first["parts"][part], second["parts"][part])
    start = read_metrics(tmp_path / "a" / "metrics.jsonl")[0]
    assert start["world_size"] == 2 and start["per_rank_batch"] == BATCH // 2


if __name__ == "__main__":
    _ddp_main(sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1")
