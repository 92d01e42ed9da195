"""Reconstruction error of the tempered teacher distribution from top-k records, per k and T.

    python benchmarks/tail.py [--teacher-checkpoint RUN/model.pt --teacher resnet10t --data digits:val] [--quick]

KL(p_T || q_T) in nats, mean over views, where p_T = softmax(v / T) from the full logits and q_T
is rebuilt from what is stored:

- kdcache bucket: over the k stored classes plus one tail bucket, q from the fp16 top-k logits and
  the tail summary (kdcache.record). Isolates the one approximation kdcache makes (the tail mass
  at temperatures other than the stored anchors T = 1 and 4).
- kdcache dense: over all C classes, the tail mass spread evenly over the C - k unstored classes.
- TinyViT dense: TinyViT's record (top-k probabilities at T = 1 in fp16, leftover spread evenly),
  re-tempered as q ∝ p^(1/T) and renormalised, the only way to change T from that record.

Logits: a real teacher's (a kdcache-trained checkpoint on its validation data) and 1000-class
structured synthetic logits (benchmarks/logits.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from logits import synthetic_logits  # noqa: E402

from kdcache.record import TeacherRecord  # noqa: E402

TEMPERATURES = (0.5, 1.0, 2.0, 4.0, 8.0, 10.0)


def kl(p_log: torch.Tensor, q_log: torch.Tensor) -> float:
    p = p_log.exp()
    terms = torch.where(p > 0, p * (p_log - q_log), torch.zeros_like(p))
    return float(terms.sum(-1).clamp_min(0).mean())


def errors(logits: torch.Tensor, k: int, temperature: float) -> tuple[float, float, float]:
    logits = logits.float()
    c = logits.shape[-1]
    record = TeacherRecord.from_logits(logits, k)
    full = torch.log_softmax(logits / temperature, -1)
    idx = record.indices.long()
    # kdcache bucket
    true_bucket = torch.cat([full.gather(-1, idx), torch.logsumexp(full.scatter(-1, idx, float("-inf")), -1, keepdim=True)], -1)
    bucket = kl(true_bucket, record.log_probs(temperature)) if k < c else 0.0
    # kdcache dense (tail spread evenly)
    dense = kl(full, record.dense_log_probs(temperature))
    # TinyViT: fp16 top-k probabilities at T = 1, leftover spread evenly, re-tempered p^(1/T)
    p1 = torch.softmax(logits, -1).gather(-1, idx).half().float()
    leftover = (1 - p1.sum(-1, keepdim=True)).clamp_min(1e-12)
    q = torch.full_like(logits, 0.0)
    q = q + leftover / max(c - k, 1)
    q = q.scatter(-1, idx, p1)
    q_t = q.clamp_min(1e-30).log() / temperature
    tinyvit = kl(full, torch.log_softmax(q_t, -1))
    return bucket, dense, tinyvit


def real_logits(args) -> torch.Tensor | None:
    if not args.teacher_checkpoint:
        return None
    from kdcache.augment import preset
    from kdcache.loader import eval_batches
    from kdcache.sources import open_source
    from kdcache.teacher import TeacherConfig, load_teacher

    model, info = load_teacher(TeacherConfig(model=args.teacher, checkpoint=args.teacher_checkpoint))
    spec = preset("none", output_size=info.input_size[-1], mean=info.mean, std=info.std, interpolation=info.interpolation)
    source = open_source(args.data)
    out = []
    with torch.no_grad():
        for batch in eval_batches(source, spec, batch_size=256, num_classes=info.num_classes):
            out.append(model(batch.images).float())
    return torch.cat(out)


def table(name: str, logits: torch.Tensor, ks) -> None:
    print(f"\n{name}: {logits.shape[0]} views, C = {logits.shape[1]}; KL(p_T || q_T) in nats, mean over views")
    print(f"{'k':>5} {'T':>5} {'kdcache bucket':>15} {'kdcache dense':>14} {'TinyViT dense':>14}")
    for k in ks:
        for t in TEMPERATURES:
            b, d, tv = errors(logits, k, t)
            print(f"{k:>5} {t:>5g} {b:>15.2e} {d:>14.2e} {tv:>14.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="resnet10t")
    parser.add_argument("--teacher-checkpoint")
    parser.add_argument("--data", default="digits:val")
    parser.add_argument("--views", type=int, default=4096)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.views = 512
    real = real_logits(args)
    if real is not None:
        c = real.shape[1]
        table(f"real teacher {args.teacher} on {args.data}", real, [k for k in (1, 2, 3, 5, c) if k <= c])
    synthetic = torch.from_numpy(synthetic_logits(args.views, 1000, epochs=1)[0])
    table("structured synthetic 1000-class logits", synthetic, (5, 10, 20, 100, 1000))


if __name__ == "__main__":
    main()
