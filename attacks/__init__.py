"""Adversarial attacks with one calling contract, for any classifier returning logits on [0, 1].

``attack(model, inputs, labels, epsilons=[...], skip=None, target=None) -> (raw, clipped,
success)`` as in foolbox 3; the projection onto the ε-ball and the [0, 1] box is done once,
in :class:`Attack`. :class:`PGD` is our batched, seeded, early-stopping L2/L∞ PGD;
:class:`APGD`, :class:`FAB` (targeted), :class:`Square` and :class:`AutoAttack` (their
composition, worst case per point) are AutoAttack's attacks (Croce & Hein, 2020);
:class:`FoolboxAttack` runs any foolbox attack by name; :func:`robust_accuracy` evaluates a
data set (skipping certified points); :func:`check_evaluation` warns about evaluation mistakes
and :func:`check_gradient_masking` compares Square with APGD.
Depends on torch and foolbox only.
"""

from .apgd import APGD
from .autoattack import AutoAttack, AutoAttackResult
from .base import Attack, is_adversarial, project
from .checks import EvaluationWarning, check_evaluation, check_gradient_masking
from .fab import FAB
from .foolbox_bridge import FoolboxAttack, minimal_adversarial_distance
from .pgd import PGD
from .registry import SPECS, get_attack, robust_accuracy
from .square import Square

__all__ = [
    "SPECS",
    "APGD",
    "FAB",
    "PGD",
    "Attack",
    "AutoAttack",
    "AutoAttackResult",
    "EvaluationWarning",
    "FoolboxAttack",
    "Square",
    "check_evaluation",
    "check_gradient_masking",
    "get_attack",
    "is_adversarial",
    "minimal_adversarial_distance",
    "project",
    "robust_accuracy",
]
