"""The `kdcache` command: each command builds a config and calls one library function."""

from __future__ import annotations

import functools
import json
import os
import shlex
import signal
import sys
import threading
from typing import Optional

import typer

from kdcache.cpu import cpu_threads

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="kdcache: an offline teacher-logit cache and a streaming student trainer.")


def _command_line() -> str:
    return " ".join(shlex.quote(a) for a in ["kdcache", *sys.argv[1:]])


def handles_errors(func):
    """Turn kdcache's named errors into one line on stderr and a non-zero exit code."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from kdcache.errors import KdcacheError

        try:
            return func(*args, **kwargs)
        except KdcacheError as exc:
            # One line, whatever the message quotes (a library's own error text may span several).
            text = exc.brief or str(exc)
            typer.echo("error: " + " ".join(line.strip() for line in text.splitlines() if line.strip()), err=True)
            if exc.units_computed is not None:  # precompute's last line, whatever stopped it
                typer.echo(f"computed {exc.units_computed} unit(s)", err=True)
            raise typer.Exit(exc.exit_code) from None

    return wrapper


def _log(message: str) -> None:
    typer.echo(message, err=True)


def _topk(value: str) -> int | str:
    from kdcache.errors import ConfigError

    if value == "full":
        return value
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"--topk {value!r}; expected a positive integer or 'full'") from None


def _teacher_config(teacher, checkpoint, teacher_file, num_classes):
    from kdcache.teacher import TeacherConfig

    return TeacherConfig(model=teacher, checkpoint=checkpoint, model_file=teacher_file, num_classes=num_classes)


@app.command("precompute-logits")
@handles_errors
def precompute_logits(
    data: str = typer.Option(..., "--data", help="Source: digits, fashion-mnist[:DIR], imagefolder:DIR, tar shards, or parquet:PATH (local or a URL such as hf://datasets/...)."),
    output: str = typer.Option(..., "--output", "-o", help="Cache directory to create (or resume)."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Teacher spec: a timm name or pretrained tag (resnet50.a1_in1k), hf-hub:ORG/NAME, torchvision:NAME[:WEIGHTS], hf:DIR or hf:ORG/NAME, python:MODULE:FUNCTION, torchscript:FILE or export:FILE (docs/cli.md)."),
    teacher_checkpoint: Optional[str] = typer.Option(None, "--teacher-checkpoint", help="Weights file for a timm or torchvision --teacher (else its published weights are downloaded)."),
    teacher_file: Optional[str] = typer.Option(None, "--teacher-file", help="A TorchScript or torch.export file (or a pickled whole module) instead; its kind is detected."),
    num_classes: Optional[int] = typer.Option(None, "--num-classes", help="Expected class count (checked)."),
    split: str = typer.Option("train", "--split"),
    augmentation: str = typer.Option("light", "--augmentation", "-a", help="Preset (none, light, strong, funmatch, cutmix) or a JSON spec file."),
    epochs: int = typer.Option(1, "--epochs", help="Augmentation epochs (views per sample)."),
    from_epoch: int = typer.Option(0, "--from-epoch", help="Compute only epochs from this one on (one job's share; see merge)."),
    seed: int = typer.Option(0, "--seed"),
    topk: str = typer.Option("10", "--topk", help="Logits kept per view, or 'full'."),
    tail_rank: Optional[int] = typer.Option(None, "--tail-rank", help="Coordinates of the tail code per view (default 40 where the tail has over 80 classes, half the tail where it has 41 to 80, else 0; on --resume the cache's)."),
    tail_samples: Optional[int] = typer.Option(None, "--tail-samples", help="Tail classes sampled per view, for an unbiased estimate (default 0; on --resume the cache's)."),
    block_size: int = typer.Option(1024, "--block-size", help="Samples per block (indexable sources)."),
    blocks_per_unit: int = typer.Option(64, "--blocks-per-unit", help="Blocks per shard file and unit of work."),
    batch_size: int = typer.Option(256, "--batch-size"),
    replay_path: str = typer.Option("pil", "--replay-path", help="pil (reference), tensor, or device (decode and replay on the teacher's device, batched)."),
    workers: int = typer.Option(0, "--workers", help="Processes preparing blocks (0: in the main process, a background thread with a GPU teacher)."),
    resume: bool = typer.Option(False, "--resume", help="Finish or extend an existing cache."),
    repair: bool = typer.Option(False, "--repair", help="With --resume: re-hash committed units, recompute damaged ones."),
    lease: float = typer.Option(120.0, "--lease", help="Seconds another machine's claim on a unit stays valid unrenewed."),
    max_units: Optional[int] = typer.Option(None, "--max-units", help="Compute at most this many units, then stop (exit 7 if the cache is unfinished)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (default: the idle cores this process may use, at least 1; OMP_NUM_THREADS when set)."),
):
    """Run the teacher once per augmentation epoch and store every view's teacher record.

    Any number of ranks and jobs may work on one cache at once (with --resume): they share the
    units through claims. The last line says how many units this process computed.
    """
    # A CPU teacher alternates with block preparation: spinning OpenMP threads skip the wake-up
    # after every pause (measured in docs/benchmarks.md). Set before torch starts its threads.
    os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")
    from kdcache.precompute import PrecomputeConfig, precompute_logits as run

    config = PrecomputeConfig(
        data=data, output=output, split=split,
        teacher=_teacher_config(teacher, teacher_checkpoint, teacher_file, num_classes),
        augmentation=augmentation, epochs=epochs, from_epoch=from_epoch, seed=seed, topk=_topk(topk), block_size=block_size,
        blocks_per_unit=blocks_per_unit, batch_size=batch_size, replay_path=replay_path, workers=workers, resume=resume,
        repair=repair, lease_seconds=lease, max_units=max_units, tail_rank=tail_rank, tail_samples=tail_samples,
        command=_command_line(),
    )
    # A scheduler stops a job with SIGTERM: stop at the next block and release the claims, so others take the units at once.
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with cpu_threads(threads):
        result = run(config, log=_log, progress=sys.stderr.isatty(), stop=stop)
    _log(f"{result.views} views in {result.seconds:.1f}s ({result.views_per_second:.0f} views/s); "
         f"epochs complete: {result.epochs_complete}")
    _log(f"computed {result.units_done} unit(s)")


@app.command("add-teacher")
@handles_errors
def add_teacher(
    cache: str = typer.Argument(..., metavar="CACHE", help="The local cache whose views the teacher scores."),
    data: str = typer.Option(..., "--data", help="The source the cache was made from."),
    name: str = typer.Option(..., "--name", help="The teacher's record name (letters, digits, _ . -; not main or all)."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Teacher spec, as for precompute-logits (docs/cli.md)."),
    teacher_checkpoint: Optional[str] = typer.Option(None, "--teacher-checkpoint", help="Weights file for a timm or torchvision --teacher (else its published weights are downloaded)."),
    teacher_file: Optional[str] = typer.Option(None, "--teacher-file", help="A TorchScript or torch.export file (or a pickled whole module) instead."),
    topk: Optional[str] = typer.Option(None, "--topk", help="Logits kept per view, or 'full' (default: the cache's k)."),
    epochs: Optional[str] = typer.Option(None, "--epochs", help="Epochs to score, e.g. 0,2-4 (default: every committed unit)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Teacher batch size (default: the cache's)."),
    workers: int = typer.Option(0, "--workers", help="Processes preparing blocks."),
    repair: bool = typer.Option(False, "--repair", help="Re-hash the teacher's committed units first, and score the damaged ones again."),
    lease: float = typer.Option(120.0, "--lease", help="Seconds another machine's claim on a unit stays valid unrenewed."),
    max_units: Optional[int] = typer.Option(None, "--max-units", help="Score at most this many units, then stop (exit 7 if units are left)."),
    tail_rank: Optional[int] = typer.Option(None, "--tail-rank", help="Coordinates of the teacher's tail code per view, as for precompute-logits (default: the default record's for this teacher's classes and k, whatever the cache's record; on a run that joins, the group's)."),
    tail_samples: Optional[int] = typer.Option(None, "--tail-samples", help="Tail classes sampled per view, as for precompute-logits (default 0; on a run that joins, the group's)."),
):
    """Score a cache's existing views with another teacher, under teachers/NAME/, leaving the first teacher's records alone.

    Resumes when run again; any number of ranks and jobs may run it on one cache at once.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")
    from kdcache.add_teacher import AddTeacherConfig, add_teacher as run

    config = AddTeacherConfig(
        cache=cache, data=data, name=name, teacher=_teacher_config(teacher, teacher_checkpoint, teacher_file, None),
        topk=None if topk is None else _topk(topk), epochs=epochs, batch_size=batch_size, workers=workers, repair=repair,
        lease_seconds=lease, max_units=max_units, tail_rank=tail_rank, tail_samples=tail_samples, command=_command_line(),
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    result = run(config, log=_log, progress=sys.stderr.isatty(), stop=stop)
    _log(f"{result.views} views in {result.seconds:.1f}s ({result.views_per_second:.0f} views/s); "
         f"epochs complete for {name}: {result.epochs_complete}")
    _log(f"computed {result.units_done} unit(s)")


@app.command("train-student")
@handles_errors
def train_student(
    data: str = typer.Option(..., "--data", help="Training source (the one the cache was made from)."),
    model: str = typer.Option(..., "--model", help="timm model name of the student."),
    run_dir: str = typer.Option(..., "--run-dir", help="Directory for checkpoints, metrics and the plot (must not exist unless --resume)."),
    cache: Optional[str] = typer.Option(None, "--cache", help="Cache path or URL (teacher records and views)."),
    val_data: Optional[str] = typer.Option(None, "--val-data", help="Validation source, evaluated every epoch."),
    loss: str = typer.Option("kd", "--loss", help="ce, kd, ttm, wttm or mkd."),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="KD/MKD weight of the distillation term."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="KD temperature (MKD: initial temperatures)."),
    beta: Optional[float] = typer.Option(None, "--beta", help="TTM/WTTM weight of the distillation term."),
    gamma: Optional[float] = typer.Option(None, "--gamma", help="TTM/WTTM teacher exponent (1/T)."),
    tail: Optional[str] = typer.Option(None, "--tail", help="How the teacher's tail enters the loss: estimated (from the tail code and sampled classes, where the cache has them), bucket or uniform."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Run this teacher live (online baseline); a spec as for precompute-logits."),
    teacher_checkpoint: Optional[str] = typer.Option(None, "--teacher-checkpoint"),
    teacher_file: Optional[str] = typer.Option(None, "--teacher-file"),
    augmentation: str = typer.Option("light", "--augmentation", "-a", help="Without --cache: preset or JSON spec file."),
    img_size: Optional[int] = typer.Option(None, "--img-size", help="The student's view size in pixels (default: the cache's; required without --cache)."),
    epochs: int = typer.Option(10, "--epochs"),
    batch_size: int = typer.Option(64, "--batch-size", help="Global batch size over all ranks."),
    lr: float = typer.Option(3e-3, "--lr", help="Peak learning rate (AdamW by default)."),
    weight_decay: float = typer.Option(0.05, "--weight-decay"),
    opt: str = typer.Option("adamw", "--opt", help="timm optimizer name."),
    sched: str = typer.Option("cosine", "--sched", help="timm scheduler name."),
    warmup_epochs: Optional[int] = typer.Option(None, "--warmup-epochs", help="Epochs of linear learning-rate warmup (default: a tenth of --epochs, at most 5)."),
    ema: bool = typer.Option(False, "--ema", help="Keep a timm EMA of the weights (exported as the model)."),
    seed: int = typer.Option(0, "--seed"),
    workers: int = typer.Option(0, "--workers", help="DataLoader workers per rank."),
    block_size: int = typer.Option(256, "--block-size", help="Without --cache: samples per block."),
    meta_fraction: float = typer.Option(0.02, "--meta-fraction", help="MKD: share of the training samples held out as the meta split."),
    mkd_meta_every: int = typer.Option(10, "--mkd-meta-every", help="MKD: steps between temperature updates."),
    mkd_per_class: bool = typer.Option(False, "--mkd-per-class", help="MKD: one student temperature per class."),
    mkd_full_lookahead: bool = typer.Option(False, "--mkd-full-lookahead", help="MKD: look ahead in all weights, not the head only."),
    amp: str = typer.Option("auto", "--amp", help="auto (bf16 autocast where the device has it: CUDA), bf16 or none."),
    compile_model: bool = typer.Option(False, "--compile", help="torch.compile the student (CUDA)."),
    device: str = typer.Option("auto", "--device"),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --run-dir exactly."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop (with a checkpoint) after this many steps."),
    log_every: int = typer.Option(50, "--log-every"),
    eval_every: int = typer.Option(1, "--eval-every", help="Epochs between evaluations of --val-data (the last epoch is always evaluated)."),
    checkpoint_every: int = typer.Option(0, "--checkpoint-every", help="Steps between checkpoints (0: epoch ends)."),
    no_verify_checksums: bool = typer.Option(False, "--no-verify-checksums", help="Skip sha256 checks of cache units (trusted local caches)."),
    check_data: bool = typer.Option(False, "--check-data", help="Check every sample's digest before the first step (one pass over the data); blocks are checked as they stream anyway."),
    no_data_check: bool = typer.Option(False, "--no-data-check", hidden=True, help="No pass over the data before the first step: the default now."),
    expect_digest: Optional[str] = typer.Option(None, "--expect-digest", help="Refuse a cache whose content digest (kdcache info) is another."),
    teacher_record: str = typer.Option("main", "--teacher-record", help="Whose records to distil: main (the cache's first teacher), an added teacher's name, or all (the mean over teachers)."),
    replay_path: Optional[str] = typer.Option(None, "--replay-path", help="pil, tensor or device (default: the cache's; without --cache, pil)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (default: the idle cores this process may use, at least 1; OMP_NUM_THREADS when set)."),
):
    """Train a student from a cache (or online with --teacher, or plainly with --loss ce)."""
    from kdcache.losses import LossConfig
    from kdcache.student import StudentConfig, train_student as run

    has_teacher = teacher is not None or teacher_file is not None
    config = StudentConfig(
        data=data, model=model, run_dir=run_dir, cache=cache, val_data=val_data,
        loss=LossConfig(name=loss, alpha=alpha, temperature=temperature, beta=beta, gamma=gamma, tail=tail),
        teacher=_teacher_config(teacher, teacher_checkpoint, teacher_file, None) if has_teacher else None,
        augmentation=augmentation, img_size=img_size, epochs=epochs, batch_size=batch_size, lr=lr,
        weight_decay=weight_decay, opt=opt, sched=sched, warmup_epochs=warmup_epochs, ema=ema, seed=seed,
        num_workers=workers, block_size=block_size, meta_fraction=meta_fraction, mkd_meta_every=mkd_meta_every,
        mkd_per_class=mkd_per_class, mkd_head_only=not mkd_full_lookahead, amp=amp, compile=compile_model,
        device=device, resume=resume, max_steps=max_steps, log_every=log_every, eval_every=eval_every, checkpoint_every=checkpoint_every,
        verify_checksums=not no_verify_checksums, check_data=check_data and not no_data_check, expect_digest=expect_digest,
        teacher_record=teacher_record, replay_path=replay_path,
    )
    with cpu_threads(threads):
        result = run(config, log=_log)
    top1 = "n/a" if result.final_top1 is None else f"{100 * result.final_top1:.2f}%"
    _log(f"{result.steps} steps in {result.wall_time_s:.1f}s ({result.images_per_s:.0f} images/s); final top-1 {top1}")


@app.command("quickstart")
@handles_errors
def quickstart(
    out: str = typer.Option("kdcache-quickstart", "--out", help="Directory for the teacher, cache and student runs."),
    teacher_epochs: int = typer.Option(15, "--teacher-epochs"),
    cache_epochs: int = typer.Option(4, "--cache-epochs"),
    student_epochs: int = typer.Option(8, "--student-epochs"),
    losses: str = typer.Option("ce,kd,ttm,wttm,mkd", "--losses", help="Comma-separated losses to train students with."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (default: the idle cores this process may use, at least 1; OMP_NUM_THREADS when set)."),
):
    """The main job end to end on digits: teacher, cache, students with each loss, verify, results table."""
    from kdcache.quickstart import QuickstartConfig, run_quickstart as run

    config = QuickstartConfig(out=out, teacher_epochs=teacher_epochs, cache_epochs=cache_epochs,
                              student_epochs=student_epochs, losses=tuple(x.strip() for x in losses.split(",") if x.strip()))
    with cpu_threads(threads):
        run(config, log=_log)


@app.command("info")
@handles_errors
def info(
    cache: str = typer.Argument(..., help="Cache path or URL."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """What a cache holds: teacher, dataset, augmentation, epochs, k, size and bytes per view."""
    from kdcache.info import cache_info, format_info

    summary = cache_info(cache)
    typer.echo(json.dumps(summary, indent=1) if as_json else format_info(summary))


@app.command("verify")
@handles_errors
def verify(
    cache: str = typer.Argument(..., help="Cache path or URL."),
    data: Optional[str] = typer.Option(None, "--data", help="The source the cache was made from."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Teacher spec: a timm name or pretrained tag (resnet50.a1_in1k), hf-hub:ORG/NAME, torchvision:NAME[:WEIGHTS], hf:DIR or hf:ORG/NAME, python:MODULE:FUNCTION, torchscript:FILE or export:FILE (docs/cli.md)."),
    teacher_checkpoint: Optional[str] = typer.Option(None, "--teacher-checkpoint"),
    teacher_file: Optional[str] = typer.Option(None, "--teacher-file"),
    views: int = typer.Option(64, "--views", help="Random views to re-run through the teacher."),
    seed: int = typer.Option(0, "--seed", help="Seed of the view sample."),
    replay_path: Optional[str] = typer.Option(None, "--replay-path", help="Replay with another path: pil, tensor or device (default: the cache's); the report gives the agreement."),
    quick: bool = typer.Option(False, "--quick", help="Structure and checksums only, no data or teacher."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Teacher batch size (default: the cache's)."),
    expect_digest: Optional[str] = typer.Option(None, "--expect-digest", help="Fail at once unless the cache's content digest (kdcache info) is this one."),
    teacher_record: Optional[str] = typer.Option(None, "--teacher-record", help="Check one teacher's records (main, or an added teacher's name); default: every teacher's, replaying those --teacher made."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (default: the idle cores this process may use, at least 1; OMP_NUM_THREADS when set)."),
):
    """Check structure, checksums, dataset digests and replay fidelity; non-zero exit on any failure."""
    from kdcache.verify import VerifyConfig, verify_cache as run_verify

    has_teacher = teacher is not None or teacher_file is not None
    config = VerifyConfig(
        cache=cache, data=data, views=views, seed=seed, replay_path=replay_path, quick=quick, batch_size=batch_size,
        expect_digest=expect_digest, teacher_record=teacher_record,
        teacher=_teacher_config(teacher, teacher_checkpoint, teacher_file, None) if has_teacher else None,
    )
    with cpu_threads(threads):
        run_verify(config, log=typer.echo)


@app.command("show")
@handles_errors
def show(
    cache: str = typer.Argument(..., help="Cache path or URL."),
    data: str = typer.Option(..., "--data", help="The source the cache was made from."),
    epoch: int = typer.Option(..., "--epoch", help="A complete epoch of the cache."),
    out: str = typer.Option(..., "--out", "-o", help="The picture to write (.png); its directory is created."),
    samples: Optional[list[str]] = typer.Option(None, "--samples", help="A sample key or slot index; repeat for several."),
    count: int = typer.Option(8, "--count", help="Without --samples: the first N samples of block 0."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="A teacher spec (as for precompute-logits): also draw the live teacher."),
    teacher_checkpoint: Optional[str] = typer.Option(None, "--teacher-checkpoint"),
    teacher_file: Optional[str] = typer.Option(None, "--teacher-file"),
    teacher_record: str = typer.Option("main", "--teacher-record", help="Whose stored top-5 to draw: main, or an added teacher's name."),
):
    """Draw what the teacher saw: replayed views, partners or source images, and the stored top-5."""
    from kdcache.show import ShowConfig, render_views

    has_teacher = teacher is not None or teacher_file is not None
    config = ShowConfig(
        cache=cache, data=data, epoch=epoch, output=out, samples=tuple(samples or ()), count=count,
        teacher=_teacher_config(teacher, teacher_checkpoint, teacher_file, None) if has_teacher else None,
        teacher_record=teacher_record,
    )
    result = render_views(config)
    _log(f"{result.rows} view(s) of epoch {epoch}, {result.width}x{result.height} px")
    typer.echo(result.output)


@app.command("merge")
@handles_errors
def merge(
    output: str = typer.Argument(..., metavar="OUT", help="The merged cache to create (must not exist, or be an empty directory)."),
    caches: list[str] = typer.Argument(..., metavar="CACHE", help="Two or more caches (or partial caches) made with the same recipe."),
):
    """Combine compatible caches from separate jobs (machines, epoch ranges, units) into one new cache."""
    from kdcache.merge import merge_caches

    result = merge_caches(output, caches, command=_command_line(), log=_log)
    typer.echo(f"merged {result.units} unit(s) from {len(caches)} caches into {result.output}; "
               f"epochs complete: {result.epochs_complete}")


@app.command("export")
@handles_errors
def export(
    cache: str = typer.Argument(..., metavar="CACHE", help="Cache path, URL or .zip to take units from."),
    output: str = typer.Argument(..., metavar="OUT", help="The cache to create (must not exist): a directory, or a .zip file with --format zip."),
    epochs: Optional[str] = typer.Option(None, "--epochs", help="Epochs to take, e.g. 0,2-4 (default: every epoch with a committed unit; from a subset, its epochs)."),
    blocks: Optional[str] = typer.Option(None, "--blocks", help="Blocks to take, whole units only, e.g. 0-3 (default: every block; from a subset, its blocks)."),
    fmt: str = typer.Option("zarr", "--format", help="zarr (a cache directory), zip (one archive file, read in place) or wds (webdataset tar shards)."),
    data: Optional[str] = typer.Option(None, "--data", help="With --format wds: the source the cache was made from; stores each view's image next to its records."),
):
    """Write some epochs and blocks of a cache as a new cache: a directory or one zip archive."""
    from kdcache.export import ExportConfig, export_cache
    from kdcache.format import parse_selection

    config = ExportConfig(
        cache=cache, output=output, format=fmt, data=data,
        epochs=None if epochs is None else parse_selection(epochs, "--epochs"),
        blocks=None if blocks is None else parse_selection(blocks, "--blocks"),
    )
    result = export_cache(config, log=_log)
    typer.echo(f"exported {result.units} unit(s), {result.views} views to {result.output} "
               f"({result.format}, {result.bytes / 1e6:.2f} MB)")


@app.command("index")
@handles_errors
def index(cache: str = typer.Argument(..., metavar="CACHE", help="A local cache directory.")):
    """Add an epoch index to every complete epoch that lacks one, so the cache opens in a few requests."""
    from kdcache.format.ledger import index_cache

    done = index_cache(cache, log=_log)
    typer.echo(f"{cache}: epoch indexes {len(done['written'])} written, {len(done['rewritten'])} rewritten, "
               f"{len(done['unchanged'])} already up to date; {len(done['incomplete'])} epoch(s) not complete")


@app.command("make-shards")
@handles_errors
def make_shards(
    data: str = typer.Option(..., "--data", help="Any source spec."),
    output: str = typer.Option(..., "--output", "-o", help="printf pattern, e.g. out/digits-%06d.tar"),
    split: str = typer.Option("train", "--split"),
    samples_per_shard: int = typer.Option(1000, "--samples-per-shard"),
    image_format: str = typer.Option("png", "--image-format"),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", help="Write only the source's first N samples."),
):
    """Write a source to webdataset tar shards (to try the streaming path on real data)."""
    from kdcache.shards import write_shards
    from kdcache.sources import open_source

    paths = write_shards(open_source(data, split=split), output, samples_per_shard=samples_per_shard, image_format=image_format,
                          max_samples=max_samples)
    _log(f"wrote {len(paths)} shard(s)")
    for path in paths:
        typer.echo(path)


if __name__ == "__main__":
    app()
