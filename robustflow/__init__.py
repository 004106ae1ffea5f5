"""robustflow: certified robustness with networks that are discretised dynamical systems.

A network is a composition of explicit steps of an ODE. Choosing the vector field and
the step gives properties by construction: 1-Lipschitz networks alternate expansive steps
``x + h_E Σ(Wx + v)`` and contractive gradient steps ``x − h_C Aᵀ Σ(Ax + b)`` under
``sqrt(1 − h_C + h_C²)(1 + h_E) ≤ 1``; volume- and mass-preserving networks too.
"""

__version__ = "0.1.0"

from robustflow import certification as _certification  # noqa: E402,F401  (registers the rules)
