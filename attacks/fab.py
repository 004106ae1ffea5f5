"""Targeted FAB (Croce & Hein, 2020): minimum-norm adversarials by projections onto the
linearised decision boundary."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ._common import check_norm, generator, lp_norm, ranked_targets, runner_up, sphere
from .base import Attack, is_adversarial, per_sample


def project_on_hyperplane(p: Tensor, w: Tensor, b: Tensor, norm: str) -> Tensor:
    """The smallest step ``d`` (in ‖·‖₂ or ‖·‖∞) with ``⟨w, p + d⟩ = b`` and ``p + d ∈ [0, 1]``,
    row by row (``p``, ``w``: ``(N, D)``; ``b``: ``(N,)``).

    With ``c = b − ⟨w, p⟩`` (signs flipped so that ``c ≥ 0``) the solution is
    ``dᵢ = clip(λ vᵢ, −pᵢ, 1 − pᵢ)``, ``v = w`` (L2, the KKT point) or ``v = sign w`` (L∞: every
    coordinate moves by the same amount until the box stops it), for the λ ≥ 0 at which the
    non-decreasing, piecewise linear ``φ(λ) = Σ |wᵢ| min(λ|vᵢ|, roomᵢ)`` reaches ``c``
    (``roomᵢ`` = distance to the box face that ``vᵢ`` points to). φ is evaluated at its sorted
    breakpoints ``roomᵢ / |vᵢ|`` and λ found on the right segment. If the plane misses the box,
    every coordinate goes to its face (the closest the box comes to the plane).
    """
    if norm not in ("l2", "linf"):
        raise ValueError(f"norm must be 'l2' or 'linf', got {norm!r}")
    c = b - (w * p).sum(dim=1)
    flip = torch.where(c < 0, -1.0, 1.0).to(w.dtype)
    w, c = w * flip[:, None], c * flip
    v = w if norm == "l2" else w.sign()
    room = torch.where(v > 0, 1 - p, p)
    speed = v.abs()
    moving = speed > 0
    breaks = torch.where(moving, room / speed.clamp_min(1e-30), math.inf)
    breaks, order = breaks.sort(dim=1)
    slope = (w.abs() * speed).gather(1, order)         # dφ/dλ of each unsaturated coordinate
    full = (w.abs() * room).gather(1, order)           # its share of φ once saturated
    tail = slope.flip(1).cumsum(1).flip(1)             # slope of φ on the segment ending at k
    head = full.cumsum(1) - full                       # saturated share before breakpoint k
    finite = torch.isfinite(breaks)
    # φ at each breakpoint; past the last finite one φ stays at its maximum, the full saturation
    phi = torch.where(finite, breaks.nan_to_num(posinf=0.0) * tail + head, head)
    k = (phi < c[:, None]).sum(dim=1)                  # first breakpoint where φ ≥ c
    reach = k < phi.shape[1]
    k = k.clamp(max=phi.shape[1] - 1)
    seg_tail = tail.gather(1, k[:, None]).squeeze(1)
    seg_head = head.gather(1, k[:, None]).squeeze(1)
    lam = torch.where(seg_tail > 0, (c - seg_head) / seg_tail.clamp_min(1e-30), 0.0)
    last = torch.where(finite, breaks, 0.0).amax(dim=1)  # every coordinate saturated
    lam = torch.where(reach, lam, last).clamp_min(0.0)
    return torch.minimum(torch.maximum(lam[:, None] * v, -p), 1 - p) * moving


class FAB(Attack):
    """Targeted FAB (FAB-T; Croce & Hein, ICML 2020): a minimum-norm attack.

    For each target class t (the ``targets`` classes ranked 2nd, 3rd, … on the clean input,
    AutoAttack's FAB-T) and ``g(x) = z_t(x) − z_y(x)``, ``steps`` iterations of

        d₁ = projection of x_k onto {x : g(x_k) + ⟨∇g(x_k), x − x_k⟩ = 0} ∩ [0, 1]^d,
        d₂ = the same projection of the clean point x₀,
        α = min(‖d₁‖ / (‖d₁‖ + ‖d₂‖), α_max),
        x_{k+1} = clip((1 − α)(x_k + η d₁) + α(x₀ + η d₂), 0, 1)

    (:func:`project_on_hyperplane`): a step to the linearised boundary, extrapolated by η
    and biased towards the clean point. Once x_{k+1} is misclassified it is kept if it is the
    smallest adversarial so far and replaced by ``x₀ + β(x_{k+1} − x₀)`` (the backward step).
    Restarts after the first start from ``x₀ + min(‖best‖, ε)/2 · u``, u a random unit vector.

    The search ignores ε: the smallest adversarial is returned once for every ε and the base
    class projects it onto each ε-ball, so success at ε means "found one of norm ≤ ε". A point
    stops once its smallest adversarial is within the smallest positive ε (nothing more can
    change at any ε asked for), and only the others go on to the next target. An explicit
    ``target`` in the call replaces the ranked targets by one, with ``g = z_t − max_{i≠t} z_i``
    and success meaning "classified as t".
    """

    def __init__(
        self,
        *,
        norm: str = "l2",
        targets: int = 9,
        steps: int = 100,
        restarts: int = 1,
        alpha_max: float = 0.1,
        eta: float = 1.05,
        beta: float = 0.9,
        seed: int | None = 0,
    ):
        if steps < 1 or restarts < 1 or targets < 1:
            raise ValueError(f"steps, restarts and targets must be >= 1, got {steps}, "
                             f"{restarts} and {targets}")
        if not (0 <= alpha_max <= 1 and eta >= 1 and 0 < beta < 1):
            raise ValueError(f"need 0 <= alpha_max <= 1, eta >= 1 and 0 < beta < 1, got "
                             f"{alpha_max}, {eta} and {beta}")
        self.norm = check_norm(norm)
        self.targets = targets
        self.steps = steps
        self.restarts = restarts
        self.alpha_max = alpha_max
        self.eta = eta
        self.beta = beta
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
        gen = generator(self.seed, x.device)
        index = active.nonzero().squeeze(1)
        x0, y = x[index], labels[index]
        goal = None if target is None else target[index]
        positive = [e for e in epsilons if e > 0]
        if not positive:
            return [x] * len(epsilons)
        enough, widest = min(positive), max(positive)
        if goal is not None:
            aims = [goal]
        else:
            with torch.no_grad():
                aims = ranked_targets(model(x0), self.targets)
        best = x0.clone()
        size = torch.full((len(index),), math.inf, dtype=x.dtype, device=x.device)
        for aim in aims:
            for r in range(self.restarts):
                noise = sphere(x.shape, self.norm, gen)[index] if r else None
                todo = (size > enough).nonzero().squeeze(1)
                if not len(todo):
                    continue
                start = x0[todo]
                if noise is not None:
                    radius = size[todo].clamp(max=widest) / 2
                    start = (start + per_sample(radius, start) * noise[todo]).clamp(0, 1)
                best[todo], size[todo] = self._descend(
                    model, x0[todo], start, y[todo], aim[todo],
                    None if goal is None else goal[todo], best[todo], size[todo], enough)
        return [x.index_put((index,), best)] * len(epsilons)

    def _descend(self, model: nn.Module, x0: Tensor, x1: Tensor, y: Tensor, aim: Tensor,
                 goal: Tensor | None, best: Tensor, size: Tensor, enough: float
                 ) -> tuple[Tensor, Tensor]:
        """FAB iterations from ``x1``; updates (smallest adversarial, its norm) per point."""
        best, size = best.clone(), size.clone()
        n = len(x0)
        alive = torch.arange(n, device=x0.device)

        def linearise(xs: Tensor, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            """Logits, g and ∇g at ``xs`` (the points ``rows``)."""
            xs = xs.detach().requires_grad_(True)
            with torch.enable_grad():
                logits = model(xs)
                z_t = logits.gather(1, aim[rows, None]).squeeze(1)
                other = (runner_up(logits, aim[rows]) if goal is not None
                         else logits.gather(1, y[rows, None]).squeeze(1))
                g = z_t - other
                (grad,) = torch.autograd.grad(g.sum(), xs)
            return logits.detach(), g.detach(), grad

        for _ in range(self.steps):
            _, g, grad = linearise(x1, alive)
            m = len(alive)
            flat_w = grad.flatten(1)
            b = (flat_w * x1.flatten(1)).sum(dim=1) - g
            d = project_on_hyperplane(torch.cat([x1.flatten(1), x0[alive].flatten(1)]),
                                      torch.cat([flat_w, flat_w]), torch.cat([b, b]), self.norm)
            d = d.view(2 * m, *x1.shape[1:])
            d1, d2 = d[:m], d[m:]
            a1 = lp_norm(d1, self.norm).clamp_min(1e-8)
            a2 = lp_norm(d2, self.norm).clamp_min(1e-8)
            alpha = per_sample((a1 / (a1 + a2)).clamp(0, self.alpha_max), x1)
            x1 = ((1 - alpha) * (x1 + self.eta * d1) + alpha * (x0[alive] + self.eta * d2))
            x1 = x1.clamp(0, 1)
            with torch.no_grad():
                logits = model(x1)
            hit = is_adversarial(logits, y[alive], None if goal is None else goal[alive])
            if hit.any():
                rows = alive[hit]
                found = lp_norm(x1[hit] - x0[rows], self.norm)
                smaller = found < size[rows]
                best[rows[smaller]] = x1[hit][smaller]
                size[rows[smaller]] = found[smaller]
                x1[hit] = x0[rows] + self.beta * (x1[hit] - x0[rows])  # backward step
            done = size[alive] <= enough
            if done.any():
                alive, x1 = alive[~done], x1[~done]
            if not len(alive):
                break
        return best, size
