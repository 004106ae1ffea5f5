"""APGD, FAB-T, Square and AutoAttack on tiny conv nets for 3x8x8 images (CPU, seconds).

Budgets are cut (20 iterations, a few hundred queries) to keep the file fast; the algorithms are
the same at the paper's budget.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linprog, minimize
from torch import nn

from attacks import (
    APGD,
    FAB,
    PGD,
    AutoAttack,
    EvaluationWarning,
    Square,
    check_gradient_masking,
    get_attack,
)
from attacks.apgd import checkpoints, dlr_loss, targeted_dlr_loss
from attacks.fab import project_on_hyperplane
from attacks.square import window_fraction
from certify import Certifier
from robustflow.plots import curves_from_reports

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = 4
SHAPE = (3, 8, 8)
EPS = {"l2": 1.0, "linf": 0.1}


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy copies of one random template per class, in [0, 1]."""
    templates = torch.rand(CLASSES, *SHAPE, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x = 0.5 * templates[y] + 0.25 + 0.15 * torch.randn(n, *SHAPE, generator=g)
    return x.clamp(0, 1), y


def make_net(train_steps: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A tiny conv net trained for ``train_steps`` Adam steps (0: random weights), in eval mode."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, padding_mode="circular"), nn.ReLU(),
                        nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, CLASSES)).to(dtype)
    x, y = make_data(256, seed=1)
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(train_steps):
        optimiser.zero_grad()
        F.cross_entropy(net(x.to(dtype)), y).backward()
        optimiser.step()
    optimiser.zero_grad(set_to_none=True)
    return net.eval()


@pytest.fixture(scope="module")
def net() -> nn.Module:
    """Trained: clean accuracy about 1 on the test points."""
    return make_net(30)


@pytest.fixture(scope="module")
def weak() -> nn.Module:
    """Random weights: small margins, a few points misclassified."""
    return make_net(0)


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    return make_data(48, seed=2)


def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x.to(next(model.parameters()).dtype)).argmax(dim=1)


def norms(delta: torch.Tensor, norm: str) -> torch.Tensor:
    return delta.flatten(1).norm(p=2 if norm == "l2" else math.inf, dim=1)


def small(name: str, norm: str, seed: int | None = 0, queries: int = 100) -> object:
    """Each attack at a test budget."""
    return {
        "apgd-ce": lambda: APGD(norm=norm, steps=20, seed=seed),
        "apgd-dlr": lambda: APGD(norm=norm, loss="dlr", steps=20, seed=seed),
        "apgd-t": lambda: APGD(norm=norm, loss="dlr", targets=9, steps=20, seed=seed),
        "fab-t": lambda: FAB(norm=norm, steps=20, seed=seed),
        "square": lambda: Square(norm=norm, queries=queries, seed=seed),
        "autoattack": lambda: AutoAttack(norm=norm, steps=20, queries=queries, seed=seed),
        "autoattack-fast": lambda: AutoAttack(norm=norm, version="fast", steps=20, seed=seed),
    }[name]()


NAMES = ("apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square", "autoattack", "autoattack-fast")


# --- every attack --------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("name", NAMES)
def test_each_attack_lowers_accuracy(net, data, name, norm):
    x, y = data
    eps = 2 * EPS[norm] if name == "square" else EPS[norm]  # Square is query-limited
    _, clipped, success = small(name, norm, queries=300)(net, x, y, epsilons=[eps])
    clean = (predict(net, x) == y).float().mean()
    robust = (~success[0]).float().mean()
    assert clean >= 0.95
    assert robust <= clean - 0.4, (name, float(robust))
    assert torch.equal(success[0], predict(net, clipped[0]) != y)


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("name", NAMES)
def test_perturbations_stay_in_ball_and_box(weak, data, name, norm):
    x, y = data
    x_before = x.clone()
    epsilons = [0.0, EPS[norm] / 4, EPS[norm]]
    raw, clipped, success = small(name, norm)(weak, x, y, epsilons=epsilons)
    assert success.shape == (len(epsilons), len(x)) and success.dtype == torch.bool
    for eps, r, c in zip(epsilons, raw, clipped, strict=True):
        assert c.shape == x.shape and r.shape == x.shape
        assert norms(c - x, norm).max() <= eps + 1e-6 and c.min() >= 0 and c.max() <= 1
        assert r.min() >= 0 and r.max() <= 1
        if name != "fab-t":  # FAB is minimum-norm: its raw output may lie outside a small ball
            assert norms(r - x, norm).max() <= eps * (1 + 1e-5) + 1e-7
    assert torch.equal(success, torch.stack([predict(weak, c) != y for c in clipped]))
    assert torch.equal(success[0], predict(weak, x) != y)  # ε = 0: only the misclassified
    assert (success[:-1] <= success[1:]).all()  # nested balls: success grows with ε
    assert torch.equal(x, x_before)
    assert all(p.grad is None for p in weak.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_result(weak, data, name):
    x, y = data
    first = small(name, "l2", seed=3)(weak, x[:24], y[:24], epsilons=[0.5])
    again = small(name, "l2", seed=3)(weak, x[:24], y[:24], epsilons=[0.5])
    for a, b in zip(first[1], again[1], strict=True):
        assert torch.equal(a, b)
    assert torch.equal(first[2], again[2])


@pytest.mark.parametrize("name", ["apgd-ce", "apgd-t", "fab-t", "square", "autoattack"])
def test_skipped_points_are_not_attacked_and_change_nothing_else(data, name):
    """Float64 so that batch composition cannot change a logit in a way that matters."""
    model = make_net(0, torch.float64)
    x, y = (t.double() if t.is_floating_point() else t for t in data)
    skip = torch.rand(len(x), generator=torch.Generator().manual_seed(5)) < 0.4
    _, full, full_success = small(name, "l2")(model, x, y, epsilons=[0.3, 0.6])
    _, part, part_success = small(name, "l2")(model, x, y, epsilons=[0.3, 0.6], skip=skip)
    clean_wrong = predict(model, x) != y
    for f, p, fs, ps in zip(full, part, full_success, part_success, strict=True):
        assert torch.allclose(f[~skip], p[~skip], atol=1e-9)
        assert torch.equal(fs[~skip], ps[~skip])
        assert torch.equal(p[skip], x[skip]) and torch.equal(ps[skip], clean_wrong[skip])


# --- targeted ------------------------------------------------------------------------------


@pytest.mark.parametrize("norm, eps", [("l2", 2.0), ("linf", 0.25)])
@pytest.mark.parametrize("attack", [
    APGD(loss="ce", steps=30), APGD(loss="dlr", steps=30), APGD(loss="dlr", targets=3, steps=30),
    FAB(steps=30), Square(queries=500)], ids=["apgd-ce", "apgd-dlr", "apgd-t", "fab", "square"])
def test_targeted_attacks_reach_their_target(weak, data, attack, norm, eps):
    x, y = data
    attack.norm = norm
    target = (y + 1) % CLASSES
    _, (adversarial,), (success,) = attack(weak, x, y, epsilons=[eps], target=target)
    assert torch.equal(success, predict(weak, adversarial) == target)
    assert success.float().mean() >= 0.8


def test_autoattack_refuses_a_target(weak, data):
    x, y = data
    with pytest.raises(ValueError, match="untargeted"):
        AutoAttack(steps=5)(weak, x, y, epsilons=[0.5], target=(y + 1) % CLASSES)


# --- AutoAttack ----------------------------------------------------------------------------


@pytest.mark.parametrize("norm, epsilons", [("l2", [0.2, 0.5]), ("linf", [0.04, 0.08])])
def test_worst_case_is_taken_per_point(data, norm, epsilons):
    """Point i falls under AutoAttack iff some attack alone breaks it; ``broken_by`` names the
    first such attack in the sequence (float64: the runs see the same logits)."""
    model = make_net(0, torch.float64)
    x, y = data[0].double(), data[1]
    auto = small("autoattack", norm)
    result = auto.evaluate(model, x, y, epsilons=epsilons)
    alone = torch.stack([small(name, norm)(model, x, y, epsilons=epsilons)[2]
                         for name in ("apgd-ce", "apgd-t", "fab-t", "square")])
    clean_wrong = predict(model, x) != y
    assert torch.equal(result.success, alone.any(dim=0))
    for i in range(len(x)):  # at the smallest ε (larger ones carry its adversarials over)
        j = int(result.broken_by[0, i])
        if clean_wrong[i]:
            assert j == -1
        elif j >= 0:  # the first attack in the sequence that breaks i alone
            assert alone[j, 0, i] and not alone[:j, 0, i].any()
        else:
            assert not alone[:, 0, i].any()
    assert (result.broken_by[0] >= 0).sum() > 0
    after = result.robust_after()
    assert after.shape == (4, len(epsilons), len(x))
    assert (after[1:] <= after[:-1]).all() and torch.equal(after[-1], ~result.success)
    robust = (~result.success).float().mean(dim=1)
    assert (robust <= (~alone).float().mean(dim=2).min(dim=0).values).all()
    assert (~result.success).sum() < (~clean_wrong).sum()  # it does break points


@pytest.fixture(scope="module")
def lipschitz_small() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A tiny CNN trained on 4 noisy prototypes: many points certified at small ε."""
    generator = torch.Generator().manual_seed(0)
    prototypes = 0.2 + 0.6 * torch.rand(CLASSES, 2, 8, 8, generator=generator)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(n) % CLASSES
        return (prototypes[labels] + 0.15 * torch.randn(n, 2, 8, 8, generator=generator)
                ).clamp(0, 1), labels

    (x_train, y_train), (x_test, y_test) = sample(150), sample(48)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, padding_mode="circular"), nn.ReLU(),
                          nn.AvgPool2d(2), nn.Flatten(), nn.Linear(64, CLASSES))
    optimiser = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(60):
        optimiser.zero_grad()
        F.cross_entropy(model(x_train), y_train).backward()
        optimiser.step()
    optimiser.zero_grad(set_to_none=True)
    return model.eval(), x_test, y_test


def test_certified_le_autoattack_le_pgd_le_clean(lipschitz_small):
    model, x, y = lipschitz_small
    epsilons = [0.1, 0.3, 0.6, 1.0, 1.5]
    batch = Certifier(model, tuple(x.shape[1:]))(x, y)
    clean = (predict(model, x) == y).float().mean()
    _, _, pgd = PGD(steps=10, seed=0)(model, x, y, epsilons=epsilons)
    _, _, aa = AutoAttack(steps=20, queries=100)(model, x, y, epsilons=epsilons)
    for k, eps in enumerate(epsilons):
        proven = batch.correct & (batch.radius > eps)
        assert not (aa[k] & proven).any()  # no attack breaks a certified point
        assert proven.float().mean() <= (~aa[k]).float().mean() <= (~pgd[k]).float().mean() \
            <= clean, eps
    assert (~aa[-1]).float().mean() < clean  # strong enough to matter


def test_fast_version_runs_apgd_only(weak, data):
    x, y = data
    fast = AutoAttack(version="fast", steps=20)
    assert fast.names == ("apgd-ce", "apgd-t")
    assert AutoAttack().names == ("apgd-ce", "apgd-t", "fab-t", "square")
    result = fast.evaluate(weak, x, y, epsilons=[0.4])
    assert set(result.broken_by.unique().tolist()) <= {-1, 0, 1}


# --- the pieces ----------------------------------------------------------------------------


def test_checkpoints_follow_the_paper():
    """p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06); w_j = ⌈p_j N⌉."""
    for steps in (10, 37, 100, 250):
        p_prev, p, expected = 0.0, 0.22, []
        while p <= 1:
            w = math.ceil(round(p * steps, 9))
            if w <= steps and (not expected or w > expected[-1]):
                expected.append(w)
            p_prev, p = p, round(p + max(p - p_prev - 0.03, 0.06), 9)
        assert checkpoints(steps) == expected, steps
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]


def test_dlr_losses_are_shift_and_scale_invariant():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(20, 10, generator=g), torch.randint(0, 10, (20,), generator=g)
    target = (labels + 1) % 10
    for loss in (lambda z: dlr_loss(z, labels), lambda z: targeted_dlr_loss(z, labels, target)):
        assert torch.allclose(loss(logits), loss(3.0 * logits + 7.0), atol=1e-5)
    right = logits.argmax(dim=1)
    assert (dlr_loss(logits, right) < 0).all()  # correctly classified: negative
    wrong = (right + 1) % 10
    assert (dlr_loss(logits, wrong) > 0).all()


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_hyperplane_projection_is_the_smallest_step(norm):
    """Against a generic solver, on planes that cross the box (some weights zero)."""
    g = torch.Generator().manual_seed(1)
    d = 10
    for trial in range(30):
        p = torch.rand(1, d, generator=g, dtype=torch.float64)
        w = torch.randn(1, d, generator=g, dtype=torch.float64)
        w[0, : trial % 3] = 0
        b = (w * torch.rand(1, d, generator=g, dtype=torch.float64)).sum(dim=1)
        step = project_on_hyperplane(p, w, b, norm)
        assert abs(float((w * (p + step)).sum() - b)) < 1e-9
        assert (p + step).min() >= -1e-12 and (p + step).max() <= 1 + 1e-12
        pp, ww, bb = p[0].numpy(), w[0].numpy(), float(b)
        if norm == "l2":
            best = minimize(lambda z, pp=pp: ((z - pp) ** 2).sum(), pp,
                            jac=lambda z, pp=pp: 2 * (z - pp),
                            constraints=[{"type": "eq", "fun": lambda z, ww=ww, bb=bb: ww @ z - bb}],
                            bounds=[(0, 1)] * d, method="SLSQP", options={"ftol": 1e-14}).fun
            assert float(step.norm()) <= math.sqrt(best) + 1e-6
        else:  # min t s.t. |z − p| ≤ t, ⟨w, z⟩ = b, z ∈ [0, 1]
            bound = np.block([[np.eye(d), -np.ones((d, 1))], [-np.eye(d), -np.ones((d, 1))]])
            best = linprog(np.r_[np.zeros(d), 1], A_ub=bound, b_ub=np.r_[pp, -pp],
                           A_eq=np.r_[ww, 0][None], b_eq=[bb], bounds=[(0, 1)] * d + [(0, None)]).fun
            assert float(step.abs().max()) <= best + 1e-9


def test_hyperplane_out_of_reach_goes_to_the_faces():
    p, w = torch.full((1, 5), 0.5), torch.tensor([[1.0, -2.0, 0.0, 3.0, 1.0]])
    step = project_on_hyperplane(p, w, torch.tensor([100.0]), "l2")
    assert torch.equal(p + step, torch.tensor([[1.0, 0.0, 0.5, 1.0, 1.0]]))


def test_square_schedule_halves_p():
    assert window_fraction(0, 10000, 0.8) == 0.8
    assert window_fraction(11, 10000, 0.8) == 0.4
    assert window_fraction(9000, 10000, 0.8) == 0.8 / 512
    assert window_fraction(50, 1000, 0.8) == 0.8 / 8  # rescaled: iteration 500 of 10,000
    fractions = [window_fraction(i, 5000, 0.8) for i in range(5000)]
    assert all(a >= b for a, b in zip(fractions, fractions[1:], strict=False))


def test_plot_curves_draws_autoattack_as_its_own_curve():
    certify = {"clean_accuracy": 0.8, "certified_accuracy": {"0.1": 0.6, "0.3": 0.3}}
    reports = [{"model": "m", "attack": attack, "clean_accuracy": 0.8,
                "robust_accuracy": {"0.1": robust, "0.3": robust / 2}}
               for attack, robust in (("pgd-l2", 0.7), ("autoattack", 0.65))]
    left = curves_from_reports(certify, reports).axes[0]
    lines = {line.get_label(): line for line in left.get_lines()}
    assert set(lines) == {"certified", "pgd-l2 (m)", "AutoAttack (m)"}
    np.testing.assert_allclose(lines["AutoAttack (m)"].get_ydata(), [80, 65, 32.5])
    assert lines["AutoAttack (m)"].get_linestyle() == "-"
    assert lines["pgd-l2 (m)"].get_linestyle() == "--"


# --- gradient masking ----------------------------------------------------------------------


class Quantised(nn.Module):
    """Rounds its input to 4 levels: the input gradient is zero almost everywhere."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(torch.round(x * 4) / 4)


def test_square_exposes_masked_gradients(net, data):
    x, y = data
    masked = Quantised(net).eval()
    with pytest.warns(EvaluationWarning, match="masked"):
        found = check_gradient_masking(masked, x, y, eps=0.15, norm="linf", steps=20, queries=300)
    assert len(found) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", EvaluationWarning)
        assert check_gradient_masking(net, x, y, eps=0.15, norm="linf", steps=20,
                                      queries=300) == []


# --- bad input -----------------------------------------------------------------------------


def test_bad_parameters_raise(weak, data):
    x, y = data
    with pytest.raises(ValueError, match="norm"):
        APGD(norm="l1")
    with pytest.raises(ValueError, match="loss"):
        APGD(loss="hinge")
    with pytest.raises(ValueError, match="targets"):
        FAB(targets=0)
    with pytest.raises(ValueError, match="queries"):
        Square(queries=0)
    with pytest.raises(ValueError, match="version"):
        AutoAttack(version="plus")
    with pytest.raises(ValueError, match="finite"):
        APGD()(weak, x, y, epsilons=[math.inf])
    with pytest.raises(ValueError, match="4 classes"):
        APGD(loss="dlr", targets=2)(nn.Sequential(weak, nn.Linear(CLASSES, 3)).eval(), x,
                                    y % 3, epsilons=[0.5])
    with pytest.raises(ValueError, match="l2, not linf"):
        get_attack("pgd-l2", norm="linf")
    with pytest.raises(ValueError, match="unknown attack"):
        get_attack("autoattack-plus")
    assert isinstance(get_attack("apgd-t", norm="linf"), APGD)
    assert get_attack("autoattack-fast").names == ("apgd-ce", "apgd-t")
