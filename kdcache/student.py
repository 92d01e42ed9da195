"""`kdcache train-student`: wire a cache, a source and a student into the trainer.

``train_student(config)`` opens the cache (path or URL) and the training data, refuses any
mismatch before the first step (the cache's content digest if one is expected, class count,
dataset size, uncommitted units), builds the view loader (cached views and teacher records, the
views replayed at the student's ``--img-size`` when it differs from the teacher's), the
validation batches and, for MKD, a held-out meta split (a share of the samples), then runs
:func:`kdcache.train.train`. Without a cache (``--loss ce``, or a live ``--teacher``) the views
are drawn from an augmentation spec and the seed, exactly as precompute would draw them. The
trained weights are exported as ``model.pt``, a checkpoint that ``precompute-logits --teacher``
accepts (so teachers are made this way too).

Sample digests are checked as the loader reads each block, before any of its views is replayed,
so a run starts without a pass over the data and still never steps on a sample the teacher did
not see (``check_data`` adds that pass before the first step).
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdcache import distributed
from kdcache.augment import AugSpec, cache_spec, resolve_spec
from kdcache.batches import check_all_samples, held_views, open_training_data, teacher_view
from kdcache.errors import ConfigError, MismatchError, WriteError, describe_os_error
from kdcache.fidelity import record_fidelity, teachers_fidelity
from kdcache.format import ALL, format_selection, open_cache
from kdcache.format.digest import check_digest_option, recipe_digest, require_digest
from kdcache.loader import LoaderConfig, ViewLoader, eval_batches
from kdcache.replay import PATHS
from kdcache.location import atomic_write_bytes
from kdcache.losses import LossConfig
from kdcache.plan import plan_layout
from kdcache.sources import open_source
from kdcache.teacher import MODEL_META_KEY, TeacherConfig, load_teacher
from kdcache.train import train
from kdcache.train_config import RunResult, TrainConfig

MODEL_NAME = "model.pt"


@dataclass(frozen=True, kw_only=True)
class StudentConfig:
    data: str
    model: str
    run_dir: str
    loss: LossConfig
    cache: str | None = None
    val_data: str | None = None
    teacher: TeacherConfig | None = None
    augmentation: str = "light"
    img_size: int | None = None
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    epochs: int = 10
    batch_size: int = 64  # the defaults suit short runs on small data (docs/cli.md)
    lr: float = 3e-3
    weight_decay: float = 0.05
    opt: str = "adamw"
    sched: str = "cosine"
    warmup_epochs: int | None = None  # None: kdcache.train_config.default_warmup_epochs(epochs)
    ema: bool = False
    seed: int = 0
    num_workers: int = 0
    window_blocks: int = 4
    block_size: int = 256
    meta_fraction: float = 0.02  # MKD: the share of the training samples held out as the meta split (docs/methods.md)
    mkd_meta_every: int = 10
    mkd_per_class: bool = False
    mkd_head_only: bool = True
    amp: str = "auto"
    compile: bool = False
    channels_last: bool = True
    device: str = "auto"
    resume: bool = False
    log_every: int = 50
    eval_every: int = 1  # epochs between evaluations of --val-data; the last epoch is always evaluated
    checkpoint_every: int = 0
    max_steps: int | None = None
    verify_checksums: bool = True
    check_data: bool = False  # every sample's digest before the first step (one pass over the data); else as blocks stream
    expect_digest: str | None = None  # refuse a cache whose content digest is another
    teacher_record: str = "main"  # whose records: main (the first teacher), an added teacher's name, or all
    replay_path: str | None = None  # None: the cache's (what the teacher saw); without a cache, pil

    def __post_init__(self) -> None:
        if self.replay_path is not None and self.replay_path not in PATHS:
            raise ConfigError(f"--replay-path {self.replay_path!r}; expected one of {', '.join(PATHS)}")
        object.__setattr__(self, "expect_digest", check_digest_option(self.expect_digest))
        if self.expect_digest is not None and self.cache is None:
            raise ConfigError("--expect-digest names the cache to train from: give --cache too")
        if self.loss.needs_teacher and self.cache is None and self.teacher is None:
            raise ConfigError(f"loss {self.loss.name!r} needs teacher records: give --cache, or --teacher for online distillation")
        if self.img_size is not None and self.img_size < 1:
            raise ConfigError(f"--img-size {self.img_size}; expected a positive number of pixels")
        if self.cache is None and self.img_size is None:
            raise ConfigError("without --cache the views are drawn from --augmentation: give --img-size too")
        if self.warmup_epochs is not None and not 0 <= self.warmup_epochs <= self.epochs:
            raise ConfigError(f"--warmup-epochs {self.warmup_epochs}; expected 0 to --epochs ({self.epochs})")
        if self.eval_every < 1:
            raise ConfigError(f"--eval-every {self.eval_every}; expected at least 1 (epochs between evaluations)")
        if self.teacher_record != "main" and self.cache is None:
            raise ConfigError(f"--teacher-record {self.teacher_record} names a teacher of the cache: give --cache too")
        if self.teacher_record != "main" and self.teacher is not None:
            raise ConfigError(f"--teacher-record {self.teacher_record} chooses the cache's records, but a live --teacher "
                              "replaces them; give one of the two")
        if self.teacher_record == "all" and self.loss.name == "mkd":
            raise ConfigError("loss 'mkd' learns the temperatures of one teacher: train it with --teacher-record NAME, not all")
        if not 0 < self.meta_fraction < 1:
            raise ConfigError(f"--meta-fraction {self.meta_fraction}; expected a share of the training samples between 0 "
                              "and 1, e.g. 0.02")


def _check_cache_against_data(cache, source, config: StudentConfig) -> tuple[list[int], list[int]]:
    """Refuse a cache that does not fit the data or misses a unit; returns the epochs and blocks to train from."""
    size = cache_spec(cache.manifest).output_size
    if config.teacher is not None and config.img_size not in (None, size):
        raise MismatchError(f"--img-size {config.img_size} differs from the cache's view size {size}, and a live --teacher "
                            "scores the student's own views: drop --img-size, or --teacher to train from the cache's records")
    held = held_views(cache, name=config.cache)
    if config.check_data:  # asked for: every sample's digest before anything is written (the loader checks each block anyway)
        check_all_samples(cache, source, name=config.data)
    return held


class _Reiterable:
    def __init__(self, factory):
        self.factory = factory

    def __iter__(self):
        return iter(self.factory())


def meta_split(layout, blocks: list[int], fraction: float, *, seed: int) -> np.ndarray:
    """MKD's held-out meta split: ``fraction`` of the samples of ``blocks`` (at least one), chosen by ``seed``
    whatever the block size; a bool per slot of ``layout``, True where held out."""
    slots = np.concatenate([np.arange(b * layout.block_capacity, b * layout.block_capacity + layout.sizes[b]) for b in blocks])
    count = max(1, round(fraction * len(slots)))
    if count >= len(slots):
        raise ConfigError(f"--meta-fraction {fraction:g} holds out {count} of the {len(slots)} training samples and "
                          "leaves none to train on")
    chosen = np.random.default_rng([seed, 0x6D657461]).choice(slots, size=count, replace=False)
    held_out = np.zeros(layout.num_slots, dtype=bool)
    held_out[chosen] = True
    return held_out


class _MetaBatches:
    """Meta batches for MKD: the held-out blocks' views, cycling over epochs deterministically."""

    def __init__(self, loader: ViewLoader):
        self.loader = loader

    def __iter__(self):
        epoch = 0
        while True:
            yield from self.loader.epoch_batches(epoch)
            epoch += 1


def train_student(config: StudentConfig, *, log=print) -> RunResult:
    ranks = distributed.ranks_from_env()
    fidelity = None
    if config.cache is not None:
        cache = open_cache(config.cache, verify_checksums=config.verify_checksums)
        require_digest(cache, config.expect_digest)
        root, cache = cache, teacher_view(cache, config.teacher_record)  # whose records: the views and plan are the root's
        used = list(root.groups) if config.teacher_record == ALL else [config.teacher_record]
        recipe = recipe_digest(root.manifest, [root.groups[name] for name in used if name in root.groups])
        m = cache.manifest
        source = open_training_data(cache, config.data, cache_name=config.cache)
        plan = cache.samples()
        cache_epochs, cache_blocks = _check_cache_against_data(cache, source, config)
        block = cache.read_block(cache_epochs[0], cache_blocks[0])  # what the loss reads of it is said when the run starts
        if config.teacher_record == ALL:  # each teacher's records, read with its own record's spec and basis
            fidelity = teachers_fidelity(block, {name: view.manifest for name, view in zip(cache.names, cache.views)}, config.loss)
        else:
            fidelity = record_fidelity(block, m, config.loss)
        spec, layout, num_classes = cache_spec(m), m.blocks, m.teacher.num_classes
        if config.img_size is not None and config.img_size != spec.output_size:
            log(f"the student trains at {config.img_size}px on the teacher's {spec.output_size}px views, replayed at "
                f"{config.img_size}px (same crops, flips, ops, mixes and boxes)")
        class_names = m.dataset.class_names
    else:
        cache, cache_epochs, recipe = None, None, None
        source = open_source(config.data)
        spec = resolve_spec(config.augmentation, output_size=config.img_size, mean=config.mean, std=config.std,
                            interpolation="bilinear")
        # One unit spanning every block: windows then group blocks exactly as they do for a cache.
        layout, members = plan_layout(source, block_size=config.block_size, blocks_per_unit=1 << 30, seed=config.seed)
        plan = {"source_index": np.full(layout.num_slots, -1, dtype=np.int64)}
        for block, block_members in enumerate(members):
            plan["source_index"][layout.block_slots(block)] = block_members
        num_classes, class_names = source.num_classes, list(source.class_names)
    blocks = list(range(layout.num_blocks))
    if cache is not None:
        if cache_epochs != list(range(m.epochs)):
            log(f"the cache holds epochs {format_selection(cache_epochs)} of the {m.epochs} planned: training from those")
        if cache_blocks != blocks:
            log(f"the cache holds blocks {format_selection(cache_blocks)} of {layout.num_blocks}: training on their "
                f"{sum(layout.sizes[b] for b in cache_blocks)} of {m.dataset.num_samples} samples only")
        blocks = cache_blocks
    meta_loader = None
    on_gpu = distributed.resolve_device(config.device, ranks).type == "cuda"
    size = spec.output_size if config.img_size is None else config.img_size
    path = config.replay_path or (m.replay["path"] if cache is not None else "pil")  # default: the path the teacher saw
    if cache is not None and path != m.replay["path"]:
        log(f"replaying on path {path}; the cache's teacher saw path {m.replay['path']}: the views differ slightly from "
            f"the ones it scored (kdcache verify --replay-path {path} measures by how much)")
    if cache is not None and path == "device" == m.replay["path"] and m.replay.get("device") != ("cuda" if on_gpu else "cpu"):
        log(f"the cache's device path ran on {m.replay.get('device')}, this run decodes and replays on "
            f"{'cuda' if on_gpu else 'cpu'}: their pixels differ slightly (kdcache verify measures by how much)")
    loader_config = LoaderConfig(batch_size=config.batch_size, seed=config.seed, window_blocks=config.window_blocks,
                                 num_workers=config.num_workers, defer_finish=on_gpu, pin_memory=on_gpu and config.num_workers > 0,
                                 replay_path=path, view_size=size)
    common = dict(source=source, layout=layout, plan=plan, spec=spec, num_classes=num_classes, ranks=ranks,
                  cache=cache, cache_epochs=cache_epochs, view_seed=config.seed)
    slots = None
    if config.loss.name == "mkd":
        held_out = meta_split(layout, blocks, config.meta_fraction, seed=config.seed)
        meta_size = min(config.batch_size, int(held_out.sum()))
        meta_loader = ViewLoader(config=dataclasses.replace(loader_config, batch_size=meta_size), blocks=blocks,
                                 slots=held_out, **common)
        slots = ~held_out
        total = sum(layout.sizes[b] for b in blocks)
        log(f"MKD meta split: {int(held_out.sum())} of {total} training images held out "
            f"({100 * held_out.sum() / total:.1f}%, --meta-fraction {config.meta_fraction:g}); the student trains on the "
            f"other {total - int(held_out.sum())}")
    views = sum(layout.sizes[b] for b in blocks) - (0 if slots is None else int((~slots).sum()))
    batch_size = config.batch_size
    if batch_size > views:  # take the views there are, as torch's DataLoader does with a short dataset
        batch_size = views - views % ranks.world  # a multiple of the ranks, as a global batch must be
        log(f"--batch-size {config.batch_size} is more than the {views} training views per epoch: training with "
            f"batches of {batch_size} (set --batch-size {batch_size} or less to choose it)")
        loader_config = dataclasses.replace(loader_config, batch_size=batch_size)
    loader = ViewLoader(config=loader_config, blocks=blocks, slots=slots, **common)
    if cache is not None and config.epochs > len(cache_epochs):
        log(f"training for {config.epochs} epochs from {len(cache_epochs)} cached epochs: cycling through them")
    val_batches = None
    if config.val_data is not None:
        val_source = open_source(config.val_data)
        if val_source.num_classes != num_classes:
            raise MismatchError(f"--val-data {config.val_data} has {val_source.num_classes} classes, expected {num_classes}")
        val_batches = _Reiterable(lambda: eval_batches(val_source, spec, batch_size=256, num_classes=num_classes, size=size))
    teacher = None
    if config.teacher is not None:
        device = distributed.resolve_device(config.device, ranks)
        teacher, info = load_teacher(dataclasses.replace(config.teacher, device=str(device)),
                                     pinned=None if cache is None else cache.manifest.teacher)
        if info.num_classes != num_classes:
            raise MismatchError(f"teacher has {info.num_classes} classes, the data {num_classes}")
        if cache is not None and info.weights_sha256 != cache.manifest.teacher.weights_sha256:
            log("note: the live teacher's weights differ from the teacher the cache was made with")
    train_config = TrainConfig(
        model=config.model, num_classes=num_classes, run_dir=config.run_dir, img_size=size,
        epochs=config.epochs, batch_size=batch_size, lr=config.lr, weight_decay=config.weight_decay,
        opt=config.opt, sched=config.sched, warmup_epochs=config.warmup_epochs, ema=config.ema, amp=config.amp,
        channels_last=config.channels_last, compile=config.compile, loss=config.loss, seed=config.seed,
        resume=config.resume, checkpoint_every=config.checkpoint_every, log_every=config.log_every, eval_every=config.eval_every,
        max_steps=config.max_steps, mkd_meta_every=config.mkd_meta_every, mkd_per_class=config.mkd_per_class,
        mkd_head_only=config.mkd_head_only, device=config.device, teacher_record=config.teacher_record,
        cache_recipe=recipe, record_fidelity=fidelity,
    )
    if config.teacher is not None:
        teaching = f"online teacher {config.teacher.label}"
    elif cache is not None:
        teaching = f"cache {config.cache}" + (f" (records {config.teacher_record})" if config.teacher_record != "main" else "")
    else:
        teaching = f"no teacher, {config.data}"
    result = train(train_config, loader, val_batches=val_batches, teacher=teacher, log=log, teaching=teaching,
                   meta_batches=_MetaBatches(meta_loader) if meta_loader is not None else None)
    if ranks.main and result.completed:
        export_model(Path(config.run_dir), spec=spec, class_names=class_names, size=size)
    return result


def export_model(run_dir: Path, *, spec: AugSpec, class_names: list[str], size: int | None = None) -> Path:
    """Write ``model.pt``: the trained weights plus the data config a teacher needs."""
    from kdcache.checkpoint import CHECKPOINT_NAME, load_checkpoint

    state = load_checkpoint(run_dir / CHECKPOINT_NAME)
    parts = state["parts"]
    weights = parts.get("ema") or parts["model"]
    if "module" in weights:  # timm ModelEmaV3 keeps the averaged model under "module."
        weights = weights["module"]
    weights = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in weights.items()}
    size = size or spec.output_size
    meta = {"input_size": (3, size, size), "mean": tuple(spec.mean), "std": tuple(spec.std),
            "interpolation": spec.interpolation, "class_names": list(class_names)}
    path = run_dir / MODEL_NAME
    payload = io.BytesIO()  # serialised first: torch.save would turn a failed write into an opaque RuntimeError
    torch.save({"state_dict": weights, MODEL_META_KEY: meta}, payload)
    try:
        atomic_write_bytes(path, payload.getvalue())
    except OSError as exc:
        raise WriteError(f"cannot write {path}: {describe_os_error(exc)}; the run finished and its checkpoint "
                         f"{run_dir / CHECKPOINT_NAME} is kept: free space, then run the same command with --resume "
                         f"to write {MODEL_NAME}") from None
    return path
