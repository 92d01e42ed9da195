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

:func:`_train` reads as the run's steps, each a method of :class:`_Run`: open the run directory,
build the parts, restore them from the checkpoint or seed them, wrap the model (SyncBatchNorm,
DDP, torch.compile), announce the run; then, epoch by epoch, ``train_epoch`` (batch to device,
MKD meta update, optimizer step, logging, mid-epoch checkpoints) and ``end_epoch`` (evaluation
and the epoch's checkpoint); and last ``finish`` (the result, ``result.json`` and the plot).
The configuration is :class:`kdcache.train_config.TrainConfig`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import math
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from kdcache.batch import Batch, batches_on_device
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
from kdcache.cpu import thread_note
from kdcache.errors import ConfigError, WriteError, describe_os_error
from kdcache.fidelity import describe as describe_fidelity
from kdcache.losses import compute_loss
from kdcache.record import TeacherRecord
from kdcache.runlog import METRICS_NAME, PLOT_NAME, RESULT_NAME, Progress, RunLog, StepMeter, plot_run, write_json
from kdcache.teacher import teacher_logits, to_channels_last
from kdcache.train_config import (
    RESUME_DEFAULTS,
    RESUME_EXPLAINED,
    RESUME_FREE_FIELDS,
    RESUME_UNRECORDED,
    RunResult,
    TrainConfig,
)

#: Errors of a write that the disk refused (full, quota, read-only, too large): reported as WriteError.
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EIO})


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


def _with_teacher_records(batch: Batch, teacher: torch.nn.Module, num_classes: int, device: torch.device) -> Batch:
    """The online baseline: the live teacher's logits on the same images become the batch's records.

    The teacher runs as precompute runs it (:func:`~kdcache.teacher.teacher_logits`: bf16 and
    channels-last on CUDA, float32 in contiguous memory elsewhere), whatever the student's
    ``amp`` and ``channels_last``: other kernels round differently, and the baseline is the cache's
    teacher on the same views.
    """
    logits = teacher_logits(teacher, batch.images, device, channels_last=device.type == "cuda")
    if logits.shape[-1] != num_classes:
        raise ConfigError(f"the teacher outputs {logits.shape[-1]} classes; expected num_classes={num_classes}")
    return dataclasses.replace(batch, record=TeacherRecord.from_logits(logits, k=num_classes), records=None)


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
    teaching: str | None = None,
) -> RunResult:
    """Train ``config.model`` on ``loader``'s batches (see the module docstring for the loader contract).

    ``val_batches``: a re-iterable validation source (records unused), evaluated every
    ``eval_every`` epochs and after the last. ``meta_batches``: a re-iterable held-out source for
    MKD (required by loss ``mkd``; each pass must yield the same sequence for an exact resume).
    ``teacher``: a module run live on each batch's images (the online baseline); its logits
    replace the batch's records. ``log``: human-readable messages (rank 0 only). ``on_step``:
    called with the global step after each step and its checkpoint, if any. ``teaching``: where the
    targets come from (e.g. ``cache PATH``), named in the title of the run's plot.
    """
    ranks = _init_distributed(config.device)
    try:
        return _train(config, loader, ranks, val_batches, meta_batches, teacher, log, on_step, teaching)
    except OSError as exc:
        if exc.errno not in _WRITE_ERRNOS:
            raise
        raise WriteError(f"cannot write to run dir {config.run_dir}: {describe_os_error(exc)}; the last checkpoint "
                         "is kept: free space, then continue the run with --resume") from None
    finally:
        if ranks.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(config, loader, ranks, val_batches, meta_batches, teacher, log, on_step, teaching) -> RunResult:
    """The run, step by step: set up, restore or seed, then epochs of steps with evaluation, then the summary."""
    run = _Run(config, loader, ranks, meta_batches, log)
    run.teaching = teaching
    run.open_run_dir()
    teacher = run.build(teacher)
    checkpoint = run.restore_or_seed()
    run.wrap_model()
    run.announce(resumed=checkpoint, online=teacher is not None)
    epoch = run.position.epoch
    while epoch < config.epochs and not run.stopped:
        run.train_epoch(epoch, teacher, on_step)
        if run.stopped:
            break
        epoch = run.end_epoch(epoch, val_batches)
    return run.finish()


class _Run:
    """One training run's state, with the steps :func:`_train` takes in order."""

    def __init__(self, config: TrainConfig, loader: Any, ranks: _Ranks, meta_batches, log) -> None:
        if config.batch_size % ranks.world:
            raise ConfigError(f"TrainConfig.batch_size={config.batch_size}: expected a multiple of the world size {ranks.world}")
        self.is_mkd = config.loss.name == "mkd"
        if self.is_mkd and meta_batches is None:
            raise ConfigError("loss 'mkd' needs a held-out meta split (meta_batches); none was given")
        self.batches_per_epoch = int(loader.batches_per_epoch)
        if self.batches_per_epoch < 1:
            raise ConfigError(f"the loader has batches_per_epoch={self.batches_per_epoch}; expected at least 1")
        self.config, self.loader, self.ranks, self.meta_batches = config, loader, ranks, meta_batches
        self.say = log if ranks.main else (lambda message: None)
        self.log = log
        self.device = _resolve_device(config.device, ranks)
        self.on_cuda = self.device.type == "cuda"
        self.amp = "bf16" if self.on_cuda and config.amp != "none" else "none"  # bf16 autocast on CUDA only; logged
        self.use_compile = config.compile and self.on_cuda
        self.run_dir = Path(config.run_dir)
        self.total_steps = config.epochs * self.batches_per_epoch
        self.stop_step = min(self.total_steps, config.max_steps or self.total_steps)
        self.position = TrainPosition()
        self.best_top1 = self.final_top1 = self.final_ema_top1 = None
        self.prior_wall = 0.0
        self.train_time = 0.0  # this process, training steps only (no evaluation)
        self.process_images = 0
        self.stopped = False
        self.teaching: str | None = None  # where the targets come from, for the plot's title

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.amp == "bf16" else contextlib.nullcontext()

    # -- set-up ------------------------------------------------------------------------------

    def open_run_dir(self) -> None:
        """Every rank checks the run directory before rank 0 writes anything in it."""
        config, ranks = self.config, self.ranks
        self.checkpoint_path = check_run_dir(self.run_dir, config.to_dict(), resume=config.resume,
                                             free_fields=RESUME_FREE_FIELDS, defaults=RESUME_DEFAULTS,
                                             unrecorded=RESUME_UNRECORDED, explained=RESUME_EXPLAINED, log=self.say)
        if ranks.world > 1:
            dist.barrier()
        if ranks.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_json(self.run_dir / CONFIG_NAME, config.to_dict())
        if ranks.world > 1:
            dist.barrier()
        self.runlog = RunLog(self.run_dir / METRICS_NAME, enabled=ranks.main)

    def build(self, teacher: torch.nn.Module | None) -> torch.nn.Module | None:
        """The model, optimizer, scheduler, EMA and MKD temperatures, with the same initial weights on every rank."""
        _seed_everything(self.config.seed)
        self.parts, self.sized = _build(self.config, self.device, self.batches_per_epoch)
        self.model = self.parts.model
        if teacher is not None:
            teacher = teacher.to(self.device).eval().requires_grad_(False)
            if self.on_cuda:  # as precompute runs it (and records it), whatever the student's channels_last
                to_channels_last(teacher)
        return teacher

    def restore_or_seed(self) -> bool:
        """Continue from the checkpoint when resuming (state, position, RNG), else seed each rank; whether it resumed."""
        config, ranks = self.config, self.ranks
        if self.checkpoint_path is None:
            _seed_everything(config.seed + ranks.rank)
            self.runlog.rewind(-1)  # a process that died before its first checkpoint
            return False
        state = load_checkpoint(self.checkpoint_path)  # on CPU: RNG states must stay there; load_state_dict moves the rest
        self.parts.load_state_dict(state["parts"])
        self.position = TrainPosition.from_dict(state["position"])
        self.best_top1, self.final_top1, self.final_ema_top1 = state["best_top1"], state["final_top1"], state["final_ema_top1"]
        self.prior_wall = float(state["wall_time_s"])
        if len(state["rng"]) == ranks.world:
            restore_rng_state(state["rng"][ranks.rank])
        else:
            self.say(f"resume: checkpoint made on {len(state['rng'])} ranks, now {ranks.world}; RNG streams reseeded, not restored")
            _seed_everything(config.seed + ranks.rank + self.position.step)
        self.runlog.rewind(self.position.step)  # drop lines a killed process wrote after its last checkpoint
        return True

    def wrap_model(self) -> None:
        """SyncBatchNorm and DDP over several ranks, torch.compile on CUDA; ``eval_model`` is the unwrapped one."""
        if self.ranks.world > 1 and self.on_cuda:
            # BatchNorm statistics over the global batch, so N ranks step like one (torch has no CPU SyncBatchNorm)
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.eval_model = torch.compile(self.model) if self.use_compile else self.model
        self.train_model = self.eval_model
        if self.ranks.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.train_model = DistributedDataParallel(self.eval_model, device_ids=[self.device.index] if self.on_cuda else None)

    def announce(self, *, resumed: bool, online: bool) -> None:
        """The ``start`` metrics line and the opening messages; then the progress bar takes over the messages."""
        config, position = self.config, self.position
        self.runlog.write(
            "start",
            device=str(self.device), amp=self.amp, amp_requested=config.amp, compile=self.use_compile,
            compile_requested=config.compile, channels_last=config.channels_last, world_size=self.ranks.world,
            per_rank_batch=config.batch_size // self.ranks.world, batches_per_epoch=self.batches_per_epoch,
            total_steps=self.total_steps, resumed_step=position.step if resumed else None,
            img_size_passed_to_model=self.sized, online_teacher=online, loss=config.loss.name,
        )
        if config.amp == "bf16" and self.amp != "bf16":  # asked for by name: say why it is not used
            self.say(f"amp={config.amp!r} requested; running with amp='none' on {self.device} (bf16 autocast is used on CUDA only)")
        if self.use_compile != config.compile:
            self.say(f"compile=True requested; not compiling on {self.device} (torch.compile is used on CUDA only)")
        self.say(
            f"training {config.model} with loss {config.loss.name!r} on {self.ranks.world}x{self.device.type} "
            f"({'bf16 autocast' if self.amp == 'bf16' else 'float32'}"
            + ("" if self.on_cuda else f", {thread_note()}") + "): "
            f"{self.batches_per_epoch} batches/epoch x {config.epochs} epochs"
            + (f", resuming at step {position.step} (epoch {position.epoch}, batch {position.batch})" if resumed else "")
        )
        if config.record_fidelity is not None:  # what the loss reads of the cache's records (kdcache.fidelity), once
            self.say(describe_fidelity(config.record_fidelity, config.loss))
        self.progress = Progress(self.log, total=self.stop_step, initial=position.step, enabled=self.ranks.main)
        self.say = self.progress.say  # beside the bar on a terminal, never over it
        self.meta_stream = _cycle_from(self.meta_batches, position.meta_batches) if self.is_mkd else None
        self.meter = StepMeter(self.device)
        self.decoded, self.decoded_said = Counter(), False  # the device path's decoder counts (Batch.decoded)
        self.step = position.step
        self.stopped = self.step >= self.stop_step
        self.train_model.train()

    # -- training ----------------------------------------------------------------------------

    def save(self, position: TrainPosition) -> None:
        """A checkpoint that resumes exactly (every rank's RNG state gathered to rank 0, which writes it)."""
        rng = [capture_rng_state()]
        if self.ranks.world > 1:
            rng = [None] * self.ranks.world
            dist.all_gather_object(rng, capture_rng_state())
        if self.ranks.main:
            save_checkpoint(self.run_dir / CHECKPOINT_NAME, {
                "parts": self.parts.state_dict(), "position": position.to_dict(), "rng": rng,
                "config": self.config.to_dict(), "best_top1": self.best_top1, "final_top1": self.final_top1,
                "final_ema_top1": self.final_ema_top1, "wall_time_s": self.prior_wall + self.train_time,
            })

    def _reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.ranks.world > 1:
            dist.all_reduce(value, op=dist.ReduceOp.AVG)
        return value

    def _checked_batch(self, batch: Batch, teacher) -> Batch:
        """A batch on the device: counted, checked, and with a live teacher's records."""
        config = self.config
        if batch.decoded:
            self.decoded.update(batch.decoded)
        if tuple(batch.images.shape[-2:]) != (config.img_size, config.img_size):
            raise ConfigError(f"the loader's images are {tuple(batch.images.shape[-2:])}; "
                              f"expected TrainConfig.img_size={config.img_size} square")
        if teacher is not None:
            batch = _with_teacher_records(batch, teacher, config.num_classes, self.device)
        if config.loss.needs_teacher and batch.record is None:
            raise ConfigError(f"loss {config.loss.name!r} needs teacher records but the batch has none; "
                              "train from a cache or pass --teacher")
        return batch

    def _temperatures(self, batch: Batch):
        """MKD: a meta update every ``mkd_meta_every`` steps, then the temperatures this step trains with."""
        if not self.is_mkd:
            return None
        config, temps = self.config, self.parts.temps
        if self.step % config.mkd_meta_every == 0:
            from kdcache.mkd import meta_update

            meta_batch = next(self.meta_stream).to(self.device, channels_last=config.channels_last)
            self.position.meta_batches += 1
            lr_now = self.parts.optimizer.param_groups[0]["lr"]
            with self.autocast():
                stats = meta_update(
                    self.model, temps, (batch.images, batch.record, batch.target), (meta_batch.images, meta_batch.target),
                    inner_lr=config.mkd_inner_lr or lr_now, loss_config=config.loss,
                    head_only=config.mkd_head_only, meta_optimizer=self.parts.meta_optimizer,
                )
            self.runlog.write("meta", step=self.step + 1, **stats)
        return tuple(t.detach() for t in temps())

    def _optimizer_step(self, batch: Batch) -> tuple[torch.Tensor, float]:
        """Forward, loss, backward, one update of the weights, the scheduler and the EMA; (loss, lr used)."""
        parts = self.parts
        temperatures = self._temperatures(batch)
        with self.autocast():
            logits = self.train_model(batch.images)
        records = batch.records if batch.records is not None else batch.record  # every teacher's, or one
        loss = compute_loss(self.config.loss, logits.float(), records, batch.target, temperatures=temperatures)
        lr = parts.optimizer.param_groups[0]["lr"]
        parts.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        parts.optimizer.step()
        self.step += 1
        if parts.scheduler is not None:
            parts.scheduler.step_update(num_updates=self.step)
        if parts.ema is not None:
            parts.ema.update(self.model, step=self.step)
        return loss, lr

    def _log_step(self, epoch: int, batch_index: int, lr: float, end_of_epoch: bool) -> dict:
        if not (self.step % self.config.log_every == 0 or end_of_epoch or self.stopped):
            return {}
        if self.on_cuda:
            torch.cuda.synchronize(self.device)
        line = {"step": self.step, "epoch": epoch, "batch": batch_index, "lr": lr, **self.meter.flush(self._reduce_mean)}
        if self.parts.temps is not None:
            line.update(self.parts.temps.summary())
        self.runlog.write("train", **line)
        return {"loss": f"{line['loss']:.4f}", "lr": f"{lr:.2e}"}

    def train_epoch(self, epoch: int, teacher, on_step) -> None:
        """The steps of one epoch (from the resumed batch), with mid-epoch checkpoints and a stop at ``max_steps``."""
        config, world = self.config, self.ranks.world
        start_batch = self.position.batch if epoch == self.position.epoch else 0
        self.progress.epoch(epoch, config.epochs)
        tick = time.perf_counter()
        batches = batches_on_device(self.loader.epoch_batches(epoch, start_batch=start_batch), self.device,
                                    channels_last=config.channels_last)  # on CUDA the next batch moves during this step
        with contextlib.closing(batches):  # a stop mid-epoch ends the moving thread here
            for index, batch in enumerate(batches, start=start_batch):
                batch = self._checked_batch(batch, teacher)
                loss, lr = self._optimizer_step(batch)
                self.meter.add(loss, len(batch) * world)
                self.process_images += len(batch) * world
                self.position = TrainPosition(epoch=epoch, batch=index + 1, step=self.step,
                                              meta_batches=self.position.meta_batches)
                end_of_epoch = index + 1 >= self.batches_per_epoch
                self.stopped = self.step >= self.stop_step and not end_of_epoch
                self.progress.step(**self._log_step(epoch, index + 1, lr, end_of_epoch))
                if self.stopped or (config.checkpoint_every and self.step % config.checkpoint_every == 0
                                    and not end_of_epoch):
                    self.train_time += time.perf_counter() - tick
                    self.save(self.position)
                    tick = time.perf_counter()
                if on_step is not None:
                    on_step(self.step)
                if self.stopped or end_of_epoch:
                    break
        self.train_time += time.perf_counter() - tick
        if self.decoded and not self.decoded_said:  # the device path: where this rank's images were decoded, once
            host = sum(n for where, n in self.decoded.items() if where != "device")
            kinds = ", ".join(f"{n} {where[5:]}" for where, n in sorted(self.decoded.items()) if where != "device")
            self.say(f"epoch {epoch + 1}: {self.decoded['device']} image(s) decoded on {self.device.type}, {host} on the host"
                     + (f" ({kinds})" if kinds else ""))
            self.runlog.write("decoded", epoch=epoch + 1, **dict(self.decoded))
            self.decoded_said = True

    def end_epoch(self, epoch: int, val_batches) -> int:
        """Evaluate (every ``eval_every`` epochs and after the last), then checkpoint at the start of the next epoch."""
        config = self.config
        done = epoch + 1
        if val_batches is not None and (done % config.eval_every == 0 or done == config.epochs):
            kwargs = dict(device=self.device, autocast=self.autocast, channels_last=config.channels_last)
            self.final_top1 = evaluate(self.eval_model, val_batches, **kwargs)
            ema = self.parts.ema
            self.final_ema_top1 = evaluate(ema.module, val_batches, **kwargs) if ema is not None else None
            self.best_top1 = max(v for v in (self.best_top1, self.final_top1, self.final_ema_top1) if v is not None)
            self.runlog.write("eval", epoch=done, step=self.step, top1=self.final_top1, ema_top1=self.final_ema_top1)
            self.say(f"epoch {done}/{config.epochs}: top-1 {100 * self.final_top1:.2f}%"
                     + (f", EMA {100 * self.final_ema_top1:.2f}%" if self.final_ema_top1 is not None else ""))
        self.position = TrainPosition(epoch=done, batch=0, step=self.step, meta_batches=self.position.meta_batches)
        self.save(self.position)
        if self.step >= self.stop_step:
            self.stopped = self.step < self.total_steps
            return config.epochs  # the steps asked for are done
        return done

    # -- the end -----------------------------------------------------------------------------

    def finish(self) -> RunResult:
        """The result; on rank 0 also the ``end`` line, ``result.json`` (a completed run) and the plot."""
        self.progress.close()
        config, step, temps = self.config, self.step, self.parts.temps
        result = RunResult(
            final_top1=self.final_top1,
            best_top1=self.best_top1,
            final_ema_top1=self.final_ema_top1,
            steps=step,
            wall_time_s=self.prior_wall + self.train_time,
            images_per_s=self.process_images / self.train_time if self.train_time > 0 else 0.0,
            run_dir=self.run_dir,
            completed=step >= self.total_steps,
        )
        if self.ranks.main:
            summary = {**dataclasses.asdict(result), "epochs": config.epochs, "world_size": self.ranks.world,
                       "device": str(self.device), "amp": self.amp, "compile": self.use_compile, "loss": config.loss.name}
            if temps is not None:
                summary.update(temps.summary())
            self.runlog.write("end", **summary)
            self.runlog.close()
            if result.completed and self.process_images:  # a resumed, already finished run keeps its result.json
                write_json(self.run_dir / RESULT_NAME, summary)
            title = f"{self.run_dir.name}: {config.model}, loss {config.loss.name}" + (f", {self.teaching}" if self.teaching else "")
            plot_run(self.run_dir / METRICS_NAME, self.run_dir / PLOT_NAME, title=title)
            top1 = self.final_top1
            accuracy = f"top-1 {100 * top1:.2f}% (best {100 * self.best_top1:.2f}%), " if top1 is not None else ""
            self.say(f"{'finished' if result.completed else 'stopped'} at step {step}: {accuracy}"
                     f"{result.images_per_s:.0f} images/s; run dir {self.run_dir}")
        return result
