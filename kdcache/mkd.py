"""Meta-learnt distillation temperatures (MKD, Liu et al., arXiv 2202.07940), bilevel reading.

The teacher and student temperatures of the KD loss are parameters (stored as logarithms, so
they stay positive). Every ``every`` student steps the trainer calls :func:`meta_update`:

1. look ahead one plain SGD step of the student under the MKD loss with the current
   temperatures: ``theta' = theta - inner_lr * grad_theta L_mkd(theta; T_t, T_s)``, keeping the
   graph (``create_graph=True``) so that ``theta'`` is a function of the temperatures;
2. evaluate the cross-entropy of the looked-ahead student on a held-out *meta* batch;
3. differentiate it with respect to the log-temperatures only and step the meta optimiser;
   the student's weights, gradients and buffers are left exactly as they were.

``head_only=True`` looks ahead in the classifier head only (``model.get_classifier()``): the
backbone runs once per batch (train and meta) without a graph and the second-order term is
that of the head, so a meta step costs about two forward passes (measured on an H100 with
bf16 autocast, B=128 at 224 px: 0.8-1.5 times a training step). ``head_only=False`` looks
ahead in every parameter and differentiates through a double-backward graph: 5.6 (ViT-S) to
26 (ResNet-50) times a training step and three to four times its memory. docs/methods.md has
the measurements and the choices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from kdcache.errors import ConfigError
from kdcache.losses import LossConfig, ce_loss, mkd_loss
from kdcache.record import TEMPERATURE_RANGE, TeacherRecord


@dataclass(frozen=True, kw_only=True)
class MetaConfig:
    """How the MKD temperatures are learnt.

    ``every``: student steps between meta updates (m). ``lr``: Adam learning rate on the
    log-temperatures. ``inner_lr``: step size of the look-ahead; None means "the student's
    current learning rate" (the trainer resolves it). ``per_class``: per-class student
    temperatures ``[C]`` (the teacher's stays scalar). ``head_only``: look ahead in the
    classifier head only.
    """

    every: int = 10
    lr: float = 1e-3
    inner_lr: float | None = None
    per_class: bool = False
    head_only: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ConfigError(f"MetaConfig.every={self.every!r}: expected an integer >= 1")
        if not _positive(self.lr):
            raise ConfigError(f"MetaConfig.lr={self.lr!r}: expected a positive number")
        if self.inner_lr is not None and not _positive(self.inner_lr):
            raise ConfigError(f"MetaConfig.inner_lr={self.inner_lr!r}: expected a positive number or None")
        for name in ("per_class", "head_only"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"MetaConfig.{name}={getattr(self, name)!r}: expected true or false")


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


class MetaTemperatures(nn.Module):
    """Learnable teacher and student temperatures, held as log-temperatures.

    Calling the module returns ``(teacher_T, student_T)``: scalars, or ``[C]`` where per-class.
    ``per_class`` makes the student's temperature per-class; ``per_class_teacher`` does the
    same for the teacher (only usable with full records, k = C). After each meta step the
    temperatures are projected back into ``temperature_range`` (by default the range over
    which partial records reconstruct the tail, :data:`kdcache.record.TEMPERATURE_RANGE`).
    """

    def __init__(
        self,
        num_classes: int,
        per_class: bool = False,
        init_teacher_T: float = 4.0,
        init_student_T: float = 4.0,
        *,
        per_class_teacher: bool = False,
        temperature_range: tuple[float, float] = TEMPERATURE_RANGE,
    ) -> None:
        super().__init__()
        low, high = temperature_range
        if not (_positive(low) and _positive(high) and low < high):
            raise ConfigError(f"temperature_range={temperature_range!r}: expected 0 < low < high")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ConfigError(f"num_classes={num_classes!r}: expected an integer >= 2")
        for name, value in (("init_teacher_T", init_teacher_T), ("init_student_T", init_student_T)):
            if not (_positive(value) and low <= value <= high):
                raise ConfigError(f"{name}={value!r}: expected a temperature in [{low}, {high}]")
        self.num_classes = num_classes
        self.temperature_range = (float(low), float(high))
        self.log_teacher = nn.Parameter(torch.full((num_classes,) if per_class_teacher else (), math.log(init_teacher_T)))
        self.log_student = nn.Parameter(torch.full((num_classes,) if per_class else (), math.log(init_student_T)))

    @classmethod
    def from_configs(cls, num_classes: int, loss_config: LossConfig, meta_config: MetaConfig) -> "MetaTemperatures":
        """Both temperatures start at ``loss_config.temperature``; per-class as ``meta_config`` says."""
        if loss_config.name != "mkd":
            raise ConfigError(f"MetaTemperatures need LossConfig.name='mkd', got {loss_config.name!r}")
        return cls(num_classes, meta_config.per_class, loss_config.temperature, loss_config.temperature)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.log_teacher.exp(), self.log_student.exp()

    @torch.no_grad()
    def project_(self) -> None:
        """Clamp the temperatures into ``temperature_range`` (in place)."""
        low, high = (math.log(t) for t in self.temperature_range)
        self.log_teacher.clamp_(low, high)
        self.log_student.clamp_(low, high)

    def summary(self) -> dict[str, float]:
        """Scalars to log: the temperatures (mean, and min/max where per-class)."""
        out: dict[str, float] = {}
        with torch.no_grad():
            for name, log_t in (("teacher_temperature", self.log_teacher), ("student_temperature", self.log_student)):
                t = log_t.exp()
                out[name] = t.mean().item()
                if t.dim():
                    out[name + "_min"] = t.min().item()
                    out[name + "_max"] = t.max().item()
        return out

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, teacher={tuple(self.log_teacher.shape)}, student={tuple(self.log_student.shape)}"


def make_meta_optimizer(temps: MetaTemperatures, config: MetaConfig) -> torch.optim.Optimizer:
    """Adam over the log-temperatures (no weight decay)."""
    return torch.optim.Adam(temps.parameters(), lr=config.lr)


def meta_update(
    model: nn.Module,
    temps: MetaTemperatures,
    train_batch: tuple[torch.Tensor, TeacherRecord, torch.Tensor],
    meta_batch: tuple[torch.Tensor, torch.Tensor],
    *,
    inner_lr: float,
    loss_config: LossConfig,
    head_only: bool,
    meta_optimizer: torch.optim.Optimizer,
) -> dict[str, float]:
    """One meta step on the temperatures; returns scalars to log.

    ``model``: the student, in the mode the trainer keeps it (train); DDP and torch.compile
    wrappers are looked through (the plain module runs, uncompiled). ``train_batch``:
    ``(images [B,3,H,W], record, target)`` as given to the student step; ``meta_batch``: ``(images, target)`` from a held-out split (int labels or
    soft targets). ``loss_config`` must name ``mkd`` (its ``alpha`` and ``tail`` are used).
    ``meta_optimizer`` holds ``temps.parameters()``.

    The student's parameters, their ``.grad`` and its buffers (e.g. BatchNorm running
    statistics) are unchanged on return. Under ``torch.distributed`` the meta-gradient is
    averaged over ranks, so every rank must call this at the same steps.

    Returned: ``meta_loss`` (meta-batch CE of the looked-ahead student, at the temperatures
    before this step), ``lookahead_loss`` (the MKD training loss) and the temperatures after
    the step (see :meth:`MetaTemperatures.summary`).
    """
    if loss_config.name != "mkd":
        raise ConfigError(f"meta_update needs LossConfig.name='mkd', got {loss_config.name!r}")
    if not _positive(inner_lr):
        raise ConfigError(f"inner_lr={inner_lr!r}: expected a positive number")
    model = _unwrap(model)
    images, record, target = train_batch
    meta_images, meta_target = meta_batch
    saved_buffers = {name: buf.detach().clone() for name, buf in model.named_buffers()}
    try:
        teacher_t, student_t = temps()

        def train_loss(logits: torch.Tensor) -> torch.Tensor:
            return mkd_loss(
                logits,
                record,
                target,
                alpha=loss_config.alpha,
                teacher_temperature=teacher_t,
                student_temperature=student_t,
                tail=loss_config.tail,
            )

        if head_only:
            meta_loss, lookahead_loss = _head_lookahead(model, images, meta_images, meta_target, train_loss, inner_lr)
        else:
            meta_loss, lookahead_loss = _full_lookahead(model, images, meta_images, meta_target, train_loss, inner_lr)
        params = list(temps.parameters())
        grads = torch.autograd.grad(meta_loss, params, allow_unused=True)
    finally:
        with torch.no_grad():
            for name, buf in model.named_buffers():
                buf.copy_(saved_buffers[name])
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    _average_across_ranks(grads)
    meta_optimizer.zero_grad(set_to_none=True)
    for p, g in zip(params, grads):
        p.grad = g
    meta_optimizer.step()
    temps.project_()
    return {"meta_loss": meta_loss.item(), "lookahead_loss": lookahead_loss.item(), **temps.summary()}


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DistributedDataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _sgd_step(params: dict[str, torch.Tensor], loss: torch.Tensor, lr: float) -> dict[str, torch.Tensor]:
    """``theta - lr * grad``, differentiable with respect to whatever ``loss`` depends on."""
    names = list(params)
    grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=True, allow_unused=True)
    return {n: params[n] if g is None else params[n] - lr * g for n, g in zip(names, grads)}


def _full_lookahead(model, images, meta_images, meta_target, train_loss, inner_lr):
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    # The fused attention kernels (flash, memory-efficient, cuDNN) have no double backward;
    # the math kernel's backward is made of differentiable ops.
    with sdpa_kernel(SDPBackend.MATH):
        lookahead_loss = train_loss(functional_call(model, params, (images,)))
    stepped = _sgd_step(params, lookahead_loss, inner_lr)
    meta_logits = functional_call(model, stepped, (meta_images,))
    return ce_loss(meta_logits, meta_target), lookahead_loss


def _head_lookahead(model, images, meta_images, meta_target, train_loss, inner_lr):
    head = model.get_classifier()
    if not isinstance(head, nn.Module) or not any(True for _ in head.parameters()):
        raise ConfigError(f"head_only look-ahead needs get_classifier() to return a module with parameters, got {head!r}")
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
        # timm convention: model(x) == classifier(forward_head(forward_features(x), pre_logits=True)).
        with torch.no_grad():
            pre = model.forward_head(model.forward_features(images), pre_logits=True)
            meta_pre = model.forward_head(model.forward_features(meta_images), pre_logits=True)
        params = dict(head.named_parameters())
        lookahead_loss = train_loss(functional_call(head, params, (pre,)))
        stepped = _sgd_step(params, lookahead_loss, inner_lr)
        meta_logits = functional_call(head, stepped, (meta_pre,))
        return ce_loss(meta_logits, meta_target), lookahead_loss
    # Any other module: full forward passes, looked ahead in the head's parameters only.
    head_ids = {id(p) for p in head.parameters()}
    params = {name: p for name, p in model.named_parameters() if id(p) in head_ids}
    lookahead_loss = train_loss(functional_call(model, params, (images,)))
    stepped = _sgd_step(params, lookahead_loss, inner_lr)
    meta_logits = functional_call(model, stepped, (meta_images,))
    return ce_loss(meta_logits, meta_target), lookahead_loss


def _average_across_ranks(grads: list[torch.Tensor]) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for g in grads:
            dist.all_reduce(g)
            g.div_(dist.get_world_size())


class MKDLoss(nn.Module):
    """:func:`kdcache.losses.mkd_loss` as a module that owns its learnt temperatures and their meta step.

    ``MKDLoss(num_classes, alpha=0.9, temperature=4.0)``: both temperatures start at
    ``temperature`` (:class:`MetaTemperatures`, in ``self.temperatures``; move the module to the
    student's device). ``criterion(logits, record, target)`` is the training loss at the current
    temperatures. Every ``meta.every`` steps, call :meth:`meta_step` with the step's batch and a
    held-out batch: it updates the temperatures only (an Adam of its own over them) and leaves
    the student exactly as it was. The training loss carries no gradient to the temperatures;
    keep them out of the student's optimizer all the same (its weight decay would move them).
    """

    def __init__(self, num_classes: int, alpha: float | None = None, temperature: float | None = None,
                 tail: str | None = None, meta: MetaConfig | None = None) -> None:
        super().__init__()
        self.config = LossConfig(name="mkd", alpha=alpha, temperature=temperature, tail=tail)
        if meta is not None and not isinstance(meta, MetaConfig):
            raise ConfigError(f"meta={meta!r}: expected a kdcache.MetaConfig")
        self.meta = meta if meta is not None else MetaConfig()
        self.temperatures = MetaTemperatures.from_configs(num_classes, self.config, self.meta)
        self._meta_optimizer: torch.optim.Optimizer | None = None

    @property
    def meta_optimizer(self) -> torch.optim.Optimizer:
        """The Adam over the temperatures that :meth:`meta_step` steps (made on first use; save its state to resume)."""
        if self._meta_optimizer is None:
            self._meta_optimizer = make_meta_optimizer(self.temperatures, self.meta)
        return self._meta_optimizer

    def forward(self, student_logits: torch.Tensor, record: TeacherRecord, target: torch.Tensor) -> torch.Tensor:
        """The training loss at the current temperatures, which it does not train (only :meth:`meta_step` does)."""
        teacher_t, student_t = (t.detach() for t in self.temperatures())
        return mkd_loss(student_logits, record, target, alpha=self.config.alpha, teacher_temperature=teacher_t,
                        student_temperature=student_t, tail=self.config.tail)

    def meta_step(self, model: nn.Module, images: torch.Tensor, record: TeacherRecord, target: torch.Tensor,
                  meta_images: torch.Tensor, meta_target: torch.Tensor, *, lr: float) -> dict[str, float]:
        """One update of the temperatures (:func:`meta_update`); ``lr``: the student's current learning rate.

        Returns the scalars to log (meta loss, look-ahead loss, temperatures). Under
        torch.distributed every rank must call it at the same steps.
        """
        return meta_update(model, self.temperatures, (images, record, target), (meta_images, meta_target),
                           inner_lr=self.meta.inner_lr or lr, loss_config=self.config, head_only=self.meta.head_only,
                           meta_optimizer=self.meta_optimizer)
