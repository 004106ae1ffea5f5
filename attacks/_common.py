"""Small pieces the AutoAttack family shares: norms, directions, seeded draws, margins."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import NORMS, per_sample


def check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    return norm


def check_finite(epsilons: list[float], name: str) -> None:
    if not math.isfinite(max(epsilons)):
        raise ValueError(f"{name} needs finite epsilons")


def lp_norm(delta: Tensor, norm: str) -> Tensor:
    """Per-sample ‖δ‖₂ or ‖δ‖∞, shape ``(N,)``."""
    flat = delta.flatten(1)
    return flat.norm(dim=1) if norm == "l2" else flat.abs().amax(dim=1)


def unit(v: Tensor, norm: str) -> Tensor:
    """``v / ‖v‖`` per sample (the 1e-12 keeps a zero vector at zero)."""
    return v / per_sample(lp_norm(v, norm) + 1e-12, v)


def steepest(grad: Tensor, norm: str) -> Tensor:
    """Steepest-ascent direction of unit norm: ``g / ‖g‖₂`` (L2) or ``sign g`` (L∞)."""
    return grad.sign() if norm == "linf" else unit(grad, "l2")


def generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A generator on ``device``, seeded with ``seed`` (fresh entropy if None)."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def sphere(shape: torch.Size, norm: str, gen: torch.Generator) -> Tensor:
    """Random points of norm 1: uniform on the L2 sphere, or ``u / ‖u‖∞`` with ``u`` uniform in
    the cube (a random point on the L∞ sphere, as APGD and FAB draw their starts)."""
    if norm == "l2":
        return unit(torch.randn(shape, generator=gen, device=gen.device), "l2")
    return unit(2 * torch.rand(shape, generator=gen, device=gen.device) - 1, "linf")


def runner_up(logits: Tensor, exclude: Tensor) -> Tensor:
    """``max_{i ≠ exclude} z_i`` per row."""
    return logits.scatter(1, exclude[:, None], -math.inf).amax(dim=1)


def margin(logits: Tensor, labels: Tensor, target: Tensor | None) -> Tensor:
    """Distance to the criterion in logit space, ≤ 0 once it is met (ties aside):
    ``z_y − max_{i≠y} z_i`` (untargeted) or ``max_{i≠t} z_i − z_t`` (targeted)."""
    if target is None:
        return logits.gather(1, labels[:, None]).squeeze(1) - runner_up(logits, labels)
    return runner_up(logits, target) - logits.gather(1, target[:, None]).squeeze(1)


def ranked_targets(logits: Tensor, count: int) -> list[Tensor]:
    """The classes ranked 2nd, 3rd, …, (count+1)-th by ``logits``: the top-``count`` targets of
    APGD-T and FAB-T for points the model classifies correctly (rank 1 is then the label)."""
    order = logits.argsort(dim=1, descending=True)
    return [order[:, rank] for rank in range(1, min(count, logits.shape[1] - 1) + 1)]
