"""The exact spectrum of circular convolutions against the dense matrix of the operator."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from certify.spectral import circular_conv_singular_values


def _dense_singular_values(weight: torch.Tensor, n1: int, n2: int) -> torch.Tensor:
    """Singular values of the circular convolution as an explicit matrix (float64)."""
    c_out, c_in, k1, k2 = weight.shape
    basis = torch.eye(c_in * n1 * n2, dtype=torch.float64).reshape(-1, c_in, n1, n2)
    # wrap the grid around often enough for kernels larger than the grid
    reps = (-(-k1 // n1) + 1, -(-k2 // n2) + 1)
    tiled = basis.repeat(1, 1, reps[0], reps[1])
    columns = F.conv2d(tiled, weight)[:, :, :n1, :n2].reshape(c_in * n1 * n2, -1)
    return torch.linalg.svdvals(columns)


@pytest.mark.parametrize("kernel", [1, 2, 3, 5])
@pytest.mark.parametrize("grid", [(1, 1), (4, 4), (5, 3), (3, 6), (2, 7)])
@pytest.mark.parametrize("channels", [(2, 3), (4, 2), (3, 3)])
def test_spectrum_equals_the_dense_operators(kernel: int, grid: tuple[int, int],
                                             channels: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(kernel * 100 + grid[0] * 10 + grid[1])
    weight = torch.randn(*channels, kernel, kernel, generator=g, dtype=torch.float64)
    values = circular_conv_singular_values(weight, grid)
    dense = _dense_singular_values(weight, *grid)
    assert values.numel() == min(channels) * grid[0] * grid[1]  # one set per frequency
    k = min(values.numel(), dense.numel())
    # the nonzero singular values agree as multisets (the dense matrix adds zeros when c_out < c_in)
    top = values.sort(descending=True).values[:k]
    assert torch.allclose(top, dense.sort(descending=True).values[:k], atol=1e-9)
