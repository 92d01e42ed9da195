"""Teacher records: top-k logits, their class indices and a tail summary.

A teacher record for one view holds the teacher's ``k`` largest logits (fp16, sorted
descending), their class indices (the smallest unsigned integer type that holds the class
count) and a *tail summary*: two fp16 numbers from which the log of the tail's softmax mass,

    L(beta) = log sum_{c not in top-k} exp(beta * v_c),      beta = 1 / T,

can be rebuilt at any temperature in :data:`TEMPERATURE_RANGE`. The summary stores L exactly
at the inverse temperatures :data:`TAIL_BETAS` (as offsets from ``beta * v_top1`` so fp16
keeps its precision), and L(0) = log(C - k) is known. Between and beyond those anchors L is
the quadratic in beta through the three points (its cumulant expansion, log n + beta*mu +
beta^2*sigma^2/2, fitted to exact values), clipped to the bounds every tail obeys:
convexity (curvature >= 0) and L(beta) <= log n + beta * v_k, since no tail logit exceeds the
k-th largest. With k = C the tail is empty, L = -inf and everything is exact.

All functions here are pure tensor functions (no I/O, no RNG).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: Inverse temperatures at which the tail log-mass is stored exactly (format v1).
TAIL_BETAS: tuple[float, float] = (1.0, 0.25)
#: Temperatures over which the reconstruction error is measured and documented.
TEMPERATURE_RANGE: tuple[float, float] = (0.5, 10.0)


@dataclass(frozen=True)
class TeacherRecord:
    """The teacher records of a batch of views, as tensors on one device.

    ``values`` fp16 ``[B, k]`` (sorted descending), ``indices`` integer ``[B, k]``,
    ``tail`` fp16 ``[B, 2]`` (see the module docstring), ``num_classes`` C.
    """

    values: torch.Tensor
    indices: torch.Tensor
    tail: torch.Tensor
    num_classes: int

    @property
    def k(self) -> int:
        return self.values.shape[-1]

    def to(self, device) -> "TeacherRecord":
        return TeacherRecord(
            values=self.values.to(device, non_blocking=True),
            indices=self.indices.to(device, non_blocking=True).long(),
            tail=self.tail.to(device, non_blocking=True),
            num_classes=self.num_classes,
        )

    @classmethod
    def from_logits(cls, logits: torch.Tensor, k: int) -> "TeacherRecord":
        values, indices, tail = make_records(logits, k)
        return cls(values=values, indices=indices, tail=tail, num_classes=logits.shape[-1])

    def log_probs(self, temperature) -> torch.Tensor:
        """Tempered teacher log-probabilities over the k stored classes and the tail bucket: ``[B, k+1]``."""
        return teacher_log_probs(self.values, self.tail, self.num_classes, temperature)

    def dense_log_probs(self, temperature) -> torch.Tensor:
        """Tempered teacher log-probabilities over all C classes, tail spread evenly: ``[B, C]``."""
        return dense_log_probs(self.values, self.indices, self.tail, self.num_classes, temperature)

    def tail_log_mass(self, beta) -> torch.Tensor:
        """``log sum_{c in tail} exp(beta * v_c)`` per view: ``[B]``."""
        return tail_log_mass(self.values, self.tail, self.num_classes, beta)


def make_records(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split teacher logits ``[B, C]`` into (values fp16 [B,k], indices int64 [B,k], tail fp16 [B,2]).

    The k classes are ranked canonically on their stored fp16 values: value descending, then class
    index ascending. Equal fp16 values thus give equal records, whatever order the float32 logits
    happened to come in (thread count, batch size, rank count move their last bits).
    """
    logits = logits.float()
    num_classes = logits.shape[-1]
    rounded = logits.to(torch.float16)
    indices = torch.sort(rounded, dim=-1, descending=True, stable=True).indices[:, :k]  # stable: ties by index
    values16 = rounded.gather(-1, indices)
    masked = logits.scatter(-1, indices, float("-inf"))
    top1 = values16[:, :1].float()
    tail = []
    for beta in TAIL_BETAS:
        lse = torch.logsumexp(beta * masked, dim=-1, keepdim=True) if k < num_classes else torch.full_like(top1, float("-inf"))
        tail.append(lse - beta * top1)
    return values16, indices, torch.cat(tail, dim=-1).to(torch.float16)


def tail_log_mass(values: torch.Tensor, tail: torch.Tensor, num_classes: int, beta) -> torch.Tensor:
    """Reconstruct L(beta) for each record: ``[B]`` (or broadcast with a ``[B]``/scalar beta)."""
    values = values.float()
    k = values.shape[-1]
    n = num_classes - k
    beta = torch.as_tensor(beta, dtype=torch.float32, device=values.device)
    if beta.dim() == 2:
        beta = beta.squeeze(-1)
    if n == 0:
        return torch.full(torch.broadcast_shapes(values.shape[:-1], beta.shape), float("-inf"), device=values.device)
    top1 = values[:, 0]
    b1, b2 = TAIL_BETAS
    log_n = math.log(n)
    anchor1 = tail[:, 0].float() + b1 * top1
    anchor2 = tail[:, 1].float() + b2 * top1
    slope1 = (anchor1 - log_n) / b1
    slope2 = (anchor2 - log_n) / b2
    curvature = ((slope1 - slope2) / (b1 - b2)).clamp_min(0.0)
    linear = slope1 - curvature * b1
    estimate = log_n + linear * beta + curvature * beta * beta
    upper = log_n + beta * values[:, -1]
    return torch.minimum(estimate, upper)


def teacher_log_probs(values: torch.Tensor, tail: torch.Tensor, num_classes: int, temperature) -> torch.Tensor:
    """Log-probabilities ``[B, k+1]`` of the tempered teacher: the k stored classes, then the tail bucket.

    ``temperature`` is a float or a tensor broadcastable to ``[B, 1]``. With k = C the last
    column is -inf (the tail is empty) and the first k equal ``log_softmax(v / T)`` exactly.
    """
    temperature = torch.as_tensor(temperature, dtype=torch.float32, device=values.device)
    if temperature.dim() == 1:
        temperature = temperature.unsqueeze(-1)
    scaled = values.float() / temperature
    beta = (1.0 / temperature).expand(values.shape[0], 1).squeeze(-1)
    tail_mass = tail_log_mass(values, tail, num_classes, beta).unsqueeze(-1)
    joint = torch.cat([scaled, tail_mass], dim=-1)
    return joint - torch.logsumexp(joint, dim=-1, keepdim=True)


def dense_log_probs(
    values: torch.Tensor, indices: torch.Tensor, tail: torch.Tensor, num_classes: int, temperature
) -> torch.Tensor:
    """A full ``[B, C]`` log-distribution: stored classes exact, the tail mass spread evenly over the rest."""
    bucket = teacher_log_probs(values, tail, num_classes, temperature)
    k = values.shape[-1]
    n = num_classes - k
    spread = bucket[:, -1:] - (math.log(n) if n else 0.0)
    dense = spread.expand(values.shape[0], num_classes).clone()
    return dense.scatter(-1, indices.long(), bucket[:, :k])
