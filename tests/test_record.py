"""Teacher records: top-k + tail summary against full-logit references, and the index dtype."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdcache.format import record_dtypes
from kdcache.format.store import index_dtype
from kdcache.record import TAIL_BETAS, TeacherRecord, make_records, tail_log_mass, teacher_log_probs

TEMPERATURES = (0.5, 1.0, 2.0, 4.0, 8.0)


def fp16_logits(batch: int, classes: int, scale: float, seed: int) -> torch.Tensor:
    """Random logits that fp16 stores exactly (so k = C must be exact to float tolerance)."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, classes, generator=generator) * scale).half().float()


@pytest.mark.parametrize("classes, scale", [(10, 3.0), (100, 6.0)])
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_full_k_equals_log_softmax(classes, scale, temperature):
    logits = fp16_logits(64, classes, scale, seed=classes)
    record = TeacherRecord.from_logits(logits, classes)
    got = record.log_probs(temperature)
    assert got.shape == (64, classes + 1)
    assert torch.isneginf(got[:, -1]).all()  # the tail bucket is empty
    want = torch.log_softmax(logits / temperature, dim=-1).gather(-1, record.indices.long())
    torch.testing.assert_close(got[:, :classes], want, rtol=1e-5, atol=1e-5)
    dense = record.dense_log_probs(temperature)
    torch.testing.assert_close(dense, torch.log_softmax(logits / temperature, dim=-1), rtol=1e-5, atol=1e-5)


def test_records_are_sorted_top_k():
    logits = fp16_logits(32, 10, 3.0, seed=1)
    values, indices, tail = make_records(logits, 4)
    assert values.dtype == torch.float16 and tail.dtype == torch.float16 and tail.shape == (32, 2)
    assert (values[:, :-1] >= values[:, 1:]).all()
    torch.testing.assert_close(values.float(), logits.gather(-1, indices), rtol=0, atol=0)
    assert torch.equal(torch.topk(logits, 4).indices.sort(-1).values, indices.sort(-1).values)


@pytest.mark.parametrize("classes, k, scale", [(10, 5, 3.0), (10, 1, 2.0), (100, 10, 4.0), (1000, 10, 2.0)])
def test_tail_bucket_is_exact_at_the_anchor_temperatures(classes, k, scale):
    logits = torch.randn(128, classes, generator=torch.Generator().manual_seed(k + classes)) * scale
    values, indices, tail = make_records(logits, k)
    tail_logits = logits.scatter(-1, indices, float("-inf"))
    for beta in TAIL_BETAS:  # T = 1 and T = 4
        temperature = 1.0 / beta
        exact_tail = torch.logsumexp(beta * tail_logits, dim=-1)
        # the tail log-mass itself: fp16 rounding of the stored offset is the only error
        offset = exact_tail - beta * values[:, 0].float()
        tolerance = offset.abs() * 2.0**-11 + 1e-4
        assert ((tail_log_mass(values, tail, classes, beta) - exact_tail).abs() <= tolerance).all()
        # the bucket probability next to the stored (fp16) top-k logits
        got = teacher_log_probs(values, tail, classes, temperature)[:, -1]
        joint = torch.cat([values.float() * beta, exact_tail.unsqueeze(-1)], dim=-1)
        want = exact_tail - torch.logsumexp(joint, dim=-1)
        assert ((got - want).abs() <= tolerance + 1e-5).all(), (beta, (got - want).abs().max())
        # and the bucket agrees with the full softmax's tail mass at fp16 precision of the logits
        full = torch.log_softmax(logits * beta, dim=-1).scatter(-1, indices, float("-inf")).logsumexp(-1)
        atol = (logits.abs().amax(-1) * beta * 2.0**-10) + tolerance + 1e-4
        assert ((got - full).abs() <= atol).all()


def test_tail_log_mass_of_an_empty_tail_is_minus_infinity():
    values, _, tail = make_records(fp16_logits(4, 10, 1.0, seed=2), 10)
    assert torch.isneginf(tail.float()).all()
    assert torch.isneginf(tail_log_mass(values, tail, 10, 0.5)).all()


def test_tail_at_beta_zero_is_log_of_tail_size():
    values, _, tail = make_records(fp16_logits(4, 10, 1.0, seed=3), 3)
    torch.testing.assert_close(tail_log_mass(values, tail, 10, 0.0), torch.full((4,), math.log(7)))


@pytest.mark.parametrize(
    "classes, dtype",
    [(2, np.uint8), (10, np.uint8), (255, np.uint8), (256, np.uint8), (257, np.uint16), (1000, np.uint16),
     (65536, np.uint16), (65537, np.uint32)],
)
def test_index_dtype_is_the_smallest_that_holds_every_class(classes, dtype):
    assert index_dtype(classes) == np.dtype(dtype)
    assert record_dtypes(classes)["indices"] == np.dtype(dtype).name
    assert np.iinfo(index_dtype(classes)).max >= classes - 1


def test_index_dtype_holds_the_stored_indices():
    logits = torch.randn(8, 1000, generator=torch.Generator().manual_seed(4))
    _, indices, _ = make_records(logits, 10)
    stored = indices.numpy().astype(index_dtype(1000))
    assert stored.dtype == np.uint16
    np.testing.assert_array_equal(stored.astype(np.int64), indices.numpy())


def test_exact_ties_are_ranked_by_class_index_whatever_the_column_order():
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0, 2.0, 0.5, 3.0]])  # classes 1, 3, 6 tie; 2 and 4 tie
    values, indices, tail = make_records(logits, 4)
    assert indices.tolist() == [[1, 3, 6, 2]] and values.tolist() == [[3.0, 3.0, 3.0, 2.0]]
    flipped_values, flipped_indices, flipped_tail = make_records(logits.flip(-1), 4)  # the same logits, columns reversed
    assert flipped_indices.tolist() == [[0, 3, 5, 2]] and torch.equal(flipped_values, values) and torch.equal(flipped_tail, tail)


def test_values_equal_in_fp16_are_ties_broken_by_class_index():
    # 1 + 2**-13 and 1 are distinct in float32 and equal in fp16 (spacing 2**-10 at 1): the record may not depend on which is larger
    ahead = torch.tensor([[1.0, 1.0 + 2**-13, 0.0]])
    behind = torch.tensor([[1.0 + 2**-13, 1.0, 0.0]])
    for logits in (ahead, behind):
        values, indices, _ = make_records(logits, 2)
        assert indices.tolist() == [[0, 1]] and values.dtype == torch.float16
