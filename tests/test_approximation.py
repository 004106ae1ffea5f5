"""The splitting f = ∇U + X_S, the gradient and sphere-preserving steps, and the network built on them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robustflow.approximation import (
    GradientSphereNet,
    approximation_error,
    decompose,
    fit_flow_map,
    flow_map,
    talk_field,
    van_der_pol,
)
from robustflow.operators import ConvOperator, DenseOperator, OrthogonalConv
from robustflow.steps import ContractiveStep, GradientStep, SpherePreservingStep
from tests.conftest import jacobian_norm, push_output_norm

F64 = torch.float64


def _mlp_field(dim: int, width: int = 32) -> nn.Module:
    """A random smooth field R^dim → R^dim with both gradient and rotation parts."""
    return nn.Sequential(nn.Linear(dim, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                         nn.Linear(width, dim)).double()


def _points(n: int, dim: int) -> torch.Tensor:
    return 2.0 * torch.randn(n, dim, dtype=F64) / dim**0.5  # E‖x‖² = 4


def _radial(x: torch.Tensor, v: torch.Tensor) -> float:
    """``max_i |x_iᵀ v_i|``."""
    return float((x * v).sum(1).abs().max().detach())


def _jacobian(fn, x: torch.Tensor) -> torch.Tensor:
    """Jacobian of ``fn`` (``(1, n) → (1, n)``) at one point ``x`` (``(n,)``)."""
    return torch.autograd.functional.jacobian(lambda v: fn(v[None])[0], x)


# ------------------------------------------------------------------- decomposition


@pytest.mark.parametrize("dim", [2, 3, 10])
def test_rotation_is_tangent_to_spheres_and_gradient_is_a_gradient(dim: int) -> None:
    field = _mlp_field(dim)
    x = _points(64, dim)
    parts = decompose(field, x)
    parts = type(parts)(*(v.detach() for v in parts))
    assert _radial(x, parts.rotation) < 1e-10
    with torch.no_grad():
        assert torch.allclose(parts.gradient + parts.rotation, field(x), atol=1e-14, rtol=0)
    # a random field is neither a gradient nor sphere-preserving: both parts are there
    assert float(parts.rotation.norm(dim=1).mean()) > 1e-2
    assert float(parts.gradient.norm(dim=1).mean()) > 1e-2
    for point in x[:4]:
        jac = _jacobian(lambda p: decompose(field, p).gradient, point)
        assert float((jac - jac.T).abs().max()) < 1e-8
        # autograd's Jacobian is the real one (central differences), not an empty graph's zeros
        eps = 1e-5 * torch.eye(dim, dtype=F64)
        shifted = decompose(field, torch.cat([point + eps, point - eps])).gradient.detach()
        assert torch.allclose(jac.T, (shifted[:dim] - shifted[dim:]) / 2e-5, atol=1e-7)
        field_jac = _jacobian(field, point)
        assert float((field_jac - field_jac.T).abs().max()) > 1e-3  # the test can tell


def test_decomposition_matches_the_closed_form() -> None:
    # f = x(1 − ‖x‖²) + (−x₂, x₁): U = ‖x‖²/2 − ‖x‖⁴/4, ∇U = x(1 − ‖x‖²), X_S = (−x₂, x₁)
    def field(p: torch.Tensor) -> torch.Tensor:
        return p * (1 - p.pow(2).sum(1, keepdim=True)) + torch.stack([-p[:, 1], p[:, 0]], 1)

    x = _points(32, 2)
    r2 = x.pow(2).sum(1)
    parts = decompose(field, x, order=2)  # a cubic field: exact for order ≥ 2
    assert torch.allclose(parts.potential, r2 / 2 - r2**2 / 4, atol=1e-12)
    assert torch.allclose(parts.gradient, x * (1 - r2[:, None]), atol=1e-12)
    assert torch.allclose(parts.rotation, torch.stack([-x[:, 1], x[:, 0]], 1), atol=1e-12)


def test_orthogonality_holds_to_the_quadratures_accuracy() -> None:
    # exact for polynomial fields of degree < 2·order; geometric in order for analytic ones
    x = _points(64, 3)
    coefficients = torch.randn(3, 3, dtype=F64)

    def quintic(p: torch.Tensor) -> torch.Tensor:
        return (p @ coefficients.T) * p.pow(2).sum(1, keepdim=True) ** 2

    assert _radial(x, decompose(quintic, x, order=3).rotation) < 1e-12
    assert _radial(x, decompose(quintic, x, order=2).rotation) > 1e-6
    field = _mlp_field(3)
    errors = [_radial(x, decompose(field, x, order=k).rotation) for k in (2, 4, 8, 16)]
    assert errors[0] > 1e-6 and errors[-1] < 1e-10
    assert errors == sorted(errors, reverse=True)
    # the talk's mass-preserving field (with sin y₁): not polynomial, tangent to 1e-10 at order 16
    y = _points(64, 3)
    assert _radial(y, decompose(talk_field, y).rotation) < 1e-10


def test_decompose_keeps_dtype_and_is_differentiable_in_the_parameters() -> None:
    field = _mlp_field(3).float()
    x = torch.randn(8, 3)
    parts = decompose(field, x)
    assert parts.gradient.dtype == torch.float32 and parts.potential.shape == (8,)
    assert _radial(x, parts.rotation) < 1e-5
    parts.rotation.pow(2).sum().backward()
    assert all(p.grad is not None and float(p.grad.abs().max()) > 0 for p in field.parameters())
    with torch.no_grad():  # a caller's no_grad does not stop the autograd gradient
        assert torch.allclose(decompose(field, x).gradient, parts.gradient)


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda: decompose(torch.tanh, torch.zeros(3)), r"shape \(N, n\) with N, n ≥ 1, got \(3,\)"),
        (lambda: decompose(torch.tanh, torch.zeros(2, 3, 4)), r"got \(2, 3, 4\)"),
        (lambda: decompose(torch.tanh, torch.zeros(0, 3)), r"got \(0, 3\)"),
        (lambda: decompose(torch.tanh, torch.zeros(2, 3, dtype=torch.long)), "floating-point"),
        (lambda: decompose(torch.tanh, torch.zeros(2, 3), order=0), "order must be an integer ≥ 1, got 0"),
        (lambda: decompose(torch.tanh, torch.zeros(2, 3), order=2.5), "order must be an integer ≥ 1"),
        (lambda: decompose(lambda p: p[:, :2], torch.zeros(2, 3)), "maps points of dimension 3 to dimension"),
        (lambda: decompose(lambda p: p[:1], torch.zeros(2, 3)), r"field returned shape \(1, 3\)"),
        (lambda: flow_map(lambda p: p[:, :1], torch.zeros(2, 3)), r"to \(2, 1\)"),
        (lambda: van_der_pol(torch.zeros(4, 3)), "dimension 2"),
        (lambda: GradientSphereNet(2, steps=0), "steps must be a positive integer"),
        (lambda: GradientSphereNet(2, time=0.0), "time must be a finite number > 0"),
        (lambda: GradientSphereNet(2)(torch.zeros(4, 3)), r"dimension 2, got shape \(4, 3\)"),
        (lambda: GradientStep(DenseOperator(2, 3), float("nan")), "step_size must be a finite number"),
        (lambda: SpherePreservingStep(3, -0.1), "step_size must be a finite number ≥ 0"),
        (lambda: SpherePreservingStep(3)(torch.zeros(4, 2)), r"expects input of shape \(batch, 3\)"),
        (lambda: fit_flow_map(GradientSphereNet(2), torch.zeros(4, 2), torch.zeros(5, 2)), "differ in shape"),
        (lambda: fit_flow_map(GradientSphereNet(2), *[torch.zeros(4, 2)] * 2, lr=0.0), "lr must be a finite"),
        (lambda: fit_flow_map(GradientSphereNet(2), *[torch.zeros(4, 2)] * 2, iterations=0),
         "iterations must be a positive integer"),
    ],
)
def test_bad_input_says_what_is_wrong(call, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        call()


# ----------------------------------------------------------------------- the steps


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-6), (F64, 1e-12)])
@pytest.mark.parametrize("dim", [2, 3, 10])
def test_sphere_preserving_step_keeps_the_norm_over_100_steps(dtype, tolerance: float, dim: int) -> None:
    step = SpherePreservingStep(dim, 0.5).to(dtype)
    for p in step.parameters():
        nn.init.normal_(p, std=0.5)
    x0 = torch.randn(64, dim, dtype=dtype)
    x = x0
    with torch.no_grad():
        s = step.skew(x0)
        assert torch.equal(s, -s.transpose(1, 2))
        for _ in range(100):
            x = step(x)
    assert x.dtype == dtype
    drift = (x.double().norm(dim=1) - x0.double().norm(dim=1)).abs() / x0.double().norm(dim=1)
    assert float(drift.max()) < tolerance
    assert float((x - x0).norm(dim=1).mean()) > 0.5  # it does move the points


def test_sphere_preserving_step_is_a_cayley_rotation() -> None:
    step = SpherePreservingStep(4, 0.7).double()
    x = torch.randn(5, 4, dtype=F64)
    with torch.no_grad():
        m = 0.7 * step.skew(x)
        eye = torch.eye(4, dtype=F64)
        cay = torch.linalg.solve(eye - m / 2, eye + m / 2)
        assert torch.allclose(step(x), (cay @ x[:, :, None])[:, :, 0], atol=1e-13)
        assert torch.allclose(cay.transpose(1, 2) @ cay, eye.expand(5, 4, 4), atol=1e-13)


GRADIENT_STEPS = {
    "tall": (lambda: GradientStep(DenseOperator(4, 7, orthogonal=False), 0.6), (4,)),
    "wide": (lambda: GradientStep(DenseOperator(5, 3, orthogonal=False), 0.8), (5,)),
    "ascent": (lambda: GradientStep(DenseOperator(4, 6, orthogonal=False), -0.4), (4,)),
    "large-step": (lambda: GradientStep(DenseOperator(3, 5, orthogonal=False), 2.5), (3,)),
    "conv": (lambda: GradientStep(ConvOperator(2, 3, 5), 0.3), (2, 5, 5)),
}


@pytest.mark.parametrize("name", sorted(GRADIENT_STEPS))
def test_gradient_step_bound_holds_before_and_after_training(name: str) -> None:
    make, shape = GRADIENT_STEPS[name]
    step = make().double()
    for p in step.parameters():
        nn.init.normal_(p, std=0.7)
    for _ in range(2):
        bound = step.lipschitz_bound()
        for _ in range(4):
            assert jacobian_norm(step, torch.randn(*shape, dtype=F64)) <= bound * (1 + 1e-9)
        push_output_norm(step, shape)


@pytest.mark.parametrize("h", [0.7, -0.3])
def test_gradient_step_jacobian_is_symmetric(h: float) -> None:
    step = GradientStep(DenseOperator(4, 9, orthogonal=False), h).double()
    for p in step.parameters():
        nn.init.normal_(p)
    for _ in range(4):
        jac = _jacobian(step, torch.randn(4, dtype=F64))
        assert torch.allclose(jac, jac.T, atol=1e-12)
        assert float((jac - torch.eye(4, dtype=F64)).abs().max()) > 1e-2
        eigenvalues = torch.linalg.eigvalsh(jac)  # I − h AᵀDA: below 1 descending, above 1 ascending
        assert bool(((eigenvalues < 1) if h > 0 else (eigenvalues > 1)).all())


def test_gradient_step_with_an_orthogonal_operator_is_the_contractive_step() -> None:
    for operator in (DenseOperator(5, 8), OrthogonalConv(2, 6)):
        operator = operator.double()
        contractive, gradient = ContractiveStep(operator, 0.7), GradientStep(operator, 0.7)
        with torch.no_grad():
            contractive.bias.normal_()
            gradient.bias.copy_(contractive.bias)
            x = torch.randn(3, *operator.in_shape, dtype=F64)
            assert torch.equal(gradient(x), contractive(x))
        bound = gradient.lipschitz_bound()
        assert bound == contractive.lipschitz_bound() == pytest.approx(1 - 0.7 / 2, abs=1e-5)


# ---------------------------------------------------------------------- the network


def test_flow_map_matches_the_exponential_of_a_linear_field() -> None:
    m = torch.randn(3, 3, dtype=F64)
    x = torch.randn(6, 3, dtype=F64)
    expected = x @ torch.linalg.matrix_exp(0.8 * m).T
    assert torch.allclose(flow_map(lambda p: p @ m.T, x, time=0.8, substeps=200), expected, atol=1e-9)


def test_deeper_networks_approximate_the_flow_map_better() -> None:
    generator = torch.Generator().manual_seed(0)
    x = 4 * torch.rand(256, 2, dtype=F64, generator=generator) - 2
    x_test = 4 * torch.rand(256, 2, dtype=F64, generator=generator) - 2
    y, y_test = flow_map(van_der_pol, x), flow_map(van_der_pol, x_test)
    errors = {}
    for steps in (2, 8):
        torch.manual_seed(1)
        net = GradientSphereNet(2, steps=steps).double()
        losses = fit_flow_map(net, x, y, iterations=300)
        assert losses[-1] < losses[0]
        errors[steps] = approximation_error(net, x_test, y_test)
        # training kept the invariants: sphere steps rotate, gradient steps alternate descent and ascent
        signs = [float(m.step_size) > 0 for m in net if isinstance(m, GradientStep)]
        assert signs == [i % 2 == 0 for i in range(len(signs))]
        for m in net:
            if isinstance(m, SpherePreservingStep):
                with torch.no_grad():
                    assert torch.allclose(m(x).norm(dim=1), x.norm(dim=1), rtol=1e-13)
    assert errors[2] < approximation_error(nn.Identity(), x_test, y_test) / 2
    assert errors[8] < errors[2] / 2, errors
