"""Peer 1-Lipschitz networks for the side-by-side benchmarks, and how ``certify`` bounds them.

Two peers, each sized so that its parameter count is closest to robustflow's default preset:

* ``sll``: SDP-based Lipschitz layers (SLL, Araujo et al. 2023) from orthogonium —
  ``x ↦ x − 2 Kᵀ ReLU(K x + b)`` residual blocks whose kernel ``K`` is AOL-rescaled, an
  orthogonal 1×1 lift, space-to-depth + orthogonal 1×1 mixes between stages and an
  ``OrthoLinear`` head (the same layout as robustflow's networks).
* ``torchlip``: a plain (non-residual) deel-torchlip network — ``SpectralConv2d`` 3×3
  layers with ``GroupSort2``, ``InvertibleDownSampling`` + 1×1 ``SpectralConv2d`` between
  stages and a ``SpectralLinear`` head.

Both take pixels in [0, 1] and centre them by the CIFAR-10 mean inside the model, as
robustflow does. :func:`export_peer` turns a trained peer into plain modules with identical
outputs whose every part ``certify.lipschitz_bound`` bounds with a proven, exact-spectrum
bound (never power iteration): plain ``Conv2d``/``Linear`` for the orthogonium and
deel-torchlip layers, :class:`PlainSLLBlock` and :class:`SortActivation` (below) for the
rest.
"""

from __future__ import annotations

import copy
import math
import time
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.data import DistributedSampler

from certify import circular_conv_singular_values, singular_value_range
from robustflow.data import ImageSet, augment
from robustflow.layers import Centering
from robustflow.losses import make_loss
from robustflow.networks import CIFAR10_MEAN, build_model, preset
from robustflow.train import TrainConfig, learning_rate, optimizer_step, weight_average

PEERS = ("sll", "torchlip")


# ------------------------------------------------------------------ proven bounds


def sll_block_bound(kernel: Tensor, padding: int, grid: tuple[int, int]) -> float:
    """Proven L2 bound of ``x ↦ x − 2 Kᵀ ReLU(K x + b)`` with ``K`` the zero-padded convolution.

    ``K`` is ``conv2d(·, kernel, padding)`` on an ``n1 × n2`` grid (stride 1, odd kernel,
    'same' size) and ``Kᵀ`` its exact adjoint ``conv_transpose2d(·, kernel, padding)``.
    Every element of the (Clarke) Jacobian is ``J = I − 2 Kᵀ D K`` with ``D`` diagonal in
    [0, 1] (ReLU), a symmetric matrix whose eigenvalues lie in ``[1 − 2‖K‖², 1]``, so
    ``‖J‖ ≤ max(1, 2‖K‖² − 1)``. ``‖K‖`` is bounded exactly (up to :data:`~certify.SAFETY`)
    by the circular convolution on the ``(n + 2p)`` grid, as :func:`certify.lipschitz_bound`
    does for zero-padded convolutions. The original SLL form ``x − 2 W T⁻¹ σ(Wᵀx + b)``
    is this one with ``K = T^{-1/2} Wᵀ`` (ReLU is positively homogeneous); orthogonium's
    AOL rescaling of ``kernel`` plays the role of ``T^{-1/2}``, so its proof gives ``‖K‖ ≤ 1``
    and this bound is 1 whenever that holds.
    """
    k1, k2 = kernel.shape[-2:]
    if k1 % 2 == 0 or k2 % 2 == 0 or 2 * padding != k1 - 1 or k1 != k2:
        raise ValueError(f"need an odd square kernel with 'same' padding, got {tuple(kernel.shape)}"
                         f" and padding {padding}")
    grid_padded = (int(grid[0]) + 2 * padding, int(grid[1]) + 2 * padding)
    norm = singular_value_range(circular_conv_singular_values(kernel, grid_padded))[1]
    return max(1.0, math.nextafter(2.0 * norm * norm - 1.0, math.inf))


class SLLBlock(nn.Module):
    """orthogonium's ``SDPBasedLipschitzResBlock`` on a fixed ``size × size`` grid, plus a
    proven :meth:`lipschitz_bound` (:func:`sll_block_bound`) and an :meth:`export`."""

    def __init__(self, channels: int, size: int, inner_factor: float = 1.0,
                 kernel_size: int = 3) -> None:
        from orthogonium.layers.conv.SLL import SDPBasedLipschitzResBlock

        super().__init__()
        self.size = int(size)
        self.block = SDPBasedLipschitzResBlock(channels, inner_factor, kernel_size)
        del self.block.q  # declared by orthogonium but unused in its forward

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != (self.size, self.size):
            raise ValueError(f"SLLBlock built for {self.size}×{self.size} inputs, got {tuple(x.shape)}")
        return self.block(x)

    def lipschitz_bound(self) -> float:
        """Proven bound from the current (AOL-rescaled) kernel."""
        return sll_block_bound(self.block.kernel.detach(), self.block.padding, (self.size,) * 2)

    def export(self) -> PlainSLLBlock:
        with torch.no_grad():
            return PlainSLLBlock(self.block.kernel.detach().clone(),
                                 self.block.bias.detach().clone(), self.block.padding, self.size)


class PlainSLLBlock(nn.Module):
    """``x − 2 conv_transpose2d(ReLU(conv2d(x, K) + b), K)`` with fixed tensors (an exported SLL)."""

    def __init__(self, kernel: Tensor, bias: Tensor, padding: int, size: int) -> None:
        super().__init__()
        self.register_buffer("kernel", kernel)
        self.register_buffer("bias", bias.reshape(1, -1, 1, 1))
        self.padding, self.size = int(padding), int(size)

    def forward(self, x: Tensor) -> Tensor:
        inner = F.relu(F.conv2d(x, self.kernel, padding=self.padding) + self.bias)
        return x - 2 * F.conv_transpose2d(inner, self.kernel, padding=self.padding)

    def lipschitz_bound(self) -> float:
        return sll_block_bound(self.kernel, self.padding, (self.size,) * 2)


class SortActivation(nn.Module):
    """A deel-torchlip ``GroupSort``/``GroupSort2``/``FullSort``/``MaxMin`` with its bound.

    Sorting (within groups) is 1-Lipschitz in L2: for any two vectors, pairing sorted with
    sorted minimises ``Σ (a_i − b_π(i))²`` (rearrangement inequality), so
    ``‖sort a − sort b‖ ≤ ‖a − b‖``. MaxMin maps ``x ↦ (ReLU(x), ReLU(−x))``:
    ``(ReLU a − ReLU b)² + (ReLU(−a) − ReLU(−b))² ≤ (a − b)²`` per coordinate. torchlip
    multiplies the output by ``k_coef_lip``, so the bound is ``|k_coef_lip|``.
    """

    def __init__(self, activation: nn.Module) -> None:
        from deel.torchlip import GroupSort, MaxMin

        super().__init__()
        if not isinstance(activation, GroupSort | MaxMin):
            raise TypeError(f"not a sorting activation: {type(activation).__name__}")
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        return self.activation(x)

    def lipschitz_bound(self) -> float:
        return abs(float(self.activation._coefficient_lip))


# --------------------------------------------- certify's rules for the exported parts


def _sll_rule(block: PlainSLLBlock, io) -> float:
    return sll_block_bound(block.kernel, block.padding, (block.size,) * 2)


def _sll_rounding(block: PlainSLLBlock, io, x):
    """``x − 2 Kᵀ ReLU(K x + b)``: two convolutions, a bias, an exact ReLU and ×2 (exact)."""
    from certify.bounds import conv_abs_norm

    c_out, c_in, k1, k2 = block.kernel.shape
    size_in = c_in * block.size * block.size
    size_out = c_out * block.size * block.size
    norm = singular_value_range(circular_conv_singular_values(
        block.kernel, (block.size + 2 * block.padding,) * 2))[1]
    absolute = conv_abs_norm(block.kernel)
    inner = x.linear(norm, absolute, c_in * k1 * k2, size_out).add(
        float(block.bias.double().norm()) * block.size)
    inner = inner.elementwise(1.0, 0.0, size_out).linear(norm, absolute, c_out * k1 * k2, size_in)
    return x.add(inner.scale(2.0, size_in))


def _sort_rule(activation: SortActivation, io) -> float:
    return abs(float(activation.activation._coefficient_lip))


def _sort_rounding(activation: SortActivation, io, x):
    """Sorting and ReLU are exact; torchlip then multiplies by ``k_coef_lip`` (one rounding)."""
    size = max(math.prod(shape[1:]) for shape in io[1])
    return x.elementwise(_sort_rule(activation, io), x.u, size)


def register_peer_rules() -> None:
    """Tell ``certify`` how to bound the exported peers' own parts (the proofs are in the
    docstrings of :func:`sll_block_bound` and :class:`SortActivation`). Called on import: the
    benchmarks vouch for these classes knowingly, as any user of ``certify.register`` does."""
    from certify import register, register_component

    register(PlainSLLBlock, _sll_rule, rounding=_sll_rounding,
             name="benchmarks PlainSLLBlock: max(1, 2‖K‖² − 1)")
    register(SortActivation, _sort_rule, rounding=_sort_rounding,
             name="benchmarks SortActivation: |k_coef_lip|")
    try:
        from deel.torchlip import FullSort, GroupSort, GroupSort2, MaxMin
    except ImportError:  # the peers' extra is not installed: nothing of theirs to bound
        return
    for cls in (GroupSort, GroupSort2, FullSort, MaxMin):
        register_component(cls)


register_peer_rules()


# ------------------------------------------------------------------ builders


def robustflow_parameters() -> int:
    """Parameter count of robustflow's default preset (``TrainConfig().preset``), now."""
    return count_parameters(build_model(preset(TrainConfig().preset)))


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (parametrised weights counted once, as their originals)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _stage_widths(width: int, stages: int) -> list[int]:
    return [width * 2 ** min(i, 2) for i in range(stages)]


def stage_counts(per_stage: int | tuple[int, ...], stages: int) -> tuple[int, ...]:
    """Blocks of each stage: one count for all, or one per stage (robustflow's ``steps_per_stage``)."""
    if isinstance(per_stage, int):
        return (per_stage,) * stages
    if len(per_stage) != stages:
        raise ValueError(f"{len(per_stage)} block counts for {stages} stages")
    return tuple(per_stage)


def build_sll(width: int = 16, blocks_per_stage: int | tuple[int, ...] = 2, stages: int = 3,
              image_size: int = 32, inner_factor: float = 1.0, num_classes: int = 10,
              stem: str = "lift") -> nn.Sequential:
    """An SLL network from orthogonium layers, in robustflow's staged layout.

    centering → [space-to-depth if ``stem="unshuffle"``] → orthogonal 1×1 lift (→ w) →
    stage: ``blocks_per_stage`` SLL blocks (one count, or one per stage) →
    space-to-depth + orthogonal 1×1 mix (4c → next width) → … → flatten → OrthoLinear.
    Widths double per stage (w, 2w, 4w). Every part is 1-Lipschitz by orthogonium's
    construction (up to its power-iteration/Björck orthogonalisation).
    """
    from orthogonium.layers import AdaptiveOrthoConv2d, OrthoLinear

    widths = _stage_widths(width, stages)
    size = image_size
    parts: OrderedDict[str, nn.Module] = OrderedDict()
    parts["centering"] = Centering(CIFAR10_MEAN)
    pixels = 3
    if stem == "unshuffle":
        parts["unshuffle"] = nn.PixelUnshuffle(2)
        size, pixels = size // 2, 12
    parts["lift"] = AdaptiveOrthoConv2d(pixels, widths[0], kernel_size=1, bias=False)
    counts = stage_counts(blocks_per_stage, stages)
    for i, (c, blocks) in enumerate(zip(widths, counts, strict=True), start=1):
        parts[f"stage{i}"] = nn.Sequential(*(SLLBlock(c, size, inner_factor) for _ in range(blocks)))
        nxt = widths[i] if i < len(widths) else c
        parts[f"down{i}"] = nn.Sequential(nn.PixelUnshuffle(2),
                                          AdaptiveOrthoConv2d(4 * c, nxt, kernel_size=1, bias=False))
        size //= 2
    parts["flatten"] = nn.Flatten()
    parts["head"] = OrthoLinear(widths[-1] * size * size, num_classes)
    return nn.Sequential(parts)


def build_torchlip(width: int = 16, convs_per_stage: int | tuple[int, ...] = 2, stages: int = 3,
                   image_size: int = 32, num_classes: int = 10, stem: str = "lift") -> nn.Sequential:
    """A spectrally normalised deel-torchlip network (plain, non-residual).

    centering → [InvertibleDownSampling(2) if ``stem="unshuffle"``] → SpectralConv2d 3×3
    (→ w) + GroupSort2 → stage: ``convs_per_stage`` (one count, or one per stage) ×
    (SpectralConv2d 3×3 + GroupSort2) → InvertibleDownSampling(2) + SpectralConv2d 1×1 →
    … → flatten → SpectralLinear. Widths double per stage (w, 2w, 4w); ``width`` must be
    even (GroupSort2 sorts channel pairs).
    """
    from deel.torchlip import GroupSort2, InvertibleDownSampling, SpectralConv2d, SpectralLinear

    if width % 2:
        raise ValueError(f"width must be even for GroupSort2, got {width}")
    widths = _stage_widths(width, stages)
    size = image_size
    parts: OrderedDict[str, nn.Module] = OrderedDict()
    parts["centering"] = Centering(CIFAR10_MEAN)
    pixels = 3
    if stem == "unshuffle":
        parts["unshuffle"] = InvertibleDownSampling(2)
        size, pixels = size // 2, 12
    parts["lift"] = nn.Sequential(SpectralConv2d(pixels, widths[0], 3, padding=1), GroupSort2())
    counts = stage_counts(convs_per_stage, stages)
    for i, (c, convs) in enumerate(zip(widths, counts, strict=True), start=1):
        layers: list[nn.Module] = []
        for _ in range(convs):
            layers += [SpectralConv2d(c, c, 3, padding=1), GroupSort2()]
        parts[f"stage{i}"] = nn.Sequential(*layers)
        nxt = widths[i] if i < len(widths) else c
        parts[f"down{i}"] = nn.Sequential(InvertibleDownSampling(2),
                                          SpectralConv2d(4 * c, nxt, 1), GroupSort2())
        size //= 2
    parts["flatten"] = nn.Flatten()
    parts["head"] = SpectralLinear(widths[-1] * size * size, num_classes)
    return nn.Sequential(parts)


BUILDERS: dict[str, Callable[..., nn.Sequential]] = {"sll": build_sll, "torchlip": build_torchlip}


def matched_width(kind: str, target: int, depth: int | tuple[int, ...] = 2,
                  stem: str = "lift") -> tuple[int, int]:
    """``(width, parameters)`` of the ``kind`` peer whose parameter count is closest to ``target``
    (torchlip widths are even: GroupSort2 sorts channel pairs)."""
    candidates = range(2, 257, 2 if kind == "torchlip" else 1)
    best: tuple[int, int] | None = None
    for width in candidates:
        count = count_parameters(BUILDERS[kind](width, depth, stem=stem))
        if best is None or abs(count - target) < abs(best[1] - target):
            best = (width, count)
        if count > target:  # counts grow with width: no closer one beyond
            break
    assert best is not None
    return best


def build_peer(kind: str, target: int | None = None, depth: int | tuple[int, ...] | None = None
               ) -> tuple[nn.Sequential, dict]:
    """The ``kind`` peer sized to ``target`` parameters (robustflow's default preset if None),
    with ``depth`` blocks per stage (the preset's ``steps_per_stage`` if None) and the
    preset's stem, so that only the layers differ from robustflow's network."""
    if kind not in BUILDERS:
        raise ValueError(f"unknown peer {kind!r}; choose one of {PEERS}")
    default = preset(TrainConfig().preset)
    depth = default.steps_per_stage if depth is None else depth
    target = robustflow_parameters() if target is None else target
    width, count = matched_width(kind, target, depth, default.stem)
    model = BUILDERS[kind](width, depth, stem=default.stem)
    return model, {"width": width, "depth": depth, "stem": default.stem, "parameters": count,
                   "target": target}


# ------------------------------------------------------------------ export and certificates


def _plain_twin(module: nn.Module) -> nn.Module:
    """A plain ``nn.Conv2d``/``nn.Linear`` with the current (parametrised) weight."""
    with torch.no_grad():
        if isinstance(module, nn.Conv2d):
            twin = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size,
                             module.stride, module.padding, module.dilation, module.groups,
                             module.bias is not None, module.padding_mode)
        else:
            twin = nn.Linear(module.in_features, module.out_features, module.bias is not None)
        twin.weight.copy_(module.weight.detach())
        if module.bias is not None:
            twin.bias.copy_(module.bias.detach())
    return twin


def export_peer(model: nn.Module) -> nn.Module:
    """An eval-mode copy of a peer with identical outputs and plain, boundable parts.

    :class:`SLLBlock` → :class:`PlainSLLBlock`; deel-torchlip layers → their
    ``vanilla_export()`` (plain ``Conv2d``/``Linear``/``PixelUnshuffle``, weights after
    spectral normalisation, Björck and the ``lconv`` scaling); orthogonium's parametrised
    convolutions/linears → plain twins; sorting activations → :class:`SortActivation`.
    """
    from deel.torchlip import GroupSort, MaxMin

    def convert(module: nn.Module) -> nn.Module:
        if isinstance(module, SLLBlock):
            return module.export()
        if isinstance(module, GroupSort | MaxMin):
            return SortActivation(module)
        vanilla = getattr(module, "vanilla_export", None)
        if callable(vanilla):
            return vanilla()
        if parametrize.is_parametrized(module) and isinstance(module, nn.Conv2d | nn.Linear):
            return _plain_twin(module)
        for name, child in list(module.named_children()):
            setattr(module, name, convert(child))
        return module

    return convert(copy.deepcopy(model).eval()).eval()


def own_radius(kind: str, model: nn.Module, logits: Tensor, labels: Tensor) -> tuple[Tensor, str]:
    """Each library's own certified radius (0 where misclassified) and how it was computed.

    Both libraries assume ``L = 1`` by construction. orthogonium ships ``losses.VRA``
    (``margin / (√2 L)`` for an ``OrthoLinear`` head, ``margin / 2`` for ``UnitNormLinear``);
    it moves a tensor to CUDA unconditionally, so without a GPU the same formula is applied
    here. deel-torchlip has no certificate helper; its documented convention for a
    1-Lipschitz network is ``margin / √2``.
    """
    logits = logits.detach().float()
    labels = labels.to(logits.device)
    top = logits.gather(1, labels[:, None]).squeeze(1)
    runner_up = logits.scatter(1, labels[:, None], -math.inf).amax(dim=1)
    formula = (top - runner_up) / math.sqrt(2.0)
    how = "margin / √2 (L = 1 assumed)"
    if kind == "sll":
        from orthogonium.losses import VRA, check_last_linear_layer_type

        layer_type = check_last_linear_layer_type(model)
        if torch.cuda.is_available():
            formula = VRA(logits.cuda(), labels.cuda(), last_layer_type=layer_type, L=1.0,
                          return_certs=True).to(logits.device)
            how = f"orthogonium.losses.VRA(last_layer_type={layer_type!r}, L=1)"
        else:
            how = (f"orthogonium.losses.VRA formula for last_layer_type={layer_type!r}, L = 1: "
                   "margin / √2 (VRA itself needs CUDA)")
    correct = logits.argmax(dim=1) == labels
    return torch.where(correct, formula.clamp_min(0.0), torch.zeros_like(formula)), how


# ------------------------------------------------------------------ training at equal recipe


def train_budgeted(model: nn.Module, train_set: ImageSet, budget: float,
                   cfg: TrainConfig | None = None) -> dict:
    """Train ``model`` for ``budget`` seconds with robustflow's recipe; returns metrics.

    The same as :func:`robustflow.train.train` for one process: the same sample order
    (``DistributedSampler`` with the config's seed, one replica) and augmentation generator,
    optimiser, learning rate (:func:`~robustflow.train.learning_rate` over
    ``max(step / total, elapsed / budget)``), loss (:func:`~robustflow.losses.make_loss`)
    and batch size; ``cfg`` defaults to ``TrainConfig(epochs=1000)`` as in the budgeted
    robustflow run, so the schedule is driven by the time budget.
    """
    cfg = TrainConfig(epochs=1000) if cfg is None else cfg
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
            nesterov=cfg.momentum > 0)
    else:
        optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = make_loss(cfg.loss, margin=cfg.margin, eps=cfg.train_eps, temperature=cfg.temperature,
                        model=model)
    averaged = weight_average(model, cfg.ema)
    sampler = DistributedSampler(range(len(train_set)), num_replicas=1, rank=0, shuffle=True,
                                 seed=cfg.seed, drop_last=True)
    steps_per_epoch = max(1, len(sampler) // cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    model.train()
    started = time.monotonic()
    step = epoch = seen = hits = 0
    loss_sum = 0.0
    done = False
    while not done and epoch < cfg.epochs:
        sampler.set_epoch(epoch)
        order = torch.tensor(list(iter(sampler)), dtype=torch.int64)
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch * 1009)
        seen = hits = 0
        loss_sum = 0.0
        for b in range(steps_per_epoch):
            progress = max(step / total_steps, (time.monotonic() - started) / budget)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg.lr, cfg.schedule, progress)
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            images = train_set.images[idx]
            if cfg.augment:
                images = augment(images, gen)
            x, y = images.float().div_(255), train_set.labels[idx]
            logits, loss = optimizer_step(model, optimizer, loss_fn, x, y)  # as robustflow.train
            if averaged is not None:
                averaged.update_parameters(model)
            step += 1
            seen += len(y)
            hits += int((logits.argmax(1) == y).sum())
            loss_sum += loss.item() * len(y)
            if time.monotonic() - started >= budget:
                done = True
                break
        epoch += 1
    seconds = time.monotonic() - started
    if averaged is not None:  # the model trained in place is the average, as robustflow.train's
        model.load_state_dict(averaged.module.state_dict())
    model.eval()
    return {"steps": step, "epochs": round(step / steps_per_epoch, 2), "seconds": round(seconds, 1),
            "images_per_second": round(step * cfg.batch_size / max(seconds, 1e-9), 1),
            "train_loss": loss_sum / max(seen, 1), "train_accuracy": hits / max(seen, 1)}
