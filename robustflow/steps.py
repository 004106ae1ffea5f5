"""Residual steps: one class, one equation, one proven Lipschitz bound.

Each step is one explicit-Euler step of a vector field chosen so that the step has a
property by construction. ``lipschitz_bound()`` returns a proven upper bound of the
step's L2 Lipschitz constant for the current parameters, computed in float64 from the
operators' exact singular values (see :mod:`robustflow.operators`).

Proofs rest on one fact about ``Σ(x) = max{x, x/2}``: for all ``a, b`` there is a diagonal
``D`` with entries in ``[1/2, 1]`` such that ``Σ(a) − Σ(b) = D (a − b)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from robustflow.activations import SIGMA_MIN_SLOPE, sigma
from robustflow.operators import DenseOperator, LinearOperator, _check_input, _positive


def _bias(shape: tuple[int, ...]) -> nn.Parameter:
    """A bias broadcast over the spatial positions of ``shape`` (channels first)."""
    return nn.Parameter(torch.zeros(shape[0], *([1] * (len(shape) - 1))))


def _step_size(value: float, name: str) -> Tensor:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number ≥ 0, got {value!r}")
    return torch.tensor(float(value))


class EulerStep(nn.Module):
    """Explicit Euler (ResNet) step ``x + h B Σ(A x + b)``: the unconstrained baseline.

    Bound: ``Lip ≤ 1 + h ‖B‖ ‖A‖`` (triangle inequality; ``Σ`` is 1-Lipschitz).
    """

    def __init__(self, lift: LinearOperator, project: LinearOperator, step_size: float = 1.0):
        super().__init__()
        if lift.out_shape != project.in_shape or project.out_shape != lift.in_shape:
            raise ValueError(
                f"EulerStep needs A: {lift.in_shape} -> k and B: k -> {lift.in_shape}, got "
                f"A: {lift.in_shape} -> {lift.out_shape}, B: {project.in_shape} -> {project.out_shape}"
            )
        self.A, self.B = lift, project
        self.bias = _bias(lift.out_shape)
        self.register_buffer("step_size", _step_size(step_size, "step_size"))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.step_size * self.B(sigma(self.A(x) + self.bias))

    def lipschitz_bound(self) -> float:
        h = float(self.step_size)
        return 1.0 + h * self.A.lipschitz_bound() * self.B.lipschitz_bound()

    def export(self) -> EulerStep:
        step = EulerStep(self.A.export(), self.B.export(), float(self.step_size))
        step.bias.data.copy_(self.bias.detach())
        return step


class ContractiveStep(nn.Module):
    """Gradient step ``Ψ_C(x) = x − h Aᵀ Σ(A x + b)`` of the convex potential ``Σ φ(Ax + b)``.

    With ``AᵀA = I`` the paper proves ``Lip ≤ sqrt(1 − h + h²)`` (< 1 for 0 < h < 1).
    The bound reported here is the tighter exact one: ``Ψ_C(y) − Ψ_C(x) = (I − h AᵀDA)(y − x)``
    with ``D = diag([1/2, 1])``; ``AᵀDA`` is symmetric with spectrum in ``[σ_min²/2, σ_max²]``,
    so ``Lip ≤ max(|1 − h σ_max²|, |1 − h σ_min²/2|)``, which is ``1 − h/2`` for an isometry
    and ``h ≤ 4/3`` (e.g. 0.75 against 0.866 at h = 1/2).
    """

    def __init__(self, operator: LinearOperator, step_size: float = 0.5):
        super().__init__()
        self.A = operator
        self.bias = _bias(operator.out_shape)
        self.register_buffer("step_size", _step_size(step_size, "step_size"))

    def forward(self, x: Tensor, step_size: Tensor | None = None) -> Tensor:
        h = self.step_size if step_size is None else step_size
        return x - h * self.A.sandwich(x, lambda z: sigma(z + self.bias))

    def lipschitz_bound(self, step_size: float | Tensor | None = None) -> float:
        h = float(self.step_size if step_size is None else step_size)
        lo, hi = self.A.singular_value_range()
        return max(abs(1.0 - h * hi**2), abs(1.0 - h * SIGMA_MIN_SLOPE * lo**2))

    def export(self) -> ContractiveStep:
        step = ContractiveStep(self.A.export(), float(self.step_size))
        step.bias.data.copy_(self.bias.detach())
        return step


class ExpansiveStep(nn.Module):
    """Step ``Ψ_E(x) = x + h Σ(W x + v)`` with a square ``W``, ``‖W‖ ≤ 1`` (orthogonal).

    Bound: ``Lip ≤ 1 + h ‖W‖`` (``1 + h`` for orthogonal ``W``).
    """

    def __init__(self, operator: LinearOperator, step_size: float = 0.1):
        super().__init__()
        if operator.in_shape != operator.out_shape:
            raise ValueError(
                f"ExpansiveStep needs a square operator, got {operator.in_shape} -> "
                f"{operator.out_shape}"
            )
        self.W = operator
        self.bias = _bias(operator.out_shape)
        self.register_buffer("step_size", _step_size(step_size, "step_size"))

    def forward(self, x: Tensor, step_size: Tensor | None = None) -> Tensor:
        h = self.step_size if step_size is None else step_size
        return x + h * sigma(self.W(x) + self.bias)

    def lipschitz_bound(self, step_size: float | Tensor | None = None) -> float:
        h = float(self.step_size if step_size is None else step_size)
        return 1.0 + h * self.W.lipschitz_bound()

    def export(self) -> ExpansiveStep:
        step = ExpansiveStep(self.W.export(), float(self.step_size))
        step.bias.data.copy_(self.bias.detach())
        return step


# ----------------------------------------------------------------- the pair rule


def contraction_factor(h_c: float | Tensor) -> float | Tensor:
    """The paper's contraction factor ``sqrt(1 − h_C + h_C²)`` of a contractive step."""
    return (1.0 - h_c + h_c * h_c) ** 0.5


PAIR_RULES = ("paper", "exact")


#: Largest ``h_C`` each rule admits: the paper's factor reaches 1 at ``h_C = 1``; the exact
#: factor ``max(|1 − h_C|, 1 − h_C/2)`` stays below 1 up to ``h_C = 2``.
H_C_LIMITS = {"paper": 1.0, "exact": 2.0}


def exact_contraction_factor(h_c: float | Tensor) -> float | Tensor:
    """Exact bound ``max(|1 − h_C|, 1 − h_C/2)`` of a contractive step with an isometric ``A``
    (``1 − h_C/2`` up to ``h_C = 4/3``, where it is smallest: 1/3)."""
    return max(abs(1.0 - h_c), 1.0 - 0.5 * h_c)


def max_expansive_step(h_c: float | Tensor, rule: str = "paper") -> float | Tensor:
    """Largest ``h_E`` allowed with ``h_C``.

    ``paper``: ``sqrt(1 − h_C + h_C²)(1 + h_E) ≤ 1``. ``exact``: ``max(|1 − h_C|, 1 − h_C/2)(1 + h_E)
    ≤ 1``, i.e. ``h_E ≤ h_C / (2 − h_C)`` for ``h_C ≤ 4/3`` — the exact spectral bound of the
    contractive step (see :class:`ContractiveStep`), which allows about twice the expansive
    step, and admits ``h_C`` up to 2.
    """
    factor = contraction_factor(h_c) if rule == "paper" else exact_contraction_factor(h_c)
    return 1.0 / factor - 1.0


def _check_rule(rule: str) -> str:
    if rule not in PAIR_RULES:
        raise ValueError(f"pair rule must be one of {PAIR_RULES}, got {rule!r}")
    return rule


def check_pair_rule(h_e: float, h_c: float, rule: str = "paper") -> None:
    """Raise ``ValueError`` unless the pair ``(h_E, h_C)`` obeys ``rule`` (``paper`` or ``exact``)."""
    limit = H_C_LIMITS[_check_rule(rule)]
    if not 0.0 < h_c < limit:
        raise ValueError(f"h_C must lie in (0, {limit:g}) for the step to contract under the {rule} "
                         f"rule, got h_C={h_c}")
    if rule == "paper":
        product, formula = contraction_factor(h_c) * (1.0 + h_e), "sqrt(1 - h_C + h_C^2)(1 + h_E)"
    else:
        product, formula = exact_contraction_factor(h_c) * (1.0 + h_e), "max(|1 - h_C|, 1 - h_C/2)(1 + h_E)"
    if h_e < 0 or product > 1.0 + 1e-6:  # slack for float32 step sizes
        raise ValueError(
            f"step sizes h_E={h_e}, h_C={h_c} break the {rule} pair rule "
            f"{formula} = {product:.6f} > 1; "
            f"with h_C={h_c} use 0 <= h_E <= {max_expansive_step(h_c, rule):.6f}"
        )


class LearnedStepSizes(nn.Module):
    """Learnable ``(h_E, h_C)`` that satisfy the pair rule after every optimiser step.

    ``h_C = lo + (hi − lo) s(a)`` in ``[lo, hi] ⊂ (0, 1)`` (``(0, 2)`` under the exact rule) and
    ``h_E = s(b) h_E,max(h_C)`` with the logistic ``s``: ``h_E,max = 1 / sqrt(1 − h_C + h_C²) − 1``
    (``rule="paper"``) or ``1 / max(|1 − h_C|, 1 − h_C/2) − 1`` (``rule="exact"``), so the rule
    holds by construction.
    """

    def __init__(self, h_c_range: tuple[float, float] = (0.15, 0.5), expansive_share: float = 0.5,
                 rule: str = "paper"):
        super().__init__()
        lo, hi = (float(v) for v in h_c_range)
        self.rule = _check_rule(rule)
        limit = H_C_LIMITS[rule]
        if not 0.0 < lo <= hi < limit:
            raise ValueError(f"h_C range must satisfy 0 < lo <= hi < {limit:g} under the {rule} rule, "
                             f"got ({lo}, {hi})")
        if not 0.0 < expansive_share < 1.0:
            raise ValueError(f"expansive_share must lie in (0, 1), got {expansive_share}")
        self.register_buffer("h_c_range", torch.tensor([lo, hi]))
        self.raw_h_c = nn.Parameter(torch.zeros(()))
        self.raw_share = nn.Parameter(torch.logit(torch.tensor(expansive_share)))

    def forward(self) -> tuple[Tensor, Tensor]:
        lo, hi = self.h_c_range
        h_c = lo + (hi - lo) * torch.sigmoid(self.raw_h_c)
        return torch.sigmoid(self.raw_share) * max_expansive_step(h_c, self.rule), h_c


class FixedStepSizes(nn.Module):
    """Constant ``(h_E, h_C)``, checked against the pair rule ``rule`` (``ValueError`` otherwise)."""

    def __init__(self, h_e: float, h_c: float, rule: str = "paper"):
        super().__init__()
        check_pair_rule(float(h_e), float(h_c), rule)
        self.rule = rule
        self.register_buffer("values", torch.tensor([float(h_e), float(h_c)]))

    def forward(self) -> tuple[Tensor, Tensor]:
        return self.values[0], self.values[1]


class ExpansiveContractivePair(nn.Module):
    """``Ψ_C ∘ Ψ_E``: an expansive step followed by a contractive one.

    The step sizes obey ``sqrt(1 − h_C + h_C²)(1 + h_E) ≤ 1`` (or the exact rule
    ``max(|1 − h_C|, 1 − h_C/2)(1 + h_E) ≤ 1``), so the pair is 1-Lipschitz for orthogonal operators;
    the bound is the product of the two steps' bounds, computed from the weights.
    """

    def __init__(
        self,
        expansive: ExpansiveStep,
        contractive: ContractiveStep,
        step_sizes: LearnedStepSizes | FixedStepSizes | None = None,
    ):
        super().__init__()
        if expansive.W.out_shape != contractive.A.in_shape:
            raise ValueError(
                f"pair shapes do not chain: expansive gives {expansive.W.out_shape}, "
                f"contractive takes {contractive.A.in_shape}"
            )
        self.expansive, self.contractive = expansive, contractive
        self.step_sizes = step_sizes if step_sizes is not None else LearnedStepSizes()

    def forward(self, x: Tensor) -> Tensor:
        h_e, h_c = self.step_sizes()
        return self.contractive(self.expansive(x, h_e), h_c)

    def lipschitz_bound(self) -> float:
        h_e, h_c = (float(v.detach()) for v in self.step_sizes())
        return self.expansive.lipschitz_bound(h_e) * self.contractive.lipschitz_bound(h_c)

    def export(self) -> ExpansiveContractivePair:
        h_e, h_c = (float(v.detach()) for v in self.step_sizes())
        rule = getattr(self.step_sizes, "rule", "paper")
        return ExpansiveContractivePair(
            self.expansive.export(), self.contractive.export(), FixedStepSizes(h_e, h_c, rule)
        )


# ------------------------------------------------------- structure-preserving steps


class VolumePreservingStep(nn.Module):
    """Shear step on a split state ``(x, v)``: ``x⁺ = x + h Σ(A v + a)``, ``v⁺ = v + h Σ(B x⁺ + b)``.

    Each half is a shear with Jacobian ``[[I, *], [0, I]]``, so ``det J = 1`` exactly and
    :meth:`inverse` undoes ``v`` then ``x``. Input: ``(batch, 2·dim)``, ``x`` first.
    Bound: ``Lip ≤ (1 + h‖A‖)(1 + h‖B‖)`` (each shear is ``I + N`` with ``‖N‖ ≤ h‖·‖``).
    """

    def __init__(self, dim: int, step_size: float = 0.5):
        super().__init__()
        self.dim = _positive("dim", dim)
        self.A = DenseOperator(dim, dim, orthogonal=False)
        self.B = DenseOperator(dim, dim, orthogonal=False)
        self.a = nn.Parameter(torch.zeros(dim))
        self.b = nn.Parameter(torch.zeros(dim))
        self.register_buffer("step_size", _step_size(step_size, "step_size"))

    def forward(self, state: Tensor) -> Tensor:
        _check_input(state, (2 * self.dim,), type(self).__name__)
        x, v = state.split(self.dim, dim=-1)
        x = x + self.step_size * sigma(self.A(v) + self.a)
        v = v + self.step_size * sigma(self.B(x) + self.b)
        return torch.cat([x, v], dim=-1)

    def inverse(self, state: Tensor) -> Tensor:
        _check_input(state, (2 * self.dim,), type(self).__name__)
        x, v = state.split(self.dim, dim=-1)
        v = v - self.step_size * sigma(self.B(x) + self.b)
        x = x - self.step_size * sigma(self.A(v) + self.a)
        return torch.cat([x, v], dim=-1)

    def lipschitz_bound(self) -> float:
        h = float(self.step_size)
        return (1.0 + h * self.A.lipschitz_bound()) * (1.0 + h * self.B.lipschitz_bound())


def skew_row_sum_matrix(n: int) -> Tensor:
    """The matrix ``M`` with ``M vec(A) = (A − Aᵀ) 𝟙`` (row-major ``vec``), ``n × n²``."""
    m = torch.zeros(n, n, n, dtype=torch.float64)
    idx = torch.arange(n)
    m[idx, idx, :] += 1.0  # + Σ_j A_ij
    m[idx, :, idx] -= 1.0  # − Σ_j A_ji
    return m.reshape(n, n * n)


class MassPreservingStep(nn.Module):
    """``x⁺ = x + h (A_θ(x) − A_θ(x)ᵀ) 𝟙`` with ``vec(A_θ(x)) = Σ(U x + u)``.

    ``A − Aᵀ`` is skew, so ``𝟙ᵀ(A − Aᵀ)𝟙 = 0``: the mass ``Σ_i x_i`` is unchanged
    (explicit Euler keeps every linear invariant). Bound: ``Lip ≤ 1 + h ‖M‖ ‖U‖`` with
    ``M`` from :func:`skew_row_sum_matrix` (``‖M‖`` computed exactly).
    """

    def __init__(self, dim: int, step_size: float = 0.5):
        super().__init__()
        self.dim = _positive("dim", dim)
        self.U = DenseOperator(dim, dim * dim, orthogonal=False)
        self.u = nn.Parameter(torch.zeros(dim * dim))
        self.register_buffer("step_size", _step_size(step_size, "step_size"))

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, (self.dim,), type(self).__name__)
        a = sigma(self.U(x) + self.u).view(-1, self.dim, self.dim)
        return x + self.step_size * (a.sum(dim=2) - a.sum(dim=1))

    def lipschitz_bound(self) -> float:
        m_norm = float(torch.linalg.matrix_norm(skew_row_sum_matrix(self.dim), 2)) * (1 + 1e-9)
        return 1.0 + float(self.step_size) * m_norm * self.U.lipschitz_bound()
