"""Certify and attack a model over a data set: the functions the CLI and notebooks call."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import foolbox as fb
import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from attacks import FoolboxAttack, check_evaluation, get_attack, minimal_adversarial_distance
from certify import CertificationReport, Certifier, NotCertifiable
from robustflow.data import ImageSet
from robustflow.export import export_plain


def batches(data: ImageSet, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """``(images in [0, 1], labels)`` batches of ``data`` in order."""
    for start in range(0, len(data), batch_size):
        yield data.floats(slice(start, start + batch_size))


def certify_dataset(model: nn.Module, data: ImageSet, epsilons: Sequence[tuple[str, float]],
                    *, batch_size: int = 500, device: torch.device | str = "cpu",
                    progress: bool = True, name: str = "model") -> CertificationReport:
    """Certified radii of every image; accuracies at each ``(label, ε)``.

    The Lipschitz bound is computed once (float64, proven) before the single pass, on the
    exported copy of ``model`` (same outputs, same weights, no parametrisation cost).
    """
    model = export_plain(model.to(device)).eval()
    certifier = Certifier(model, tuple(data.images.shape[1:]))
    report = certifier.certify_loader(batches(data, batch_size), [e for _, e in epsilons],
                                      [label for label, _ in epsilons], progress=progress,
                                      device=device, limit=len(data))
    report.model = name
    return report


@dataclass
class AttackReport:
    """Robust accuracy of one attack at each ε (plus, optionally, certified accuracy)."""

    model: str
    attack: str
    steps: int
    restarts: int
    n: int
    seed: int
    clean_accuracy: float
    robust_accuracy: dict[str, float]
    certified_accuracy: dict[str, float] | None = None
    target: int | None = None
    attacked_points: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    min_distances: list[float] | None = None
    adversarials: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "adversarials"}

    def to_json(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))


def attack_dataset(model: nn.Module, data: ImageSet, attack: str,
                   epsilons: Sequence[tuple[str, float]], *, steps: int = 10, restarts: int = 1,
                   target: int | None = None, seed: int = 0, batch_size: int = 250,
                   device: torch.device | str = "cpu", progress: bool = True,
                   use_certificates: bool = True, keep_adversarials: bool = False,
                   name: str = "model") -> AttackReport:
    """Run ``attack`` at every ε; points certified at that ε are not attacked.

    Skipping certified points (and misclassified ones, inside the attack) changes no
    result: a certified point cannot fall, a misclassified one has already fallen. The
    robust accuracy therefore equals that of the full attack with the same seed. The
    attack runs on the exported copy of ``model`` (same outputs, no parametrisation cost).
    """
    model = export_plain(model.to(device)).eval()
    kwargs: dict[str, Any] = {}
    if attack.startswith("pgd-"):
        kwargs = {"steps": steps, "restarts": restarts, "seed": seed}
    runner = get_attack(attack, **kwargs)
    x0, y0 = data.floats(slice(0, min(len(data), 64)))
    warnings = check_evaluation(model, x0.to(device), y0.to(device))

    radii = None
    certified: dict[str, float] | None = None
    if use_certificates:
        try:
            certifier = Certifier(model, tuple(data.images.shape[1:]))
        except NotCertifiable:
            certifier = None
        if certifier is not None:
            radii = torch.cat([certifier(x.to(device), y.to(device)).radius.cpu()
                               for x, y in batches(data, batch_size)])
    robust_counts = {label: 0 for label, _ in epsilons}
    attacked = {label: 0 for label, _ in epsilons}
    adversarials = {label: [] for label, _ in epsilons}
    correct = 0
    bar = tqdm(total=len(data) * len(epsilons), desc=f"attack {attack}", unit="img",
               disable=not progress)
    for start in range(0, len(data), batch_size):
        x, y = (t.to(device) for t in data.floats(slice(start, start + batch_size)))
        with torch.no_grad():
            clean_ok = model(x).argmax(1) == y
        correct += int(clean_ok.sum())
        goal = None if target is None else torch.full_like(y, int(target))
        for label, eps in epsilons:
            skip = None
            if radii is not None:
                skip = (radii[start:start + len(y)] > eps).to(device) & clean_ok
            _, clipped, success = runner(model, x, y, epsilons=[eps], skip=skip, target=goal)
            fooled = success[0] if goal is None else success[0] & (y != goal)
            robust_counts[label] += int((clean_ok & ~fooled).sum())
            attacked[label] += int(clean_ok.sum()) - (0 if skip is None else int(skip.sum()))
            if keep_adversarials:
                adversarials[label].append(clipped[0].cpu().numpy())
            bar.update(len(y))
    bar.close()
    n = len(data)
    distances = None
    if _is_minimisation(runner):
        distances = []
        for x, y in batches(data, batch_size):
            found = minimal_adversarial_distance(model, x.to(device), y.to(device),
                                                 attack.removeprefix("foolbox:"))
            distances.extend(found.cpu().tolist())
    if radii is not None:  # radius 0 for misclassified points; at ε = 0 certified = correct
        certified = {label: float((radii > eps).float().mean()) if eps > 0 else correct / n
                     for label, eps in epsilons}
    return AttackReport(
        model=name, attack=attack, steps=steps, restarts=restarts, n=n, seed=seed,
        clean_accuracy=correct / n,
        robust_accuracy={label: robust_counts[label] / n for label, _ in epsilons},
        certified_accuracy=certified, target=target, attacked_points=attacked, warnings=warnings,
        min_distances=distances,
        adversarials={k: np.concatenate(v) for k, v in adversarials.items() if v},
    )


def _is_minimisation(runner: object) -> bool:
    """True for foolbox L2 minimisation attacks (DDN, FMN, CW): they yield distances."""
    return (isinstance(runner, FoolboxAttack) and runner.norm == "l2"
            and isinstance(runner.attack, fb.attacks.base.MinimizationAttack))
