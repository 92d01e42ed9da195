"""kdcache's distillation losses on each record kind against the official implementations of the methods.

    python benchmarks/official.py [--reference DIR] [--views 256] [--calibration 4096] [--quick] [--json PATH]

For each teacher, loss setting and student this prints the relative error of kdcache's loss value
and of its gradient for the student's logits (relative L2 over the whole batch ``[B, C]``) against
the official function of the method, on three record kinds:

- ``full``: every logit (``--topk full``, k = C), read as the bucket (the same as estimated at k = C);
- ``top-10 bucket``: the format-version-1 record (``TeacherRecord.from_logits(logits, 10)``, ``tail="bucket"``);
- ``default record``: the top 10 plus the tail code of :data:`kdcache.record.DEFAULT_TAIL`, whose basis
  is fitted on separate calibration views of the same teacher (``tail="estimated"``).

The official functions are below, one per method, written from their repositories' code (each
names the file it follows and its reduction): KD against timm's ``LogitDistillationTask`` and
RepDistiller's ``DistillKL``, TTM and WTTM against zkxufo/TTM. They get the teacher's full logits
after fp16 rounding (as a cache stores them), so a record's error here is the record's alone.

What is compared: the distillation term, through kdcache's own entry point
(:func:`kdcache.losses.compute_loss` with a :class:`~kdcache.losses.LossConfig`, as train-student
calls it). Both sides leave the cross-entropy out: for KD ``alpha = 1`` (ours is
``(1 - alpha) CE + alpha T^2 KL``; timm's and RepDistiller's weigh CE and KD independently and the
KD term alone is ``T^2 KL``, batch mean); for TTM and WTTM ``beta = 1`` and a zero soft target, whose
cross-entropy is 0 exactly (ours is ``CE + beta * term``; zkxufo's training loop adds
``r * CE + a * added term + b * term``, its README's TTM run ``-r 1 -a 0``, so their ``b`` is our
``beta``). The terms are then the same quantity on both sides:
``T^2 * mean_i KL(softmax(v_i/T) || softmax(z_i/T))`` for KD, ``mean_i KL(softmax(v_i)^g / U_i ||
softmax(z_i))`` for TTM and ``mean_i U_i * KL_i`` for WTTM, ``U_i = sum_c softmax(v_i)_c^g``.

Teachers (C = 1000):

- ``structured r16-32`` (three teachers) and ``structured r64`` (one): low-rank teachers,
  ``logits = features @ head`` with features of rank 16, 32 or 64 plus full-rank noise of a tenth of
  their scale, each view scaled so that its top-10 mass at T = 1 is drawn uniformly from [0.5, 0.99]
  (:func:`structured_logits`); 256 measured views, the code's basis fitted on 4,096 other views of
  the same head. The default code has rank 40: the first group lies within it, the second does not.
  Cells give the minimum and maximum over a group's teachers.
- ``logits.py``: benchmarks/logits.py's synthetic teacher, whose tail is independent noise per view
  (the case no code can carry); calibration and measured views are different samples.
- ``--reference DIR``: a trained teacher's logits (``logits.npy`` from benchmarks/tuples.py): the basis
  on the first half of the views, 256 views of the second half measured.

Students: ``random`` (Gaussian logits, std 2) and ``fitted`` (0.65 times the teacher's logits plus
Gaussian noise of std 0.1). The last column is the official function's own float32 error (against
itself in float64), the floor a full record can reach. ``--quick``: one structured teacher at C = 200,
64 views, 1,024 calibration views (seconds; tests/test_official.py runs it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from logits import synthetic_logits  # noqa: E402
from records import Kind, build, compressed_bytes  # noqa: E402

from kdcache.losses import LossConfig, compute_loss  # noqa: E402
from kdcache.record import DEFAULT_TAIL, V1_TAIL, fit_tail_basis  # noqa: E402

# ---------------------------------------------------------------------------------------------
# The official implementations (the same formula, reduction and order of operations; own code)
# ---------------------------------------------------------------------------------------------


def kd_timm(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """timm, huggingface/pytorch-image-models ``timm/task/distillation.py``, ``LogitDistillationTask.forward``.

    Both sides as log-probabilities at T (``kl_div(..., log_target=True)``), reduction ``batchmean``
    (summed over classes and views, divided by the batch size), times ``T^2``.
    """
    student_log = F.log_softmax(student / temperature, dim=-1)
    teacher_log = F.log_softmax(teacher / temperature, dim=-1)
    return F.kl_div(student_log, teacher_log, reduction="batchmean", log_target=True) * temperature**2


def kd_repdistiller(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """RepDistiller, HobbitLong/RepDistiller ``distiller_zoo/KD.py``, ``DistillKL`` (zkxufo/TTM's ``kd.py`` is the same).

    The teacher as probabilities at T, reduction ``sum`` (its ``size_average=False``), times ``T^2``,
    divided by the batch size.
    """
    student_log = F.log_softmax(student / temperature, dim=-1)
    teacher_p = F.softmax(teacher / temperature, dim=-1)
    return F.kl_div(student_log, teacher_p, reduction="sum") * temperature**2 / student.shape[0]


def _transformed_teacher(teacher: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(the power-transformed teacher ``softmax(v)^gamma / U``, its power sum ``U`` per view), as zkxufo/TTM forms them."""
    powered = torch.softmax(teacher, dim=-1).pow(gamma)
    power_sum = powered.sum(-1)
    return powered / power_sum.unsqueeze(-1), power_sum


def ttm_zkxufo(student: torch.Tensor, teacher: torch.Tensor, gamma: float) -> torch.Tensor:
    """TTM, zkxufo/TTM ``distiller_zoo/ttm.py`` (``TTM(l)``, our gamma is its ``l``).

    Target: ``softmax(v)^l`` renormalised by its sum; per-view KL from ``kl_div(..., reduction='none')``
    summed over classes; mean over the batch. The student has no temperature, there is no ``T^2``.
    """
    target, _ = _transformed_teacher(teacher, gamma)
    per_view = F.kl_div(F.log_softmax(student, dim=-1), target, reduction="none").sum(-1)
    return per_view.mean()


def wttm_zkxufo(student: torch.Tensor, teacher: torch.Tensor, gamma: float) -> torch.Tensor:
    """WTTM, zkxufo/TTM ``distiller_zoo/wttm.py`` (``WTTM(l)``).

    TTM's per-view KL weighted by the power sum ``U = sum_c softmax(v)_c^l`` (the renormaliser itself,
    not divided by anything, from the teacher's logits, which its training loop computes under
    ``no_grad``), then the mean over the batch.
    """
    target, power_sum = _transformed_teacher(teacher, gamma)
    per_view = F.kl_div(F.log_softmax(student, dim=-1), target, reduction="none").sum(-1)
    return (power_sum * per_view).mean()


#: loss -> {official implementation: function(student, teacher, hyper-parameter)}
OFFICIAL = {
    "kd": {"timm": kd_timm, "RepDistiller": kd_repdistiller},
    "ttm": {"zkxufo/TTM": ttm_zkxufo},
    "wttm": {"zkxufo/TTM": wttm_zkxufo},
}
#: (loss, T for KD or gamma for TTM/WTTM)
SETTINGS = [("kd", 1.0), ("kd", 4.0), ("ttm", 0.1), ("ttm", 0.25), ("wttm", 0.8), ("wttm", 0.25)]


def setting_label(setting: tuple[str, float]) -> str:
    name, value = setting
    return f"KD T={value:g}" if name == "kd" else f"{name.upper()} γ={value:g}"


# ---------------------------------------------------------------------------------------------
# kdcache's side
# ---------------------------------------------------------------------------------------------


def kdcache_term(student: torch.Tensor, record, setting: tuple[str, float], tail: str) -> torch.Tensor:
    """The distillation term of kdcache's loss, through :func:`compute_loss` with its cross-entropy at 0 (module docstring)."""
    name, value = setting
    zero_target = torch.zeros_like(student)  # a soft target of zeros: CE = -sum 0 * log q = 0, gradient 0
    if name == "kd":
        config = LossConfig(name="kd", alpha=1.0, temperature=value, tail=tail)
    else:
        config = LossConfig(name=name, beta=1.0, gamma=value, tail=tail)
    return compute_loss(config, student, record, zero_target)


def value_and_grad(loss_of, student: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, d loss / d student logits ``[B, C]``), both float64 for the comparison."""
    z = student.detach().clone().requires_grad_(True)
    loss = loss_of(z)
    (grad,) = torch.autograd.grad(loss, z)
    return loss.detach().double(), grad.double()


def relative_errors(got: tuple[torch.Tensor, torch.Tensor], ref: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float]:
    """(|loss - loss_ref| / |loss_ref|, ||grad - grad_ref|| / ||grad_ref||)."""
    loss_err = (got[0] - ref[0]).abs() / ref[0].abs().clamp_min(1e-300)
    grad_err = (got[1] - ref[1]).norm() / ref[1].norm().clamp_min(1e-300)
    return float(loss_err), float(grad_err)


# ---------------------------------------------------------------------------------------------
# Teachers
# ---------------------------------------------------------------------------------------------


def top_mass(logits: np.ndarray, k: int = 10, temperature: float = 1.0) -> np.ndarray:
    """Each view's softmax mass on its k largest logits at T: ``[N]`` (float64)."""
    x = logits.astype(np.float64) / temperature
    x = x - x.max(-1, keepdims=True)
    top = -np.sort(-x, axis=-1)[:, :k]
    return np.exp(top).sum(-1) / np.exp(x).sum(-1)


def _scale_for_mass(unit: np.ndarray, mass: np.ndarray, k: int) -> np.ndarray:
    """Per view, the scale s with top-k mass of ``softmax(s * unit)`` equal to ``mass`` (it grows with s), by bisection."""
    centred = unit - unit.max(-1, keepdims=True)  # a positive scale keeps the order: the top k are found once
    top = -np.sort(-centred, axis=-1)[:, :k]
    lo = np.full(len(unit), -6.0)
    hi = np.full(len(unit), 6.0)  # log s
    for _ in range(60):
        mid = (lo + hi) / 2
        s = np.exp(mid)[:, None]
        big = np.exp(s * top).sum(-1) / np.exp(s * centred).sum(-1) > mass
        hi = np.where(big, mid, hi)
        lo = np.where(big, lo, mid)
    return np.exp((lo + hi) / 2)


def structured_logits(num_views: int, num_classes: int, *, rank: int, seed: int, split: int,
                      noise: float = 0.1, mass_range: tuple[float, float] = (0.5, 0.99)) -> np.ndarray:
    """A low-rank teacher's logits, float32 ``[views, C]``.

    ``features @ head`` with Gaussian features of ``rank`` and a Gaussian head (drawn from ``seed``
    alone, so every ``split`` of one seed is the same teacher on other views), plus full-rank noise
    of ``noise`` times the structured part's scale; each view standardised, then scaled so that its
    top-10 mass at T = 1 is drawn uniformly from ``mass_range``, then shifted by a Gaussian offset
    (softmax ignores it; fp16 rounding does not).
    """
    head = np.random.default_rng([seed, 0]).normal(size=(rank, num_classes))
    rng = np.random.default_rng([seed, 1 + split])
    raw = rng.normal(size=(num_views, rank)) @ head / math.sqrt(rank)
    raw = raw + noise * rng.normal(size=raw.shape)
    raw = (raw - raw.mean(-1, keepdims=True)) / raw.std(-1, keepdims=True)
    scale = _scale_for_mass(raw, rng.uniform(*mass_range, size=num_views), 10)
    return (raw * scale[:, None] + rng.normal(0.0, 1.5, size=(num_views, 1))).astype(np.float32)


#: The structured teachers of the full run, by group: (seed, rank) each. The default record's code has rank 40
#: (DEFAULT_TAIL): the first group lies within it, the second does not. The quick run measures (1, 32) at C = 200.
STRUCTURED = {"structured r16-32": ((0, 16), (1, 32), (2, 32)), "structured r64": ((3, 64),)}
QUICK_TEACHER = (1, 32)


def fp16(logits) -> torch.Tensor:
    """Teacher logits as a cache stores them: rounded to fp16, computed on in float32."""
    return torch.as_tensor(np.asarray(logits, dtype=np.float32)).half().float()


def teachers(args) -> list[dict]:
    """Each teacher: name, group, calibration logits (for the code's basis) and measured logits, both fp16-rounded."""
    out = []
    classes = 200 if args.quick else 1000
    groups = {f"structured r{QUICK_TEACHER[1]}": (QUICK_TEACHER,)} if args.quick else STRUCTURED
    for group, members in groups.items():
        for seed, rank in members:
            calib = structured_logits(args.calibration, classes, rank=rank, seed=seed, split=0)
            test = structured_logits(args.views, classes, rank=rank, seed=seed, split=1)
            out.append(dict(name=f"structured rank {rank} seed {seed} (C={classes})", group=group,
                            calibration=fp16(calib), logits=fp16(test)))
    if args.quick:
        return out
    noisy = synthetic_logits(args.calibration + args.views, classes, seed=7)[0]
    out.append(dict(name=f"logits.py (C={classes})", group="logits.py",
                    calibration=fp16(noisy[: args.calibration]), logits=fp16(noisy[args.calibration :])))
    if args.reference is not None:
        path = args.reference / "logits.npy"
        if not path.is_file():
            sys.exit(f"official: {path} not found; expected benchmarks/tuples.py's reference logits (float32 [N, C])")
        logits = np.load(path)
        half = len(logits) // 2
        if len(logits) - half < args.views:
            sys.exit(f"official: {path} has {len(logits)} views; {args.views} measured views need {2 * args.views}")
        name = args.reference.name.removeprefix("reference-") + " teacher"  # benchmarks/tuples.py: reference-triples, -pairs
        out.append(dict(name=f"{name} (C={logits.shape[1]})", group=name,
                        calibration=fp16(logits[:half]), logits=fp16(logits[half : half + args.views])))
    return out


def students(logits: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """The student logits the losses are measured at: random, and near the teacher's at 0.65 of its scale."""
    g = torch.Generator().manual_seed(seed)
    return {"random": 2.0 * torch.randn(logits.shape, generator=g),
            "fitted": 0.65 * logits + 0.1 * torch.randn(logits.shape, generator=g)}


# ---------------------------------------------------------------------------------------------
# The measurement
# ---------------------------------------------------------------------------------------------


def record_kinds(num_classes: int) -> list[Kind]:
    return [Kind("full", num_classes), Kind("top-10 bucket", 10, V1_TAIL, "bucket"),
            Kind("default record", 10, DEFAULT_TAIL, "estimated")]


def measure(teacher: dict, seed: int = 0) -> tuple[list[dict], dict]:
    """(one row per setting x official x student, with each record kind's errors in it; a description of the teacher)."""
    logits, calibration = teacher["logits"], teacher["calibration"]
    num_classes = logits.shape[-1]
    basis = fit_tail_basis(calibration, DEFAULT_TAIL.rank, DEFAULT_TAIL.code_levels)
    kinds = record_kinds(num_classes)
    built = {kind.name: build(kind, logits, basis if kind.spec.rank else None, 0) for kind in kinds}
    info = {"teacher": teacher["name"], "group": teacher["group"], "C": num_classes, "views": len(logits),
            "calibration_views": len(calibration),
            "top10_mass_T1": [float(q) for q in np.quantile(top_mass(logits.numpy()), (0, 0.5, 1))],
            "top10_mass_T4": [float(q) for q in np.quantile(top_mass(logits.numpy(), temperature=4.0), (0, 0.5, 1))],
            "bytes_per_view": {name: compressed_bytes(arrays) for name, (_, _, arrays) in built.items()}}
    rows = []
    for student_name, student in students(logits, seed).items():
        for setting in SETTINGS:
            name, value = setting
            ours = {kind.name: value_and_grad(lambda z, r=built[kind.name][0], t=kind.tail: kdcache_term(z, r, setting, t), student)
                    for kind in kinds}
            for official, function in OFFICIAL[name].items():
                ref = value_and_grad(lambda z: function(z, logits, value), student)
                exact = value_and_grad(lambda z: function(z.double(), logits.double(), value), student)
                row = {"teacher": teacher["name"], "group": teacher["group"], "loss": name, "value": value,
                       "setting": setting_label(setting), "official": official, "student": student_name,
                       "official loss": float(ref[0])}
                row["official float32"] = dict(zip(("loss", "grad"), relative_errors(ref, exact)))
                for kind in kinds:
                    row[kind.name] = dict(zip(("loss", "grad"), relative_errors(ours[kind.name], ref)))
                rows.append(row)
    return rows, info


def _number(x: float) -> str:
    return f"{x:.2g}".replace("e-0", "e-")


def _span(values: list[float]) -> str:
    lo, hi = _number(min(values)), _number(max(values))
    return lo if lo == hi else f"{lo}–{hi}"


def table(rows: list[dict]) -> str:
    """Markdown: one row per teacher group x setting x student; each cell 'loss err/grad err', min-max over the group's
    teachers (KD: over timm and RepDistiller too)."""
    columns = [kind.name for kind in record_kinds(1000)] + ["official float32"]
    lines = ["| teacher | setting | student | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 3)]
    keys = []
    for row in rows:
        key = (row["group"], row["setting"], row["student"])
        if key not in keys:
            keys.append(key)
    for group, setting, student in keys:
        chosen = [r for r in rows if (r["group"], r["setting"], r["student"]) == (group, setting, student)]
        cells = [f"{_span([r[c]['loss'] for r in chosen])}/{_span([r[c]['grad'] for r in chosen])}" for c in columns]
        lines.append(f"| {group} | {setting} | {student} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(args) -> dict:
    """Every teacher measured: {"rows", "teachers", "seconds", "threads", ...} (what ``--json`` writes)."""
    start = time.perf_counter()
    rows, infos = [], []
    for i, teacher in enumerate(teachers(args)):
        got, info = measure(teacher, seed=i)
        rows += got
        infos.append(info)
        print(f"  {info['teacher']}: top-10 mass at T=1 {info['top10_mass_T1'][0]:.2f}-{info['top10_mass_T1'][2]:.2f} "
              f"(median {info['top10_mass_T1'][1]:.2f}), {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return {"rows": rows, "teachers": infos, "settings": [list(s) for s in SETTINGS], "quick": args.quick,
            "views": args.views, "calibration": args.calibration, "threads": torch.get_num_threads(),
            "seconds": time.perf_counter() - start}


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", type=Path, help="a directory with benchmarks/tuples.py's logits.npy (float32 [N, C])")
    parser.add_argument("--views", type=int, default=None, help="measured views per teacher (default 256; quick 64)")
    parser.add_argument("--calibration", type=int, default=None, help="views the code's basis is fitted on (default 4096; quick 1024)")
    parser.add_argument("--quick", action="store_true", help="one structured teacher at C = 200, 64 views (seconds)")
    parser.add_argument("--json", type=Path, help="write the rows and the teachers' description here")
    args = parser.parse_args(argv)
    args.views = args.views or (64 if args.quick else 256)
    args.calibration = args.calibration or (1024 if args.quick else 4096)
    if args.quick and args.reference is not None:
        parser.error("--quick measures one synthetic teacher only; leave out --reference")
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    torch.set_num_threads(1)
    result = run(args)
    classes = sorted({t["C"] for t in result["teachers"]})
    print(f"\nRelative error of kdcache's distillation term against the official implementations, 'loss/gradient' "
          f"(C = {', '.join(map(str, classes))}, {result['views']} views per teacher; min-max over a group's teachers and, "
          f"for KD, over timm and RepDistiller; TTM and WTTM against zkxufo/TTM; the last column is the official "
          f"function's own float32 error; {result['seconds']:.0f} s on {result['threads']} thread):\n")
    print(table(result["rows"]))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
