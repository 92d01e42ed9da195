"""Several teachers per cache: `kdcache add-teacher` scores the cache's views with another teacher.

The first teacher's files stay byte-identical; the same teacher added under a name writes the
root's record bytes exactly; a killed add-teacher resumes to the bytes of an unbroken one; two
jobs share one teacher's units without computing any twice; every refusal is one line.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from cli_checks import invoke, one_error_line, quiet
from processes import kill_when, units_by_rank
from threads import single_thread

from kdcache.add_teacher import AddTeacherConfig, add_teacher
from kdcache.format import TEACHER_ARRAYS, open_cache
from kdcache.teacher import TeacherConfig

UNITS = [(e, u) for e in range(2) for u in range(3)]  # small_cache: 2 epochs of 3 units


def teacher_config(path) -> TeacherConfig:
    return TeacherConfig(model="test_resnet", checkpoint=str(path))


def run_add_teacher(cache, checkpoint, name: str = "B", **overrides):
    with single_thread():
        return add_teacher(AddTeacherConfig(cache=str(cache), data="digits", teacher=teacher_config(checkpoint), name=name,
                                            command="pytest", **overrides), log=quiet)


def add_teacher_argv(cache, checkpoint, name: str = "B", *extra) -> list[str]:
    return ["add-teacher", str(cache), "--data", "digits", "--teacher", "test_resnet", "--teacher-checkpoint", str(checkpoint),
            "--name", name, *extra]


def root_files(path: Path, helpers) -> dict[str, str]:
    """sha256 of every file of the cache outside teachers/."""
    return {name: digest for name, digest in helpers.tree_hashes(path).items() if not name.startswith("teachers/")}


def group_records(path: Path, name: str = "B") -> dict[str, bytes]:
    """The bytes of a teacher group's shard files, by key."""
    folder = Path(path) / "teachers" / name
    return {str(p.relative_to(folder)): p.read_bytes() for array in TEACHER_ARRAYS for p in sorted((folder / array / "c").rglob("*"))
            if p.is_file()}


def group_ledger(path: Path, name: str = "B") -> dict[str, dict]:
    """A group's ledger entries without their commit times."""
    entries = {}
    for file in sorted((Path(path) / "teachers" / name / "ledger").glob("e*-u*.json")):
        entry = json.loads(file.read_text())
        entry.pop("committed")
        entries[file.name] = entry
    return entries


@pytest.fixture(scope="session")
def teacher_b(make_teacher) -> Path:
    return make_teacher(seed=1)


@pytest.fixture(scope="session")
def two_teachers(tmp_path_factory, small_cache, teacher_b) -> Path:
    """small_cache with teacher B (another seed) added under the name B. Treat as read-only."""
    path = tmp_path_factory.mktemp("two-teachers") / "cache"
    shutil.copytree(small_cache, path)
    run_add_teacher(path, teacher_b)
    return path


def test_adding_a_teacher_leaves_every_file_of_the_first_byte_identical(cache_copy, teacher_b, helpers):
    path, before = cache_copy
    result = run_add_teacher(path, teacher_b)
    assert (result.units_done, result.units_skipped) == (len(UNITS), 0)
    assert root_files(path, helpers) == before  # zarr.json, records, params, plan, ledger and its indexes: all unchanged
    cache = open_cache(path)
    assert cache.teachers == ["main", "B"]
    b = cache.teacher_records("B")
    assert sorted(b.ledger) == UNITS and b.complete_epochs() == [0, 1] and b.indexed_epochs() == [0, 1]
    main_block, b_block = cache.read_block(1, 4), b.read_block(1, 4)
    assert (main_block["params"] == b_block["params"]).all()  # the views are the root's
    assert (main_block["values"] != b_block["values"]).any()  # the records are B's
    assert b.manifest.teacher.weights_sha256 != cache.manifest.teacher.weights_sha256


def test_the_first_teacher_added_again_writes_the_roots_record_bytes(cache_copy, teacher_ckpt):
    """Stored parameters replayed give the very views precompute scored: the same teacher gives the same bytes."""
    path, _ = cache_copy
    run_add_teacher(path, teacher_ckpt, name="again")
    for key, data in group_records(path, "again").items():
        assert (path / key).read_bytes() == data, key
    root = {f"{e:06d}-{u:06d}": json.loads((path / "ledger" / f"e{e:06d}-u{u:06d}.json").read_text())["files"] for e, u in UNITS}
    for name, entry in group_ledger(path, "again").items():
        assert entry["files"] == {k: v for k, v in root[name[1:7] + "-" + name[9:15]].items() if not k.startswith("params/")}


def test_running_it_again_changes_nothing(two_teachers, tmp_path, teacher_b, helpers):
    path = tmp_path / "cache"
    shutil.copytree(two_teachers, path)
    before = helpers.tree_hashes(path)
    result = run_add_teacher(path, teacher_b)
    assert (result.units_done, result.units_skipped) == (0, len(UNITS))
    assert helpers.tree_hashes(path) == before


def test_max_units_then_again_equals_one_run(cache_copy, two_teachers, teacher_b):
    path, _ = cache_copy
    from kdcache.errors import UnfinishedCacheError

    with pytest.raises(UnfinishedCacheError, match="no live writer holds it"):
        run_add_teacher(path, teacher_b, max_units=2)
    assert len(group_ledger(path)) == 2
    run_add_teacher(path, teacher_b)
    assert group_records(path) == group_records(two_teachers)
    assert group_ledger(path) == group_ledger(two_teachers)


def test_one_epoch_asked_scores_that_epoch_only(cache_copy, teacher_b):
    path, _ = cache_copy
    run_add_teacher(path, teacher_b, epochs="1")
    assert sorted(open_cache(path).teacher_records("B").ledger) == [(1, 0), (1, 1), (1, 2)]


def test_the_progress_of_some_epochs_counts_only_their_units(cache_copy, teacher_b):
    path, _ = cache_copy
    run_add_teacher(path, teacher_b, epochs="0")
    lines = []
    with single_thread():
        add_teacher(AddTeacherConfig(cache=str(path), data="digits", teacher=teacher_config(teacher_b), name="B", epochs="1",
                                     command="pytest"), log=lines.append)
    counts = [re.search(r"\((\d+)/(\d+) units", line).groups() for line in lines if line.startswith("committed")]
    assert counts == [("1", "3"), ("2", "3"), ("3", "3")]  # epoch 0's units, committed before, are not counted


@pytest.mark.slow
def test_killed_at_a_random_moment_then_resumed_equals_an_unbroken_run(tmp_path, small_cache, two_teachers, teacher_b,
                                                                        subprocess_env, helpers):
    rng = random.Random(15)
    for trial in range(2):
        path = tmp_path / f"cache{trial}"
        shutil.copytree(small_cache, path)
        ledger = path / "teachers" / "B" / "ledger"
        commits = rng.randrange(0, len(UNITS) - 1)  # 0: during start-up or while the group is being made
        delay = rng.uniform(0, 0.3)

        def ready():
            if len(list(ledger.glob("e*-u*.json")) if ledger.is_dir() else []) < commits:
                return False
            time.sleep(delay)
            return True

        kill_when(helpers.cli_command() + add_teacher_argv(path, teacher_b), ready, what=f"{commits} commit(s)",
                  log_path=tmp_path / f"killed{trial}.log", env=subprocess_env)
        assert len(group_ledger(path)) < len(UNITS), "the kill must land before the last commit"
        resumed = invoke(*add_teacher_argv(path, teacher_b))
        assert resumed.exit_code == 0, resumed.output
        assert group_records(path) == group_records(two_teachers)
        assert group_ledger(path) == group_ledger(two_teachers)
        assert open_cache(path).digest() == open_cache(two_teachers).digest()
        assert root_files(path, helpers) == root_files(small_cache, helpers)


@pytest.mark.slow
def test_two_jobs_at_random_offsets_share_the_units_and_compute_none_twice(tmp_path, small_cache, two_teachers, teacher_b,
                                                                           subprocess_env, helpers):
    rng = random.Random(7)
    path = tmp_path / "cache"
    shutil.copytree(small_cache, path)
    jobs = []
    for number in range(2):
        time.sleep(rng.uniform(0, 1.0))
        log = open(tmp_path / f"job{number}.log", "wb")
        jobs.append((subprocess.Popen(helpers.cli_command() + add_teacher_argv(path, teacher_b, "B", "--batch-size", "64"),
                                      stdout=log, stderr=subprocess.STDOUT, env=subprocess_env), log))
    done = []
    for number, (job, log) in enumerate(jobs):
        assert job.wait(timeout=300) == 0, (tmp_path / f"job{number}.log").read_text()
        log.close()
        text = (tmp_path / f"job{number}.log").read_text()
        done.append([(int(e), int(u)) for e, u in re.findall(r"committed epoch (\d+) unit (\d+)", text)])
    assert sorted(done[0] + done[1]) == UNITS  # every unit once, by one job or the other
    assert group_ledger(path).keys() == group_ledger(two_teachers).keys()
    assert not list((path / "teachers" / "B" / "claims").glob("*.json"))


def test_a_group_made_by_another_teacher_is_refused_in_one_line(two_teachers, tmp_path, teacher_ckpt, helpers):
    path = tmp_path / "cache"
    shutil.copytree(two_teachers, path)
    before = helpers.tree_hashes(path)
    line = one_error_line(invoke(*add_teacher_argv(path, teacher_ckpt, "B")), 4)
    assert "'B' were made with teacher.weights_sha256" in line and "choose another --name" in line
    assert helpers.tree_hashes(path) == before


@pytest.mark.parametrize("name, expected", [("main", "is reserved"), ("all", "is reserved"), ("-x", "letters, digits"),
                                            ("a/b", "letters, digits"), ("", "letters, digits")])
def test_a_reserved_or_bad_name_is_refused_in_one_line(small_cache, teacher_b, name, expected):
    assert expected in one_error_line(invoke(*add_teacher_argv(small_cache, teacher_b, name)), 2)


def test_a_missing_cache_is_refused_in_one_line(tmp_path, teacher_b):
    assert "does not exist" in one_error_line(invoke(*add_teacher_argv(tmp_path / "nothing", teacher_b)), 3)


def test_another_dataset_of_as_many_samples_is_refused_before_the_group_is_made(cache_copy, teacher_b, helpers, monkeypatch):
    import kdcache.add_teacher
    from kdcache.errors import MismatchError

    class Shifted:  # every sample read is its neighbour's: the same count, other bytes
        def __init__(self, source):
            self.source = source

        def __len__(self):
            return len(self.source)

        def __getattr__(self, name):
            return getattr(self.source, name)

        def read(self, indices):
            return self.source.read([(i + 1) % len(self.source) for i in indices])

    real = kdcache.add_teacher.open_source
    monkeypatch.setattr(kdcache.add_teacher, "open_source", lambda *args, **kwargs: Shifted(real(*args, **kwargs)))
    path, before = cache_copy
    with pytest.raises(MismatchError, match="data digits"):
        run_add_teacher(path, teacher_b)
    assert helpers.tree_hashes(path) == before and not (path / "teachers").exists()


def test_a_teacher_of_another_class_count_is_refused_in_one_line(cache_copy, make_teacher, helpers):
    path, before = cache_copy
    line = one_error_line(invoke(*add_teacher_argv(path, make_teacher(num_classes=7))), 4)
    assert "has 7 classes" in line and "10" in line
    assert helpers.tree_hashes(path) == before


# ---- training from one teacher, another, or all ------------------------------------------------------


def test_cache_loader_gives_the_named_teachers_records_of_each_view(two_teachers):
    from kdcache.batches import CacheLoader

    cache = open_cache(two_teachers)
    layout = cache.layout
    for name in ("main", "B", "all"):
        loader = CacheLoader(str(two_teachers), "digits", batch_size=32, teacher_record=name)
        batch = next(iter(loader.epoch(0)))
        views = [(int(e), int(s)) for e, s in batch.views]
        names = ["main", "B"] if name == "all" else [name]
        assert (batch.records is None) == (name != "all")
        for t, teacher in enumerate(names):
            record = batch.records[t] if name == "all" else batch.record
            stored = cache.teacher_records(teacher)
            for row, (epoch, slot) in enumerate(views[:8]):
                block = slot // layout.block_capacity
                arrays = stored.read_block(epoch, block)
                position = slot - block * layout.block_capacity
                assert (record.values[row].numpy() == arrays["values"][position]).all(), (name, teacher, row)
                assert (record.indices[row].numpy() == arrays["indices"][position]).all()


def test_the_loss_over_all_teachers_is_the_mean_of_each_teachers_loss(two_teachers):
    import torch

    from kdcache.batches import CacheLoader
    from kdcache.losses import LossConfig, compute_loss

    batch = next(iter(CacheLoader(str(two_teachers), "digits", batch_size=16, teacher_record="all").epoch(0)))
    logits = torch.randn(len(batch), 10, generator=torch.Generator().manual_seed(0))
    for loss in ("kd", "ttm", "wttm"):
        config = LossConfig(name=loss)
        each = [compute_loss(config, logits, record, batch.target) for record in batch.records]
        torch.testing.assert_close(compute_loss(config, logits, list(batch.records), batch.target), sum(each) / len(each))
    with pytest.raises(Exception, match="'mkd' learns the temperatures of one teacher"):
        compute_loss(LossConfig(name="mkd"), logits, list(batch.records), batch.target, temperatures=(torch.tensor(4.0),) * 2)
    with pytest.raises(Exception, match="temperatures were given but loss 'kd' does not take them"):
        compute_loss(LossConfig(name="kd"), logits, list(batch.records), batch.target, temperatures=(torch.tensor(4.0),) * 2)


@pytest.mark.parametrize("record", ["main", "B", "all"])
def test_train_student_runs_from_each_teacher_and_from_all(two_teachers, tmp_path, record, one_thread):
    result = invoke("train-student", "--data", "digits", "--model", "test_resnet", "--cache", two_teachers, "--run-dir",
                    tmp_path / "run", "--epochs", "1", "--max-steps", "3", "--batch-size", "32", "--amp", "none", "--device", "cpu",
                    "--teacher-record", record)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("first, then", [("all", "main"), ("main", "B"), ("B", "all")])
def test_a_run_resumed_with_another_teacher_record_is_refused_in_one_line(two_teachers, tmp_path, first, then, one_thread):
    def train(record, *extra):
        return invoke("train-student", "--data", "digits", "--model", "test_resnet", "--cache", two_teachers, "--run-dir",
                      tmp_path / "run", "--epochs", "1", "--batch-size", "32", "--amp", "none", "--device", "cpu",
                      "--teacher-record", record, *extra)

    assert train(first, "--max-steps", "2").exit_code == 0
    line = one_error_line(train(then, "--resume"), 2)
    assert f"teacher_record={then!r} but the run in" in line and f"started with teacher_record={first!r}" in line
    assert train(first, "--resume", "--max-steps", "3").exit_code == 0  # the same record resumes


def test_a_run_from_before_several_teachers_resumes_from_main(small_cache, tmp_path, one_thread):
    def train(*extra):
        return invoke("train-student", "--data", "digits", "--model", "test_resnet", "--cache", small_cache, "--run-dir",
                      tmp_path / "run", "--epochs", "1", "--batch-size", "32", "--amp", "none", "--device", "cpu", *extra)

    assert train("--max-steps", "2").exit_code == 0
    saved = tmp_path / "run" / "config.json"
    config = json.loads(saved.read_text())
    del config["teacher_record"]  # its config.json was written without the field
    saved.write_text(json.dumps(config))
    resumed = train("--resume", "--max-steps", "3")
    assert resumed.exit_code == 0, resumed.output
    assert "started with teacher_record" in one_error_line(train("--resume", "--teacher-record", "all"), 2)


@pytest.mark.parametrize("args, code, expected", [
    (["--teacher-record", "C"], 2, "has no teacher records named 'C'; it has main, B (or all)"),
    (["--teacher-record", "all", "--loss", "mkd"], 2, "'mkd' learns the temperatures of one teacher"),
    (["--teacher-record", ""], 2, "has no teacher records named ''"),
])
def test_train_student_refuses_an_unknown_teacher_in_one_line(two_teachers, tmp_path, args, code, expected):
    result = invoke("train-student", "--data", "digits", "--model", "test_resnet", "--cache", two_teachers, "--run-dir",
                    tmp_path / "run", "--amp", "none", "--device", "cpu", *args)
    assert expected in one_error_line(result, code)
    assert not (tmp_path / "run").exists()


def test_a_teacher_record_with_a_live_teacher_is_refused_in_one_line(two_teachers, tmp_path, teacher_b):
    result = invoke("train-student", "--data", "digits", "--model", "test_resnet", "--cache", two_teachers, "--run-dir",
                    tmp_path / "run", "--teacher-record", "B", "--teacher", "test_resnet", "--teacher-checkpoint", teacher_b)
    assert "a live --teacher replaces them" in one_error_line(result, 2)
    assert not (tmp_path / "run").exists()


def test_an_unfinished_teacher_is_refused_before_training(cache_copy, teacher_b, tmp_path):
    from kdcache.errors import UnfinishedCacheError

    path, _ = cache_copy
    with pytest.raises(UnfinishedCacheError):
        run_add_teacher(path, teacher_b, max_units=1)
    result = invoke("train-student", "--data", "digits", "--model", "test_resnet", "--cache", path, "--run-dir", tmp_path / "run",
                    "--amp", "none", "--device", "cpu", "--teacher-record", "B")
    line = one_error_line(result, 3)
    assert "is not committed" in line and "kdcache add-teacher" in line


@pytest.fixture(scope="module")
def learned_from_two(tmp_path_factory, trained_teacher, trained_cache):
    """Two teachers trained with loss ce (seeds 0 and 1), a 2-epoch cache of the first (both shared by the session) with
    the second added as B, and a student trained 3 epochs with KD from main, from B and from all; top-1 on digits:val of
    each."""
    from kdcache.losses import LossConfig
    from kdcache.student import StudentConfig, train_student

    root = tmp_path_factory.mktemp("learn-two")
    common = dict(data="digits", model="test_resnet", val_data="digits:val", batch_size=64, log_every=100, lr=3e-3,
                  weight_decay=0.01, amp="none", device="cpu")
    (_, top1_a), (checkpoint_b, top1_b) = trained_teacher(0), trained_teacher(1)
    top1 = {"teacher A": top1_a, "teacher B": top1_b}
    shutil.copytree(trained_cache, root / "cache")
    run_add_teacher(root / "cache", checkpoint_b)
    with single_thread():
        for record in ("main", "B", "all"):
            result = train_student(StudentConfig(run_dir=str(root / f"student-{record}"), loss=LossConfig(name="kd"),
                                                 cache=str(root / "cache"), epochs=3, teacher_record=record, **common), log=quiet)
            top1[record] = result.final_top1
    print("digits:val top-1:", json.dumps({k: round(v, 4) for k, v in top1.items()}))
    return top1


@pytest.mark.slow
@pytest.mark.parametrize("record", ["main", "B", "all"])
def test_students_learn_digits_from_each_teacher_and_from_all(learned_from_two, record):
    assert learned_from_two["teacher A"] > 0.75 and learned_from_two["teacher B"] > 0.75
    assert learned_from_two[record] > 0.5, learned_from_two


# ---- verify ----------------------------------------------------------------------------------------


def verify_argv(cache, checkpoint, *extra) -> list[str]:
    return ["verify", str(cache), "--data", "digits", "--teacher", "test_resnet", "--teacher-checkpoint", str(checkpoint),
            "--views", "16", *extra]


@pytest.mark.parametrize("teacher, record", [("A", None), ("B", None), ("A", "main"), ("B", "B")])
def test_verify_checks_every_teacher_and_replays_the_one_given(two_teachers, teacher_ckpt, teacher_b, teacher, record, one_thread):
    extra = [] if record is None else ["--teacher-record", record]
    result = invoke(*verify_argv(two_teachers, teacher_ckpt if teacher == "A" else teacher_b, *extra))
    assert result.exit_code == 0, result.output
    checks = dict(re.findall(r"^  (\S+(?: \[B\])?)\s+(.*)$", result.output, flags=re.M))
    assert ("ledger [B]" in checks) == (record != "main") and ("ledger" in checks) == (record != "B")
    if record != "main":
        assert checks["ledger [B]"] == "6 unit(s) committed, 0 missing, 0 damaged"
    replayed = {check for check in checks if check.startswith("replay")}
    assert replayed == {"replay [B]" if teacher == "B" else "replay"}
    assert checks[replayed.pop()].startswith("16 view(s) on path pil: 16 match")
    report = [line for line in result.output.splitlines() if line.startswith("  ")]
    starts = {len(line) - len(re.sub(r"^  \S+(?: \[B\])?\s+", "", line)) for line in report}
    assert len(starts) == 1, report  # every outcome, the result's too, in one column


def test_verify_fails_naming_a_damaged_unit_of_an_added_teacher(two_teachers, tmp_path):
    path = tmp_path / "cache"
    shutil.copytree(two_teachers, path)
    shard = path / "teachers" / "B" / "values" / "c" / "1" / "2" / "0"
    data = bytearray(shard.read_bytes())
    data[40] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = invoke("verify", path, "--quick")
    one_error_line(result, 3)
    assert "teachers/B: epoch 1 unit 2" in result.stdout and "values/c/1/2/0 does not match its ledger checksum" in result.stdout
    assert invoke("verify", path, "--quick", "--teacher-record", "main").exit_code == 0


def test_verify_of_an_unknown_teacher_is_one_line(two_teachers):
    assert "has no teacher records named 'C'" in one_error_line(invoke("verify", two_teachers, "--quick", "--teacher-record", "C"), 2)


def test_info_lists_each_teacher_with_its_units_and_bytes(two_teachers):
    info = json.loads(invoke("info", two_teachers, "--json").stdout)
    (added,) = info["teachers"]
    group = two_teachers / "teachers" / "B"
    on_disk = sum(p.stat().st_size for p in group.rglob("*") if p.is_file() and "claims" not in p.relative_to(group).parts)
    assert (added["name"], added["units_held"], added["units_committed_by_root"], added["k"]) == ("B", 6, 6, 5)
    assert added["size_bytes"] == on_disk and added["epochs_complete"] == [0, 1]
    root = sum(p.stat().st_size for p in two_teachers.rglob("*") if p.is_file() and p.relative_to(two_teachers).parts[0]
               not in ("teachers", "claims"))
    assert info["size_bytes"] == root
    text = invoke("info", two_teachers).stdout
    assert "teacher B" in text and "6/6 units held" in text and "teacher records: main, B" in text


# ---- a teacher of another input size and normalisation ---------------------------------------------------


def save_teacher_at(path: Path, size, mean, std) -> Path:
    import timm
    import torch

    from kdcache.teacher import MODEL_META_KEY

    torch.manual_seed(2)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=10)
    meta = {"input_size": (3, *size), "mean": mean, "std": std, "interpolation": "bilinear"}
    torch.save({"state_dict": model.state_dict(), MODEL_META_KEY: meta}, path)
    return path


def test_a_teacher_of_another_size_scores_the_same_views_at_its_size(cache_copy, tmp_path, helpers, one_thread):
    import dataclasses

    import torch

    from kdcache.augment import cache_spec
    from kdcache.replay import replay_block
    from kdcache.sources import decode_sample, open_source
    from kdcache.teacher import load_teacher

    path, before = cache_copy
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    checkpoint = save_teacher_at(tmp_path / "big.pt", (48, 48), *imagenet)
    assert invoke(*add_teacher_argv(path, checkpoint, "big")).exit_code == 0
    assert root_files(path, helpers) == before
    cache = open_cache(path)
    big = cache.teacher_records("big")
    assert (big.group.size, big.group.mean, big.group.std) == (48, list(imagenet[0]), list(imagenet[1]))
    result = invoke(*verify_argv(path, checkpoint, "--teacher-record", "big"))  # re-scored at 48 px, normalised as it expects
    assert result.exit_code == 0 and "16 match" in result.output, result.output
    # the stored records are the teacher's on the cache's views replayed at 48 px with its own mean and std
    plan = cache.samples()
    images = [decode_sample(s) for s in open_source("digits").read(plan["source_index"][cache.layout.block_slots(0)].tolist())]
    params = cache.read_block(0, 0)["params"]
    spec = dataclasses.replace(cache_spec(cache.manifest), mean=imagenet[0], std=imagenet[1])
    views = replay_block(spec, params, images, size=48)
    assert views.shape[-2:] == (48, 48)
    model, _ = load_teacher(teacher_config(checkpoint))
    with torch.no_grad():
        top1 = model(views).argmax(1).numpy()
    assert (top1 == big.read_block(0, 0)["indices"][:, 0]).mean() > 0.99


def test_a_teacher_of_non_square_input_is_refused_in_one_line(cache_copy, tmp_path, helpers):
    path, before = cache_copy
    checkpoint = save_teacher_at(tmp_path / "wide.pt", (32, 48), (0.5,) * 3, (0.5,) * 3)
    assert "must take square images" in one_error_line(invoke(*add_teacher_argv(path, checkpoint, "wide")), 2)
    assert helpers.tree_hashes(path) == before


# ---- export and merge carry every teacher ------------------------------------------------------------------


def test_export_and_zip_carry_every_teacher_with_one_digest(two_teachers, tmp_path):
    from kdcache.export import ExportConfig, export_cache

    digest = open_cache(two_teachers).digest()
    export_cache(ExportConfig(cache=str(two_teachers), output=str(tmp_path / "copy")), log=quiet)
    export_cache(ExportConfig(cache=str(two_teachers), output=str(tmp_path / "all.zip"), format="zip"), log=quiet)
    for where in (tmp_path / "copy", tmp_path / "all.zip"):
        copy = open_cache(where)
        assert copy.teachers == ["main", "B"] and copy.digest() == digest
        for epoch, block in ((0, 0), (1, 5)):
            for name in ("main", "B"):
                for array, data in open_cache(two_teachers).teacher_records(name).read_block(epoch, block).items():
                    assert (copy.teacher_records(name).read_block(epoch, block)[array] == data).all()
    assert group_records(tmp_path / "copy") == group_records(two_teachers)
    assert invoke("verify", tmp_path / "all.zip", "--quick").exit_code == 0
    export_cache(ExportConfig(cache=str(two_teachers), output=str(tmp_path / "epoch1"), epochs=(1,)), log=quiet)
    subset = open_cache(tmp_path / "epoch1")
    assert sorted(subset.teacher_records("B").ledger) == [(1, 0), (1, 1), (1, 2)]
    assert invoke("verify", tmp_path / "epoch1", "--quick").exit_code == 0


def test_merge_carries_every_teacher_and_refuses_one_name_for_two_teachers(two_teachers, small_cache, tmp_path, teacher_ckpt):
    from kdcache.errors import MismatchError
    from kdcache.export import ExportConfig, export_cache
    from kdcache.merge import merge_caches

    for epoch in (0, 1):
        export_cache(ExportConfig(cache=str(two_teachers), output=str(tmp_path / f"half{epoch}"), epochs=(epoch,)), log=quiet)
    merge_caches(str(tmp_path / "merged"), [str(tmp_path / "half1"), str(tmp_path / "half0")], log=quiet)
    merged = open_cache(tmp_path / "merged")
    assert merged.teachers == ["main", "B"] and merged.digest() == open_cache(two_teachers).digest()
    assert group_records(tmp_path / "merged") == group_records(two_teachers)
    # the same name, another teacher: refused, naming the field
    other = tmp_path / "other"
    shutil.copytree(small_cache, other)
    run_add_teacher(other, teacher_ckpt, name="B")
    with pytest.raises(MismatchError, match=r"the teacher records 'B' differ between .* \(B\.teacher\.weights_sha256"):
        merge_caches(str(tmp_path / "refused"), [str(tmp_path / "half1"), str(other)], log=quiet)
    assert not (tmp_path / "refused").exists()
    line = one_error_line(invoke("merge", tmp_path / "refused", tmp_path / "half1", other), 4)
    assert "the teacher records 'B' differ" in line


# ---- show -------------------------------------------------------------------------------------------------


def test_show_draws_a_named_teachers_top5(two_teachers, tmp_path, teacher_b):
    from kdcache.show import ShowConfig, collect_views

    shown = {name: collect_views(ShowConfig(cache=str(two_teachers), data="digits", epoch=1, output=str(tmp_path / "x.png"), count=4,
                                            teacher_record=name)) for name in ("main", "B")}
    b = open_cache(two_teachers).teacher_records("B").read_block(1, 0)
    for row in shown["B"]:
        assert (row.indices == b["indices"][row.position]).all()
    assert any((m.indices != o.indices).any() for m, o in zip(shown["main"], shown["B"]))
    result = invoke("show", two_teachers, "--data", "digits", "--epoch", "1", "--out", tmp_path / "b.png", "--count", "2",
                    "--teacher-record", "B", "--teacher", "test_resnet", "--teacher-checkpoint", teacher_b)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "b.png").is_file()
    for record, expected in (("C", "has no teacher records named 'C'"), ("all", "show draws one teacher's records")):
        line = one_error_line(invoke("show", two_teachers, "--data", "digits", "--epoch", "1", "--out", tmp_path / "c.png",
                                     "--teacher-record", record), 2)
        assert expected in line


def test_a_webdataset_export_carries_every_teacher_and_trains_from_each(two_teachers, tmp_path, teacher_b, one_thread):
    from kdcache.batches import CacheLoader

    result = invoke("export", two_teachers, tmp_path / "wds", "--format", "wds")
    assert result.exit_code == 0, result.output
    index = json.loads((tmp_path / "wds" / "kdcache-wds.json").read_text())
    assert index["version"] == 2 and sorted(index["teachers"]) == ["B"]
    exported, cache = open_cache(tmp_path / "wds"), open_cache(two_teachers)
    assert exported.teachers == ["main", "B"]
    for name in ("main", "B"):
        for array, data in cache.teacher_records(name).read_block(1, 3).items():
            assert (exported.teacher_records(name).read_block(1, 3)[array] == data).all(), (name, array)
    batch = next(iter(CacheLoader(str(tmp_path / "wds"), "digits", batch_size=16, teacher_record="all").epoch(0)))
    assert len(batch.records) == 2
    verified = invoke(*verify_argv(tmp_path / "wds", teacher_b))
    assert verified.exit_code == 0 and "replay [B]" in verified.output, verified.output
    import webdataset  # the members a plain webdataset pipeline sees (it lower-cases the part after the key)

    first = next(iter(webdataset.WebDataset(str(tmp_path / "wds" / "e000000-u000000.tar"), shardshuffle=False)))
    assert {"values.npy", "teacher.b.values.npy", "teacher.b.indices.npy", "teacher.b.tail.npy", "params.npy"} <= set(first)


def test_an_older_reader_refuses_a_webdataset_export_of_several_teachers(two_teachers, tmp_path):
    """Version 2 marks an export with added teachers: a reader of version 1 refuses it (naming both) rather than drop them."""
    from kdcache.format import wds

    assert invoke("export", two_teachers, tmp_path / "wds", "--format", "wds").exit_code == 0
    older = wds.WDS_TEACHERS_VERSION
    try:
        wds.WDS_TEACHERS_VERSION = None  # what a kdcache before several teachers reads
        line = one_error_line(invoke("info", tmp_path / "wds"), 3)
    finally:
        wds.WDS_TEACHERS_VERSION = older
    assert "webdataset container version 2 is not supported" in line


def test_a_webdataset_export_of_a_teacher_missing_a_unit_is_refused_in_one_line(cache_copy, teacher_b, tmp_path):
    from kdcache.errors import UnfinishedCacheError

    path, _ = cache_copy
    with pytest.raises(UnfinishedCacheError):
        run_add_teacher(path, teacher_b, max_units=2)
    line = one_error_line(invoke("export", path, tmp_path / "wds", "--format", "wds"), 3)
    assert "the teacher records 'B' lack epoch" in line and "kdcache add-teacher" in line
    assert not (tmp_path / "wds").exists()


@pytest.mark.slow
def test_two_torchrun_ranks_add_the_same_records_as_one_process(tmp_path, small_cache, two_teachers, teacher_b, subprocess_env,
                                                                 helpers):
    import sys

    path = tmp_path / "cache"
    shutil.copytree(small_cache, path)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(helpers.free_port()), "--tee", "3", "-m", "kdcache_cli.main", *add_teacher_argv(path, teacher_b)]
    run = subprocess.run(command, capture_output=True, text=True, env=subprocess_env, timeout=300)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    by_rank = units_by_rank(output)
    assert sorted(by_rank[0] + by_rank[1]) == UNITS and by_rank[0] and by_rank[1], output
    assert output.count("created the teacher records 'B'") == 1  # rank 0 alone makes the group
    assert group_records(path) == group_records(two_teachers) and group_ledger(path) == group_ledger(two_teachers)
    assert root_files(path, helpers) == root_files(small_cache, helpers)


def test_epochs_added_to_the_cache_are_scored_by_running_add_teacher_again(two_teachers, tmp_path, make_config, teacher_b, helpers):
    path = tmp_path / "cache"
    shutil.copytree(two_teachers, path)
    helpers.run_precompute(make_config(path, epochs=3, resume=True))  # the root grows; the group's arrays stay as made
    cache = open_cache(path)
    assert cache.teacher_records("B").complete_epochs() == [0, 1]
    verified = invoke("verify", path, "--quick")
    assert verified.exit_code == 3 and re.search(r"ledger \[B\]\s+6 unit\(s\) committed, 3 missing", verified.output), verified.output
    before = group_records(path)
    result = run_add_teacher(path, teacher_b)
    assert (result.units_done, result.units_skipped) == (3, 6)
    assert {k: v for k, v in group_records(path).items() if k in before} == before
    assert open_cache(path).teacher_records("B").complete_epochs() == [0, 1, 2]
    assert invoke("verify", path, "--quick").exit_code == 0


@pytest.mark.parametrize("args, code, expected", [
    (["--topk", "many"], 2, "--topk 'many'"),
    (["--topk", "0"], 2, "--topk 0"),
    (["--epochs", "5"], 2, "has epochs 0 to 1"),
    (["--epochs", "x"], 2, "is not a number or a range"),
    (["--batch-size", "0"], 2, "--batch-size 0"),
])
def test_bad_options_are_refused_in_one_line(cache_copy, teacher_b, helpers, args, code, expected):
    path, before = cache_copy
    assert expected in one_error_line(invoke(*add_teacher_argv(path, teacher_b, "B", *args)), code)
    assert helpers.tree_hashes(path) == before


def test_without_a_teacher_or_on_a_url_it_is_refused_in_one_line(small_cache, teacher_b):
    line = one_error_line(invoke("add-teacher", small_cache, "--data", "digits", "--name", "B"), 2)
    assert "needs exactly one of --teacher" in line
    line = one_error_line(invoke(*add_teacher_argv("http://127.0.0.1:9/cache", teacher_b)), 2)
    assert "writes into a local cache directory" in line


def test_a_damaged_unit_of_an_added_teacher_is_found_and_scored_again_with_repair(two_teachers, tmp_path, teacher_b):
    path = tmp_path / "cache"
    shutil.copytree(two_teachers, path)
    shard = path / "teachers" / "B" / "indices" / "c" / "0" / "1" / "0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x55
    shard.write_bytes(bytes(data))
    (path / "teachers" / "B" / "ledger" / "e000001-u000000.json").write_text("{not json")
    line = one_error_line(invoke("verify", path, "--quick"), 3)
    assert "teachers/B: ledger entry ledger/e000001-u000000.json is not valid JSON" in line
    result = invoke(*add_teacher_argv(path, teacher_b, "B", "--repair"))
    assert result.exit_code == 0, result.output
    assert "repair: 1 damaged unit(s) of the teacher records 'B' will be scored again" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "computed 2 unit(s)"
    assert group_records(path) == group_records(two_teachers) and group_ledger(path) == group_ledger(two_teachers)
    assert invoke("verify", path, "--quick").exit_code == 0


def test_index_writes_an_added_teachers_epoch_indexes(two_teachers, tmp_path):
    path = tmp_path / "cache"
    shutil.copytree(two_teachers, path)
    shutil.rmtree(path / "teachers" / "B" / "ledger" / "epochs")
    assert open_cache(path).teacher_records("B").indexed_epochs() == []
    result = invoke("index", path)
    assert result.exit_code == 0 and "teacher B: epoch indexes 2 written" in result.stderr, result.output
    assert open_cache(path).teacher_records("B").indexed_epochs() == [0, 1]
    assert open_cache(path).digest() == open_cache(two_teachers).digest()


def test_a_served_cache_of_several_teachers_reads_every_teacher(two_teachers, serve_directory):
    url = serve_directory(two_teachers.parent) + "/" + two_teachers.name
    remote, here = open_cache(url), open_cache(two_teachers)
    assert remote.teachers == ["main", "B"] and remote.digest() == here.digest()
    for name in ("main", "B"):
        for array, data in here.teacher_records(name).read_block(1, 2).items():
            assert (remote.teacher_records(name).read_block(1, 2)[array] == data).all()
    assert invoke("verify", url, "--quick").exit_code == 0


def test_teachers_of_other_k_train_together(cache_copy, teacher_b):
    import torch

    from kdcache.batches import CacheLoader
    from kdcache.losses import LossConfig, compute_loss

    path, _ = cache_copy
    run_add_teacher(path, teacher_b, name="top3", topk=3)
    assert open_cache(path).teacher_records("top3").manifest.k == 3
    batch = next(iter(CacheLoader(str(path), "digits", batch_size=16, teacher_record="all").epoch(0)))
    assert [record.k for record in batch.records] == [5, 3]
    logits = torch.zeros(len(batch), 10, requires_grad=True)
    compute_loss(LossConfig(name="kd"), logits, list(batch.records), batch.target).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
