"""The calling contract shared by every attack, and the one projection they all go through."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor, nn

#: Norms an attack may be measured in.
NORMS = ("l2", "linf")


def per_sample(values: Tensor, like: Tensor) -> Tensor:
    """View a per-sample vector of shape ``(N,)`` so it broadcasts against ``like`` ``(N, ...)``."""
    return values.view(-1, *[1] * (like.dim() - 1))


def project(x0: Tensor, x: Tensor, eps: float, norm: str) -> Tensor:
    """Map ``x`` into ``{x0 + δ : ‖δ‖ ≤ ε} ∩ [0, 1]^d``, sample by sample.

    First the ball, ``δ ← δ · min(1, ε / ‖δ‖₂)`` (L2) or ``δ ← clamp(δ, −ε, ε)`` (L∞), then the
    box, ``clamp(x0 + δ, 0, 1)``. As ``x0`` is in the box, the box clip only moves coordinates
    towards ``x0`` and cannot leave the ball, so the result lies in both sets (it is the exact
    Euclidean projection onto the intersection for L∞, the usual PGD one for L2).
    """
    delta = x - x0
    if norm == "l2":
        length = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        delta = delta * per_sample((eps / length).clamp(max=1.0), delta)
    elif norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    return (x0 + delta).clamp(0.0, 1.0)


def is_adversarial(logits: Tensor, labels: Tensor, target: Tensor | None = None) -> Tensor:
    """The criterion: ``argmax f(x) ≠ y`` (untargeted) or ``argmax f(x) = t`` (targeted)."""
    prediction = logits.argmax(dim=1)
    return prediction != labels if target is None else prediction == target


class Attack(ABC):
    """An attack with foolbox 3's calling contract, for classifiers returning logits on [0, 1].

    ``attack(model, inputs, labels, epsilons=[...])`` returns ``(raw, clipped, success)``:
    ``raw[k]`` is what the attack produced for ``epsilons[k]``, ``clipped[k]`` is
    :func:`project` of it onto the ε-ball around ``inputs`` and the [0, 1] box (always applied
    here, so no attack can skip it), and ``success[k, i]`` says that ``model`` meets the
    criterion (:func:`is_adversarial`) on ``clipped[k][i]``. ``success`` has shape
    ``(len(epsilons), N)``.

    Points are not attacked, and ``raw`` and ``clipped`` hold the clean input, when

    * ``skip[i]`` is True: then ``success[:, i]`` is the criterion on the clean input, i.e. for an
      untargeted attack "the model is already wrong on it" (a skipped point is never counted as
      broken by the attack);
    * the clean input already meets the criterion: ``success[:, i]`` is True.

    The model is used in whatever mode it is in; ``inputs`` are not modified. Subclasses set
    :attr:`norm` and implement :meth:`run`.
    """

    #: ``"l2"`` or ``"linf"``: the ball that :func:`project` enforces.
    norm: str

    def __call__(
        self,
        model: nn.Module,
        inputs: Tensor,
        labels: Tensor,
        *,
        epsilons: Sequence[float],
        skip: Tensor | None = None,
        target: Tensor | int | None = None,
    ) -> tuple[list[Tensor], list[Tensor], Tensor]:
        eps = [float(e) for e in epsilons]
        if not eps or any(math.isnan(e) or e < 0 for e in eps):
            raise ValueError(f"epsilons must be a non-empty sequence of values >= 0, got {eps}")
        x = inputs.detach()
        n = x.shape[0]
        if n and (x.min() < 0 or x.max() > 1):
            raise ValueError("inputs must lie in [0, 1]")
        labels = labels.to(x.device)
        if labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
        skip = torch.zeros(n, dtype=torch.bool, device=x.device) if skip is None else skip
        if skip.shape != (n,):
            raise ValueError(f"skip must be a bool mask of shape ({n},), got {tuple(skip.shape)}")
        if isinstance(target, int):
            target = torch.full((n,), target, dtype=labels.dtype, device=x.device)
        elif target is not None:
            target = target.to(x.device)

        with torch.no_grad():
            active = ~(skip.to(x.device, torch.bool) | is_adversarial(model(x), labels, target))
        if active.any():
            raw = [torch.where(per_sample(active, x), r.detach(), x) for r in
                   self.run(model, x, labels, eps, target, active)]
        else:
            raw = [x.clone() for _ in eps]
        clipped = [project(x, r, e, self.norm) for r, e in zip(raw, eps, strict=True)]
        with torch.no_grad():
            success = torch.stack([is_adversarial(model(c), labels, target) for c in clipped])
        return raw, clipped, success

    @abstractmethod
    def run(
        self,
        model: nn.Module,
        x: Tensor,
        labels: Tensor,
        epsilons: list[float],
        target: Tensor | None,
        active: Tensor,
    ) -> list[Tensor]:
        """Perturbed inputs, one full batch per ε, for the points where ``active`` is True.

        ``x`` is the whole clean batch (so that random draws can be made for all of it);
        rows where ``active`` is False are replaced by the clean input afterwards.
        """

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"
