"""Figures: the airplane-to-cat attack on a baseline and a 1-Lipschitz model, accuracy curves.

Everything draws on :class:`matplotlib.figure.Figure` objects with an Agg canvas (no pyplot
state), and :func:`save_figure` writes them atomically at :data:`DPI`, so a PNG is always
:func:`figure_pixel_size` pixels.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor, nn

from attacks import PGD
from certify import Certifier, parse_epsilon
from robustflow.errors import UserError
from robustflow.export import export_plain

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")

#: Resolution of saved figures: a PNG is ``figure_pixel_size(fig)`` pixels.
DPI = 100
FORMATS = (".png", ".pdf", ".svg")


@dataclass
class AttackOutcome:
    """One model's view of an image and of the adversarial found against it."""

    adversarial: Tensor
    delta: Tensor
    delta_norm: float
    clean_prediction: int
    clean_confidence: float
    adversarial_prediction: int
    adversarial_confidence: float


@dataclass
class PlaneCatExample:
    """A targeted L2 attack ``label → target`` of size ``eps`` on both models.

    ``flipped`` says the baseline's adversarial is labelled ``target``; otherwise ``note``
    says so and ``baseline`` holds the closest attempt. ``radius`` is the lipschitz model's
    certified L2 radius of its own clean prediction at ``image``.
    """

    index: int
    image: Tensor
    label: int
    eps: float
    target: int
    baseline: AttackOutcome
    lipschitz: AttackOutcome
    radius: float
    flipped: bool
    note: str


def _outcome(model: nn.Module, image: Tensor, adversarial: Tensor) -> AttackOutcome:
    with torch.no_grad():
        confidence, prediction = model(torch.stack([image, adversarial])).softmax(dim=1).max(dim=1)
    delta = (adversarial - image).cpu()
    return AttackOutcome(adversarial.cpu(), delta, float(delta.norm()), int(prediction[0]),
                         float(confidence[0]), int(prediction[1]), float(confidence[1]))


def find_plane_cat(
    baseline: nn.Module,
    lipschitz: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    eps: float = 0.3,
    source: int = 0,
    target: int = 3,
    pick: str = "first",
    index: int | None = None,
    steps: int = 100,
    restarts: int = 10,
    seed: int = 0,
    max_candidates: int = 64,
    class_names: Sequence[str] = CIFAR10_CLASSES,
) -> PlaneCatExample:
    """Find an image of class ``source`` that a targeted L2 PGD of size ``eps`` turns into
    ``target`` on ``baseline``, then attack ``lipschitz`` on it as hard (``restarts`` random
    starts) and certify it. Puts both models in eval mode; the attacks run on
    :func:`~robustflow.export.export_plain` copies (same outputs, no parametrisation cost),
    every recorded prediction and the certificate come from the models themselves.

    Candidates are the images labelled ``source`` that ``baseline`` classifies as ``source``
    (in order, or shuffled with ``seed`` for ``pick="random"``), at most ``max_candidates``,
    attacked in one batch with one start each; the first that flips is taken, else the one
    whose adversarial gives ``target`` the highest probability (then ``note`` says so).
    Candidates that ``lipschitz`` classifies correctly with a certified radius above
    ``eps`` come first, so the picture shows a certificate holding where one exists.
    ``index`` skips the search.
    """
    baseline.eval()
    lipschitz.eval()
    name = class_names[source]
    if pick not in ("first", "random"):
        raise UserError(f"pick must be 'first' or 'random', got {pick!r}")
    if source == target:
        raise UserError(f"source and target are both {name!r}; choose two different classes")
    device = next(baseline.parameters()).device
    if index is not None:
        if not 0 <= index < len(images):
            raise UserError(f"index {index} is out of range for {len(images)} images; "
                            f"pass an index in 0..{len(images) - 1}")
        if int(labels[index]) != source:
            raise UserError(f"image {index} is a {class_names[int(labels[index])]}, not a {name}; "
                            f"pass the index of a {name} or omit it")
        candidates = torch.tensor([index])
    else:
        pool = (labels == source).nonzero().squeeze(1)
        with torch.no_grad():
            predicted = baseline(images[pool].to(device)).argmax(dim=1).cpu()
        candidates = pool[predicted == source]
        if pick == "random":
            candidates = candidates[torch.randperm(len(candidates),
                                                   generator=torch.Generator().manual_seed(seed))]
        # the talk's picture first: images the 1-Lipschitz model is certified on at ε
        certificate = Certifier(lipschitz, tuple(images.shape[1:]))(
            images[candidates].to(device), labels[candidates].to(device), epsilons=(eps,))
        certified = (certificate.correct & (certificate.radius > eps)).cpu()
        candidates = torch.cat([candidates[certified], candidates[~certified]])[:max_candidates]
        if len(candidates) == 0:
            raise UserError(f"the baseline classifies no {name} in the {len(images)} images "
                            "correctly; pass more images")
    x, y = images[candidates].to(device), labels[candidates].to(device)
    goal = torch.full((len(x),), target, device=device)
    _, (adversarial,), success = PGD(norm="l2", steps=steps, seed=seed)(
        export_plain(baseline), x, y, epsilons=[eps], target=goal)
    if success[0].any():
        k = int(success[0].nonzero()[0])
    else:
        with torch.no_grad():
            k = int(baseline(adversarial).log_softmax(dim=1)[:, target].argmax())  # no underflow
    image, attacked = x[k], _outcome(baseline, x[k], adversarial[k])
    flipped = attacked.adversarial_prediction == target
    _, (strong,), _ = PGD(norm="l2", steps=steps, restarts=restarts, seed=seed)(
        export_plain(lipschitz), image[None], y[k:k + 1], epsilons=[eps], target=goal[:1])
    robust = _outcome(lipschitz, image, strong[0])
    certificate = Certifier(lipschitz, tuple(image.shape))(
        image[None], torch.tensor([robust.clean_prediction], device=device), epsilons=(eps,))
    return PlaneCatExample(
        index=int(candidates[k]), image=image.cpu(), label=int(y[k]), eps=eps, target=target,
        baseline=attacked, lipschitz=robust, radius=float(certificate.radius[0]), flipped=flipped,
        note="" if flipped else (f"no {name} in the sample could be flipped to "
                                 f"{class_names[target]} at ε={eps:.3g}; showing the closest attempt"),
    )


@dataclass
class PlaneCatCandidate:
    """One image of the source class: ``radius`` is the 1-Lipschitz model's certified L2
    radius (0 where it misclassifies), ``flipped`` whether the baseline's targeted PGD of
    size ``eps`` reached the target, ``target_probability`` the baseline's probability of the
    target at that adversarial."""

    index: int
    radius: float
    flipped: bool
    target_probability: float

    def proof(self, eps: float) -> bool:
        """The picture the talk draws: the baseline falls at ``eps``, a certificate holds."""
        return self.flipped and self.radius > eps


def rank_plane_cat(
    baseline: nn.Module,
    lipschitz: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    eps: float = 0.3,
    source: int = 0,
    target: int = 3,
    steps: int = 100,
    restarts: int = 1,
    seed: int = 0,
    batch: int = 250,
) -> list[PlaneCatCandidate]:
    """Every image labelled ``source`` that both models classify correctly, certified by
    ``lipschitz`` and attacked on ``baseline`` (targeted L2 PGD towards ``target``, size
    ``eps``), best first: proofs (flipped and radius > ``eps``) by radius, then the other
    flipped images by radius (the closest to a proof), then the rest. Images certified beyond
    ``eps`` are attacked first; the others only when none of those flips."""
    baseline.eval()
    lipschitz.eval()
    device = next(baseline.parameters()).device
    pool = (labels == source).nonzero().squeeze(1)
    certifier = Certifier(lipschitz, tuple(images.shape[1:]))
    radius = torch.zeros(len(pool), dtype=torch.float64)
    keep = torch.zeros(len(pool), dtype=torch.bool)
    for i in range(0, len(pool), batch):
        part = pool[i:i + batch]
        x, y = images[part].to(device), labels[part].to(device)
        certificate = certifier(x, y, epsilons=(eps,))  # radius > eps decided exactly
        with torch.no_grad():
            right = baseline(x).argmax(dim=1) == y
        radius[i:i + batch] = torch.where(certificate.correct, certificate.radius, 0.0).cpu().double()
        keep[i:i + batch] = (certificate.correct & right).cpu()
    pool, radius = pool[keep], radius[keep]
    attack, plain = PGD(norm="l2", steps=steps, restarts=restarts, seed=seed), export_plain(baseline)
    flipped = torch.zeros(len(pool), dtype=torch.bool)
    probability = torch.full((len(pool),), float("nan"), dtype=torch.float64)

    def attack_rows(rows: Tensor) -> None:
        for i in range(0, len(rows), batch):
            part = rows[i:i + batch]
            x, y = images[pool[part]].to(device), labels[pool[part]].to(device)
            goal = torch.full((len(x),), target, device=device)
            _, (adversarial,), _ = attack(plain, x, y, epsilons=[eps], target=goal)
            with torch.no_grad():
                scores = baseline(adversarial).softmax(dim=1)  # the model itself decides
            flipped[part] = (scores.argmax(dim=1) == target).cpu()
            probability[part] = scores[:, target].cpu().double()

    beyond = (radius > eps).nonzero().squeeze(1)
    attack_rows(beyond)
    if not flipped.any():
        attack_rows((radius <= eps).nonzero().squeeze(1))
    found = [PlaneCatCandidate(int(pool[k]), float(radius[k]), bool(flipped[k]),
                               float(probability[k])) for k in range(len(pool))]
    return sorted(found, key=lambda c: (not c.proof(eps), not c.flipped, -c.radius))


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _show(ax: Axes, image: Tensor, title: str) -> None:
    ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def draw_plane_cat(example: PlaneCatExample, class_names: Sequence[str] = CIFAR10_CLASSES) -> Figure:
    """Two rows (baseline, 1-Lipschitz) of original, amplified δ and perturbed image."""
    fig = _figure(7.5, 6.0)
    eps, target = example.eps, class_names[example.target]
    if example.radius > eps:
        verdict = (f"certified radius {example.radius:.3g} > ε={eps:.3g}: "
                   "no perturbation of this size can change the label")
    else:
        verdict = (f"certified radius {example.radius:.3g} ≤ ε={eps:.3g}: the label is "
                   f"guaranteed only for ‖δ‖₂ < {example.radius:.3g}")
    headings = (
        f"baseline: targeted L2 PGD towards {target}, ε={eps:.3g}"
        + (f"\n{example.note}" if example.note else ""),
        f"1-Lipschitz: the same targeted attack, with restarts\n{verdict}",
    )
    for row, outcome, heading in zip(fig.subfigures(2, 1), (example.baseline, example.lipschitz),
                                     headings, strict=True):
        row.suptitle(heading, fontsize=10)
        original, perturbation, perturbed = row.subplots(1, 3)
        _show(original, example.image, f"{class_names[outcome.clean_prediction]} "
                                       f"({outcome.clean_confidence:.0%})")
        _show(perturbation, 0.5 + outcome.delta / (2 * max(float(outcome.delta.abs().max()), 1e-12)),
              f"δ amplified, ‖δ‖₂ = {outcome.delta_norm:.3f}")
        _show(perturbed, outcome.adversarial, f"{class_names[outcome.adversarial_prediction]} "
                                              f"({outcome.adversarial_confidence:.0%})")
    return fig


#: Curve labels of the attack specs that have a conventional name.
ATTACK_NAMES = {"autoattack": "AutoAttack", "autoattack-fast": "AutoAttack (fast)"}

#: The scatter's x axis when the reports do not name the attack.
DISTANCE_LABEL = "smallest adversarial L2 distance found"


def _percent_curve(values: Mapping[float, float], clean: float) -> tuple[list[float], list[float]]:
    points = {0.0: clean, **values}
    eps = sorted(points)
    return eps, [100 * points[e] for e in eps]


def draw_curves(
    certified: dict[float, float] | None,
    robust: dict[str, dict[float, float]],
    clean: float,
    radii: np.ndarray | None = None,
    min_distances: np.ndarray | None = None,
    title: str = "",
    distance_label: str = "",
) -> Figure:
    """Accuracy (fractions in [0, 1]) against ε; with ``radii`` and ``min_distances`` also
    :func:`draw_radius_scatter` of the images both cover (the first ``min(len)``).

    ``clean`` is the ε = 0 point of the certified curve and of every attack curve without a
    ``0.0`` entry of its own.
    """
    both = radii is not None and min_distances is not None
    fig = _figure(11.0 if both else 6.0, 4.5 if both else 4.2)
    axes = fig.subplots(1, 2 if both else 1, squeeze=False)[0]
    left = axes[0]
    if certified is not None:
        left.plot(*_percent_curve(certified, clean), "o-", color="black", label="certified")
    for name, values in robust.items():
        # AutoAttack, the standard empirical evaluation, solid; other attacks dashed
        style = "D-" if name.startswith("AutoAttack") else "s--"
        left.plot(*_percent_curve(values, clean), style, label=name)
    left.set(xlabel="ε (L2)", ylabel="accuracy (%)", ylim=(0, 100), title="accuracy against ε")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    if both:
        draw_radius_scatter(axes[1], radii, min_distances, distance_label or DISTANCE_LABEL)
    if title:
        fig.suptitle(title)
    return fig


def draw_radius_scatter(ax: Axes, radii: np.ndarray, min_distances: np.ndarray,
                        distance_label: str = "") -> None:
    """Certified radius (a lower bound on the distance to the decision boundary) against the
    smallest adversarial distance an attack found (an upper bound), image by image, with
    y = x: a sound certificate puts no point above the line.

    ``radii[i]`` and ``min_distances[i]`` describe the same image for ``i < min(len)``.
    Misclassified images (distance 0) are left out; images the attack could not break
    (distance ``inf``) are drawn at the right edge.
    """
    radius, distance = _paired(radii, min_distances)
    shown = distance > 0
    found = shown & np.isfinite(distance)
    unbroken = shown & ~np.isfinite(distance)
    above = found & (radius > distance)
    top = 1.05 * max([1e-3, *distance[found], *radius[shown]])
    ax.fill_between([0, top], [0, top], top, color="tab:red", alpha=0.07, linewidth=0,
                    label="radius > distance: impossible if sound")
    ax.plot([0, top], [0, top], color="black", linewidth=1, label="y = x")
    ax.scatter(distance[found & ~above], radius[found & ~above], s=14, alpha=0.7,
               color="tab:blue", label=f"correctly classified images ({int((found & ~above).sum())})")
    if above.any():
        ax.scatter(distance[above], radius[above], s=30, marker="x", color="tab:red",
                   label=f"radius above the distance ({int(above.sum())})")
    if unbroken.any():
        ax.scatter(np.full(int(unbroken.sum()), top), radius[unbroken], s=30, marker=">",
                   color="tab:orange", clip_on=False,
                   label=f"no adversarial found ({int(unbroken.sum())})")
    ax.set(xlim=(0, top), ylim=(0, top), aspect="equal", xlabel=distance_label or DISTANCE_LABEL,
           ylabel="certified radius (L2)",
           title=f"radius against attack: {int(above.sum())} of {int(found.sum())} images above y = x")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")


def _field(report: Mapping, key: str, name: str) -> object:
    if not isinstance(report, Mapping) or key not in report:
        raise UserError(f"{name} has no {key!r}; pass a report written by robustflow")
    return report[key]


def _number(report: Mapping, key: str, name: str) -> float:
    value = _field(report, key, name)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UserError(f"{key!r} in {name} must be a number, got {value!r}") from None


def _by_epsilon(report: Mapping, key: str, name: str) -> dict[float, float]:
    values = _field(report, key, name)
    if not isinstance(values, Mapping):
        raise UserError(f"{key!r} in {name} must map ε labels to accuracies, got {values!r}")
    try:
        return {parse_epsilon(str(label)): float(value) for label, value in values.items()}
    except (TypeError, ValueError) as error:
        raise UserError(f"{key!r} in {name}: {error}") from None


def _per_image(report: Mapping, key: str, name: str) -> np.ndarray:
    values = _field(report, key, name)
    try:
        array = np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        array = None
    if array is None or array.ndim != 1:
        raise UserError(f"{key!r} in {name} must be a list of numbers, one per image")
    return array


def _same_images(certify_report: Mapping, report: Mapping, name: str, k: int) -> None:
    """Refuse to pair radii and distances of different images, where both reports say which."""
    if "labels" not in certify_report or "labels" not in report:
        return
    ours = _per_image(certify_report, "labels", "the certify report")[:k]
    theirs = _per_image(report, "labels", name)[:k]
    n = min(len(ours), len(theirs))
    differ = np.flatnonzero(ours[:n] != theirs[:n])
    if len(differ) or n < k:
        raise UserError(f"the certify report and {name} describe different images (labels differ at "
                        f"image {int(differ[0]) if len(differ) else n}); certify and attack the same "
                        "images, from the first")


def curves_from_reports(certify_report: dict | None, attack_reports: list[dict],
                        distances_report: dict | None = None, title: str = "") -> Figure:
    """:func:`draw_curves` from the JSON reports of ``robustflow certify`` and ``attack``.

    Each attack curve starts at its own report's clean accuracy. The per-image scatter pairs
    the certify report's ``radii`` with the ``min_distances`` of ``distances_report`` (any
    report that has them, e.g. the demo's ``distances-lipschitz.json``) or, without one, of
    the first attack report that has them (``robustflow attack --attack foolbox:DDNAttack``);
    the figure then also carries their :func:`radius_against_distance` as an attribute of the
    same name.
    """
    if certify_report is None and not attack_reports:
        raise UserError("no reports to plot; pass a certify report or attack reports")
    robust: dict[str, dict[float, float]] = {}
    sources = [] if distances_report is None else [("the distances report", distances_report)]
    for i, report in enumerate(attack_reports):
        name = f"attack report {i}"
        attack = str(_field(report, "attack", name))
        label = f"{ATTACK_NAMES.get(attack, attack)} ({_field(report, 'model', name)})"
        robust[label] = {0.0: _number(report, "clean_accuracy", name),
                         **_by_epsilon(report, "robust_accuracy", name)}
        if report.get("min_distances") is not None:
            sources.append((name, report))
    certified = radii = min_distances = None
    distance_label = DISTANCE_LABEL
    if certify_report is not None:
        certified = _by_epsilon(certify_report, "certified_accuracy", "the certify report")
        clean = _number(certify_report, "clean_accuracy", "the certify report")
        if "radii" in certify_report:
            radii = _per_image(certify_report, "radii", "the certify report")
    else:
        clean = next(iter(robust.values()))[0.0]
    if sources:
        name, report = sources[0]
        min_distances = _per_image(report, "min_distances", name)
        if radii is not None:
            _same_images(certify_report, report, name, min(len(min_distances), len(radii)))
        attack, steps = str(report.get("attack", "the attack")), report.get("steps")
        distance_label = (f"smallest adversarial L2 distance found by {attack.removeprefix('foolbox:')}"
                          + (f", {steps} steps" if steps else ""))
    figure = draw_curves(certified, robust, clean, radii, min_distances, title, distance_label)
    if radii is not None and min_distances is not None:
        figure.radius_against_distance = radius_against_distance(radii, min_distances)
    return figure


def _paired(radii: np.ndarray, min_distances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Radii and distances of the images both describe (the first ``min(len)``), as floats."""
    k = min(len(radii), len(min_distances))
    return np.asarray(radii, float)[:k], np.asarray(min_distances, float)[:k]


def radius_against_distance(radii: np.ndarray, min_distances: np.ndarray) -> dict[str, float]:
    """Over the images with an adversarial (``0 < distance < inf``, the first ``min(len)``):
    their number, how many have a certified radius above the distance (0 if the certificates
    are sound) and the median of radius / distance (1 would be tight)."""
    radius, distance = _paired(radii, min_distances)
    found = (distance > 0) & np.isfinite(distance)
    ratio = radius[found] / distance[found]
    return {"images": int(found.sum()), "above": int((radius[found] > distance[found]).sum()),
            "median_ratio": float(np.median(ratio)) if len(ratio) else float("nan")}


def figure_pixel_size(fig: Figure) -> tuple[int, int]:
    """``(width, height)`` in pixels of ``fig`` saved as PNG by :func:`save_figure`."""
    width, height = fig.get_size_inches() * DPI  # Agg truncates, as int() does
    return int(width), int(height)


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Write ``fig`` to ``path`` (.png at :data:`DPI`, .pdf or .svg), creating parent folders;
    the file appears whole or not at all (temporary file in the same folder, then rename)."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise UserError(f"cannot save a figure as {path.name!r}; use one of {', '.join(FORMATS)}")
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "xb") as handle:
            fig.savefig(handle, format=path.suffix[1:].lower(), dpi=DPI)
        os.replace(temporary, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise UserError(f"cannot write {path}: {error.strerror or error}; "
                        "choose a writable file path") from None
    return path
