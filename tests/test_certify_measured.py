"""Measured rounding bounds: the same rules, evaluated on the values a forward pass produced.

Each bound must cover the float32 error against float64 (the test fails if a term is dropped),
be no looser than the a-priori bound of the same rule, and compute the very outputs of the
module's forward; a rule that computes anything else is refused.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from certify import Certifier, NotCertifiable, register
from certify.rounding import Measured, Tracked, exact_arithmetic, norm_bound
from robustflow.activations import sigma
from robustflow.certification import _abs_norm, _operator_bound
from robustflow.networks import build_model, preset
from robustflow.operators import ConvOperator

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations made in a test are undone after it."""
    from certify import bounds

    monkeypatch.setattr(bounds, "_REGISTRY", dict(bounds._REGISTRY))


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_norm_bound_is_a_close_upper_bound_on_strided_batches() -> None:
    x = torch.randn(6, 5, 7, 9, generator=_generator(0)).permute(0, 3, 1, 2)  # non-contiguous
    exact = x.double().flatten(1).norm(dim=1)
    bound = norm_bound(x)
    assert (bound >= exact).all()
    assert (bound <= exact * (1 + 1e-4)).all()


def test_each_measured_operation_covers_its_float32_error() -> None:
    """A chain of every operation, in float32 against the same chain in float64 from the same
    input: the measured error bound holds per sample, and is no looser than Tracked's."""
    conv = ConvOperator(8, 8, 6, 3)
    with torch.no_grad():
        conv.weight.normal_(0, 0.5, generator=_generator(1))
    conv64 = ConvOperator(8, 8, 6, 3).double()
    conv64.weight.data.copy_(conv.weight.double())
    bias = torch.randn(8, 1, 1, generator=_generator(2)) * 3
    h = torch.tensor(1.7)
    x = torch.randn(16, 8, 6, 6, generator=_generator(3)) * torch.logspace(-3, 3, 16)[:, None, None, None]
    norm, abs_norm, terms = _operator_bound(conv, ([], [])), _abs_norm(conv), 8 * 9
    bias_norm = float(bias.double().norm()) * 6

    def chain(v):
        z = v.linear(norm, abs_norm, terms, 288, apply=conv).add_constant(bias, bias_norm)
        z = z.elementwise(1.0, 0.0, 288, apply=sigma).scale(h, 288)
        return v.add(z.linear(norm, abs_norm, terms, 288, apply=conv.adjoint), subtract=True)

    with exact_arithmetic():
        measured = chain(Measured.input(x))
        tracked = chain(Tracked.input(torch.float32))
        x64 = x.double()
        exact = x64 - h.double() * conv64.adjoint(1.0 * sigma(conv64(x64) + bias.double()))
    error = (measured.value.double() - exact).flatten(1).norm(dim=1)
    assert (error > 0).all()
    assert (error <= measured.error).all()
    a_priori = torch.tensor([tracked.error.at(float(r)) for r in norm_bound(x)], dtype=torch.float64)
    assert (measured.error <= a_priori * (1 + 1e-6)).all()
    assert (measured.norm >= measured.value.double().flatten(1).norm(dim=1)).all()


def test_measured_operations_refuse_to_run_without_the_computation() -> None:
    x = Measured.input(torch.ones(2, 3))
    with pytest.raises(ValueError, match="needs the function"):
        x.linear(1.0, 1.0, 3, 3)
    with pytest.raises(ValueError, match="not its norm"):
        x.add(1.0)
    with pytest.raises(ValueError, match="relative accuracy"):
        x.elementwise(1.0, 1.5, 3, apply=torch.tanh)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model(preset("tiny")).eval()
    with torch.no_grad():  # large biases: what a-priori bounds overestimate most
        for pair in (m for m in model.modules() if hasattr(m, "contractive")):
            pair.contractive.bias.normal_(0, 2.0)
            pair.expansive.bias.normal_(0, 2.0)
    return model


def test_measured_slack_is_tighter_than_the_per_part_bound_and_still_covers_the_error() -> None:
    model = _model()
    x = torch.rand(64, 3, 8, 8, generator=_generator(4))
    certifier = Certifier(model, (3, 8, 8))
    assert certifier._measured[torch.float32]  # the pairs are measured
    with torch.inference_mode(), exact_arithmetic():
        logits, measured = certifier._forward(x)
        certifier._measured = {}
        same, per_part = certifier._forward(x)
        exact = certifier._model64(x.double())
    assert torch.equal(logits, same)  # the measured pass computes the forward's very numbers
    error = math.sqrt(2) * (logits.double() - exact).norm(dim=1)
    assert (error <= measured).all()
    assert (measured < 0.8 * per_part).all()


class Doubling(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x


def test_a_measured_rule_that_computes_something_else_is_refused(registry) -> None:
    def wrong(module, io, x):  # claims 2x, computes 3x
        return x.elementwise(2.0, 0.0, 1, apply=lambda t: 3 * t)

    register(Doubling, lambda module, io: 2.0, rounding=wrong, measured=True, name="test: 2x")
    model = nn.Sequential(nn.Flatten(), Doubling(), nn.Linear(12, 3))
    with pytest.raises(NotCertifiable, match="measured rounding rule computes other outputs"):
        Certifier(model, (3, 2, 2))

    def right(module, io, x):
        return x.elementwise(2.0, 0.0, 1, apply=lambda t: 2 * t)

    register(Doubling, lambda module, io: 2.0, rounding=right, measured=True, name="test: 2x")
    assert Certifier(model, (3, 2, 2))._measured[torch.float32]
    with pytest.raises(TypeError, match="needs a rounding rule"):
        register(Doubling, lambda module, io: 2.0, measured=True)


class Tripling(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 3 * x


def test_a_measured_rule_may_round_differently_from_the_forward(registry) -> None:
    """``(t / 7) · 21`` is not ``3 t`` bit for bit, but both compute 3t to within their bounds."""
    def sevenths(module, io, x):
        return x.elementwise(3.0, 3 * x.u, 1, apply=lambda t: (t / 7) * 21)

    register(Tripling, lambda module, io: 3.0, rounding=sevenths, measured=True, name="test: 3x")
    model = nn.Sequential(nn.Flatten(), Tripling(), nn.Linear(48, 3))
    # the batch certify checks the rule on (seeded) does round differently
    x = torch.rand(2, 3, 4, 4, generator=_generator(0), dtype=torch.float64).float()
    assert not torch.equal((x / 7) * 21, 3 * x)
    certifier = Certifier(model, (3, 4, 4))
    assert "model.1" in certifier._measured[torch.float32]


def test_operator_norms_follow_in_place_changes_of_the_weights() -> None:
    conv = ConvOperator(4, 4, 5, 3)
    before = (_operator_bound(conv, ([], [])), _abs_norm(conv))
    with torch.no_grad():
        conv.weight.mul_(3.0)
    after = (_operator_bound(conv, ([], [])), _abs_norm(conv))
    assert after[0] == pytest.approx(3 * before[0], rel=1e-6)
    assert after[1] == pytest.approx(3 * before[1], rel=1e-6)


# ------------------------------------------------------------- parts computed in float64


def test_the_first_pass_computes_error_dense_parts_in_float64_and_tightens_the_bound() -> None:
    model = _model(seed=1)
    x = torch.rand(200, 3, 8, 8, generator=_generator(5))
    certifier = Certifier(model, (3, 8, 8))
    plan = certifier.plan
    assert torch.float64 in plan and torch.float32 in plan
    assert Certifier(model, (3, 8, 8)).plan == plan  # deterministic
    with torch.inference_mode(), exact_arithmetic():
        logits, mixed = certifier._forward(x)
        exact = certifier._model64(x.double())
        certifier.plan = [torch.float32] * len(plan)
        _, single = certifier._forward(x)
    assert (math.sqrt(2) * (logits.double() - exact).norm(dim=1) <= mixed).all()
    assert (mixed < 0.9 * single).all()

    y = exact.argmax(dim=1)
    epsilons = [0.02, 0.05]
    certifier._planned = True  # keep the plans set here
    one_precision = certifier(x, y, epsilons)
    certifier.plan = plan
    two_precisions = certifier(x, y, epsilons)
    for eps in epsilons:  # the decisions at the requested ε are float64's either way
        assert torch.equal(two_precisions.correct & (two_precisions.radius > eps),
                           one_precision.correct & (one_precision.radius > eps))
    assert two_precisions.rechecked.sum() < one_precision.rechecked.sum()


def test_rounding_a_float64_part_back_to_float32_is_in_the_bound() -> None:
    """A float64 part followed by an exact float32 part (a reshape): the only error of the
    logits is the rounding to float32 in between, which the part's own float64 bound does not
    cover."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Flatten()).eval()
    x = torch.randn(64, 6, generator=_generator(6))
    certifier = Certifier(model, (6,))
    certifier.plan = [torch.float64, torch.float32]
    with torch.inference_mode(), exact_arithmetic():
        logits, slack = certifier._forward(x)
        exact = certifier._model64(x.double())
        float64_part = certifier._local[torch.float64][0]
    error = math.sqrt(2) * (logits.double() - exact).norm(dim=1)
    assert (error > 0).all() and (error <= slack).all()
    own = math.sqrt(2) * (float64_part.const + float64_part.slope * x.double().norm(dim=1))
    assert (own < error).any()


def test_the_first_batch_with_a_requested_eps_picks_the_cheapest_plan(monkeypatch) -> None:
    """Far from every radius no decision needs float64, so float64 parts would only cost. Near
    the radii some do: whether computing parts in float64 pays depends on its price."""
    from certify import certificates

    model = _model(seed=1)
    x = torch.rand(200, 3, 8, 8, generator=_generator(7))
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    far = Certifier(model, (3, 8, 8))
    assert torch.float64 in far.plan  # the plan before any decision is asked for
    batch = far(x, y, [100.0])
    assert far.plan == [torch.float32] * len(far.plan) and not batch.rechecked.any()

    # the very weights certified (frozen), in float64
    radii = Certifier(copy.deepcopy(far.model).double(), (3, 8, 8))(x.double(), y).radius
    epsilons = radii[radii > 0][::10].tolist()
    rechecked = {}
    for price in (1000.0, 1.0):
        monkeypatch.setattr(certificates, "FLOAT64_COST", price)
        near = Certifier(model, (3, 8, 8))
        batch = near(x, y, epsilons)
        rechecked[price] = int(batch.rechecked.sum())
        assert (torch.float64 in near.plan) == (price == 1.0)
        for eps in epsilons:  # decided as float64 decides, whatever the plan
            assert torch.equal(batch.correct & (batch.radius > eps), radii > eps)
        again = near(x, y, epsilons)  # the plan is fixed: the same batch, the same certificates
        assert torch.equal(again.radius, batch.radius)
    assert rechecked[1.0] < rechecked[1000.0]
