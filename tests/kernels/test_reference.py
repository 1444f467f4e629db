"""The error measures tests and benchmarks hold the ops to (gopd_kernels.reference)."""

from __future__ import annotations

import pytest
import torch

from gopd_kernels.reference import rel_err, row_rel_err


def test_row_error_sees_what_the_largest_entry_hides():
    """A dW whose sampled rows dwarf the rest: 1 % off on every small row is 1e-4 of the largest
    entry, and 1e-2 of each small row."""
    want = torch.full((6, 4), 1e-2, dtype=torch.float64)
    want[0] = 1.0
    got = want.clone()
    got[1:] *= 1.01
    assert rel_err(got, want) == pytest.approx(1e-4)
    assert row_rel_err(got, want) == pytest.approx(1e-2)
    assert row_rel_err(got.float(), want) == pytest.approx(1e-2, rel=1e-5)


def test_zero_references_give_zero_or_an_enormous_error():
    zero = torch.zeros(2, 3)
    assert rel_err(zero, zero) == 0.0 and row_rel_err(zero, zero) == 0.0
    off = zero + torch.tensor([[0.0], [1e-6]])
    assert row_rel_err(off, zero) > 1e30 and rel_err(off, zero) > 1e30


def test_fp16_rows_below_the_smallest_normal_keep_only_absolute_precision():
    """fp16 rounds a subnormal entry to a multiple of 2^-24: relative to the entry that is
    coarse, relative to fp16's smallest normal (2^-14) it is fine."""
    want = torch.full((1, 4), 1e-7, dtype=torch.float64)
    got = want.half()
    assert (got.double() - want).abs().max() / want.abs().max() > 1e-2  # the rounding, per entry
    assert row_rel_err(got, want) < 1e-3 and rel_err(got, want) < 1e-3
    assert row_rel_err(got.float(), want) > 0.1  # the same values from a float32 result: wrong


@pytest.mark.parametrize("shape", [(), (5,), (3, 5), (2, 3, 5)])
def test_any_rank_and_empty_tensors(shape):
    want = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = want * 1.001
    assert row_rel_err(got, want) == pytest.approx(1e-3) and rel_err(got, want) == pytest.approx(1e-3)
    empty = torch.zeros(0, 4)
    assert rel_err(empty, empty) == 0.0 and row_rel_err(empty, empty) == 0.0


def test_inputs_are_not_modified():
    want = torch.ones(2, 2, dtype=torch.float64)
    got = torch.full((2, 2), 2.0, dtype=torch.float64)
    rel_err(got, want), row_rel_err(got, want)
    assert (got == 2).all() and (want == 1).all()
