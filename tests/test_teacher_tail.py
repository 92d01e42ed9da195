"""An added teacher keeps the record the default gives it: its own tail spec and tail code's basis in its group.

A group's ``tail`` (with the basis fitted on its own teacher's logits) is what its records are
made, read, verified, resumed, merged and exported with; a group without one (every group made
before) reads as the format-version-1 record, as it did. Every refusal is one line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_checks import invoke, one_error_line
from PIL import Image

from kdcache.batches import teacher_records
from kdcache.format import GroupWriter, open_cache
from kdcache.losses import distillation_kl

CLASSES = 48  # a tail of 46 classes outside the top 2: the default record gives it a code (rank 22)


def add_teacher(cache, checkpoint, *extra, name: str = "B", data: str = "digits"):
    return invoke("add-teacher", cache, "--data", data, "--teacher", "test_resnet", "--teacher-checkpoint", checkpoint,
                  "--name", name, *extra)


def verify(cache, checkpoint, *extra, data: str = "digits"):
    return invoke("verify", cache, "--data", data, "--teacher", "test_resnet", "--teacher-checkpoint", checkpoint,
                  "--teacher-record", "B", *extra)


def group_attributes(cache: Path, name: str = "B") -> dict:
    return json.loads((cache / "teachers" / name / "zarr.json").read_text())["attributes"]["kdcache_teacher"]


def write_group_attributes(cache: Path, attributes: dict, name: str = "B") -> None:
    path = cache / "teachers" / name / "zarr.json"
    root = json.loads(path.read_text())
    root["attributes"]["kdcache_teacher"] = attributes
    path.write_text(json.dumps(root))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    """An image folder of 48 classes, 3 images each."""
    root = tmp_path_factory.mktemp("folder48")
    rng = np.random.default_rng(0)
    for c in range(CLASSES):
        (root / f"c{c:02d}").mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(root / f"c{c:02d}" / f"{i}.png")
    return f"imagefolder:{root}"


@pytest.fixture(scope="module")
def wide_cache(tmp_path_factory, folder, make_teacher) -> Path:
    """The folder's cache of a 48-class teacher, top 2 and the version-1 record (--tail-rank 0): a version-1 root."""
    path = tmp_path_factory.mktemp("wide") / "cache"
    made = invoke("precompute-logits", "--output", path, "--data", folder, "--teacher", "test_resnet", "--teacher-checkpoint",
                  make_teacher(num_classes=CLASSES), "--topk", "2", "--tail-rank", "0", "--block-size", "64",
                  "--blocks-per-unit", "1")
    assert made.exit_code == 0, made.output
    return path


@pytest.fixture(scope="module")
def coded(tmp_path_factory, small_digits, make_teacher) -> Path:
    """small_digits with teacher B (seed 1) added with a rank-3 code. Treat as read-only."""
    path = tmp_path_factory.mktemp("coded") / "cache"
    shutil.copytree(small_digits, path)
    added = add_teacher(path, make_teacher(seed=1), "--topk", "2", "--tail-rank", "3")
    assert added.exit_code == 0, added.output
    return path


@pytest.fixture(scope="module")
def small_digits(tmp_path_factory, teacher_ckpt) -> Path:
    """digits, 1 epoch, top 2 of 10 (the default record: version 1), 3 units of 2 blocks of 256."""
    path = tmp_path_factory.mktemp("digits2") / "cache"
    made = invoke("precompute-logits", "--output", path, "--data", "digits", "--teacher", "test_resnet", "--teacher-checkpoint",
                  teacher_ckpt, "--topk", "2", "--block-size", "256", "--blocks-per-unit", "2")
    assert made.exit_code == 0, made.output
    return path


# ---- the default record, and what it buys -----------------------------------------------------------------------


def test_an_added_teacher_gets_the_default_code_and_its_kd_loss_at_t4_is_closer_to_full_logits(
        wide_cache, tmp_path, make_teacher, folder, one_thread):
    cache = tmp_path / "cache"
    shutil.copytree(wide_cache, cache)
    teacher = make_teacher(seed=1, num_classes=CLASSES)
    assert add_teacher(cache, teacher, data=folder).exit_code == 0
    assert add_teacher(cache, teacher, "--topk", "full", name="Bfull", data=folder).exit_code == 0  # the same logits, all of them
    opened = open_cache(cache)
    assert opened.manifest.format_version == 1 and "rank" not in opened.manifest.tail  # the root is untouched
    records = opened.teacher_records("B")
    assert records.manifest.format_version == 2
    assert records.manifest.tail["rank"] == (CLASSES - 2 - 1) // 2 and "basis" in group_attributes(cache)["tail"]
    coded, full = teacher_records(cache, 0, 0, teacher_record="B"), teacher_records(cache, 0, 0, teacher_record="Bfull")
    student = torch.randn(coded.values.shape[0], CLASSES, generator=torch.Generator().manual_seed(0))

    def kd(record, tail):
        return distillation_kl(student, record, teacher_temperature=4.0, student_temperature=4.0, tail=tail).mean().item()

    reference = kd(full, "estimated")
    assert abs(kd(coded, "estimated") - reference) < 0.5 * abs(kd(coded, "bucket") - reference)
    info = invoke("info", cache)
    assert "records top-2 fp16 logits + tail summary at T = 1, 2, 4 + a rank-22 tail code" in info.output, info.output
    trained = invoke("train-student", "--cache", cache, "--data", folder, "--model", "test_resnet", "--loss", "kd",
                     "--teacher-record", "all", "--epochs", "1", "--max-steps", "1", "--batch-size", "32",
                     "--run-dir", tmp_path / "run")
    assert trained.exit_code == 0, trained.output
    said = {line.split(" at the loss's")[0].split("teacher records ")[-1]: line for line in trained.output.splitlines()
            if "at the loss's temperature T = 4" in line}
    assert sorted(said) == ["B", "Bfull", "main"], trained.output
    assert "reads the tail from its rank-22 tail code" in said["B"] and "reads every logit" in said["Bfull"]
    assert "as one bucket" in said["main"]


def test_a_coded_teacher_verifies_and_an_edited_code_value_fails_verify_naming_the_tail_code(coded, tmp_path, make_teacher,
                                                                                             one_thread):
    teacher = make_teacher(seed=1)
    assert open_cache(coded).manifest.format_version == 1
    checked = verify(coded, teacher, "--views", "32")
    assert checked.exit_code == 0 and "32 match" in checked.output, checked.output
    cache = tmp_path / "cache"
    shutil.copytree(coded, cache)
    records = open_cache(cache).teacher_records("B")
    arrays = {a: np.concatenate([records.read_block(0, b)[a] for b in (0, 1)]) for a in ("values", "indices", "tail")}
    value = arrays["tail"][7, -1]
    arrays["tail"][7, -1] = value - 12 if value > 0 else value + 12  # one coordinate, committed with a good checksum
    (cache / "teachers" / "B" / "ledger" / "epochs" / "e000000.json").unlink()  # indexed again with the new entry
    writer = GroupWriter(cache, "B")
    writer.write_unit(0, 0, arrays)
    writer.write_epoch_index(0)
    sample = open_cache(cache).samples()["key"][7]
    failed = verify(cache, teacher, "--views", "1437")
    assert failed.exit_code != 0 and f"sample {sample}, block 0): tail code differs by 12" in failed.output, failed.output


# ---- resume ---------------------------------------------------------------------------------------------------


def test_a_resumed_add_teacher_keeps_the_groups_spec_and_basis(coded, small_digits, tmp_path, make_teacher, one_thread):
    cache = tmp_path / "cache"
    shutil.copytree(small_digits, cache)
    teacher = make_teacher(seed=1)
    assert add_teacher(cache, teacher, "--topk", "2", "--tail-rank", "3", "--max-units", "1").exit_code == 7
    made = (cache / "teachers" / "B" / "zarr.json").read_bytes()
    resumed = add_teacher(cache, teacher)  # no --tail-rank: the group's record (the default here would have no code)
    assert resumed.exit_code == 0, resumed.output
    assert (cache / "teachers" / "B" / "zarr.json").read_bytes() == made
    for epoch, block in ((0, 0), (0, 5)):
        for array, data in open_cache(coded).teacher_records("B").read_block(epoch, block).items():
            assert np.array_equal(open_cache(cache).teacher_records("B").read_block(epoch, block)[array], data), array


def test_a_conflicting_tail_rank_on_resume_is_refused_in_one_line(coded, tmp_path, make_teacher):
    cache = tmp_path / "cache"
    shutil.copytree(coded, cache)
    line = one_error_line(add_teacher(cache, make_teacher(seed=1), "--tail-rank", "2"), 4)
    assert "the teacher records 'B' were made with tail.rank 3, this run asks for 2" in line
    assert group_attributes(cache) == group_attributes(coded)


# ---- merge and export ---------------------------------------------------------------------------------------------


def test_merge_and_export_carry_the_groups_code_and_the_result_verifies(coded, tmp_path, make_teacher, one_thread):
    tail = open_cache(coded).teacher_records("B").manifest.tail
    digest = open_cache(coded).digest()
    for target, fmt in (("copy", "zarr"), ("cache.zip", "zip"), ("wds", "wds")):
        exported = invoke("export", coded, tmp_path / target, "--format", fmt, *(["--data", "digits"] if fmt == "wds" else []))
        assert exported.exit_code == 0, exported.output
        copy = open_cache(tmp_path / target)
        assert copy.teacher_records("B").manifest.tail == tail
        assert torch.equal(teacher_records(tmp_path / target, 0, 3, teacher_record="B").tail,
                           teacher_records(coded, 0, 3, teacher_record="B").tail)
        if fmt != "wds":
            assert copy.digest() == digest
    for part, blocks in (("part1", "0-1"), ("part2", "2-5")):
        assert invoke("export", coded, tmp_path / part, "--blocks", blocks).exit_code == 0
    merged = invoke("merge", tmp_path / "merged", tmp_path / "part1", tmp_path / "part2")
    assert merged.exit_code == 0, merged.output
    assert open_cache(tmp_path / "merged").digest() == digest
    checked = verify(tmp_path / "merged", make_teacher(seed=1), "--views", "32")
    assert checked.exit_code == 0 and "32 match" in checked.output, checked.output


def test_merge_refuses_one_teacher_coded_on_two_bases(coded, tmp_path):
    for part, blocks in (("part1", "0-1"), ("part2", "2-5")):
        assert invoke("export", coded, tmp_path / part, "--blocks", blocks).exit_code == 0
    attributes = group_attributes(tmp_path / "part2")
    basis = np.frombuffer(__import__("base64").b64decode(attributes["tail"]["basis"]), dtype="<f4").copy()
    basis[0] += 1.0
    attributes["tail"]["basis"] = __import__("base64").b64encode(basis.astype("<f4").tobytes()).decode()
    write_group_attributes(tmp_path / "part2", attributes)
    line = one_error_line(invoke("merge", tmp_path / "merged", tmp_path / "part1", tmp_path / "part2"), 4)
    assert "the teacher records 'B' differ" in line and "B.tail.basis" in line


def test_the_digest_covers_the_groups_tail(coded, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(coded, cache)
    attributes = group_attributes(cache)
    attributes["tail"]["code_floor"] = 0.1
    write_group_attributes(cache, attributes)
    assert open_cache(cache).digest() != open_cache(coded).digest()


# ---- a group made before groups kept their own record ----------------------------------------------------------------


def test_a_group_without_a_tail_field_opens_trains_verifies_and_resumes_as_the_version_1_record(
        wide_cache, tmp_path, make_teacher, folder, one_thread):
    cache = tmp_path / "cache"
    shutil.copytree(wide_cache, cache)
    teacher = make_teacher(seed=1, num_classes=CLASSES)
    assert add_teacher(cache, teacher, "--tail-rank", "0", "--max-units", "1", data=folder).exit_code == 7
    attributes = group_attributes(cache)
    assert "tail" not in attributes  # as the previous version wrote every group
    resumed = add_teacher(cache, teacher, data=folder)  # the default would be a code: the group keeps its record
    assert resumed.exit_code == 0, resumed.output
    assert group_attributes(cache) == attributes
    records = open_cache(cache).teacher_records("B")
    assert records.manifest.tail == {"betas": [1.0, 0.25], "temperature_range": [0.5, 10.0]}
    assert records.read_block(0, 2)["tail"].shape[1] == 2
    checked = verify(cache, teacher, "--views", "16", data=folder)
    assert checked.exit_code == 0 and "16 match" in checked.output, checked.output
    trained = invoke("train-student", "--cache", cache, "--data", folder, "--model", "test_resnet", "--loss", "kd",
                     "--teacher-record", "all", "--epochs", "1", "--max-steps", "1", "--batch-size", "32",
                     "--run-dir", tmp_path / "run")
    assert trained.exit_code == 0, trained.output


# ---- refusals --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, code, message", [
    (["--tail-rank", "4"], 2, "--tail-rank 4 needs more than 8 classes outside the top 2"),
    (["--tail-samples", "8"], 2, "--tail-samples 8: the tail has only 8 classes"),
    (["--tail-rank", "-1"], 2, "--tail-rank -1; expected a whole number >= 0"),
])
def test_a_record_the_added_teachers_classes_cannot_hold_is_refused_in_one_line(small_digits, tmp_path, make_teacher, flags,
                                                                                 code, message):
    cache = tmp_path / "cache"
    shutil.copytree(small_digits, cache)
    line = one_error_line(add_teacher(cache, make_teacher(seed=1), "--topk", "2", *flags), code)
    assert message in line and not (cache / "teachers" / "B").exists()


@pytest.mark.parametrize("edit, field", [
    (lambda tail: tail.update(basis="AAAA"), "tail.basis"),
    (lambda tail: tail.update(code_levels=0), "tail.code_levels"),
    (lambda tail: tail.pop("betas"), "field tail = "),
    (lambda tail: tail.update(samples=9), "tail.samples"),
])
def test_a_malformed_group_tail_is_refused_in_one_line_naming_the_field(coded, tmp_path, edit, field):
    cache = tmp_path / "cache"
    shutil.copytree(coded, cache)
    attributes = group_attributes(cache)
    edit(attributes["tail"])
    write_group_attributes(cache, attributes)
    line = one_error_line(invoke("info", cache), 3)
    assert "teachers/B/zarr.json" in line and field in line


def test_a_reader_of_groups_without_their_tail_refuses_a_coded_group_naming_the_field(coded):
    """Why the root keeps its format version: a kdcache that reads groups but not their ``tail`` refuses a coded group
    (unknown fields, one line), rather than read its wider arrays as the version-1 record."""
    import dataclasses

    from kdcache.errors import FormatError
    from kdcache.format.group import TeacherGroup
    from kdcache.format.manifest import TeacherInfo, _build

    older = dataclasses.make_dataclass("OlderGroup", [(f.name, f.type) for f in dataclasses.fields(TeacherGroup)
                                                      if f.name != "tail"], frozen=True, kw_only=True)
    attributes = group_attributes(coded)
    attributes["teacher"] = _build(TeacherInfo, attributes["teacher"], "teacher")
    with pytest.raises(FormatError, match=r"unknown fields \['tail'\]"):
        _build(older, attributes, "teachers/B/zarr.json")
