"""Certify and attack a model over a data set: the functions the CLI and notebooks call."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import foolbox as fb
import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from attacks import (
    AutoAttack,
    FoolboxAttack,
    Square,
    check_evaluation,
    get_attack,
    minimal_adversarial_distance,
)
from attacks.registry import AUTOATTACK_SPECS
from certify import CertificationReport, Certifier, NotCertifiable
from robustflow.data import ImageSet
from robustflow.export import export_plain


def batches(data: ImageSet, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """``(images in [0, 1], labels)`` batches of ``data`` in order."""
    for start in range(0, len(data), batch_size):
        yield data.floats(slice(start, start + batch_size))


PRECISIONS = {"float32": torch.float32, "float64": torch.float64}


def certify_dataset(model: nn.Module, data: ImageSet, epsilons: Sequence[tuple[str, float]],
                    *, batch_size: int = 500, device: torch.device | str = "cpu",
                    progress: bool = True, name: str = "model",
                    precision: str = "float32") -> CertificationReport:
    """Certified radii of every image; accuracies at each ``(label, ε)``.

    The Lipschitz bound is computed once (float64, proven) before the single pass, on the
    exported copy of ``model`` (same outputs, same weights, no parametrisation cost).
    ``precision`` is the arithmetic of the pass. In float32 each radius is lowered by the proven
    bound on float32 rounding and the decisions that bound leaves open at each ε are recomputed
    in float64, so the accuracies are float64's; ``"float64"`` computes every logit in float64,
    where that bound is negligible, so every radius is tight too (at several times the cost).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    model = export_plain(model.to(device)).to(PRECISIONS[precision]).eval()
    certifier = Certifier(model, tuple(data.images.shape[1:]))
    report = certifier.certify_loader(batches(data, batch_size), [e for _, e in epsilons],
                                      [label for label, _ in epsilons], progress=progress,
                                      device=device, limit=len(data))
    report.model = name
    return report


@dataclass
class AttackReport:
    """Robust accuracy of one attack at each ε (plus, optionally, certified accuracy).

    For AutoAttack, ``per_attack[name][ε]`` is the robust accuracy after the attacks up to and
    including ``name`` ran, in order (the last one equals ``robust_accuracy``).
    """

    model: str
    attack: str
    steps: int | None
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
    norm: str = "l2"
    queries: int | None = None
    per_attack: dict[str, dict[str, float]] | None = None
    seconds: float | None = None
    certified_attacked: dict[str, int] | None = None
    certified_broken: dict[str, int] | None = None
    adversarials: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "adversarials"}

    def to_json(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))


def attack_options(attack: str, *, steps: int | None = None, restarts: int = 1, seed: int = 0,
                   norm: str | None = None, queries: int | None = None,
                   targets: int | None = None) -> dict[str, Any]:
    """The keyword arguments of :func:`attacks.get_attack` that ``attack`` takes among these
    (``steps`` is PGD's, APGD's, FAB's and a foolbox attack's; ``queries`` Square's; ``targets`` APGD-T's and
    FAB-T's; ``restarts`` all but AutoAttack's, which runs each attack once as the paper does)."""
    if attack.startswith("pgd-"):
        return {"steps": 10 if steps is None else steps, "restarts": restarts, "seed": seed,
                **({} if norm is None else {"norm": norm})}
    if attack.startswith("foolbox:"):  # foolbox's own defaults unless asked otherwise
        if restarts != 1:
            raise ValueError("a foolbox attack runs once; restarts must be 1")
        return {**({} if steps is None else {"steps": steps}),
                **({} if norm is None else {"norm": norm})}
    if attack not in AUTOATTACK_SPECS:
        return {} if norm is None else {"norm": norm}
    options: dict[str, Any] = {"norm": norm or "l2", "seed": seed}
    if steps is not None and attack != "square":
        options["steps"] = steps
    if queries is not None and attack in ("square", "autoattack"):
        options["queries"] = queries
    if targets is not None and attack in ("apgd-t", "fab-t", "autoattack", "autoattack-fast"):
        options["targets"] = targets
    if not attack.startswith("autoattack"):
        options["restarts"] = restarts
    elif restarts != 1:
        raise ValueError("AutoAttack runs each of its attacks once, as the paper does; "
                         "restarts must be 1")
    return options


def attack_dataset(model: nn.Module, data: ImageSet, attack: str,
                   epsilons: Sequence[tuple[str, float]], *, steps: int | None = None,
                   restarts: int = 1, target: int | None = None, seed: int = 0,
                   batch_size: int = 250, device: torch.device | str = "cpu",
                   progress: bool = True, use_certificates: bool = True,
                   attack_certified: bool = False, keep_adversarials: bool = False,
                   name: str = "model", norm: str | None = None,
                   queries: int | None = None, targets: int | None = None) -> AttackReport:
    """Run ``attack`` (a spec of :func:`attacks.get_attack`) at every ε; points certified at
    that ε are not attacked.

    Skipping certified points (and misclassified ones, inside the attack) changes no
    result: a certified point cannot fall, a misclassified one has already fallen. The
    robust accuracy therefore equals that of the full attack with the same seed.
    ``attack_certified=True`` attacks the certified points as well, as a check of the
    certificates: ``certified_broken[ε]`` counts those the attack broke, which a sound
    certificate keeps at 0 (``certified_attacked[ε]`` says how many were tried). The
    attack runs on the exported copy of ``model`` (same outputs, no parametrisation cost).
    ``steps`` defaults to 10 for PGD and to 100 (the paper's) for APGD and FAB; ``norm`` to
    the spec's or L2. Certificates are L2 radii r; under L∞ a point is certified at ε when
    r > ε√d (d = input size), as ‖δ‖₂ ≤ √d‖δ‖∞. For
    AutoAttack the report also holds ``per_attack`` and warns when Square, which uses no
    gradients, broke points that the gradient attacks could not (a sign of gradient masking).
    """
    started = time.monotonic()
    model = export_plain(model.to(device)).eval()
    runner = get_attack(attack, **attack_options(attack, steps=steps, restarts=restarts,
                                                 seed=seed, norm=norm, queries=queries,
                                                 targets=targets))
    if target is not None and isinstance(runner, AutoAttack):
        raise ValueError("AutoAttack is untargeted; for a targeted attack use apgd-t, fab-t or "
                         "square")
    x0, y0 = data.floats(slice(0, min(len(data), 64)))
    warnings = check_evaluation(model, x0.to(device), y0.to(device))

    if attack_certified and not use_certificates:
        raise ValueError("attack_certified checks certificates; it needs use_certificates=True")
    radii = None
    certified: dict[str, float] | None = None
    scale = 1.0 if runner.norm == "l2" else float(np.prod(data.images.shape[1:])) ** 0.5
    if use_certificates:
        try:
            certifier = Certifier(model, tuple(data.images.shape[1:]))
        except NotCertifiable:
            certifier = None
        if certifier is None and attack_certified:
            raise ValueError("attack_certified checks certificates, but certify cannot bound "
                             "this model")
        if certifier is not None:
            radii_at = [eps * scale for _, eps in epsilons]  # decisions at these exact, as in certify
            radii = torch.cat([certifier(x.to(device), y.to(device), epsilons=radii_at).radius.cpu()
                               for x, y in batches(data, batch_size)])
    robust_counts = {label: 0 for label, _ in epsilons}
    attacked = {label: 0 for label, _ in epsilons}
    adversarials = {label: [] for label, _ in epsilons}
    stages = runner.names if isinstance(runner, AutoAttack) else ()
    stage_counts = {stage: {label: 0 for label, _ in epsilons} for stage in stages}
    audit = attack_certified and radii is not None
    certified_attacked = {label: 0 for label, _ in epsilons} if audit else None
    certified_broken = {label: 0 for label, _ in epsilons} if audit else None
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
            proven = None  # the points certified at ε, which cannot fall
            if radii is not None:
                proven = (radii[start:start + len(y)] > eps * scale).to(device) & clean_ok
            skip = None if audit else proven
            if stages:
                result = runner.evaluate(model, x, y, epsilons=[eps], skip=skip)
                clipped, success = result.clipped, result.success
                for stage, standing in zip(stages, result.robust_after(), strict=True):
                    stage_counts[stage][label] += int((clean_ok & standing[0]).sum())
            else:
                _, clipped, success = runner(model, x, y, epsilons=[eps], skip=skip, target=goal)
            fooled = success[0] if goal is None else success[0] & (y != goal)
            robust_counts[label] += int((clean_ok & ~fooled).sum())
            attacked[label] += int(clean_ok.sum()) - (0 if skip is None else int(skip.sum()))
            if audit:
                certified_attacked[label] += int(proven.sum())
                certified_broken[label] += int((proven & fooled).sum())
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
                                                 attack.removeprefix("foolbox:"),
                                                 **({} if steps is None else {"steps": steps}))
            distances.extend(found.cpu().tolist())
    if radii is not None:  # radius 0 for misclassified points; at ε = 0 certified = correct
        certified = {label: int((radii > eps * scale).sum()) / n if eps > 0 else correct / n
                     for label, eps in epsilons}
    per_attack = None
    if stages:
        per_attack = {stage: {label: count / n for label, count in counts.items()}
                      for stage, counts in stage_counts.items()}
        if "square" in stages:
            before = stages[stages.index("square") - 1]
            masked = {label: stage_counts[before][label] - stage_counts["square"][label]
                      for label, _ in epsilons}
            if any(masked.values()):
                warnings.append("Square, which uses no gradients, broke points the gradient attacks "
                                "could not (" + ", ".join(f"{k} at ε={label}" for label, k in
                                                          masked.items() if k)
                                + "): a sign of gradient masking")
    searches = isinstance(runner, Square) or "square" in stages
    return AttackReport(
        model=name, attack=attack, steps=getattr(runner, "steps", None), restarts=restarts, n=n,
        seed=seed,
        clean_accuracy=correct / n,
        robust_accuracy={label: robust_counts[label] / n for label, _ in epsilons},
        certified_accuracy=certified, target=target, attacked_points=attacked, warnings=warnings,
        min_distances=distances, norm=runner.norm,
        queries=runner.queries if searches else None, per_attack=per_attack,
        seconds=time.monotonic() - started,
        certified_attacked=certified_attacked, certified_broken=certified_broken,
        adversarials={k: np.concatenate(v) for k, v in adversarials.items() if v},
    )


def _is_minimisation(runner: object) -> bool:
    """True for foolbox L2 minimisation attacks (DDN, FMN, CW): they yield distances."""
    return (isinstance(runner, FoolboxAttack) and runner.norm == "l2"
            and isinstance(runner.attack, fb.attacks.base.MinimizationAttack))
