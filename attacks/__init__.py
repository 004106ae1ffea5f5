"""Adversarial attacks with one calling contract, for any classifier returning logits on [0, 1].

``attack(model, inputs, labels, epsilons=[...], skip=None, target=None) -> (raw, clipped,
success)`` as in foolbox 3; the projection onto the ε-ball and the [0, 1] box is done once,
in :class:`Attack`. :class:`PGD` is our batched, seeded, early-stopping L2/L∞ PGD;
:class:`FoolboxAttack` runs any foolbox attack by name; :func:`robust_accuracy` evaluates a
data set (skipping certified points); :func:`check_evaluation` warns about evaluation mistakes.
Depends on torch and foolbox only.
"""

from .base import Attack, is_adversarial, project
from .checks import EvaluationWarning, check_evaluation
from .foolbox_bridge import FoolboxAttack, minimal_adversarial_distance
from .pgd import PGD
from .registry import SPECS, get_attack, robust_accuracy

__all__ = [
    "SPECS",
    "PGD",
    "Attack",
    "EvaluationWarning",
    "FoolboxAttack",
    "check_evaluation",
    "get_attack",
    "is_adversarial",
    "minimal_adversarial_distance",
    "project",
    "robust_accuracy",
]
