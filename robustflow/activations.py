"""The activation of every robustflow network: ``Σ(x) = max{x, x/2}``."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

#: Smallest slope of Σ: its strong-monotonicity constant ``m``.
SIGMA_MIN_SLOPE = 0.5


def sigma(x: Tensor) -> Tensor:
    """``Σ(x) = max{x, x/2}`` entry-wise: a leaky ReLU of slope 1/2 (one fused kernel)."""
    return F.leaky_relu(x, SIGMA_MIN_SLOPE)


class Sigma(nn.Module):
    """``Σ(x) = max{x, x/2}``.

    Every difference quotient ``(Σ(a) − Σ(b)) / (a − b)`` lies in ``[1/2, 1]``: Σ is
    1-Lipschitz and strongly monotone with ``m = 1/2``, the two facts the contractive
    and expansive steps rely on.

    >>> x = torch.tensor([-2.0, 3.0])
    >>> Sigma()(x)
    tensor([-1.,  3.])
    """

    def forward(self, x: Tensor) -> Tensor:
        return sigma(x)

    def lipschitz_bound(self) -> float:
        return 1.0
