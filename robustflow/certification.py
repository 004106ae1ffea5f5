"""How ``certify`` bounds robustflow's layers: one registered rule per class, by exact type.

certify trusts no module's own account of itself: a layer is bounded only by a rule registered
for its exact class. This module registers robustflow's classes (imported with the package), each
with three things: the proven Lipschitz bound (the maths is in each class's docstring), the
rounding rule of its forward pass (:mod:`certify.rounding`: every product, sum and inner product
of the forward, in order), and ``freeze`` (its ``export()``: the same computation with assembled
kernels and step sizes as plain tensors, which certify evaluates, also in float64). Subclasses are
not covered: certify refuses them until they are registered themselves.
"""

from __future__ import annotations

import math
import weakref

from torch import Tensor, nn

from certify import register, register_component, register_sequential
from certify.bounds import IO, conv_abs_norm
from certify.rounding import Tracked
from certify.spectral import SAFETY, matrix_singular_values
from robustflow.activations import Sigma, sigma
from robustflow.layers import Centering, NormalizedLinear
from robustflow.networks import (
    EulerMLP,
    ImageClassifier,
    LipschitzMLP,
    MassPreservingNet,
    VolumePreservingNet,
)
from robustflow.operators import ChannelMix, ConvOperator, DenseOperator, LinearOperator, OrthogonalConv
from robustflow.steps import (
    ContractiveStep,
    EulerStep,
    ExpansiveContractivePair,
    ExpansiveStep,
    FixedStepSizes,
    GradientStep,
    LearnedStepSizes,
    MassPreservingStep,
    VolumePreservingStep,
)


def _size(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _export(module: nn.Module) -> nn.Module:
    return module.export()


# ------------------------------------------------------------------------------ operators


#: ``(‖A‖, ‖|A|‖)`` per operator, with the state of the tensors they were computed from: a
#: measured forward applies every operator to each batch, and recomputing them (SVDs) each time
#: would cost more than the pass itself.
_NORMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _state(op: LinearOperator) -> tuple:
    """Identity, version and layout of every tensor of ``op``: any change to them changes this."""
    return tuple((t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape))
                 for t in (*op.parameters(), *op.buffers()))


def _norms(op: LinearOperator) -> tuple[float, float]:
    state = _state(op)
    cached = _NORMS.get(op)
    if cached is None or cached[0] != state:
        if isinstance(op, ConvOperator):
            abs_norm = conv_abs_norm(op.kernel())
        else:
            abs_norm = float(matrix_singular_values(op.weight.detach().abs())[0]) * (1 + SAFETY)
        cached = (state, op.singular_value_range()[1], abs_norm)
        _NORMS[op] = cached
    return cached[1], cached[2]


def _operator_bound(op: LinearOperator, io: IO) -> float:
    """``σ_max`` of the operator, exact (SVD, or the DFT of a circular convolution)."""
    return _norms(op)[0]


def _abs_norm(op: LinearOperator) -> float:
    """``‖|A|‖₂``, which the rounding error of ``A x`` and ``Aᵀ y`` is measured by."""
    return _norms(op)[1]


def _terms(op: LinearOperator) -> tuple[int, int]:
    """Products per output of ``A`` and of ``Aᵀ``."""
    if isinstance(op, ConvOperator):
        return op.in_shape[0] * op.kernel_size**2, op.out_shape[0] * op.kernel_size**2
    return op.in_shape[0], op.out_shape[0]


def _apply(op: LinearOperator, x: Tracked, adjoint: bool = False) -> Tracked:
    """``A x`` (or ``Aᵀ x``): an inner product of ``terms`` products per output."""
    forward, backward = _terms(op)
    size = _size(op.in_shape if adjoint else op.out_shape)
    return x.linear(_operator_bound(op, ([], [])), _abs_norm(op), backward if adjoint else forward,
                    size, apply=op.adjoint if adjoint else op)


def _operator_rounding(op: LinearOperator, io: IO, x: Tracked) -> Tracked:
    return _apply(op, x)


# ---------------------------------------------------------------------------------- steps


def _bias_norm(bias: nn.Parameter, shape: tuple[int, ...]) -> float:
    """``‖b‖`` of a bias broadcast over the positions of ``shape``."""
    return float(bias.detach().double().norm()) * math.sqrt(_size(shape) / bias.numel())


def _bias(step: ExpansiveStep | ContractiveStep | GradientStep | EulerStep, x: Tracked,
          shape: tuple[int, ...]) -> Tracked:
    """``z + b``: one sum per entry, ``b`` exact data."""
    return x.add_constant(step.bias, _bias_norm(step.bias, shape))


def _sigma(x: Tracked, shape: tuple[int, ...]) -> Tracked:
    """``Σ(z) = max{z, z/2}``: exact (a halving and a maximum), 1-Lipschitz."""
    return x.elementwise(1.0, 0.0, _size(shape), apply=sigma)


def _expansive(step: ExpansiveStep, x: Tracked, h: Tensor | float) -> Tracked:
    """``x + h Σ(W x + v)``: a product, a sum, Σ (exact: max and ×1/2), a product, a sum."""
    shape = step.W.out_shape
    inner = _sigma(_bias(step, _apply(step.W, x), shape), shape)
    return x.add(inner.scale(h, _size(shape)))


def _contractive(step: ContractiveStep | GradientStep, x: Tracked, h: Tensor | float) -> Tracked:
    """``x − h Aᵀ Σ(A x + b)``."""
    inner = _sigma(_bias(step, _apply(step.A, x), step.A.out_shape), step.A.out_shape)
    inner = _apply(step.A, inner, adjoint=True)
    return x.add(inner.scale(h, _size(step.A.in_shape)), subtract=True)


def _pair_bound(pair: ExpansiveContractivePair, io: IO) -> float:
    return ExpansiveContractivePair.lipschitz_bound(pair)


def _pair_rounding(pair: ExpansiveContractivePair, io: IO, x: Tracked) -> Tracked:
    h_e, h_c = (h.detach() for h in pair.step_sizes())  # the very step sizes of the forward
    return _contractive(pair.contractive, _expansive(pair.expansive, x, h_e), h_c)


def _expansive_bound(step: ExpansiveStep, io: IO) -> float:
    return ExpansiveStep.lipschitz_bound(step)


def _expansive_rounding(step: ExpansiveStep, io: IO, x: Tracked) -> Tracked:
    return _expansive(step, x, step.step_size)


def _contractive_bound(step: ContractiveStep, io: IO) -> float:
    return ContractiveStep.lipschitz_bound(step)


def _contractive_rounding(step: ContractiveStep, io: IO, x: Tracked) -> Tracked:
    return _contractive(step, x, step.step_size)


def _gradient_bound(step: GradientStep, io: IO) -> float:
    return GradientStep.lipschitz_bound(step)


def _gradient_rounding(step: GradientStep, io: IO, x: Tracked) -> Tracked:
    """``x − h Aᵀ Σ(A x + b)``, as the contractive step with any ``A``."""
    return _contractive(step, x, step.step_size)


def _euler_bound(step: EulerStep, io: IO) -> float:
    return EulerStep.lipschitz_bound(step)


def _euler_rounding(step: EulerStep, io: IO, x: Tracked) -> Tracked:
    """``x + h B Σ(A x + b)``."""
    inner = _sigma(_bias(step, _apply(step.A, x), step.A.out_shape), step.A.out_shape)
    inner = _apply(step.B, inner)
    return x.add(inner.scale(step.step_size, _size(step.B.out_shape)))


# ------------------------------------------------------------------------------- layers


def _centering_bound(layer: Centering, io: IO) -> float:
    """``x ↦ (x − μ)/σ``: ``1 / min σ``."""
    return 1.0 / float(layer.std.min().double()) * (1 + SAFETY)


def _centering_rounding(layer: Centering, io: IO, x: Tracked) -> Tracked:
    """A subtraction and a division (each correctly rounded)."""
    size = max((_size(s[1:]) for s in io[0]), default=layer.mean.numel())
    mean = float(layer.mean.detach().double().norm()) * math.sqrt(size / layer.mean.numel())
    return x.add(mean).scale(_centering_bound(layer, io), size)


def _normalized_linear_bound(layer: NormalizedLinear, io: IO) -> float:
    """``‖W‖₂`` of the normalised weight ``V / max(1, ‖V‖₂)``, by SVD."""
    return float(matrix_singular_values(layer.weight)[0]) * (1 + SAFETY)


def _normalized_linear_rounding(layer: NormalizedLinear, io: IO, x: Tracked) -> Tracked:
    """``W x + c`` as inner products of ``n + 1`` terms, like ``nn.Linear``."""
    from certify.bounds import _linear_rounding

    return _linear_rounding(layer, io, x)


def _sigma_rounding(layer: Sigma, io: IO, x: Tracked) -> Tracked:
    """``max{x, x/2}``: a halving (exact) and a maximum (exact)."""
    return x.elementwise(1.0, 0.0, max((_size(s[1:]) for s in io[1]), default=1), apply=sigma)


def _register() -> None:
    for cls in (ImageClassifier, LipschitzMLP, EulerMLP, VolumePreservingNet, MassPreservingNet):
        register_sequential(cls)
    for cls in (LearnedStepSizes, FixedStepSizes):
        register_component(cls)
    for cls in (DenseOperator, ConvOperator, OrthogonalConv, ChannelMix):
        register(cls, _operator_bound, rounding=_operator_rounding, freeze=_export, measured=True,
                 name=f"robustflow {cls.__name__}: exact σ_max (SVD / DFT of the circular kernel)")
    register(ExpansiveContractivePair, _pair_bound, rounding=_pair_rounding, freeze=_export, measured=True,
             name="robustflow ExpansiveContractivePair: (1 + |h_E|‖W‖) · max(|1 − h_C σ_max²|, "
                  "|1 − h_C σ_min²/2|)")
    register(ExpansiveStep, _expansive_bound, rounding=_expansive_rounding, freeze=_export,
             measured=True,
             name="robustflow ExpansiveStep: 1 + |h|‖W‖")
    register(ContractiveStep, _contractive_bound, rounding=_contractive_rounding, freeze=_export,
             measured=True,
             name="robustflow ContractiveStep: max(|1 − h σ_max²|, |1 − h σ_min²/2|)")
    register(GradientStep, _gradient_bound, rounding=_gradient_rounding, measured=True,
             name="robustflow GradientStep: max(|1 − h σ_max²|, |1 − h σ_min²/2|)")
    register(EulerStep, _euler_bound, rounding=_euler_rounding, freeze=_export, measured=True,
             name="robustflow EulerStep: 1 + |h|‖A‖‖B‖")
    register(VolumePreservingStep, lambda step, io: VolumePreservingStep.lipschitz_bound(step),
             name="robustflow VolumePreservingStep: (1 + |h|‖A‖)(1 + |h|‖B‖)")
    register(MassPreservingStep, lambda step, io: MassPreservingStep.lipschitz_bound(step),
             name="robustflow MassPreservingStep: 1 + |h|‖M‖‖U‖")
    register(Centering, _centering_bound, rounding=_centering_rounding,
             name="robustflow Centering: 1 / min σ")
    register(NormalizedLinear, _normalized_linear_bound, rounding=_normalized_linear_rounding,
             freeze=_export, name="robustflow NormalizedLinear: exact ‖W‖ (SVD)")
    register(Sigma, lambda layer, io: 1.0, rounding=_sigma_rounding, measured=True,
             name="robustflow Sigma: 1")


_register()
