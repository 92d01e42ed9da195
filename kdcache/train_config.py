"""The configuration of a training run (:class:`TrainConfig`) and what it achieved (:class:`RunResult`)."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdcache.errors import ConfigError
from kdcache.losses import LossConfig

#: Learning-rate schedules (timm.scheduler.create_scheduler_v2 names) that step per update.
SCHEDULES = ("cosine", "tanh", "step", "multistep", "constant", "poly", "wsd", "rsqrt", "none")
AMP_MODES = ("auto", "bf16", "none")  # auto: bf16 autocast where the device has it (CUDA), else none
DEVICES = ("auto", "cpu", "cuda")
#: Fields that may differ between a run and its resumption (they do not change the weights).
RESUME_FREE_FIELDS = ("resume", "log_every", "checkpoint_every", "eval_every", "max_steps", "compile", "device", "amp",
                      "record_fidelity")
#: Fields a run's config.json lacks when it was written before they existed, and the value that run had.
RESUME_DEFAULTS = {"teacher_record": "main"}
#: Fields a run's config.json lacks when it was written before they existed, with no value known for that run:
#: not checked when resuming such a run.
RESUME_UNRECORDED = ("cache_recipe",)
#: What a difference in these fields means, said with the refusal.
RESUME_EXPLAINED = {"cache_recipe": "the --cache holds the records of another recipe (teacher, dataset, augmentation, "
                                    "seed, k or blocks) than the cache the run started from"}


def default_warmup_epochs(epochs: int) -> int:
    """The warmup when none is set: a tenth of the epochs, rounded down, and at most 5 (none below 10 epochs)."""
    return min(5, epochs // 10)


@dataclass(kw_only=True)
class TrainConfig:
    """Everything that defines a student training run; written to ``<run_dir>/config.json``."""

    model: str
    num_classes: int
    run_dir: str
    img_size: int = 224
    epochs: int = 100
    batch_size: int = 256  # global, over all ranks
    lr: float = 1e-3
    weight_decay: float = 0.05
    opt: str = "adamw"
    sched: str = "cosine"
    warmup_epochs: int | None = None  # None: default_warmup_epochs(epochs), resolved here
    min_lr: float = 1e-6
    ema: bool = False
    ema_decay: float = 0.9998
    amp: str = "auto"
    channels_last: bool = True
    compile: bool = False
    loss: LossConfig = field(default_factory=lambda: LossConfig(name="ce"))
    seed: int = 0
    resume: bool = False
    checkpoint_every: int = 1000  # steps; 0 = only at epoch ends
    log_every: int = 50  # steps
    eval_every: int = 1  # epochs; the last epoch is always evaluated
    max_steps: int | None = None  # stop (with a checkpoint) after this many global steps
    mkd_meta_every: int = 10
    mkd_meta_lr: float = 1e-3
    mkd_per_class: bool = False
    mkd_head_only: bool = True
    mkd_inner_lr: float | None = None  # look-ahead step size; None = the current learning rate
    device: str = "auto"
    teacher_record: str = "main"  # whose cached records the loss reads (kdcache.student); a resume must keep it
    cache_recipe: str | None = None  # the cache's format.recipe_digest (None: no cache); a resume must keep it
    record_fidelity: dict | None = None  # what the loss reads of the cache's records (kdcache.fidelity): said, not checked

    def __post_init__(self) -> None:
        if isinstance(self.loss, dict):
            self.loss = LossConfig(**self.loss)
        if not isinstance(self.loss, LossConfig):
            raise ConfigError(f"TrainConfig.loss={self.loss!r}: expected a LossConfig")

        def bad(name: str, expected: str) -> ConfigError:
            return ConfigError(f"TrainConfig.{name}={getattr(self, name)!r}: expected {expected}")

        def is_int(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def is_number(value: Any) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        import timm
        import timm.optim

        if not isinstance(self.model, str) or not timm.is_model(self.model):
            raise bad("model", "a timm model name (see timm.list_models())")
        if not isinstance(self.run_dir, (str, os.PathLike)) or not str(self.run_dir):
            raise bad("run_dir", "a directory path")
        self.run_dir = str(self.run_dir)
        if self.warmup_epochs is None and is_int(self.epochs):
            self.warmup_epochs = default_warmup_epochs(self.epochs)
        for name, low in (("num_classes", 2), ("img_size", 1), ("epochs", 1), ("batch_size", 1), ("seed", 0),
                          ("warmup_epochs", 0), ("checkpoint_every", 0), ("log_every", 1), ("eval_every", 1),
                          ("mkd_meta_every", 1)):
            if not is_int(getattr(self, name)) or getattr(self, name) < low:
                raise bad(name, f"an integer >= {low}")
        if self.warmup_epochs > self.epochs:
            raise bad("warmup_epochs", f"at most epochs={self.epochs}")
        if self.max_steps is not None and (not is_int(self.max_steps) or self.max_steps < 1):
            raise bad("max_steps", "None or an integer >= 1")
        for name in ("lr", "mkd_meta_lr"):
            if not is_number(getattr(self, name)) or getattr(self, name) <= 0:
                raise bad(name, "a positive number")
        for name in ("weight_decay", "min_lr"):
            if not is_number(getattr(self, name)) or getattr(self, name) < 0:
                raise bad(name, "a non-negative number")
        if self.mkd_inner_lr is not None and (not is_number(self.mkd_inner_lr) or self.mkd_inner_lr <= 0):
            raise bad("mkd_inner_lr", "None (use the current learning rate) or a positive number")
        if not is_number(self.ema_decay) or not 0.0 < self.ema_decay < 1.0:
            raise bad("ema_decay", "a number in (0, 1)")
        if self.opt not in timm.optim.list_optimizers():
            raise bad("opt", "a timm optimizer name (see timm.optim.list_optimizers())")
        if self.sched not in SCHEDULES:
            raise bad("sched", f"one of {', '.join(SCHEDULES)}")
        if self.amp not in AMP_MODES:
            raise bad("amp", f"one of {', '.join(AMP_MODES)}")
        if self.device not in DEVICES:
            raise bad("device", f"one of {', '.join(DEVICES)}")
        if not isinstance(self.teacher_record, str) or not self.teacher_record:
            raise bad("teacher_record", "a teacher's record name: main, an added teacher's, or all")
        if self.cache_recipe is not None and not (isinstance(self.cache_recipe, str) and len(self.cache_recipe) == 64):
            raise bad("cache_recipe", "None or a cache's recipe digest (64 hex digits)")
        for name in ("ema", "channels_last", "compile", "resume", "mkd_per_class", "mkd_head_only"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "true or false")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"train config has unknown field {unknown[0]!r}; expected only {', '.join(sorted(known))}")
        return cls(**data)  # a dict ``loss`` becomes a LossConfig in __post_init__


@dataclass(kw_only=True)
class RunResult:
    """What a run achieved. Accuracies are fractions in [0, 1], None without a validation source."""

    final_top1: float | None
    best_top1: float | None
    final_ema_top1: float | None
    steps: int
    wall_time_s: float  # training time over every process of the run (resumes included)
    images_per_s: float  # training throughput of this process, all ranks together
    run_dir: Path
    completed: bool  # False when stopped early by max_steps
