"""Plots: the airplane-to-cat search on tiny trained 8x8 models, figures and their files."""

from __future__ import annotations

import math
import os

import matplotlib.image
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustflow.errors import UserError
from robustflow.networks import build_model, preset
from robustflow.plots import (
    CIFAR10_CLASSES,
    curves_from_reports,
    draw_curves,
    draw_plane_cat,
    figure_pixel_size,
    find_plane_cat,
    rank_plane_cat,
    save_figure,
)

pytestmark = pytest.mark.usefixtures("one_thread")

AIRPLANE, CAT = 0, 3
FAST = dict(steps=20, restarts=3, max_candidates=16)


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy copies of one random 8x8 template per class (so airplane and cat differ), in [0, 1]."""
    templates = torch.rand(10, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = 0.5 * templates[y] + 0.25 + 0.1 * torch.randn(n, 3, 8, 8, generator=g)
    return x.clamp(0, 1), y


def train(kind: str) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(preset("tiny", kind=kind))
    x, y = make_data(128, seed=1)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(25):
        optimiser.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimiser.step()
    return model.eval()



@pytest.fixture(scope="module")
def models() -> tuple[nn.Module, nn.Module]:
    return train("euler"), train("lipschitz")


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    return make_data(200, seed=2)


@pytest.fixture(scope="module")
def unflipped(models, data):
    """At ε = 0.001 the baseline keeps every airplane."""
    return find_plane_cat(*models, *data, eps=1e-3, **FAST)


def predict(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad():
        return int(model(x[None]).argmax())


def check_example(example, models, data) -> None:
    """What every result must satisfy, recomputed from the models rather than read back."""
    baseline, lipschitz = models
    images, labels = data
    eps = example.eps
    assert example.label == int(labels[example.index]) == AIRPLANE and example.target == CAT
    assert torch.equal(example.image, images[example.index])
    assert predict(baseline, example.image) == example.baseline.clean_prediction == AIRPLANE
    for model, outcome in ((baseline, example.baseline), (lipschitz, example.lipschitz)):
        adversarial = outcome.adversarial
        assert 0 <= adversarial.min() and adversarial.max() <= 1
        assert torch.allclose(outcome.delta, adversarial - example.image)
        assert (adversarial - example.image).norm() <= eps + 1e-5
        assert math.isclose(outcome.delta_norm, float(outcome.delta.norm()), rel_tol=1e-6)
        assert predict(model, adversarial) == outcome.adversarial_prediction
        with torch.no_grad():
            confidence = model(adversarial[None]).softmax(dim=1).max()
        assert math.isclose(outcome.adversarial_confidence, float(confidence), rel_tol=1e-4)  # batch of 2
    assert example.flipped == (example.baseline.adversarial_prediction == CAT)
    assert bool(example.note) == (not example.flipped)
    if example.radius > eps:  # soundness: no attack inside the certified ball changes the label
        assert example.lipschitz.adversarial_prediction == example.lipschitz.clean_prediction


@pytest.mark.parametrize("eps, flips", [(0.3, None), (5.0, True)])
def test_find_plane_cat(models, data, eps: float, flips: bool | None) -> None:
    example = find_plane_cat(*models, *data, eps=eps, **FAST)
    check_example(example, models, data)
    if flips is not None:
        assert example.flipped == flips


def test_unflipped_shows_the_closest_attempt(models, data, unflipped) -> None:
    check_example(unflipped, models, data)
    assert not unflipped.flipped and "could be flipped" in unflipped.note
    baseline, images, labels = models[0], *data
    airplanes = images[labels == AIRPLANE]
    with torch.no_grad():  # log-probabilities: the baseline is so sure that softmax gives 0
        clean = baseline(airplanes).log_softmax(dim=1)
        chosen = baseline(unflipped.baseline.adversarial[None]).log_softmax(dim=1)[0, CAT]
    candidates = clean[clean.argmax(dim=1) == AIRPLANE][:FAST["max_candidates"]]
    assert candidates[:, CAT].max() - 1 <= chosen <= candidates[:, CAT].max() + 1  # ε moves little


def test_certified_ball_holds_against_the_strong_attack(models, data) -> None:
    wide = find_plane_cat(*models, *data, eps=1.0, **FAST)
    assert wide.radius > 0
    inside = find_plane_cat(*models, *data, eps=wide.radius / 2, index=wide.index, **FAST)
    check_example(inside, models, data)
    assert inside.index == wide.index and math.isclose(inside.radius, wide.radius, rel_tol=1e-6)
    assert inside.lipschitz.adversarial_prediction == inside.lipschitz.clean_prediction


def test_random_pick_is_seeded_and_varies(models, data) -> None:
    picks = [find_plane_cat(*models, *data, eps=5.0, pick="random", seed=s, **FAST) for s in range(4)]
    for example in picks:
        check_example(example, models, data)
    again = find_plane_cat(*models, *data, eps=5.0, pick="random", seed=0, **FAST)
    assert again.index == picks[0].index
    assert len({example.index for example in picks}) > 1


@pytest.mark.parametrize("kwargs, words", [
    (dict(index=200), "out of range"),
    (dict(index=-1), "out of range"),
    (dict(pick="best"), "pick"),
    (dict(target=AIRPLANE), "different"),
])
def test_find_plane_cat_rejects_bad_input(models, data, kwargs: dict, words: str) -> None:
    with pytest.raises(UserError, match=words):
        find_plane_cat(*models, *data, **kwargs)


def test_index_of_another_class_is_refused(models, data) -> None:
    index = int((data[1] != AIRPLANE).nonzero()[0])
    with pytest.raises(UserError, match="not a airplane"):
        find_plane_cat(*models, *data, index=index)


def saved_png_size(fig, path) -> tuple[int, int]:
    save_figure(fig, path)
    assert path.stat().st_size > 0
    height, width = matplotlib.image.imread(path).shape[:2]
    return width, height


def test_plane_cat_figure(unflipped, tmp_path) -> None:
    example = unflipped
    fig = draw_plane_cat(example)
    assert len(fig.axes) == 6
    headings = [sub._suptitle.get_text() for sub in fig.subfigs]
    assert example.note in headings[0]
    assert f"certified radius {example.radius:.3g} > ε=0.001" in headings[1]
    assert fig.axes[0].get_title().startswith(CIFAR10_CLASSES[AIRPLANE])
    assert saved_png_size(fig, tmp_path / "deep" / "plane_cat.png") == figure_pixel_size(fig)


CERTIFY = {"clean_accuracy": 0.8, "certified_accuracy": {"36/255": 0.6, "0.5": 0.3},
           "labels": [3, 1, 4, 1, 5], "radii": [0.0, 0.2, 0.7, 1.1, 0.4]}
ATTACKS = [
    {"model": "1-Lipschitz", "attack": "PGD-L2", "clean_accuracy": 0.8,
     "robust_accuracy": {"36/255": 0.7, "0.5": 0.5}, "min_distances": [0.0, 0.3, 0.9, math.inf]},
    {"model": "baseline", "attack": "PGD-L2", "clean_accuracy": 0.9,
     "robust_accuracy": {"0.5": 0.1, "36/255": 0.6}, "min_distances": None},
]
#: Image 1 has a radius (0.2) above the distance an attack found (0.1): an unsound certificate.
DISTANCES = {"model": "1-Lipschitz", "attack": "foolbox:DDNAttack", "steps": 7, "labels": [3, 1, 4],
             "min_distances": [0.0, 0.1, 2.0]}


def scatter_points(ax) -> dict[str, np.ndarray]:
    """The (distance, radius) points of each scatter in ``ax``, by legend label."""
    return {c.get_label(): np.asarray(c.get_offsets()) for c in ax.collections
            if c.get_label() and not c.get_label().startswith("radius > distance")}


def test_curves_from_reports(tmp_path) -> None:
    fig = curves_from_reports(CERTIFY, ATTACKS)
    left, right = fig.axes
    lines = {line.get_label(): line for line in left.get_lines()}
    assert set(lines) == {"certified", "PGD-L2 (1-Lipschitz)", "PGD-L2 (baseline)"}
    np.testing.assert_allclose(lines["certified"].get_xdata(), [0, 36 / 255, 0.5])
    np.testing.assert_allclose(lines["certified"].get_ydata(), [80, 60, 30])
    np.testing.assert_allclose(lines["PGD-L2 (baseline)"].get_ydata(), [90, 60, 10])
    assert left.get_ylim() == (0, 100)
    # the first report with distances pairs with the radii image by image (4 of them): the
    # misclassified image (distance 0) is left out, the unbroken one (inf) sits on the edge
    points = scatter_points(right)
    assert set(points) == {"correctly classified images (2)", "no adversarial found (1)"}
    np.testing.assert_allclose(points["correctly classified images (2)"], [[0.3, 0.2], [0.9, 0.7]])
    top = right.get_xlim()[1]
    np.testing.assert_allclose(points["no adversarial found (1)"], [[top, 1.1]])
    assert right.get_ylim() == right.get_xlim() == (0, top) and top >= 1.1
    diagonal = next(line for line in right.get_lines() if line.get_label() == "y = x")
    np.testing.assert_allclose(diagonal.get_xdata(), diagonal.get_ydata())
    assert right.get_title().endswith("0 of 2 images above y = x")
    assert fig.radius_against_distance == {"images": 2, "above": 0,
                                           "median_ratio": pytest.approx((0.2 / 0.3 + 0.7 / 0.9) / 2)}
    assert "PGD-L2" in right.get_xlabel()
    assert saved_png_size(fig, tmp_path / "curves.png") == figure_pixel_size(fig)


def test_scatter_shows_a_radius_above_the_attack_distance() -> None:
    """The distances report takes precedence, and an unsound radius is counted and marked."""
    fig = curves_from_reports(CERTIFY, ATTACKS, DISTANCES)
    right = fig.axes[1]
    assert fig.radius_against_distance["above"] == 1 and fig.radius_against_distance["images"] == 2
    points = scatter_points(right)
    np.testing.assert_allclose(points["radius above the distance (1)"], [[0.1, 0.2]])
    np.testing.assert_allclose(points["correctly classified images (1)"], [[2.0, 0.7]])
    assert right.get_title().endswith("1 of 2 images above y = x")
    assert right.get_xlabel() == "smallest adversarial L2 distance found by DDNAttack, 7 steps"


def test_scatter_refuses_reports_on_different_images() -> None:
    with pytest.raises(UserError, match="different images.*image 2"):
        curves_from_reports(CERTIFY, ATTACKS, {**DISTANCES, "labels": [3, 1, 9]})
    with pytest.raises(UserError, match="'min_distances' in the distances report must be a list"):
        curves_from_reports(CERTIFY, ATTACKS, {**DISTANCES, "min_distances": {"a": 1}})
    with pytest.raises(UserError, match="distances report has no 'min_distances'"):
        curves_from_reports(CERTIFY, ATTACKS, {"labels": [3]})


def test_curves_without_scatter(tmp_path) -> None:
    fig = draw_curves({0.1: 0.5}, {"PGD-L2 (baseline)": {0.1: 0.4}}, clean=0.7, radii=np.ones(3))
    assert len(fig.axes) == 1
    assert saved_png_size(fig, tmp_path / "curves.png") == figure_pixel_size(fig) == (600, 420)
    for suffix in (".pdf", ".svg"):
        assert save_figure(fig, tmp_path / f"curves{suffix}").stat().st_size > 0
    assert len(curves_from_reports(CERTIFY, ATTACKS[1:]).axes) == 1  # no report has distances


@pytest.mark.parametrize("key", ["clean_accuracy", "certified_accuracy"])
def test_certify_report_missing_key(key: str) -> None:
    report = {k: v for k, v in CERTIFY.items() if k != key}
    with pytest.raises(UserError, match=f"certify report has no '{key}'"):
        curves_from_reports(report, ATTACKS)


@pytest.mark.parametrize("key", ["model", "attack", "clean_accuracy", "robust_accuracy"])
def test_attack_report_missing_key(key: str) -> None:
    report = {k: v for k, v in ATTACKS[1].items() if k != key}
    with pytest.raises(UserError, match=f"attack report 1 has no '{key}'"):
        curves_from_reports(None, [ATTACKS[0], report])


def test_malformed_epsilon_label() -> None:
    with pytest.raises(UserError, match="robust_accuracy.*1/0"):
        curves_from_reports(None, [{**ATTACKS[1], "robust_accuracy": {"1/0": 0.2}}])


def test_save_figure_refuses_bad_paths(tmp_path) -> None:
    fig = draw_curves(None, {"a": {0.1: 0.5}}, clean=0.6)
    with pytest.raises(UserError, match=r"\.jpg"):
        save_figure(fig, tmp_path / "curves.jpg")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot write"):
        save_figure(fig, blocker / "curves.png")
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(UserError, match="cannot write"):
        save_figure(fig, tmp_path / "folder.png")
    assert sorted(os.listdir(tmp_path)) == ["file", "folder.png"]  # no temporary file left


def test_rank_plane_cat_puts_proofs_first(models, data) -> None:
    """At ε = 0.3 the tiny models give proofs (certified beyond ε, flipped by the baseline):
    they come first, by radius; each is a correctly classified airplane whose certificate and
    flip are recomputed from the models, and the 1-Lipschitz model holds on it."""
    baseline, lipschitz = models
    images, labels = data
    eps = 0.3
    ranked = rank_plane_cat(baseline, lipschitz, images, labels, eps=eps, steps=20)
    proofs = [c for c in ranked if c.proof(eps)]
    assert proofs and ranked[: len(proofs)] == proofs
    assert [c.radius for c in proofs] == sorted((c.radius for c in proofs), reverse=True)
    from certify import Certifier

    index = torch.tensor([c.index for c in ranked])
    assert (labels[index] == AIRPLANE).all()
    certificate = Certifier(lipschitz, (3, 8, 8))(images[index], labels[index])
    assert certificate.correct.all()
    # both are sound lower bounds of the same radius; which parts each certifier computes in
    # float64 (its plan) may differ, so they agree to within the float32 rounding bound (~1e-4)
    ranked_radii = torch.tensor([c.radius for c in ranked], dtype=torch.float64)
    assert torch.allclose(certificate.radius.double(), ranked_radii, rtol=0, atol=1e-3)
    both = [i for i in range(len(labels))
            if labels[i] == AIRPLANE and predict(baseline, images[i]) == AIRPLANE
            and predict(lipschitz, images[i]) == AIRPLANE]
    assert sorted(index.tolist()) == both
    example = find_plane_cat(*models, *data, eps=eps, index=proofs[0].index, **FAST)
    check_example(example, models, data)
    assert example.radius > eps


def test_rank_plane_cat_without_proofs_shows_the_closest(models, data) -> None:
    """At ε = 0.5 no flipped airplane is certified beyond ε: the flipped ones lead, the most
    nearly certified first, and every airplane was attacked."""
    eps = 0.5
    ranked = rank_plane_cat(*models, *data, eps=eps, steps=20)
    assert not any(c.proof(eps) for c in ranked)
    flipped = [c for c in ranked if c.flipped]
    assert flipped and ranked[: len(flipped)] == flipped
    assert flipped[0].radius == max(c.radius for c in flipped)
    assert all(0 <= c.target_probability <= 1 for c in ranked)  # all attacked
    assert all(c.target_probability >= 0.1 for c in flipped)  # cat is the baseline's top class
