"""`kdcache quickstart`: the main job end to end on the embedded default (scikit-learn's digits).

1. train a teacher with ``--loss ce`` (this is how teachers are made),
2. precompute a cache of its views (``light`` augmentation, several epochs, top-k < C so the
   tail summary is exercised),
3. train the same small student from the cache with each loss (ce, kd, ttm, wttm, mkd),
4. verify the cache against the data and the teacher,
5. print a table of accuracies and times (also written as ``results.json``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from kdcache.errors import ConfigError
from kdcache.format import open_cache
from kdcache.location import refuse_file_in_the_way
from kdcache.losses import LossConfig
from kdcache.precompute import PrecomputeConfig, precompute_logits
from kdcache.student import MODEL_NAME, StudentConfig, train_student
from kdcache.teacher import TeacherConfig
from kdcache.verify import VerifyConfig, verify_cache

LOSSES = ("ce", "kd", "ttm", "wttm", "mkd")


@dataclass(frozen=True, kw_only=True)
class QuickstartConfig:
    out: str = "kdcache-quickstart"
    data: str = "digits:train"
    val_data: str = "digits:val"
    teacher_model: str = "resnet10t"
    student_model: str = "test_resnet"
    img_size: int = 32
    teacher_epochs: int = 15
    cache_epochs: int = 4
    student_epochs: int = 8
    topk: int = 5
    augmentation: str = "light"
    batch_size: int = 64
    losses: tuple[str, ...] = LOSSES
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [name for name in self.losses if name not in LOSSES]
        if unknown:
            raise ConfigError(f"quickstart losses {unknown}; expected some of {', '.join(LOSSES)}")
        refuse_file_in_the_way(self.out, "quickstart output")
        if Path(self.out).exists() and any(Path(self.out).iterdir()):
            raise ConfigError(f"quickstart output {self.out} exists and is not empty; remove it or pass --out NEW_DIR")


def run_quickstart(config: QuickstartConfig, *, log=print) -> list[dict]:
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    def step(title):
        log(f"\n== {title}")
        return time.perf_counter()

    start = step(f"1/5 train the teacher ({config.teacher_model}, {config.teacher_epochs} epochs, loss ce)")
    teacher = train_student(StudentConfig(
        data=config.data, val_data=config.val_data, model=config.teacher_model, run_dir=str(out / "teacher"),
        loss=LossConfig(name="ce"), augmentation=config.augmentation, img_size=config.img_size,
        epochs=config.teacher_epochs, batch_size=config.batch_size, lr=2e-3, warmup_epochs=0, seed=config.seed,
        log_every=10**9,
    ), log=log)
    rows.append({"run": f"teacher {config.teacher_model}", "loss": "ce", "top1": teacher.final_top1,
                 "seconds": time.perf_counter() - start, "images_per_s": teacher.images_per_s})
    teacher_config = TeacherConfig(model=config.teacher_model, checkpoint=str(out / "teacher" / MODEL_NAME))

    start = step(f"2/5 precompute the cache ({config.augmentation}, {config.cache_epochs} epochs, top-{config.topk})")
    cache = str(out / "cache")
    made = precompute_logits(PrecomputeConfig(
        data=config.data, output=cache, teacher=teacher_config, augmentation=config.augmentation,
        epochs=config.cache_epochs, seed=config.seed, topk=config.topk, block_size=128, blocks_per_unit=4,
        batch_size=256,
    ), log=log)
    rows.append({"run": "precompute", "loss": "-", "top1": None, "seconds": time.perf_counter() - start,
                 "images_per_s": made.views_per_second})
    manifest = open_cache(cache).manifest
    if manifest.k < manifest.teacher.num_classes:
        log(f"the cache keeps the top {manifest.k} of {manifest.teacher.num_classes} logits on purpose, to show a partial "
            "record at work: each student's start says how much of the teacher's mass that leaves out (--topk full "
            "keeps every logit)")

    for index, name in enumerate(config.losses):
        start = step(f"3/5 student {config.student_model} from the cache, loss {name} ({index + 1}/{len(config.losses)})")
        result = train_student(StudentConfig(
            data=config.data, val_data=config.val_data, cache=cache, model=config.student_model,
            run_dir=str(out / f"student-{name}"), loss=LossConfig(name=name), epochs=config.student_epochs,
            batch_size=config.batch_size, lr=2e-3, seed=config.seed, log_every=10**9,
        ), log=log)
        rows.append({"run": f"student {config.student_model}", "loss": name, "top1": result.final_top1,
                     "seconds": time.perf_counter() - start, "images_per_s": result.images_per_s})

    start = step("4/5 verify the cache (structure, checksums, dataset digests, 64 replayed views)")
    report = verify_cache(VerifyConfig(cache=cache, data=config.data, teacher=teacher_config, views=64, seed=config.seed), log=log)
    rows.append({"run": "verify", "loss": "-", "top1": None, "seconds": time.perf_counter() - start,
                 "images_per_s": report.views_checked / max(time.perf_counter() - start, 1e-9)})

    log("\n== 5/5 results")
    log(format_table(rows))
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'run':<28} {'loss':<6} {'top-1':>7} {'time (s)':>9} {'images/s':>9}", "-" * 63]
    for row in rows:
        top1 = "" if row["top1"] is None else f"{100 * row['top1']:.2f}%"
        lines.append(f"{row['run']:<28} {row['loss']:<6} {top1:>7} {row['seconds']:>9.1f} {row['images_per_s']:>9.0f}")
    return "\n".join(lines)
