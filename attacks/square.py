"""Square attack (Andriushchenko, Croce et al., 2020): random search, no gradients."""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor, nn

from ._common import check_finite, check_norm, margin
from .base import Attack, is_adversarial, per_sample

#: Iterations (out of 10,000, rescaled to the budget) after which p halves again.
_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def window_fraction(i: int, queries: int, p_init: float) -> float:
    """``p(i)``: the fraction of pixels a proposal changes at iteration i, ``p_init`` halved at
    iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 of a 10,000-query budget
    (rescaled to ``queries``)."""
    it = int(i / queries * 10000)
    return p_init / 2 ** sum(it > h for h in _HALVINGS)


def _tail_weights(rows: int, cols: int) -> Tensor:
    """``M[r, c] = Σ_{k ≥ max(|r − r₀|, |c − c₀|)} 1/(k + 1)²``: nested rectangles around the
    centre ``(r₀, c₀) = (rows // 2, cols // 2)``, each weighted 1/(k + 1)²."""
    levels = max(rows // 2 + 1, cols // 2 + 1)
    weights = 1.0 / torch.arange(1, levels + 1, dtype=torch.float64) ** 2
    tail = weights.flip(0).cumsum(0).flip(0)
    r = (torch.arange(rows) - rows // 2).abs()
    c = (torch.arange(cols) - cols // 2).abs()
    return tail[torch.maximum(r[:, None], c[None, :])]


@lru_cache(maxsize=64)
def l2_window(s: int) -> Tensor:
    """The L2 proposal shape η(s) (s × s, unit norm): positive rectangles on the top half,
    negative ones on the bottom half. Cached: do not modify the result."""
    top = _tail_weights(s // 2, s)
    bottom = _tail_weights(s - s // 2, s)
    shape = torch.cat([top / top.norm(), -bottom / bottom.norm()])
    return (shape / shape.norm()).float()


class Square(Attack):
    """Square attack (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020), L2 or L∞.

    A random search on the margin ``m(x) = z_y − max_{i≠y} z_i`` (targeted:
    ``max_{i≠t} z_i − z_t``): each of the ``queries`` model calls per point evaluates one
    proposal, kept if it lowers m, until the point is adversarial. A proposal changes one
    square window of side ``s = round(√(p(i)·h·w))`` at a random place (one per point), with
    ``p(i)`` = :func:`window_fraction`, ``p_init`` = 0.8:

    * L∞: the start is x₀ ± ε in vertical stripes (a random sign per column and channel); a
      proposal sets the window to x₀ ± ε, one random sign per channel.
    * L2 (s odd, ≥ 3): the start tiles the image with 5 × 5 blocks of :func:`l2_window`, random
      signs per block and channel, scaled to norm ε. A proposal moves the perturbation's mass in
      a second random window, and the budget ε² − ‖δ‖² left unused, into the first one with a
      fresh ``±l2_window(s)`` per channel (transposed at random), and rescales δ to norm ε.

    Every proposal is clipped to [0, 1]. Random draws are made for the whole batch at every
    iteration and then indexed, so a point's result does not depend on which other points are
    skipped or have already fallen. ε are attacked in increasing order; an adversarial found at
    a smaller ε is kept for the larger ones.
    """

    def __init__(
        self,
        *,
        norm: str = "l2",
        queries: int = 5000,
        p_init: float = 0.8,
        restarts: int = 1,
        seed: int | None = 0,
    ):
        if queries < 1 or restarts < 1:
            raise ValueError(f"queries and restarts must be >= 1, got {queries} and {restarts}")
        if not 0 < p_init <= 1:
            raise ValueError(f"p_init must lie in (0, 1], got {p_init}")
        self.norm = check_norm(norm)
        self.queries = queries
        self.p_init = p_init
        self.restarts = restarts
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
        check_finite(epsilons, "Square")
        if x.dim() != 4 or min(x.shape[2:]) < 2:
            raise ValueError(f"Square attacks images (N, C, H, W) of at least 2 × 2 pixels, got "
                             f"shape {tuple(x.shape)}")
        index = active.nonzero().squeeze(1)
        best, fooled = x[index].clone(), torch.zeros(len(index), dtype=torch.bool, device=x.device)
        out: list[Tensor] = [x] * len(epsilons)
        for stage, k in enumerate(sorted(range(len(epsilons)), key=epsilons.__getitem__)):
            for r in range(self.restarts):
                todo = (~fooled).nonzero().squeeze(1)
                if epsilons[k] > 0 and len(todo):
                    gen = torch.Generator(device=x.device)  # one stream per (ε, restart)
                    if self.seed is None:
                        gen.seed()
                    else:
                        gen.manual_seed(self.seed + 7919 * (stage * self.restarts + r))
                    found, hit = self._search(model, x, labels, target, index[todo],
                                              epsilons[k], gen)
                    best[todo[hit]], fooled[todo[hit]] = found[hit], True
            out[k] = x.index_put((index,), best)
        return out

    def _search(self, model: nn.Module, x: Tensor, labels: Tensor, target: Tensor | None,
                rows: Tensor, eps: float, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """Random search for the points ``rows`` of the batch; returns (points, fooled)."""
        n_all, c, h, w = x.shape
        x0, y = x[rows], labels[rows]
        goal = None if target is None else target[rows]
        device = x.device

        def draw(*shape: int) -> Tensor:  # uniform draws for the whole batch, then this run's rows
            return torch.rand(n_all, *shape, generator=gen, device=device)[rows]

        def sign(*shape: int) -> Tensor:
            return torch.where(draw(*shape) < 0.5, -1.0, 1.0).to(x.dtype)

        if self.norm == "linf":
            cand = (x0 + eps * sign(c, 1, w)).clamp(0, 1)
        else:
            cand = (x0 + eps * self._l2_start(draw, sign, x0)).clamp(0, 1)
        with torch.no_grad():
            logits = model(cand)
        best, loss = cand, margin(logits, y, goal)
        fooled = is_adversarial(logits, y, goal)
        found = best.clone()
        alive = (~fooled).nonzero().squeeze(1)
        best, loss = best[alive], loss[alive]
        ar_h, ar_w = torch.arange(h, device=device), torch.arange(w, device=device)
        for i in range(self.queries - 1):
            p = window_fraction(i, self.queries, self.p_init)
            s = max(int(round(math.sqrt(p * h * w))), 1)
            if self.norm == "l2":
                s = max(s, 3) + (max(s, 3) % 2 == 0)
            s = min(s, h, w)
            u = draw(4)  # window corners (two for L2)
            signs = sign(c)
            flip = draw(1)[:, 0] < 0.5
            if not len(alive):
                continue  # keep drawing: the stream must not depend on who fell
            u, signs, flip = u[alive], signs[alive], flip[alive]
            top = (u[:, 0] * (h - s + 1)).long().clamp(max=h - s)
            left = (u[:, 1] * (w - s + 1)).long().clamp(max=w - s)
            x0a = x0[alive]
            if self.norm == "linf":
                in_rows = (ar_h[None] >= top[:, None]) & (ar_h[None] < top[:, None] + s)
                in_cols = (ar_w[None] >= left[:, None]) & (ar_w[None] < left[:, None] + s)
                inside = in_rows[:, None, :, None] & in_cols[:, None, None, :]
                cand = torch.where(inside, (x0a + eps * signs[:, :, None, None]).clamp(0, 1), best)
            else:
                top2 = (u[:, 2] * (h - s + 1)).long().clamp(max=h - s)
                left2 = (u[:, 3] * (w - s + 1)).long().clamp(max=w - s)
                cand = self._l2_proposal(x0a, best, eps, s, top, left, top2, left2, signs, flip)
            with torch.no_grad():
                logits = model(cand)
            new_loss = margin(logits, y[alive], None if goal is None else goal[alive])
            hit = is_adversarial(logits, y[alive], None if goal is None else goal[alive])
            take = (new_loss < loss) | hit
            best = torch.where(per_sample(take, best), cand, best)
            loss = torch.where(take, new_loss, loss)
            if hit.any():
                found[alive[hit]], fooled[alive[hit]] = cand[hit], True
                alive, best, loss = alive[~hit], best[~hit], loss[~hit]
        return found, fooled

    @staticmethod
    def _l2_start(draw, sign, x0: Tensor) -> Tensor:
        """Unit-norm start: 5 × 5 blocks of ±η(s) (s = h // 5, at least 2), a sign per block and
        channel, each block's shape transposed at random."""
        n, c, h, w = x0.shape
        s = max(h // 5, 2)
        blocks_h, blocks_w = h // s, w // s
        shape = l2_window(s).to(x0)
        flip = draw(blocks_h, blocks_w) < 0.5
        pattern = torch.where(flip[..., None, None], shape.T, shape)          # (n, bh, bw, s, s)
        pattern = pattern[:, None] * sign(c, blocks_h, blocks_w)[..., None, None]
        tiles = pattern.permute(0, 1, 2, 4, 3, 5).reshape(n, c, blocks_h * s, blocks_w * s)
        delta = torch.zeros_like(x0)
        top, left = (h - blocks_h * s) // 2, (w - blocks_w * s) // 2
        delta[:, :, top:top + blocks_h * s, left:left + blocks_w * s] = tiles
        return delta / per_sample(delta.flatten(1).norm(dim=1).clamp_min(1e-12), delta)

    @staticmethod
    def _l2_proposal(x0: Tensor, best: Tensor, eps: float, s: int, top: Tensor, left: Tensor,
                     top2: Tensor, left2: Tensor, signs: Tensor, flip: Tensor) -> Tensor:
        """Move the mass of δ in windows W₁ ∪ W₂ (and the unused budget) into W₁, as a fresh
        ±η(s) per channel plus W₁'s old content, each channel scaled to
        √((ε² − ‖δ‖²)₊ / c + ‖δ_{W₁∪W₂}‖²); clear W₂; rescale δ to norm ε; clip to the box."""
        n, c, h, w = x0.shape
        delta = best - x0
        span = torch.arange(s, device=x0.device)
        rows, cols = (top[:, None] + span)[:, None, :, None], (left[:, None] + span)[:, None, None, :]
        rows2, cols2 = (top2[:, None] + span)[:, None, :, None], (left2[:, None] + span)[:, None, None, :]
        batch = torch.arange(n, device=x0.device)[:, None, None, None]
        chan = torch.arange(c, device=x0.device)[None, :, None, None]
        old = delta[batch, chan, rows, cols]                                  # (n, c, s, s)
        union = torch.zeros(n, 1, h, w, dtype=torch.bool, device=x0.device)
        union[batch[:, :1], 0, rows, cols] = True
        union[batch[:, :1], 0, rows2, cols2] = True
        mass = (delta * union).flatten(1).norm(dim=1)
        spare = (eps ** 2 - delta.flatten(1).pow(2).sum(dim=1)).clamp_min(0)
        shape = l2_window(s).to(x0)
        shape = torch.where(flip[:, None, None], shape.T, shape)[:, None]       # (n, 1, s, s)
        old_norm = old.flatten(2).norm(dim=2)[..., None, None]
        new = shape * signs[:, :, None, None] + old / (old_norm + 1e-12)
        new_norm = new.flatten(2).norm(dim=2)[..., None, None]
        scale = (spare / c + mass ** 2).sqrt()[:, None, None, None]
        delta = delta.clone()
        delta[batch, chan, rows2, cols2] = 0.0
        delta[batch, chan, rows, cols] = new / (new_norm + 1e-12) * scale
        length = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        return (x0 + eps * delta / per_sample(length, delta)).clamp(0, 1)
