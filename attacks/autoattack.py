"""AutoAttack (Croce & Hein, 2020): APGD-CE, APGD-T, FAB-T and Square, worst case per point."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._common import check_finite, check_norm
from .apgd import APGD
from .base import Attack, is_adversarial, project
from .fab import FAB
from .square import Square

#: The attacks each version runs, in order.
VERSIONS = {"standard": ("apgd-ce", "apgd-t", "fab-t", "square"), "fast": ("apgd-ce", "apgd-t")}


@dataclass
class AutoAttackResult:
    """What :meth:`AutoAttack.evaluate` found.

    ``raw``, ``clipped`` and ``success`` are the :class:`~attacks.base.Attack` contract.
    ``broken_by[k, i]`` is the position in ``names`` of the attack that broke point i at
    ``epsilons[k]``, or −1 when none did (the point stood, was skipped, or was misclassified
    already: then ``success`` tells which).
    """

    raw: list[Tensor]
    clipped: list[Tensor]
    success: Tensor
    broken_by: Tensor
    names: tuple[str, ...]

    def robust_after(self) -> Tensor:
        """``(len(names), len(epsilons), N)`` bool: point i is still robust at ``epsilons[k]``
        after the attacks ``names[: j + 1]`` ran (the last row is ``~success``)."""
        already_wrong = self.success & (self.broken_by < 0)
        return torch.stack([~already_wrong & ~((self.broken_by >= 0) & (self.broken_by <= j))
                            for j in range(len(self.names))])


class AutoAttack(Attack):
    """AutoAttack (Croce & Hein, ICML 2020): a point is robust only if it survives every attack.

    ``version="standard"`` runs :class:`~attacks.apgd.APGD` on the cross-entropy (APGD-CE),
    APGD on the targeted DLR loss over the 9 runner-up classes (APGD-T), targeted
    :class:`~attacks.fab.FAB` over the same classes (FAB-T) and :class:`~attacks.square.Square`
    (5,000 queries), each on the points that the attacks before it left standing;
    ``"fast"`` runs APGD-CE and APGD-T only. ``steps`` (APGD, FAB), ``targets`` and
    ``queries`` default to the paper's values. Untargeted only.

    The worst case is taken per point: point i falls at ε if any attack finds an adversarial
    for it within the ε-ball; :meth:`evaluate` also says which one. ε are attacked in increasing
    order; a point broken at a smaller ε keeps its adversarial for the larger ones, so each
    attack at each ε only sees points that are still standing there (and not skipped).
    """

    def __init__(
        self,
        *,
        norm: str = "l2",
        version: str = "standard",
        steps: int = 100,
        targets: int = 9,
        queries: int = 5000,
        seed: int | None = 0,
    ):
        if version not in VERSIONS:
            raise ValueError(f"version must be one of {tuple(VERSIONS)}, got {version!r}")
        self.norm = check_norm(norm)
        self.version = version
        self.steps = steps
        self.targets = targets
        self.queries = queries
        self.seed = seed
        every = {
            "apgd-ce": lambda: APGD(norm=norm, loss="ce", steps=steps, seed=seed),
            "apgd-t": lambda: APGD(norm=norm, loss="dlr", targets=targets, steps=steps, seed=seed),
            "fab-t": lambda: FAB(norm=norm, targets=targets, steps=steps, seed=seed),
            "square": lambda: Square(norm=norm, queries=queries, seed=seed),
        }
        self.attacks: dict[str, Attack] = {name: every[name]() for name in VERSIONS[version]}
        self._broken_by: Tensor | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.attacks)

    def __repr__(self) -> str:
        return (f"AutoAttack(norm={self.norm!r}, version={self.version!r}, steps={self.steps}, "
                f"targets={self.targets}, queries={self.queries}, seed={self.seed!r})")

    def evaluate(
        self,
        model: nn.Module,
        inputs: Tensor,
        labels: Tensor,
        *,
        epsilons: Sequence[float],
        skip: Tensor | None = None,
    ) -> AutoAttackResult:
        """Run the attack (as ``self(model, inputs, labels, epsilons=..., skip=...)``) and say
        which attack broke each point."""
        self._broken_by = None
        raw, clipped, success = self(model, inputs, labels, epsilons=epsilons, skip=skip)
        broken_by = self._broken_by
        self._broken_by = None
        if broken_by is None:  # nothing was attacked
            broken_by = torch.full(success.shape, -1, dtype=torch.long, device=success.device)
        broken_by = torch.where(success, broken_by, -1)  # the base class's check is the verdict
        return AutoAttackResult(raw, clipped, success, broken_by, self.names)

    def run(
        self,
        model: nn.Module,
        x: Tensor,
        labels: Tensor,
        epsilons: list[float],
        target: Tensor | None,
        active: Tensor,
    ) -> list[Tensor]:
        if target is not None:
            raise ValueError("AutoAttack is untargeted (APGD-T and FAB-T pick their own targets); "
                             "attack a target with apgd-t, fab-t or square instead")
        check_finite(epsilons, "AutoAttack")
        broken_by = torch.full((len(epsilons), len(x)), -1, dtype=torch.long, device=x.device)
        out = [x.clone() for _ in epsilons]
        previous = None
        for k in sorted(range(len(epsilons)), key=epsilons.__getitem__):
            eps = epsilons[k]
            if previous is not None:  # the smaller ball's adversarials lie in this one
                carried = broken_by[previous] >= 0
                broken_by[k, carried] = broken_by[previous, carried]
                out[k][carried] = out[previous][carried]
            previous = k
            if eps <= 0:
                continue
            for j, attack in enumerate(self.attacks.values()):
                todo = active & (broken_by[k] < 0)
                if not todo.any():
                    break
                (adversarial,) = attack.run(model, x, labels, [eps], None, todo)
                adversarial = project(x, adversarial.detach(), eps, self.norm)
                rows = todo.nonzero().squeeze(1)
                with torch.no_grad():
                    hit = is_adversarial(model(adversarial[rows]), labels[rows])
                rows = rows[hit]
                out[k][rows], broken_by[k, rows] = adversarial[rows], j
        self._broken_by = broken_by
        return out
