"""Proven bounds on the rounding error of a forward pass, and the arithmetic that keeps them.

The model of IEEE arithmetic (round to nearest, unit roundoff ``u``; Higham, *Accuracy and
Stability of Numerical Algorithms*, §2.2 and §3.1): every operation returns
``fl(a ∘ b) = (a ∘ b)(1 + δ) + η`` with ``|δ| ≤ u`` and ``|η| ≤ η₀`` (underflow; ``η₀`` is the
smallest normal number, more than the true ``2^-150`` / ``2^-1075``). An inner product of ``n``
terms, summed in *any* order (blocked, pairwise, with FMA), satisfies

    |fl(wᵀx) − wᵀx| ≤ γ_n |w|ᵀ|x| + n η₀,      γ_n = n u / (1 − n u).

For a linear map ``A`` with ``n`` terms per output and ``d`` outputs this gives the normwise
``‖fl(Ax) − Ax‖ ≤ γ_n ‖|A|‖ ‖x‖ + n η₀ √d``, where ``|A|`` is the entrywise absolute value.

A network's error then follows from the composition rule: if part ``k`` is ``L_k``-Lipschitz,
``‖f_k(0)‖ ≤ c_k`` and its computed value at any input ``y`` is within ``e_k(‖y‖)`` of
``f_k(y)``, the computed output ``x̃_k`` satisfies

    ‖x̃_k − x_k‖ ≤ L_k ‖x̃_{k−1} − x_{k−1}‖ + e_k(‖x̃_{k−1}‖),   ‖x_k‖ ≤ L_k ‖x_{k−1}‖ + c_k.

:class:`Tracked` bounds are :class:`Affine` functions ``a + b r`` of the input norm ``r = ‖x‖``,
so a whole network's a-priori error bound is two numbers, computed once, and ``a + b ‖x‖`` per
sample. The same rounding rules also run on :class:`Measured` values, which compute the forward
operation by operation and measure the input norm of every inner product on the batch itself:
inside a residual step the values the pass produces are far smaller than what the input norm
allows (a bias, a step size of 2), so the per-sample bound is about half as large.

The bound holds only for the arithmetic it was derived for: IEEE float32 or float64 with no
TF32, float16 or bfloat16 anywhere, and convolutions computed as inner products (direct or
im2col + GEMM), not by Winograd or FFT transforms, whose errors this model does not cover (cuDNN
picks them for 3×3 kernels; NNPACK, torch's CPU convolution when oneDNN is off, uses them).
:func:`exact_arithmetic` switches all of those off.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

#: Floating-point types whose arithmetic the bounds describe.
SUPPORTED_DTYPES = (torch.float32, torch.float64)


def unit_roundoff(dtype: torch.dtype) -> float:
    """``u = 2^-p`` of ``dtype`` (float32: 2^-24, float64: 2^-53)."""
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"rounding bounds are derived for float32 and float64, not {dtype}")
    return torch.finfo(dtype).eps / 2


def underflow(dtype: torch.dtype) -> float:
    """``η₀``: the smallest normal number of ``dtype``, a bound on one underflow error."""
    return torch.finfo(dtype).tiny


def gamma(n: int, u: float) -> float:
    """``γ_n = n u / (1 − n u)``; the bound needs ``n u < 1``."""
    if n * u >= 1:
        raise ValueError(f"an inner product of {n} terms is too long for unit roundoff {u:g}")
    return n * u / (1.0 - n * u)


@dataclass(frozen=True)
class Affine:
    """``r ↦ const + slope · r`` with non-negative coefficients: a bound in terms of ``‖x‖``."""

    const: float = 0.0
    slope: float = 0.0

    def __add__(self, other: Affine) -> Affine:
        return Affine(_up(self.const + other.const), _up(self.slope + other.slope))

    def scale(self, factor: float) -> Affine:
        factor = abs(factor)
        return Affine(_up(self.const * factor), _up(self.slope * factor))

    def plus(self, constant: float) -> Affine:
        return Affine(_up(self.const + abs(constant)), self.slope)

    def at(self, r: float) -> float:
        return _up(self.const + self.slope * r)

    def compose(self, inner: Affine) -> Affine:
        """``self(inner(r))`` (both non-decreasing in ``r``)."""
        return Affine(_up(self.const + self.slope * inner.const), _up(self.slope * inner.slope))


def _up(value: float) -> float:
    """Round a non-negative float64 result upwards by one ulp (the bookkeeping is conservative)."""
    return math.nextafter(value, math.inf) if math.isfinite(value) else value


@dataclass(frozen=True)
class Tracked:
    """A value computed in floating point, as bounds affine in the input norm ``r``.

    ``value`` bounds ``‖v‖`` of the exact value, ``error`` bounds ``‖ṽ − v‖`` of the computed one.
    The methods follow the operations of a forward pass and return the bounds of their result;
    the functions, constants and scalars they are given are for :class:`Measured`.
    """

    value: Affine
    error: Affine
    u: float
    tiny: float
    #: multiply-adds of the inner products so far, per sample: the cost of the computation
    products: int = 0

    @classmethod
    def input(cls, dtype: torch.dtype) -> Tracked:
        """The input ``x`` itself: ``‖x‖ = r``, no error."""
        return cls(Affine(0.0, 1.0), Affine(), unit_roundoff(dtype), underflow(dtype))

    def _with(self, value: Affine, error: Affine, added: int = 0) -> Tracked:
        """A result that took ``added`` more multiply-adds than this value."""
        return Tracked(value, error, self.u, self.tiny, self.products + added)

    def _computed(self) -> Affine:
        """Bound on the norm of the computed value: ``‖v‖ + ‖ṽ − v‖``."""
        return self.value + self.error

    def linear(self, norm: float, abs_norm: float, terms: int, size: int,
               apply: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Tracked:
        """``A v`` with ``‖A‖ ≤ norm``, ``‖|A|‖ ≤ abs_norm``, ``terms`` products per output,
        ``size`` outputs (``apply`` computes it: only :class:`Measured` uses it)."""
        local = self._computed().scale(gamma(terms, self.u) * abs_norm)
        local = local.plus(terms * self.tiny * math.sqrt(size))
        return self._with(self.value.scale(norm), self.error.scale(norm) + local, terms * size)

    def add(self, other: Tracked | float, subtract: bool = False) -> Tracked:
        """``v + w`` (or ``v − w``) for another tracked value, or a constant of norm ``other``
        (exact data)."""
        if isinstance(other, Tracked):
            value, error = self.value + other.value, self.error + other.error
            # branches of one pass: the later one already counts the earlier one's work
            added = max(other.products - self.products, 0)
        else:
            value, error, added = self.value.plus(other), self.error, 0
        return self._with(value, error + (value + error).scale(self.u), added)

    def add_constant(self, constant: torch.Tensor, norm: float) -> Tracked:
        """``v + c`` for exact data ``c`` (a bias) whose broadcast norm is at most ``norm``."""
        return self.add(norm)

    def scale(self, factor: float | torch.Tensor, size: int) -> Tracked:
        """``h v`` for a scalar ``h`` with ``|h| ≤ factor`` (``size`` entries)."""
        factor = abs(float(factor))
        local = self._computed().scale(self.u * factor).plus(self.tiny * math.sqrt(size))
        return self._with(self.value.scale(factor), self.error.scale(factor) + local)

    def elementwise(self, lipschitz: float, relative: float, size: int,
                    value_bound: Affine | None = None,
                    apply: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Tracked:
        """``φ(v)`` entry by entry: ``φ`` is ``lipschitz``-Lipschitz with ``|φ(t)| ≤ lipschitz |t|``
        (unless ``value_bound`` says otherwise) and computed to ``relative`` accuracy of its
        output (0 for exact operations such as max, ReLU or multiplying by 1/2)."""
        value = self.value.scale(lipschitz) if value_bound is None else value_bound
        computed_out = value + self.error.scale(lipschitz)
        local = computed_out.scale(relative).plus(self.tiny * math.sqrt(size))
        return self._with(value, self.error.scale(lipschitz) + local)


def norm_bound(x: torch.Tensor) -> torch.Tensor:
    """An upper bound on ``‖x_i‖₂`` per sample (float64), computed in ``x``'s own precision: a sum
    of ``n`` squares is within ``γ_n`` of its value (all terms positive), the square root within
    ``u``."""
    n = math.prod(x.shape[1:])
    u = unit_roundoff(x.dtype)
    factor = 1.0 + 2.0 * gamma(n + 2, u)
    tiny = math.sqrt(n * torch.finfo(x.dtype).tiny)
    dims = tuple(range(1, x.dim()))  # no flatten: it would copy a non-contiguous batch
    norms = torch.linalg.vector_norm(x.detach(), dim=dims) if dims else x.detach().abs()
    return norms.double() * factor + tiny


@dataclass(frozen=True)
class Measured:
    """A forward pass computed step by step, with a per-sample bound on its rounding error.

    The a-posteriori twin of :class:`Tracked`: the same methods, called by the same rounding
    rules, but each one computes its operation (``apply``, the constant, the scalar) on the batch.
    The input norm of every inner product is measured on the values the pass produced, where
    :class:`Tracked` can only bound it from the part's input norm; the other operations carry an
    upper bound ``norm`` of the computed value's norm forward. ``value`` is the computed batch,
    ``error`` (float64, one entry per sample) bounds ``‖ṽ − v‖`` against the exact function of the
    part at the part's computed input. A correctly rounded operation is within ``u |s|`` of its
    exact result ``s``, an inner product of ``n`` terms within ``γ_n |w|ᵀ|x̃|`` (plus ``η₀`` per
    term for underflow).
    """

    value: torch.Tensor
    error: torch.Tensor
    norm: torch.Tensor
    u: float
    tiny: float

    @classmethod
    def input(cls, x: torch.Tensor) -> Measured:
        """The part's computed input itself: no error of its own."""
        error = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        return cls(x, error, norm_bound(x), unit_roundoff(x.dtype), underflow(x.dtype))

    def _with(self, value: torch.Tensor, error: torch.Tensor, norm: torch.Tensor) -> Measured:
        return Measured(value, error, norm, self.u, self.tiny)

    @staticmethod
    def _size(value: torch.Tensor) -> int:
        return value[0].numel() if value.shape[0] else 0

    def linear(self, norm: float, abs_norm: float, terms: int, size: int,
               apply: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Measured:
        """``A ṽ = apply(ṽ)``: ``‖A‖ ≤ norm``, ``‖|A|‖ ≤ abs_norm``, ``terms`` products per output;
        the norm of ``ṽ`` is measured."""
        if apply is None:
            raise ValueError("a measured linear operation needs the function that computes it")
        out = apply(self.value)
        measured = torch.minimum(norm_bound(self.value), self.norm)
        local = measured * (gamma(terms, self.u) * abs_norm) + \
            terms * self.tiny * math.sqrt(self._size(out))
        return self._with(out, self.error * norm + local, measured * norm + local)

    def _rounded(self, exact_norm: torch.Tensor, local: float = 0.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rounding, norm)`` of one correctly rounded operation per entry whose exact result
        on the computed operands has norm at most ``exact_norm``: ``u`` times that, plus
        ``local`` (underflow), and a bound on the computed result's norm."""
        rounding = exact_norm * self.u + local
        return rounding, exact_norm + rounding

    def add(self, other: Measured | float, subtract: bool = False) -> Measured:
        """``ṽ + w̃`` (or ``ṽ − w̃``) for another measured value of the same pass."""
        if not isinstance(other, Measured):
            raise ValueError("a measured sum needs the other value, not its norm: use add_constant")
        out = self.value - other.value if subtract else self.value + other.value
        rounding, norm = self._rounded(self.norm + other.norm)
        return self._with(out, self.error + other.error + rounding, norm)

    def add_constant(self, constant: torch.Tensor, norm: float) -> Measured:
        """``ṽ + c`` for exact data ``c`` (a bias, broadcast as the forward does) of norm at most
        ``norm``."""
        rounding, bound = self._rounded(self.norm + norm)
        return self._with(self.value + constant, self.error + rounding, bound)

    def scale(self, factor: float | torch.Tensor, size: int) -> Measured:
        """``h ṽ`` for the scalar ``h`` the forward multiplies by (a tensor or a float)."""
        h = abs(float(factor))
        rounding, norm = self._rounded(self.norm * h, self.tiny * math.sqrt(self._size(self.value)))
        return self._with(factor * self.value, self.error * h + rounding, norm)

    def elementwise(self, lipschitz: float, relative: float, size: int,
                    value_bound: Affine | None = None,
                    apply: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Measured:
        """``φ(ṽ) = apply(ṽ)`` entry by entry, ``φ`` ``lipschitz``-Lipschitz, ``|φ(t)| ≤
        lipschitz |t|`` and computed to ``relative`` accuracy of its output (a ``value_bound``
        replacing the latter is measured instead)."""
        if apply is None:
            raise ValueError("a measured entry-wise operation needs the function that computes it")
        if not 0 <= relative < 1:
            raise ValueError(f"relative accuracy must be in [0, 1), got {relative}")
        out = apply(self.value)
        underflow = self.tiny * math.sqrt(self._size(out))
        exact = (norm_bound(out) + underflow) / (1.0 - relative) if value_bound is not None \
            else self.norm * lipschitz
        local = exact * relative + underflow
        return self._with(out, self.error * lipschitz + local, exact + local)


def compose_errors(parts: list[tuple[float, float, Affine]]) -> tuple[Affine, Affine]:
    """``(value, error)`` bounds of a composition from each part's ``(L, ‖f(0)‖ bound, e)``,
    where ``e`` bounds the part's own rounding error in terms of its input's norm."""
    value, error = Affine(0.0, 1.0), Affine()
    for lipschitz, offset, local in parts:
        computed_in = value + error
        error = error.scale(lipschitz) + local.compose(computed_in)
        value = value.scale(lipschitz).plus(offset)
    return value, error


@contextlib.contextmanager
def exact_arithmetic() -> Iterator[None]:
    """IEEE float32/float64 inside the block, whatever the caller's settings; restored after.

    Turns off TF32 in cuDNN convolutions and CUDA matmuls (on by default for cuDNN), oneDNN's
    reduced-precision float32 modes, autocast on every device, and the convolution libraries that
    may use Winograd or FFT algorithms (cuDNN, so CUDA convolutions run as im2col + GEMM, and
    NNPACK), so that the arithmetic is the one the rounding bounds describe.
    """
    flags = _precision_flags()
    saved = [getattr(owner, name) for _, owner, name, _ in flags]
    nnpack = torch._C._get_nnpack_enabled()
    with contextlib.ExitStack() as stack:
        try:
            for _, owner, name, strict in flags:
                setattr(owner, name, strict)
            torch._C._set_nnpack_enabled(False)
            for device in _autocast_devices():
                stack.enter_context(torch.autocast(device_type=device, enabled=False))
            yield
        finally:
            for (_, owner, name, _), value in zip(flags, saved, strict=True):
                setattr(owner, name, value)
            torch._C._set_nnpack_enabled(nnpack)


def _precision_flags() -> list[tuple[str, object, str, object]]:
    """``(label, owner, attribute, strict value)`` of every switch that lowers float32 precision."""
    backends = torch.backends
    groups = [(f"{group}.{sub}", getattr(getattr(backends, group, None), sub, None)) for group, sub in
              (("cuda", "matmul"), ("cudnn", "conv"), ("cudnn", "rnn"),
               ("mkldnn", "matmul"), ("mkldnn", "conv"), ("mkldnn", "rnn"))]
    algorithms = [("cudnn", backends.cudnn, "enabled", False)]  # Winograd and FFT convolutions
    if all(owner is not None and hasattr(owner, "fp32_precision") for _, owner in groups):
        return [(label, owner, "fp32_precision", "ieee") for label, owner in groups] + algorithms
    # torch releases before the fp32_precision API: the legacy TF32 switches
    return [("cuda.matmul", backends.cuda.matmul, "allow_tf32", False),
            ("cudnn", backends.cudnn, "allow_tf32", False)] + algorithms


def _autocast_devices() -> list[str]:
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    return devices


def precision_state() -> dict[str, object]:
    """The current values of the switches :func:`exact_arithmetic` sets (for tests and reports)."""
    state: dict[str, object] = {f"{label}.{name}": getattr(owner, name)
                                for label, owner, name, _ in _precision_flags()}
    state["nnpack.enabled"] = torch._C._get_nnpack_enabled()
    state["autocast_cpu"] = torch.is_autocast_enabled("cpu")
    if torch.cuda.is_available():
        state["autocast_cuda"] = torch.is_autocast_enabled("cuda")
    return state
