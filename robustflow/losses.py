"""Training losses for certified classifiers."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def multiclass_hinge(logits: Tensor, labels: Tensor, margin: float = 0.15) -> Tensor:
    """The paper's loss ``Σ_{j≠y} max(0, f_j − f_y + m)``, averaged over the batch."""
    true = logits.gather(1, labels[:, None])
    terms = F.relu(logits - true + margin)
    terms = terms.scatter(1, labels[:, None], 0.0)
    return terms.sum(dim=1).mean()


def certified_cross_entropy(logits: Tensor, labels: Tensor, eps: float, lipschitz: float = 1.0,
                            temperature: float = 0.25) -> Tensor:
    """Cross-entropy after lowering the true logit by ``√2 L ε``: ``T · CE((f − √2Lε e_y) / T)``.

    A point whose margin exceeds ``√2 L ε`` is certified at ε, so this pushes margins
    past the certificate; a larger ``eps`` trades clean for certified accuracy, and a
    lower temperature ``T`` focuses on points near the decision boundary.
    """
    offset = math.sqrt(2.0) * lipschitz * eps
    shifted = logits - offset * F.one_hot(labels, logits.shape[1]).to(logits.dtype)
    return temperature * F.cross_entropy(shifted / temperature, labels)


LOSSES = ("hinge", "cce", "ce")


def make_loss(name: str, *, margin: float = 0.15, eps: float = 0.25, temperature: float = 0.25):
    """A ``loss(logits, labels)`` by name: ``hinge``, ``cce`` (certified CE) or ``ce``."""
    if name == "hinge":
        return lambda f, y: multiclass_hinge(f, y, margin)
    if name == "cce":
        return lambda f, y: certified_cross_entropy(f, y, eps, 1.0, temperature)
    if name == "ce":
        return lambda f, y: torch.nn.functional.cross_entropy(f, y)
    raise ValueError(f"unknown loss {name!r}; choose one of {LOSSES}")
