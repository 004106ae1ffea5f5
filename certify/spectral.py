"""Exact singular values of the linear maps that networks are made of.

Everything here is computed in float64 from the weights as they are, so the
results are proven (up to float64 rounding, which :data:`SAFETY` covers) and
never estimates from below such as power iteration.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Relative slack added to every bound, covering float64 rounding in SVDs/FFTs.
SAFETY = 1e-6


def matrix_singular_values(weight: Tensor) -> Tensor:
    """All singular values of a matrix ``weight`` (float64, descending)."""
    if weight.dim() != 2:
        raise ValueError(f"expected a matrix, got a tensor of shape {tuple(weight.shape)}")
    return torch.linalg.svdvals(weight.detach().to(torch.float64).cpu())


def circular_conv_singular_values(weight: Tensor, input_size: tuple[int, int]) -> Tensor:
    """All singular values of the circular convolution ``weight`` on an ``input_size`` grid.

    A circular multi-channel convolution is block-diagonalised by the 2-D DFT: on an
    ``n1 x n2`` grid its singular values are exactly those of the ``c_out x c_in``
    matrices ``K̂(ω) = Σ_u K_u e^{2πi⟨u, ω⟩}`` at the ``n1·n2`` frequencies
    (Sedghi, Gupta & Long, 2019). ``weight`` has torch's layout
    ``(c_out, c_in, k1, k2)``; the kernel may be larger than the grid (taps wrap round).
    Returns a float64 tensor of shape ``(n1 * n2 * min(c_out, c_in),)``.
    """
    if weight.dim() != 4:
        raise ValueError(f"expected a conv weight (c_out, c_in, k1, k2), got {tuple(weight.shape)}")
    n1, n2 = int(input_size[0]), int(input_size[1])
    if n1 < 1 or n2 < 1:
        raise ValueError(f"input_size must be positive, got {input_size}")
    w = weight.detach().to(torch.float64).cpu()
    c_out, c_in, k1, k2 = w.shape
    # Wrap the taps onto the n1 x n2 torus (taps farther than the grid add up).
    wrapped = torch.zeros(c_out, c_in, n1, n2, dtype=torch.float64)
    for a in range(k1):
        for b in range(k2):
            wrapped[:, :, a % n1, b % n2] += w[:, :, a, b]
    if not wrapped[:, :, 1:, :].any() and not wrapped[:, :, :, 1:].any():
        # one tap (a 1×1 kernel): K̂(ω) = K_0 at every frequency
        return torch.linalg.svdvals(wrapped[:, :, 0, 0]).repeat(n1 * n2)
    # The kernel is real, so K̂(−ω) = conj K̂(ω) has the same singular values: the half
    # spectrum of rfft2 holds them all, and the columns whose mirror it omits count twice.
    spectrum = torch.fft.rfft2(wrapped)  # (c_out, c_in, n1, n2 // 2 + 1)
    half = n2 // 2 + 1
    values = torch.linalg.svdvals(spectrum.permute(2, 3, 0, 1)).reshape(n1, half, -1)
    mirrored = values[:, 1:(n2 + 1) // 2]
    return torch.cat([values.reshape(-1), mirrored.reshape(-1)])


def singular_value_range(values: Tensor) -> tuple[float, float]:
    """``(σ_min, σ_max)`` widened outwards by :data:`SAFETY` so both stay proven bounds."""
    lo = float(values.min()) * (1.0 - SAFETY)
    hi = float(values.max()) * (1.0 + SAFETY) + 1e-12
    return max(lo, 0.0), hi
