"""Records that keep the method (format version 2): the sampled tail, the tail code and their estimates.

The draw's inclusion probabilities are recomputable and exact; the Horvitz-Thompson estimate of
the teacher's full distribution is unbiased, so the expected gradients (student logits and both
temperatures) are the full-logit ones; the tail code carries a low-rank teacher's tail; a
version-2 cache is made, verified and trained from, and a version-1 cache still is.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from kdcache.errors import FormatError
from kdcache.format import Manifest, open_cache, read_manifest
from kdcache.location import Location
from kdcache.losses import distillation_kl, log_power_sum
from kdcache.record import (CODE_FIT_V2_0, DEFAULT_TAIL, TAIL_BETAS, TailSpec, checked_shape_error, code_check, TeacherRecord, encode_basis, fit_tail_basis, make_records,
                            tail_log_mass, view_uniforms)
from kdcache_cli.main import app

FIXTURE = Path(__file__).resolve().parent / "data" / "v1-2026-11"
SPEC = TailSpec(betas=(1.0, 0.5, 0.25), samples=6)


def teacher_logits(views: int = 3, classes: int = 60, seed: int = 0) -> torch.Tensor:
    """A structured teacher: a dominant class, a few related ones, and a graded bulk."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(views, classes, generator=g) * 1.5
    logits[:, :5] += torch.rand(views, 5, generator=g) * 6
    logits[torch.arange(views), torch.randint(0, classes, (views,), generator=g)] += 9
    return logits


def repeated_records(logits: torch.Tensor, draws: int, spec: TailSpec = SPEC, k: int = 5) -> TeacherRecord:
    """``draws`` independent draws of each view's record, stacked draw-major ``[draws * B, ...]``."""
    uniforms = np.random.default_rng(7).random(draws * len(logits))
    return TeacherRecord.from_logits(logits.repeat(draws, 1), k, spec, uniforms=uniforms)


def test_the_draw_takes_s_distinct_tail_classes_with_inclusion_probabilities_that_sum_to_s():
    logits = teacher_logits(views=40)
    record = TeacherRecord.from_logits(logits, 5, SPEC, uniforms=view_uniforms(0, 0, range(40)))
    pi = (-record.log_weights()).exp()
    pads = torch.isinf(record.log_weights())
    for row in range(40):
        drawn = record.sampled_indices[row][~pads[row]].tolist()
        assert len(set(drawn)) == len(drawn) and not set(drawn) & set(record.indices[row].tolist())
        assert drawn == sorted(drawn)  # systematic sampling in class order
    assert pads.float().mean() < 0.1  # fp16 rounding of ell makes a draw one short only rarely
    assert torch.all((pi[~pads] > 0) & (pi[~pads] <= 1))
    # every tail class's inclusion probability, summed, is s (up to the rounding of ell, downwards)
    offsets = logits.half().float() - record.values[:, :1].float()
    ell = record.tail[:, len(SPEC.betas)].float()
    full = torch.clamp(torch.exp(ell.unsqueeze(-1) + SPEC.proposal_beta * offsets) + SPEC.uniform_share * 6 / 55, max=1.0)
    full = full.scatter(-1, record.indices, 0.0)
    assert torch.all(full.sum(-1) <= 6 + 1e-4) and torch.all(full.sum(-1) > 5.9)


def test_the_same_keys_draw_the_same_classes_and_other_keys_others():
    logits = teacher_logits(views=8)
    one = make_records(logits, 5, SPEC, uniforms=view_uniforms(3, 1, range(8)))
    two = make_records(logits, 5, SPEC, uniforms=view_uniforms(3, 1, range(8)))
    other = make_records(logits, 5, SPEC, uniforms=view_uniforms(3, 2, range(8)))
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    assert not torch.equal(one[1], other[1])


def test_the_horvitz_thompson_sum_is_unbiased_for_any_tail_function():
    logits = teacher_logits(views=2, classes=60)
    draws = 4000
    record = repeated_records(logits, draws)
    weights = record.log_weights().exp().view(draws, 2, -1)
    f = torch.sin(torch.arange(60.0)) + 2  # an arbitrary positive function of the class
    estimates = (weights * f[record.sampled_indices].view(draws, 2, -1)).sum(-1)
    tail = torch.ones(2, 60, dtype=torch.bool).scatter(-1, record.indices[:2], False)
    truth = (f * tail).sum(-1)
    error = (estimates.mean(0) - truth).abs()
    assert torch.all(error < 5 * estimates.std(0) / math.sqrt(draws)), (estimates.mean(0), truth)


@pytest.mark.parametrize("kind, value", [("kd", 1.0), ("kd", 4.0), ("ttm", 0.25), ("wttm", 0.8)])
def test_the_expected_gradient_is_the_full_logit_gradient(kind, value):
    logits = teacher_logits(views=3)
    student = torch.randn(3, 60, generator=torch.Generator().manual_seed(1))
    draws = 3000
    record = repeated_records(logits, draws)
    full = TeacherRecord.from_logits(logits, 60)

    def loss(z, r):  # per-view distillation terms (the CE term is exact in every record)
        if kind == "kd":
            return value**2 * distillation_kl(z, r, teacher_temperature=value, student_temperature=value, tail="estimated")
        kl = distillation_kl(z, r, teacher_temperature=1 / value, student_temperature=1.0, tail="estimated")
        return kl * log_power_sum(r, value).exp() if kind == "wttm" else kl

    z = student.clone().requires_grad_(True)
    (reference,) = torch.autograd.grad(loss(z, full).sum(), z)
    zs = student.repeat(draws, 1).requires_grad_(True)
    (grads,) = torch.autograd.grad(loss(zs, record).sum(), zs)
    grads = grads.view(draws, 3, 60)
    standard_error = grads.std(0) / math.sqrt(draws)
    assert torch.all((grads.mean(0) - reference).abs() <= 5 * standard_error + 2e-3 * reference.abs().max())


def test_the_expected_temperature_gradients_are_the_full_logit_ones():
    logits = teacher_logits(views=2)
    student = torch.randn(2, 60, generator=torch.Generator().manual_seed(2))
    draws = 3000
    record = repeated_records(logits, draws)
    full = TeacherRecord.from_logits(logits, 60)

    def temperature_grads(r, z):
        t_t = torch.tensor(4.0, requires_grad=True)
        t_s = torch.tensor(3.0, requires_grad=True)
        kl = distillation_kl(z, r, teacher_temperature=t_t, student_temperature=t_s, tail="estimated").sum()
        return torch.stack(torch.autograd.grad(kl, [t_t, t_s]))

    reference = temperature_grads(full, student)
    per_draw = torch.stack([temperature_grads(TeacherRecord.from_stored(
        torch.cat([record.values, record.sampled_values], -1)[d * 2:(d + 1) * 2],
        torch.cat([record.indices, record.sampled_indices], -1)[d * 2:(d + 1) * 2],
        record.tail[d * 2:(d + 1) * 2], 60, SPEC, k=5), student) for d in range(400)])
    standard_error = per_draw.std(0) / math.sqrt(len(per_draw))
    assert torch.all((per_draw.mean(0) - reference).abs() <= 5 * standard_error + 1e-3 * reference.abs()), (per_draw.mean(0), reference)


def test_a_full_record_gives_the_full_logit_loss_exactly_in_every_tail_mode():
    logits = teacher_logits(views=4)
    student = torch.randn(4, 60)
    full = TeacherRecord.from_logits(logits, 60, SPEC, uniforms=np.zeros(4))
    assert full.samples == 0 and full.spec.betas == TAIL_BETAS  # nothing to sample when every logit is kept
    want = torch.nn.functional.kl_div(torch.log_softmax(student / 4, -1), torch.log_softmax(logits.half().float() / 4, -1),
                                      log_target=True, reduction="none").sum(-1)
    for tail in ("estimated", "bucket", "uniform"):
        got = distillation_kl(student, full, teacher_temperature=4.0, student_temperature=4.0, tail=tail)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_the_tail_code_carries_a_low_rank_teachers_tail():
    g = torch.Generator().manual_seed(3)
    features, head = torch.randn(600, 6, generator=g), torch.randn(6, 80, generator=g) * 2
    logits = features @ head
    basis = fit_tail_basis(logits[:300], 7)  # rank 6, plus the affine offset of the mean
    test, student = logits[300:364], torch.randn(64, 80, generator=g)
    full = TeacherRecord.from_logits(test, 80)
    coded = TeacherRecord.from_logits(test, 5, TailSpec(betas=(1.0, 0.5, 0.25), rank=7), basis=basis)
    bucket = TeacherRecord.from_logits(test, 5)
    for temperature in (1.0, 4.0, 8.0):
        want = distillation_kl(student, full, teacher_temperature=temperature, student_temperature=temperature)
        coded_error = (distillation_kl(student, coded, teacher_temperature=temperature, student_temperature=temperature,
                                       tail="estimated") - want).abs().max()
        bucket_error = (distillation_kl(student, bucket, teacher_temperature=temperature, student_temperature=temperature,
                                        tail="bucket") - want).abs().max()
        assert coded_error < 0.02 * want.abs().max() and coded_error < bucket_error / 5, (temperature, coded_error, bucket_error)

    def temperature_grads(record, tail):  # MKD's meta-parameters, through the code's shape and tail mass
        t_t, t_s = torch.tensor(4.0, requires_grad=True), torch.tensor(3.0, requires_grad=True)
        kl = distillation_kl(student, record, teacher_temperature=t_t, student_temperature=t_s, tail=tail).mean()
        return torch.stack(torch.autograd.grad(kl, [t_t, t_s]))

    want = temperature_grads(full, "bucket")
    got = temperature_grads(coded, "estimated")
    assert torch.isfinite(got).all() and torch.allclose(got, want, rtol=0.02), (got, want)


def _structured_teacher(views: int, classes: int, rank: int, seed: int) -> torch.Tensor:
    """A low-rank teacher with a little full-rank noise: its tail has structure a code carries, and a rest it does not."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(views, rank, generator=g) @ (torch.randn(rank, classes, generator=g) * 1.5) \
        + 0.3 * torch.randn(views, classes, generator=g)


def test_the_weighted_code_fits_the_tails_largest_classes_better_than_the_projection():
    logits = _structured_teacher(800, 300, 24, seed=5)
    spec = TailSpec(betas=(1.0, 0.5, 0.25), rank=12, code_levels=31, code_beta=0.5, code_floor=0.05)
    plain = dataclasses.replace(spec, code_levels=CODE_FIT_V2_0[0], code_beta=0.0, code_floor=0.0)
    basis = fit_tail_basis(logits[:400], spec.rank, spec.code_levels)
    test, k = logits[400:656], 10
    full = TeacherRecord.from_logits(test, 300)
    weighted = TeacherRecord.from_logits(test, k, spec, basis=basis)
    projected = TeacherRecord.from_logits(test, k, plain, basis=fit_tail_basis(logits[:400], spec.rank))
    codes = weighted.tail[:, -spec.rank:].float()
    assert torch.equal(codes, codes.round()) and codes.abs().max() > 5  # whole numbers, and steps fine enough to use many
    # a view at three times the scale of any calibration view keeps its code (unclipped), so its tail's shape
    # is off by about three times as much as the view's own, not by the clipped coordinates
    def shape_error(record, logits):
        in_tail = torch.ones_like(logits, dtype=torch.bool).scatter(-1, record.indices.long(), False)
        off = (record.shape_logits() - logits).masked_fill(~in_tail, 0.0)
        off = (off - off.sum(-1, keepdim=True) / in_tail.sum(-1, keepdim=True)).masked_fill(~in_tail, 0.0)
        return off.square().sum(-1).div(in_tail.sum(-1)).sqrt()

    big = TeacherRecord.from_logits(3 * test[:8], k, spec, basis=basis)
    assert big.tail[:, -spec.rank:].abs().max() > 31
    assert (shape_error(big, 3 * test[:8]) < 4 * shape_error(weighted, test)[:8]).all()
    student = 0.5 * test + torch.randn(test.shape, generator=torch.Generator().manual_seed(6))

    def gradient_error(record, temperature):  # the KD term's logit gradient against every logit's, relative
        def grad(r, tail):
            z = student.clone().requires_grad_(True)
            distillation_kl(z, r, teacher_temperature=temperature, student_temperature=temperature, tail=tail).sum().backward()
            return z.grad
        want = grad(full, "bucket")
        return float((grad(record, "estimated") - want).norm() / want.norm())

    for temperature in (1.0, 2.0, 4.0):
        w, p = gradient_error(weighted, temperature), gradient_error(projected, temperature)
        assert w < 0.9 * p, (temperature, w, p)


def test_a_weighted_code_is_named_in_the_manifest_and_a_first_version_2_tail_reads_as_the_projection():
    assert DEFAULT_TAIL.code_beta > 0 and TailSpec.from_json(DEFAULT_TAIL.to_json()) == DEFAULT_TAIL
    assert {"code_levels", "code_beta", "code_floor"} <= set(DEFAULT_TAIL.to_json())
    first = {"betas": [1.0, 0.5, 0.25], "temperature_range": [0.5, 10.0], "rank": 20}  # as the first version-2 caches wrote it
    spec = TailSpec.from_json(first)
    assert (spec.code_levels, spec.code_beta, spec.code_floor) == CODE_FIT_V2_0 and spec.to_json() == first


@pytest.mark.parametrize("fields, message", [
    ({"code_levels": 0}, "code_levels 0"), ({"code_levels": 4096}, "code_levels 4096"),
    ({"code_beta": -1.0}, "code_beta -1.0"), ({"code_beta": 0.5, "code_floor": 0.0}, "above 0 with a code_beta"),
    ({"code_floor": 1.5}, "code_floor 1.5"),
])
def test_a_tail_spec_refuses_a_code_fit_out_of_range(fields, message):
    with pytest.raises(ValueError, match=message):
        TailSpec(betas=(1.0, 0.5), rank=4, **fields)


def test_three_anchors_rebuild_the_tail_mass_between_them_better_than_two():
    logits = teacher_logits(views=64, classes=200)
    two = make_records(logits, 10)
    three = make_records(logits, 10, TailSpec(betas=(1.0, 0.5, 0.25)))
    masked = logits.scatter(-1, two[1], float("-inf"))
    for beta in (0.5, 0.8):
        exact = torch.logsumexp(beta * masked, -1)
        error_two = (tail_log_mass(two[0], two[2], 200, beta) - exact).abs().max()
        error_three = (tail_log_mass(three[0], three[2], 200, beta, TailSpec(betas=(1.0, 0.5, 0.25))) - exact).abs().max()
        assert error_three < error_two


# ----------------------------------------------------------------------------------------------- the format


def test_a_cache_with_a_tail_code_and_sampled_classes_is_made_verified_and_trained_from(tmp_path, precompute_argv,
                                                                                        teacher_ckpt, one_thread):
    out = tmp_path / "cache"
    argv = precompute_argv(out, topk=2, epochs=1) + ["--tail-rank", "3", "--tail-samples", "2"]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert "basis fitted on the teacher's logits of 1437 view(s)" in result.output
    cache = open_cache(out)
    m = cache.manifest
    assert m.format_version == 2 and m.tail["rank"] == 3 and m.tail["samples"] == 2 and "basis" in m.tail
    block = cache.read_block(0, 0)
    assert block["values"].shape[1] == 4 and block["tail"].shape[1] == 3 + 1 + 3
    info = CliRunner().invoke(app, ["info", str(out)])
    assert "a rank-3 tail code + 2 sampled tail classes" in info.output and "format v2" in info.output
    verify = CliRunner().invoke(app, ["verify", str(out), "--data", "digits", "--teacher", "test_resnet",
                                      "--teacher-checkpoint", str(teacher_ckpt), "--views", "48"])
    assert verify.exit_code == 0, verify.output
    assert "48 match" in verify.output
    from kdcache.batches import teacher_records

    record = teacher_records(out, epoch=0, block=0)
    assert record.samples == 2 and record.spec.rank == 3 and record.k == 2
    student = torch.randn(record.values.shape[0], 10)
    assert torch.isfinite(distillation_kl(student, record, teacher_temperature=4.0, student_temperature=4.0,
                                          tail="estimated")).all()


def test_every_container_and_command_carries_a_version_2_record(tmp_path, precompute_argv, teacher_ckpt, one_thread):
    """add-teacher, verify, export (zip and wds), merge, show and the digest on a cache with a code and sampled classes."""
    from kdcache.batches import teacher_records

    out = tmp_path / "cache"
    runner = CliRunner()
    assert runner.invoke(app, precompute_argv(out, topk=2, epochs=1) + ["--tail-rank", "3", "--tail-samples", "2"]).exit_code == 0
    teacher = ["--data", "digits", "--teacher", "test_resnet", "--teacher-checkpoint", str(teacher_ckpt)]
    added = runner.invoke(app, ["add-teacher", str(out), *teacher, "--name", "t2", "--topk", "2"])
    assert added.exit_code == 0, added.output
    digest = open_cache(out).digest()
    for container, fmt in (("cache.zip", "zip"), ("copy", "zarr"), ("wds", "wds")):
        target = tmp_path / container
        exported = runner.invoke(app, ["export", str(out), str(target), "--format", fmt] + (["--data", "digits"] if fmt == "wds" else []))
        assert exported.exit_code == 0, exported.output
        copy = open_cache(target)
        assert copy.manifest.tail == open_cache(out).manifest.tail and copy.manifest.format_version == 2
        if fmt != "wds":  # a webdataset export has a digest of its own (docs/format.md)
            assert copy.digest() == digest
        main = teacher_records(target, epoch=0, block=1)
        assert main.samples == 2 and main.spec.rank == 3
        assert torch.equal(main.sampled_indices, teacher_records(out, epoch=0, block=1).sampled_indices)
    for part, blocks in (("part1", "0-1"), ("part2", "2-5")):
        assert runner.invoke(app, ["export", str(out), str(tmp_path / part), "--blocks", blocks]).exit_code == 0
    merged = runner.invoke(app, ["merge", str(tmp_path / "merged"), str(tmp_path / "part1"), str(tmp_path / "part2")])
    assert merged.exit_code == 0, merged.output
    assert open_cache(tmp_path / "merged").digest() == digest
    verified = runner.invoke(app, ["verify", str(tmp_path / "cache.zip"), *teacher, "--views", "16"])
    assert verified.exit_code == 0 and "replay [t2]" in verified.output, verified.output
    shown = runner.invoke(app, ["show", str(out), "--data", "digits", "--epoch", "0", "--out", str(tmp_path / "views.png")])
    assert shown.exit_code == 0 and (tmp_path / "views.png").stat().st_size > 0, shown.output
    trained = runner.invoke(app, ["train-student", "--cache", str(tmp_path / "wds"), "--data", "digits", "--model", "test_resnet",
                                  "--loss", "kd", "--teacher-record", "all", "--epochs", "1", "--max-steps", "1",
                                  "--batch-size", "64", "--run-dir", str(tmp_path / "run")])
    assert trained.exit_code == 0, trained.output


def test_a_tail_code_edited_in_a_cache_fails_verify(tmp_path, precompute_argv, teacher_ckpt, one_thread):
    out = tmp_path / "cache"
    assert CliRunner().invoke(app, precompute_argv(out, topk=2, epochs=1) + ["--tail-rank", "3"]).exit_code == 0
    root = json.loads((out / "zarr.json").read_text())
    basis = fit_tail_basis(torch.randn(50, 10), 3)  # another basis: every stored code now disagrees
    root["attributes"]["kdcache"]["tail"]["basis"] = encode_basis(basis)
    (out / "zarr.json").write_text(json.dumps(root))
    verify = CliRunner().invoke(app, ["verify", str(out), "--data", "digits", "--teacher", "test_resnet",
                                      "--teacher-checkpoint", str(teacher_ckpt), "--views", "8"])
    assert verify.exit_code != 0 and "tail code differs" in verify.output


@pytest.mark.parametrize("flags, message", [
    (["--tail-rank", "4"], "--tail-rank 4 needs more than 8 classes outside the top 2"),
    (["--tail-samples", "8"], "--tail-samples 8: the tail has only 8 classes"),
    (["--tail-rank", "-1"], "--tail-rank -1; expected a whole number >= 0"),
])
def test_a_record_the_classes_cannot_hold_is_refused_in_one_line(tmp_path, precompute_argv, flags, message):
    out = tmp_path / "cache"
    result = CliRunner().invoke(app, precompute_argv(out, topk=2, epochs=1) + flags)
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert message in result.output and not out.exists()


def test_the_default_record_of_few_classes_is_still_format_version_1(small_cache):
    manifest = read_manifest(Location(small_cache))
    assert manifest.format_version == 1 and manifest.tail == {"betas": [1.0, 0.25], "temperature_range": [0.5, 10.0]}


def _manifest_dict(path: Path) -> dict:
    return json.loads((path / "zarr.json").read_text())["attributes"]["kdcache"]


@pytest.mark.parametrize("edit, field", [
    (lambda m: m.update(format_version=3), "format_version 3 is not supported"),
    (lambda m: m["tail"].update(samples=2), "nothing sampled or coded in a format-version-1 cache"),
    (lambda m: m.update(format_version=2) or m["tail"].update(rank=2, basis="AAAA"), "tail.basis"),
    (lambda m: m.update(format_version=2) or m["tail"].update(samples=-1), "tail.samples"),
    (lambda m: m.update(format_version=2) or m["tail"].update(code_levels=0), "tail.code_levels"),
    (lambda m: m.update(format_version=2) or m["tail"].update(code_beta=-0.5), "tail.code_beta"),
    (lambda m: m.update(format_version=2) or m["tail"].update(code_beta=0.5, code_floor=0.0), "tail.code_floor"),
    (lambda m: m.update(format_version=2) or m["tail"].update(code_check={"temperatures": [4.0], "shape_tv_median": [1.5]}),
     "tail.code_check"),
    (lambda m: m.update(format_version=2) or m["tail"].update(code_check={"temperatures": [4.0, 8.0], "shape_tv_median": [0.1]}),
     "tail.code_check"),
])
def test_a_manifest_whose_tail_fields_disagree_is_refused_naming_the_field(edit, field):
    data = _manifest_dict(FIXTURE / "cache")
    edit(data)
    with pytest.raises(FormatError, match=field.replace(".", r"\.")):
        Manifest.from_dict(data)


def test_a_version_1_cache_trains_with_the_estimated_tail_as_with_the_bucket(tmp_path, one_thread):
    """The previous layout opens, verifies (tests/test_layouts.py) and trains; 'estimated' reads it as the bucket."""
    cache = tmp_path / "cache"
    shutil.copytree(FIXTURE / "cache", cache)
    from kdcache.batches import teacher_records

    record = teacher_records(cache, epoch=0, block=0)
    student = torch.randn(record.values.shape[0], 10)
    torch.testing.assert_close(distillation_kl(student, record, teacher_temperature=4.0, student_temperature=4.0, tail="estimated"),
                               distillation_kl(student, record, teacher_temperature=4.0, student_temperature=4.0, tail="bucket"))
    result = CliRunner().invoke(app, ["train-student", "--cache", str(cache), "--data", "digits:val", "--model", "test_resnet",
                                      "--loss", "kd", "--tail", "estimated", "--epochs", "1", "--batch-size", "64",
                                      "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output


# ----------------------------------------------------------------------------------------- said when training


def test_train_student_says_once_what_the_loss_reads_and_records_it(tmp_path, one_thread):
    cache = tmp_path / "cache"
    shutil.copytree(FIXTURE / "cache", cache)  # top-3 of 10 classes, no tail code: most of the mass at T = 4 is one bucket
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["train-student", "--cache", str(cache), "--data", "digits:val", "--model", "test_resnet",
                                      "--loss", "kd", "--epochs", "1", "--max-steps", "1", "--batch-size", "64", "--run-dir", str(run)])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "teacher records at the loss's temperature T = 4" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "outside the stored top 3" in lines[0]
    assert "reads the tail as one bucket (the cache has no tail code" in lines[0] and "--topk full (every logit: 7 more" in lines[0]
    recorded = json.loads((run / "config.json").read_text())["record_fidelity"]
    assert recorded["temperature"] == 4.0 and recorded["warn"] and 0.2 < recorded["tail_mass"][1] < 1


def test_the_fidelity_of_a_coded_record_read_as_a_bucket_points_to_the_estimated_tail():
    from kdcache.fidelity import describe, record_fidelity
    from kdcache.losses import LossConfig

    g = torch.Generator().manual_seed(4)
    logits = torch.randn(300, 6, generator=g) @ (torch.randn(6, 80, generator=g) * 2)
    spec = TailSpec(betas=(1.0, 0.5, 0.25), rank=7)
    basis = fit_tail_basis(logits, 7)
    values, indices, tail = make_records(logits[:64], 5, spec, basis=basis)

    class Teacher:
        num_classes = 80

    class Manifest:
        k, teacher = 5, Teacher()
        tail = dict(spec.to_json(), basis=encode_basis(basis))

    records = {"values": values.numpy(), "indices": indices.numpy(), "tail": tail.numpy()}
    bucket = record_fidelity(records, Manifest(), LossConfig(name="ttm", tail="bucket"))
    estimated = record_fidelity(records, Manifest(), LossConfig(name="ttm"))
    assert bucket["warn"] and "--tail estimated" in describe(bucket, LossConfig(name="ttm", tail="bucket"))
    assert not estimated["warn"] and estimated["reads"] == "the tail from its rank-7 tail code"
    assert record_fidelity(records, Manifest(), LossConfig(name="ce")) is None

    class V1Manifest(Manifest):
        tail = TailSpec().to_json()

    plain = make_records(logits[:64], 5)
    v1 = record_fidelity({"values": plain[0].numpy(), "indices": plain[1].numpy(), "tail": plain[2].numpy()},
                         V1Manifest(), LossConfig(name="ttm"))
    assert v1["warn"] and "default record (it has a tail code)" in describe(v1, LossConfig(name="ttm"))


def test_the_code_check_tells_a_low_rank_tail_from_one_the_code_cannot_hold():
    spec = dataclasses.replace(DEFAULT_TAIL, rank=8)
    low = _structured_teacher(900, 200, 6, seed=11)  # rank 6 plus a little noise: the code holds its tail
    noise = torch.randn(900, 200, generator=torch.Generator().manual_seed(12)) * 3  # a tail of noise: nothing to hold
    checks = {}
    for name, logits in (("low", low), ("noise", noise)):
        basis = fit_tail_basis(logits[:600], spec.rank, spec.code_levels)
        checks[name] = code_check(logits[600:], 10, spec, basis)
    assert checks["low"]["temperatures"] == [1.0, 2.0, 4.0, 8.0] and checks["low"]["views"] == 300
    assert max(checks["low"]["shape_tv_median"]) < 0.2 < min(checks["noise"]["shape_tv_median"][:2])
    assert all(a < b for a, b in zip(checks["low"]["shape_tv_median"], checks["noise"]["shape_tv_median"]))
    tail = {"code_check": {"temperatures": [1.0, 4.0], "shape_tv_median": [0.1, 0.3], "views": 5}}
    assert checked_shape_error(tail, 2.0) == pytest.approx(0.2) and checked_shape_error(tail, 16.0) == pytest.approx(0.3)
    assert checked_shape_error({}, 2.0) is None


def test_train_student_warns_where_the_calibration_says_the_code_misplaces_the_target():
    from kdcache.fidelity import describe, record_fidelity
    from kdcache.losses import LossConfig

    logits = _structured_teacher(400, 120, 40, seed=13)
    spec = dataclasses.replace(DEFAULT_TAIL, rank=4)
    basis = fit_tail_basis(logits[:300], spec.rank, spec.code_levels)
    values, indices, tail = make_records(logits[300:364], 5, spec, basis=basis)
    records = {"values": values.numpy(), "indices": indices.numpy(), "tail": tail.numpy()}

    class Teacher:
        num_classes = 120

    def manifest(error):
        class Manifest:
            k, teacher = 5, Teacher()
            tail = dict(spec.to_json(), basis=encode_basis(basis),
                        code_check={"temperatures": [1.0, 2.0, 4.0, 8.0], "shape_tv_median": [error] * 4, "views": 300})
        return Manifest()

    loss = LossConfig(name="kd", temperature=4.0)
    good, bad = record_fidelity(records, manifest(0.01), loss), record_fidelity(records, manifest(0.6), loss)
    assert not good["warn"] and good["misplaced"] == pytest.approx(0.01 * good["tail_mass"][1])
    assert "off by 1%" in describe(good, loss) and not describe(good, loss).startswith("warning")
    assert bad["warn"] and bad["misplaced"] > 0.1
    line = describe(bad, loss)
    assert line.startswith("warning:") and "larger --tail-rank" in line and "off by 60%" in line
    # read as a bucket, the code's check does not apply: the usual advice stands
    assert "misplaced" not in record_fidelity(records, manifest(0.6), LossConfig(name="kd", temperature=4.0, tail="bucket"))
