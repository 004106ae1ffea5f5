"""Projected gradient descent on the cross-entropy, batched, seeded and early-stopping."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import check_finite, check_norm, generator, steepest
from .base import Attack, is_adversarial, project


class PGD(Attack):
    """Projected gradient descent (Madry et al., 2018) on the cross-entropy ℓ.

    From a start drawn uniformly in the ε-ball, ``steps`` iterations of

        x ← Π(x + σ·α·g),   g = ∇ₓℓ / ‖∇ₓℓ‖₂ (L2)  or  sign ∇ₓℓ (L∞),   α = rel_stepsize·ε,

    with σ = +1 on ℓ(f(x), y) (untargeted) or σ = −1 on ℓ(f(x), t) (targeted), and Π the
    projection onto the ε-ball and the [0, 1] box (:func:`~attacks.base.project`).
    ``rel_stepsize`` defaults to Madry et al.'s 2.5 / steps (a path of 2.5·ε; 0.25 at the
    default 10 steps) for both norms: foolbox's L∞ 0.01 / 0.3 is meant for 40+ steps and at
    10 steps cannot travel more than ε / 3 from the start. With ``restarts > 1`` each point
    keeps the first restart that fools the model (or the last one).

    Faster, never weaker: a point stops moving as soon as it is adversarial (that iterate is
    kept); ε are attacked in increasing order and a point fooled at a smaller ε keeps its
    adversarial, which is also in every larger ball. Random starts are drawn for the whole
    batch from a generator seeded with ``seed`` and then indexed, so a point's result does not
    depend on which other points are skipped.
    """

    def __init__(
        self,
        *,
        norm: str = "l2",
        steps: int = 10,
        restarts: int = 1,
        rel_stepsize: float | None = None,
        random_start: bool = True,
        seed: int | None = None,
    ):
        if steps < 1 or restarts < 1:
            raise ValueError(f"steps and restarts must be >= 1, got {steps} and {restarts}")
        if restarts > 1 and not random_start:
            raise ValueError("restarts > 1 repeat the same attack unless random_start=True")
        rel_stepsize = 2.5 / steps if rel_stepsize is None else rel_stepsize
        if not rel_stepsize > 0:
            raise ValueError(f"rel_stepsize must be > 0, got {rel_stepsize}")
        self.norm = check_norm(norm)
        self.steps = steps
        self.restarts = restarts
        self.rel_stepsize = rel_stepsize
        self.random_start = random_start
        self.seed = seed

    def run(
        self,
        model: nn.Module,
        x: Tensor,
        labels: Tensor,
        epsilons: list[float],
        target: Tensor | None,
        active: Tensor,
    ) -> list[Tensor]:
        check_finite(epsilons, "PGD")
        gen = generator(self.seed, x.device)
        index = active.nonzero().squeeze(1)
        x0, y = x[index], labels[index]
        t = None if target is None else target[index]
        best, fooled = x0.clone(), torch.zeros(len(index), dtype=torch.bool, device=x.device)
        out: list[Tensor] = [x] * len(epsilons)
        for k in sorted(range(len(epsilons)), key=epsilons.__getitem__):
            eps = epsilons[k]
            for _ in range(self.restarts):
                todo = ~fooled
                start = x0[todo]
                if self.random_start:  # drawn for the whole batch, then indexed
                    start = start + eps * self._uniform_ball(x.shape, gen)[index][todo]
                if not todo.any():
                    continue
                best[todo], fooled[todo] = self._ascend(
                    model, x0[todo], project(x0[todo], start, eps, self.norm),
                    y[todo], None if t is None else t[todo], eps,
                )
            out[k] = x.index_put((index,), best)
        return out

    def _ascend(
        self, model: nn.Module, x0: Tensor, x: Tensor, y: Tensor, t: Tensor | None, eps: float
    ) -> tuple[Tensor, Tensor]:
        """``steps`` PGD iterations from ``x``; a point stops once fooled. Returns (x, fooled)."""
        sign, classes = (1.0, y) if t is None else (-1.0, t)
        step = self.rel_stepsize * eps
        fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        alive = torch.arange(len(x), device=x.device)
        for i in range(self.steps + 1):
            xa = x[alive].requires_grad_(i < self.steps)
            with torch.set_grad_enabled(i < self.steps):
                logits = model(xa)
            hit = is_adversarial(logits, y[alive], None if t is None else t[alive])
            fooled[alive[hit]] = True
            if i == self.steps or hit.all():
                break
            loss = F.cross_entropy(logits, classes[alive], reduction="sum")
            (grad,) = torch.autograd.grad(loss, xa)
            alive, xa, grad = alive[~hit], xa.detach()[~hit], grad[~hit]
            x[alive] = project(x0[alive], xa + sign * step * steepest(grad, self.norm), eps, self.norm)
        return x, fooled

    def _uniform_ball(self, shape: torch.Size, gen: torch.Generator) -> Tensor:
        """Uniform samples in the unit ball; L2 by dropping 2 coordinates of a uniform point
        on the sphere S^{d+1} (Voelker et al., 2017), as foolbox does."""
        device = gen.device
        if self.norm == "linf":
            return 2 * torch.rand(shape, generator=gen, device=device) - 1
        d = math.prod(shape[1:])
        z = torch.randn(shape[0], d + 2, generator=gen, device=device)
        return (z / z.norm(dim=1, keepdim=True))[:, :d].reshape(shape)
