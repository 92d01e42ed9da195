"""The `kdcache` command: each command builds a config and calls one library function."""

from __future__ import annotations

import functools
import json
import os
import shlex
import sys
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="kdcache: an offline teacher-logit cache and a streaming student trainer.")


def _command_line() -> str:
    return " ".join(shlex.quote(a) for a in ["kdcache", *sys.argv[1:]])


def handles_errors(func):
    """Turn kdcache's named errors into one line on stderr and a non-zero exit code."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from kdcache.errors import KdcacheError

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            return func(*args, **kwargs)
        except KdcacheError as exc:
            typer.echo(f"error: {exc}", err=True)
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
    data: str = typer.Option(..., "--data", help="Source: digits, fashion-mnist[:DIR], imagefolder:DIR, or tar shards."),
    output: str = typer.Option(..., "--output", "-o", help="Cache directory to create (or resume)."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="timm model name of the teacher."),
    teacher_checkpoint: Optional[str] = typer.Option(None, "--teacher-checkpoint", help="Weights file for --teacher."),
    teacher_file: Optional[str] = typer.Option(None, "--teacher-file", help="A saved whole-model file instead."),
    num_classes: Optional[int] = typer.Option(None, "--num-classes", help="Expected class count (checked)."),
    split: str = typer.Option("train", "--split"),
    augmentation: str = typer.Option("light", "--augmentation", "-a", help="Preset (none, light, strong, funmatch, cutmix) or a JSON spec file."),
    epochs: int = typer.Option(1, "--epochs", help="Augmentation epochs (views per sample)."),
    seed: int = typer.Option(0, "--seed"),
    topk: str = typer.Option("10", "--topk", help="Logits kept per view, or 'full'."),
    block_size: int = typer.Option(1024, "--block-size", help="Samples per block (indexable sources)."),
    blocks_per_unit: int = typer.Option(8, "--blocks-per-unit", help="Blocks per shard file and unit of work."),
    batch_size: int = typer.Option(256, "--batch-size"),
    replay_path: str = typer.Option("pil", "--replay-path", help="pil (reference) or tensor."),
    resume: bool = typer.Option(False, "--resume", help="Finish or extend an existing cache."),
    repair: bool = typer.Option(False, "--repair", help="With --resume: re-hash committed units, recompute damaged ones."),
):
    """Run the teacher once per augmentation epoch and store every view's teacher record."""
    from kdcache.precompute import PrecomputeConfig, precompute

    config = PrecomputeConfig(
        data=data, output=output, split=split,
        teacher=_teacher_config(teacher, teacher_checkpoint, teacher_file, num_classes),
        augmentation=augmentation, epochs=epochs, seed=seed, topk=_topk(topk), block_size=block_size,
        blocks_per_unit=blocks_per_unit, batch_size=batch_size, replay_path=replay_path, resume=resume,
        repair=repair, command=_command_line(),
    )
    result = precompute(config, log=_log)
    _log(f"{result.views} views in {result.seconds:.1f}s ({result.views_per_second:.0f} views/s); "
         f"epochs complete: {result.epochs_complete}")


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
    teacher: Optional[str] = typer.Option(None, "--teacher", help="timm model name of the teacher."),
    teacher_checkpoint: Optional[str] = typer.Option(None, "--teacher-checkpoint"),
    teacher_file: Optional[str] = typer.Option(None, "--teacher-file"),
    views: int = typer.Option(64, "--views", help="Random views to re-run through the teacher."),
    seed: int = typer.Option(0, "--seed", help="Seed of the view sample."),
    replay_path: Optional[str] = typer.Option(None, "--replay-path", help="Replay with another path (default: the cache's)."),
    quick: bool = typer.Option(False, "--quick", help="Structure and checksums only, no data or teacher."),
):
    """Check structure, checksums, dataset digests and replay fidelity; non-zero exit on any failure."""
    from kdcache.verify import VerifyConfig, verify as run_verify

    has_teacher = teacher is not None or teacher_file is not None
    config = VerifyConfig(
        cache=cache, data=data, views=views, seed=seed, replay_path=replay_path, quick=quick,
        teacher=_teacher_config(teacher, teacher_checkpoint, teacher_file, None) if has_teacher else None,
    )
    run_verify(config, log=typer.echo)


@app.command("make-shards")
@handles_errors
def make_shards(
    data: str = typer.Option(..., "--data", help="Any source spec."),
    output: str = typer.Option(..., "--output", "-o", help="printf pattern, e.g. out/digits-%06d.tar"),
    split: str = typer.Option("train", "--split"),
    samples_per_shard: int = typer.Option(1000, "--samples-per-shard"),
    image_format: str = typer.Option("png", "--image-format"),
):
    """Write a source to webdataset tar shards (to try the streaming path on real data)."""
    from kdcache.shards import write_shards
    from kdcache.sources import open_source

    paths = write_shards(open_source(data, split=split), output, samples_per_shard=samples_per_shard, image_format=image_format)
    _log(f"wrote {len(paths)} shard(s)")
    for path in paths:
        typer.echo(path)


if __name__ == "__main__":
    app()
