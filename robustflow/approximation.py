"""Approximating maps by gradient and sphere-preserving flows.

A vector field splits as ``f = ∇U + X_S`` with ``U(x) = ∫₀¹ xᵀ f(t x) dt`` and ``xᵀ X_S(x) = 0``
(:func:`decompose`), so a map can be approximated by composing flow maps of gradient fields
and of sphere-preserving fields: :class:`GradientSphereNet` alternates
:class:`~robustflow.steps.GradientStep` and :class:`~robustflow.steps.SpherePreservingStep`,
and :func:`fit_flow_map` trains it on samples of a map, e.g. the time-``T`` flow map of an
ODE computed by :func:`flow_map`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from robustflow.operators import DenseOperator, _positive
from robustflow.steps import GradientStep, SpherePreservingStep
from robustflow.train import optimizer_step

VectorField = Callable[[Tensor], Tensor]


def _check_points(x: Tensor, who: str, dim: int | None = None) -> tuple[int, int]:
    if not isinstance(x, Tensor) or x.dim() != 2 or 0 in x.shape:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{who} expects points of shape (N, n) with N, n ≥ 1, got {shape}")
    if not x.is_floating_point():
        raise ValueError(f"{who} expects floating-point points, got {x.dtype}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{who} expects points of dimension {dim}, got shape {tuple(x.shape)}")
    return x.shape[0], x.shape[1]


@functools.lru_cache(maxsize=32)
def _gauss_legendre(order: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of the ``order``-point Gauss–Legendre rule on ``[0, 1]``."""
    nodes, weights = np.polynomial.legendre.leggauss(order)
    return (nodes + 1.0) / 2.0, weights / 2.0


class Decomposition(NamedTuple):
    """``f = gradient + rotation`` at the points: ``gradient = ∇U``, ``xᵀ rotation = 0``."""

    #: ``U(x) = ∫₀¹ xᵀ f(t x) dt``, shape ``(N,)``.
    potential: Tensor
    #: ``∇U(x)``, shape ``(N, n)``.
    gradient: Tensor
    #: ``X_S(x) = f(x) − ∇U(x)``, tangent to the sphere through ``x``, shape ``(N, n)``.
    rotation: Tensor


def decompose(field: VectorField, x: Tensor, order: int = 16) -> Decomposition:
    """Split ``field`` at the points ``x`` (``(N, n)``) into a gradient and a sphere-preserving part.

    ``U(x) = ∫₀¹ xᵀ f(t x) dt`` by Gauss–Legendre quadrature of ``order`` nodes on ``[0, 1]``,
    ``∇U`` by autograd (with ``create_graph``, so the result can be differentiated again, with
    respect to ``x`` or the field's parameters), and ``rotation = f − ∇U``.

    Why ``xᵀ rotation = 0``: ``U(s x) = ∫₀¹ s xᵀ f(t s x) dt = ∫₀^s xᵀ f(u x) du``, so
    ``xᵀ ∇U(x) = d/ds U(s x)|_{s=1} = xᵀ f(x)``. For the quadrature ``U_q(x) = Σ_k w_k xᵀ f(t_k x)``
    the same computation gives ``xᵀ ∇U_q(x) = Σ_k w_k φ'(t_k)`` with ``φ(t) = t xᵀ f(t x)``: the
    quadrature of ``∫₀¹ φ' = φ(1) = xᵀ f(x)``. So the orthogonality holds to the quadrature's
    accuracy: exactly (up to rounding) for polynomial fields of degree < ``2·order``; for analytic
    fields the error falls geometrically in ``order``, at a rate set by the distance of the
    complex singularities of ``t ↦ f(t x)`` from ``[0, 1]``, which shrinks as ``‖x‖`` grows
    (random tanh MLP fields in 2-D, float64, order 16: ``|xᵀ rotation| ≤ 4e-13`` at ``‖x‖ ≈ 2``,
    ``1e-6`` at ``‖x‖ ≈ 8``, where order 32 gives ``1e-11``). Whatever the order, ``gradient`` is
    an exact gradient (of ``U_q``): its Jacobian is symmetric.

    ``field`` maps ``(M, n)`` to ``(M, n)``; it is called once, on ``(order + 1)·N`` points.

    >>> x = torch.randn(5, 2, dtype=torch.float64)
    >>> parts = decompose(lambda p: p.flip(1) * torch.tensor([-1.0, 1.0]) + p**3, x)
    >>> bool((x * parts.rotation).sum(1).abs().max() < 1e-12)
    True
    """
    rows, dim = _check_points(x, "decompose")
    if isinstance(order, bool) or not isinstance(order, int | np.integer) or order < 1:
        raise ValueError(f"order must be an integer ≥ 1, got {order!r}")
    nodes, weights = (torch.as_tensor(v, dtype=x.dtype, device=x.device) for v in _gauss_legendre(int(order)))
    with torch.enable_grad():
        point = x if x.requires_grad else x.detach().requires_grad_(True)
        scaled = torch.cat([nodes.view(-1, 1, 1) * point, point.unsqueeze(0)])  # the last: t = 1
        values = field(scaled.reshape(-1, dim))
        expected = ((order + 1) * rows, dim)
        if not isinstance(values, Tensor) or tuple(values.shape) != expected:
            shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
            if isinstance(values, Tensor) and values.dim() == 2 and values.shape[0] == expected[0]:
                raise ValueError(f"field maps points of dimension {dim} to dimension {values.shape[1]}; "
                                 f"decompose needs a vector field from R^{dim} to R^{dim}")
            raise ValueError(f"field returned shape {shape} for {expected[0]} points of dimension {dim}; "
                             f"expected {expected}")
        values = values.reshape(order + 1, rows, dim)
        potential = (weights.view(-1, 1) * (values[:-1] * point).sum(-1)).sum(0)
        (gradient,) = torch.autograd.grad(potential.sum(), point, create_graph=True)
    return Decomposition(potential, gradient, values[-1] - gradient)


# ----------------------------------------------------------------------- the network


class GradientSphereNet(nn.Sequential):
    """``steps`` steps on ``R^dim`` alternating :class:`GradientStep` and :class:`SpherePreservingStep`.

    ``… ∘ Ψ_S ∘ Ψ_G⁻ ∘ Ψ_S ∘ Ψ_G⁺``, starting with a gradient step: a splitting of a flow over
    ``time`` into flows of gradient fields ``∓∇V_i`` (``V_i(x) = Σ_j γ(a_jᵀx + b_j)`` convex, ``width``
    ridge functions, ``A`` unconstrained) and of sphere-preserving fields ``S_i(x) x`` (``S_i`` skew).
    The gradient steps alternate descent (``h > 0``) and ascent (``h < 0``), so together they follow
    ``∇U`` for ``U`` a difference of convex potentials, which is what the splitting ``f = ∇U + X_S``
    asks for. Each family shares ``time`` equally: ``|h| = time / (number of its steps)``.
    """

    def __init__(self, dim: int, steps: int = 8, width: int = 16, time: float = 1.0):
        dim, steps, width = _positive("dim", dim), _positive("steps", steps), _positive("width", width)
        if not math.isfinite(time) or time <= 0:
            raise ValueError(f"time must be a finite number > 0, got {time!r}")
        gradient_steps, sphere_steps = (steps + 1) // 2, steps // 2
        layers: list[nn.Module] = []
        for i in range(steps):
            if i % 2 == 0:
                sign = 1.0 if i % 4 == 0 else -1.0
                operator = DenseOperator(dim, width, orthogonal=False)
                layers.append(GradientStep(operator, sign * time / gradient_steps))
            else:
                layers.append(SpherePreservingStep(dim, time / sphere_steps))
        super().__init__(*layers)
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        _check_points(x, type(self).__name__, self.dim)
        return super().forward(x)


# ------------------------------------------------------------------------ the targets


def van_der_pol(x: Tensor, mu: float = 1.0) -> Tensor:
    """Van der Pol field ``(x₂, μ(1 − x₁²) x₂ − x₁)`` on ``(N, 2)``: rotation, and a source inside
    the limit cycle, a sink outside."""
    _check_points(x, "van_der_pol", 2)
    x1, x2 = x.unbind(1)
    return torch.stack([x2, mu * (1 - x1**2) * x2 - x1], 1)


def talk_field(y: Tensor) -> Tensor:
    """The mass-preserving example of the talk on ``(N, 3)``: ``ẏ = S(y) 𝟙`` with the skew
    ``S(y) = [[0, −y₃y₁², y₂y₃], [y₃y₁², 0, −sin y₁], [−y₂y₃, sin y₁, 0]]``."""
    _check_points(y, "talk_field", 3)
    y1, y2, y3 = y.unbind(1)
    a, b, c = y3 * y1**2, y2 * y3, torch.sin(y1)
    return torch.stack([b - a, a - c, c - b], 1)


def flow_map(field: VectorField, x: Tensor, time: float = 1.0, substeps: int = 100) -> Tensor:
    """The time-``time`` flow map of ``ẋ = field(x)`` at ``x`` (``(N, n)``): classical Runge–Kutta
    (order 4) with ``substeps`` equal steps."""
    _check_points(x, "flow_map")
    if not math.isfinite(time):
        raise ValueError(f"time must be finite, got {time!r}")
    h = time / _positive("substeps", substeps)
    for _ in range(substeps):
        k1 = field(x)
        if k1.shape != x.shape:
            raise ValueError(f"field maps points of shape {tuple(x.shape)} to {tuple(k1.shape)}; "
                             f"flow_map needs a vector field from R^n to R^n")
        k2 = field(x + h / 2 * k1)
        k3 = field(x + h / 2 * k2)
        k4 = field(x + h * k3)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


# --------------------------------------------------------------------------- training


def approximation_error(model: nn.Module, inputs: Tensor, targets: Tensor) -> float:
    """Root-mean-square error ``sqrt(mean_i ‖model(x_i) − y_i‖²)`` on the samples."""
    _check_pair(inputs, targets)
    with torch.no_grad():
        return float(_squared_error(model(inputs), targets).sqrt())


def _check_pair(inputs: Tensor, targets: Tensor) -> None:
    _check_points(inputs, "inputs")
    _check_points(targets, "targets")
    if inputs.shape != targets.shape:
        raise ValueError(f"inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)} differ in shape")


def fit_flow_map(model: nn.Module, inputs: Tensor, targets: Tensor, *, iterations: int = 300,
                 lr: float = 0.05) -> list[float]:
    """Train ``model`` so that ``model(x_i) ≈ y_i``: full-batch Adam on the mean squared error, the
    learning rate decaying by a cosine from ``lr`` to 0. Returns the loss at each iteration; a
    non-finite loss raises ``FloatingPointError`` (lower ``lr``)."""
    _check_pair(inputs, targets)
    iterations = _positive("iterations", iterations)
    if not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, iterations)
    losses = []
    for _ in range(iterations):
        _, loss = optimizer_step(model, optimizer, _squared_error, inputs, targets)
        schedule.step()
        losses.append(float(loss.detach()))
    return losses


def _squared_error(outputs: Tensor, targets: Tensor) -> Tensor:
    return (outputs - targets).pow(2).sum(1).mean()
