"""Teachers: a ``--teacher`` spec (timm, torchvision, Hugging Face, Python, TorchScript, torch.export) or a file.

A spec is ``KIND:TARGET`` (docs/cli.md, "Teacher specs"); a bare name is a timm model, and
``hf-hub:ORG/NAME`` a timm model on the Hub. Without ``--teacher-checkpoint``, timm and torchvision
specs (and ``hf:ORG/NAME``) load published weights through :mod:`kdcache.pretrained`. The class
count comes from the teacher's own weights (or ``num_classes``, which must agree): no teacher is
built with a silently re-initialised head. Teachers run in eval mode without gradients, in bf16
autocast on CUDA. The weights' sha256 identifies the teacher in the cache manifest; kdcache's own
training checkpoints also carry the input size and normalisation the model was trained with. The
loaders themselves live in :mod:`kdcache.teacher_sources`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from kdcache import teacher_sources as sources
from kdcache.errors import ConfigError, MismatchError
from kdcache.format import TeacherInfo
from kdcache.teacher_sources import MODEL_META_KEY, file_sha256  # noqa: F401  (re-exported)

#: The kinds a ``--teacher`` spec may name, and whether each takes ``--teacher-checkpoint`` (timm and
#: torchvision: optional; without one they load published weights, kdcache.pretrained).
KINDS = {"timm": True, "torchvision": True, "hf": False, "python": False, "torchscript": False, "export": False}
#: timm's own spelling of a Hub model, ``hf-hub:ORG/NAME``: a timm teacher.
HF_HUB = "hf-hub"


def _not_a_file(path: str) -> str:
    """Why ``path``, which a teacher option names as a file, is not one."""
    return "is a directory; expected a file" if Path(path).is_dir() else "does not exist"


def parse_spec(spec: str) -> tuple[str, str]:
    """``(kind, target)`` of a ``--teacher`` spec; a bare name is ``("timm", name)``, ``hf-hub:ID`` is ``("timm", "hf-hub:ID")``."""
    kind, colon, target = spec.partition(":")
    if not colon:
        return "timm", spec
    if kind == HF_HUB:
        if not target:
            raise ConfigError(f"--teacher {spec!r} names no Hub repository; expected hf-hub:ORG/NAME[@REVISION]")
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
            if not KINDS[kind] and self.checkpoint is not None:
                raise ConfigError(f"--teacher-checkpoint is for timm and torchvision teachers; a {kind}: teacher "
                                  f"carries its own weights ({self.model!r})")
            if self.checkpoint is not None and ("@" in target or target.startswith(f"{HF_HUB}:")
                                                or (kind == "torchvision" and ":" in target)):
                raise ConfigError(f"--teacher {self.model!r} names published weights; with --teacher-checkpoint give the "
                                  "architecture alone (e.g. resnet50 or torchvision:resnet50)")
            if kind == "hf" and not Path(target).is_dir() and not _hub_id(target):
                raise ConfigError(f"teacher directory {target} " + ("is a file; hf: takes a Hugging Face model directory or a "
                                                                      "Hub id ORG/NAME[@REVISION]" if Path(target).exists() else
                                                                      "does not exist (nor is it a Hub id ORG/NAME[@REVISION])"))
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
    def pretrained(self) -> bool:
        """Whether this teacher's weights are published ones, downloaded or found in a library's cache."""
        if self.model is None:
            return False
        kind, target = parse_spec(self.model)
        return (KINDS[kind] and self.checkpoint is None) or (kind == "hf" and not Path(target).is_dir())

    @property
    def label(self) -> str:
        """What names this teacher in a message: its weights file, else its spec."""
        return self.checkpoint or self.model_file or str(self.model)


def _absolute(path: str, *, cached: bool) -> Path:
    """An absolute path; a file of a library's cache keeps its own name (not the blob its link resolves to)."""
    return Path(path).absolute() if cached else Path(path).resolve()


def _hub_id(target: str) -> bool:
    name = target.partition("@")[0]
    return name.count("/") == 1 and all(name.split("/")) and not name.startswith((".", "/"))


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def _load(config: TeacherConfig, log) -> sources.LoadedTeacher:
    from kdcache import pretrained

    if config.model_file is not None:
        kind = sources.file_kind(config.model_file)
        if kind == "file":
            return sources.load_pickled(config.model_file)
        return sources.load_compiled(config.model_file, kind)
    kind, target = parse_spec(config.model)
    if kind == "timm":
        if config.checkpoint is None:
            return pretrained.load_timm_pretrained(target, log=log)
        return sources.load_timm(target, config.checkpoint)
    if kind == "torchvision":
        if config.checkpoint is None:
            name, _, weights = target.partition(":")
            return pretrained.load_torchvision_weights(name, weights or None, log=log)
        return sources.load_torchvision(target, config.checkpoint)
    if kind == "hf":
        if Path(target).is_dir():
            return sources.load_hf(target)
        directory, weights, repo, commit = pretrained.hf_snapshot(target)
        loaded = sources.load_hf(directory)
        return dataclasses.replace(loaded, weights=weights, weights_sha256=sources.file_sha256(weights), repo=repo,
                                   revision=commit)
    if kind == "python":
        module, _, function = target.rpartition(":")
        return sources.load_python(module, function)
    return sources.load_compiled(target, kind)


def load_teacher(config: TeacherConfig, *, class_names: list[str] | None = None,
                 pinned: TeacherInfo | list[TeacherInfo] | None = None, log=_say) -> tuple[torch.nn.Module, TeacherInfo]:
    """The teacher module (eval mode, on ``config.device``) and its manifest entry.

    ``pinned``: the teacher (or teachers) a cache recorded. A spec of one's Hub repository without
    ``@REVISION`` loads the recorded commit, and one whose revision resolves to another commit is
    refused. ``log``: where a line about the weights chosen goes (timm's default tag, torchvision's DEFAULT).
    """
    from kdcache.pretrained import pin_revision

    recorded = [pinned] if isinstance(pinned, TeacherInfo) else [t for t in (pinned or []) if t is not None]
    recorded = [t for t in recorded if t.repo and t.revision]
    if recorded and config.model is not None and config.checkpoint is None:
        for info in recorded:
            spec = pin_revision(config.model, info.repo, info.revision)
            if spec != config.model:
                config = dataclasses.replace(config, model=spec)
                break
    loaded = _load(config, log)
    made = sorted({t.revision for t in recorded if t.repo == loaded.repo})
    if loaded.revision and made and loaded.revision not in made:
        raise MismatchError(f"teacher {config.model} is revision {loaded.revision} of {loaded.repo}, but the cache was made "
                            f"with revision {made[0]}; name that one (@{made[0]}) or none")
    num_classes, meta = loaded.num_classes, loaded.meta
    if config.num_classes is not None and config.num_classes != num_classes:
        raise MismatchError(f"teacher {config.label} has {num_classes} classes, but --num-classes says {config.num_classes}")
    input_size = list(meta.get("input_size", (3, 224, 224)))
    info = TeacherInfo(
        name=loaded.name,
        source=loaded.source,
        checkpoint=None if loaded.weights is None else str(_absolute(loaded.weights, cached=loaded.repo is not None)),
        weights_sha256=loaded.weights_sha256,
        num_classes=num_classes,
        class_names=list(meta.get("class_names") or class_names or [str(i) for i in range(num_classes)]),
        input_size=[int(v) for v in input_size],
        interpolation=str(meta.get("interpolation", "bilinear")),
        mean=[float(v) for v in meta.get("mean", (0.485, 0.456, 0.406))],
        std=[float(v) for v in meta.get("std", (0.229, 0.224, 0.225))],
        repo=loaded.repo,
        revision=loaded.revision,
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
