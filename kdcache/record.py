"""Teacher records: top-k logits, their class indices, a tail summary and sampled tail classes.

A teacher record for one view holds the teacher's ``k`` largest logits (fp16, sorted
descending), their class indices (the smallest unsigned integer type that holds the class
count) and a *tail summary*: fp16 numbers from which the log of the tail's softmax mass,

    L(beta) = log sum_{c not in top-k} exp(beta * v_c),      beta = 1 / T,

can be rebuilt at any temperature in :data:`TEMPERATURE_RANGE`. The summary stores L exactly
at the inverse temperatures of its :class:`TailSpec` (as offsets from ``beta * v_top1`` so fp16
keeps its precision), and L(0) = log(C - k) is known. Between and beyond those anchors L is a
quadratic in beta through three neighbouring known points (its cumulant expansion, log n +
beta*mu + beta^2*sigma^2/2, fitted to exact values), clipped to the bounds every tail obeys:
convexity (curvature >= 0) and L(beta) <= log n + beta * v_k, since no tail logit exceeds the
k-th largest. With k = C the tail is empty, L = -inf and everything is exact.

The summary gives the tail's total mass; how that mass is shared among the C - k tail classes
is what the *sampled tail* keeps (format version 2): ``s`` tail classes per view with their fp16
logits, drawn without replacement with inclusion probabilities

    pi_c = min(1, exp(ell + beta_pi * (v_c - v_top1)) + eps * s / (C - k)),

where ``ell`` (stored in the tail summary's last column, fp16) makes the pi_c of the view's tail
sum to s, ``beta_pi`` is the proposal's inverse temperature and ``eps`` the share spread evenly
over the tail (:class:`TailSpec`). The draw is Madow's systematic sampling over the tail in
class order, from one uniform keyed like the augmentation parameters (seed, epoch, sample), so a
record is reproducible. Every quantity in pi_c is stored, so a reader recomputes each sampled
class's exact inclusion probability, and the Horvitz-Thompson sum ``sum_{c sampled} f(c) / pi_c``
is an unbiased estimate of ``sum_{c in tail} f(c)`` for every f: the teacher's tempered
distribution at any temperature, and so the distillation gradient (kdcache.losses, "sampled").
A draw that comes out one class short (fp16 rounding of ell) is padded with the top-1 class,
which a reader gives weight 0.

All functions here are pure tensor functions (no I/O, no global RNG).
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch

#: Inverse temperatures at which the tail log-mass is stored exactly (format v1).
TAIL_BETAS: tuple[float, float] = (1.0, 0.25)
#: (code_levels, code_beta, code_floor) of the first version-2 caches, whose manifests do not name them:
#: whole-number coordinates in [-127, 127], the plain projection of all C logits.
CODE_FIT_V2_0 = (127, 0.0, 0.0)
#: Temperatures over which the reconstruction error is measured and documented.
TEMPERATURE_RANGE: tuple[float, float] = (0.5, 10.0)
#: The stream of the counter-based generator that draws a view's sampled tail classes
#: (0 draws its augmentation parameters, 1 its block's mix partners: kdcache.augment).
SAMPLE_STREAM = 2


@dataclass(frozen=True, kw_only=True)
class TailSpec:
    """What a record keeps of the classes outside its top k.

    ``betas``: the inverse temperatures where the tail summary stores L exactly; ``samples``:
    the tail classes drawn per view (0: none, the format-v1 record); ``proposal_beta`` and
    ``uniform_share``: the draw's inclusion probabilities (module docstring); ``rank``: the tail
    code's coordinates per view, whole numbers in steps that put the calibration views' largest at
    ``code_levels``, fitted by
    least squares over the tail classes weighted by ``(1 - code_floor) * softmax(code_beta * v)``
    plus ``code_floor`` spread evenly (:func:`tail_code`; ``code_beta`` 0: the plain projection of
    all C logits, as the first version-2 caches were written). Manifests hold it as ``tail``:
    ``{"betas", "temperature_range", "samples", "proposal_beta", "uniform_share", "rank",
    "code_levels", "code_beta", "code_floor"}``, each field only where it is used and the code's
    only where they differ from the first version-2 caches' (127, 0, 0).
    """

    betas: tuple[float, ...] = TAIL_BETAS
    samples: int = 0
    proposal_beta: float = 0.25
    uniform_share: float = 0.1
    rank: int = 0
    code_levels: int = 127
    code_beta: float = 0.0
    code_floor: float = 0.0
    temperature_range: tuple[float, float] = field(default=TEMPERATURE_RANGE)

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        object.__setattr__(self, "temperature_range", tuple(float(t) for t in self.temperature_range))
        if not self.betas or any(not (b > 0 and math.isfinite(b)) for b in self.betas) or len(set(self.betas)) != len(self.betas):
            raise ValueError(f"tail betas {self.betas!r}: expected distinct positive numbers")
        for name in ("samples", "rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"tail {name} {value!r}: expected a whole number >= 0")
        if not (self.proposal_beta >= 0 and math.isfinite(self.proposal_beta)):
            raise ValueError(f"tail proposal_beta {self.proposal_beta!r}: expected a number >= 0")
        if not 0.0 <= self.uniform_share <= 1.0:
            raise ValueError(f"tail uniform_share {self.uniform_share!r}: expected a number in [0, 1]")
        if isinstance(self.code_levels, bool) or not isinstance(self.code_levels, int) or not 1 <= self.code_levels <= 2048:
            raise ValueError(f"tail code_levels {self.code_levels!r}: expected a whole number in [1, 2048] (exact in fp16)")
        if not (self.code_beta >= 0 and math.isfinite(self.code_beta)):
            raise ValueError(f"tail code_beta {self.code_beta!r}: expected a number >= 0")
        if not 0.0 <= self.code_floor <= 1.0 or (self.code_beta and not self.code_floor > 0):
            raise ValueError(f"tail code_floor {self.code_floor!r}: expected a number in [0, 1], above 0 with a code_beta")

    @property
    def width(self) -> int:
        """Columns of the tail array: one per anchor, the draw's log-scale ``ell`` when classes are sampled, then the code."""
        return len(self.betas) + (1 if self.samples else 0) + self.rank

    def to_json(self) -> dict:
        out = {"betas": list(self.betas), "temperature_range": list(self.temperature_range)}
        if self.samples:
            out.update(samples=self.samples, proposal_beta=self.proposal_beta, uniform_share=self.uniform_share)
        if self.rank:
            out.update(rank=self.rank)
            if (self.code_levels, self.code_beta, self.code_floor) != CODE_FIT_V2_0:
                out.update(code_levels=self.code_levels, code_beta=self.code_beta, code_floor=self.code_floor)
        return out

    @classmethod
    def from_json(cls, data: dict) -> "TailSpec":
        """The spec a manifest's ``tail`` describes (a format-v1 ``tail`` has no samples)."""
        return cls(betas=tuple(data["betas"]), samples=int(data.get("samples", 0)),
                   proposal_beta=float(data.get("proposal_beta", 0.25)), uniform_share=float(data.get("uniform_share", 0.1)),
                   rank=int(data.get("rank", 0)), code_levels=int(data.get("code_levels", CODE_FIT_V2_0[0])),
                   code_beta=float(data.get("code_beta", CODE_FIT_V2_0[1])),
                   code_floor=float(data.get("code_floor", CODE_FIT_V2_0[2])),
                   temperature_range=tuple(data.get("temperature_range", TEMPERATURE_RANGE)))

    def for_classes(self, k: int, num_classes: int) -> "TailSpec":
        """The spec a record of k of C classes uses: no samples when the tail cannot hold more than are drawn."""
        if k >= num_classes or (self.samples and num_classes - k <= self.samples) or (self.rank and num_classes - k <= 2 * self.rank):
            return TailSpec(betas=TAIL_BETAS, temperature_range=self.temperature_range)
        return self


#: The fewest tail classes (C - k) a default record gives a tail code (below, top k and the summary alone).
MIN_CODED_TAIL = 40
#: The record kept by default (docs/format.md, "Teacher record"; chosen on benchmarks/records.py's frontier):
#: three anchors and a rank-40 code in 31 levels a side, fitted with the tail's weights at T = 2 and a 5% floor.
DEFAULT_TAIL = TailSpec(betas=(1.0, 0.5, 0.25), rank=40, code_levels=31, code_beta=0.5, code_floor=0.05)
#: The format-v1 record: top k and a two-anchor summary, nothing sampled.
V1_TAIL = TailSpec()


@dataclass(frozen=True)
class TeacherRecord:
    """The teacher records of a batch of views, as tensors on one device.

    ``values`` fp16 ``[B, k]`` (sorted descending), ``indices`` integer ``[B, k]``,
    ``tail`` fp16 ``[B, spec.width]`` (see the module docstring), ``num_classes`` C; with a
    sampled tail also ``sampled_values`` fp16 ``[B, s]`` and ``sampled_indices`` ``[B, s]``.
    """

    values: torch.Tensor
    indices: torch.Tensor
    tail: torch.Tensor
    num_classes: int
    sampled_values: torch.Tensor | None = None
    sampled_indices: torch.Tensor | None = None
    spec: TailSpec = V1_TAIL
    basis: torch.Tensor | None = None

    @property
    def k(self) -> int:
        return self.values.shape[-1]

    @property
    def samples(self) -> int:
        """Tail classes sampled per view (0 without a sampled tail)."""
        return 0 if self.sampled_values is None else self.sampled_values.shape[-1]

    def to(self, device) -> "TeacherRecord":
        def move(tensor, long=False):
            if tensor is None:
                return None
            moved = tensor.to(device, non_blocking=True)
            return moved.long() if long else moved

        return TeacherRecord(values=move(self.values), indices=move(self.indices, True), tail=move(self.tail),
                             num_classes=self.num_classes, sampled_values=move(self.sampled_values),
                             sampled_indices=move(self.sampled_indices, True), spec=self.spec, basis=move(self.basis))

    @classmethod
    def from_logits(cls, logits: torch.Tensor, k: int, spec: TailSpec = V1_TAIL, *, uniforms=None, basis=None) -> "TeacherRecord":
        values, indices, tail = make_records(logits, k, spec, uniforms=uniforms, basis=basis)
        return cls.from_stored(values, indices, tail, logits.shape[-1], spec.for_classes(k, logits.shape[-1]), k=k, basis=basis)

    @classmethod
    def from_stored(cls, values, indices, tail, num_classes: int, spec: TailSpec, *, k: int, basis=None) -> "TeacherRecord":
        """A record from the stored arrays: ``values``/``indices`` ``[B, k + s]`` (top k, then the sampled classes)."""
        values, indices, tail = (torch.as_tensor(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a for a in (values, indices, tail))
        indices = indices.long()
        if spec.rank and basis is None:
            raise ValueError(f"a record with a rank-{spec.rank} tail code needs its cache's tail basis")
        basis = basis if spec.rank else None
        if not spec.samples:
            return cls(values=values, indices=indices, tail=tail, num_classes=num_classes, spec=spec, basis=basis)
        return cls(values=values[:, :k], indices=indices[:, :k], tail=tail, num_classes=num_classes,
                   sampled_values=values[:, k:], sampled_indices=indices[:, k:], spec=spec, basis=basis)

    def shape_logits(self) -> torch.Tensor:
        """The tail code's logits ``[B, C]``: the basis's mean plus the code times its directions (up to a shift per view)."""
        if not self.spec.rank:
            raise ValueError("this record has no tail code (its tail spec's rank is 0)")
        basis = self.basis.float().to(self.tail.device)
        return basis[0] + self.tail[:, -self.spec.rank:].float() @ basis[1:]

    def log_probs(self, temperature) -> torch.Tensor:
        """Tempered teacher log-probabilities over the k stored classes and the tail bucket: ``[B, k+1]``
        (the tail's mass from :meth:`tail_log_mass`, through the tail code where the record has one)."""
        return _bucket_log_probs(self.values, temperature, self.tail_log_mass)

    def dense_log_probs(self, temperature) -> torch.Tensor:
        """Tempered teacher log-probabilities over all C classes, tail spread evenly: ``[B, C]``."""
        return _spread(self.log_probs(temperature), self.indices, self.num_classes)

    def tail_log_mass(self, beta) -> torch.Tensor:
        """``log sum_{c in tail} exp(beta * v_c)`` per view: ``[B]`` (through the tail code where the record has one)."""
        if self.spec.rank and self.k < self.num_classes:
            return coded_tail_log_mass(self, beta)
        return tail_log_mass(self.values, self.tail, self.num_classes, beta, self.spec)

    def log_weights(self) -> torch.Tensor:
        """``-log pi_c`` of each sampled class ``[B, s]`` (its Horvitz-Thompson weight's log); -inf for a pad."""
        return log_weights(self.values, self.indices, self.tail, self.sampled_values, self.sampled_indices,
                             self.num_classes, self.spec)


def tail_spec_of(tail: dict) -> TailSpec:
    """The tail spec a manifest's ``tail`` describes (format version 1: two anchors, nothing sampled or coded)."""
    return TailSpec.from_json(tail)


def encode_basis(basis: torch.Tensor) -> str:
    """A tail code's basis as the manifest holds it: base64 of its float32 little-endian bytes."""
    return base64.b64encode(basis.detach().cpu().float().numpy().astype("<f4").tobytes()).decode("ascii")


def tail_basis_of(tail: dict, num_classes: int) -> torch.Tensor | None:
    """The tail code's basis ``[rank + 1, C]`` a manifest's ``tail`` holds, or None without a code."""
    rank = int(tail.get("rank", 0))
    if not rank:
        return None
    raw = np.frombuffer(base64.b64decode(tail["basis"]), dtype="<f4")
    return torch.from_numpy(raw.reshape(rank + 1, num_classes).astype(np.float32))


@functools.lru_cache(maxsize=8)
def _decoded_basis(encoded: str, rank: int, num_classes: int) -> torch.Tensor:
    return tail_basis_of({"rank": rank, "basis": encoded}, num_classes)


def record_basis(manifest) -> torch.Tensor | None:
    """The tail code's basis of a manifest (``tail``, ``teacher.num_classes``), decoded once per manifest; None without a code."""
    rank = int(manifest.tail.get("rank", 0))
    return _decoded_basis(manifest.tail["basis"], rank, manifest.teacher.num_classes) if rank else None


def stored_record(values, indices, tail, manifest) -> TeacherRecord:
    """The teacher records of stored rows (numpy or tensors) of a cache with this manifest (its ``tail``, ``k``, classes)."""
    return TeacherRecord.from_stored(values, indices, tail, manifest.teacher.num_classes, tail_spec_of(manifest.tail),
                                     k=manifest.k, basis=record_basis(manifest))


def view_uniforms(seed: int, epoch: int, sample_ids) -> np.ndarray:
    """The uniform in [0, 1) that draws each view's sampled tail classes: Philox keyed by (seed, epoch, sample, 2)."""
    return np.array([np.random.Generator(np.random.Philox(np.random.SeedSequence([int(seed), int(epoch), int(i), SAMPLE_STREAM]))).random()
                     for i in sample_ids], dtype=np.float64)


def tail_mask(indices: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[B, C]`` bool: True at each view's classes outside ``indices`` ``[B, k]`` (its tail), on their device."""
    return torch.ones(indices.shape[0], num_classes, dtype=torch.bool, device=indices.device).scatter(-1, indices.long(), False)


def fit_tail_basis(logits: torch.Tensor, rank: int, levels: int = CODE_FIT_V2_0[0]) -> torch.Tensor:
    """The tail code's basis from a calibration set of teacher logits ``[N, C]``: float32 ``[rank + 1, C]``.

    Row 0 is the mean of the views' centred logits (each view less its own mean). Rows 1 to rank
    are their principal directions (float64 SVD on the CPU, each direction's largest entry made
    positive), each scaled by its step: the largest coordinate seen along it, divided by
    ``levels``. A view's code is then its coordinates in steps, rounded to whole numbers (within
    ``[-levels, levels]`` on the calibration views; :func:`tail_code`), and the basis is a function
    of the logits alone.
    """
    centred = logits.double().cpu()
    centred = centred - centred.mean(-1, keepdim=True)
    mean = centred.mean(0)
    if rank > min(centred.shape):
        raise ValueError(f"a rank-{rank} tail code needs at least {rank} calibration views and classes; got {tuple(centred.shape)}")
    directions = torch.linalg.svd(centred - mean, full_matrices=False).Vh[:rank]
    directions = directions * directions.gather(-1, directions.abs().argmax(-1, keepdim=True)).sign()
    steps = ((centred - mean) @ directions.T).abs().amax(0).clamp_min(1e-12) / levels
    return torch.cat([mean.unsqueeze(0), directions * steps.unsqueeze(-1)], dim=0).float()


#: The weighted code's numbers are clipped only here (fp16 holds every whole number up to 2048, and
#: larger ones to 1 part in 2048).
CODE_MAX = 32768.0
#: Elements of one chunk of the weighted fit's ``[views, rank + 1, C]`` product (float64: 128 MiB).
_FIT_CHUNK = 1 << 24


def tail_code(logits: torch.Tensor, basis: torch.Tensor, spec: TailSpec | None = None, top: torch.Tensor | None = None) -> torch.Tensor:
    """Each view's code ``[B, rank]``: its coordinates along the basis's rows, in steps, rounded and clipped to whole numbers.

    With ``spec.code_beta`` 0 (and without a spec) they are the plain projection of the view's
    centred logits on the rows. Otherwise they are the weighted least-squares fit, with a free
    shift, of the logits outside the top k (``top``: their indices ``[B, k]``), each tail class
    weighted by ``(1 - code_floor) * softmax_tail(code_beta * v)_c + code_floor / (C - k)``: the
    stored top k need no code, and the tail's largest classes carry its tempered mass. Decoding is
    the same either way (:meth:`TeacherRecord.shape_logits`); the fit is solved in float64.

    The projection's numbers are clipped to ``[-levels, levels]`` (as the first version-2 caches
    were); the weighted fit's only to ``[-CODE_MAX, CODE_MAX]``: the calibration views' largest
    coordinate along each row is ``levels`` steps, and a later view beyond it (a larger-scale view
    than any the calibration saw) keeps its larger number, exact in fp16 up to 2048 and within
    fp16's rounding above, rather than a clipped and wrong tail.
    """
    levels = spec.code_levels if spec is not None else CODE_FIT_V2_0[0]
    basis = basis.float().to(logits.device)
    rows = basis[1:]
    centred = logits.float() - logits.float().mean(-1, keepdim=True)
    if spec is None or not spec.code_beta:
        steps = (centred - basis[0]) @ rows.T / rows.square().sum(-1)
        return steps.round().clamp(-levels, levels)
    if top is None:
        raise ValueError("a weighted tail code needs the view's top-k indices")
    in_tail = tail_mask(top.to(centred.device), centred.shape[-1])
    n = in_tail.sum(-1, keepdim=True).double()
    soft = torch.softmax((spec.code_beta * logits.double()).masked_fill(~in_tail, float("-inf")), dim=-1)
    weights = ((1.0 - spec.code_floor) * soft + spec.code_floor / n) * in_tail
    design = torch.cat([torch.ones_like(rows[:1]), rows], dim=0).double()  # [rank + 2, C]: a free shift, then the rows
    target = (centred - basis[0]).double()
    chunk = max(1, _FIT_CHUNK // design.numel())
    solved = []
    for start in range(0, len(centred), chunk):
        w = weights[start : start + chunk]
        weighted = design.unsqueeze(0) * w.unsqueeze(1)  # [b, rank + 2, C]
        gram = weighted @ design.T
        ridge = 1e-9 * gram.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None] * torch.eye(len(design), dtype=gram.dtype, device=gram.device)
        solved.append(torch.linalg.solve(gram + ridge, (weighted @ target[start : start + chunk].unsqueeze(-1)).squeeze(-1)))
    return torch.cat(solved)[:, 1:].float().round().clamp(-CODE_MAX, CODE_MAX)  # no clip at levels: a rare larger view keeps its code


#: Temperatures at which precompute measures, on its calibration views, how well the code shapes the tail.
CODE_CHECK_TEMPERATURES: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)


def code_shape_error(logits: torch.Tensor, record: "TeacherRecord", temperatures=CODE_CHECK_TEMPERATURES) -> list[float]:
    """How far the code's tail shape is from the teacher's: per temperature, the median over views of the
    total-variation distance between ``softmax_tail(v / T)`` and ``softmax_tail(code logits / T)``.

    ``logits`` are the float32 logits the coded ``record`` was made from. 0 is a perfect shape, 1 a
    disjoint one; the target the loss reads is off by about the tail's mass times this.
    """
    in_tail = tail_mask(record.indices.to(logits.device), logits.shape[-1])
    shape = record.shape_logits().to(logits.device)
    errors = []
    for t in temperatures:
        true = torch.softmax((logits.float() / t).masked_fill(~in_tail, float("-inf")), dim=-1)
        coded = torch.softmax((shape / t).masked_fill(~in_tail, float("-inf")), dim=-1)
        errors.append(float((0.5 * (true - coded).abs().sum(-1)).median()))
    return errors


def code_check(logits: torch.Tensor, k: int, spec: TailSpec, basis: torch.Tensor) -> dict:
    """The manifest's ``tail.code_check`` for calibration ``logits``: :func:`code_shape_error` at
    :data:`CODE_CHECK_TEMPERATURES`, rounded to 4 decimals, and the number of views it is over."""
    record = TeacherRecord.from_logits(logits, k, dataclasses.replace(spec, samples=0), basis=basis)  # the code alone
    return {"temperatures": list(CODE_CHECK_TEMPERATURES), "shape_tv_median": [round(e, 4) for e in code_shape_error(logits, record)],
            "views": len(logits)}


def checked_shape_error(tail: dict, temperature: float) -> float | None:
    """The calibration's shape error at ``temperature`` (linear in log T between the measured ones, the nearest
    outside them), or None where the manifest has no ``code_check``."""
    check = tail.get("code_check")
    if not check:
        return None
    xs = np.log(np.asarray(check["temperatures"], dtype=np.float64))
    return float(np.interp(math.log(temperature), xs, np.asarray(check["shape_tv_median"], dtype=np.float64)))


def make_records(logits: torch.Tensor, k: int, spec: TailSpec = V1_TAIL, *, uniforms=None, basis=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split teacher logits ``[B, C]`` into (values fp16 [B,k+s], indices int64 [B,k+s], tail fp16 [B,width]).

    The k classes are ranked canonically on their stored fp16 values: value descending, then class
    index ascending. Equal fp16 values thus give equal records, whatever order the float32 logits
    happened to come in (thread count, batch size, rank count move their last bits). With a
    sampled tail (``spec.samples`` = s, ``uniforms`` one number in [0, 1) per view, from
    :func:`view_uniforms`), the s sampled classes and their fp16 logits follow the top k, in
    class order, and the tail's last column is the draw's ``ell``.
    """
    logits = logits.float()
    num_classes = logits.shape[-1]
    spec = spec.for_classes(k, num_classes)
    rounded = logits.to(torch.float16)
    indices = torch.sort(rounded, dim=-1, descending=True, stable=True).indices[:, :k]  # stable: ties by index
    values16 = rounded.gather(-1, indices)
    masked = logits.scatter(-1, indices, float("-inf"))
    top1 = values16[:, :1].float()
    tail = []
    for beta in spec.betas:
        lse = torch.logsumexp(beta * masked, dim=-1, keepdim=True) if k < num_classes else torch.full_like(top1, float("-inf"))
        tail.append(lse - beta * top1)
    tail16 = torch.cat(tail, dim=-1).to(torch.float16)
    if spec.samples:
        if uniforms is None:
            raise ValueError("a sampled tail needs one uniform per view (view_uniforms(seed, epoch, sample_ids))")
        ell, chosen = _draw_tail(rounded, indices, spec, torch.as_tensor(np.asarray(uniforms, dtype=np.float64)))
        values16 = torch.cat([values16, rounded.gather(-1, chosen)], dim=-1)
        indices = torch.cat([indices, chosen], dim=-1)
        tail16 = torch.cat([tail16, ell.unsqueeze(-1).to(tail16.device)], dim=-1)
    if spec.rank:
        if basis is None or tuple(basis.shape) != (spec.rank + 1, num_classes):
            raise ValueError(f"a rank-{spec.rank} tail code needs a basis of shape ({spec.rank + 1}, {num_classes})")
        tail16 = torch.cat([tail16, tail_code(logits, basis, spec, indices[:, :k]).to(torch.float16)], dim=-1)
    return values16, indices, tail16


def _inclusion(offsets: torch.Tensor, ell: torch.Tensor, spec: TailSpec, n: int) -> torch.Tensor:
    """pi = min(1, exp(ell + beta_pi * offsets) + eps * s / n) in float32; ``offsets`` = v16_c - v16_top1 (<= 0)."""
    floor = spec.uniform_share * spec.samples / n
    return torch.clamp(torch.exp(ell.float().unsqueeze(-1) + spec.proposal_beta * offsets.float()) + floor, max=1.0)


def _draw_tail(rounded: torch.Tensor, top: torch.Tensor, spec: TailSpec, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ell fp16 [B], sampled class indices [B, s]) by systematic sampling over the tail in class order (on the CPU, float64)."""
    rounded = rounded.cpu()
    top = top.cpu()
    batch, num_classes = rounded.shape
    n = num_classes - top.shape[-1]
    s = spec.samples
    offsets = rounded.float() - rounded.gather(-1, top[:, :1]).float()
    in_tail = tail_mask(top, num_classes)
    floor = spec.uniform_share * s / n
    scaled = (spec.proposal_beta * offsets).double()
    lo = torch.full((batch,), -200.0, dtype=torch.float64)
    hi = torch.full((batch,), 200.0, dtype=torch.float64)
    for _ in range(64):  # the ell whose inclusion probabilities sum to s over the tail
        mid = (lo + hi) / 2
        total = torch.where(in_tail, torch.clamp(torch.exp(mid.unsqueeze(-1) + scaled) + floor, max=1.0), 0.0).sum(-1)
        big = total > s
        hi = torch.where(big, mid, hi)
        lo = torch.where(big, lo, mid)
    ell = lo.to(torch.float16)
    ell = torch.where(ell.double() > lo, torch.nextafter(ell, torch.tensor(float("-inf"), dtype=torch.float16)), ell)  # round down: sum <= s
    pi = torch.where(in_tail, _inclusion(offsets, ell, spec, n), 0.0).double()
    edges = pi.cumsum(-1)
    points = uniforms.double().unsqueeze(-1) + torch.arange(s, dtype=torch.float64)
    position = torch.searchsorted(edges, points, right=True)
    short = position >= num_classes  # the draw came out one short: pad with the top-1 class (weight 0)
    chosen = torch.where(short, top[:, :1].expand(-1, s), position.clamp(max=num_classes - 1))
    return ell, chosen.to(top.device)


def log_weights(values, indices, tail, sampled_values, sampled_indices, num_classes: int, spec: TailSpec) -> torch.Tensor:
    """``-log pi_c`` of each sampled class (pi_c its exact inclusion probability), -inf (weight 0) for pads: ``[B, s]``."""
    n = num_classes - values.shape[-1]
    offsets = sampled_values.float() - values[:, :1].float()
    pi = _inclusion(offsets, tail[:, len(spec.betas)], spec, n)
    pad = sampled_indices.long() == indices[:, :1].long()
    return torch.where(pad, float("-inf"), -pi.log())


def tail_log_mass(values: torch.Tensor, tail: torch.Tensor, num_classes: int, beta, spec: TailSpec = V1_TAIL) -> torch.Tensor:
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
    log_n = math.log(n)
    upper = log_n + beta * values[:, -1]
    if spec.betas == TAIL_BETAS:  # the format-v1 summary: one quadratic through L(0), L(1), L(0.25)
        b1, b2 = TAIL_BETAS
        anchor1 = tail[:, 0].float() + b1 * top1
        anchor2 = tail[:, 1].float() + b2 * top1
        slope1 = (anchor1 - log_n) / b1
        slope2 = (anchor2 - log_n) / b2
        curvature = ((slope1 - slope2) / (b1 - b2)).clamp_min(0.0)
        linear = slope1 - curvature * b1
        estimate = log_n + linear * beta + curvature * beta * beta
        return torch.minimum(estimate, upper)
    # more anchors: the quadratic through the three known points nearest beta (L(0) = log n among them)
    xs, ys = _anchors(values, tail, spec, n)
    return torch.minimum(_piecewise_quadratic(xs, ys, beta), upper)


def _anchors(values: torch.Tensor, tail: torch.Tensor, spec: TailSpec, n: int) -> tuple[list[float], list[torch.Tensor]]:
    """The known points (beta, L(beta)) of each record, in increasing beta: (0, log n) and the stored anchors."""
    top1 = values[:, 0].float()
    order = sorted(range(len(spec.betas)), key=lambda j: spec.betas[j])
    xs = [0.0] + [spec.betas[j] for j in order]
    ys = [torch.full_like(top1, math.log(n))] + [tail[:, j].float() + spec.betas[j] * top1 for j in order]
    return xs, ys


def _piecewise_quadratic(xs: list[float], ys: list[torch.Tensor], beta: torch.Tensor) -> torch.Tensor:
    """The quadratic through the three known points nearest beta (curvature clipped at 0: L is convex)."""
    estimate = None
    for first in range(len(xs) - 2):
        x0, x1, x2 = xs[first : first + 3]
        y0, y1, y2 = ys[first : first + 3]
        d01 = (y1 - y0) / (x1 - x0)
        d12 = (y2 - y1) / (x2 - x1)
        curvature = ((d12 - d01) / (x2 - x0)).clamp_min(0.0)
        piece = y0 + d01 * (beta - x0) + curvature * (beta - x0) * (beta - x1)
        estimate = piece if estimate is None else torch.where(beta > xs[first + 1], piece, estimate)  # hand over mid-triple
    return estimate


def coded_tail_log_mass(record: "TeacherRecord", beta) -> torch.Tensor:
    """L(beta) of a record with a tail code: the code's own log-mass, corrected through the exact anchors.

    ``L_code(beta) = logsumexp_tail(beta * code_logits)`` has the tail's shape at every beta and is
    log n at 0, as L is; the correction ``L - L_code``, exact at the anchors and 0 at 0, is smooth
    and small where the code is good, so its piecewise quadratic is far closer than L's own.
    """
    values, tail, spec = record.values.float(), record.tail, record.spec
    n = record.num_classes - record.k
    beta = torch.as_tensor(beta, dtype=torch.float32, device=values.device)
    if beta.dim() == 2:
        beta = beta.squeeze(-1)
    top = ~tail_mask(record.indices.to(values.device), record.num_classes)
    shape = record.shape_logits().masked_fill(top, float("-inf"))
    shape = (shape - shape.max(-1, keepdim=True).values).masked_fill(top, 0.0)  # known up to a shift per view
    outside = torch.zeros_like(shape).masked_fill(top, float("-inf"))  # added after the product: finite gradients in beta

    def code_mass(b) -> torch.Tensor:  # b: a number, or one per view
        b = torch.as_tensor(b, dtype=torch.float32, device=shape.device).reshape(-1, 1)
        return torch.logsumexp(b * shape + outside, dim=-1)

    xs, ys = _anchors(values, tail, spec, n)
    residuals = [torch.zeros_like(ys[0])] + [y - code_mass(x) for x, y in zip(xs[1:], ys[1:])]
    estimate = code_mass(beta) + _piecewise_quadratic(xs, residuals, beta)
    return torch.minimum(estimate, math.log(n) + beta * values[:, -1])


def teacher_log_probs(values: torch.Tensor, tail: torch.Tensor, num_classes: int, temperature, spec: TailSpec = V1_TAIL) -> torch.Tensor:
    """Log-probabilities ``[B, k+1]`` of the tempered teacher: the k stored classes, then the tail bucket.

    ``temperature`` is a float or a tensor broadcastable to ``[B, 1]``. With k = C the last
    column is -inf (the tail is empty) and the first k equal ``log_softmax(v / T)`` exactly.
    """
    return _bucket_log_probs(values, temperature, lambda beta: tail_log_mass(values, tail, num_classes, beta, spec))


def _bucket_log_probs(values: torch.Tensor, temperature, log_tail_mass) -> torch.Tensor:
    """``[B, k+1]``: the stored classes at ``temperature`` and the tail bucket, ``log_tail_mass(beta)`` ``[B]``, normalised."""
    temperature = torch.as_tensor(temperature, dtype=torch.float32, device=values.device)
    if temperature.dim() == 1:
        temperature = temperature.unsqueeze(-1)
    scaled = values.float() / temperature
    beta = (1.0 / temperature).expand(values.shape[0], 1).squeeze(-1)
    joint = torch.cat([scaled, log_tail_mass(beta).unsqueeze(-1)], dim=-1)
    return joint - torch.logsumexp(joint, dim=-1, keepdim=True)


def dense_log_probs(
    values: torch.Tensor, indices: torch.Tensor, tail: torch.Tensor, num_classes: int, temperature, spec: TailSpec = V1_TAIL
) -> torch.Tensor:
    """A full ``[B, C]`` log-distribution: stored classes exact, the tail mass spread evenly over the rest."""
    return _spread(teacher_log_probs(values, tail, num_classes, temperature, spec), indices, num_classes)


def _spread(bucket: torch.Tensor, indices: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[B, C]`` from ``[B, k+1]`` bucket log-probabilities: the k stored classes in place, the tail's mass spread evenly."""
    k = indices.shape[-1]
    n = num_classes - k
    spread = bucket[:, -1:] - (math.log(n) if n else 0.0)
    dense = spread.expand(bucket.shape[0], num_classes).clone()
    return dense.scatter(-1, indices.long(), bucket[:, :k])
