"""Meta-learnt temperatures: the meta step's gradient, its side effects and its progress."""

from __future__ import annotations

import copy
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import timm
import torch
from torch import nn
from torch.testing import assert_close

from kdcache.errors import ConfigError
from kdcache.losses import LossConfig
from kdcache.mkd import MetaConfig, MetaTemperatures, make_meta_optimizer, meta_update
from kdcache.record import TeacherRecord

C = 10


class TinyNet(nn.Module):
    """A plain module (no timm forward_features/forward_head) with a classifier head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.BatchNorm1d(32), nn.Tanh())
        self.fc = nn.Linear(32, C)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


class Wrapped(nn.Module):
    """Hides a timm model's forward_features/forward_head, forcing the generic head-only path."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def get_classifier(self) -> nn.Module:
        return self.model.get_classifier()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def resnet() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet10t", pretrained=False, num_classes=C)


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return TinyNet()


def problem(size: int, k: int = C, batch: int = 8, seed: int = 0):
    """A synthetic problem: teacher logits that favour the label, a held-out meta batch."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (batch,), generator=g)
    teacher = 4.0 * nn.functional.one_hot(labels, C).float() + torch.randn(batch, C, generator=g)
    images = torch.randn(batch, 3, size, size, generator=g)
    meta_images = torch.randn(batch, 3, size, size, generator=g)
    meta_labels = torch.randint(0, C, (batch,), generator=g)
    return (images, TeacherRecord.from_logits(teacher, k), labels), (meta_images, meta_labels)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


MKD = LossConfig(name="mkd", alpha=0.9, temperature=4.0)


# --------------------------------------------------------------------------- temperatures and config


def test_temperatures_start_at_their_initial_values():
    temps = MetaTemperatures(C, per_class=True, init_teacher_T=2.0, init_student_T=3.0)
    t_teacher, t_student = temps()
    assert t_teacher.shape == () and t_student.shape == (C,)
    assert_close(t_teacher, torch.tensor(2.0))
    assert_close(t_student, torch.full((C,), 3.0))
    assert MetaTemperatures(C, per_class_teacher=True)()[0].shape == (C,)
    assert temps.summary().keys() == {"teacher_temperature", "student_temperature", "student_temperature_min", "student_temperature_max"}


def test_temperatures_from_configs():
    temps = MetaTemperatures.from_configs(C, LossConfig(name="mkd", temperature=2.0), MetaConfig(per_class=True))
    assert_close(temps()[0], torch.tensor(2.0))
    assert_close(temps()[1], torch.full((C,), 2.0))
    with pytest.raises(ConfigError, match="LossConfig.name='mkd', got 'kd'"):
        MetaTemperatures.from_configs(C, LossConfig(name="kd"), MetaConfig())


def test_projection_keeps_temperatures_in_range():
    temps = MetaTemperatures(C, temperature_range=(0.5, 10.0))
    with torch.no_grad():
        temps.log_teacher.fill_(5.0)
        temps.log_student.fill_(-5.0)
    temps.project_()
    assert_close(temps()[0], torch.tensor(10.0))
    assert_close(temps()[1], torch.tensor(0.5))


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(num_classes=1), r"num_classes=1: expected an integer >= 2"),
        (dict(num_classes=C, init_teacher_T=0.0), r"init_teacher_T=0\.0: expected a temperature in \[0\.5, 10\.0\]"),
        (dict(num_classes=C, init_student_T=20.0), r"init_student_T=20\.0"),
        (dict(num_classes=C, temperature_range=(2.0, 1.0)), r"temperature_range=\(2\.0, 1\.0\)"),
    ],
)
def test_temperature_errors_name_the_field(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        MetaTemperatures(**kwargs)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(every=0), r"MetaConfig\.every=0"),
        (dict(lr=-1.0), r"MetaConfig\.lr=-1\.0"),
        (dict(inner_lr=0.0), r"MetaConfig\.inner_lr=0\.0"),
        (dict(head_only="yes"), r"MetaConfig\.head_only='yes'"),
    ],
)
def test_meta_config_errors_name_the_field(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        MetaConfig(**kwargs)


def test_meta_update_needs_the_mkd_loss():
    model, (train, meta) = tiny(), problem(8)
    temps = MetaTemperatures(C)
    with pytest.raises(ConfigError, match="LossConfig.name='mkd', got 'kd'"):
        meta_update(model, temps, train, meta, inner_lr=0.1, loss_config=LossConfig(name="kd"), head_only=True,
                    meta_optimizer=make_meta_optimizer(temps, MetaConfig()))


# --------------------------------------------------------------------------- the meta step


@pytest.mark.parametrize("head_only", [True, False])
@pytest.mark.parametrize("make, size", [(resnet, 16), (tiny, 8)])
def test_meta_update_changes_temperatures_only(make, size, head_only):
    model = make()
    model.train()
    train, meta = problem(size, k=4)
    temps = MetaTemperatures(C, per_class=True)
    before_temps = [p.detach().clone() for p in temps.parameters()]
    before = snapshot(model)
    logged = meta_update(model, temps, train, meta, inner_lr=0.5, loss_config=MKD, head_only=head_only,
                         meta_optimizer=torch.optim.SGD(temps.parameters(), lr=1.0))
    after = snapshot(model)
    assert before.keys() == after.keys()
    for name in before:  # weights and buffers (BatchNorm statistics) are untouched
        assert torch.equal(before[name], after[name]), name
    assert all(p.grad is None for p in model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before_temps, temps.parameters()))
    assert {"meta_loss", "lookahead_loss", "teacher_temperature", "student_temperature"} <= logged.keys()
    assert all(math.isfinite(v) for v in logged.values())


@pytest.mark.parametrize("head_only", [True, False])
def test_meta_gradient_matches_finite_differences(head_only):
    model, (train, meta) = tiny(), problem(8, k=C)
    temps = MetaTemperatures(C, init_teacher_T=2.0, init_student_T=3.0)
    frozen = torch.optim.SGD(temps.parameters(), lr=0.0)

    def meta_loss() -> float:
        return meta_update(model, temps, train, meta, inner_lr=2.0, loss_config=MKD, head_only=head_only,
                           meta_optimizer=frozen)["meta_loss"]

    meta_loss()
    analytic = [p.grad.clone() for p in temps.parameters()]
    eps = 1e-2
    for param, grad in zip(temps.parameters(), analytic):
        with torch.no_grad():
            param += eps
        up = meta_loss()
        with torch.no_grad():
            param -= 2 * eps
        down = meta_loss()
        with torch.no_grad():
            param += eps
        assert grad.abs() > 1e-4
        assert_close(torch.tensor((up - down) / (2 * eps)), grad, rtol=2e-2, atol=2e-5)


def test_timm_head_path_equals_generic_head_path():
    """The timm fast path (backbone once, head looked ahead) gives the generic path's step."""
    train, meta = problem(16, k=4)
    results = []
    for wrap in (False, True):
        model = resnet()
        model = Wrapped(model) if wrap else model
        temps = MetaTemperatures(C, per_class=True)
        logged = meta_update(model, temps, train, meta, inner_lr=0.5, loss_config=MKD, head_only=True,
                             meta_optimizer=torch.optim.SGD(temps.parameters(), lr=1.0))
        results.append((logged["meta_loss"], [p.detach().clone() for p in temps.parameters()]))
    assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("head_only", [True, False])
@pytest.mark.parametrize("per_class", [False, True])
def test_meta_loss_decreases_over_a_few_steps(head_only, per_class):
    model = resnet()
    train, meta = problem(16, k=4)
    temps = MetaTemperatures(C, per_class=per_class, init_teacher_T=4.0, init_student_T=4.0)
    optimizer = torch.optim.Adam(temps.parameters(), lr=0.1)
    losses = [
        meta_update(model, temps, train, meta, inner_lr=1.0, loss_config=MKD, head_only=head_only,
                    meta_optimizer=optimizer)["meta_loss"]
        for _ in range(4)
    ]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


def test_meta_update_leaves_existing_student_gradients_alone():
    model, (train, meta) = tiny(), problem(8)
    model(train[0]).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    temps = MetaTemperatures(C)
    meta_update(model, temps, train, meta, inner_lr=0.1, loss_config=MKD, head_only=False,
                meta_optimizer=make_meta_optimizer(temps, MetaConfig()))
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n]), n


def test_copy_of_model_gives_the_same_meta_step():
    """The meta step is a function of (weights, temperatures, batches): no hidden state."""
    model, (train, meta) = tiny(), problem(8)
    other = copy.deepcopy(model)
    out = []
    for m in (model, other, model):
        temps = MetaTemperatures(C)
        out.append(meta_update(m, temps, train, meta, inner_lr=0.5, loss_config=MKD, head_only=False,
                               meta_optimizer=torch.optim.SGD(temps.parameters(), lr=1.0)))
    assert out[0] == out[1] == out[2]


@pytest.mark.parametrize("head_only", [True, False])
def test_meta_update_on_a_vision_transformer(head_only):
    """Attention must be differentiable twice: the full look-ahead runs it with the math kernel."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, depth=1, num_classes=C)
    train, meta = problem(16, k=4)
    temps = MetaTemperatures(C)
    before = snapshot(model)
    logged = meta_update(model, temps, train, meta, inner_lr=0.5, loss_config=MKD, head_only=head_only,
                         meta_optimizer=torch.optim.SGD(temps.parameters(), lr=1.0))
    assert logged["teacher_temperature"] != 4.0 and logged["student_temperature"] != 4.0
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
