"""Certified L2 robustness for any ``nn.Module`` that maps inputs to logits.

With ``L`` a proven bound on the L2 Lipschitz constant of the logit map ``f``, the
prediction ``y`` at ``x`` cannot change under any ``‖δ‖₂ < r(x)``, where

    r(x) = (f_y(x) − max_{j≠y} f_j(x)) / (√2 · L).

When ``f = W g + b`` and ``g`` is ``L_b``-Lipschitz, the pairwise radius
``min_{j≠y} (f_y − f_j) / (L_b ‖w_y − w_j‖)`` is sound too, and usually larger.
"""

from .bounds import (
    NotCertifiable,
    analyse,
    freeze,
    lipschitz_bound,
    register,
    register_component,
    register_sequential,
    registration,
    split_head,
)
from .certificates import (
    CertificateBatch,
    CertificationReport,
    Certifier,
    global_radius,
    head_distances,
    margins,
    model_dtype,
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
    "SAFETY",
    "CertificateBatch",
    "CertificationReport",
    "Certifier",
    "NotCertifiable",
    "circular_conv_singular_values",
    "analyse",
    "freeze",
    "global_radius",
    "head_distances",
    "lipschitz_bound",
    "margins",
    "model_dtype",
    "matrix_singular_values",
    "pairwise_radius",
    "parse_epsilon",
    "parse_epsilons",
    "register",
    "register_component",
    "register_sequential",
    "registration",
    "singular_value_range",
    "split_head",
]
