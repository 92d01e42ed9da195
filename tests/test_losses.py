"""Losses against references computed directly from full logits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from kdcache.errors import ConfigError, MismatchError
from kdcache.losses import (
    LOSS_DEFAULTS,
    LOSSES,
    LossConfig,
    ce_loss,
    compute_loss,
    distillation_kl,
    kd_loss,
    log_power_sum,
    mkd_loss,
    ttm_loss,
    wttm_loss,
)
from kdcache.record import TeacherRecord

B, C = 6, 12
TEMPERATURES = [0.5, 1.0, 2.0, 4.0, 8.0]
TAILS = ["bucket", "uniform"]
TIGHT = dict(rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- data


def logits(seed: int, scale: float = 3.0, rows: int = B, classes: int = C) -> torch.Tensor:
    """Random logits that fp16 represents exactly, so a full record holds them without rounding."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, classes, generator=g) * scale).half().float()


def hard_target(seed: int = 7) -> torch.Tensor:
    return torch.randint(0, C, (B,), generator=torch.Generator().manual_seed(seed))


def soft_target(seed: int = 7) -> torch.Tensor:
    """A mixup-style target: lam * onehot(y_i) + (1 - lam) * onehot(y_j)."""
    g = torch.Generator().manual_seed(seed)
    y_i, y_j = torch.randint(0, C, (B,), generator=g), torch.randint(0, C, (B,), generator=g)
    lam = torch.rand(B, 1, generator=g)
    return lam * F.one_hot(y_i, C).float() + (1 - lam) * F.one_hot(y_j, C).float()


TARGETS = {"hard": hard_target, "soft": soft_target}


# --------------------------------------------------------------------------- references


def ref_ce(z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if target.is_floating_point():
        return -(target * torch.log_softmax(z, dim=-1)).sum(-1).mean()
    return F.cross_entropy(z, target)


def ref_kl(v: torch.Tensor, z: torch.Tensor, t_teacher, t_student) -> torch.Tensor:
    """Per-row KL(softmax(v / T_t) || softmax(z / T_s)) over all C classes."""
    log_q = torch.log_softmax(z / t_student, dim=-1)
    log_p = torch.log_softmax(v / t_teacher, dim=-1)
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)


def ref_bucket(log_probs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Full log-probs -> [stored classes in record order, log of the rest's mass]."""
    rest = torch.ones_like(log_probs, dtype=torch.bool).scatter(-1, indices, False)
    tail = torch.logsumexp(log_probs.masked_fill(~rest, float("-inf")), dim=-1, keepdim=True)
    return torch.cat([log_probs.gather(-1, indices), tail], dim=-1)


def ref_bucket_kl(v, z, k, t_teacher, t_student) -> torch.Tensor:
    indices = torch.topk(v, k, dim=-1).indices
    log_p = ref_bucket(torch.log_softmax(v / t_teacher, dim=-1), indices)
    log_q = ref_bucket(torch.log_softmax(z / t_student, dim=-1), indices)
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)


def ref_uniform_kl(v, z, k, t_teacher, t_student) -> torch.Tensor:
    indices = torch.topk(v, k, dim=-1).indices
    log_p = torch.log_softmax(v / t_teacher, dim=-1)
    tail = ref_bucket(log_p, indices)[:, -1:]
    spread = (tail - math.log(C - k)).expand(-1, C)
    dense = spread.scatter(-1, indices, log_p.gather(-1, indices))
    log_q = torch.log_softmax(z / t_student, dim=-1)
    return F.kl_div(log_q, dense, reduction="none", log_target=True).sum(-1)


def ref_kd(v, z, target, alpha, t):
    return (1 - alpha) * ref_ce(z, target) + alpha * t * t * ref_kl(v, z, t, t).mean()


def ref_ttm(v, z, target, beta, gamma):
    return ref_ce(z, target) + beta * ref_kl(v, z, 1 / gamma, 1.0).mean()


def ref_wttm(v, z, target, beta, gamma):
    u = torch.softmax(v, dim=-1).pow(gamma).sum(-1)
    return ref_ce(z, target) + beta * (u * ref_kl(v, z, 1 / gamma, 1.0)).mean()


def ref_mkd(v, z, target, alpha, t_teacher, t_student):
    return (1 - alpha) * ref_ce(z, target) + alpha * t_student.square().mean() * ref_kl(v, z, t_teacher, t_student).mean()


def loss_and_grad(fn, z):
    z = z.clone().requires_grad_(True)
    loss = fn(z)
    (grad,) = torch.autograd.grad(loss, z)
    return loss.detach(), grad


# --------------------------------------------------------------------------- cross-entropy


@pytest.mark.parametrize("kind", TARGETS)
def test_ce_matches_reference(kind):
    z, target = logits(1), TARGETS[kind]()
    assert_close(ce_loss(z, target), ref_ce(z, target), **TIGHT)


def test_ce_soft_onehot_equals_hard():
    z, y = logits(1), hard_target()
    assert_close(ce_loss(z, F.one_hot(y, C).float()), ce_loss(z, y), **TIGHT)


def test_ce_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="soft target"):
        ce_loss(logits(1), torch.zeros(B, C + 1))
    with pytest.raises(ValueError, match="labels"):
        ce_loss(logits(1), torch.zeros(B + 1, dtype=torch.long))


# --------------------------------------------------------------------------- full records (k = C)


@pytest.mark.parametrize("t", TEMPERATURES)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("kind", TARGETS)
def test_kd_full_record_equals_full_logits(t, tail, kind):
    v, z, target = logits(2), logits(3), TARGETS[kind]()
    record = TeacherRecord.from_logits(v, C)
    got, got_grad = loss_and_grad(lambda x: kd_loss(x, record, target, alpha=0.7, temperature=t, tail=tail), z)
    want, want_grad = loss_and_grad(lambda x: ref_kd(v, x, target, 0.7, t), z)
    assert_close(got, want, **TIGHT)
    assert_close(got_grad, want_grad, **TIGHT)


@pytest.mark.parametrize("gamma", [1 / t for t in TEMPERATURES])
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("kind", TARGETS)
def test_ttm_full_record_equals_full_logits(gamma, tail, kind):
    v, z, target = logits(4), logits(5), TARGETS[kind]()
    record = TeacherRecord.from_logits(v, C)
    got, got_grad = loss_and_grad(lambda x: ttm_loss(x, record, target, beta=3.0, gamma=gamma, tail=tail), z)
    want, want_grad = loss_and_grad(lambda x: ref_ttm(v, x, target, 3.0, gamma), z)
    assert_close(got, want, **TIGHT)
    assert_close(got_grad, want_grad, **TIGHT)


def test_ttm_equals_renormalised_power_of_teacher_probabilities():
    """The official code's form: softmax(v)^gamma / sum(softmax(v)^gamma) is softmax(gamma * v)."""
    v, z, y, gamma = logits(4), logits(5), hard_target(), 0.3
    p = torch.softmax(v, dim=-1).pow(gamma)
    p = p / p.sum(-1, keepdim=True)
    kl = (p * (p.log() - torch.log_softmax(z, dim=-1))).sum(-1).mean()
    record = TeacherRecord.from_logits(v, C)
    assert_close(ttm_loss(z, record, y, beta=2.0, gamma=gamma), ref_ce(z, y) + 2.0 * kl, **TIGHT)


@pytest.mark.parametrize("gamma", [0.1, 0.25, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("kind", TARGETS)
def test_wttm_full_record_equals_full_logits(gamma, tail, kind):
    v, z, target = logits(6), logits(7), TARGETS[kind]()
    record = TeacherRecord.from_logits(v, C)
    got, got_grad = loss_and_grad(lambda x: wttm_loss(x, record, target, beta=1.6, gamma=gamma, tail=tail), z)
    want, want_grad = loss_and_grad(lambda x: ref_wttm(v, x, target, 1.6, gamma), z)
    assert_close(got, want, **TIGHT)
    assert_close(got_grad, want_grad, **TIGHT)


@pytest.mark.parametrize("gamma", [0.1, 0.25, 0.5, 0.8, 1.0, 2.0])
def test_power_sum_full_record_is_exact(gamma):
    v = logits(8)
    record = TeacherRecord.from_logits(v, C)
    assert_close(log_power_sum(record, gamma).exp(), torch.softmax(v, dim=-1).pow(gamma).sum(-1), **TIGHT)


@pytest.mark.parametrize("t_teacher", TEMPERATURES)
@pytest.mark.parametrize("t_student", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("kind", TARGETS)
def test_mkd_full_record_equals_full_logits_with_temperature_gradients(t_teacher, t_student, tail, kind):
    v, z, target = logits(9), logits(10), TARGETS[kind]()
    record = TeacherRecord.from_logits(v, C)

    def run(fn):
        zz = z.clone().requires_grad_(True)
        tt = torch.tensor(t_teacher, requires_grad=True)
        ts = torch.tensor(t_student, requires_grad=True)
        loss = fn(zz, tt, ts)
        return (loss.detach(), *torch.autograd.grad(loss, (zz, tt, ts)))

    got = run(lambda zz, tt, ts: mkd_loss(zz, record, target, alpha=0.8, teacher_temperature=tt, student_temperature=ts, tail=tail))
    want = run(lambda zz, tt, ts: ref_mkd(v, zz, target, 0.8, tt, ts))
    for a, b in zip(got, want):
        assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in got[1:])


@pytest.mark.parametrize("tail", TAILS)
def test_mkd_per_class_temperatures_full_record(tail):
    v, z, y = logits(11), logits(12), hard_target()
    record = TeacherRecord.from_logits(v, C)
    g = torch.Generator().manual_seed(0)
    t_teacher = (0.5 + 4 * torch.rand(C, generator=g)).requires_grad_(True)
    t_student = (0.5 + 4 * torch.rand(C, generator=g)).requires_grad_(True)
    got = mkd_loss(z, record, y, alpha=0.5, teacher_temperature=t_teacher, student_temperature=t_student, tail=tail)
    want = ref_mkd(v, z, y, 0.5, t_teacher, t_student)
    assert_close(got, want, **TIGHT)
    got_grads = torch.autograd.grad(got, (t_teacher, t_student))
    want_grads = torch.autograd.grad(want, (t_teacher, t_student))
    for a, b in zip(got_grads, want_grads):
        assert_close(a, b, **TIGHT)


def test_mkd_with_equal_temperatures_is_kd():
    v, z, y = logits(13), logits(14), hard_target()
    record = TeacherRecord.from_logits(v, 5)
    t = torch.tensor(3.0)
    got = mkd_loss(z, record, y, alpha=0.9, teacher_temperature=t, student_temperature=t)
    assert_close(got, kd_loss(z, record, y, alpha=0.9, temperature=3.0), **TIGHT)


def test_mkd_per_class_teacher_needs_full_record():
    record = TeacherRecord.from_logits(logits(15), 5)
    with pytest.raises(ConfigError, match="teacher_temperature is per-class"):
        mkd_loss(logits(16), record, hard_target(), alpha=0.9, teacher_temperature=torch.ones(C), student_temperature=torch.ones(()))


def test_mkd_partial_record_teacher_temperature_gradient_flows():
    record = TeacherRecord.from_logits(logits(15), 5)
    tt = torch.tensor(2.0, requires_grad=True)
    ts = torch.full((C,), 2.0, requires_grad=True)
    for tail in TAILS:
        loss = mkd_loss(logits(16), record, hard_target(), alpha=0.9, teacher_temperature=tt, student_temperature=ts, tail=tail)
        g_t, g_s = torch.autograd.grad(loss, (tt, ts))
        assert torch.isfinite(g_t) and g_t != 0
        assert torch.isfinite(g_s).all() and g_s.abs().sum() > 0


# --------------------------------------------------------------------------- partial records (k < C)


@pytest.mark.parametrize("k", [1, 3, 8, C - 1])
@pytest.mark.parametrize("t", [1.0, 4.0])  # the tail summary's anchors: L(1/T) is stored
def test_bucket_kl_matches_full_logit_buckets_at_anchors(k, t):
    v, z = logits(20), logits(21)
    record = TeacherRecord.from_logits(v, k)
    got = distillation_kl(z, record, teacher_temperature=t, student_temperature=t, tail="bucket")
    # the tail summary holds L - beta * v_top1 in fp16: ~1e-3 absolute error on the tail's log-mass
    assert_close(got, ref_bucket_kl(v, z, k, t, t), rtol=1e-3, atol=2e-3)


@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("t", [1.0, 4.0])
def test_uniform_kl_matches_full_logit_spreading_at_anchors(k, t):
    v, z = logits(22), logits(23)
    record = TeacherRecord.from_logits(v, k)
    got = distillation_kl(z, record, teacher_temperature=t, student_temperature=t, tail="uniform")
    assert_close(got, ref_uniform_kl(v, z, k, t, t), rtol=1e-3, atol=2e-3)


@pytest.mark.parametrize("t_teacher", TEMPERATURES)
@pytest.mark.parametrize("t_student", [1.0, 3.0])
@pytest.mark.parametrize("k", [2, 6])
def test_bucket_kl_is_exact_given_the_reconstructed_tail(t_teacher, t_student, k):
    """The KL algebra is exact; only the teacher's tail log-mass comes from the summary."""
    v, z = logits(24), logits(25)
    record = TeacherRecord.from_logits(v, k)
    indices = record.indices.long()
    scaled = record.values.float() / t_teacher
    joint = torch.cat([scaled, record.tail_log_mass(1 / t_teacher).unsqueeze(-1)], dim=-1)
    log_p = joint - torch.logsumexp(joint, dim=-1, keepdim=True)
    log_q = ref_bucket(torch.log_softmax(z / t_student, dim=-1), indices)
    want = (log_p.exp() * (log_p - log_q)).sum(-1)
    got = distillation_kl(z, record, teacher_temperature=t_teacher, student_temperature=t_student, tail="bucket")
    assert_close(got, want, **TIGHT)


@pytest.mark.parametrize("k", [1, 4, 9])
@pytest.mark.parametrize("gamma", [1.0, 0.25])
def test_power_sum_partial_record_matches_full_logits_at_anchors(k, gamma):
    v = logits(26)
    record = TeacherRecord.from_logits(v, k)
    want = torch.softmax(v, dim=-1).pow(gamma).sum(-1)
    assert_close(log_power_sum(record, gamma).exp(), want, rtol=3e-3, atol=1e-4)


@pytest.mark.parametrize("name", ["kd", "ttm", "wttm"])
@pytest.mark.parametrize("tail", TAILS)
def test_partial_record_losses_give_student_gradients(name, tail):
    record = TeacherRecord.from_logits(logits(27), 4)
    config = LossConfig(name=name, tail=tail)
    z = logits(28).requires_grad_(True)
    loss = compute_loss(config, z, record, soft_target())
    (grad,) = torch.autograd.grad(loss, z)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("tail", TAILS)
def test_kl_of_student_equal_to_teacher_is_zero_on_full_records(tail):
    v = logits(29)
    kl = distillation_kl(v, TeacherRecord.from_logits(v, C), teacher_temperature=2.0, student_temperature=2.0, tail=tail)
    assert_close(kl, torch.zeros(B), atol=1e-6, rtol=0)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    k=st.integers(1, C),
    t_teacher=st.floats(0.5, 10.0),
    t_student=st.floats(0.5, 10.0),
    scale=st.floats(0.1, 8.0),
    tail=st.sampled_from(TAILS),
)
def test_kl_is_finite_and_non_negative(seed, k, t_teacher, t_student, scale, tail):
    record = TeacherRecord.from_logits(logits(seed, scale), k)
    kl = distillation_kl(logits(seed + 1, scale), record, teacher_temperature=t_teacher, student_temperature=t_student, tail=tail)
    assert torch.isfinite(kl).all()
    assert (kl > -1e-5).all()


def test_bf16_student_logits_give_float32_loss():
    record = TeacherRecord.from_logits(logits(30), 4)
    loss = kd_loss(logits(31).bfloat16(), record, hard_target(), alpha=0.9, temperature=4.0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_class_count_mismatch_is_refused():
    record = TeacherRecord.from_logits(logits(32), 4)
    with pytest.raises(MismatchError, match="student has 11 classes"):
        kd_loss(logits(33, classes=11), record, hard_target() % 11, alpha=0.9, temperature=4.0)


# --------------------------------------------------------------------------- config and dispatch


def test_registry_names():
    assert set(LOSSES) == {"ce", "kd", "ttm", "wttm", "mkd"} == set(LOSS_DEFAULTS)


def test_defaults_are_resolved_per_loss():
    assert LossConfig() == LossConfig(name="kd", alpha=0.9, temperature=4.0, tail="estimated")
    ttm = LossConfig(name="ttm")
    assert (ttm.beta, ttm.gamma, ttm.alpha, ttm.temperature) == (36.0, 0.25, None, None)
    wttm = LossConfig(name="wttm", gamma=0.3)
    assert (wttm.beta, wttm.gamma) == (1.6, 0.3)
    ce = LossConfig(name="ce")
    assert (ce.alpha, ce.temperature, ce.beta, ce.gamma, ce.tail) == (None,) * 5
    assert not ce.needs_teacher and LossConfig(name="mkd").needs_teacher


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(name="dkd"), r"LossConfig\.name='dkd'.*'ce', 'kd', 'ttm', 'wttm', 'mkd'"),
        (dict(name="kd", alpha=1.5), r"LossConfig\.alpha=1\.5: expected a number in \[0, 1\]"),
        (dict(name="kd", temperature=0.0), r"LossConfig\.temperature=0\.0: expected a positive number"),
        (dict(name="kd", temperature=-2), r"LossConfig\.temperature=-2"),
        (dict(name="mkd", temperature=float("nan")), r"LossConfig\.temperature=nan"),
        (dict(name="ttm", beta=-1.0), r"LossConfig\.beta=-1\.0: expected a non-negative number"),
        (dict(name="wttm", gamma=0), r"LossConfig\.gamma=0: expected a positive number"),
        (dict(name="kd", tail="spread"), r"LossConfig\.tail='spread'.*'bucket', 'uniform'"),
        (dict(name="kd", gamma=0.5), r"LossConfig\.gamma=0\.5: loss 'kd' does not take it"),
        (dict(name="ce", temperature=4.0), r"LossConfig\.temperature=4\.0: loss 'ce' does not take it"),
        (dict(name="kd", alpha=True), r"LossConfig\.alpha=True"),
    ],
)
def test_config_errors_name_the_field(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern) as info:
        LossConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_config_is_keyword_only_and_frozen():
    with pytest.raises(TypeError):
        LossConfig("kd")  # type: ignore[misc]
    with pytest.raises(AttributeError):
        LossConfig().alpha = 0.5  # type: ignore[misc]


@pytest.mark.parametrize("name", ["kd", "ttm", "wttm"])
def test_compute_loss_dispatches_with_config_values(name):
    v, z, y = logits(40), logits(41), hard_target()
    record = TeacherRecord.from_logits(v, 5)
    config = LossConfig(name=name, tail="uniform")
    kwargs = {f: getattr(config, f) for f in LOSS_DEFAULTS[name]}
    assert_close(compute_loss(config, z, record, y), LOSSES[name](z, record, y, **kwargs), **TIGHT)


def test_compute_loss_ce_needs_no_record():
    z, y = logits(42), hard_target()
    assert_close(compute_loss(LossConfig(name="ce"), z, None, y), ref_ce(z, y), **TIGHT)


def test_compute_loss_mkd_takes_temperatures():
    v, z, y = logits(43), logits(44), hard_target()
    record = TeacherRecord.from_logits(v, C)
    temps = (torch.tensor(2.0), torch.full((C,), 3.0))
    got = compute_loss(LossConfig(name="mkd", alpha=0.5), z, record, y, temperatures=temps)
    assert_close(got, ref_mkd(v, z, y, 0.5, *temps), **TIGHT)


@pytest.mark.parametrize("name", ["kd", "ttm", "wttm", "mkd"])
def test_compute_loss_without_record_is_a_config_error(name):
    with pytest.raises(ConfigError, match=f"loss '{name}' needs teacher records"):
        compute_loss(LossConfig(name=name), logits(45), None, hard_target(), temperatures=(1.0, 1.0) if name == "mkd" else None)


def test_compute_loss_temperature_misuse_is_a_config_error():
    record = TeacherRecord.from_logits(logits(46), 5)
    with pytest.raises(ConfigError, match="loss 'mkd' needs temperatures"):
        compute_loss(LossConfig(name="mkd"), logits(47), record, hard_target())
    with pytest.raises(ConfigError, match="loss 'kd' does not take them"):
        compute_loss(LossConfig(name="kd"), logits(47), record, hard_target(), temperatures=(1.0, 1.0))
