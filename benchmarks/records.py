"""The record frontier: bytes per view against the error of each distillation loss, per record kind.

    python benchmarks/records.py [--reference DIR] [--views 1024] [--draws 16] [--quick] [--plot PNG]

For each record kind and size (top k, sampled tail classes s, tail code rank r, quantised full
logits) this prints the compressed bytes per view of its record arrays (the cache's own codec,
blosc zstd 9 with byte shuffle, in chunks of 1024 views), and the error of each loss against the
teacher's full record (every logit, in fp16, as ``--topk full`` stores it; fp16 itself costs far less,
docs/methods.md):

- KD at T in {1, 2, 4, 8}; TTM and WTTM at gamma in {0.1, 0.25, 0.5, 0.8};
- MKD: the gradient of the KD term for the teacher's and the student's temperature at T in {1, 4};
- per view: the relative L2 error of the loss's gradient for the student's logits;
- per batch: the relative L2 error of a linear student's weight gradient over 256 views (features
  of the teacher where ``--reference`` gives them, else Gaussian), for a student at its
  initialisation (``init``) and one that has learnt the teacher's logits at 0.65 of their scale
  (``fitted``: 0.65 times the least-squares fit, so that its outputs resemble the teacher's targets
  without equalling any of them: on the trained teacher's own features the full fit is the teacher
  itself, and at 0.5 it would equal TTM's target at gamma 0.5, where the full gradient vanishes).

Errors of a kind that draws classes are the root mean square over ``--draws`` independent draws
(bias and spread together); ``bias`` columns give the error of the mean over the draws. The
logits are the trained Fashion-MNIST-triples teacher's (``--reference``, from
benchmarks/tuples.py) and benchmarks/logits.py's synthetic ones (C = 1000 and C = 100). The tail
code's basis is fitted on the first half of the views and evaluated on the second.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numcodecs import Blosc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from logits import synthetic_logits  # noqa: E402

from kdcache.losses import distillation_kl, log_power_sum
from kdcache.record import DEFAULT_TAIL, TAIL_BETAS, TailSpec, TeacherRecord, fit_tail_basis, make_records

SETTINGS = [("kd", 1.0), ("kd", 2.0), ("kd", 4.0), ("kd", 8.0),
            ("ttm", 0.1), ("ttm", 0.25), ("ttm", 0.5), ("ttm", 0.8),
            ("wttm", 0.1), ("wttm", 0.25), ("wttm", 0.5), ("wttm", 0.8)]
MKD_TEMPERATURES = (1.0, 4.0)
CHUNK = 1024


@dataclass(frozen=True)
class Kind:
    """One record kind: top k, a tail spec (sampled classes, code rank, anchors), how the KL reads it."""

    name: str
    k: int
    spec: TailSpec = TailSpec()
    tail: str = "bucket"
    bits: int = 0  # > 0: every logit, quantised to this many bits per view (k is then C)

    @property
    def random(self) -> bool:
        return bool(self.spec.samples)


def kinds(num_classes: int, quick: bool) -> list[Kind]:
    """The record kinds of the frontier. ``code rR`` is the plain projection in 127 levels (the first
    version-2 default was r20); ``weighted code rR`` the default's fit (weights at T = 2, 5% floor, 31
    levels); the default record itself is marked."""
    anchors = (1.0, 0.5, 0.25)
    out = [Kind("full fp16", num_classes), Kind("top-10 bucket", 10), Kind("top-10 uniform", 10, tail="uniform"),
           Kind("quantised 8-bit", num_classes, bits=8), Kind("quantised 4-bit", num_classes, bits=4)]
    samples = (5, 10) if quick else (5, 10, 20)
    ranks = (8,) if quick else (8, 16, 20, 24)
    weighted = (8,) if quick else (16, 24, 32, 40, 48)
    for s in samples:
        out.append(Kind(f"top-10 + {s} sampled", 10, TailSpec(betas=anchors, samples=s), "estimated"))
    for r in ranks:
        if 2 * r < num_classes - 10:
            out.append(Kind(f"top-10 + code r{r}", 10, TailSpec(betas=anchors, rank=r), "estimated"))
    for r in weighted:
        if 2 * r < num_classes - 10:
            name = f"top-10 + weighted code r{r}" + (" (default)" if r == DEFAULT_TAIL.rank else "")
            out.append(Kind(name, 10, dataclasses.replace(DEFAULT_TAIL, rank=r), "estimated"))
    for r, s in ((8, 10), (16, 5)) if not quick else ((8, 5),):
        out.append(Kind(f"top-10 + code r{r} + {s} sampled", 10, TailSpec(betas=anchors, rank=r, samples=s), "estimated"))
    return out


def quantise(logits: torch.Tensor, bits: int) -> tuple[torch.Tensor, np.ndarray]:
    """Every logit on a per-view affine grid of 2^bits levels: (dequantised float32, the stored codes with scale/offset)."""
    low = logits.min(-1, keepdim=True).values
    high = logits.max(-1, keepdim=True).values
    levels = 2**bits - 1
    scale = ((high - low) / levels).clamp_min(1e-6).half().float()
    low = low.half().float()
    codes = torch.round((logits - low) / scale).clamp(0, levels)
    packed = codes.to(torch.uint8).numpy()
    if bits == 4:
        packed = (packed[:, 0::2] << 4) | np.pad(packed[:, 1::2], ((0, 0), (0, packed.shape[1] % 2)))
    return low + codes * scale, packed


def compressed_bytes(arrays: list[np.ndarray]) -> float:
    """Bytes per view of record arrays compressed as the cache compresses them (chunks of CHUNK views)."""
    total = 0
    views = arrays[0].shape[0]
    for array in arrays:
        codec = Blosc(cname="zstd", clevel=9, shuffle=Blosc.SHUFFLE, typesize=array.dtype.itemsize)
        for start in range(0, views, CHUNK):
            total += len(codec.encode(np.ascontiguousarray(array[start : start + CHUNK])))
    return total / views


def index_dtype(num_classes: int):
    return np.uint8 if num_classes <= 256 else np.uint16 if num_classes <= 65536 else np.uint32


def build(kind: Kind, logits: torch.Tensor, basis: torch.Tensor | None, draw: int) -> tuple[TeacherRecord, torch.Tensor, list[np.ndarray]]:
    """(the record, the logits it stands for, its stored arrays) for one draw."""
    num_classes = logits.shape[-1]
    if kind.bits:
        approx, packed = quantise(logits, kind.bits)
        record = TeacherRecord.from_logits(approx, num_classes)
        return record, approx, [packed, np.zeros((len(logits), 2), np.float16)]
    uniforms = np.random.default_rng(1000 + draw).random(len(logits)) if kind.spec.samples else None
    spec_basis = basis if kind.spec.rank else None
    values, indices, tail = make_records(logits, kind.k, kind.spec, uniforms=uniforms, basis=spec_basis)
    spec = kind.spec.for_classes(kind.k, num_classes)
    record = TeacherRecord.from_stored(values, indices, tail, num_classes, spec, k=kind.k, basis=spec_basis)
    return record, logits, [values.numpy(), indices.numpy().astype(index_dtype(num_classes)), tail.numpy()]


def losses(student: torch.Tensor, record: TeacherRecord, tail: str, setting: tuple[str, float]) -> torch.Tensor:
    """Per-view distillation term of one loss setting (no CE: it is exact in every record)."""
    name, value = setting
    if name == "kd":
        return value**2 * distillation_kl(student, record, teacher_temperature=value, student_temperature=value, tail=tail)
    kl = distillation_kl(student, record, teacher_temperature=1.0 / value, student_temperature=1.0, tail=tail)
    if name == "ttm":
        return kl
    return log_power_sum(record, value).exp().detach() * kl


def gradients(record, tail, setting, features, weights):
    """(loss, per-view logit gradients [B, C], weight gradient [D, C]) of the mean distillation term."""
    w = weights.clone().requires_grad_(True)
    z = features @ w
    z.retain_grad()
    loss = losses(z, record, tail, setting).mean()
    loss.backward()
    return loss.detach(), z.grad * len(z), w.grad


def temperature_gradients(record, tail, student, temperature):
    """d(mean KL)/d(T_teacher) and d/d(T_student) at T (MKD's meta-parameters)."""
    t_t = torch.tensor(temperature, requires_grad=True)
    t_s = torch.tensor(temperature, requires_grad=True)
    kl = distillation_kl(student, record, teacher_temperature=t_t, student_temperature=t_s, tail=tail).mean()
    return torch.stack(torch.autograd.grad(kl, [t_t, t_s]))


def relative(errors: list[torch.Tensor], reference: torch.Tensor) -> tuple[float, float]:
    """(rms error, error of the mean) relative to the reference's norm."""
    stack = torch.stack(errors)
    norm = reference.norm().clamp_min(1e-30)
    rms = stack.pow(2).sum(dim=tuple(range(1, stack.dim()))).mean().sqrt() / norm
    return float(rms), float(stack.mean(0).norm() / norm)


def evaluate(name: str, logits: torch.Tensor, features: torch.Tensor, kind_list, draws: int, views: int) -> list[dict]:
    """Every kind against the float32 logits' full record, on ``views`` views after the calibration half."""
    num_classes = logits.shape[-1]
    half = len(logits) // 2
    bases: dict[tuple[int, int], torch.Tensor] = {}  # (rank, levels) -> basis, fitted once on the calibration half
    for kind in kind_list:
        if kind.spec.rank and (kind.spec.rank, kind.spec.code_levels) not in bases:
            bases[kind.spec.rank, kind.spec.code_levels] = fit_tail_basis(logits[:half], kind.spec.rank, kind.spec.code_levels)
    test, feats = logits[half : half + views], features[half : half + views]
    torch.manual_seed(0)
    fit = torch.linalg.lstsq(feats, test - test.mean(-1, keepdim=True)).solution  # the teacher's own head, where the features are its
    students = {"init": torch.randn(feats.shape[1], num_classes) * 0.01, "fitted": 0.65 * fit}
    exact = TeacherRecord.from_logits(test, num_classes)
    rows = []
    for kind in kind_list:
        n_draws = draws if kind.random else 1
        basis = bases.get((kind.spec.rank, kind.spec.code_levels))
        built = [build(kind, test, basis, d) for d in range(n_draws)]
        row = {"data": name, "kind": kind.name, "C": num_classes, "bytes": compressed_bytes(built[0][2])}
        for student_name, weights in students.items():
            for setting in SETTINGS:
                ref_loss, ref_view, ref_w = gradients(exact, "bucket", setting, feats, weights)
                got = [gradients(r, kind.tail, setting, feats, weights) for r, _, _ in built]
                key = f"{setting[0]}{setting[1]:g}/{student_name}"
                row[f"loss {key}"] = relative([g[0] - ref_loss for g in got], ref_loss)[0]
                view_errors = [((g[1] - ref_view).norm(dim=-1) / ref_view.norm(dim=-1).clamp_min(1e-30)) for g in got]
                row[f"view {key}"] = float(torch.stack(view_errors).pow(2).mean().sqrt())
                row[f"batch {key}"], row[f"bias {key}"] = relative([g[2] - ref_w for g in got], ref_w)
            z = feats @ weights
            for temperature in MKD_TEMPERATURES:
                ref = temperature_gradients(exact, "bucket", z, temperature)
                got = [temperature_gradients(r, kind.tail, z, temperature) for r, _, _ in built]
                errors = torch.stack([(g - ref).abs() / ref.abs().clamp_min(1e-30) for g in got])
                row[f"mkd T_t{temperature:g}/{student_name}"] = float(errors[:, 0].pow(2).mean().sqrt())
                row[f"mkd T_s{temperature:g}/{student_name}"] = float(errors[:, 1].pow(2).mean().sqrt())
        rows.append(row)
        print(f"  {name:<22} {kind.name:<30} {row['bytes']:7.1f} B/view  KD T=4 batch err {row['batch kd4/init']:.3f} "
              f"(fitted {row['batch kd4/fitted']:.3f})  WTTM 0.8 {row['batch wttm0.8/init']:.3f}", flush=True)
    return rows


def table(rows: list[dict], student: str) -> str:
    """A markdown table: bytes and the batch weight-gradient error per setting (relative, rms over draws)."""
    columns = [f"{n}{v:g}" for n, v in SETTINGS]
    head = "| data | record | B/view | " + " | ".join(c.replace("kd", "KD T=").replace("wttm", "WTTM γ=").replace("ttm", "TTM γ=")
                                                   for c in columns) + " | MKD ∂T_t (T=4) |"
    lines = [head, "|" + "---|" * (len(columns) + 4)]
    for row in rows:
        cells = [f"{row[f'batch {c}/{student}']:.3f}" for c in columns]
        lines.append(f"| {row['data']} | {row['kind']} | {row['bytes']:.1f} | " + " | ".join(cells)
                     + f" | {row[f'mkd T_t4/{student}']:.3f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [("kd4", "KD T=4"), ("ttm0.25", "TTM γ=0.25"), ("wttm0.8", "WTTM γ=0.8")]
    datas = sorted({r["data"] for r in rows})
    fig, axes = plt.subplots(len(datas), len(settings), figsize=(4.2 * len(settings), 3.4 * len(datas)), squeeze=False)
    for i, data in enumerate(datas):
        for j, (key, title) in enumerate(settings):
            ax = axes[i][j]
            for row in (r for r in rows if r["data"] == data):
                for student, marker in (("init", "o"), ("fitted", "x")):
                    ax.scatter(row["bytes"], max(row[f"batch {key}/{student}"], 1e-5), marker=marker,
                               color="C0" if student == "init" else "C3")
                ax.annotate(row["kind"].replace("top-10 ", ""), (row["bytes"], max(row[f"batch {key}/init"], 1e-5)),
                            fontsize=6, alpha=0.8)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.axhline(0.05, color="grey", lw=0.6, ls="--")
            ax.set_title(f"{data}: {title}", fontsize=9)
            ax.set_xlabel("bytes per view (records, compressed)")
            ax.set_ylabel("weight-gradient error (rel.)")
    fig.suptitle("Record frontier: o student at init, x fitted student; dashed: 5%", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", type=Path, help="a directory of benchmarks/tuples.py's reference logits and features")
    parser.add_argument("--views", type=int, default=1024, help="views evaluated per data set (after the calibration half)")
    parser.add_argument("--draws", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="fewer kinds, 256 views, 4 draws, synthetic C = 100 only")
    parser.add_argument("--only", help="measure only the kinds whose name holds one of these comma-separated words")
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    views, draws = (256, 4) if args.quick else (args.views, args.draws)
    data = []
    if args.reference:
        logits = torch.from_numpy(np.load(args.reference / "logits.npy")).float()
        features = torch.from_numpy(np.load(args.reference / "features.npy")).float()
        name = args.reference.name.removeprefix("reference-") + " teacher"  # benchmarks/tuples.py: reference-triples, -pairs
        data.append((f"{name} (C={logits.shape[1]})", logits, features))
    for classes in ((100,) if args.quick else (1000,)):
        logits = torch.from_numpy(synthetic_logits(2 * views, classes, seed=7)[0])
        features = torch.randn(len(logits), 64, generator=torch.Generator().manual_seed(1))
        data.append((f"synthetic (C={classes})", logits, features))
    rows = []
    for name, logits, features in data:
        if len(logits) < 2 * views:
            sys.exit(f"records: {name} has {len(logits)} views; --views {views} needs {2 * views} (half calibrate the code)")
        chosen = [k for k in kinds(logits.shape[1], args.quick)
                  if not args.only or any(word in k.name for word in args.only.split(","))]
        rows += evaluate(name, logits, features, chosen, draws, views)
    for student in ("init", "fitted"):
        print(f"\nBatch weight-gradient error, student {student} ({views} views, rms over {draws} draws):\n")
        print(table(rows, student))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
