"""Proven upper bounds on the global L2 Lipschitz constant of a network.

The bound of a composition is the product of the bounds of its parts,
``Lip(f_k ∘ … ∘ f_1) ≤ Π Lip(f_i)``. Every factor is an upper bound computed in
float64 and widened outwards (:data:`~certify.spectral.SAFETY`), and every product is
rounded upwards, so the result is never below the true constant. A part that cannot
be bounded raises :class:`NotCertifiable`; nothing is guessed.
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from itertools import chain

import torch
from torch import nn

from .spectral import (
    SAFETY,
    circular_conv_singular_values,
    matrix_singular_values,
    singular_value_range,
)

Shapes = dict[nn.Module, list[torch.Size]]


class NotCertifiable(ValueError):
    """A part of the model whose Lipschitz constant cannot be bounded.

    The message names the module's path in the model (``model.3``) and its type.
    """

    def __init__(self, path: str, module: nn.Module, reason: str) -> None:
        self.path, self.module_type = path, type(module).__name__
        super().__init__(f"{path} ({self.module_type}): {reason}")


def lipschitz_bound(model: nn.Module, input_shape: tuple[int, ...]) -> float:
    """Proven upper bound ``L`` with ``‖model(x) − model(x')‖₂ ≤ L ‖x − x'‖₂`` for all x, x'.

    ``input_shape`` excludes the batch dimension; one dummy forward pass in eval mode
    records the input shape of every submodule (convolutions need their grid size).
    A submodule with a callable ``lipschitz_bound()`` is trusted and not descended
    into; a top-level ``nn.Sequential`` is always composed from its children.
    The bound holds for the parameters and train/eval modes at the time of the call.
    """
    shapes = _input_shapes(model, input_shape)
    return _module_bound(model, "model", shapes, trust=not _is_plain(model, nn.Sequential))


def split_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """``(body, head)`` with ``model(x) = head(body(x))`` when ``model`` is a Sequential ending
    in a Linear layer (parametrised subclasses included), else ``None``."""
    if not (_is_plain(model, nn.Sequential) and len(model) > 0):
        return None
    *body, (_, head) = model._modules.items()
    if not _is_plain(head, nn.Linear):
        return None
    return nn.Sequential(OrderedDict(body)), head


def _input_shapes(model: nn.Module, input_shape: tuple[int, ...]) -> Shapes:
    """Input shapes of every submodule in one forward pass of zeros, in eval mode."""
    reference = next((t for t in chain(model.parameters(), model.buffers())
                      if t.is_floating_point()), None)
    device, dtype = (reference.device, reference.dtype) if reference is not None else ("cpu", None)
    shapes: Shapes = {}

    def record(module: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor):
            shapes.setdefault(module, []).append(args[0].shape)

    modes = {m: m.training for m in model.modules()}
    handles = [m.register_forward_pre_hook(record) for m in modes]
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device, dtype=dtype))
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return shapes


def _module_bound(module: nn.Module, path: str, shapes: Shapes, trust: bool = True) -> float:
    trusted = getattr(module, "lipschitz_bound", None)
    if trust and callable(trusted):
        value = float(trusted())
        if not (math.isfinite(value) and value >= 0):
            raise NotCertifiable(path, module, f"lipschitz_bound() returned {value}")
        return value
    if _is_plain(module, nn.Sequential):
        bound = 1.0
        for name, child in module._modules.items():
            # Round each product upwards so float64 rounding never lowers the bound.
            bound = math.nextafter(bound * _module_bound(child, f"{path}.{name}", shapes), math.inf)
        return bound
    rule = next((cls for cls in type(module).__mro__ if cls in _RULES), None)
    if rule is None:
        reason = ("has children but is not an nn.Sequential" if any(module.children())
                  else "is not a known layer and has no lipschitz_bound() method")
        raise NotCertifiable(path, module, reason)
    if not _is_plain(module, rule):
        raise NotCertifiable(path, module, f"overrides the forward of nn.{rule.__name__}")
    return _RULES[rule](module, path, shapes.get(module, []))


def _is_plain(module: nn.Module, cls: type[nn.Module]) -> bool:
    """``module`` is a ``cls`` whose forward is ``cls.forward`` (parametrised copies included)."""
    return isinstance(module, cls) and type(module).forward is cls.forward


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _widen(value: float) -> float:
    return value * (1.0 + SAFETY)


def _constant(value: float) -> Callable[..., float]:
    return lambda module, path, shapes: value


def _eval_only(value: float) -> Callable[..., float]:
    def rule(module: nn.Module, path: str, shapes: list[torch.Size]) -> float:
        if module.training:
            raise NotCertifiable(path, module, "is in training mode; call model.eval() first")
        return value
    return rule


def _linear(module: nn.Linear, path: str, shapes: list[torch.Size]) -> float:
    """``‖W‖₂`` exactly (largest singular value); the bias does not change differences."""
    return singular_value_range(matrix_singular_values(module.weight))[1]


def _conv2d(module: nn.Conv2d, path: str, shapes: list[torch.Size]) -> float:
    """Spectral norm of a 2-D convolution, exact for circular 'same' convolutions.

    Circular padding of ``d(k−1)`` in total per axis makes the stride-1 map exactly the
    circular convolution on the ``n1 × n2`` input grid (a shift of the kernel changes
    only phases), whose singular values :func:`circular_conv_singular_values` gives.

    Zero padding ``p``: write the map as ``x ↦ S C E x``, where ``E`` embeds the
    ``n``-grid into the zero-padded ``N = n + 2p`` grid (an isometry), ``C`` is the
    circular convolution on the ``N``-grid and ``S`` keeps the outputs
    ``i ∈ [0, N − k]``: there ``i + u ≤ N − 1`` for every tap ``u < k``, so no index
    wraps and ``C`` agrees with the zero-padded (valid) convolution. ``S`` selects
    coordinates, so ``‖S C E‖ ≤ ‖S‖‖C‖‖E‖ ≤ ‖C‖``.

    Stride ``s > 1`` keeps every s-th output of the stride-1 map: another coordinate
    selection, norm ≤ 1, so the same bound holds. Groups act on disjoint channel blocks
    (block-diagonal operator): the norm is the largest over groups. Dilation ``d`` is
    the ordinary convolution with the kernel dilated by inserting ``d − 1`` zeros.
    """
    weight = module.weight.detach()
    (d1, d2), (c_out, c_in, k1, k2) = module.dilation, weight.shape
    if (d1, d2) != (1, 1):
        dilated = weight.new_zeros(c_out, c_in, d1 * (k1 - 1) + 1, d2 * (k2 - 1) + 1)
        dilated[:, :, ::d1, ::d2] = weight
        weight = dilated
    span = (weight.shape[-2] - 1, weight.shape[-1] - 1)
    if isinstance(module.padding, str):
        total = span if module.padding == "same" else (0, 0)
    else:
        total = (2 * module.padding[0], 2 * module.padding[1])
    circular = module.padding_mode == "circular"
    if not (module.padding_mode == "zeros" or (circular and total == span)):
        raise NotCertifiable(path, module, f"padding_mode={module.padding_mode!r} with padding "
                             f"{module.padding} is not supported (use zeros, or circular 'same')")
    if not shapes:
        raise NotCertifiable(path, module, "was not called in the forward pass")
    grids = {(n1, n2) if circular else (n1 + total[0], n2 + total[1])
             for n1, n2 in (shape[-2:] for shape in shapes)}
    return max(singular_value_range(circular_conv_singular_values(block, grid))[1]
               for grid in grids for block in weight.chunk(module.groups, dim=0))


def _windows_per_pixel(kernel: tuple[int, int], stride: tuple[int, int],
                       dilation: tuple[int, int] = (1, 1)) -> int:
    """Most pooling windows containing one pixel.

    Along an axis, pixel ``i`` lies in the window starting at ``j·s`` iff ``i − j·s = a·d``
    for a tap ``a < k``: each tap gives at most one ``j``, and only when
    ``a·d ≡ i (mod s)``. So at most ``max_r #{a < k : a·d ≡ r (mod s)}`` windows (attained
    inside the image); the 2-D count is the product over the axes.
    """
    return math.prod(max(Counter(a * d % s for a in range(k)).values())
                     for k, s, d in zip(kernel, stride, dilation, strict=True))


def _max_pool2d(module: nn.MaxPool2d, path: str, shapes: list[torch.Size]) -> float:
    """``√c`` with ``c`` the most windows containing one pixel (1 for disjoint windows).

    Proof: ``|max_w x − max_w y| ≤ max_{i∈w} |x_i − y_i|``, hence
    ``‖Mx − My‖² ≤ Σ_w Σ_{i∈w} (x_i − y_i)² = Σ_i c_i (x_i − y_i)² ≤ c ‖x − y‖²``, where
    ``c_i`` counts the windows containing pixel ``i``. Implicit −∞ padding never wins a
    maximum, so the argument is unchanged by padding or ceil_mode.
    """
    count = _windows_per_pixel(_pair(module.kernel_size), _pair(module.stride),
                               _pair(module.dilation))
    return 1.0 if count == 1 else _widen(math.sqrt(count))


def _avg_pool2d(module: nn.AvgPool2d, path: str, shapes: list[torch.Size]) -> float:
    """``√(c / (k1 k2))`` with ``c`` as for max pooling: ``1/k`` for disjoint ``k × k`` windows.

    Proof: each output is ``(1/m) Σ_{i∈w} x_i`` with ``m = k1 k2`` and at most ``m`` terms,
    so by Cauchy–Schwarz its square is ``≤ (1/m) Σ_{i∈w} x_i²``; summing over windows,
    ``‖Ax‖² ≤ (1/m) Σ_i c_i x_i² ≤ (c/m) ‖x‖²``. This needs the divisor to be ``m`` for
    every window: no ceil_mode, no divisor_override, padding only with count_include_pad.
    """
    if module.ceil_mode or module.divisor_override is not None or (
            _pair(module.padding) != (0, 0) and not module.count_include_pad):
        raise NotCertifiable(path, module, "partial windows (ceil_mode, divisor_override or "
                             "count_include_pad=False with padding) are not supported")
    kernel = _pair(module.kernel_size)
    count = _windows_per_pixel(kernel, _pair(module.stride))
    return _widen(math.sqrt(count / math.prod(kernel)))


def _batch_norm(module: nn.BatchNorm2d, path: str, shapes: list[torch.Size]) -> float:
    """Eval mode: ``x ↦ γ (x − μ)/√(σ² + eps) + β`` per channel, norm ``max |γ|/√(σ² + eps)``."""
    if module.training or module.running_var is None:
        raise NotCertifiable(path, module, "uses batch statistics (training mode or no "
                             "running stats); call model.eval() first")
    scale = 1.0 / torch.sqrt(module.running_var.detach().double() + module.eps)
    if module.weight is not None:
        scale = scale * module.weight.detach().double()
    return _widen(float(scale.abs().max()))


_RULES: dict[type[nn.Module], Callable[..., float]] = {
    nn.Linear: _linear,
    nn.Conv2d: _conv2d,
    nn.MaxPool2d: _max_pool2d,
    nn.AvgPool2d: _avg_pool2d,
    nn.BatchNorm1d: _batch_norm,
    nn.BatchNorm2d: _batch_norm,
    nn.LeakyReLU: lambda module, path, shapes: max(1.0, abs(module.negative_slope)),
    nn.Dropout: _eval_only(1.0),
    nn.ReLU: _constant(1.0),
    nn.Tanh: _constant(1.0),
    nn.Sigmoid: _constant(0.25),  # σ' = σ(1 − σ) ≤ 1/4
    nn.Flatten: _constant(1.0),
    nn.Unflatten: _constant(1.0),
    nn.Identity: _constant(1.0),
    nn.PixelShuffle: _constant(1.0),
    nn.PixelUnshuffle: _constant(1.0),
}
