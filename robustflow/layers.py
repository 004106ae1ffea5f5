"""Layers around the residual steps: input centering and the classification head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from certify.spectral import SAFETY, matrix_singular_values


class Centering(nn.Module):
    """``x ↦ (x − μ) / σ`` per channel; ``Lip = 1 / min σ`` (1 without scaling).

    Both vectors are buffers, so they travel with the weights and the bound. On the CPU the
    result is laid out channels-last, the layout in which oneDNN's convolutions run without
    reordering their inputs (the values are the same in any layout).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float] | None = None):
        super().__init__()
        mean_t = torch.tensor([float(m) for m in mean])
        std_t = torch.ones_like(mean_t) if std is None else torch.tensor([float(s) for s in std])
        if std_t.shape != mean_t.shape:
            raise ValueError(f"mean has {mean_t.numel()} channels but std has {std_t.numel()}")
        if not bool((std_t > 0).all()):
            raise ValueError(f"std must be positive, got {std_t.tolist()}")
        self.register_buffer("mean", mean_t.view(-1, 1, 1))
        self.register_buffer("std", std_t.view(-1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.mean.shape[0]:
            raise ValueError(
                f"Centering expects images (batch, {self.mean.shape[0]}, H, W), got {tuple(x.shape)}"
            )
        out = (x - self.mean) / self.std
        return _ChannelsLast.apply(out) if out.is_cpu else out

    def lipschitz_bound(self) -> float:
        return 1.0 / float(self.std.min().double()) * (1 + SAFETY)


class _ChannelsLast(torch.autograd.Function):
    """The identity, laying its output out channels-last; the gradient goes back channels-first,
    the layout callers expect (attack libraries ``.view()`` input gradients)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()


class _SpectralNormalization(nn.Module):
    """``V ↦ s V / max(1, ‖V‖₂)`` with the exact spectral norm (an SVD, not power iteration) and
    a saved scale ``s`` (1 unless :func:`fold_bound_excess` lowered it)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(()))

    def forward(self, v: Tensor) -> Tensor:
        return self.scale * v / torch.clamp(torch.linalg.matrix_norm(v, ord=2), min=1.0)


class NormalizedLinear(nn.Linear):
    """Linear head ``x ↦ W x + c`` with ``W = s V / max(1, ‖V‖₂)``, so ``‖W‖ ≤ s ≤ 1``.

    Rows stay free (unlike an orthogonal head) so the pairwise certificate
    ``(f_y − f_j) / ‖w_y − w_j‖`` can use their geometry.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features)
        parametrize.register_parametrization(self, "weight", _SpectralNormalization())

    def lipschitz_bound(self) -> float:
        return float(matrix_singular_values(self.weight)[0]) * (1 + SAFETY)

    def export(self) -> nn.Linear:
        weight = self.weight.detach()
        plain = nn.Linear(self.in_features, self.out_features).to(weight)
        plain.weight.data.copy_(weight)
        plain.bias.data.copy_(self.bias.detach())
        return plain


def fold_bound_excess(model: nn.Module, input_shape: tuple[int, ...]) -> float:
    """Scale the last :class:`NormalizedLinear` (weight and bias) by ``1/L`` when the proven
    bound ``L`` of ``model`` exceeds 1, and return the factor (1 if nothing was done).

    Orthogonal weights are orthogonal only up to float32 rounding, and the proven bound honestly
    includes it (e.g. ``1 + 6e-5`` after a long run); folding the excess into the head brings the
    bound to ≤ 1. The logits become ``f / L``, so predictions and pairwise radii
    ``(f_y − f_j) / ‖w_y − w_j‖`` stay as they were. The scale is a float32, so ``scale / L``
    can round up: the bound is recomputed and the scale lowered by a few ulps more until the
    proven bound is ≤ 1.
    """
    from certify import lipschitz_bound

    heads = [m for m in model.modules() if isinstance(m, NormalizedLinear)]
    if not heads:
        raise ValueError("the model has no NormalizedLinear head to fold the excess into")
    scale = heads[-1].parametrizations.weight[0].scale
    before = scale.detach().double().clone()
    bound = lipschitz_bound(model, input_shape)
    margin = 0.0
    for _ in range(16):
        if bound <= 1.0:
            factor = float((scale.detach().double() / before).min())
            if heads[-1].bias is not None:
                with torch.no_grad():
                    heads[-1].bias.mul_(factor)
            return factor
        with torch.no_grad():
            scale.div_(bound * (1.0 + margin))
        margin = max(2.0 * margin, 2.0 ** -23)
        bound = lipschitz_bound(model, input_shape)
    raise RuntimeError(f"could not bring the proven bound {bound!r} to 1 by scaling the head")
