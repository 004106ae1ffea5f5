"""Certified L2 radii from logit margins and a proven Lipschitz bound.

If the logit map ``f`` is L-Lipschitz, every ``f_y − f_j`` is ``√2 L``-Lipschitz, so the
prediction ``y`` cannot change within radius ``M / (√2 L)`` where
``M = f_y − max_{j≠y} f_j`` (Tsuzuku et al. 2018). When ``f = W g + b`` with ``g``
``L_b``-Lipschitz, ``f_y − f_j`` is ``L_b ‖w_y − w_j‖``-Lipschitz, which gives the
pairwise radius ``min_{j≠y} (f_y − f_j) / (L_b ‖w_y − w_j‖)``.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .bounds import lipschitz_bound, split_head
from .spectral import SAFETY

#: Relative rounding slack: each margin is lowered by ``τ = ROUNDING_SLACK · (1 + max_j |f_j|)``
#: before dividing. It covers the float32 rounding of the forward pass that produced the
#: logits (unit roundoff 6e-8; the accumulated error is typically ~1e-6 of the logit scale)
#: with a wide margin, and the float64 rounding of the bound and the division with it.
ROUNDING_SLACK = 1e-4

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
_TINY = torch.finfo(torch.float64).tiny


def margins(logits: Tensor, labels: Tensor) -> Tensor:
    """``M = f_y − max_{j≠y} f_j`` per sample (float64); positive iff ``y`` wins strictly."""
    z = logits.detach().double()
    labels = labels.view(-1, 1).to(z.device)
    others = z.scatter(1, labels, -math.inf)
    return z.gather(1, labels).squeeze(1) - others.amax(dim=1)


def rounding_slack(logits: Tensor) -> Tensor:
    """``τ = ROUNDING_SLACK · (1 + max_j |f_j|)`` per sample (float64)."""
    return ROUNDING_SLACK * (1.0 + logits.detach().double().abs().amax(dim=1))


def global_radius(logits: Tensor, labels: Tensor, lipschitz: float) -> Tensor:
    """``max(0, (M − τ) / (√2 L))`` per sample, in float64."""
    numerator = margins(logits, labels) - rounding_slack(logits)
    return (numerator / max(math.sqrt(2.0) * lipschitz, _TINY)).clamp_min(0.0)


def head_distances(weight: Tensor) -> Tensor:
    """Upper bounds on ``‖w_i − w_j‖₂`` for all rows of a head weight (float64, ``K × K``)."""
    w = weight.detach().double().cpu()
    distances = torch.stack([torch.linalg.vector_norm(w - row, dim=1) for row in w])
    return distances * (1.0 + SAFETY)


def pairwise_radius(logits: Tensor, labels: Tensor, body_bound: float,
                    distances: Tensor) -> Tensor:
    """``max(0, min_{j≠y} (f_y − f_j − τ) / (L_b ‖w_y − w_j‖))`` per sample, in float64.

    ``distances`` comes from :func:`head_distances` of the last Linear layer.
    """
    z = logits.detach().double()
    labels = labels.view(-1, 1).to(z.device)
    gaps = z.gather(1, labels) - z - rounding_slack(z).unsqueeze(1)
    scale = (body_bound * distances.to(z.device)[labels.squeeze(1)]).clamp_min(_TINY)
    ratios = (gaps / scale).scatter(1, labels, math.inf)
    return ratios.amin(dim=1).clamp_min(0.0)


def is_certified(correct: Tensor | np.ndarray, radius: Tensor | np.ndarray,
                 eps: float) -> Tensor | np.ndarray:
    """Certified at ``ε``: correct and (``ε == 0`` or ``radius > ε``)."""
    return correct & (radius > eps) if eps > 0 else correct


@dataclass
class CertificateBatch:
    """Per-sample certificates; ``radius`` is 0 for misclassified samples."""

    prediction: Tensor
    margin: Tensor
    radius: Tensor
    correct: Tensor


@dataclass
class CertificationReport:
    """Aggregate certificates; the per-sample arrays stay out of ``to_dict``/``to_json``."""

    model: str
    lipschitz_bound: float
    n: int
    clean_accuracy: float
    certified_accuracy: dict[str, float]
    radius_quantiles: dict[str, float]
    method: str
    labels: np.ndarray = field(repr=False, metadata={"per_sample": True})
    predictions: np.ndarray = field(repr=False, metadata={"per_sample": True})
    margins: np.ndarray = field(repr=False, metadata={"per_sample": True})
    radii: np.ndarray = field(repr=False, metadata={"per_sample": True})

    def certified_accuracy_at(self, eps: float) -> float:
        """Fraction of samples certified at ``eps``."""
        return float(is_certified(self.predictions == self.labels, self.radii, eps).mean())

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if not f.metadata.get("per_sample")}

    def to_json(self, path: str | os.PathLike) -> None:
        with open(path, "w") as handle:
            json.dump(self.to_dict(), handle, indent=2)

    def to_csv(self, path: str | os.PathLike) -> None:
        """One row per sample: ``index,label,prediction,margin,radius``."""
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["index", "label", "prediction", "margin", "radius"])
            rows = zip(self.labels, self.predictions, self.margins, self.radii, strict=True)
            for index, (label, prediction, margin, radius) in enumerate(rows):
                writer.writerow([index, int(label), int(prediction), float(margin), float(radius)])


class Certifier:
    """Certified radii of ``model`` (any ``nn.Module`` that maps inputs to logits).

    The Lipschitz bound (and, for ``method="pairwise"``, the body bound and head row
    distances) is computed once, here: re-create the certifier after changing the
    parameters or the train/eval mode. ``"auto"`` uses ``"pairwise"`` when the model is a
    Sequential ending in a Linear layer, else ``"global"``; pairwise keeps per sample the
    larger of the two radii, both being sound.
    """

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...],
                 method: str = "auto") -> None:
        if method not in ("auto", "global", "pairwise"):
            raise ValueError(f"method must be 'auto', 'global' or 'pairwise', got {method!r}")
        self.model = model
        parts = split_head(model) if method != "global" else None
        if method == "pairwise" and parts is None:
            raise ValueError("pairwise certificates need an nn.Sequential ending in nn.Linear")
        self.method = "global" if parts is None else "pairwise"
        if parts is None:
            self.lipschitz = lipschitz_bound(model, input_shape)
        else:  # L = L_body · ‖head‖, rounded up: the body is bounded once, not twice
            body, head = parts
            self.body_bound = lipschitz_bound(body, input_shape)
            head_bound = lipschitz_bound(nn.Sequential(head), (head.in_features,))
            self.lipschitz = math.nextafter(self.body_bound * head_bound, math.inf)
            self.distances = head_distances(head.weight)

    def __call__(self, x: Tensor, y: Tensor) -> CertificateBatch:
        with torch.inference_mode():
            return self._certify(self.model(x), y)

    def _certify(self, logits: Tensor, y: Tensor) -> CertificateBatch:
        y = y.to(logits.device)
        radius = global_radius(logits, y, self.lipschitz)
        if self.method == "pairwise":
            radius = torch.maximum(radius, pairwise_radius(logits, y, self.body_bound,
                                                           self.distances))
        prediction = logits.argmax(dim=1)
        correct = prediction == y
        return CertificateBatch(prediction, margins(logits, y), torch.where(correct, radius, 0.0),
                                correct)

    def certify_loader(self, loader: Iterable, epsilons: Sequence[float],
                       eps_labels: Sequence[str] | None = None, progress: bool = True,
                       device: torch.device | str | None = None,
                       limit: int | None = None) -> CertificationReport:
        """Certify every ``(x, y)`` batch of ``loader`` (the first ``limit`` samples if given)."""
        epsilons = [float(eps) for eps in epsilons]
        labels = [f"{eps:g}" for eps in epsilons] if eps_labels is None else list(eps_labels)
        if len(labels) != len(epsilons) or any(eps < 0 for eps in epsilons):
            raise ValueError("need one label per epsilon and epsilons >= 0")
        if device is None:
            device = next((p.device for p in self.model.parameters()), "cpu")
        dataset = getattr(loader, "dataset", None)
        total = limit if limit is not None or not hasattr(dataset, "__len__") else len(dataset)
        batches: list[tuple[Tensor, CertificateBatch]] = []
        seen = 0
        with tqdm(total=total, disable=not progress, desc="certify", unit="img") as bar:
            for batch in loader:
                if limit is not None and seen >= limit:
                    break
                stop = None if limit is None else limit - seen
                x, y = batch[0][:stop].to(device), batch[1][:stop].to(device)
                batches.append((y, self(x, y)))
                seen += len(y)
                bar.update(len(y))
        if seen == 0:
            raise ValueError("the loader gave no samples")
        y = torch.cat([b[0] for b in batches]).cpu().numpy()
        cert = {name: torch.cat([getattr(b[1], name) for b in batches]).cpu().numpy()
                for name in ("prediction", "margin", "radius", "correct")}
        return CertificationReport(
            model=type(self.model).__name__,
            lipschitz_bound=self.lipschitz,
            n=seen,
            clean_accuracy=float(cert["correct"].mean()),
            certified_accuracy={label: float(is_certified(cert["correct"], cert["radius"],
                                                          eps).mean())
                                for label, eps in zip(labels, epsilons, strict=True)},
            radius_quantiles={str(q): float(np.quantile(cert["radius"], q)) for q in QUANTILES},
            method=self.method,
            labels=y, predictions=cert["prediction"], margins=cert["margin"],
            radii=cert["radius"],
        )


def parse_epsilon(text: str) -> float:
    """``"0.3"`` or a fraction ``"36/255"`` as a finite ``ε ≥ 0``; ValueError otherwise."""
    numerator, slash, denominator = text.strip().partition("/")
    try:
        value = float(numerator) / float(denominator) if slash else float(numerator)
    except ValueError:
        raise ValueError(f"epsilon {text!r} is neither a number nor a fraction like "
                         "'36/255'") from None
    except ZeroDivisionError:
        raise ValueError(f"epsilon {text!r} has a zero denominator") from None
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"epsilon {text!r} must be finite and non-negative")
    return value


def parse_epsilons(text: str) -> list[tuple[str, float]]:
    """``"36/255,0.3"`` → ``[("36/255", 0.1412), ("0.3", 0.3)]`` (label as written, value)."""
    return [(part.strip(), parse_epsilon(part)) for part in text.split(",")]

