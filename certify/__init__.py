"""Certified L2 robustness for any ``nn.Module`` that maps inputs to logits.

With ``L`` a proven bound on the L2 Lipschitz constant of the logit map ``f``, the
prediction ``y`` at ``x`` cannot change under any ``‖δ‖₂ < r(x)``, where

    r(x) = (f_y(x) − max_{j≠y} f_j(x)) / (√2 · L).

When ``f = W g + b`` and ``g`` is ``L_b``-Lipschitz, the pairwise radius
``min_{j≠y} (f_y − f_j) / (L_b ‖w_y − w_j‖)`` is sound too, and usually larger.
"""

from .bounds import NotCertifiable, lipschitz_bound, split_head
from .certificates import (
    ROUNDING_SLACK,
    CertificateBatch,
    CertificationReport,
    Certifier,
    global_radius,
    head_distances,
    margins,
    pairwise_radius,
    parse_epsilon,
    parse_epsilons,
)
from .spectral import (
    SAFETY,
    circular_conv_singular_values,
    matrix_singular_values,
    singular_value_range,
)

__all__ = [
    "ROUNDING_SLACK",
    "SAFETY",
    "CertificateBatch",
    "CertificationReport",
    "Certifier",
    "NotCertifiable",
    "circular_conv_singular_values",
    "global_radius",
    "head_distances",
    "lipschitz_bound",
    "margins",
    "matrix_singular_values",
    "pairwise_radius",
    "parse_epsilon",
    "parse_epsilons",
    "singular_value_range",
    "split_head",
]
