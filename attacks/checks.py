"""Checks for the usual mistakes that make an attack evaluation meaningless (as auto-attack)."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .apgd import APGD
from .square import Square


class EvaluationWarning(UserWarning):
    """A robustness evaluation of this model is likely to be wrong."""


def check_evaluation(model: nn.Module, inputs: Tensor, labels: Tensor) -> list[str]:
    """Warnings (also emitted as :class:`EvaluationWarning`) about ``model`` on a small batch.

    Flags: a module in train mode; outputs that look like probabilities (all ≥ 0, rows sum
    to 1: attacks expect logits); points whose input gradient ∇ₓ CE(f(x), y) is identically
    zero or not finite (gradient attacks cannot move them); outputs that change between two
    identical forward passes (a randomised model needs EOT-style attacks). Runs the model
    as it is (a model in train mode may update its batch-norm statistics).
    """
    problems = []
    if any(module.training for module in model.modules()):
        problems.append("the model is in train mode (call model.eval()): dropout and batch "
                        "norm make predictions random or batch-dependent")
    x = inputs.detach().clone().requires_grad_()
    with torch.enable_grad():
        out = model(x)
        loss = F.cross_entropy(out, labels, reduction="sum")
        grad = torch.autograd.grad(loss, x, allow_unused=True)[0] if loss.requires_grad else None
    out = out.detach()
    if (out >= 0).all() and torch.allclose(out.sum(dim=1), torch.ones_like(out[:, 0]), atol=1e-4):
        problems.append("the outputs look like probabilities (non-negative, rows sum to 1): "
                        "attacks expect logits, remove the final softmax")
    flat = torch.zeros_like(x).flatten(1) if grad is None else grad.flatten(1)
    dead = (flat == 0).all(dim=1) | ~flat.isfinite().all(dim=1)
    if dead.any():
        problems.append(f"{int(dead.sum())} of {len(x)} points have a zero or non-finite input "
                        "gradient of the cross-entropy: gradient attacks cannot move them")
    with torch.no_grad():
        again = model(inputs)
    if not torch.allclose(out, again, rtol=1e-5, atol=1e-6, equal_nan=True):
        problems.append("two identical forward passes gave different outputs: the model is "
                        "randomised, attack it with expectation over transformation")
    for problem in problems:
        warnings.warn(problem, EvaluationWarning, stacklevel=2)
    return problems


def check_gradient_masking(
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    *,
    eps: float,
    norm: str = "l2",
    steps: int = 100,
    queries: int = 1000,
    seed: int | None = 0,
) -> list[str]:
    """A warning (also emitted as :class:`EvaluationWarning`) if the gradient-free
    :class:`~attacks.square.Square` (``queries`` queries) breaks points at ``eps`` that
    APGD-CE (``steps`` iterations) could not: on a model with honest gradients a white-box
    attack is the stronger one, so Square winning means the gradients are masked (flat,
    shattered or misleading) and a gradient-based robust accuracy overstates robustness, as
    AutoAttack's authors advise to check. Only the points APGD left standing are searched.
    Returns the list of warnings (empty or one).
    """
    _, _, apgd_success = APGD(norm=norm, steps=steps, seed=seed)(model, inputs, labels,
                                                                   epsilons=[eps])
    standing = ~apgd_success[0]
    if not standing.any():
        return []
    _, _, square_success = Square(norm=norm, queries=queries, seed=seed)(
        model, inputs, labels, epsilons=[eps], skip=~standing)
    extra = int((square_success[0] & standing).sum())
    if not extra:
        return []
    problem = (f"Square (no gradients) broke {extra} of the {int(standing.sum())} points that "
               f"APGD-CE could not at {norm} eps={eps:g}: the gradients look masked, so "
               "gradient-based robust accuracy overstates robustness")
    warnings.warn(problem, EvaluationWarning, stacklevel=2)
    return [problem]
