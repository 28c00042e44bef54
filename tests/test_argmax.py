"""The greedy pick's row argmax: C++ kernel vs ``max(dim=-1).indices``, exactly."""

from __future__ import annotations

import pytest
import torch

from tessera.model.kernels import argmax
from tessera.model.kernels import build as kb

pytestmark = pytest.mark.skipif(
    kb.kernels_disabled() or not kb.kernel_available(), reason="native kernels unavailable"
)


def _same(x: torch.Tensor) -> None:
    got = torch.ops.tessera_kernels.row_argmax(x)  # the kernel itself, not the dispatcher
    assert got.dtype == torch.int64
    assert torch.equal(got, argmax.row_argmax_reference(x))


@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (5, 64), (5, 65), (2, 191), (32, 32000)])
def test_row_argmax_matches_reference(shape: tuple[int, int]) -> None:
    # Row lengths around the 64-wide lanes: shorter than them, a whole number, a tail.
    g = torch.Generator().manual_seed(shape[0] * 1000 + shape[1])
    _same(torch.randn(shape, generator=g))


def test_row_argmax_first_index_of_ties_nan_and_infinities() -> None:
    x = torch.zeros(7, 200)
    x[0, [5, 69, 137]] = 1.0  # ties in different lanes: the first index
    x[1] = -float("inf")  # nothing above -inf: index 0
    x[2, [150, 3, 20]] = float("nan")  # NaN wins, the first one
    x[3, 199] = float("inf")  # in the tail
    x[4, 190] = float("nan")  # NaN in the tail
    x[5, [70, 6]] = 2.0  # ties within one 64-lane register pass
    x[6] = -float("inf")
    x[6, 130] = -1e30
    _same(x)


def test_row_argmax_on_rows_of_a_wider_tensor() -> None:
    # The sampler gets vocabulary-wide rows; a view with a row stride past the row is accepted.
    wide = torch.randn(4, 300, generator=torch.Generator().manual_seed(1))
    _same(wide[:, :257])


def test_row_argmax_other_dtypes_take_the_reference() -> None:
    x = torch.randn(3, 100, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    assert torch.equal(argmax.row_argmax(x), x.max(dim=-1).indices)
    assert torch.equal(argmax.row_argmax(x.float()), x.float().max(dim=-1).indices)
