"""Training losses for certified classifiers."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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


def row_distances(weight: Tensor) -> Tensor:
    """``‖w_i − w_j‖₂`` for all rows of a head weight (``K × K``, differentiable, 0 on the
    diagonal), from the Gram matrix: ``‖w_i‖² + ‖w_j‖² − 2 w_i·w_j``."""
    gram = weight @ weight.T
    norms = gram.diagonal()
    squared = norms[:, None] + norms[None, :] - 2.0 * gram
    off = ~torch.eye(len(weight), dtype=torch.bool, device=weight.device)
    return squared.clamp_min(1e-12).sqrt() * off


def pairwise_certified_cross_entropy(logits: Tensor, labels: Tensor, head_weight: Tensor,
                                     eps: float, lipschitz: float = 1.0,
                                     temperature: float = 0.25) -> Tensor:
    """``T · CE((f + L ε d_y) / T)`` with ``d_yj = ‖w_y − w_j‖`` the head's row distances.

    Each rival logit is raised by the most a perturbation of size ε can move its gap to the
    true one when the body is ``L``-Lipschitz, so as ``T → 0`` the loss vanishes exactly on the
    points with the pairwise certificate ``min_{j≠y} (f_y − f_j) / (L ‖w_y − w_j‖) > ε`` that
    ``certify`` proves; :func:`certified_cross_entropy` takes every ``‖w_y − w_j‖`` at its
    largest, ``√2`` for ``‖W‖ ≤ 1``. The distances come from the live weight, so the head
    learns them too.
    """
    offsets = lipschitz * eps * row_distances(head_weight)[labels]
    return temperature * F.cross_entropy((logits + offsets) / temperature, labels)


def final_linear(model: nn.Module) -> nn.Linear:
    """The linear layer a model ends in (its last child, recursively): the certificate's head."""
    part = model
    while not isinstance(part, nn.Linear):
        children = list(part.children())
        if not children:
            raise ValueError(f"the loss needs a model that ends in a linear layer; "
                             f"{type(model).__name__} ends in {type(part).__name__}")
        part = children[-1]
    return part


LOSSES = ("hinge", "cce", "cce-pairwise", "ce")


def make_loss(name: str, *, margin: float = 0.15, eps: float = 0.25, temperature: float = 0.25,
              model: nn.Module | None = None):
    """A ``loss(logits, labels)`` by name: ``hinge``, ``cce`` (certified CE), ``cce-pairwise``
    (certified CE with the head's row distances; needs the ``model``, read at every call) or
    ``ce``."""
    if name == "hinge":
        return lambda f, y: multiclass_hinge(f, y, margin)
    if name == "cce":
        return lambda f, y: certified_cross_entropy(f, y, eps, 1.0, temperature)
    if name == "cce-pairwise":
        if model is None:
            raise ValueError("the cce-pairwise loss needs the model whose head it reads")
        head = final_linear(model)
        return lambda f, y: pairwise_certified_cross_entropy(f, y, head.weight, eps, 1.0,
                                                             temperature)
    if name == "ce":
        return lambda f, y: torch.nn.functional.cross_entropy(f, y)
    raise ValueError(f"unknown loss {name!r}; choose one of {LOSSES}")
