"""Tests of the attacks package on tiny conv nets for 3x8x8 images (CPU, a few seconds)."""

import copy
import warnings

import foolbox as fb
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attacks import (
    PGD,
    Attack,
    EvaluationWarning,
    FoolboxAttack,
    check_evaluation,
    get_attack,
    minimal_adversarial_distance,
    robust_accuracy,
)

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = 4


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy copies of one random template per class, in [0, 1]."""
    templates = torch.rand(CLASSES, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x = 0.5 * templates[y] + 0.25 + 0.15 * torch.randn(n, 3, 8, 8, generator=g)
    return x.clamp(0, 1), y


def make_net(train_steps: int) -> nn.Module:
    """A tiny conv net, trained for ``train_steps`` Adam steps (0: random weights), in eval mode."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                        nn.Flatten(), nn.Linear(8 * 4 * 4, CLASSES))
    x, y = make_data(256, seed=1)
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(train_steps):
        optimiser.zero_grad()
        F.cross_entropy(net(x), y).backward()
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)
    return net.eval()



@pytest.fixture(scope="module")
def net() -> nn.Module:
    """Clean accuracy 1 on the test points, broken by PGD at L2 ε = 1."""
    return make_net(30)


@pytest.fixture(scope="module")
def weak() -> nn.Module:
    """Random weights: about 30 % clean accuracy, small margins."""
    return make_net(0)


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    return make_data(64, seed=2)


def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(dim=1)


def norms(delta: torch.Tensor, norm: str) -> torch.Tensor:
    return delta.flatten(1).norm(p=2 if norm == "l2" else float("inf"), dim=1)


# --- PGD -----------------------------------------------------------------------------------


@pytest.mark.parametrize("norm, eps", [("l2", 1.0), ("linf", 0.1)])
def test_pgd_lowers_accuracy(net, data, norm, eps):
    x, y = data
    result = robust_accuracy(net, x, y, get_attack(f"pgd-{norm}", seed=0), [eps])
    assert result["clean"] >= 0.95
    assert result["robust"][0] <= 0.2
    assert result["robust_mask"].shape == (1, len(x))


class Wild(Attack):
    """Returns points far outside the ball and the box: the base class must fix them."""

    norm = "l2"

    def run(self, model, x, labels, epsilons, target, active):
        return [x + 10 * torch.randn_like(x) for _ in epsilons]


@pytest.mark.parametrize("attack", [PGD(norm="l2", seed=0), PGD(norm="linf", seed=0),
                                    FoolboxAttack("DDNAttack", steps=20), Wild()],
                         ids=["pgd-l2", "pgd-linf", "ddn", "wild"])
def test_clipped_in_ball_and_box(net, data, attack):
    x, y = data
    x_before = x.clone()
    epsilons = [0.0, 0.02, 0.1, 0.5, 1.0, 3.0]
    raw, clipped, success = attack(net, x, y, epsilons=epsilons)
    assert len(raw) == len(clipped) == len(epsilons)
    assert success.shape == (len(epsilons), len(x)) and success.dtype == torch.bool
    for eps, c in zip(epsilons, clipped, strict=True):
        assert c.shape == x.shape
        assert norms(c - x, attack.norm).max() <= eps + 1e-6
        assert c.min() >= 0 and c.max() <= 1
    # success is the criterion on the clipped points, nothing else
    assert torch.equal(success, torch.stack([predict(net, c) != y for c in clipped]))
    assert torch.equal(x, x_before)
    assert all(p.grad is None for p in net.parameters())


def test_pgd_never_weaker(net, data):
    """Success grows with ε (fooled points keep their adversarial) and with restarts."""
    x, y = data
    epsilons = [0.25, 0.5, 0.75, 1.0]
    _, _, success = PGD(seed=3)(net, x, y, epsilons=epsilons)
    assert (success[:-1] <= success[1:]).all()
    _, _, one = PGD(seed=3)(net, x, y, epsilons=[0.5])
    _, _, three = PGD(seed=3, restarts=3)(net, x, y, epsilons=[0.5])
    assert (one <= three).all()


class Counting(nn.Module):
    """Counts the samples it is run on."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.seen = net, 0

    def forward(self, x):
        self.seen += len(x)
        return self.net(x)


def test_pgd_stops_early_and_skips(weak, data):
    """Fooled and skipped points cost no further forward passes."""
    x, y = data
    model = Counting(weak)
    _, _, success = PGD(steps=10)(model, x, y, epsilons=[2.0])
    assert success.all()
    clean_and_success_checks = 2 * len(x)
    assert model.seen - clean_and_success_checks < 3 * len(x)  # vs 11 per point without
    model.seen = 0
    PGD(steps=10)(model, x, y, epsilons=[0.5, 1.0], skip=torch.ones(len(x), dtype=torch.bool))
    assert model.seen == 3 * len(x)  # the clean pass and one success check per ε


def test_pgd_is_deterministic_given_seed(net, data):
    x, y = data
    _, a, _ = PGD(seed=1)(net, x, y, epsilons=[0.5])
    _, b, _ = PGD(seed=1)(net, x, y, epsilons=[0.5])
    assert torch.equal(a[0], b[0])


# --- skipping ------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_skip_random_mask_changes_nothing_else(weak, data, norm):
    x, y = data
    epsilons = [0.05, 0.3] if norm == "linf" else [0.3, 1.0]
    skip = torch.rand(len(x), generator=torch.Generator().manual_seed(5)) < 0.4
    _, full, full_success = PGD(norm=norm, seed=7)(weak, x, y, epsilons=epsilons)
    _, part, part_success = PGD(norm=norm, seed=7)(weak, x, y, epsilons=epsilons, skip=skip)
    clean_wrong = predict(weak, x) != y
    for f, p, fs, ps in zip(full, part, full_success, part_success, strict=True):
        assert torch.allclose(f[~skip], p[~skip], atol=1e-6)
        assert torch.equal(fs[~skip], ps[~skip])
        assert torch.equal(p[skip], x[skip])  # skipped: the clean input ...
        assert torch.equal(ps[skip], clean_wrong[skip])  # ... "model already wrong on it"


def test_skip_already_wrong_gives_same_robust_accuracy(weak, data):
    x, y = data
    wrong = predict(weak, x) != y
    assert 0 < wrong.sum() < len(x)
    full = robust_accuracy(weak, x, y, PGD(seed=0), [0.3, 1.0])
    skipped = robust_accuracy(weak, x, y, PGD(seed=0), [0.3, 1.0], skip=wrong)
    assert skipped["robust"] == full["robust"] and skipped["clean"] == full["clean"]


def test_skip_certified_points_gives_same_robust_accuracy(net, data):
    """Skipping points the attack cannot break (as certified points are) changes nothing."""
    x, y = data
    epsilons = [0.5, 0.75]
    full = robust_accuracy(net, x, y, PGD(seed=0), epsilons, batch_size=16)
    robust_everywhere = full["robust_mask"].all(dim=0)
    assert 0 < robust_everywhere.sum() < len(x)
    skipped = robust_accuracy(net, x, y, PGD(seed=0), epsilons, batch_size=16,
                              skip=robust_everywhere)
    assert skipped["robust"] == full["robust"]
    assert torch.equal(skipped["robust_mask"], full["robust_mask"])


# --- targeted ------------------------------------------------------------------------------


@pytest.mark.parametrize("norm, eps", [("l2", 1.5), ("linf", 0.2)])
def test_targeted_pgd_reaches_target(weak, data, norm, eps):
    x, y = data
    target = (y + 1) % CLASSES
    _, (adv,), (success,) = PGD(norm=norm, seed=0, steps=20)(weak, x, y, epsilons=[eps],
                                                             target=target)
    assert torch.equal(success, predict(weak, adv) == target)
    assert success.float().mean() >= 0.8


def test_targeted_pgd_with_one_class_for_all(weak, data):
    x, y = data
    _, (adv,), (success,) = PGD(seed=0, steps=20)(weak, x, y, epsilons=[1.5], target=2)
    assert torch.equal(success, predict(weak, adv) == 2)
    assert success.float().mean() >= 0.8


# --- foolbox bridge ------------------------------------------------------------------------


@pytest.mark.parametrize("name, kwargs", [
    ("L2PGD", {"steps": 5, "rel_stepsize": 0.25, "random_start": False}),
    ("LinfPGD", {"steps": 5, "random_start": False}),
    ("L2DeepFoolAttack", {"steps": 20}),
])
def test_bridge_agrees_with_foolbox(weak, data, name, kwargs):
    x, y = data
    epsilons = [0.05, 0.2, 1.0]
    _, ours, our_success = FoolboxAttack(name, **kwargs)(weak, x, y, epsilons=epsilons)
    fmodel = fb.PyTorchModel(weak, bounds=(0, 1), device="cpu")
    criterion = fb.criteria.Misclassification(y)
    _, theirs, their_success = getattr(fb.attacks, name)(**kwargs)(fmodel, x, criterion,
                                                                   epsilons=epsilons)
    correct = predict(weak, x) == y  # we do not attack points that are already wrong
    for o, t in zip(ours, theirs, strict=True):
        assert torch.allclose(o[correct], t[correct], atol=1e-5)
    assert torch.equal(our_success[:, correct], their_success[:, correct])
    assert our_success[:, ~correct].all()


def test_bridge_targeted(weak, data):
    x, y = data
    target = (y + 1) % CLASSES
    _, (adv,), (success,) = FoolboxAttack("DDNAttack", steps=50)(weak, x, y, epsilons=[2.0],
                                                                 target=target)
    assert torch.equal(success, predict(weak, adv) == target)
    assert success.float().mean() >= 0.8


@pytest.mark.parametrize("attack", ["DDNAttack", "L2FMNAttack"])
def test_minimal_adversarial_distance(weak, data, attack):
    x, y = data
    distance = minimal_adversarial_distance(weak, x, y, attack=attack)
    wrong = predict(weak, x) != y
    assert distance.shape == (len(x),)
    assert torch.isfinite(distance).all()
    assert (distance[wrong] == 0).all() and (distance[~wrong] > 0).all()
    # the attack is deterministic: rerun it to get the adversarials themselves
    _, (adv,), _ = FoolboxAttack(attack)(weak, x, y, epsilons=[float("inf")])
    assert torch.allclose((adv - x).flatten(1).norm(dim=1), distance, atol=1e-5)
    assert (predict(weak, adv) != y).all()


# --- checks --------------------------------------------------------------------------------


class Quantised(nn.Module):
    """Rounds its input to 4 levels: gradient zero everywhere."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(torch.round(x * 4) / 4)


class Noisy(nn.Module):
    """Adds fresh noise to the logits on every call."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x) + 0.1 * torch.randn(len(x), CLASSES)


def problems_of(model, x, y) -> list[str]:
    with pytest.warns(EvaluationWarning):
        return check_evaluation(model, x, y)


def test_good_model_triggers_no_check(net, data):
    with warnings.catch_warnings():
        warnings.simplefilter("error", EvaluationWarning)
        assert check_evaluation(net, *data) == []


def test_checks_find_each_problem(net, data):
    x, y = data
    softmax = nn.Sequential(net, nn.Softmax(dim=1)).eval()
    assert any("probabilities" in p for p in problems_of(softmax, x, y))
    assert any("gradient" in p for p in problems_of(Quantised(net).eval(), x, y))
    assert any("randomised" in p for p in problems_of(Noisy(net).eval(), x, y))
    dropout = nn.Sequential(copy.deepcopy(net), nn.Dropout(0.5)).train()
    found = problems_of(dropout, x, y)
    assert any("train mode" in p for p in found) and any("randomised" in p for p in found)
    assert len(problems_of(softmax, x, y)) == 1


# --- errors --------------------------------------------------------------------------------


def test_bad_specs_and_parameters_raise(net, data):
    x, y = data
    with pytest.raises(ValueError, match="pgd-l2"):
        get_attack("pgd-l3")
    with pytest.raises(ValueError, match="L2PGD"):
        get_attack("foolbox:NoSuchAttack")
    with pytest.raises(ValueError, match="L2 and L∞"):
        FoolboxAttack("EADAttack")
    with pytest.raises(ValueError, match="norm"):
        PGD(norm="l1")
    with pytest.raises(ValueError, match="steps"):
        PGD(steps=0)
    with pytest.raises(ValueError, match="random_start"):
        PGD(restarts=3, random_start=False)
    with pytest.raises(ValueError, match="epsilons"):
        PGD()(net, x, y, epsilons=[0.1, -0.1])
    with pytest.raises(ValueError, match="epsilons"):
        PGD()(net, x, y, epsilons=[])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        PGD()(net, 2 * x + 0.5, y, epsilons=[0.1])
    with pytest.raises(ValueError, match="minimisation"):
        minimal_adversarial_distance(net, x, y, attack="L2PGD")
    assert isinstance(get_attack("pgd-linf", steps=3), PGD)
    assert get_attack("foolbox:L2PGD").norm == "l2"
