"""Attacks by name, and robust accuracy over a data set."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .apgd import APGD
from .autoattack import AutoAttack
from .base import Attack
from .fab import FAB
from .foolbox_bridge import FoolboxAttack
from .pgd import PGD
from .square import Square

#: AutoAttack and its parts by name: the class and the keyword arguments the name fixes. Their
#: norm is a keyword (``norm="l2"`` by default, or ``"linf"``).
AUTOATTACK_SPECS = {
    "autoattack": (AutoAttack, {"version": "standard"}),
    "autoattack-fast": (AutoAttack, {"version": "fast"}),
    "apgd-ce": (APGD, {"loss": "ce"}),
    "apgd-dlr": (APGD, {"loss": "dlr"}),
    "apgd-t": (APGD, {"loss": "dlr", "targets": 9}),
    "fab-t": (FAB, {}),
    "square": (Square, {}),
}

#: Specs accepted by :func:`get_attack` (``NAME`` is any attack class in ``foolbox.attacks``).
SPECS = ("pgd-l2", "pgd-linf", *AUTOATTACK_SPECS, "foolbox:NAME")


def get_attack(spec: str, **kwargs) -> Attack:
    """The attack named ``spec`` (one of :data:`SPECS`), built with ``kwargs``,
    e.g. ``get_attack("pgd-linf", steps=20)``, ``get_attack("autoattack", norm="linf")`` or
    ``get_attack("foolbox:DDNAttack", steps=50)``. A ``norm`` that contradicts the spec's
    (``get_attack("pgd-l2", norm="linf")``) is an error.
    """
    norm = kwargs.pop("norm", None)
    if spec in AUTOATTACK_SPECS:
        cls, fixed = AUTOATTACK_SPECS[spec]
        return cls(norm="l2" if norm is None else norm, **fixed, **kwargs)
    if spec in ("pgd-l2", "pgd-linf"):
        attack: Attack = PGD(norm=spec.removeprefix("pgd-"), **kwargs)
    elif spec.startswith("foolbox:"):
        attack = FoolboxAttack(spec.removeprefix("foolbox:"), **kwargs)
    else:
        raise ValueError(f"unknown attack spec {spec!r}; valid: {', '.join(SPECS)} "
                         "(e.g. 'foolbox:DDNAttack')")
    if norm is not None and norm != attack.norm:
        raise ValueError(f"{spec} attacks in {attack.norm}, not {norm}")
    return attack


def robust_accuracy(
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    attack: Attack | str,
    epsilons: Sequence[float],
    *,
    skip: Tensor | None = None,
    batch_size: int = 256,
    progress: bool = False,
) -> dict:
    """Clean accuracy and, for each ε_k, robust accuracy ``(1/N) Σᵢ 1[no adversarial for xᵢ
    at ε_k]`` of ``model`` under the untargeted ``attack`` (an :class:`Attack` or a spec).

    Points in ``skip`` are not attacked and count as robust iff clean-correct. That is sound
    only for points proven robust (certified radius ≥ max ε); otherwise it overstates
    robustness. Batches are moved to the model's device. Returns ``{"n", "clean",
    "epsilons", "robust" (one accuracy per ε), "robust_mask" (bool, (len(epsilons), N))}``.
    """
    attack = get_attack(attack) if isinstance(attack, str) else attack
    n = len(inputs)
    if n == 0 or labels.shape != (n,):
        raise ValueError(f"need a non-empty batch and labels of shape ({n},)")
    device = next(iter(model.parameters()), inputs).device
    batches = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm  # only needed for the progress bar

        batches = tqdm(batches, desc=f"attack {attack!r}", unit="batch")
    correct = 0
    robust = torch.zeros(len(epsilons), n, dtype=torch.bool)
    for start in batches:
        part = slice(start, start + batch_size)
        x, y = inputs[part].to(device), labels[part].to(device)
        with torch.no_grad():
            correct += int((model(x).argmax(dim=1) == y).sum())
        _, _, success = attack(model, x, y, epsilons=epsilons,
                               skip=None if skip is None else skip[part].to(device))
        robust[:, part] = ~success.cpu()
    return {"n": n, "clean": correct / n, "epsilons": [float(e) for e in epsilons],
            "robust": robust.float().mean(dim=1).tolist(), "robust_mask": robust}
