"""`kdcache verify` as a gate: every preset verifies; every kind of drift fails, naming what drifted.

Caches: digits, one epoch per preset, with the tiny ``test_resnet`` teacher (conftest). The
tampering tests change exactly one thing each: a stored parameter (recommitted with a valid
checksum, so only the replay checks can see it), one image of the dataset, the teacher's
weights, the replay path, one byte of a shard file. Each must fail with a message that names
the view, sample, weights or file; through the CLI, verify exits with the code of the first problem's kind
(3 damaged files, 4 other data or weights, 5 views that do not reproduce) and lists each problem once.
"""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from kdcache.augment import PRESETS, cache_spec
from kdcache.errors import ConfigError, VerifyError
from kdcache.format import CacheWriter, ledger_key, open_cache, shard_key, write_epoch_index
from kdcache.plan import read_block
from kdcache.record import make_records
from kdcache.replay import replay_block
from kdcache.sources import decode_sample, open_source
from kdcache.teacher import TeacherConfig, load_teacher, teacher_logits
from kdcache.verify import VerifyConfig, _pick_views, compare_records, verify_cache
from kdcache_cli.main import app

pytestmark = pytest.mark.usefixtures("one_thread")

VIEWS = 40


def teacher_config(checkpoint) -> TeacherConfig:
    return TeacherConfig(model="test_resnet", checkpoint=str(checkpoint))


def run_verify(cache, checkpoint=None, **overrides):
    """verify() with the digits data and the teacher; returns (report, logged lines)."""
    lines: list[str] = []
    fields = dict(cache=str(cache), data="digits", views=VIEWS)
    if checkpoint is not None:
        fields["teacher"] = teacher_config(checkpoint)
    fields.update(overrides)
    report = verify_cache(VerifyConfig(**fields), log=lines.append)
    return report, lines


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def verify_argv(cache, checkpoint, *extra):
    return ["verify", cache, "--data", "digits", "--teacher", "test_resnet", "--teacher-checkpoint", checkpoint,
            "--views", VIEWS, *extra]


def one_error_line(result, exit_code: int) -> str:
    """The CLI failed with ``exit_code`` and said why on exactly one stderr line, without a traceback."""
    assert result.exit_code == exit_code, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def first_failure(result, exit_code: int) -> str:
    """A failed verify: one `error:` line counting the problems, and the first FAILED line of the report."""
    line = one_error_line(result, exit_code)
    assert "failed verification" in line and "listed above" in line, line
    failed = [row.strip().removeprefix("FAILED").strip() for row in result.stdout.splitlines() if row.strip().startswith("FAILED")]
    assert failed and sum(failed[0] in row for row in result.output.splitlines()) == 1, "a problem is printed twice"
    return failed[0]


@pytest.fixture(scope="module")
def preset_cache(tmp_path_factory, make_config, helpers):
    """``preset_cache(name) -> Path``: digits, one epoch of ``name`` (made once per module)."""
    root = tmp_path_factory.mktemp("presets")
    made: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in made:
            helpers.run_precompute(make_config(root / name, augmentation=name, epochs=1))
            made[name] = root / name
        return made[name]

    return make


@pytest.fixture
def small_copy(small_cache, tmp_path) -> Path:
    """A private copy of the shared light cache (2 epochs, 3 units each), free to damage."""
    return Path(shutil.copytree(small_cache, tmp_path / "cache"))


# ---- every preset verifies ------------------------------------------------------------------


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_verifies_on_the_pil_path(name, preset_cache, teacher_ckpt):
    cache_path = preset_cache(name)
    report, lines = run_verify(cache_path, teacher_ckpt)
    assert report.ok and report.failures == []
    assert [check for check, _ in report.checks] == ["structure", "ledger", "dataset", "replay"]
    assert dict(report.checks)["ledger"] == "3 unit(s) committed, 0 missing, 0 damaged"
    assert dict(report.checks)["dataset"] == "1437 sample digests match"
    n = report.views_checked
    assert 0.9 * VIEWS <= n <= VIEWS and report.replay_path == "pil"
    assert dict(report.checks)["replay"].startswith(f"{n} view(s) on path pil: {n} match")
    # the teacher batches differ from precompute's (a few picked views, not whole blocks), so a value
    # may move by one fp16 step; never more (the exact comparison is the next test)
    cache = open_cache(cache_path)
    largest = max(np.abs(cache.read_block(0, b)["values"].astype(np.float32)).max() for b in range(6))
    assert report.max_abs_diff <= float(np.spacing(np.float16(largest)))
    assert lines[-1].endswith("\n  result       OK")


@pytest.mark.parametrize("name", PRESETS)
def test_replayed_block_gives_the_stored_records_bit_for_bit(name, preset_cache, teacher_ckpt):
    # precompute scored each block as one batch (batch size 256 = block size); doing the same
    # with the stored parameters must give the very fp16 values, indices and tail
    cache = open_cache(preset_cache(name))
    m, plan = cache.manifest, cache.samples()
    block = 5  # the short last block: 157 views
    where = cache.layout.block_slots(block)
    images = [decode_sample(s) for s in read_block(open_source("digits"), cache.layout, block, plan["source_index"][where])]
    stored = cache.read_block(0, block)
    teacher, _ = load_teacher(teacher_config(teacher_ckpt))
    views = replay_block(cache_spec(m), stored["params"], images, path="pil")
    values, indices, tail = make_records(teacher_logits(teacher, views, "cpu"), m.k)
    assert len(images) == 157 and m.replay["path"] == "pil"
    np.testing.assert_array_equal(values.numpy(), stored["values"])
    np.testing.assert_array_equal(indices.numpy().astype(stored["indices"].dtype), stored["indices"])
    np.testing.assert_array_equal(tail.numpy(), stored["tail"])


def test_verify_checks_as_many_views_as_asked(preset_cache, teacher_ckpt):
    report, _ = run_verify(preset_cache("light"), teacher_ckpt)
    assert report.views_checked == VIEWS


def test_verify_through_the_cli_passes(small_cache, teacher_ckpt):
    result = invoke(*verify_argv(small_cache, teacher_ckpt))
    assert result.exit_code == 0, result.output
    assert re.search(r"replay +\d+ view\(s\) on path pil: \d+ match", result.stdout)
    assert result.stdout.strip().endswith("result       OK") and result.stderr == ""


# ---- a stored parameter or record changed and recommitted with a valid checksum ------------------


def rewrite_picked_view(path: Path, array: str, change) -> tuple[int, int, str]:
    """Change one view that verify (seed 0) will pick, in ``array``, and recommit its unit.

    Returns (epoch, block, sample key) of the changed view.
    """
    cache = open_cache(path)
    layout = cache.layout
    (epoch, block), positions = sorted(_pick_views(cache, VIEWS, 0).items())[0]
    position = positions[0]
    unit = layout.unit_of(block)
    arrays = {name: np.array(a, copy=True) for name, a in cache.read_unit(epoch, unit).items()}
    row = (block - layout.unit_blocks(unit).start) * layout.block_capacity + position
    change(arrays[array][row], cache.manifest)
    CacheWriter(path).write_unit(epoch, unit, arrays)
    write_epoch_index(path, epoch)  # a recommit consistent in every checksum, the epoch index too
    key = str(cache.samples()["key"][layout.block_slots(block)][position])
    return epoch, block, key


def test_perturbed_crop_parameter_fails_naming_the_view_and_field(small_copy, teacher_ckpt):
    stored = {}

    def shrink_crop(row, manifest):
        column = manifest.param_fields.index("crop_height")
        stored["drawn"] = float(row[column])
        row[column] -= 1  # still a valid crop inside the 8x8 image

    epoch, block, key = rewrite_picked_view(small_copy, "params", shrink_crop)
    drawn = stored["drawn"]
    run_verify(small_copy, quick=True)  # the unit's checksums are valid: structure and ledger pass
    with pytest.raises(VerifyError) as caught:
        run_verify(small_copy, teacher_ckpt)
    assert str(caught.value).startswith(
        f"view (epoch {epoch}, sample {key}): stored parameter crop_height = {drawn - 1:g}, the spec and seed give {drawn:g}"
    )
    # with the re-draw check off, replaying the changed crop through the teacher still catches it
    with pytest.raises(VerifyError, match=rf"^view \(epoch {epoch}, sample {key}, block {block}\): (logit of class|class at rank)"):
        run_verify(small_copy, teacher_ckpt, check_params=False)
    line = first_failure(invoke(*verify_argv(small_copy, teacher_ckpt)), 5)
    assert f"view (epoch {epoch}, sample {key}): stored parameter crop_height" in line


def test_changed_stored_logit_fails_naming_the_view(small_copy, teacher_ckpt):
    def bump(row, manifest):
        row[0] = np.float16(float(row[0]) + 0.5)

    epoch, block, key = rewrite_picked_view(small_copy, "values", bump)
    with pytest.raises(VerifyError) as caught:
        run_verify(small_copy, teacher_ckpt)
    message = str(caught.value)
    assert message.startswith(f"view (epoch {epoch}, sample {key}, block {block}): logit of class ")
    assert re.search(r"is -?[\d.]+, stored -?[\d.]+ \(\|diff\| 0\.5 > fp16 rounding", message), message


# ---- the dataset, the teacher or the replay path differs -------------------------------------------


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_replaced_image_fails_naming_the_sample(tmp_path, make_config, helpers, teacher_ckpt):
    source = open_source("digits")
    samples = source.read(range(200))
    root = tmp_path / "folder"
    counts = dict.fromkeys(range(10), 0)
    for sample in samples:  # six images per class, digits as 8x8 PNG files
        if counts[sample.label] < 6:
            (root / str(sample.label)).mkdir(parents=True, exist_ok=True)
            (root / str(sample.label) / f"{sample.key}.png").write_bytes(png(np.asarray(decode_sample(sample).convert("L"))))
            counts[sample.label] += 1
    data = f"imagefolder:{root}"
    cache = tmp_path / "cache"
    helpers.run_precompute(make_config(cache, data=data, epochs=1, block_size=16))
    report, _ = run_verify(cache, teacher_ckpt, data=data, views=8)
    assert report.ok and dict(report.checks)["dataset"] == "60 sample digests match"

    victim = root / "7" / sorted(p.name for p in (root / "7").iterdir())[2]
    victim.write_bytes(png(np.full((8, 8), 200, dtype=np.uint8)))
    key = f"7/{victim.stem}"
    with pytest.raises(VerifyError) as caught:
        run_verify(cache, teacher_ckpt, data=data, views=8)
    assert re.match(rf"data {re.escape(data)} block \d: sample '{key}' differs from the cache's dataset "
                    rf"\(expected key '{key}', label 7, digest [0-9a-f]{{16}}; found label 7, digest [0-9a-f]{{16}}\)$",
                    str(caught.value)), str(caught.value)
    line = first_failure(invoke("verify", cache, "--data", data, "--teacher", "test_resnet",
                                "--teacher-checkpoint", teacher_ckpt, "--views", 8), 4)
    assert f"sample '{key}' differs" in line


def test_other_teacher_weights_fail_naming_the_weights(small_cache, make_teacher):
    other = make_teacher(seed=1)
    with pytest.raises(VerifyError) as caught:
        run_verify(small_cache, other)
    assert re.match(rf"teacher weights differ: {re.escape(str(other))} has sha256 [0-9a-f]{{16}}\.\.\., "
                    rf"the cache was made with [0-9a-f]{{16}}\.\.\. \(and \d+ more\)$", str(caught.value)), str(caught.value)
    line = first_failure(invoke(*verify_argv(small_cache, other)), 4)
    assert line.startswith(f"teacher weights differ: {other} has sha256")


def test_tensor_replay_of_a_pil_strong_cache_fails_naming_a_view(preset_cache, teacher_ckpt):
    cache = preset_cache("strong")
    lines: list[str] = []
    with pytest.raises(VerifyError) as caught:
        verify_cache(VerifyConfig(cache=str(cache), data="digits", teacher=teacher_config(teacher_ckpt), views=VIEWS,
                            replay_path="tensor"), log=lines.append)
    assert re.match(r"view \(epoch 0, sample digits-\d{4}, block \d\): (logit of class \d|class at rank \d)", str(caught.value))
    report = "\n".join(lines)
    assert re.search(r"replay +\d+ view\(s\) on path tensor \(cache made with pil\): \d+ match", report), report
    line = first_failure(invoke(*verify_argv(cache, teacher_ckpt, "--replay-path", "tensor")), 5)
    assert re.match(r"view \(epoch 0, sample digits-\d{4}, block \d\): ", line), line


def test_unknown_replay_path_is_a_config_error(small_cache, teacher_ckpt):
    line = one_error_line(invoke(*verify_argv(small_cache, teacher_ckpt, "--replay-path", "gpu")), 2)
    assert line == "error: --replay-path 'gpu'; expected one of pil, tensor, device"


# ---- --quick: structure and checksums only ----------------------------------------------------------


def test_quick_passes_without_data_or_teacher(small_cache):
    result = invoke("verify", small_cache, "--quick")
    assert result.exit_code == 0, result.output
    assert "ledger       6 unit(s) committed, 0 missing, 0 damaged" in result.stdout
    assert "dataset" not in result.stdout and "replay" not in result.stdout
    assert result.stdout.strip().endswith("result       OK")


@pytest.mark.parametrize("array", ["values", "params"])
def test_quick_fails_on_a_flipped_byte_naming_epoch_unit_and_file(small_copy, array):
    key = shard_key(array, 1, 2)
    data = bytearray((small_copy / key).read_bytes())
    data[len(data) // 2] ^= 0x01
    (small_copy / key).write_bytes(bytes(data))
    line = first_failure(invoke("verify", small_copy, "--quick"), 3)
    assert f"epoch 1 unit 2 (blocks 4..5): file {key} does not match its ledger checksum" in line
    with pytest.raises(VerifyError, match=re.escape(f"epoch 1 unit 2 (blocks 4..5): file {key}")):
        run_verify(small_copy, quick=True)


def test_quick_fails_on_an_uncommitted_unit(small_copy):
    (small_copy / ledger_key(0, 1)).unlink()
    line = first_failure(invoke("verify", small_copy, "--quick"), 3)
    assert line == "epoch 0 unit 1 (blocks 2..3) is not committed"


# ---- what verify needs -------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [[], ["--data", "digits"], ["--teacher", "test_resnet", "--teacher-checkpoint"]])
def test_replay_without_data_or_teacher_is_a_config_error(small_cache, teacher_ckpt, extra):
    if extra and extra[-1] == "--teacher-checkpoint":
        extra = extra + [teacher_ckpt]
    line = one_error_line(invoke("verify", small_cache, *extra), 2)
    assert line.startswith("error: replay fidelity needs --data and the teacher") and "--quick" in line
    with pytest.raises(ConfigError, match=r"replay fidelity needs --data and the teacher"):
        VerifyConfig(cache=str(small_cache), data="digits" if "--data" in extra else None)


def test_missing_cache_is_named(tmp_path):
    line = one_error_line(invoke("verify", tmp_path / "nope", "--quick"), 3)
    assert line == f"error: cache {tmp_path / 'nope'} does not exist"


# ---- near-ties: records that differ only where fp16 cannot tell classes apart ------------------


def _record(values, indices) -> dict:
    return {"values": np.asarray(values, dtype=np.float16), "indices": np.asarray(indices, dtype=np.uint8)}


def test_a_reordering_within_fp16_rounding_is_a_near_tie():
    logits = np.array([0.0, 2.0, 2.0 + 2**-12, -1.0], dtype=np.float32)  # classes 1 and 2 equal in fp16
    problem, near = compare_records(_record([2.0, 2.0], [2, 1]), np.array([2.0, 2.0], np.float32), np.array([1, 2]), logits)
    assert near and "class at rank 0 is 1" in problem


def test_a_swap_at_the_kth_place_between_near_equal_logits_is_a_near_tie():
    logits = np.array([3.0, 1.0, 1.0 + 2**-12, -1.0], dtype=np.float32)  # the 2nd place: class 1 or 2
    problem, near = compare_records(_record([3.0, 1.0], [0, 2]), np.array([3.0, 1.0], np.float32), np.array([0, 1]), logits)
    assert near and "rank 1" in problem


def test_another_class_is_a_failure_even_with_equal_values():
    logits = np.array([3.0, 1.0, 0.5, -1.0], dtype=np.float32)  # class 2 is far below the 2nd place
    problem, near = compare_records(_record([3.0, 1.0], [0, 2]), np.array([3.0, 1.0], np.float32), np.array([0, 1]), logits)
    assert not near and problem.startswith("class at rank 1 is 1")


def test_equal_records_are_neither_failures_nor_near_ties():
    assert compare_records(_record([3.0, 1.0], [0, 1]), np.array([3.0, 1.0], np.float32), np.array([0, 1])) == (None, False)


@pytest.mark.slow
def test_a_one_thread_cache_verifies_with_two_threads_and_another_batch_size(small_cache, teacher_ckpt, subprocess_env, helpers):
    """small_cache is scored with one thread in batches of 256; verify re-scores with two threads in batches of 37."""
    import subprocess

    env = dict(subprocess_env, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2")
    run = subprocess.run([*helpers.cli_command(), "verify", str(small_cache), "--data", "digits", "--teacher", "test_resnet",
                          "--teacher-checkpoint", str(teacher_ckpt), "--views", "300", "--batch-size", "37"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.search(r"300 view\(s\) on path pil: 300 match", run.stdout), run.stdout


def test_bad_verify_batch_size_is_refused(small_cache):
    result = CliRunner().invoke(app, ["verify", str(small_cache), "--quick", "--batch-size", "0"])
    assert result.exit_code == 2 and result.stderr.strip() == "error: --batch-size 0; expected a positive integer"
