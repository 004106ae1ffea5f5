"""Each step's proven bound against the exact Jacobian norm, and its invariant."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from robustflow.activations import Sigma
from robustflow.layers import Centering, NormalizedLinear
from robustflow.networks import build_model, preset
from robustflow.operators import (
    ChannelMix,
    ConvOperator,
    DenseOperator,
    OrthogonalConv,
    circular_pad,
    compose_kernels,
)
from robustflow.steps import (
    ContractiveStep,
    EulerStep,
    ExpansiveContractivePair,
    ExpansiveStep,
    FixedStepSizes,
    LearnedStepSizes,
    MassPreservingStep,
    VolumePreservingStep,
    check_pair_rule,
    contraction_factor,
    max_expansive_step,
)
from tests.conftest import jacobian_norm, push_output_norm

IMG = (2, 8, 8)


def _pair(shape=IMG, rule: str = "paper") -> ExpansiveContractivePair:
    if len(shape) == 1:
        make = lambda: DenseOperator(shape[0], shape[0])  # noqa: E731
    else:
        make = lambda: OrthogonalConv(shape[0], shape[1])  # noqa: E731
    sizes = LearnedStepSizes(rule=rule, expansive_share=0.9)
    return ExpansiveContractivePair(ExpansiveStep(make()), ContractiveStep(make()), sizes)


LAYERS = {
    "sigma": (lambda: Sigma(), IMG),
    "contractive-conv": (lambda: ContractiveStep(OrthogonalConv(2, 8), 0.4), IMG),
    "contractive-dense-tall": (lambda: ContractiveStep(DenseOperator(6, 9), 0.5), (6,)),
    "contractive-free-conv": (lambda: ContractiveStep(ConvOperator(2, 3, 8), 0.3), IMG),
    "expansive-conv": (lambda: ExpansiveStep(OrthogonalConv(2, 8), 0.15), IMG),
    "pair-conv": (_pair, IMG),
    "pair-dense": (lambda: _pair((6,)), (6,)),
    "pair-conv-exact-rule": (lambda: _pair(rule="exact"), IMG),
    "pair-dense-exact-rule": (lambda: _pair((6,), rule="exact"), (6,)),
    "euler-conv": (lambda: EulerStep(ConvOperator(2, 3, 8), ConvOperator(3, 2, 8), 0.7), IMG),
    "volume": (lambda: VolumePreservingStep(3, 0.5), (6,)),
    "mass": (lambda: MassPreservingStep(4, 0.2), (4,)),
    "lift": (lambda: ChannelMix(2, 5, 8), IMG),
    "down-mix": (lambda: ChannelMix(8, 3, 4), (8, 4, 4)),
    "centering": (lambda: Centering([0.5, 0.4], [0.5, 0.25]), IMG),
    "head": (lambda: NormalizedLinear(6, 3), (6,)),
}


def _check_bound(layer: torch.nn.Module, shape: tuple[int, ...], points: int = 4) -> None:
    bound = layer.lipschitz_bound()
    for _ in range(points):
        x = torch.randn(*shape, dtype=torch.float64)
        assert jacobian_norm(layer, x) <= bound * (1 + 1e-5)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_bound_holds_before_and_after_adversarial_training(name: str) -> None:
    make, shape = LAYERS[name]
    layer = make().double()
    _check_bound(layer, shape)
    if any(p.requires_grad for p in layer.parameters()):
        push_output_norm(layer, shape)
        _check_bound(layer, shape)


def test_bounds_are_tight_for_linear_parts() -> None:
    mix = ChannelMix(2, 5, 8).double()
    x = torch.randn(*IMG, dtype=torch.float64)
    assert jacobian_norm(mix, x) == pytest.approx(mix.lipschitz_bound(), rel=1e-5)
    conv = ConvOperator(2, 3, 8).double()
    assert jacobian_norm(conv, x) == pytest.approx(conv.lipschitz_bound(), rel=1e-5)


def test_contractive_bound_is_at_most_the_paper_factor() -> None:
    for h in (0.15, 0.3, 0.5, 0.9):
        step = ContractiveStep(OrthogonalConv(4, 6), h)
        assert step.lipschitz_bound() <= contraction_factor(h) + 1e-5
        assert step.lipschitz_bound() == pytest.approx(1 - h / 2, abs=1e-5)


def test_contractive_step_contracts_at_the_stated_rate() -> None:
    step = ContractiveStep(OrthogonalConv(2, 8), 0.5).double()
    x = torch.randn(16, *IMG, dtype=torch.float64)
    y = x + 0.1 * torch.randn_like(x)
    ratio = (step(x) - step(y)).flatten(1).norm(dim=1) / (x - y).flatten(1).norm(dim=1)
    assert float(ratio.max().detach()) <= 0.75 + 1e-6


@pytest.mark.parametrize("orthogonal_map", ["expm", "cayley"])
def test_orthogonality_survives_optimiser_steps(orthogonal_map: str) -> None:
    conv = OrthogonalConv(4, 6, orthogonal_map=orthogonal_map).double()
    dense = DenseOperator(5, 7, orthogonal_map=orthogonal_map).double()
    mix = ChannelMix(6, 3, 4, orthogonal_map=orthogonal_map).double()
    triv = {"expm": "triv=linalg_matrix_exp", "cayley": "triv=cayley"}[orthogonal_map]
    assert all(triv in repr(m) for m in (conv, dense, mix))
    opt = torch.optim.SGD([*conv.parameters(), *dense.parameters(), *mix.parameters()], lr=0.5)
    for _ in range(10):
        x = torch.randn(3, 4, 6, 6, dtype=torch.float64)
        loss = (conv(x) ** 3).sum() + (dense(torch.randn(3, 5, dtype=torch.float64)) ** 3).sum()
        loss = loss + (mix(torch.randn(3, 6, 4, 4, dtype=torch.float64)) ** 3).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sv = conv.singular_values()
        assert float((sv - 1).abs().max()) < 1e-5
        w = dense.weight
        assert torch.allclose(w.T @ w, torch.eye(5, dtype=torch.float64), atol=1e-5)
    m = mix.matrix  # 3 × 6, orthonormal rows
    assert torch.allclose(m @ m.T, torch.eye(3, dtype=torch.float64), atol=1e-5)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    assert torch.allclose(conv.adjoint(conv(x)), x, atol=1e-5)


def test_fast_kernel_composition_and_padding_match_their_definitions() -> None:
    a = torch.randn(5, 4, 3, 2, dtype=torch.float64)
    b = torch.randn(4, 6, 2, 3, dtype=torch.float64)
    expected = torch.zeros(5, 6, 4, 4, dtype=torch.float64)
    for u1, u2, v1, v2 in itertools.product(range(3), range(2), range(2), range(3)):
        expected[:, :, u1 + v1, u2 + v2] += a[:, :, u1, u2] @ b[:, :, v1, v2]  # (a ∘ b)_w = Σ a_u b_v
    assert torch.allclose(compose_kernels(a, b), expected, atol=1e-12)
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    for p in (0, 1, 2):
        expected = F.pad(x, (p, p, p, p), mode="circular")
        assert torch.equal(circular_pad(x, p), expected)
        leaf = x.clone().requires_grad_()
        grad = torch.randn_like(expected)
        (folded,) = torch.autograd.grad(circular_pad(leaf, p), leaf, grad)
        (reference,) = torch.autograd.grad(F.pad(leaf, (p, p, p, p), mode="circular"), leaf, grad)
        assert torch.allclose(folded, reference, atol=1e-12)  # the hand-written backward
        if p:  # a channels-last input stays channels-last (oneDNN convolves it without a reorder)
            padded = circular_pad(x.contiguous(memory_format=torch.channels_last), p)
            assert torch.equal(padded, expected)
            assert padded.is_contiguous(memory_format=torch.channels_last) and not padded.is_contiguous()
    with pytest.raises(ValueError, match="cannot wrap"):
        circular_pad(x, 6)
    # the BCOP kernel built by matrix products equals the composition of its factors
    conv = OrthogonalConv(6, 5, kernel_size=5).double()
    eye = torch.eye(6, dtype=torch.float64)
    with torch.no_grad():
        reference = conv.mix[:, :, None, None]
        for i, frame in enumerate(conv.frames):
            taps = torch.stack([frame @ frame.T, eye - frame @ frame.T], dim=-1)
            block = taps[:, :, None, :] if i % 2 == 0 else taps[:, :, :, None]
            reference = compose_kernels(reference, block)
        assert torch.allclose(conv.kernel(), reference, atol=1e-12)
    assert torch.equal(Sigma()(x), torch.maximum(x, x / 2))


def test_adjoint_is_exact() -> None:
    for op in (OrthogonalConv(3, 5), ConvOperator(2, 4, 5), ChannelMix(3, 2, 5), DenseOperator(3, 4)):
        op = op.double()
        x = torch.randn(2, *op.in_shape, dtype=torch.float64)
        y = torch.randn(2, *op.out_shape, dtype=torch.float64)
        with torch.no_grad():
            assert float((op(x) * y).sum()) == pytest.approx(float((x * op.adjoint(y)).sum()), abs=1e-9)
            # Aᵀ inner(A x) with the weights computed once equals the two products apart
            assert torch.allclose(op.sandwich(x, torch.tanh), op.adjoint(torch.tanh(op(x))), atol=1e-12)


@pytest.mark.parametrize("rule", ["paper", "exact"])
def test_pair_rule_holds_after_every_optimiser_step(rule: str) -> None:
    pair = _pair(rule=rule)
    sizes = list(pair.step_sizes.parameters())
    weights = [p for p in pair.parameters() if all(p is not q for q in sizes)]
    # huge steps on the step sizes push h_E and h_C hard against their limits
    opt = torch.optim.SGD([{"params": sizes, "lr": 50.0}, {"params": weights, "lr": 0.05}])
    for _ in range(20):
        x = torch.randn(4, *IMG)
        loss = -pair(x).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        h_e, h_c = (float(v.detach()) for v in pair.step_sizes())
        assert 0.15 - 1e-6 <= h_c <= 0.5 + 1e-6
        factor = math.sqrt(1 - h_c + h_c * h_c) if rule == "paper" else 1 - h_c / 2
        assert factor * (1 + h_e) <= 1 + 1e-6
        # the exact rule leaves no slack: float32 orthogonality drift (~1e-5) shows in the
        # computed bound, which certificates use as it is
        assert pair.lipschitz_bound() <= 1 + (1e-5 if rule == "paper" else 1e-4)


def test_exact_rule_allows_larger_expansive_steps_and_is_still_one_lipschitz() -> None:
    for h_c in (0.15, 0.3, 0.5, 0.9):
        assert max_expansive_step(h_c, "exact") > max_expansive_step(h_c, "paper")
        h_e = max_expansive_step(h_c, "exact")
        FixedStepSizes(h_e, h_c, "exact")
        with pytest.raises(ValueError, match="break the paper pair rule"):
            FixedStepSizes(h_e, h_c, "paper")
        # at the limit of the exact rule the pair of isometric steps is exactly 1-Lipschitz
        steps = ExpansiveStep(OrthogonalConv(2, 8)), ContractiveStep(OrthogonalConv(2, 8))
        pair = ExpansiveContractivePair(*steps, FixedStepSizes(h_e, h_c, "exact")).double()
        assert pair.lipschitz_bound() == pytest.approx(1.0, abs=1e-5)
        x = torch.randn(*IMG, dtype=torch.float64)
        assert jacobian_norm(pair, x) <= pair.lipschitz_bound() * (1 + 1e-5)
    with pytest.raises(ValueError, match="pair rule must be one of"):
        LearnedStepSizes(rule="loose")


@pytest.mark.parametrize("h_c", [1.0, 4 / 3, 1.6, 1.95])
def test_exact_rule_admits_contractive_steps_up_to_two(h_c: float) -> None:
    # max(|1 − h_C|, 1 − h_C/2) < 1 for 0 < h_C < 2: the paper's factor does not allow these
    with pytest.raises(ValueError, match=r"h_C must lie in \(0, 1\)"):
        check_pair_rule(0.0, h_c, "paper")
    h_e = max_expansive_step(h_c, "exact")
    assert h_e == pytest.approx(1 / max(abs(1 - h_c), 1 - h_c / 2) - 1)
    steps = ExpansiveStep(OrthogonalConv(2, 8)), ContractiveStep(OrthogonalConv(2, 8))
    pair = ExpansiveContractivePair(*steps, FixedStepSizes(h_e, h_c, "exact")).double()
    with torch.no_grad():
        for p in pair.parameters():
            if p.dim() == 3 and p.shape[0] == 2:  # biases: spread the kinks of Σ
                p.normal_()
    assert pair.lipschitz_bound() == pytest.approx(1.0, abs=1e-4)  # float32 weights, h_E up to 2
    for _ in range(3):
        x = torch.randn(*IMG, dtype=torch.float64)
        assert jacobian_norm(pair, x) <= pair.lipschitz_bound() * (1 + 1e-5)
    # learnable sizes reach that far only under the exact rule, and keep it by construction
    sizes = LearnedStepSizes((0.15, 1.95), 0.99, "exact")
    with torch.no_grad():
        sizes.raw_h_c.fill_(torch.logit(torch.tensor((h_c - 0.15) / 1.8)).item())
    learned_e, learned_c = (float(v) for v in sizes())
    assert learned_c == pytest.approx(h_c, abs=1e-5)
    assert max(abs(1 - learned_c), 1 - learned_c / 2) * (1 + learned_e) <= 1 + 1e-6
    with pytest.raises(ValueError, match="lo <= hi < 1 under the paper rule"):
        LearnedStepSizes((0.15, 1.5), 0.5, "paper")
    with pytest.raises(ValueError, match="lo <= hi < 2 under the exact rule"):
        LearnedStepSizes((0.15, 2.0), 0.5, "exact")


def test_learned_step_sizes_start_where_asked() -> None:
    """``h_c_init`` sets the starting ``h_C`` (the range's middle without it); the starting
    ``h_E`` is ``expansive_share`` of the largest the rule allows there."""
    middle_e, middle_c = (float(v.detach()) for v in LearnedStepSizes((0.15, 1.9), 0.5, "exact")())
    assert middle_c == pytest.approx(1.025, abs=1e-6)
    sizes = LearnedStepSizes((0.15, 1.9), 0.5, "exact", h_c_init=4 / 3)
    h_e, h_c = (float(v.detach()) for v in sizes())
    assert h_c == pytest.approx(4 / 3, abs=1e-5)
    assert h_e == pytest.approx(0.5 * float(max_expansive_step(torch.tensor(h_c), "exact")), rel=1e-5)
    assert h_e != pytest.approx(middle_e, rel=1e-2)
    model = build_model(preset("micro", pair_rule="exact", h_c_range=(0.15, 1.9), h_c_init=0.5))
    starts = [float(m()[1].detach()) for m in model.modules() if isinstance(m, LearnedStepSizes)]
    assert starts and all(v == pytest.approx(0.5, abs=1e-5) for v in starts)
    with pytest.raises(ValueError, match="h_c_init must lie strictly inside"):
        LearnedStepSizes((0.15, 1.9), 0.5, "exact", h_c_init=1.9)


@pytest.mark.parametrize(
    ("h_e", "h_c", "fragment"),
    [(0.3, 0.5, "h_E=0.3, h_C=0.5"), (0.0, 1.2, "h_C must lie in (0, 1)"), (-0.1, 0.5, "break")],
)
def test_step_sizes_that_break_the_rule_raise(h_e: float, h_c: float, fragment: str) -> None:
    with pytest.raises(ValueError, match="h_") as info:
        FixedStepSizes(h_e, h_c)
    assert fragment in str(info.value)
    with pytest.raises(ValueError):
        check_pair_rule(h_e, h_c)
    FixedStepSizes(0.15, 0.5)  # sqrt(3)/2 · 1.15 = 0.9959 ≤ 1


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda: OrthogonalConv(1, 8), "at least 2 channels"),
        (lambda: OrthogonalConv(4, 8, kernel_size=2), "odd"),
        (lambda: OrthogonalConv(4, 8, orthogonal_map="qr"), "orthogonal_map must be one of"),
        (lambda: DenseOperator(0, 3), "in_features must be a positive integer"),
        (lambda: LearnedStepSizes((0.5, 1.5)), "0 < lo <= hi < 1"),
        (lambda: ExpansiveStep(ChannelMix(2, 3, 4)), "square operator"),
        (lambda: ContractiveStep(DenseOperator(3, 3), step_size=-1.0), "finite number"),
        (lambda: Centering([0.5], [0.0]), "std must be positive"),
    ],
)
def test_invalid_configurations_say_what_is_wrong(make, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        make()


def test_wrongly_shaped_input_gives_a_clear_error() -> None:
    step = ContractiveStep(OrthogonalConv(2, 8))
    with pytest.raises(ValueError, match=r"expects input of shape \(batch, 2, 8, 8\), got \(1, 3, 8, 8\)"):
        step(torch.zeros(1, 3, 8, 8))


def test_volume_preserving_step_has_unit_determinant_and_exact_inverse() -> None:
    step = VolumePreservingStep(4, 0.8).double()
    for p in step.parameters():  # non-trivial parameters
        torch.nn.init.normal_(p, std=0.7)
    for _ in range(5):
        x = torch.randn(8, dtype=torch.float64)
        jac = torch.autograd.functional.jacobian(lambda v: step(v[None])[0], x)
        assert abs(abs(float(torch.linalg.det(jac))) - 1) < 1e-5
    x = torch.randn(16, 8, dtype=torch.float64)
    assert torch.allclose(step.inverse(step(x)), x, atol=1e-5)
    assert not torch.allclose(step(x), x, atol=1e-2)


def test_mass_is_invariant_through_a_deep_stack() -> None:
    steps = torch.nn.Sequential(*(MassPreservingStep(6, 0.3) for _ in range(12))).double()
    for p in steps.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.rand(32, 6, dtype=torch.float64)
    y = steps(x)
    assert not torch.allclose(x, y, atol=1e-2)
    assert float((y.sum(1) - x.sum(1)).abs().max()) < 1e-6


# ------------------------------------------- bounds for any value the parameters can hold


@pytest.mark.parametrize("h", [-0.7, 0.3, 1.6, 3.0])
def test_step_bounds_hold_for_any_step_size(h: float) -> None:
    torch.manual_seed(1)
    expansive = ExpansiveStep(DenseOperator(5, 5, orthogonal=False), None).double()
    contractive = ContractiveStep(DenseOperator(5, 7, orthogonal=False), None).double()
    for step in (expansive, contractive):
        with torch.no_grad():
            step.bias.normal_()
        bound = step.lipschitz_bound(h)
        for _ in range(5):
            x = torch.randn(5, dtype=torch.float64)
            assert jacobian_norm(lambda v, s=step: s(v, torch.tensor(h, dtype=torch.float64)), x) \
                <= bound * (1 + 1e-9)


def test_a_pair_with_an_edited_step_size_range_keeps_a_true_bound() -> None:
    """The buffer h_c_range is saved with the model; edited beyond the rule's limit, h_E becomes
    negative (h_E,max(h_C) < 0) and the bound must still dominate the Jacobian norm."""
    torch.manual_seed(2)
    pair = ExpansiveContractivePair(ExpansiveStep(DenseOperator(6, 6), None),
                                    ContractiveStep(DenseOperator(6, 6), None),
                                    LearnedStepSizes((0.15, 1.9), rule="exact")).double()
    with torch.no_grad():
        pair.step_sizes.h_c_range.copy_(torch.tensor([2.6, 2.9]))
        pair.expansive.bias.normal_()
        pair.contractive.bias.normal_()
    h_e, _ = pair.step_sizes()
    assert h_e < 0
    with pytest.raises(ValueError, match=r"h_c_range = \[2.6, 2.9\] must satisfy"):
        pair.step_sizes.check()
    bound = pair.lipschitz_bound()
    norms = [jacobian_norm(pair, torch.randn(6, dtype=torch.float64)) for _ in range(8)]
    assert max(norms) <= bound and max(norms) > 1.0


@pytest.mark.parametrize("h", [0.5, 1.5, 2.5])
@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_wide_contractive_steps_have_sigma_min_zero_and_a_true_bound(kind: str, h: float) -> None:
    """A with fewer outputs than inputs has a kernel: σ_min over the input space is 0, although
    ``singular_values()`` lists only min(outputs, inputs) values (that is its contract)."""
    torch.manual_seed(3)
    if kind == "dense":
        op, shape = DenseOperator(6, 3, orthogonal=False), (6,)
    else:
        op, shape = ConvOperator(4, 2, size=4), (4, 4, 4)
    step = ContractiveStep(op.double(), h)
    with torch.no_grad():
        step.bias.normal_()
    values = op.singular_values()
    assert values.numel() < math.prod(shape) and float(values.min()) > 0
    lo, hi = op.singular_value_range()
    assert lo == 0.0
    bound = step.lipschitz_bound()
    assert bound == pytest.approx(max(abs(1 - h * hi**2), 1.0))
    norms = [jacobian_norm(step, torch.randn(*shape, dtype=torch.float64)) for _ in range(5)]
    assert max(norms) <= bound * (1 + 1e-12)  # float64 rounding of the Jacobian's SVD
    assert max(norms) >= 1.0 - 1e-9  # the kernel of A is left unchanged: norm ≥ 1


def test_centering_lays_images_out_channels_last_on_the_cpu() -> None:
    """(x − μ)/σ exactly, in the layout oneDNN convolves without reordering; a network fed
    channels-first images gives the same logits as the plain formula in float64."""
    layer = Centering([0.5, 0.4, 0.3], [0.5, 0.25, 0.2])
    x = torch.rand(4, 3, 6, 6)
    out = layer(x)
    assert torch.equal(out, (x - layer.mean) / layer.std)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    model = build_model(preset("micro")).double().eval()
    images = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        logits = model(images)
        reference = images
        for part in model:  # every part fed a channels-first tensor
            reference = part(reference.contiguous())
    assert torch.allclose(logits, reference, atol=1e-12)
    leaf = images.clone().requires_grad_()
    (grad,) = torch.autograd.grad(model(leaf).sum(), leaf)
    assert grad.is_contiguous()  # what callers expect: torchattacks .view()s input gradients
