"""Any foolbox 3 attack behind the :class:`~attacks.base.Attack` contract."""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator
from contextlib import contextmanager

import foolbox as fb
import torch
from torch import Tensor, nn

from .base import Attack

_NORMS = {2: "l2", math.inf: "linf"}


def _foolbox_attack_classes() -> dict[str, type]:
    """Concrete attack classes exported by ``foolbox.attacks``, by name (aliases included)."""
    return {
        name: cls for name, cls in vars(fb.attacks).items()
        if isinstance(cls, type) and issubclass(cls, fb.attacks.base.Attack)
        and not inspect.isabstract(cls)
    }


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Parameters stop requiring gradients for a while: foolbox's ``loss.backward()`` would
    otherwise accumulate into their ``.grad`` (and spend time computing it)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class FoolboxAttack(Attack):
    """The foolbox attack ``foolbox.attacks.<name>(**kwargs)`` on ``foolbox.PyTorchModel(model,
    bounds=(0, 1))``, with ``Misclassification(labels)`` or ``TargetedMisclassification(target)``.

    Fixed-ε attacks (``L2PGD``, ``LinfPGD``, ...) are run for every ε. Minimisation attacks
    (``DDNAttack``, ``L2FMNAttack``, ``L2CarliniWagnerAttack``, ``L2DeepFoolAttack``, ...) ignore
    ε during the search: they run once with ``epsilons=None`` and their adversarial is then
    projected onto each ε-ball by the base class. Only L2 and L∞ attacks are supported.
    """

    def __init__(self, name: str, **kwargs):
        classes = _foolbox_attack_classes()
        if name not in classes:
            raise ValueError(f"unknown foolbox attack {name!r}; valid names include L2PGD, "
                             "LinfPGD, DDNAttack, L2FMNAttack, L2CarliniWagnerAttack, "
                             "L2DeepFoolAttack (any attack class in foolbox.attacks)")
        self.name = name
        try:
            self.attack = classes[name](**kwargs)
        except TypeError as err:
            raise ValueError(f"foolbox's {name} does not take {', '.join(sorted(kwargs))} "
                             f"({err})") from None
        #: Iterations, where the foolbox attack has them (its own default unless given).
        self.steps: int | None = getattr(self.attack, "steps", None)
        p = getattr(getattr(self.attack, "distance", None), "p", None)
        if p not in _NORMS:
            raise ValueError(f"{name} measures perturbations in L{p}; only L2 and L∞ are supported")
        self.norm = _NORMS[p]

    def run(
        self,
        model: nn.Module,
        x: Tensor,
        labels: Tensor,
        epsilons: list[float],
        target: Tensor | None,
        active: Tensor,
    ) -> list[Tensor]:
        fmodel = fb.PyTorchModel(model, bounds=(0, 1), device=x.device)
        criterion = (fb.criteria.Misclassification(labels[active]) if target is None
                     else fb.criteria.TargetedMisclassification(target[active]))
        minimises = isinstance(self.attack, fb.attacks.base.MinimizationAttack)
        with _frozen(model):
            raws = self.attack(fmodel, x[active], criterion,
                               epsilons=None if minimises else epsilons)[0]
        raws = [raws] * len(epsilons) if minimises else raws
        return [x.index_put((active,), raw) for raw in raws]


def minimal_adversarial_distance(
    model: nn.Module, inputs: Tensor, labels: Tensor, attack: str = "DDNAttack", **kwargs
) -> Tensor:
    """Per-sample L2 size ``‖x̃ − x‖₂`` of the adversarial ``x̃`` that the foolbox minimisation
    attack ``attack`` (e.g. ``"DDNAttack"``, ``"L2FMNAttack"``) finds, checked to be
    misclassified; ``inf`` where it found none, ``0`` where the clean point is already wrong.

    This is an upper bound on the distance to the decision boundary (certified radii are
    lower bounds on it).
    """
    bridge = FoolboxAttack(attack, **kwargs)
    if bridge.norm != "l2" or not isinstance(bridge.attack, fb.attacks.base.MinimizationAttack):
        raise ValueError(f"{attack} is not an L2 minimisation attack (try DDNAttack, L2FMNAttack)")
    _, (adversarial,), (success,) = bridge(model, inputs, labels, epsilons=[math.inf])
    distance = (adversarial - inputs.detach()).flatten(1).norm(dim=1)
    return torch.where(success, distance, torch.full_like(distance, math.inf))
