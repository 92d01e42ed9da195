"""What an MKD meta step costs next to a training step (head-only and full look-ahead).

    python benchmarks/mkd_cost.py [--device cuda] [--model resnet18] [--size 224] [--batch 128] [--classes 1000]

Times, in one process on the same tensors: a plain KD training step (forward, backward, AdamW),
and one MKD meta step (kdcache.mkd.meta_update) with head-only and with full look-ahead; prints
milliseconds per call and the overhead of a meta step every m = 10 steps.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import timm  # noqa: E402

from kdcache.losses import LossConfig, compute_loss  # noqa: E402
from kdcache.mkd import MetaConfig, MetaTemperatures, make_meta_optimizer, meta_update  # noqa: E402
from kdcache.record import TeacherRecord  # noqa: E402


def timed(fn, repeats: int, device: torch.device) -> float:
    for _ in range(2):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=args.classes).to(device).train()
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    meta_images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    labels = torch.randint(0, args.classes, (args.batch,), device=device)
    target = torch.nn.functional.one_hot(labels, args.classes).float()
    record = TeacherRecord.from_logits(torch.randn(args.batch, args.classes, device=device) * 3, args.k)
    loss_config = LossConfig(name="mkd")
    temps = MetaTemperatures(args.classes, per_class=False, init_teacher_T=4.0, init_student_T=4.0).to(device)
    meta_optimizer = make_meta_optimizer(temps, MetaConfig())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def train_step():
        with autocast:
            loss = compute_loss(loss_config, model(images), record, target, temperatures=tuple(t.detach() for t in temps()))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def meta_step(head_only: bool):
        def run():
            with autocast:
                meta_update(model, temps, (images, record, target), (meta_images, labels), inner_lr=1e-3,
                            loss_config=loss_config, head_only=head_only, meta_optimizer=meta_optimizer)
        return run

    step = timed(train_step, args.repeats, device)
    head = timed(meta_step(True), args.repeats, device)
    full = timed(meta_step(False), args.repeats, device)
    print(f"{args.model} on {device}, {args.size} px, batch {args.batch}, C = {args.classes}, k = {args.k}")
    print(f"{'call':<28}{'ms':>9}{'overhead at m=10':>18}")
    print(f"{'training step (mkd loss)':<28}{step:>9.1f}{'':>18}")
    print(f"{'meta step, head-only':<28}{head:>9.1f}{100 * head / (10 * step):>17.0f}%")
    print(f"{'meta step, full look-ahead':<28}{full:>9.1f}{100 * full / (10 * step):>17.0f}%")


if __name__ == "__main__":
    main()
