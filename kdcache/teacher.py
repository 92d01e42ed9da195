"""Teachers: a timm model name plus a checkpoint file, or a saved whole-model file.

The class count comes from the checkpoint's classifier (or ``num_classes``, which must agree):
a timm model is never built with a silently re-initialised head. Teachers run in eval mode
without gradients, in bf16 autocast on CUDA. The checkpoint's sha256 identifies the teacher in
the cache manifest; kdcache's own training checkpoints also carry the input size and
normalisation the model was trained with.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from kdcache.errors import ConfigError, MismatchError
from kdcache.format import TeacherInfo

#: Key under which kdcache training checkpoints store the model's data config.
MODEL_META_KEY = "kdcache_model"


@dataclass(frozen=True, kw_only=True)
class TeacherConfig:
    model: str | None = None
    checkpoint: str | None = None
    model_file: str | None = None
    num_classes: int | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        if (self.model is None) == (self.model_file is None):
            raise ConfigError("a teacher needs exactly one of --teacher MODEL (with --teacher-checkpoint) or --teacher-file")
        if self.model is not None and self.checkpoint is None:
            raise ConfigError(
                f"teacher {self.model!r} needs --teacher-checkpoint FILE: weights cannot be downloaded here and a "
                "randomly initialised teacher teaches nothing"
            )
        for name in ("checkpoint", "model_file"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_file():
                raise ConfigError(f"teacher {name.replace('_', ' ')} {value} does not exist")
        if self.num_classes is not None and self.num_classes < 1:
            raise ConfigError(f"teacher num_classes={self.num_classes}; expected a positive integer")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _load_state(path: str) -> dict:
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return {"state_dict": load_file(path)}
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"teacher checkpoint {path} cannot be read as a weights file ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(state, dict):
        raise ConfigError(f"teacher checkpoint {path} holds a {type(state).__name__}, expected a state dict")
    return state


def _state_dict(state: dict) -> dict:
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(state.get(key), dict) and state[key]:
            inner = state[key]
            return {k.removeprefix("module."): v for k, v in inner.items()}
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _timm_model(name: str, **kwargs):
    import timm

    if not timm.is_model(name):
        raise ConfigError(f"unknown teacher model {name!r}: not a timm model name (see timm.list_models())")
    return timm.create_model(name, pretrained=False, **kwargs)


def load_teacher(config: TeacherConfig, *, class_names: list[str] | None = None) -> tuple[torch.nn.Module, TeacherInfo]:
    """The teacher module (eval mode, on ``config.device``) and its manifest entry."""
    if config.model_file is not None:
        try:
            model = torch.load(config.model_file, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise ConfigError(f"teacher file {config.model_file} cannot be loaded ({exc.__class__.__name__}: {exc})") from None
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(f"teacher file {config.model_file} holds a {type(model).__name__}, expected a saved torch.nn.Module")
        meta = getattr(model, "pretrained_cfg", None) or {}
        num_classes = _module_classes(model, config.model_file)
        name, source, weights = type(model).__name__, "file", config.model_file
    else:
        state = _load_state(config.checkpoint)
        probe = _timm_model(config.model, num_classes=1)
        head = probe.pretrained_cfg.get("classifier", "head")
        head = head[0] if isinstance(head, (list, tuple)) else head
        weights_dict = _state_dict(state)
        head_weight = weights_dict.get(f"{head}.weight")
        if head_weight is None:
            raise ConfigError(f"teacher checkpoint {config.checkpoint} has no classifier weight {head}.weight for {config.model!r}")
        num_classes = int(head_weight.shape[0])
        if config.num_classes is not None and config.num_classes != num_classes:
            raise MismatchError(
                f"teacher checkpoint {config.checkpoint} has {num_classes} classes ({head}.weight), "
                f"but --num-classes says {config.num_classes}"
            )
        meta = dict(state.get(MODEL_META_KEY) or {})
        model = _timm_model(config.model, num_classes=num_classes, **meta.get("model_kwargs", {}))
        try:
            model.load_state_dict(weights_dict, strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise MismatchError(f"teacher checkpoint {config.checkpoint} does not fit {config.model!r}: {first}") from None
        cfg = dict(model.pretrained_cfg)
        cfg.update(meta)
        meta = cfg
        name, source, weights = config.model, "timm", config.checkpoint
    if config.num_classes is not None and config.num_classes != num_classes:
        raise MismatchError(f"teacher {weights} has {num_classes} classes, but --num-classes says {config.num_classes}")
    input_size = list(meta.get("input_size", (3, 224, 224)))
    info = TeacherInfo(
        name=name,
        source=source,
        checkpoint=str(Path(weights).resolve()),
        weights_sha256=file_sha256(weights),
        num_classes=num_classes,
        class_names=list(meta.get("class_names") or class_names or [str(i) for i in range(num_classes)]),
        input_size=[int(v) for v in input_size],
        interpolation=str(meta.get("interpolation", "bilinear")),
        mean=[float(v) for v in meta.get("mean", (0.485, 0.456, 0.406))],
        std=[float(v) for v in meta.get("std", (0.229, 0.224, 0.225))],
    )
    model.eval().requires_grad_(False).to(config.device)
    return model, info


def _module_classes(model: torch.nn.Module, path: str) -> int:
    if hasattr(model, "num_classes"):
        return int(model.num_classes)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ConfigError(f"teacher file {path}: cannot tell the class count (no num_classes attribute, no Linear layer)")
    return int(linears[-1].out_features)


def autocast(device: str | torch.device):
    """bf16 autocast on CUDA, nothing elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def teacher_logits(model: torch.nn.Module, images: torch.Tensor, device) -> torch.Tensor:
    """float32 logits of a batch of replayed views."""
    images = images.to(device, non_blocking=True)
    with autocast(device):
        return model(images).float()
