"""Training losses: cross-entropy and the distillation family (KD, TTM, WTTM, MKD).

Every loss is a pure function of tensors: student logits ``z`` ``[B, C]``, a batch of
:class:`~kdcache.record.TeacherRecord` (top-k teacher logits ``v`` + tail summary), the
target (int64 labels ``[B]`` or a float soft target ``[B, C]``, e.g. a mixup/cutmix
``lam * onehot(y_i) + (1 - lam) * onehot(y_j)``) and keyword hyper-parameters. Losses are
means over the batch; KL divergences are summed over classes ("batchmean").

A record with k < C classes enters the KL in one of three ways (``tail=``):

``"estimated"`` (the default) the teacher's full distribution estimated from all the record holds (format
              version 2): the top k exact, the tail's exact mass, its shape from the tail
              code, corrected at the sampled tail classes by their inverse inclusion
              probabilities (Horvitz-Thompson), which makes the estimate and its gradients
              unbiased at every temperature (up to the tail summary's normaliser,
              docs/methods.md). A record with neither (format version 1) enters as ``"bucket"``.
``"bucket"``  KL over k+1 outcomes: the k stored classes plus one *tail bucket* holding the
              teacher's tail mass (rebuilt from the tail summary at the teacher temperature);
              the student side uses its probabilities of the same k classes plus its exact
              log-mass over the other C-k classes (the student has all C logits).
``"uniform"`` the teacher's tail mass is spread evenly over the C-k classes; KL over all C.

With k = C both equal the full-logit loss (to float tolerance). The formulas, sources and
defaults are in docs/methods.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdcache.errors import ConfigError, MismatchError
from kdcache.record import TeacherRecord, tail_mask

#: The ways a partial (top-k + tail) record enters a KL divergence.
TAIL_MODES: tuple[str, ...] = ("estimated", "bucket", "uniform")


# ---------------------------------------------------------------------------------------------
# Pieces shared by the losses
# ---------------------------------------------------------------------------------------------


def ce_loss(student_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy, mean over the batch. ``target``: int labels ``[B]`` or soft target ``[B, C]``."""
    logits = student_logits.float()
    if target.is_floating_point():
        if target.shape != logits.shape:
            raise ValueError(f"soft target has shape {tuple(target.shape)}, expected {tuple(logits.shape)}")
        return -(target.float() * F.log_softmax(logits, dim=-1)).sum(-1).mean()
    if target.shape != logits.shape[:1]:
        raise ValueError(f"labels have shape {tuple(target.shape)}, expected ({logits.shape[0]},)")
    return F.cross_entropy(logits, target.long())


def _temperature(value, num_classes: int, device, what: str) -> torch.Tensor:
    """A float32 temperature tensor: a scalar or per-class ``[C]`` (gradients are kept)."""
    t = torch.as_tensor(value, dtype=torch.float32, device=device)
    if t.dim() == 0 or (t.dim() == 1 and t.shape[0] == num_classes):
        return t
    raise ValueError(f"{what} has shape {tuple(t.shape)}, expected a scalar or ({num_classes},)")


def _check_pair(student_logits: torch.Tensor, record: TeacherRecord | None, loss: str) -> None:
    if record is None:
        raise ConfigError(f"loss {loss!r} needs teacher records, got record=None; use loss 'ce' to train without a teacher")
    if student_logits.shape[-1] != record.num_classes:
        raise MismatchError(
            f"student has {student_logits.shape[-1]} classes, the teacher record has {record.num_classes}"
        )
    if student_logits.shape[0] != record.values.shape[0]:
        raise ValueError(f"{student_logits.shape[0]} student rows but {record.values.shape[0]} teacher records")


def _check_tail(tail: str) -> None:
    if tail not in TAIL_MODES:
        raise ConfigError(f"tail={tail!r}: unknown tail mode; expected one of {', '.join(map(repr, TAIL_MODES))}")


def teacher_log_probs(record: TeacherRecord, temperature, *, tail: str = "bucket") -> torch.Tensor:
    """The tempered teacher's log-probabilities in the layout the KL uses.

    ``bucket``: ``[B, k+1]`` (stored classes in record order, then the tail bucket), or
    ``[B, k]`` when k = C (no tail). ``uniform``: ``[B, C]`` in class order.
    ``temperature`` is a float or a scalar tensor (gradients flow through it); a per-class
    ``[C]`` tensor is allowed only for full records (k = C).
    """
    _check_tail(tail)
    full = record.k == record.num_classes
    t = _temperature(temperature, record.num_classes, record.values.device, "teacher_temperature")
    if t.dim() == 1 and not full:
        raise ConfigError(
            f"teacher_temperature is per-class ({record.num_classes},), which needs full records; "
            f"these have k={record.k} of C={record.num_classes} (store them with --topk full)"
        )
    if full:
        indices = record.indices.long()
        scale = t[indices] if t.dim() == 1 else t
        log_p = F.log_softmax(record.values.float() / scale, dim=-1)
        if tail == "bucket":
            return log_p
        return torch.empty_like(log_p).scatter(-1, indices, log_p)
    if tail == "bucket":
        return record.log_probs(t)
    return record.dense_log_probs(t)


def student_log_probs(student_logits: torch.Tensor, record: TeacherRecord, temperature, *, tail: str = "bucket") -> torch.Tensor:
    """The tempered student's log-probabilities in the same layout as :func:`teacher_log_probs`.

    ``temperature`` is a float, a scalar tensor or a per-class ``[C]`` tensor. In the bucket
    layout the tail entry is the student's exact log-mass over the C-k classes not stored.
    """
    _check_tail(tail)
    t = _temperature(temperature, record.num_classes, student_logits.device, "student_temperature")
    log_q = F.log_softmax(student_logits.float() / t, dim=-1)
    if tail == "uniform":
        return log_q
    indices = record.indices.long()
    stored = log_q.gather(-1, indices)
    if record.k == record.num_classes:
        return stored
    rest = log_q.scatter(-1, indices, float("-inf")).logsumexp(-1, keepdim=True)
    return torch.cat([stored, rest], dim=-1)


def distillation_kl(
    student_logits: torch.Tensor,
    record: TeacherRecord,
    *,
    teacher_temperature,
    student_temperature,
    tail: str = "bucket",
) -> torch.Tensor:
    """Per-view ``KL(p_teacher(T_t) || q_student(T_s))``: ``[B]``, summed over classes or buckets."""
    _check_pair(student_logits, record, "distillation")
    _check_tail(tail)
    if tail == "estimated":
        if (record.samples or record.spec.rank) and record.k < record.num_classes:
            return estimated_kl(student_logits, record, teacher_temperature=teacher_temperature,
                                student_temperature=student_temperature)
        tail = "bucket"
    log_p = teacher_log_probs(record, teacher_temperature, tail=tail)
    log_q = student_log_probs(student_logits, record, student_temperature, tail=tail)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def estimated_teacher(record: TeacherRecord, teacher_temperature) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tempered teacher on the stored classes: (classes ``[B, k+s]``, ``log p`` ``[B, k+s]``, ``log w`` ``[B, k+s]``).

    Columns are the top k, then the sampled tail classes (none without a sampled tail).
    ``log p_j = v_j / T - log Z(T)``, with ``log Z`` from the top k and the tail summary's
    ``L(1/T)``; ``w_j`` is 1 for the top k and ``1 / pi_j`` for a sampled class (0 for a pad),
    so ``sum_j w_j p_j f(j)`` over the sampled classes is an unbiased estimate of ``sum_c p_c
    f(c)`` over the tail. Gradients flow to the temperature.
    """
    t = _temperature(teacher_temperature, record.num_classes, record.values.device, "teacher_temperature")
    if t.dim() == 1:
        raise ConfigError(f"teacher_temperature is per-class ({record.num_classes},), which needs full records; "
                          f"these have k={record.k} of C={record.num_classes} (store them with --topk full)")
    top = record.values.float()
    log_p_top = record.log_probs(t)[:, : record.k]  # the record's own normaliser, through its tail code where it has one
    if not record.samples:
        return record.indices.long(), log_p_top, torch.zeros_like(top)
    log_z = top[:, :1] / t - log_p_top[:, :1]
    classes = torch.cat([record.indices.long(), record.sampled_indices.long()], dim=-1)
    log_p = torch.cat([log_p_top, record.sampled_values.float() / t - log_z], dim=-1)
    log_w = torch.cat([torch.zeros_like(top), record.log_weights()], dim=-1)
    return classes, log_p, log_w


#: What the estimated target's tail starts from before the sampled classes correct it.
BASELINES: tuple[str, ...] = ("code", "student", "uniform", "none")


def default_baseline(record: TeacherRecord) -> str:
    """The tail code where the record has one, else the tail's mass spread evenly."""
    return "code" if record.spec.rank else "uniform"


def estimated_kl(student_logits: torch.Tensor, record: TeacherRecord, *, teacher_temperature, student_temperature,
                 baseline: str | None = None) -> torch.Tensor:
    """Per-view estimate of ``KL(p_teacher(T_t) || q_student(T_s))`` from everything a record holds: ``[B]``.

    The teacher's target over all C classes is estimated as ``p_hat``: exact on the top k; on the
    tail a baseline ``b`` that carries the tail's mass M (from the tail summary), plus the
    Horvitz-Thompson correction ``w_j (p_j - b_j)`` at each sampled class. ``b`` is
    ``M softmax_tail(code logits / T_t)`` (``code``: the record's low-rank tail code), ``M
    q_c / Q_tail`` (``student``: the student's own tail shape, detached), ``M / (C - k)``
    (``uniform``), or 0 (``none``: plain importance sampling). With sampled classes any b leaves
    ``E[p_hat] = p``; b only changes the variance. Without them, b is the tail's shape.

    ``F = H_hat - sum_c p_hat_c z_c / T_s,c + logsumexp(z / T_s)``, where ``H_hat``, the estimate
    of ``sum_c p_c log p_c``, is exact on the top k, ``sum b log b`` on the tail, corrected at the
    sampled classes by ``w_j (p_j log p_j - b_j log b_j)``. ``E[F]`` is the KL (the mass sums to 1), and F is linear in the
    estimates, so its gradients are unbiased: for the student logits ``(q - p_hat) / T_s`` (the
    full-logit gradient with its target replaced by an unbiased estimate), and for both
    temperatures (MKD), second derivatives included.
    """
    baseline = default_baseline(record) if baseline is None else baseline
    if baseline not in BASELINES:
        raise ConfigError(f"baseline={baseline!r}: expected one of {', '.join(map(repr, BASELINES))}")
    if baseline == "code" and not record.spec.rank:
        raise ConfigError("baseline='code' needs a record with a tail code (a tail spec of rank > 0)")
    classes, log_p, log_w = estimated_teacher(record, teacher_temperature)
    t = _temperature(student_temperature, record.num_classes, student_logits.device, "student_temperature")
    scaled = student_logits.float() / t
    weight = log_w.exp()
    p = log_p.exp()
    k = record.k
    target = torch.zeros_like(scaled)
    if baseline != "none":
        in_tail = tail_mask(record.indices.to(scaled.device), record.num_classes)
        tail_mass = (1.0 - p[:, :k].sum(-1, keepdim=True)).clamp_min(0.0)
        if baseline == "uniform":
            log_shape = torch.where(in_tail, -math.log(record.num_classes - k), float("-inf"))
        else:
            logits = record.shape_logits() / _temperature(teacher_temperature, record.num_classes, scaled.device, "t") \
                if baseline == "code" else scaled.detach()
            log_shape = torch.log_softmax(logits.masked_fill(~in_tail, float("-inf")), dim=-1)
        target = tail_mass * log_shape.exp()
        log_base = tail_mass.clamp_min(1e-30).log() + log_shape  # log b on the tail, -inf elsewhere
    else:
        log_base = torch.full_like(scaled, float("-inf"))
    plogp = lambda log_q: log_q.exp() * log_q.masked_fill(torch.isinf(log_q), 0.0)  # 0 log 0 = 0, with finite gradients
    base_at, log_base_at = target.gather(-1, classes[:, k:]), log_base.gather(-1, classes[:, k:])
    # sum_c p_c log p_c: exact on the top k, the baseline's on the tail, corrected at the sampled classes
    entropy_term = ((p * log_p)[:, :k].sum(-1) + plogp(log_base).sum(-1)
                    + (weight[:, k:] * (p[:, k:] * log_p[:, k:] - plogp(log_base_at))).sum(-1))
    correction = torch.cat([p[:, :k], weight[:, k:] * (p[:, k:] - base_at)], dim=-1)
    target = target.scatter_add(-1, classes, correction)
    return entropy_term - (target * scaled).sum(-1) + torch.logsumexp(scaled, dim=-1)


def log_power_sum(record: TeacherRecord, gamma: float) -> torch.Tensor:
    """``log U_gamma = log sum_c softmax(v)_c ** gamma`` per view: ``[B]``.

    ``sum_c p_c^gamma = exp(logsumexp_c(gamma * v_c) - gamma * logZ(1))``; the stored classes
    enter exactly and the tail through ``L(gamma)`` and ``L(1)`` from the tail summary
    (``L(1)`` is stored; both are exact when k = C, where the tail is empty).
    """
    values = record.values.float()
    if record.k == record.num_classes:
        return torch.logsumexp(gamma * values, dim=-1) - gamma * torch.logsumexp(values, dim=-1)
    powered = torch.cat([gamma * values, record.tail_log_mass(gamma).unsqueeze(-1)], dim=-1)
    plain = torch.cat([values, record.tail_log_mass(1.0).unsqueeze(-1)], dim=-1)
    return torch.logsumexp(powered, dim=-1) - gamma * torch.logsumexp(plain, dim=-1)


# ---------------------------------------------------------------------------------------------
# The losses
# ---------------------------------------------------------------------------------------------


def kd_loss(
    student_logits: torch.Tensor,
    record: TeacherRecord,
    target: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
    tail: str = "bucket",
) -> torch.Tensor:
    """Hinton KD: ``(1 - alpha) * CE(z, y) + alpha * T^2 * KL(softmax(v/T) || softmax(z/T))``."""
    _check_pair(student_logits, record, "kd")
    kl = distillation_kl(student_logits, record, teacher_temperature=temperature, student_temperature=temperature, tail=tail)
    return (1.0 - alpha) * ce_loss(student_logits, target) + alpha * temperature**2 * kl.mean()


def ttm_loss(
    student_logits: torch.Tensor,
    record: TeacherRecord,
    target: torch.Tensor,
    *,
    beta: float,
    gamma: float,
    tail: str = "bucket",
) -> torch.Tensor:
    """TTM: ``CE(z, y) + beta * KL(softmax(gamma * v) || softmax(z))`` (no student temperature, no T^2)."""
    _check_pair(student_logits, record, "ttm")
    kl = distillation_kl(student_logits, record, teacher_temperature=1.0 / gamma, student_temperature=1.0, tail=tail)
    return ce_loss(student_logits, target) + beta * kl.mean()


def wttm_loss(
    student_logits: torch.Tensor,
    record: TeacherRecord,
    target: torch.Tensor,
    *,
    beta: float,
    gamma: float,
    tail: str = "bucket",
) -> torch.Tensor:
    """WTTM: ``CE(z, y) + beta * mean_i(U_i * KL_i)``, ``U_i = sum_c softmax(v_i)_c^gamma`` (no gradient)."""
    _check_pair(student_logits, record, "wttm")
    kl = distillation_kl(student_logits, record, teacher_temperature=1.0 / gamma, student_temperature=1.0, tail=tail)
    weight = log_power_sum(record, gamma).exp().detach()
    return ce_loss(student_logits, target) + beta * (weight * kl).mean()


def mkd_loss(
    student_logits: torch.Tensor,
    record: TeacherRecord,
    target: torch.Tensor,
    *,
    alpha: float,
    teacher_temperature: torch.Tensor,
    student_temperature: torch.Tensor,
    tail: str = "bucket",
) -> torch.Tensor:
    """KD with learnable temperatures (tensors that may carry gradients).

    ``(1 - alpha) * CE(z, y) + alpha * s * KL(softmax(v / T_t) || softmax(z / T_s))`` with
    ``s = mean_c(T_s^2)`` (``T_s^2`` for a scalar student temperature). ``T_t``: scalar, or
    per-class ``[C]`` for full records only; ``T_s``: scalar or per-class ``[C]``. With
    ``T_t = T_s = T`` this is exactly :func:`kd_loss`. ``s`` keeps the student-logit gradient
    of the distillation term independent of the temperatures' scale (see docs/methods.md).
    """
    _check_pair(student_logits, record, "mkd")
    t_student = _temperature(student_temperature, record.num_classes, student_logits.device, "student_temperature")
    kl = distillation_kl(
        student_logits, record, teacher_temperature=teacher_temperature, student_temperature=t_student, tail=tail
    )
    scale = t_student.square().mean()
    return (1.0 - alpha) * ce_loss(student_logits, target) + alpha * scale * kl.mean()


#: Loss name -> pure loss function (see :func:`compute_loss` for the uniform entry point).
LOSSES = {"ce": ce_loss, "kd": kd_loss, "ttm": ttm_loss, "wttm": wttm_loss, "mkd": mkd_loss}


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

#: The hyper-parameters each loss takes, with their defaults (docs/methods.md says why).
LOSS_DEFAULTS: dict[str, dict[str, float | str]] = {
    "ce": {},
    "kd": {"alpha": 0.9, "temperature": 4.0, "tail": "estimated"},
    "ttm": {"beta": 36.0, "gamma": 0.25, "tail": "estimated"},
    "wttm": {"beta": 1.6, "gamma": 0.8, "tail": "estimated"},
    "mkd": {"alpha": 0.9, "temperature": 4.0, "tail": "estimated"},
}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    """Which loss to train with and its hyper-parameters.

    Fields a loss does not take stay ``None`` (setting one is an error); fields it takes and
    that are left ``None`` get the defaults of :data:`LOSS_DEFAULTS`. ``temperature`` is KD's
    T and, for ``mkd``, the initial teacher and student temperature.
    """

    name: str = "kd"
    alpha: float | None = None
    temperature: float | None = None
    beta: float | None = None
    gamma: float | None = None
    tail: str | None = None

    def __post_init__(self) -> None:
        if self.name not in LOSSES:
            raise ConfigError(
                f"LossConfig.name={self.name!r}: unknown loss; expected one of {', '.join(map(repr, LOSSES))}"
            )
        defaults = LOSS_DEFAULTS[self.name]
        for field in fields(self):
            if field.name == "name":
                continue
            value = getattr(self, field.name)
            if field.name not in defaults:
                if value is not None:
                    raise ConfigError(
                        f"LossConfig.{field.name}={value!r}: loss {self.name!r} does not take it; "
                        f"expected only {', '.join(defaults) or 'no hyper-parameters'}"
                    )
            elif value is None:
                object.__setattr__(self, field.name, defaults[field.name])
        self._validate()

    def _validate(self) -> None:
        def bad(field: str, expected: str) -> ConfigError:
            return ConfigError(f"LossConfig.{field}={getattr(self, field)!r}: expected {expected}")

        if self.alpha is not None and not (_is_number(self.alpha) and 0.0 <= self.alpha <= 1.0):
            raise bad("alpha", "a number in [0, 1]")
        if self.temperature is not None and not (_is_number(self.temperature) and self.temperature > 0):
            raise bad("temperature", "a positive number")
        if self.beta is not None and not (_is_number(self.beta) and self.beta >= 0):
            raise bad("beta", "a non-negative number")
        if self.gamma is not None and not (_is_number(self.gamma) and self.gamma > 0):
            raise bad("gamma", "a positive number (gamma = 1/T)")
        if self.tail is not None and self.tail not in TAIL_MODES:
            raise bad("tail", f"one of {', '.join(map(repr, TAIL_MODES))}")

    @property
    def needs_teacher(self) -> bool:
        """Whether the loss reads teacher records (every loss but ``ce``)."""
        return self.name != "ce"


def compute_loss(
    config: LossConfig,
    student_logits: torch.Tensor,
    record: "TeacherRecord | Sequence[TeacherRecord] | None",
    target: torch.Tensor,
    *,
    temperatures: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The loss named by ``config`` on one batch.

    ``record`` may be None for ``ce`` only. ``temperatures`` = ``(teacher_T, student_T)`` is
    required by ``mkd`` (e.g. ``MetaTemperatures()()``) and refused by every other loss.
    ``record`` may also be a sequence of several teachers' records of the same views (multi-teacher
    KD, docs/methods.md): the loss is then the mean of the per-teacher losses, that is the CE term
    unchanged and the mean of the per-teacher distillation terms.
    """
    name = config.name
    if isinstance(record, (list, tuple)):
        if name == "mkd":
            raise ConfigError("loss 'mkd' learns the temperatures of one teacher; train it from one teacher's records "
                              "(--teacher-record NAME), not all")
        if not record:
            raise ConfigError("records of several teachers were asked for, but none were given")
        if name == "ce" or len(record) == 1:
            return compute_loss(config, student_logits, record[0], target, temperatures=temperatures)
        return torch.stack([compute_loss(config, student_logits, r, target, temperatures=temperatures) for r in record]).mean()
    if temperatures is not None and name != "mkd":
        raise ConfigError(f"temperatures were given but loss {name!r} does not take them; only 'mkd' does")
    if name == "ce":
        return ce_loss(student_logits, target)
    if record is None:
        raise ConfigError(f"loss {name!r} needs teacher records, got record=None; use loss 'ce' to train without a teacher")
    if name == "kd":
        return kd_loss(student_logits, record, target, alpha=config.alpha, temperature=config.temperature, tail=config.tail)
    if name in ("ttm", "wttm"):
        return LOSSES[name](student_logits, record, target, beta=config.beta, gamma=config.gamma, tail=config.tail)
    if temperatures is None:
        raise ConfigError("loss 'mkd' needs temperatures=(teacher_T, student_T), e.g. from MetaTemperatures()")
    teacher_t, student_t = temperatures
    return mkd_loss(
        student_logits,
        record,
        target,
        alpha=config.alpha,
        teacher_temperature=teacher_t,
        student_temperature=student_t,
        tail=config.tail,
    )


# ---------------------------------------------------------------------------------------------
# The losses as modules (``criterion(logits, record, target)``, as with torch.nn's losses)
# ---------------------------------------------------------------------------------------------


class _RecordLoss(nn.Module):
    """A loss of :data:`LOSSES` with its hyper-parameters fixed (checked by :class:`LossConfig`)."""

    name: str

    def __init__(self, **hyper) -> None:
        super().__init__()
        self.config = LossConfig(name=self.name, **hyper)

    def forward(self, student_logits: torch.Tensor, record: TeacherRecord, target: torch.Tensor) -> torch.Tensor:
        return compute_loss(self.config, student_logits, record, target)

    def extra_repr(self) -> str:
        return ", ".join(f"{f.name}={getattr(self.config, f.name)!r}" for f in fields(self.config)
                         if f.name != "name" and getattr(self.config, f.name) is not None)


class KDLoss(_RecordLoss):
    """:func:`kd_loss` as a module: ``KDLoss(alpha=0.9, temperature=4.0, tail="estimated")``."""

    name = "kd"

    def __init__(self, alpha: float | None = None, temperature: float | None = None, tail: str | None = None) -> None:
        super().__init__(alpha=alpha, temperature=temperature, tail=tail)


class TTMLoss(_RecordLoss):
    """:func:`ttm_loss` as a module: ``TTMLoss(beta=36.0, gamma=0.25, tail="estimated")``."""

    name = "ttm"

    def __init__(self, beta: float | None = None, gamma: float | None = None, tail: str | None = None) -> None:
        super().__init__(beta=beta, gamma=gamma, tail=tail)


class WTTMLoss(_RecordLoss):
    """:func:`wttm_loss` as a module: ``WTTMLoss(beta=1.6, gamma=0.8, tail="estimated")``."""

    name = "wttm"

    def __init__(self, beta: float | None = None, gamma: float | None = None, tail: str | None = None) -> None:
        super().__init__(beta=beta, gamma=gamma, tail=tail)
