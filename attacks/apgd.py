"""Auto-PGD (Croce & Hein, 2020): PGD with momentum and a step size that adapts itself."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import check_finite, check_norm, generator, ranked_targets, runner_up, sphere, steepest
from .base import Attack, is_adversarial, project

#: Losses APGD maximises.
LOSSES = ("ce", "dlr")


def dlr_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Difference of logits ratio, ``−(z_y − max_{i≠y} z_i) / (z_π1 − z_π3 + 1e-12)`` with π
    sorting the logits in decreasing order: invariant to shifting and scaling the logits."""
    top = logits.topk(3, dim=1).values
    z_y = logits.gather(1, labels[:, None]).squeeze(1)
    return -(z_y - runner_up(logits, labels)) / (top[:, 0] - top[:, 2] + 1e-12)


def targeted_dlr_loss(logits: Tensor, labels: Tensor, target: Tensor) -> Tensor:
    """Targeted DLR, ``−(z_y − z_t) / (z_π1 − (z_π3 + z_π4)/2 + 1e-12)``."""
    top = logits.topk(4, dim=1).values
    z_y = logits.gather(1, labels[:, None]).squeeze(1)
    z_t = logits.gather(1, target[:, None]).squeeze(1)
    return -(z_y - z_t) / (top[:, 0] - (top[:, 2] + top[:, 3]) / 2 + 1e-12)


def checkpoints(steps: int) -> list[int]:
    """APGD's checkpoints ``w_j = ⌈p_j N⌉``, ``p_0 = 0``, ``p_1 = 0.22``,
    ``p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06)``, below ``N`` (in hundredths, exactly)."""
    p_prev, p, out = 0, 22, []
    while True:
        w = -(-p * steps // 100)
        if w >= steps + 1 or p > 100:
            break
        if not out or w > out[-1]:
            out.append(w)
        p_prev, p = p, p + max(p - p_prev - 3, 6)
    return [w for w in out if w <= steps]


class APGD(Attack):
    """Auto-PGD (Croce & Hein, ICML 2020), untargeted or targeted, on the CE or DLR loss ℓ.

    From a random point at distance ε (clipped to the box), ``steps`` = N iterations of

        z = Π(x_k + η·u(∇ℓ(x_k))),   u(g) = g / ‖g‖₂ (L2) or sign g (L∞),
        x_{k+1} = Π(x_k + α(z − x_k) + (1 − α)(x_k − x_{k−1})),   α = 0.75 (1 at the first step),

    with Π :func:`~attacks.base.project` and η = 2ε at the start. At each checkpoint
    w_j = ⌈p_j N⌉ (:func:`checkpoints`) a point halves its step and restarts from its best
    point when at most ρ of its steps since the last checkpoint raised ℓ, or when neither its
    step nor its best loss changed since then.

    ℓ is ``loss="ce"`` (cross-entropy of the label) or ``"dlr"`` (:func:`dlr_loss`). With
    ``targets`` = k > 0 (APGD-T: ``loss="dlr", targets=9``) the attack runs once for each
    of the k classes ranked 2nd to (k+1)-th on the clean input, maximising
    :func:`targeted_dlr_loss` (or −CE of that class), and a point falls if any run
    misclassifies it. An explicit ``target`` in the call replaces those runs by one towards it,
    on −CE(t) or ``−(max_{i≠t} z_i − z_t) / (z_π1 − (z_π3 + z_π4)/2)``.

    Faster, never weaker: a point stops as soon as it is adversarial (the iterate is kept) and
    only points still standing enter the next target, restart and ε; ε are attacked in
    increasing order and an adversarial found at a smaller ε is kept for the larger ones.
    Starts are drawn for the whole batch from ``seed`` and then indexed, so a point's result
    does not depend on which other points are skipped.
    """

    def __init__(
        self,
        *,
        norm: str = "l2",
        loss: str = "ce",
        targets: int = 0,
        steps: int = 100,
        restarts: int = 1,
        rho: float = 0.75,
        seed: int | None = 0,
    ):
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if steps < 1 or restarts < 1 or targets < 0:
            raise ValueError(f"steps and restarts must be >= 1 and targets >= 0, got {steps}, "
                             f"{restarts} and {targets}")
        if not 0 < rho < 1:
            raise ValueError(f"rho must lie in (0, 1), got {rho}")
        self.norm = check_norm(norm)
        self.loss = loss
        self.targets = targets
        self.steps = steps
        self.restarts = restarts
        self.rho = rho
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
        check_finite(epsilons, "APGD")
        gen = generator(self.seed, x.device)
        index = active.nonzero().squeeze(1)
        x0, y = x[index], labels[index]
        goal = None if target is None else target[index]
        if goal is not None:
            aims = [goal]
        elif self.targets:
            with torch.no_grad():
                clean = model(x0)
            if self.loss == "dlr" and clean.shape[1] < 4:
                raise ValueError("the targeted DLR loss needs at least 4 classes")
            aims = ranked_targets(clean, self.targets)
        else:
            aims = [None]
        best, fooled = x0.clone(), torch.zeros(len(index), dtype=torch.bool, device=x.device)
        out: list[Tensor] = [x] * len(epsilons)
        for k in sorted(range(len(epsilons)), key=epsilons.__getitem__):
            eps = epsilons[k]
            for aim in aims:
                for _ in range(self.restarts):
                    start = sphere(x.shape, self.norm, gen)[index]  # whole batch, then indexed
                    todo = (~fooled).nonzero().squeeze(1)
                    if eps <= 0 or not len(todo):
                        continue
                    found, hit = self._ascend(
                        model, x0[todo], project(x0[todo], x0[todo] + eps * start[todo], eps,
                                                 self.norm),
                        y[todo], None if aim is None else aim[todo],
                        None if goal is None else goal[todo], eps)
                    best[todo], fooled[todo] = found, hit
            out[k] = x.index_put((index,), best)
        return out

    def _loss(self, logits: Tensor, y: Tensor, aim: Tensor | None, explicit: bool) -> Tensor:
        """Per-sample loss to maximise (see the class docstring)."""
        if aim is None:
            return F.cross_entropy(logits, y, reduction="none") if self.loss == "ce" \
                else dlr_loss(logits, y)
        if self.loss == "ce":
            return -F.cross_entropy(logits, aim, reduction="none")
        if explicit:  # reach t: the strongest other class plays the label's part
            return targeted_dlr_loss(logits, _runner_up_class(logits, aim), aim)
        return targeted_dlr_loss(logits, y, aim)

    def _ascend(self, model: nn.Module, x0: Tensor, x: Tensor, y: Tensor, aim: Tensor | None,
                goal: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
        """N APGD iterations from ``x``; returns (adversarial or best-loss point, fooled)."""
        n, explicit = len(x0), goal is not None
        shape = (-1, *[1] * (x0.dim() - 1))

        def evaluate(xs: Tensor, ys: Tensor, aims: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
            xs = xs.detach().requires_grad_(True)
            with torch.enable_grad():
                logits = model(xs)
                loss = self._loss(logits, ys, aims, explicit)
                (grad,) = torch.autograd.grad(loss.sum(), xs)
            return logits.detach(), loss.detach(), grad

        out = x.clone()
        fooled = torch.zeros(n, dtype=torch.bool, device=x.device)
        alive = torch.arange(n, device=x.device)
        logits, loss, grad = evaluate(x, y, aim)
        hit = is_adversarial(logits, y, goal)
        out[hit], fooled[hit] = x[hit], True
        # per-point state of the points still alive, compacted as points fall
        state = {
            "x": x, "prev": x.clone(), "grad": grad, "loss": loss,
            "best": x.clone(), "best_loss": loss.clone(), "best_grad": grad.clone(),
            "step": torch.full((n,), 2 * eps, dtype=x.dtype, device=x.device),
            "ups": torch.zeros(n, device=x.device),
            "check_loss": loss.clone(), "reduced": torch.ones(n, dtype=torch.bool, device=x.device),
        }
        marks, last_mark = checkpoints(self.steps), 0
        for i in range(self.steps + 1):
            if not hit.all() and hit.any():  # fallen points leave the batch
                alive, state = alive[~hit], {key: value[~hit] for key, value in state.items()}
            if hit.all() or i == self.steps:
                break
            s = state
            a = 1.0 if i == 0 else 0.75
            z = project(x0[alive], s["x"] + s["step"].view(shape) * steepest(s["grad"], self.norm),
                        eps, self.norm)
            new = project(x0[alive], s["x"] + a * (z - s["x"]) + (1 - a) * (s["x"] - s["prev"]),
                          eps, self.norm)
            s["prev"], s["x"] = s["x"], new
            logits, loss, s["grad"] = evaluate(new, y[alive], None if aim is None else aim[alive])
            s["ups"] += (loss > s["loss"]).float()
            s["loss"] = loss
            better = loss > s["best_loss"]
            s["best"][better], s["best_loss"][better] = new[better], loss[better]
            s["best_grad"][better] = s["grad"][better]
            hit = is_adversarial(logits, y[alive], None if goal is None else goal[alive])
            out[alive[hit]], fooled[alive[hit]] = new[hit], True
            if i + 1 in marks:  # checkpoint: halve the step and restart from the best point
                span, last_mark = i + 1 - last_mark, i + 1
                stuck = ~s["reduced"] & (s["best_loss"] <= s["check_loss"])
                halve = (s["ups"] <= self.rho * span) | stuck
                s["step"][halve] /= 2
                s["x"][halve] = s["best"][halve]
                s["prev"][halve] = s["best"][halve]  # no momentum across a restart
                s["grad"][halve] = s["best_grad"][halve]
                s["loss"][halve] = s["best_loss"][halve]
                s["reduced"], s["check_loss"] = halve, s["best_loss"].clone()
                s["ups"].zero_()
        if not hit.all():  # points never fooled return their best-loss point
            out[alive] = state["best"]
        return out, fooled


def _runner_up_class(logits: Tensor, exclude: Tensor) -> Tensor:
    """``argmax_{i ≠ exclude} z_i`` per row."""
    return logits.scatter(1, exclude[:, None], -math.inf).argmax(dim=1)
