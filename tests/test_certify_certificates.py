"""Certificates are sound (no attack breaks them), tight where they should be, and reported."""

from __future__ import annotations

import csv
import json
import math

import foolbox as fb
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import certify.certificates as certificates
from certify import (
    Certifier,
    global_radius,
    head_distances,
    lipschitz_bound,
    pairwise_radius,
    parse_epsilon,
    parse_epsilons,
    split_head,
)

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (2, 8, 8)
EPSILONS = (0.1, 0.3, 0.6, 1.0)



@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A tiny CNN trained for a few steps on 3 noisy prototypes; returns (model, x, y) test data."""
    generator = torch.Generator().manual_seed(0)
    prototypes = 0.2 + 0.6 * torch.rand(3, *SHAPE, generator=generator)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % 3
        noise = 0.15 * torch.randn(n, *SHAPE, generator=generator)
        return (prototypes[y] + noise).clamp(0, 1), y

    (x_train, y_train), (x_test, y_test) = sample(150), sample(60)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1, padding_mode="circular"), nn.ReLU(), nn.AvgPool2d(2),
            nn.Flatten(), nn.Linear(64, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(60):
        loss = nn.functional.cross_entropy(model(x_train), y_train)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # Make two test points misclassified so that case is exercised too.
    y_test[:2] = (y_test[:2] + 1) % 3
    return model.eval(), x_test, y_test


def test_no_attack_breaks_a_certified_point(trained) -> None:
    model, x, y = trained
    batch = Certifier(model, SHAPE)(x, y)
    certified = torch.nonzero(batch.correct & (batch.radius > 0)).flatten()
    assert len(certified) >= 40
    fmodel = fb.PyTorchModel(model, bounds=(0, 1), device="cpu")
    attack = fb.attacks.L2PGD(steps=50)
    restarts = 4  # random starts, run side by side as copies of the point
    for i in certified.tolist():
        xs, ys = x[i].repeat(restarts, 1, 1, 1), y[i].repeat(restarts)
        _, adversarial, success = attack(fmodel, xs, ys, epsilons=0.99 * float(batch.radius[i]))
        assert not success.any()
        assert (model(adversarial).argmax(dim=1) == y[i]).all()


def test_no_certified_point_falls_to_pgd_at_any_eps(trained) -> None:
    """Per point, at every ε: certified points are never broken (so certified accuracy cannot
    exceed attacked accuracy); the attack does break some uncertified points, so it matters."""
    model, x, y = trained
    batch = Certifier(model, SHAPE)(x, y, EPSILONS)
    fmodel = fb.PyTorchModel(model, bounds=(0, 1), device="cpu")
    _, _, success = fb.attacks.L2PGD(steps=50)(fmodel, x, y, epsilons=list(EPSILONS))
    for eps, broken in zip(EPSILONS, success, strict=True):
        certified = certificates.is_certified(batch.correct, batch.radius, eps)
        assert not (certified & broken).any()
    assert certificates.is_certified(batch.correct, batch.radius, EPSILONS[0]).any()
    assert (batch.correct & success[-1]).any()  # the attack is strong enough to matter


def test_pairwise_radius_is_at_least_global(trained) -> None:
    model, x, y = trained
    body, head = split_head(model)
    with torch.no_grad():
        logits = model(x)
    pairwise = pairwise_radius(logits, y, lipschitz_bound(body, SHAPE), head_distances(head.weight))
    overall = global_radius(logits, y, lipschitz_bound(model, SHAPE))
    assert (pairwise >= overall * (1 - 1e-9)).all()
    assert (pairwise > overall * 1.01).any()
    assert Certifier(model, SHAPE).method == "pairwise"
    assert Certifier(model, SHAPE, method="global").method == "global"


def test_radii_of_linear_models_are_exact_distances_to_the_boundary() -> None:
    """For f = Wx + b the pairwise radius is the distance to the nearest decision boundary
    and, for W = I, so is the global one; both less the float64 rounding bound."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(8, 4)).double()
    x = torch.randn(50, 2, 2, 2, dtype=torch.float64)
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(dim=1)
    w = model[1].weight.detach()
    gaps = logits.gather(1, y[:, None]) - logits
    lengths = torch.linalg.vector_norm(w[y][:, None, :] - w[None], dim=-1)
    exact = (gaps / lengths).scatter(1, y[:, None], math.inf).amin(dim=1)
    radius = Certifier(model, (2, 2, 2))(x, y).radius  # norms widened by 1e-6 (SAFETY)
    assert (radius <= exact).all() and (radius >= exact * (1 - 2e-6) - 1e-9).all()

    identity = nn.Sequential(nn.Flatten())
    points = torch.randn(50, 3).double()  # float32 values: a model without weights computes in float32
    labels = points.argmax(dim=1)
    top2 = points.topk(2, dim=1).values
    exact = (top2[:, 0] - top2[:, 1]) / math.sqrt(2)
    radius = Certifier(identity, (3,), method="global")(points.float(), labels).radius
    assert (radius <= exact).all() and (radius >= exact - 1e-9).all()


def test_rounding_slack_refuses_zero_and_tiny_margins() -> None:
    logits = torch.tensor([[1.0, 1.0, 0.0], [1.0 + 0.5e-3, 1.0, 0.0], [1.0 + 2e-3, 1.0, 0.0]],
                          dtype=torch.float64)
    labels = torch.zeros(3, dtype=torch.long)
    radius = global_radius(logits, labels, 1.0, slack=1e-3)
    assert radius[0] == 0 and radius[1] == 0 and radius[2] == pytest.approx(1e-3 / math.sqrt(2))
    distances = head_distances(torch.eye(3))
    pairwise = pairwise_radius(logits, labels, 1.0, distances, slack=1e-3)
    assert pairwise[:2].eq(0).all() and pairwise[2] == pytest.approx(1e-3 / math.sqrt(2), rel=1e-5)

    tie = nn.Sequential(nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        tie[0].weight.copy_(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    batch = Certifier(tie, (2,))(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
    assert batch.correct.item() and batch.margin.item() == 0 and batch.radius.item() == 0
    assert certificates.is_certified(batch.correct, batch.radius, 0.0).item()
    assert not certificates.is_certified(batch.correct, batch.radius, 1e-9).item()


def test_certify_loader_report(trained, tmp_path, monkeypatch) -> None:
    model, x, y = trained
    calls = []
    analyse = certificates.analyse
    monkeypatch.setattr(certificates, "analyse", lambda *args: calls.append(args) or analyse(*args))
    certifier = Certifier(model, SHAPE)
    bound_calls = len(calls)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    labels_and_values = parse_epsilons("0, 36/255, 0.3")
    labels, values = zip(*labels_and_values, strict=True)
    report = certifier.certify_loader(loader, values, labels, progress=False)
    assert len(calls) == bound_calls  # the bound is computed once, at construction

    direct = certifier(x, y)
    assert report.n == len(y) and report.method == "pairwise"
    assert report.lipschitz_bound == certifier.lipschitz
    assert report.clean_accuracy == pytest.approx(direct.correct.float().mean().item())
    assert list(report.certified_accuracy) == ["0", "36/255", "0.3"]
    assert report.certified_accuracy["0"] == report.clean_accuracy
    for label, eps in labels_and_values:
        assert report.certified_accuracy_at(eps) == report.certified_accuracy[label]
    accuracies = list(report.certified_accuracy.values())
    assert accuracies == sorted(accuracies, reverse=True) and 0 < accuracies[-1] < accuracies[0]
    assert torch.allclose(torch.from_numpy(report.radii), direct.radius, rtol=1e-6, atol=1e-9)
    misclassified = report.predictions != report.labels
    assert misclassified.sum() >= 2 and (report.radii[misclassified] == 0).all()
    quantiles = list(report.radius_quantiles.values())
    assert list(report.radius_quantiles) == ["0.1", "0.25", "0.5", "0.75", "0.9"]
    assert quantiles == sorted(quantiles)

    report.to_json(tmp_path / "report.json")
    loaded = json.loads((tmp_path / "report.json").read_text())
    assert set(loaded) == {"model", "lipschitz_bound", "n", "clean_accuracy",
                           "certified_accuracy", "radius_quantiles", "method", "rules",
                           "arithmetic"}
    assert loaded == report.to_dict()
    assert [r["path"] for r in loaded["rules"]] == [f"model.{i}" for i in range(5)]
    assert loaded["rules"][0]["rule"].startswith("nn.Conv2d") and loaded["arithmetic"]["dtype"] == "float32"
    measured, a_priori = loaded["arithmetic"]["measured_logit_error_bound"], certifier.error[torch.float32]
    largest_input = float(x.double().flatten(1).norm(dim=1).max())
    assert 0 < measured["median"] <= measured["max"] <= a_priori.at(largest_input)
    assert measured["max"] == pytest.approx(float(direct.error_bound.max()), rel=1e-12)
    assert loaded["arithmetic"]["float64_parts"] == [
        p for (p, _), d in zip(certifier._leaves, certifier.plan, strict=True) if d == torch.float64]

    report.to_csv(tmp_path / "report.csv")
    rows = list(csv.DictReader((tmp_path / "report.csv").open()))
    assert len(rows) == len(y) and list(rows[0]) == ["index", "label", "prediction", "margin",
                                                     "radius"]
    assert float(rows[5]["radius"]) == report.radii[5]

    limited = certifier.certify_loader(loader, [0.1], progress=False, limit=20)
    assert limited.n == 20 and (limited.labels == y[:20].numpy()).all()
    assert list(limited.certified_accuracy) == ["0.1"]


def test_certifier_rejects_bad_arguments(trained) -> None:
    model, x, y = trained
    with pytest.raises(ValueError, match="method"):
        Certifier(model, SHAPE, method="exact")
    with pytest.raises(ValueError, match="pairwise"):
        Certifier(nn.Sequential(nn.Flatten(), nn.Linear(128, 3), nn.ReLU()), SHAPE,
                  method="pairwise")
    with pytest.raises(ValueError, match="label"):
        Certifier(model, SHAPE).certify_loader([(x, y)], [0.1, 0.2], ["0.1"], progress=False)


def test_parse_epsilon() -> None:
    assert parse_epsilon("36/255") == 36 / 255
    assert parse_epsilon(" 0.3 ") == 0.3 and parse_epsilon("0") == 0.0
    assert parse_epsilons("36/255,0.3") == [("36/255", 36 / 255), ("0.3", 0.3)]
    for text, message in [("-1", "non-negative"), ("abc", "number"), ("1/0", "zero"),
                          ("1/x", "number"), ("nan", "finite"), ("", "number")]:
        with pytest.raises(ValueError, match=message):
            parse_epsilon(text)
