"""Teachers: a ``--teacher`` spec (timm, torchvision, Hugging Face, Python, TorchScript, torch.export) or a file.

A spec is ``KIND:TARGET`` (docs/cli.md, "Teacher specs"); a bare name is a timm model. The class
count comes from the teacher's own weights (or ``num_classes``, which must agree): no teacher is
built with a silently re-initialised head. Teachers run in eval mode without gradients, in bf16
autocast on CUDA. The weights' sha256 identifies the teacher in the cache manifest; kdcache's own
training checkpoints also carry the input size and normalisation the model was trained with. The
loaders themselves live in :mod:`kdcache.teacher_sources`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from kdcache import teacher_sources as sources
from kdcache.errors import ConfigError, MismatchError
from kdcache.format import TeacherInfo
from kdcache.teacher_sources import MODEL_META_KEY, file_sha256  # noqa: F401  (re-exported)

#: The kinds a ``--teacher`` spec may name, and whether each takes ``--teacher-checkpoint``.
KINDS = {"timm": True, "torchvision": True, "hf": False, "python": False, "torchscript": False, "export": False}


def _not_a_file(path: str) -> str:
    """Why ``path``, which a teacher option names as a file, is not one."""
    return "is a directory; expected a file" if Path(path).is_dir() else "does not exist"


def parse_spec(spec: str) -> tuple[str, str]:
    """``(kind, target)`` of a ``--teacher`` spec; a bare name is ``("timm", name)``."""
    kind, colon, target = spec.partition(":")
    if not colon:
        return "timm", spec
    if kind not in KINDS:
        raise ConfigError(f"--teacher {spec!r}: unknown kind {kind!r}; expected a timm name or one of "
                          + ", ".join(f"{k}:" for k in KINDS))
    if not target:
        raise ConfigError(f"--teacher {spec!r} names no {kind} teacher after the colon")
    return kind, target


@dataclass(frozen=True, kw_only=True)
class TeacherConfig:
    model: str | None = None  # the --teacher spec
    checkpoint: str | None = None
    model_file: str | None = None
    num_classes: int | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        if (self.model is None) == (self.model_file is None):
            raise ConfigError("a teacher needs exactly one of --teacher SPEC or --teacher-file FILE")
        if self.model is not None:
            kind, target = parse_spec(self.model)
            if KINDS[kind] and self.checkpoint is None:
                raise ConfigError(
                    f"teacher {self.model!r} needs --teacher-checkpoint FILE: weights cannot be downloaded here and a "
                    "randomly initialised teacher teaches nothing"
                )
            if not KINDS[kind] and self.checkpoint is not None:
                raise ConfigError(f"--teacher-checkpoint is for timm and torchvision teachers; a {kind}: teacher "
                                  f"carries its own weights ({self.model!r})")
            if kind == "hf" and not Path(target).is_dir():
                raise ConfigError(f"teacher directory {target} " + ("is a file; hf: takes a Hugging Face model directory"
                                                                      if Path(target).exists() else "does not exist"))
            if kind in ("torchscript", "export") and not Path(target).is_file():
                raise ConfigError(f"teacher file {target} {_not_a_file(target)}")
            if kind == "python" and not all(target.rpartition(":")[::2]):
                raise ConfigError(f"--teacher {self.model!r}; expected python:MODULE:FUNCTION")
        for name in ("checkpoint", "model_file"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_file():
                raise ConfigError(f"teacher {name.replace('_', ' ')} {value} {_not_a_file(value)}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ConfigError(f"teacher num_classes={self.num_classes}; expected a positive integer")

    @property
    def label(self) -> str:
        """What names this teacher in a message: its weights file, else its spec."""
        return self.checkpoint or self.model_file or str(self.model)


def _load(config: TeacherConfig) -> sources.LoadedTeacher:
    if config.model_file is not None:
        kind = sources.file_kind(config.model_file)
        if kind == "file":
            return sources.load_pickled(config.model_file)
        return sources.load_compiled(config.model_file, kind)
    kind, target = parse_spec(config.model)
    if kind == "timm":
        return sources.load_timm(target, config.checkpoint)
    if kind == "torchvision":
        return sources.load_torchvision(target, config.checkpoint)
    if kind == "hf":
        return sources.load_hf(target)
    if kind == "python":
        module, _, function = target.rpartition(":")
        return sources.load_python(module, function)
    return sources.load_compiled(target, kind)


def load_teacher(config: TeacherConfig, *, class_names: list[str] | None = None) -> tuple[torch.nn.Module, TeacherInfo]:
    """The teacher module (eval mode, on ``config.device``) and its manifest entry."""
    loaded = _load(config)
    num_classes, meta = loaded.num_classes, loaded.meta
    if config.num_classes is not None and config.num_classes != num_classes:
        raise MismatchError(f"teacher {config.label} has {num_classes} classes, but --num-classes says {config.num_classes}")
    input_size = list(meta.get("input_size", (3, 224, 224)))
    info = TeacherInfo(
        name=loaded.name,
        source=loaded.source,
        checkpoint=None if loaded.weights is None else str(Path(loaded.weights).resolve()),
        weights_sha256=loaded.weights_sha256,
        num_classes=num_classes,
        class_names=list(meta.get("class_names") or class_names or [str(i) for i in range(num_classes)]),
        input_size=[int(v) for v in input_size],
        interpolation=str(meta.get("interpolation", "bilinear")),
        mean=[float(v) for v in meta.get("mean", (0.485, 0.456, 0.406))],
        std=[float(v) for v in meta.get("std", (0.229, 0.224, 0.225))],
    )
    model = loaded.model
    model.eval().requires_grad_(False).to(config.device)
    return model, info


def autocast(device: str | torch.device):
    """bf16 autocast on CUDA, nothing elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_channels_last(model: torch.nn.Module) -> torch.nn.Module:
    """The model's 4-d weights in channels-last memory (a no-op for a model without convolutions).

    A compiled teacher (TorchScript, torch.export) that cannot be converted is left as it is: its
    inputs are still channels-last, and every stage that runs it does the same.
    """
    try:
        return model.to(memory_format=torch.channels_last)
    except (RuntimeError, TypeError, NotImplementedError):
        return model


@torch.no_grad()
def teacher_logits(model: torch.nn.Module, images: torch.Tensor, device, *, channels_last: bool = False) -> torch.Tensor:
    """float32 logits of a batch of replayed views.

    ``channels_last``: the views in channels-last memory, for a model converted with
    :func:`to_channels_last` (faster convolutions on CUDA; a cache records it, since other
    kernels round differently under bf16).
    """
    images = images.to(device, non_blocking=True)  # in the memory format the stage records: other kernels round differently
    images = images.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    with autocast(device):
        return model(images).float()
