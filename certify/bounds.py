"""Proven upper bounds on the global L2 Lipschitz constant of a network, by known rules only.

The bound of a composition is the product of the bounds of its parts,
``Lip(f_k ∘ … ∘ f_1) ≤ Π Lip(f_i)``. Every factor is an upper bound computed in float64 and
widened outwards (:data:`~certify.spectral.SAFETY`), and every product is rounded upwards, so
the result is never below the true constant.

certify bounds only computations it knows. A module is bounded by the rule registered for its
exact type — torch's layers here, a library's or user's own layers through :func:`register` —
never by a method the module offers itself. Everything else is refused with
:class:`NotCertifiable` naming the module: unknown types, subclasses of known layers (they may
override ``forward`` or its internals), forward hooks and pre-hooks (the module's own or global
ones), methods replaced on an instance, and active torch function or dispatch modes.
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import chain

import torch
from torch import nn
from torch.nn.utils import parametrize

from .rounding import Affine, Measured, Tracked, exact_arithmetic, gamma, norm_bound
from .spectral import (
    SAFETY,
    circular_conv_singular_values,
    matrix_singular_values,
    singular_value_range,
)

#: ``(input shapes, output shapes)`` seen for a module in the recording forward pass.
IO = tuple[list[torch.Size], list[torch.Size]]
#: ``rule(module, io) -> L``: a proven bound of ``module``'s Lipschitz constant.
Rule = Callable[[nn.Module, IO], float]
#: ``rounding(module, io, tracked_input) -> tracked_output``: how its forward rounds.
Rounding = Callable[[nn.Module, IO, Tracked], Tracked]


class NotCertifiable(ValueError):
    """A part of the model whose Lipschitz constant cannot be bounded.

    The message names the module's path in the model (``model.3``) and its type.
    """

    def __init__(self, path: str, module: nn.Module, reason: str) -> None:
        self.path, self.module_type = path, _base_type(module).__name__
        super().__init__(f"{path} ({self.module_type}): {reason}")


@dataclass(frozen=True)
class Registration:
    """What certify knows about one module type.

    ``kind`` is ``"layer"`` (bounded by ``rule``; its forward rounds as ``rounding`` says),
    ``"sequential"`` (an ``nn.Sequential`` whose forward is the composition of its children in
    order) or ``"component"`` (only ever bounded as part of an enclosing layer's rule).
    ``freeze(module)`` returns an equivalent module whose input-independent values (assembled
    kernels, step sizes) are plain tensors, so the same function can be evaluated in float64.
    ``measured`` says that ``rounding`` also runs on :class:`~certify.rounding.Measured` values:
    it then computes the forward itself, operation by operation, and certificates bound its
    rounding from the norms the pass produced (certify checks that its outputs agree with the
    module's forward to within both rounding bounds, :func:`measured_rules`).
    """

    kind: str
    name: str
    rule: Rule | None = None
    rounding: Rounding | None = None
    freeze: Callable[[nn.Module], nn.Module] | None = None
    measured: bool = False


_REGISTRY: dict[type, Registration] = {}


def register(cls: type[nn.Module], rule: Rule, *, rounding: Rounding | None = None,
             freeze: Callable[[nn.Module], nn.Module] | None = None,
             name: str | None = None, measured: bool = False) -> None:
    """Declare that every module of exact type ``cls`` is bounded by ``rule(module, io)``.

    ``io`` is ``(input shapes, output shapes)`` from one recording forward pass. ``rounding``
    (optional) bounds the rounding error of the module's forward so that certificates can account
    for it (:mod:`certify.rounding`); without it the module can be bounded but not certified.
    ``measured=True`` declares that ``rounding`` passes each operation's function, constant and
    scalar to the tracked value, so that it also computes the forward on
    :class:`~certify.rounding.Measured` values (a per-sample, a-posteriori bound).
    Registering is a statement of trust: subclasses are not covered and must be registered
    themselves. The report names the rule (``name``, by default the rule's qualified name).
    """
    _check_class(cls)
    if not callable(rule):
        raise TypeError(f"rule for {cls.__name__} must be callable, got {rule!r}")
    if measured and rounding is None:
        raise TypeError(f"measured=True for {cls.__name__} needs a rounding rule")
    _REGISTRY[cls] = Registration("layer", name or _qualified(rule), rule, rounding, freeze,
                                  measured)


def register_sequential(cls: type[nn.Sequential]) -> None:
    """Declare that ``cls`` (an ``nn.Sequential`` subclass) computes the composition of its
    children in order, so it is bounded by the product of their bounds."""
    _check_class(cls)
    if not issubclass(cls, nn.Sequential):
        raise TypeError(f"{cls.__name__} is not an nn.Sequential")
    _REGISTRY[cls] = Registration("sequential", "composition")


def register_component(cls: type[nn.Module], *,
                       freeze: Callable[[nn.Module], nn.Module] | None = None) -> None:
    """Declare ``cls`` a known part of registered layers (e.g. a module producing step sizes)."""
    _check_class(cls)
    _REGISTRY[cls] = Registration("component", "component", freeze=freeze)


def registration(module: nn.Module) -> Registration | None:
    """What certify knows about ``module``'s exact type (parametrised copies included)."""
    return _REGISTRY.get(_base_type(module))


def _check_class(cls: type) -> None:
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"can only register nn.Module classes, got {cls!r}")


def _qualified(function: Callable) -> str:
    return f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', function)}"


def _base_type(module: nn.Module) -> type:
    """The class of ``module``, looking through torch's parametrisation wrapper class."""
    cls = type(module)
    if parametrize.is_parametrized(module) and cls.__name__.startswith("Parametrized"):
        return cls.__bases__[0]
    return cls


# ---------------------------------------------------------------------------- the analysis


@dataclass(frozen=True)
class Part:
    """One bounded part of a model: a leaf of the composition certify computes."""

    path: str
    module: nn.Module
    bound: float
    rule: str


def lipschitz_bound(model: nn.Module, input_shape: tuple[int, ...]) -> float:
    """Proven upper bound ``L`` with ``‖model(x) − model(x')‖₂ ≤ L ‖x − x'‖₂`` for all x, x'.

    ``input_shape`` excludes the batch dimension; one recording forward pass in eval mode
    gives every submodule's input and output shapes (convolutions need their grid). The bound
    holds for the parameters and train/eval modes at the time of the call.
    """
    return product(part.bound for part in analyse(model, input_shape))


def product(bounds: Iterable[float]) -> float:
    """``Π bounds``, every product rounded upwards."""
    total = 1.0
    for bound in bounds:
        total = math.nextafter(total * bound, math.inf)
    return total


def analyse(model: nn.Module, input_shape: tuple[int, ...]) -> list[Part]:
    """Check ``model`` and bound each of its leaves, in the order the forward applies them."""
    check_trusted(model)
    io = _record_io(model, input_shape)
    return [Part(path, module, _leaf_bound(module, path, io), registration(module).name)
            for path, module in leaves(model)]


def leaves(model: nn.Module, path: str = "model") -> list[tuple[str, nn.Module]]:
    """The layers of ``model`` in the order of its forward, registered sequentials flattened."""
    reg = registration(model)
    if reg is not None and reg.kind == "sequential":
        return [leaf for name, child in model._modules.items()
                for leaf in leaves(child, f"{path}.{name}")]
    return [(path, model)]


def check_trusted(model: nn.Module) -> None:
    """Refuse (:class:`NotCertifiable`) anything certify cannot see the computation of."""
    _check_no_modes(model)
    for name, hooks in (("forward hook", nn.modules.module._global_forward_hooks),
                        ("forward pre-hook", nn.modules.module._global_forward_pre_hooks)):
        if hooks:
            raise NotCertifiable("model", model, f"a global {name} is registered "
                                 "(torch.nn.modules.module.register_module_{name.replace(' ', '_')})"
                                 "; remove it before certifying")
    _check_tree(model, "model", inside=None)


def _check_no_modes(model: nn.Module) -> None:
    from torch.overrides import _get_current_function_mode_stack
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    if _get_current_function_mode_stack() or _get_current_dispatch_mode_stack():
        raise NotCertifiable("model", model, "a torch function or dispatch mode is active, which "
                             "may change every operation; certify outside it")


def _check_tree(module: nn.Module, path: str, inside: str | None) -> None:
    reg = registration(module)
    if reg is None:
        raise NotCertifiable(path, module, _unknown_reason(module))
    if reg.kind == "component" and inside is None:
        raise NotCertifiable(path, module, "is only known as a part of a registered layer")
    if module._forward_hooks or module._forward_pre_hooks:
        raise NotCertifiable(path, module, "has a forward hook or pre-hook, which can change its "
                             "output; remove it before certifying")
    cls = _base_type(module)
    if _base_type(module) is not type(module):
        extra = {name for name, value in vars(type(module)).items()
                 if (callable(value) or isinstance(value, property))
                 and name not in module.parametrizations
                 and name not in ("__getstate__", "__deepcopy__")}  # what torch's wrapper adds
        if extra:
            raise NotCertifiable(path, module, f"its parametrised class also defines {sorted(extra)}")
    for attribute, value in vars(module).items():
        if callable(value) and not isinstance(value, (nn.Module, torch.Tensor)) and \
                callable(getattr(cls, attribute, None)):
            raise NotCertifiable(path, module, f"replaces {cls.__name__}.{attribute} on the "
                                 "instance; certify bounds only the class's own computation")
    enclosing = inside if reg.kind == "sequential" else (inside or path)
    for name, child in module._modules.items():
        if child is None or (name == "parametrizations" and parametrize.is_parametrized(module)):
            continue  # a weight's parametrisation: the rule sees the weight it produces
        _check_tree(child, f"{path}.{name}", enclosing)


def _unknown_reason(module: nn.Module) -> str:
    known = next((c for c in type(module).__mro__[1:] if c in _REGISTRY), None)
    if known is not None:
        return (f"is a subclass of {known.__module__}.{known.__name__}, which may override its "
                "forward or internals; certify bounds only registered types "
                "(certify.register(cls, rule) if you vouch for it)")
    return ("is not a type certify knows; register it with certify.register(cls, rule) "
            "(or certify.register_sequential for a composition)")


def _record_io(model: nn.Module, input_shape: tuple[int, ...]) -> dict[nn.Module, IO]:
    """Input and output shapes of every submodule in one forward pass of zeros, in eval mode."""
    reference = next((t for t in chain(model.parameters(), model.buffers())
                      if t.is_floating_point()), None)
    device, dtype = (reference.device, reference.dtype) if reference is not None else ("cpu", None)
    io: dict[nn.Module, IO] = {}

    def record_in(module: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor):
            io.setdefault(module, ([], []))[0].append(args[0].shape)

    def record_out(module: nn.Module, args: tuple, output: object) -> None:
        if isinstance(output, torch.Tensor):
            io.setdefault(module, ([], []))[1].append(output.shape)

    modes = {m: m.training for m in model.modules()}
    handles = [h for m in modes for h in (m.register_forward_pre_hook(record_in),
                                          m.register_forward_hook(record_out))]
    try:
        model.eval()
        with torch.no_grad(), exact_arithmetic():
            model(torch.zeros(1, *input_shape, device=device, dtype=dtype))
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return io


def _leaf_bound(module: nn.Module, path: str, io: dict[nn.Module, IO]) -> float:
    reg = registration(module)
    if reg.kind != "layer":
        raise NotCertifiable(path, module, f"a {reg.kind} cannot be bounded on its own")
    try:
        value = float(reg.rule(module, io.get(module, ([], []))))
    except NotCertifiable:
        raise
    except ValueError as err:
        raise NotCertifiable(path, module, str(err)) from None
    if not (math.isfinite(value) and value >= 0):
        raise NotCertifiable(path, module, f"its rule {reg.name} gave {value}")
    return value


def local_rounding(parts: list[Part], io_model: nn.Module, input_shape: tuple[int, ...],
                   dtype: torch.dtype) -> list[Tracked]:
    """Each part's own rounding in ``dtype``, as a function of its input's norm: the computed
    ``f̃_k(y)`` is within ``e_k(‖y‖)`` (``.error``) of ``f_k(y)`` for every ``y``; ``.products``
    counts its multiply-adds per sample.

    Raises :class:`NotCertifiable` for a part without a rounding rule.
    """
    io = _record_io(io_model, input_shape)
    tracked = []
    for part in parts:
        reg = registration(part.module)
        if reg.rounding is None:
            raise NotCertifiable(part.path, part.module, "has no rounding rule, so a margin "
                                 "computed by it cannot be certified; register it with rounding=")
        tracked.append(reg.rounding(part.module, io.get(part.module, ([], [])),
                                    Tracked.input(dtype)))
    return tracked


def _measured_rule(rounding: Rounding, module: nn.Module, shapes: IO
                  ) -> Callable[[torch.Tensor], Measured]:
    def run(inputs: torch.Tensor) -> Measured:
        return rounding(module, shapes, Measured.input(inputs))
    return run


def measured_rules(model: nn.Module, input_shape: tuple[int, ...]
                   ) -> dict[str, Callable[[torch.Tensor], Measured]]:
    """For every leaf registered with ``measured=True`` (by path): a function that runs its
    rounding rule on :class:`~certify.rounding.Measured` values, computing the leaf's output and a
    per-sample bound on its own rounding error.

    Each rule is first run on a random batch beside the leaf's forward: both compute the same
    function, so they must agree to within the sum of their rounding bounds (the rule's measured
    one and the forward's a-priori one; run to run they are usually bit for bit equal). A rule
    that computes anything else is refused with :class:`NotCertifiable`.
    """
    io = _record_io(model, input_shape)
    reference = next((t for t in chain(model.parameters(), model.buffers())
                      if t.is_floating_point()), None)
    device, dtype = (reference.device, reference.dtype) if reference is not None else ("cpu", None)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(2, *input_shape, generator=generator, dtype=torch.float64).to(device, dtype)
    rules: dict[str, Callable[[torch.Tensor], Measured]] = {}
    with torch.no_grad(), exact_arithmetic():
        for path, module in leaves(model):
            reg = registration(module)
            y = module(x)
            if reg is not None and reg.measured:
                shapes = io.get(module, ([], []))
                run = _measured_rule(reg.rounding, module, shapes)
                measured = run(x)
                forward = reg.rounding(module, shapes, Tracked.input(x.dtype)).error
                allowed = measured.error + forward.const + forward.slope * norm_bound(x)
                if measured.value.shape != y.shape or \
                        (norm_bound(measured.value.double() - y.double()) > allowed).any():
                    raise NotCertifiable(path, module, "its measured rounding rule computes other "
                                         "outputs than its forward; fix the rule")
                rules[path] = run
            x = y
    return rules


def split_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """``(body, head)`` with ``model(x) = head(body(x))`` when ``model`` is a registered
    sequential ending in an ``nn.Linear`` (parametrised copies included), else ``None``."""
    reg = registration(model)
    if reg is None or reg.kind != "sequential" or len(model) == 0:
        return None
    *body, (_, head) = model._modules.items()
    if _base_type(head) is not nn.Linear:
        return None
    return nn.Sequential(OrderedDict(body)), head


def freeze(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every input-independent value materialised as a plain tensor:
    registered ``freeze`` functions applied, parametrisations removed (their current value kept).
    Its forward is the same computation on the same numbers."""
    import copy

    with torch.no_grad():  # the values inference computes (some maps differ under autograd)
        reg = registration(model)
        if reg is not None and reg.freeze is not None:
            frozen = reg.freeze(model)
        else:
            frozen = copy.deepcopy(model)
            for name, child in list(frozen._modules.items()):
                if child is not None and not (name == "parametrizations"
                                              and parametrize.is_parametrized(frozen)):
                    frozen._modules[name] = freeze(child)
        for module in list(frozen.modules()):
            if parametrize.is_parametrized(module):
                for tensor in list(module.parametrizations):
                    parametrize.remove_parametrizations(module, tensor, leave_parametrized=True)
    return frozen


# ------------------------------------------------------------------- rules for torch's layers


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _widen(value: float) -> float:
    return value * (1.0 + SAFETY)


def _numel(shapes: list[torch.Size]) -> int:
    """Entries per sample of the largest recorded shape (1 if none was recorded)."""
    return max((math.prod(shape[1:]) for shape in shapes), default=1)


def _constant(value: float) -> Rule:
    def rule(module: nn.Module, io: IO) -> float:
        return value
    rule.__qualname__ = f"constant {value:g}"
    return rule


def _eval_only(value: float) -> Rule:
    def rule(module: nn.Module, io: IO) -> float:
        if module.training:
            raise ValueError("is in training mode; call model.eval() first")
        return value
    rule.__qualname__ = f"eval-mode identity ({value:g})"
    return rule


def _exact(module: nn.Module, io: IO, x: Tracked) -> Tracked:
    """A permutation, reshape or identity: no rounding."""
    return x


def linear(module: nn.Linear, io: IO) -> float:
    """``‖W‖₂`` exactly (largest singular value); the bias does not change differences."""
    return singular_value_range(matrix_singular_values(module.weight))[1]


def _linear_rounding(module: nn.Linear, io: IO, x: Tracked) -> Tracked:
    """``W x + b`` as inner products of ``n + 1`` terms (the bias is one of them)."""
    weight = module.weight.detach()
    abs_norm = _widen(float(matrix_singular_values(weight.abs())[0]))
    bias = 0.0 if module.bias is None else float(module.bias.detach().double().norm())
    terms = weight.shape[1] + (module.bias is not None)
    local = x._computed().scale(gamma(terms, x.u) * abs_norm).plus(
        gamma(terms, x.u) * bias + terms * x.tiny * math.sqrt(weight.shape[0]))
    norm = linear(module, io)
    return Tracked(x.value.scale(norm).plus(bias), x.error.scale(norm) + local, x.u, x.tiny,
                   x.products + terms * weight.shape[0])


def conv2d(module: nn.Conv2d, io: IO) -> float:
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
        raise ValueError(f"padding_mode={module.padding_mode!r} with padding {module.padding} is "
                         "not supported (use zeros, or circular 'same')")
    shapes = io[0]
    if not shapes:
        raise ValueError("was not called in the forward pass")
    grids = {(n1, n2) if circular else (n1 + total[0], n2 + total[1])
             for n1, n2 in (shape[-2:] for shape in shapes)}
    return max(singular_value_range(circular_conv_singular_values(block, grid))[1]
               for grid in grids for block in weight.chunk(module.groups, dim=0))


def conv_abs_norm(kernel: torch.Tensor, groups: int = 1) -> float:
    """``‖|A|‖₂`` of a convolution with ``kernel`` (any padding, stride or grid).

    ``|A|`` is dominated entrywise by the circular convolution with ``|K|``, a non-negative
    operator whose norm is attained at frequency 0 (``|K̂(ω)| ≤ K̂(0)`` entrywise): the norm of
    ``Σ_taps |K_u|``, the largest over groups.
    """
    summed = kernel.detach().double().abs().sum(dim=(2, 3))
    return _widen(max(float(matrix_singular_values(block)[0]) for block in summed.chunk(groups)))


def _conv2d_rounding(module: nn.Conv2d, io: IO, x: Tracked) -> Tracked:
    weight = module.weight.detach()
    terms = weight.shape[1] * weight.shape[2] * weight.shape[3] + (module.bias is not None)
    size = _numel(io[1])
    bias = 0.0 if module.bias is None else float(module.bias.detach().double().norm()) * math.sqrt(
        size / weight.shape[0])
    g = gamma(terms, x.u)
    local = x._computed().scale(g * conv_abs_norm(weight, module.groups)).plus(
        g * bias + terms * x.tiny * math.sqrt(size))
    norm = conv2d(module, io)
    return Tracked(x.value.scale(norm).plus(bias), x.error.scale(norm) + local, x.u, x.tiny,
                   x.products + terms * size)


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


def max_pool2d(module: nn.MaxPool2d, io: IO) -> float:
    """``√c`` with ``c`` the most windows containing one pixel (1 for disjoint windows).

    Proof: ``|max_w x − max_w y| ≤ max_{i∈w} |x_i − y_i|``, hence
    ``‖Mx − My‖² ≤ Σ_w Σ_{i∈w} (x_i − y_i)² = Σ_i c_i (x_i − y_i)² ≤ c ‖x − y‖²``, where
    ``c_i`` counts the windows containing pixel ``i``. Implicit −∞ padding never wins a
    maximum, so the argument is unchanged by padding or ceil_mode.
    """
    count = _windows_per_pixel(_pair(module.kernel_size), _pair(module.stride),
                               _pair(module.dilation))
    return 1.0 if count == 1 else _widen(math.sqrt(count))


def _lipschitz_rounding(rule: Rule, relative: float = 0.0) -> Rounding:
    """Rounding of an entrywise-exact map (max, ReLU, a permutation) of Lipschitz bound ``rule``,
    with ``|f(t)| ≤ L |t|``; ``relative`` is its accuracy in units of ``u``."""
    def rounding(module: nn.Module, io: IO, x: Tracked) -> Tracked:
        return x.elementwise(rule(module, io), relative * x.u, _numel(io[1]))
    return rounding


def avg_pool2d(module: nn.AvgPool2d, io: IO) -> float:
    """``√(c / (k1 k2))`` with ``c`` as for max pooling: ``1/k`` for disjoint ``k × k`` windows.

    Proof: each output is ``(1/m) Σ_{i∈w} x_i`` with ``m = k1 k2`` and at most ``m`` terms,
    so by Cauchy–Schwarz its square is ``≤ (1/m) Σ_{i∈w} x_i²``; summing over windows,
    ``‖Ax‖² ≤ (1/m) Σ_i c_i x_i² ≤ (c/m) ‖x‖²``. This needs the divisor to be ``m`` for
    every window: no ceil_mode, no divisor_override, padding only with count_include_pad.
    """
    if module.ceil_mode or module.divisor_override is not None or (
            _pair(module.padding) != (0, 0) and not module.count_include_pad):
        raise ValueError("partial windows (ceil_mode, divisor_override or count_include_pad=False "
                         "with padding) are not supported")
    kernel = _pair(module.kernel_size)
    count = _windows_per_pixel(kernel, _pair(module.stride))
    return _widen(math.sqrt(count / math.prod(kernel)))


def _avg_pool2d_rounding(module: nn.AvgPool2d, io: IO, x: Tracked) -> Tracked:
    """A non-negative linear map (``|A| = A``): a sum of ``m`` terms and one division."""
    m = math.prod(_pair(module.kernel_size))
    norm = avg_pool2d(module, io)
    return x.linear(norm, norm, m + 1, _numel(io[1]))


def batch_norm(module: nn.BatchNorm2d, io: IO) -> float:
    """Eval mode: ``x ↦ γ (x − μ)/√(σ² + eps) + β`` per channel, norm ``max |γ|/√(σ² + eps)``."""
    if module.training or module.running_var is None:
        raise ValueError("uses batch statistics (training mode or no running stats); call "
                         "model.eval() first")
    return _widen(float(_bn_scale(module).abs().max()))


def _bn_scale(module: nn.BatchNorm2d) -> torch.Tensor:
    scale = 1.0 / torch.sqrt(module.running_var.detach().double() + module.eps)
    if module.weight is not None:
        scale = scale * module.weight.detach().double()
    return scale


def _batch_norm_rounding(module: nn.BatchNorm2d, io: IO, x: Tracked) -> Tracked:
    """At most 8 roundings per entry (a square root, a division, products and sums of the
    per-channel constants), each relative to ``|s||x| + |μ s| + |β|``."""
    scale = _bn_scale(module).abs()
    shift = (module.running_mean.detach().double().abs() * scale).max()
    if module.bias is not None:
        shift = shift + module.bias.detach().double().abs().max()
    size = _numel(io[1])
    lipschitz = batch_norm(module, io)
    shift_norm = float(shift) * math.sqrt(size)
    local = x._computed().scale(lipschitz).plus(shift_norm).scale(gamma(8, x.u)).plus(
        x.tiny * math.sqrt(size))
    return Tracked(x.value.scale(lipschitz).plus(shift_norm), x.error.scale(lipschitz) + local,
                   x.u, x.tiny, x.products)


def leaky_relu(module: nn.LeakyReLU, io: IO) -> float:
    return max(1.0, abs(module.negative_slope))


def _leaky_relu_rounding(module: nn.LeakyReLU, io: IO, x: Tracked) -> Tracked:
    slope = module.negative_slope
    exact = slope != 0 and math.frexp(abs(slope))[0] == 0.5  # a power of two: exact product
    return x.elementwise(leaky_relu(module, io), 0.0 if exact else x.u, _numel(io[1]))


def _tanh_rounding(module: nn.Module, io: IO, x: Tracked) -> Tracked:
    """``|tanh t| ≤ |t|``; torch's vectorised tanh is accurate to a few ulp (8u assumed)."""
    return x.elementwise(1.0, 8 * x.u, _numel(io[1]))


def _sigmoid_rounding(module: nn.Module, io: IO, x: Tracked) -> Tracked:
    """Outputs lie in [0, 1]; accurate to a few ulp (8u assumed)."""
    size = _numel(io[1])
    bound = Affine(math.sqrt(size), 0.0)
    return x.elementwise(0.25, 8 * x.u, size, value_bound=bound)


def _register_torch_layers() -> None:
    for cls in (nn.Sequential,):
        register_sequential(cls)
    register(nn.Linear, linear, rounding=_linear_rounding, name="nn.Linear: exact ‖W‖ (SVD)")
    register(nn.Conv2d, conv2d, rounding=_conv2d_rounding,
             name="nn.Conv2d: exact spectrum of the (padded) circular convolution")
    register(nn.MaxPool2d, max_pool2d, rounding=_lipschitz_rounding(max_pool2d),
             name="nn.MaxPool2d: √(windows per pixel)")
    register(nn.AvgPool2d, avg_pool2d, rounding=_avg_pool2d_rounding,
             name="nn.AvgPool2d: √(windows per pixel / window size)")
    for cls in (nn.BatchNorm1d, nn.BatchNorm2d):
        register(cls, batch_norm, rounding=_batch_norm_rounding,
                 name=f"nn.{cls.__name__}: max |γ|/√(σ² + eps), eval mode")
    register(nn.LeakyReLU, leaky_relu, rounding=_leaky_relu_rounding,
             name="nn.LeakyReLU: max(1, |slope|)")
    register(nn.Dropout, _eval_only(1.0), rounding=_exact, name="nn.Dropout: identity in eval mode")
    register(nn.ReLU, _constant(1.0), rounding=_lipschitz_rounding(_constant(1.0)),
             name="nn.ReLU: 1")
    register(nn.Tanh, _constant(1.0), rounding=_tanh_rounding, name="nn.Tanh: 1")
    register(nn.Sigmoid, _constant(0.25), rounding=_sigmoid_rounding,
             name="nn.Sigmoid: 1/4")  # σ' = σ(1 − σ) ≤ 1/4
    for cls in (nn.Flatten, nn.Unflatten, nn.Identity, nn.PixelShuffle, nn.PixelUnshuffle):
        register(cls, _constant(1.0), rounding=_exact, name=f"nn.{cls.__name__}: a permutation, 1")


_register_torch_layers()
