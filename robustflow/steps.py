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


def _copy_values(step: nn.Module, source: nn.Module) -> nn.Module:
    """Copy ``source``'s bias and own step size into its exported twin ``step`` (same dtype)."""
    step.bias.data.copy_(source.bias.detach())
    if isinstance(source.step_size, Tensor):
        step.step_size.copy_(source.step_size)
    return step


def _resolve(own: Tensor | None, given: Tensor | float | None) -> Tensor | float:
    """The step size a call uses: the one passed in, else the step's own."""
    if given is not None:
        return given
    if own is None:
        raise ValueError("this step has no step size of its own; pass step_size=")
    return own


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
        h = abs(float(self.step_size))
        return 1.0 + h * self.A.lipschitz_bound() * self.B.lipschitz_bound()

    def export(self) -> EulerStep:
        step = EulerStep(self.A.export(), self.B.export(), float(self.step_size)).to(self.bias)
        return _copy_values(step, self)


class ContractiveStep(nn.Module):
    """Gradient step ``Ψ_C(x) = x − h Aᵀ Σ(A x + b)`` of the convex potential ``Σ φ(Ax + b)``.

    With ``AᵀA = I`` the paper proves ``Lip ≤ sqrt(1 − h + h²)`` (< 1 for 0 < h < 1).
    The bound reported here is the tighter exact one: ``Ψ_C(y) − Ψ_C(x) = (I − h AᵀDA)(y − x)``
    with ``D = diag([1/2, 1])``; ``AᵀDA`` is symmetric with spectrum in ``[σ_min²/2, σ_max²]``
    (``σ_min`` over the input space: 0 when ``A`` has fewer outputs than inputs), so for any real
    ``h`` the eigenvalues of ``I − h AᵀDA`` lie between ``1 − h σ_max²`` and ``1 − h σ_min²/2`` and
    ``Lip ≤ max(|1 − h σ_max²|, |1 − h σ_min²/2|)``. For an isometry that is
    ``max(|1 − h|, 1 − h/2)``: ``1 − h/2`` up to ``h = 4/3`` (0.75 against the paper's 0.866 at
    h = 1/2), ``h − 1`` beyond.

    ``step_size=None`` leaves the step size to the caller (a pair passes its own ``h_C``).
    """

    def __init__(self, operator: LinearOperator, step_size: float | None = 0.5):
        super().__init__()
        self.A = operator
        self.bias = _bias(operator.out_shape)
        if step_size is not None:
            self.register_buffer("step_size", _step_size(step_size, "step_size"))
        else:
            self.step_size = None

    def forward(self, x: Tensor, step_size: Tensor | None = None) -> Tensor:
        h = _resolve(self.step_size, step_size)
        return x - h * self.A.sandwich(x, lambda z: sigma(z + self.bias))

    def lipschitz_bound(self, step_size: float | Tensor | None = None) -> float:
        h = float(_resolve(self.step_size, step_size))
        lo, hi = self.A.singular_value_range()
        return max(abs(1.0 - h * hi**2), abs(1.0 - h * SIGMA_MIN_SLOPE * lo**2))

    def export(self) -> ContractiveStep:
        h = None if self.step_size is None else float(self.step_size)
        return _copy_values(ContractiveStep(self.A.export(), h).to(self.bias), self)


class ExpansiveStep(nn.Module):
    """Step ``Ψ_E(x) = x + h Σ(W x + v)`` with a square ``W``, ``‖W‖ ≤ 1`` (orthogonal).

    Bound: ``Ψ_E(y) − Ψ_E(x) = (I + h DW)(y − x)`` with ``D = diag([1/2, 1])``, so
    ``Lip ≤ 1 + |h| ‖W‖`` (``1 + h`` for orthogonal ``W`` and ``h ≥ 0``).
    ``step_size=None`` leaves the step size to the caller (a pair passes its own ``h_E``).
    """

    def __init__(self, operator: LinearOperator, step_size: float | None = 0.1):
        super().__init__()
        if operator.in_shape != operator.out_shape:
            raise ValueError(
                f"ExpansiveStep needs a square operator, got {operator.in_shape} -> "
                f"{operator.out_shape}"
            )
        self.W = operator
        self.bias = _bias(operator.out_shape)
        if step_size is not None:
            self.register_buffer("step_size", _step_size(step_size, "step_size"))
        else:
            self.step_size = None

    def forward(self, x: Tensor, step_size: Tensor | None = None) -> Tensor:
        h = _resolve(self.step_size, step_size)
        return x + h * sigma(self.W(x) + self.bias)

    def lipschitz_bound(self, step_size: float | Tensor | None = None) -> float:
        h = abs(float(_resolve(self.step_size, step_size)))
        return 1.0 + h * self.W.lipschitz_bound()

    def export(self) -> ExpansiveStep:
        h = None if self.step_size is None else float(self.step_size)
        return _copy_values(ExpansiveStep(self.W.export(), h).to(self.bias), self)


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
            f"step sizes h_E={h_e:.6g}, h_C={h_c:.6g} break the {rule} pair rule "
            f"{formula} = {product:.6f} > 1; "
            f"with h_C={h_c} use 0 <= h_E <= {max_expansive_step(h_c, rule):.6f}"
        )


def _range_fraction(h_c: float, lo: float, hi: float) -> float:
    """``(h_C − lo) / (hi − lo)``, for an ``h_C`` strictly inside ``(lo, hi)``."""
    if not lo < h_c < hi:
        raise ValueError(f"h_c_init must lie strictly inside h_c_range = [{lo:g}, {hi:g}], got {h_c}")
    return (h_c - lo) / (hi - lo)


class LearnedStepSizes(nn.Module):
    """Learnable ``(h_E, h_C)`` that satisfy the pair rule after every optimiser step.

    ``h_C = lo + (hi − lo) s(a)`` in ``[lo, hi] ⊂ (0, 1)`` (``(0, 2)`` under the exact rule) and
    ``h_E = s(b) h_E,max(h_C)`` with the logistic ``s``: ``h_E,max = 1 / sqrt(1 − h_C + h_C²) − 1``
    (``rule="paper"``) or ``1 / max(|1 − h_C|, 1 − h_C/2) − 1`` (``rule="exact"``), so the rule
    holds by construction. ``h_C`` starts at ``h_c_init`` (default: the middle of the range),
    ``h_E`` at ``expansive_share · h_E,max(h_C)``.
    """

    def __init__(self, h_c_range: tuple[float, float] = (0.15, 0.5), expansive_share: float = 0.5,
                 rule: str = "paper", h_c_init: float | None = None):
        super().__init__()
        self.rule = _check_rule(rule)
        if not 0.0 < expansive_share < 1.0:
            raise ValueError(f"expansive_share must lie in (0, 1), got {expansive_share}")
        self.register_buffer("h_c_range", torch.tensor([float(v) for v in h_c_range]))
        self.check()
        lo, hi = (float(v) for v in h_c_range)
        start = 0.5 if h_c_init is None else _range_fraction(h_c_init, lo, hi)
        self.raw_h_c = nn.Parameter(torch.logit(torch.tensor(start, dtype=torch.float64)).float())
        self.raw_share = nn.Parameter(torch.logit(torch.tensor(expansive_share)))

    def check(self) -> None:
        """``ValueError`` unless the saved range keeps ``h_C`` where the rule holds: the range is a
        buffer, loaded from files, and ``h_E,max(h_C)`` is negative outside it."""
        lo, hi = (float(v) for v in self.h_c_range)
        limit = H_C_LIMITS[self.rule]
        if not 0.0 < lo <= hi < limit:
            raise ValueError(f"h_c_range = [{lo:g}, {hi:g}] must satisfy 0 < lo <= hi < {limit:g} "
                             f"under the {self.rule} rule")

    def forward(self) -> tuple[Tensor, Tensor]:
        lo, hi = self.h_c_range
        h_c = lo + (hi - lo) * torch.sigmoid(self.raw_h_c)
        return torch.sigmoid(self.raw_share) * max_expansive_step(h_c, self.rule), h_c


class FixedStepSizes(nn.Module):
    """Constant ``(h_E, h_C)``, checked against the pair rule ``rule`` (``ValueError`` otherwise)."""

    def __init__(self, h_e: float, h_c: float, rule: str = "paper"):
        super().__init__()
        self.rule = _check_rule(rule)
        self.register_buffer("values", torch.tensor([float(h_e), float(h_c)]))
        self.check()

    def check(self) -> None:
        """``ValueError`` unless the saved ``(h_E, h_C)`` obey the pair rule."""
        check_pair_rule(float(self.values[0]), float(self.values[1]), self.rule)

    def forward(self) -> tuple[Tensor, Tensor]:
        return self.values[0], self.values[1]


class ExpansiveContractivePair(nn.Module):
    """``Ψ_C ∘ Ψ_E``: an expansive step followed by a contractive one.

    The step sizes obey ``sqrt(1 − h_C + h_C²)(1 + h_E) ≤ 1`` (the paper's rule) or the exact rule
    ``max(|1 − h_C|, 1 − h_C/2)(1 + h_E) ≤ 1``, so the pair is 1-Lipschitz for orthogonal
    operators; the bound is the product of the two steps' bounds, computed from the weights and
    the step sizes actually used, whatever their values.
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
        values = torch.stack([v.detach() for v in self.step_sizes()])
        rule = getattr(self.step_sizes, "rule", "paper")
        fixed = FixedStepSizes(*(float(v) for v in values), rule).to(values)
        fixed.values.copy_(values)  # the very numbers the forward used, in its dtype
        return ExpansiveContractivePair(self.expansive.export(), self.contractive.export(), fixed)


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
        h = abs(float(self.step_size))
        return (1.0 + h * self.A.lipschitz_bound()) * (1.0 + h * self.B.lipschitz_bound())


def skew_row_sum_matrix(n: int) -> Tensor:
    """The matrix ``M`` with ``M vec(A) = (A − Aᵀ) 𝟙`` (row-major ``vec``), ``n × n²``."""
    m = torch.zeros(n, n, n, dtype=torch.float64)
    idx = torch.arange(n)
    m[idx, idx, :] += 1.0  # + Σ_j A_ij
    m[idx, :, idx] -= 1.0  # − Σ_j A_ji
    return m.reshape(n, n * n)


class _MatrixFieldStep(nn.Module):
    """A step driven by a state-dependent matrix ``A_θ(x)`` with ``vec A_θ(x) = Σ(U x + u)``,
    ``U`` dense and unconstrained; input ``(batch, dim)``."""

    def __init__(self, dim: int, step_size: float = 0.5):
        super().__init__()
        self.dim = _positive("dim", dim)
        self.U = DenseOperator(dim, dim * dim, orthogonal=False)
        self.u = nn.Parameter(torch.zeros(dim * dim))
        self.register_buffer("step_size", _step_size(step_size, "step_size"))

    def field(self, x: Tensor) -> Tensor:
        """``A_θ(x)``, shape ``(batch, dim, dim)``."""
        _check_input(x, (self.dim,), type(self).__name__)
        return sigma(self.U(x) + self.u).view(-1, self.dim, self.dim)


class MassPreservingStep(_MatrixFieldStep):
    """``x⁺ = x + h (A_θ(x) − A_θ(x)ᵀ) 𝟙`` with ``vec(A_θ(x)) = Σ(U x + u)``.

    ``A − Aᵀ`` is skew, so ``𝟙ᵀ(A − Aᵀ)𝟙 = 0``: the mass ``Σ_i x_i`` is unchanged
    (explicit Euler keeps every linear invariant). Bound: ``Lip ≤ 1 + h ‖M‖ ‖U‖`` with
    ``M`` from :func:`skew_row_sum_matrix` (``‖M‖`` computed exactly).
    """

    def forward(self, x: Tensor) -> Tensor:
        a = self.field(x)
        return x + self.step_size * (a.sum(dim=2) - a.sum(dim=1))

    def lipschitz_bound(self) -> float:
        m_norm = float(torch.linalg.matrix_norm(skew_row_sum_matrix(self.dim), 2)) * (1 + 1e-9)
        return 1.0 + abs(float(self.step_size)) * m_norm * self.U.lipschitz_bound()


class GradientStep(nn.Module):
    """Gradient step ``x − h ∇V_θ(x) = x − h Aᵀ Σ(A x + b)`` of ``V_θ(x) = Σ_i γ(a_iᵀx + b_i)``, ``γ' = Σ``.

    ``A`` is any operator, unconstrained; with ``AᵀA = I`` the step is :class:`ContractiveStep`.
    ``V_θ`` is convex: ``h > 0`` descends it, ``h < 0`` ascends it (a step of the concave potential
    ``−V_θ``), so a chain of both signs splits the flow of ``∇U`` for a difference of convex
    potentials. The Jacobian ``I − h Aᵀ diag(Σ'(Ax + b)) A`` is symmetric: the step is the gradient
    of ``‖x‖²/2 − h V_θ(x)``. Bound, for any real ``h``: ``Ψ(y) − Ψ(x) = (I − h AᵀDA)(y − x)`` with
    ``D`` diagonal in ``[1/2, 1]``; ``AᵀDA`` is symmetric with spectrum in ``[σ_min²/2, σ_max²]``,
    so the eigenvalues ``1 − hλ`` lie between ``1 − h σ_max²`` and ``1 − h σ_min²/2`` and
    ``Lip ≤ max(|1 − h σ_max²|, |1 − h σ_min²/2|)`` (``σ_min`` over the input space: 0 when ``A``
    has fewer outputs than inputs; ``1 + |h| σ_max²`` for ``h < 0``).
    """

    def __init__(self, operator: LinearOperator, step_size: float = 0.5):
        super().__init__()
        if not math.isfinite(step_size):
            raise ValueError(f"step_size must be a finite number, got {step_size!r}")
        self.A = operator
        self.bias = _bias(operator.out_shape)
        self.register_buffer("step_size", torch.tensor(float(step_size)))

    def forward(self, x: Tensor) -> Tensor:
        return x - self.step_size * self.A.sandwich(x, lambda z: sigma(z + self.bias))

    def lipschitz_bound(self) -> float:
        h = float(self.step_size)
        lo, hi = self.A.singular_value_range()
        return max(abs(1.0 - h * hi**2), abs(1.0 - h * SIGMA_MIN_SLOPE * lo**2))


class SpherePreservingStep(_MatrixFieldStep):
    """``x⁺ = cay(h S_θ(x)) x``: a step of ``x' = S_θ(x) x``, ``S_θ = A_θ − A_θᵀ``, ``vec A_θ = Σ(Ux + u)``.

    ``S_θ(x)`` is skew, so ``xᵀ x' = 0``: the field is tangent to the spheres ``‖x‖ = r``.
    ``cay(M) = (I − M/2)⁻¹(I + M/2)`` is orthogonal for skew ``M``, so ``‖x⁺‖ = ‖x‖`` exactly, up to
    rounding. The Cayley map rather than the exponential: ``x⁺ = x + (I − M/2)⁻¹ M x`` costs one
    batched linear solve, and ``I − M/2`` is never singular (its singular values are
    ``sqrt(1 + μ²/4) ≥ 1`` for the eigenvalues ``iμ`` of ``M``), whereas ``exp`` needs a Padé
    approximant with scaling and squaring per sample. Freezing ``S_θ`` at ``x`` makes it a
    first-order (Lie–Euler) step, the order of the other steps. ``M`` is exactly skew in any
    dtype; the rotation is applied in float64, so the only rounding that moves ``‖x‖`` is the
    storing of ``x⁺`` in the input's dtype (relative ``≤ u`` per step: float32 keeps ``‖x‖`` to
    about 1e-6 over 100 steps, float64 to about 1e-14). Input: ``(batch, dim)``.
    """

    def skew(self, x: Tensor) -> Tensor:
        """``S_θ(x) = A_θ(x) − A_θ(x)ᵀ``, shape ``(batch, dim, dim)``."""
        a = self.field(x)
        return a - a.transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        m = self.step_size.double() * self.skew(x).double()
        eye = torch.eye(self.dim, dtype=m.dtype, device=m.device)
        state = x.double().unsqueeze(-1)
        return (state + torch.linalg.solve(eye - 0.5 * m, m @ state)).squeeze(-1).to(x.dtype)
