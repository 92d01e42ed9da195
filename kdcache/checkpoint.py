"""Training checkpoints: one file per run, written atomically, enough for an exact resume.

A checkpoint is a plain dict saved with :func:`torch.save` and read back with
``weights_only=True`` (no pickled code): model, optimizer, scheduler, EMA and meta-temperature
states, the data position (train epoch, batches done in it, global step, meta batches used), the
RNG states of every rank and the run config. :func:`save_checkpoint` writes a temporary file in
the same directory, fsyncs it and renames it over the old one, so a kill at any moment leaves
either the previous checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import io
import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdcache.errors import ConfigError, FormatError, WriteError, describe_os_error
from kdcache.location import atomic_write_bytes
from kdcache.runlog import METRICS_NAME

#: File name of the (single, latest) checkpoint inside a run directory.
CHECKPOINT_NAME = "checkpoint.pt"
#: File name of the run's config (JSON) inside a run directory.
CONFIG_NAME = "config.json"
#: The files a run writes before its first checkpoint (its config, then its metrics); a run directory
#: holding nothing else has nothing to resume.
BEFORE_FIRST_CHECKPOINT = (CONFIG_NAME, METRICS_NAME)
#: Bumped when the checkpoint layout changes incompatibly.
CHECKPOINT_VERSION = 1


@dataclass(kw_only=True)
class TrainPosition:
    """Where training stands: the next batch to train on is ``epoch_batches(epoch, start_batch=batch)``."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    meta_batches: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainPosition":
        return cls(**{key: int(data[key]) for key in ("epoch", "batch", "step", "meta_batches")})


def capture_rng_state() -> dict[str, Any]:
    """The state of every global RNG a training step may draw from (python, numpy, torch CPU and CUDA)."""
    kind, keys, pos, has_gauss, cached_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gauss": float(cached_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (the CUDA state only where it was captured and CUDA is in use)."""
    random.setstate(_as_tuple(state["python"]))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].cpu().numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gauss"],
        )
    )
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def _as_tuple(value: Any) -> Any:
    """Python's RNG state is nested tuples; a round trip may hand back lists."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuple(item) for item in value)
    return value


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: temp file in the same directory, fsync, rename.

    A write that fails (a full disk) raises :class:`WriteError` and leaves the previous
    checkpoint in place; temporary files of killed processes are removed.
    """
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a process killed while saving
        stale.unlink(missing_ok=True)
    payload = io.BytesIO()  # serialised first: torch.save would turn a failed write into an opaque RuntimeError
    torch.save({"checkpoint_version": CHECKPOINT_VERSION, **state}, payload)
    try:
        atomic_write_bytes(path, payload.getvalue())
    except OSError as exc:
        previous = "the previous checkpoint is kept" if path.exists() else "there is no earlier checkpoint"
        raise WriteError(f"cannot write checkpoint {path}: {describe_os_error(exc)}; {previous}: "
                         "free space, then continue the run with --resume") from None


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; a bad file raises :class:`FormatError`."""
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # a torn or foreign file: say which and what to do
        raise FormatError(
            f"checkpoint {path} is unreadable ({type(error).__name__}: {error}); "
            "delete it to restart the run from scratch"
        ) from error
    version = state.get("checkpoint_version") if isinstance(state, dict) else None
    if version != CHECKPOINT_VERSION:
        raise FormatError(f"checkpoint {path} has checkpoint_version={version!r}; expected {CHECKPOINT_VERSION}")
    return state



def check_run_dir(run_dir: str | os.PathLike, config: dict[str, Any], *, resume: bool, free_fields: tuple[str, ...] = (),
                  defaults: dict[str, Any] | None = None, unrecorded: tuple[str, ...] = (),
                  explained: dict[str, str] | None = None, log=None) -> Path | None:
    """Check a run directory before anything is written to it; returns the checkpoint to resume from.

    A directory that does not exist or is empty (but for hidden temporary files) is a new run. An occupied one needs ``resume``
    and must hold a ``config.json`` equal to ``config`` except for ``free_fields`` (settings
    that do not change the weights); otherwise :class:`ConfigError` names the first difference.
    ``defaults``: the value of a field that a ``config.json`` written before the field existed lacks;
    ``unrecorded``: fields such a ``config.json`` lacks with no value known, not checked then.
    ``explained``: fields that summarise others (such as a cache's recipe), each with what a difference in
    it means, said in the message; they are checked after every other field, so that a setting the
    user changed is named first.
    A run that stopped before its first checkpoint left only its config and metrics: it has nothing to
    resume from, so it is started again, with or without ``resume`` (``log`` says so); None.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run dir {run_dir} is a file; --run-dir takes a directory (a new one, or a run's to --resume)")
    if not run_dir.exists():
        return None
    names = {p.name for p in run_dir.iterdir() if not p.name.startswith(".")}
    if not names:
        return None  # temporary files (".name.tmp-PID") of a run that died writing its first file do not count
    if CONFIG_NAME in names and names <= set(BEFORE_FIRST_CHECKPOINT):
        if log is not None:
            log(f"run dir {run_dir}: the run there stopped before its first checkpoint, so there is nothing to resume; "
                "starting it again")
        return None
    if not resume:
        raise ConfigError(f"run dir {run_dir} exists; pass --resume to continue it or choose another --run-dir")
    saved_path = run_dir / CONFIG_NAME
    if not saved_path.exists():
        raise ConfigError(f"run dir {run_dir} holds no {CONFIG_NAME}, so it is not a kdcache run; choose another --run-dir")
    saved = json.loads(saved_path.read_text())
    defaults = defaults or {}
    explained = explained or {}
    for key in sorted(set(saved) | set(config), key=lambda name: (name in explained, name)):
        if key in unrecorded and key not in saved:
            continue
        old, new = saved.get(key, defaults.get(key)), config.get(key, defaults.get(key))
        if key not in free_fields and old != new:
            why = f" ({explained[key]})" if key in explained else ""
            raise ConfigError(
                f"--resume: {key}={new!r} but the run in {run_dir} was started with "
                f"{key}={old!r}{why}; resume with the same settings or choose another --run-dir"
            )
    checkpoint = run_dir / CHECKPOINT_NAME
    return checkpoint if checkpoint.exists() else None
