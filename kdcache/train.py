"""Train a student: the streaming trainer's engine.

:func:`train` takes a :class:`TrainConfig` and a view loader and runs the whole job: a timm
model, timm optimizer, scheduler (stepped per update) and EMA; bf16 autocast, channels_last and
torch.compile on CUDA; DDP under torchrun; the loss from :mod:`kdcache.losses` on the teacher
records of each batch (from the cache, or from a live ``teacher`` for the online baseline);
MKD meta updates; evaluation; JSONL metrics, ``result.json`` and ``run.png``; and checkpoints
that resume exactly: a run killed and resumed ends with the same weights as one never stopped.

The loader contract: ``loader.batches_per_epoch`` (this rank's batches per epoch) and
``loader.epoch_batches(train_epoch, start_batch=0)``, deterministic in its arguments, yielding
this rank's :class:`~kdcache.batch.Batch` objects of that epoch from ``start_batch`` on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from kdcache.batch import Batch
from kdcache.checkpoint import (
    CHECKPOINT_NAME,
    CONFIG_NAME,
    TrainPosition,
    capture_rng_state,
    check_run_dir,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from kdcache.errors import ConfigError, WriteError, describe_os_error
from kdcache.losses import LossConfig, compute_loss
from kdcache.record import TeacherRecord
from kdcache.runlog import METRICS_NAME, PLOT_NAME, RESULT_NAME, Progress, RunLog, StepMeter, plot_run, write_json

#: Learning-rate schedules (timm.scheduler.create_scheduler_v2 names) that step per update.
SCHEDULES = ("cosine", "tanh", "step", "multistep", "constant", "poly", "wsd", "rsqrt", "none")
AMP_MODES = ("bf16", "none")
DEVICES = ("auto", "cpu", "cuda")
#: Errors of a write that the disk refused (full, quota, read-only, too large): reported as WriteError.
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EIO})
#: Fields that may differ between a run and its resumption (they do not change the weights).
RESUME_FREE_FIELDS = ("resume", "log_every", "checkpoint_every", "eval_every", "max_steps", "compile", "device")


def default_warmup_epochs(epochs: int) -> int:
    """The warmup when none is set: a tenth of the epochs, rounded down, and at most 5 (none below 10 epochs)."""
    return min(5, epochs // 10)


@dataclass(kw_only=True)
class TrainConfig:
    """Everything that defines a student training run; written to ``<run_dir>/config.json``."""

    model: str
    num_classes: int
    run_dir: str
    img_size: int = 224
    epochs: int = 100
    batch_size: int = 256  # global, over all ranks
    lr: float = 1e-3
    weight_decay: float = 0.05
    opt: str = "adamw"
    sched: str = "cosine"
    warmup_epochs: int | None = None  # None: default_warmup_epochs(epochs), resolved here
    min_lr: float = 1e-6
    ema: bool = False
    ema_decay: float = 0.9998
    amp: str = "bf16"
    channels_last: bool = True
    compile: bool = False
    loss: LossConfig = field(default_factory=lambda: LossConfig(name="ce"))
    seed: int = 0
    resume: bool = False
    checkpoint_every: int = 1000  # steps; 0 = only at epoch ends
    log_every: int = 50  # steps
    eval_every: int = 1  # epochs; the last epoch is always evaluated
    max_steps: int | None = None  # stop (with a checkpoint) after this many global steps
    mkd_meta_every: int = 10
    mkd_meta_lr: float = 1e-3
    mkd_per_class: bool = False
    mkd_head_only: bool = True
    mkd_inner_lr: float | None = None  # look-ahead step size; None = the current learning rate
    device: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.loss, dict):
            self.loss = LossConfig(**self.loss)
        if not isinstance(self.loss, LossConfig):
            raise ConfigError(f"TrainConfig.loss={self.loss!r}: expected a LossConfig")

        def bad(name: str, expected: str) -> ConfigError:
            return ConfigError(f"TrainConfig.{name}={getattr(self, name)!r}: expected {expected}")

        def is_int(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def is_number(value: Any) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        import timm
        import timm.optim

        if not isinstance(self.model, str) or not timm.is_model(self.model):
            raise bad("model", "a timm model name (see timm.list_models())")
        if not isinstance(self.run_dir, (str, os.PathLike)) or not str(self.run_dir):
            raise bad("run_dir", "a directory path")
        self.run_dir = str(self.run_dir)
        if self.warmup_epochs is None and is_int(self.epochs):
            self.warmup_epochs = default_warmup_epochs(self.epochs)
        for name, low in (("num_classes", 2), ("img_size", 1), ("epochs", 1), ("batch_size", 1), ("seed", 0),
                          ("warmup_epochs", 0), ("checkpoint_every", 0), ("log_every", 1), ("eval_every", 1),
                          ("mkd_meta_every", 1)):
            if not is_int(getattr(self, name)) or getattr(self, name) < low:
                raise bad(name, f"an integer >= {low}")
        if self.warmup_epochs > self.epochs:
            raise bad("warmup_epochs", f"at most epochs={self.epochs}")
        if self.max_steps is not None and (not is_int(self.max_steps) or self.max_steps < 1):
            raise bad("max_steps", "None or an integer >= 1")
        for name in ("lr", "mkd_meta_lr"):
            if not is_number(getattr(self, name)) or getattr(self, name) <= 0:
                raise bad(name, "a positive number")
        for name in ("weight_decay", "min_lr"):
            if not is_number(getattr(self, name)) or getattr(self, name) < 0:
                raise bad(name, "a non-negative number")
        if self.mkd_inner_lr is not None and (not is_number(self.mkd_inner_lr) or self.mkd_inner_lr <= 0):
            raise bad("mkd_inner_lr", "None (use the current learning rate) or a positive number")
        if not is_number(self.ema_decay) or not 0.0 < self.ema_decay < 1.0:
            raise bad("ema_decay", "a number in (0, 1)")
        if self.opt not in timm.optim.list_optimizers():
            raise bad("opt", "a timm optimizer name (see timm.optim.list_optimizers())")
        if self.sched not in SCHEDULES:
            raise bad("sched", f"one of {', '.join(SCHEDULES)}")
        if self.amp not in AMP_MODES:
            raise bad("amp", f"one of {', '.join(AMP_MODES)}")
        if self.device not in DEVICES:
            raise bad("device", f"one of {', '.join(DEVICES)}")
        for name in ("ema", "channels_last", "compile", "resume", "mkd_per_class", "mkd_head_only"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "true or false")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"train config has unknown field {unknown[0]!r}; expected only {', '.join(sorted(known))}")
        return cls(**data)  # a dict ``loss`` becomes a LossConfig in __post_init__


@dataclass(kw_only=True)
class RunResult:
    """What a run achieved. Accuracies are fractions in [0, 1], None without a validation source."""

    final_top1: float | None
    best_top1: float | None
    final_ema_top1: float | None
    steps: int
    wall_time_s: float  # training time over every process of the run (resumes included)
    images_per_s: float  # training throughput of this process, all ranks together
    run_dir: Path
    completed: bool  # False when stopped early by max_steps


# ---------------------------------------------------------------------------------------------
# Set-up pieces
# ---------------------------------------------------------------------------------------------


@dataclass
class _Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(requested_device: str) -> _Ranks:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1): nccl on CUDA, gloo on CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _Ranks()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    owns = not dist.is_initialized()
    if owns:
        use_cuda = requested_device != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return _Ranks(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, owns_group=owns)


def _resolve_device(requested: str, ranks: _Ranks) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("TrainConfig.device='cuda': CUDA is not available here; expected 'auto' or 'cpu'")
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", ranks.local_rank)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _create_model(config: TrainConfig) -> tuple[torch.nn.Module, bool]:
    """``timm.create_model`` with ``img_size`` where the architecture takes it; says whether it did."""
    import timm

    kwargs = dict(pretrained=False, num_classes=config.num_classes)
    try:
        return timm.create_model(config.model, img_size=config.img_size, **kwargs), True
    except TypeError:  # size-agnostic architectures (CNNs) take no img_size
        return timm.create_model(config.model, **kwargs), False


@dataclass
class _Parts:
    """The stateful components of a run: everything a checkpoint holds besides position and RNG."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ema: torch.nn.Module | None
    temps: torch.nn.Module | None
    meta_optimizer: torch.optim.Optimizer | None

    _NAMES = ("model", "optimizer", "scheduler", "ema", "temps", "meta_optimizer")

    def state_dict(self) -> dict[str, Any]:
        return {name: None if getattr(self, name) is None else getattr(self, name).state_dict() for name in self._NAMES}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in self._NAMES:
            if getattr(self, name) is not None:
                getattr(self, name).load_state_dict(state[name])


def _build(config: TrainConfig, device: torch.device, batches_per_epoch: int) -> tuple[_Parts, bool]:
    """Model, optimizer, per-update scheduler and EMA from timm; MKD temperatures and their optimizer."""
    import timm.optim
    import timm.scheduler
    import timm.utils

    model, sized = _create_model(config)
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = timm.optim.create_optimizer_v2(model, opt=config.opt, lr=config.lr, weight_decay=config.weight_decay)
    scheduler, _ = timm.scheduler.create_scheduler_v2(
        optimizer,
        sched=config.sched,
        num_epochs=config.epochs,
        warmup_epochs=config.warmup_epochs,
        min_lr=config.min_lr,
        step_on_epochs=False,
        updates_per_epoch=batches_per_epoch,
    )
    ema = timm.utils.ModelEmaV3(model, decay=config.ema_decay) if config.ema else None
    temps = meta_optimizer = None
    if config.loss.name == "mkd":
        from kdcache.mkd import MetaConfig, MetaTemperatures, make_meta_optimizer

        meta = MetaConfig(every=config.mkd_meta_every, lr=config.mkd_meta_lr, inner_lr=config.mkd_inner_lr,
                          per_class=config.mkd_per_class, head_only=config.mkd_head_only)
        temperature = config.loss.temperature
        temps = MetaTemperatures(config.num_classes, meta.per_class, temperature, temperature).to(device)
        meta_optimizer = make_meta_optimizer(temps, meta)
    return _Parts(model, optimizer, scheduler, ema, temps, meta_optimizer), sized


def _cycle_from(iterable: Iterable[Batch], skip: int) -> Iterator[Batch]:
    """Endless batches from a re-iterable source, after skipping ``skip`` (those a resumed run used)."""
    done = 0
    while True:
        produced = False
        for item in iterable:
            produced = True
            if done < skip:
                done += 1
                continue
            yield item
        if not produced:
            raise ConfigError("meta_batches is empty (or a spent iterator); expected a re-iterable source of meta batches")


def _with_teacher_records(batch: Batch, teacher: torch.nn.Module, num_classes: int, autocast) -> Batch:
    """The online baseline: the live teacher's logits on the same images become the batch's records."""
    with torch.no_grad(), autocast():
        logits = teacher(batch.images)
    if logits.shape[-1] != num_classes:
        raise ConfigError(f"the teacher outputs {logits.shape[-1]} classes; expected num_classes={num_classes}")
    return dataclasses.replace(batch, record=TeacherRecord.from_logits(logits.float(), k=num_classes))


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Iterable[Batch],
    *,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    channels_last: bool = False,
) -> float:
    """Top-1 accuracy of ``model`` on ``batches``; under torch.distributed the counts are summed over ranks."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in batches:
        batch = batch.to(device, channels_last=channels_last)
        with autocast():
            logits = model(batch.images)
        counts[0] += (logits.argmax(-1) == batch.labels).sum()
        counts[1] += len(batch)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(counts)
    model.train(was_training)
    return float(counts[0] / counts[1]) if counts[1] > 0 else math.nan


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def train(
    config: TrainConfig,
    loader: Any,
    *,
    val_batches: Iterable[Batch] | None = None,
    meta_batches: Iterable[Batch] | None = None,
    teacher: torch.nn.Module | None = None,
    log: Callable[[str], None] = print,
    on_step: Callable[[int], None] | None = None,
) -> RunResult:
    """Train ``config.model`` on ``loader``'s batches (see the module docstring for the loader contract).

    ``val_batches``: a re-iterable validation source (records unused), evaluated every
    ``eval_every`` epochs and after the last. ``meta_batches``: a re-iterable held-out source for
    MKD (required by loss ``mkd``; each pass must yield the same sequence for an exact resume).
    ``teacher``: a module run live on each batch's images (the online baseline); its logits
    replace the batch's records. ``log``: human-readable messages (rank 0 only). ``on_step``:
    called with the global step after each step and its checkpoint, if any.
    """
    ranks = _init_distributed(config.device)
    try:
        return _train(config, loader, ranks, val_batches, meta_batches, teacher, log, on_step)
    except OSError as exc:
        if exc.errno not in _WRITE_ERRNOS:
            raise
        raise WriteError(f"cannot write to run dir {config.run_dir}: {describe_os_error(exc)}; the last checkpoint "
                         "is kept: free space, then continue the run with --resume") from None
    finally:
        if ranks.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(config, loader, ranks, val_batches, meta_batches, teacher, log, on_step) -> RunResult:
    say = log if ranks.main else (lambda message: None)
    if config.batch_size % ranks.world:
        raise ConfigError(f"TrainConfig.batch_size={config.batch_size}: expected a multiple of the world size {ranks.world}")
    is_mkd = config.loss.name == "mkd"
    if is_mkd and meta_batches is None:
        raise ConfigError("loss 'mkd' needs a held-out meta split (meta_batches); none was given")
    batches_per_epoch = int(loader.batches_per_epoch)
    if batches_per_epoch < 1:
        raise ConfigError(f"the loader has batches_per_epoch={batches_per_epoch}; expected at least 1")
    device = _resolve_device(config.device, ranks)
    on_cuda = device.type == "cuda"
    amp = config.amp if on_cuda else "none"  # bf16 autocast on CUDA only; the effective value is logged
    use_compile = config.compile and on_cuda

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if amp == "bf16" else contextlib.nullcontext()

    # The run directory: every rank checks it before rank 0 writes anything.
    run_dir = Path(config.run_dir)
    checkpoint_path = check_run_dir(run_dir, config.to_dict(), resume=config.resume, free_fields=RESUME_FREE_FIELDS)
    if ranks.world > 1:
        dist.barrier()
    if ranks.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / CONFIG_NAME, config.to_dict())
    if ranks.world > 1:
        dist.barrier()
    runlog = RunLog(run_dir / METRICS_NAME, enabled=ranks.main)

    _seed_everything(config.seed)  # the same initial weights on every rank
    parts, sized = _build(config, device, batches_per_epoch)
    model, optimizer, scheduler, ema, temps = parts.model, parts.optimizer, parts.scheduler, parts.ema, parts.temps
    if teacher is not None:
        teacher = teacher.to(device).eval().requires_grad_(False)
        if config.channels_last:
            teacher.to(memory_format=torch.channels_last)

    position = TrainPosition()
    best_top1 = final_top1 = final_ema_top1 = None
    prior_wall = 0.0
    if checkpoint_path is not None:
        state = load_checkpoint(checkpoint_path)  # on CPU: RNG states must stay there; load_state_dict moves the rest
        parts.load_state_dict(state["parts"])
        position = TrainPosition.from_dict(state["position"])
        best_top1, final_top1, final_ema_top1 = state["best_top1"], state["final_top1"], state["final_ema_top1"]
        prior_wall = float(state["wall_time_s"])
        if len(state["rng"]) == ranks.world:
            restore_rng_state(state["rng"][ranks.rank])
        else:
            say(f"resume: checkpoint made on {len(state['rng'])} ranks, now {ranks.world}; RNG streams reseeded, not restored")
            _seed_everything(config.seed + ranks.rank + position.step)
        runlog.rewind(position.step)  # drop lines a killed process wrote after its last checkpoint
    else:
        _seed_everything(config.seed + ranks.rank)
        runlog.rewind(-1)  # a process that died before its first checkpoint

    if ranks.world > 1 and on_cuda:
        # BatchNorm statistics over the global batch, so N ranks step like one (torch has no CPU SyncBatchNorm)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    eval_model = torch.compile(model) if use_compile else model
    train_model = eval_model
    if ranks.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(eval_model, device_ids=[device.index] if on_cuda else None)

    total_steps = config.epochs * batches_per_epoch
    stop_step = min(total_steps, config.max_steps or total_steps)
    runlog.write(
        "start",
        device=str(device), amp=amp, amp_requested=config.amp, compile=use_compile, compile_requested=config.compile,
        channels_last=config.channels_last, world_size=ranks.world, per_rank_batch=config.batch_size // ranks.world,
        batches_per_epoch=batches_per_epoch, total_steps=total_steps, resumed_step=position.step if checkpoint_path else None,
        img_size_passed_to_model=sized, online_teacher=teacher is not None, loss=config.loss.name,
    )
    if amp != config.amp:
        say(f"amp={config.amp!r} requested; running with amp='none' on {device} (bf16 autocast is used on CUDA only)")
    if use_compile != config.compile:
        say(f"compile=True requested; not compiling on {device} (torch.compile is used on CUDA only)")
    say(
        f"training {config.model} with loss {config.loss.name!r} on {ranks.world}x{device.type}: "
        f"{batches_per_epoch} batches/epoch x {config.epochs} epochs"
        + (f", resuming at step {position.step} (epoch {position.epoch}, batch {position.batch})" if checkpoint_path else "")
    )

    train_time = 0.0  # this process, training steps only (no evaluation)
    process_images = 0

    def save(pos: TrainPosition) -> None:
        rng = [capture_rng_state()]
        if ranks.world > 1:
            rng = [None] * ranks.world
            dist.all_gather_object(rng, capture_rng_state())
        if ranks.main:
            save_checkpoint(run_dir / CHECKPOINT_NAME, {
                "parts": parts.state_dict(), "position": pos.to_dict(), "rng": rng, "config": config.to_dict(),
                "best_top1": best_top1, "final_top1": final_top1, "final_ema_top1": final_ema_top1,
                "wall_time_s": prior_wall + train_time,
            })

    def reduce_mean(value: torch.Tensor) -> torch.Tensor:
        if ranks.world > 1:
            dist.all_reduce(value, op=dist.ReduceOp.AVG)
        return value

    progress = Progress(log, total=stop_step, initial=position.step, enabled=ranks.main)
    say = progress.say  # beside the bar on a terminal, never over it
    meta_stream = _cycle_from(meta_batches, position.meta_batches) if is_mkd else None
    meter = StepMeter(device)
    step = position.step
    stopped = step >= stop_step
    train_model.train()

    epoch = position.epoch
    while epoch < config.epochs and not stopped:
        start_batch = position.batch if epoch == position.epoch else 0
        progress.epoch(epoch, config.epochs)
        tick = time.perf_counter()
        for index, batch in enumerate(loader.epoch_batches(epoch, start_batch=start_batch), start=start_batch):
            batch = batch.to(device, channels_last=config.channels_last)
            if tuple(batch.images.shape[-2:]) != (config.img_size, config.img_size):
                raise ConfigError(f"the loader's images are {tuple(batch.images.shape[-2:])}; "
                                  f"expected TrainConfig.img_size={config.img_size} square")
            if teacher is not None:
                batch = _with_teacher_records(batch, teacher, config.num_classes, autocast)
            if config.loss.needs_teacher and batch.record is None:
                raise ConfigError(f"loss {config.loss.name!r} needs teacher records but the batch has none; "
                                  "train from a cache or pass --teacher")

            temperatures = None
            if is_mkd:
                if step % config.mkd_meta_every == 0:
                    from kdcache.mkd import meta_update

                    meta_batch = next(meta_stream).to(device, channels_last=config.channels_last)
                    position.meta_batches += 1
                    lr_now = optimizer.param_groups[0]["lr"]
                    with autocast():
                        stats = meta_update(
                            model, temps, (batch.images, batch.record, batch.target), (meta_batch.images, meta_batch.target),
                            inner_lr=config.mkd_inner_lr or lr_now, loss_config=config.loss,
                            head_only=config.mkd_head_only, meta_optimizer=parts.meta_optimizer,
                        )
                    runlog.write("meta", step=step + 1, **stats)
                temperatures = tuple(t.detach() for t in temps())

            with autocast():
                logits = train_model(batch.images)
            loss = compute_loss(config.loss, logits.float(), batch.record, batch.target, temperatures=temperatures)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if scheduler is not None:
                scheduler.step_update(num_updates=step)
            if ema is not None:
                ema.update(model, step=step)

            meter.add(loss, len(batch) * ranks.world)
            process_images += len(batch) * ranks.world
            position = TrainPosition(epoch=epoch, batch=index + 1, step=step, meta_batches=position.meta_batches)
            end_of_epoch = index + 1 >= batches_per_epoch
            stopped = step >= stop_step and not end_of_epoch
            postfix = {}
            if step % config.log_every == 0 or end_of_epoch or stopped:
                if on_cuda:
                    torch.cuda.synchronize(device)
                line = {"step": step, "epoch": epoch, "batch": index + 1, "lr": lr, **meter.flush(reduce_mean)}
                if temps is not None:
                    line.update(temps.summary())
                runlog.write("train", **line)
                postfix = {"loss": f"{line['loss']:.4f}", "lr": f"{lr:.2e}"}
            progress.step(**postfix)
            if stopped or (config.checkpoint_every and step % config.checkpoint_every == 0 and not end_of_epoch):
                train_time += time.perf_counter() - tick
                save(position)
                tick = time.perf_counter()
            if on_step is not None:
                on_step(step)
            if stopped or end_of_epoch:
                break
        train_time += time.perf_counter() - tick
        if stopped:
            break

        # End of an epoch: evaluate, then checkpoint at the start of the next one.
        done = epoch + 1
        if val_batches is not None and (done % config.eval_every == 0 or done == config.epochs):
            kwargs = dict(device=device, autocast=autocast, channels_last=config.channels_last)
            final_top1 = evaluate(eval_model, val_batches, **kwargs)
            final_ema_top1 = evaluate(ema.module, val_batches, **kwargs) if ema is not None else None
            best_top1 = max(v for v in (best_top1, final_top1, final_ema_top1) if v is not None)
            runlog.write("eval", epoch=done, step=step, top1=final_top1, ema_top1=final_ema_top1)
            say(f"epoch {done}/{config.epochs}: top-1 {100 * final_top1:.2f}%"
                + (f", EMA {100 * final_ema_top1:.2f}%" if final_ema_top1 is not None else ""))
        epoch = done
        position = TrainPosition(epoch=epoch, batch=0, step=step, meta_batches=position.meta_batches)
        save(position)
        if step >= stop_step:
            stopped = step < total_steps
            break

    progress.close()
    result = RunResult(
        final_top1=final_top1,
        best_top1=best_top1,
        final_ema_top1=final_ema_top1,
        steps=step,
        wall_time_s=prior_wall + train_time,
        images_per_s=process_images / train_time if train_time > 0 else 0.0,
        run_dir=run_dir,
        completed=step >= total_steps,
    )
    if ranks.main:
        summary = {**dataclasses.asdict(result), "epochs": config.epochs, "world_size": ranks.world,
                   "device": str(device), "amp": amp, "compile": use_compile, "loss": config.loss.name}
        if temps is not None:
            summary.update(temps.summary())
        runlog.write("end", **summary)
        runlog.close()
        if result.completed and process_images:  # a resumed, already finished run keeps its result.json
            write_json(run_dir / RESULT_NAME, summary)
        plot_run(run_dir / METRICS_NAME, run_dir / PLOT_NAME)
        accuracy = f"top-1 {100 * final_top1:.2f}% (best {100 * best_top1:.2f}%), " if final_top1 is not None else ""
        say(f"{'finished' if result.completed else 'stopped'} at step {step}: {accuracy}"
            f"{result.images_per_s:.0f} images/s; run dir {run_dir}")
    return result
