"""The record of a training run: JSONL metrics, result.json and a plot.

``metrics.jsonl`` holds one JSON object per line, each with a ``kind``:

- ``start``: the run's effective settings (device, amp, compile, world size, resumed step);
- ``train``: ``step, epoch, batch, loss, lr, images_per_s, time`` (+ ``teacher_temperature``/``student_temperature`` with MKD),
  the loss averaged over the steps since the previous ``train`` line;
- ``meta``: what an MKD meta update reported, with the ``step`` it was made for (before that step's update);
- ``eval``: ``epoch, step, top1`` (+ ``ema_top1``) on the validation source;
- ``end``: the final numbers (also written to ``result.json``).

Every line also carries ``time`` (seconds since the epoch). Only rank 0 writes.

On a terminal a run also shows a progress bar (:class:`Progress`); its messages are written
beside the bar, never over it.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

METRICS_NAME = "metrics.jsonl"
RESULT_NAME = "result.json"
PLOT_NAME = "run.png"


def _jsonable(value: Any) -> Any:
    """Non-finite floats become null so every line is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Write a JSON file atomically (temp file, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(_jsonable(data), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All complete lines of a metrics file (a torn last line from a kill is skipped)."""
    path = Path(path)
    if not path.exists():
        return []
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return lines


class RunLog:
    """Appends metric lines to ``metrics.jsonl``; a no-op where ``enabled`` is False (ranks other than 0)."""

    def __init__(self, path: str | os.PathLike, *, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self._handle = None

    def write(self, kind: str, **fields: Any) -> None:
        if not self.enabled:
            return
        if self._handle is None:
            self._handle = open(self.path, "a", encoding="utf-8")
        line = {"kind": kind, **fields, "time": time.time()}
        self._handle.write(json.dumps(_jsonable(line)) + "\n")
        self._handle.flush()

    def rewind(self, step: int) -> None:
        """Drop the lines written after ``step`` (by a run that was killed after its last checkpoint)."""
        if not self.enabled or not self.path.exists():
            return
        self.close()
        kept = [line for line in read_metrics(self.path) if line.get("step", -1) <= step or "step" not in line]
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(json.dumps(line) + "\n" for line in kept))
        os.replace(tmp, self.path)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


class Progress:
    """The run's progress bar (tqdm, on stderr) when stderr is a terminal, and the run's messages.

    :meth:`say` hands a message to ``log`` with the bar cleared first and drawn again after
    (tqdm's ``external_write_mode``), so a line such as an epoch's accuracy never lands on the
    bar; without a terminal there is no bar and messages are plain lines. ``enabled`` False
    (ranks other than 0) shows nothing and says nothing.
    """

    def __init__(self, log: Callable[[str], None], *, total: int, initial: int = 0, enabled: bool = True) -> None:
        self.log = log if enabled else None
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def say(self, message: str) -> None:
        if self.log is None:
            return
        if self.bar is None:
            self.log(message)
            return
        with self.bar.external_write_mode():
            self.log(message)

    def epoch(self, epoch: int, epochs: int) -> None:
        """Name the epoch (0-based ``epoch`` of ``epochs``) in front of the bar."""
        if self.bar is not None:
            self.bar.set_description(f"epoch {epoch + 1}/{epochs}", refresh=False)

    def step(self, **postfix: str) -> None:
        """One step done; ``postfix`` (e.g. loss and lr, when they were just logged) shown after the bar."""
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class StepMeter:
    """Sums the loss (on its device, without a sync per step) and counts images between log lines."""

    def __init__(self, device) -> None:
        import torch

        self.loss_sum = torch.zeros((), device=device)
        self.steps = 0
        self.images = 0
        self.start = time.perf_counter()

    def add(self, loss, images: int) -> None:
        self.loss_sum += loss.detach().float()
        self.steps += 1
        self.images += images

    def flush(self, reduce=None) -> dict[str, float]:
        """``loss`` (mean since the last flush; ``reduce`` may average it over ranks) and ``images_per_s``."""
        now = time.perf_counter()
        mean = self.loss_sum / max(self.steps, 1)
        if reduce is not None:
            mean = reduce(mean)
        out = {"loss": float(mean), "images_per_s": self.images / max(now - self.start, 1e-9)}
        self.loss_sum.zero_()
        self.steps = self.images = 0
        self.start = now
        return out


def plot_run(metrics_path: str | os.PathLike, png_path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Plot loss vs step, validation top-1 vs epoch and (with MKD) temperatures vs step into a PNG.

    ``title`` (the run, its loss and where its targets come from) heads the figure and is stored as
    the PNG's ``Title`` text.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    lines = read_metrics(metrics_path)
    train = [line for line in lines if line.get("kind") == "train"]
    evals = [line for line in lines if line.get("kind") == "eval"]
    temps = [line for line in train if line.get("teacher_temperature") is not None]

    panels = 3 if temps else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.6), constrained_layout=True)

    ax = axes[0]
    ax.plot([line["step"] for line in train], [line["loss"] for line in train], lw=1)
    ax.set(xlabel="step", ylabel="train loss", title="loss")
    ax.grid(alpha=0.3)

    ax = axes[1]
    if evals:
        epochs = [line["epoch"] for line in evals]
        ax.plot(epochs, [100 * line["top1"] for line in evals], marker="o", label="model")
        if any(line.get("ema_top1") is not None for line in evals):
            ax.plot(epochs, [100 * (line.get("ema_top1") or math.nan) for line in evals], marker="s", label="EMA")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no validation source", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="epoch", ylabel="val top-1 (%)", title="validation")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)

    if temps:
        ax = axes[2]
        steps = [line["step"] for line in temps]
        for key, label in (("teacher_temperature", "teacher T"), ("student_temperature", "student T")):
            ax.plot(steps, [line[key] for line in temps], label=label)
        ax.set(xlabel="step", ylabel="temperature (mean over classes)", title="MKD temperatures")
        ax.legend()
        ax.grid(alpha=0.3)

    if title:
        fig.suptitle(title)
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=100, metadata={"Title": title} if title else None)
    plt.close(fig)
    return png_path
