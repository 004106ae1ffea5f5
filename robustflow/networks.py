"""Networks as compositions of residual steps, with a typed config and named presets.

CIFAR-10 layout (``kind="lipschitz"``)::

    centering → [space-to-depth, if stem="unshuffle"] → channel lift (→ C₁, isometry) →
      stage 1: (expansive, contractive) pairs on C₁ channels →
      space-to-depth + orthogonal 1×1 mix (C₁ → C₂) → stage 2 → … →
      space-to-depth + mix (C_S → C_S) → flatten → linear head (‖W‖ ≤ 1)

With exactly orthogonal weights every part is 1-Lipschitz, so the whole network is. geotorch's
weights are orthogonal up to float32 rounding, so the proven bound — computed from the weights
as they are — may exceed 1 by about 1e-5; training folds that excess into the head
(:func:`~robustflow.layers.fold_bound_excess`). ``kind="euler"`` is the unconstrained baseline of
the same shape (explicit Euler steps, free weights).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from robustflow.layers import Centering, NormalizedLinear
from robustflow.operators import (
    ORTHOGONAL_MAPS,
    ChannelMix,
    ConvOperator,
    DenseOperator,
    OrthogonalConv,
    _positive,
)
from robustflow.steps import (
    PAIR_RULES,
    ContractiveStep,
    EulerStep,
    ExpansiveContractivePair,
    ExpansiveStep,
    LearnedStepSizes,
    MassPreservingStep,
    VolumePreservingStep,
)

#: Per-channel mean of the CIFAR-10 training images (pixels in [0, 1]).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)

KINDS = ("lipschitz", "euler")
STEMS = ("lift", "unshuffle")


@dataclass(frozen=True)
class NetworkConfig:
    """Everything needed to rebuild a CIFAR-style network (saved with checkpoints).

    Attributes:
        kind: ``"lipschitz"`` (expansive/contractive pairs, 1-Lipschitz) or ``"euler"``.
        channels: width of each stage; the grid halves between stages.
        steps_per_stage: residual steps per stage (even for ``lipschitz``: pairs), one count for
            every stage or one per stage; a stage with 0 keeps only its down-sampling.
        kernel_size: odd spatial size of the convolution kernels.
        expansive_kernel_size: odd kernel size of the expansive steps' ``W`` (``None``: the
            same as ``kernel_size``; ``1``: an orthogonal channel mix, one 3×3 convolution
            fewer per pair, the contractive step still sees a 3×3 neighbourhood).
        image_size: side of the square input images.
        in_channels: input channels (3 for RGB).
        num_classes: number of logits.
        h_c_range: range of the learnable contractive step size ``h_C``.
        expansive_share: initial ``h_E / h_E,max`` in ``(0, 1)``.
        h_c_init: initial ``h_C``, inside ``h_c_range`` (``None``: the middle of the range).
        stem: ``"lift"`` (isometric 1×1 lift of the pixels on the full grid) or
            ``"unshuffle"`` (space-to-depth first: the stages run on a grid half as wide,
            a quarter of the cost per channel²).
        pair_rule: ``"paper"`` (``sqrt(1 − h_C + h_C²)(1 + h_E) ≤ 1``, ``0 < h_C < 1``) or
            ``"exact"`` (``max(|1 − h_C|, 1 − h_C/2)(1 + h_E) ≤ 1``, ``0 < h_C < 2``, from the
            contractive step's exact bound).
        orthogonal_map: geotorch's map onto the orthogonal weights, ``"expm"`` (matrix
            exponential) or ``"cayley"`` (Cayley transform, cheaper per step).
        euler_step: step size ``h`` of the baseline's Euler steps.
        mean: per-channel input centering; ``std``: optional scaling (enters the bound).
    """

    kind: str = "lipschitz"
    channels: tuple[int, ...] = (16, 32, 64)
    steps_per_stage: int | tuple[int, ...] = 2
    kernel_size: int = 3
    expansive_kernel_size: int | None = None
    image_size: int = 32
    in_channels: int = 3
    num_classes: int = 10
    h_c_range: tuple[float, float] = (0.15, 0.5)
    expansive_share: float = 0.5
    h_c_init: float | None = None
    pair_rule: str = "paper"
    orthogonal_map: str = "expm"
    stem: str = "lift"
    euler_step: float = 0.5
    mean: tuple[float, ...] = CIFAR10_MEAN
    std: tuple[float, ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if not self.channels:
            raise ValueError("channels must name at least one stage width")
        for c in self.channels:
            _positive("every entry of channels", c)
        if self.kind == "lipschitz" and min(self.channels) < 2:
            raise ValueError(f"orthogonal convolutions need ≥ 2 channels, got {self.channels}")
        if isinstance(self.steps_per_stage, list):
            object.__setattr__(self, "steps_per_stage", tuple(self.steps_per_stage))
        if isinstance(self.steps_per_stage, tuple):
            if len(self.steps_per_stage) != len(self.channels):
                raise ValueError(f"steps_per_stage names {len(self.steps_per_stage)} stages for "
                                 f"{len(self.channels)} widths {self.channels}")
            if any(int(n) != n or n < 0 for n in self.steps_per_stage) or not any(self.steps_per_stage):
                raise ValueError(f"steps_per_stage must be counts ≥ 0, not all 0, got "
                                 f"{self.steps_per_stage}")
        else:
            _positive("steps_per_stage", self.steps_per_stage)
        if self.kind == "lipschitz" and any(n % 2 for n in self.stage_steps):
            raise ValueError(
                f"steps_per_stage must be even for kind='lipschitz' (expansive/contractive "
                f"pairs), got {self.steps_per_stage}"
            )
        for name, k in (("kernel_size", self.kernel_size),
                        ("expansive_kernel_size", self.expansive_kernel_size)):
            if k is not None and (int(k) != k or k < 1 or k % 2 == 0):
                raise ValueError(f"{name} must be an odd positive integer, got {k!r}")
        if self.stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {self.stem!r}")
        halvings = len(self.channels) + (self.stem == "unshuffle")
        if self.image_size % (2**halvings):
            raise ValueError(
                f"image_size {self.image_size} must be divisible by 2^{halvings} "
                f"({len(self.channels)} stages each halve the grid"
                + (", and so does the unshuffle stem)" if self.stem == "unshuffle" else ")")
            )
        for prev, nxt in zip(self.channels, self.channels[1:], strict=False):
            if nxt > 4 * prev:
                raise ValueError(f"a stage can at most quadruple the width: {prev} -> {nxt}")
        if self.pair_rule not in PAIR_RULES:
            raise ValueError(f"pair_rule must be one of {PAIR_RULES}, got {self.pair_rule!r}")
        if self.orthogonal_map not in ORTHOGONAL_MAPS:
            raise ValueError(f"orthogonal_map must be one of {ORTHOGONAL_MAPS}, got {self.orthogonal_map!r}")
        if len(self.mean) != self.in_channels:
            raise ValueError(f"mean has {len(self.mean)} entries for {self.in_channels} channels")

    @property
    def stage_steps(self) -> tuple[int, ...]:
        """Residual steps of each stage."""
        if isinstance(self.steps_per_stage, tuple):
            return self.steps_per_stage
        return (self.steps_per_stage,) * len(self.channels)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NetworkConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown network config keys: {sorted(unknown)}")
        fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**fixed)


PRESETS: dict[str, NetworkConfig] = {
    # property tests: 8×8 inputs, two narrow stages (small enough for dense Jacobians)
    "tiny": NetworkConfig(channels=(4, 8), steps_per_stage=2, image_size=8),
    # quick runs on real 32×32 CIFAR images (tests, smoke runs)
    "micro": NetworkConfig(channels=(4, 8), steps_per_stage=2),
    # the first default (the bundled models): 16/32/64 channels, one pair per stage on 32/16/8 grids
    "small": NetworkConfig(channels=(16, 32, 64), steps_per_stage=2),
    # certified accuracy per second of CPU training (900 s probes in docs/results/probes.jsonl):
    # space-to-depth first, so two pairs per stage on 16/8/4 grids cost less than one pair on
    # 32/16/8; Cayley-parametrised orthogonal weights (an LU solve instead of a matrix
    # exponential); an orthogonal 1×1 mix as the expansive step's W (a pair costs two 3×3
    # convolutions); and the exact pair rule with h_C up to 1.9, whose larger contractive steps
    # lifted certified accuracy at 36/255 from 35.8% to 39.6% (probes W_e1, X_ex19)
    "fast": NetworkConfig(channels=(16, 32, 64), steps_per_stage=4, stem="unshuffle",
                          orthogonal_map="cayley", expansive_kernel_size=1, pair_rule="exact",
                          h_c_range=(0.15, 1.9)),
    # the default: fast's layout traded from depth to width, one pair per stage at 24/48/96
    # channels (113k parameters); it trains more images per second than fast and certified
    # 1.5-2.1 points more at 36/255 in 900 s probes (P_shallow_wide rows of probes.jsonl)
    "shallow": NetworkConfig(channels=(24, 48, 96), steps_per_stage=2, stem="unshuffle",
                             orthogonal_map="cayley", expansive_kernel_size=1, pair_rule="exact",
                             h_c_range=(0.15, 1.9)),
    # fast's layout at twice the width (285k parameters): for runs of hours, where capacity
    # rather than images per second limits certified accuracy (the bundled model)
    "wide": NetworkConfig(channels=(32, 64, 128), steps_per_stage=4, stem="unshuffle",
                          orthogonal_map="cayley", expansive_kernel_size=1, pair_rule="exact",
                          h_c_range=(0.15, 1.9)),
    # the paper's layout: 32/64/128 channels, 8 residual steps per stage
    "paper": NetworkConfig(channels=(32, 64, 128), steps_per_stage=8),
}


def preset(name: str, **overrides: Any) -> NetworkConfig:
    """A named preset, optionally with fields replaced (``preset("small", kind="euler")``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


def _lipschitz_stage(cfg: NetworkConfig, channels: int, size: int, steps: int) -> nn.Sequential:
    pairs = []
    k_e = cfg.kernel_size if cfg.expansive_kernel_size is None else cfg.expansive_kernel_size
    for _ in range(steps // 2):
        w = OrthogonalConv(channels, size, k_e, orthogonal_map=cfg.orthogonal_map)
        a = OrthogonalConv(channels, size, cfg.kernel_size, orthogonal_map=cfg.orthogonal_map)
        expansive, contractive = ExpansiveStep(w, None), ContractiveStep(a, None)
        sizes = LearnedStepSizes(cfg.h_c_range, cfg.expansive_share, cfg.pair_rule,
                                 cfg.h_c_init)
        pairs.append(ExpansiveContractivePair(expansive, contractive, sizes))
    return nn.Sequential(*pairs)


def _euler_stage(cfg: NetworkConfig, channels: int, size: int, steps: int) -> nn.Sequential:
    return nn.Sequential(
        *(
            EulerStep(
                ConvOperator(channels, channels, size, cfg.kernel_size),
                ConvOperator(channels, channels, size, cfg.kernel_size),
                cfg.euler_step,
            )
            for _ in range(steps)
        )
    )


class ImageClassifier(nn.Sequential):
    """A CIFAR-style classifier built from a :class:`NetworkConfig`.

    A plain ``nn.Sequential`` of named parts (``centering``, ``lift``, ``stage1``,
    ``down1``, …, ``flatten``, ``head``), so ``certify`` can bound it part by part and
    use the linear head for pairwise certificates. ``model.config`` keeps the config.
    """

    def __init__(self, config: NetworkConfig):
        orthogonal = config.kind == "lipschitz"
        stage = _lipschitz_stage if orthogonal else _euler_stage
        parts: OrderedDict[str, nn.Module] = OrderedDict()
        parts["centering"] = Centering(config.mean, config.std)
        size, pixels = config.image_size, config.in_channels
        if config.stem == "unshuffle":
            parts["unshuffle"] = nn.PixelUnshuffle(2)  # a permutation of the pixels: an isometry
            size, pixels = size // 2, 4 * pixels
        mix = dict(orthogonal=orthogonal, orthogonal_map=config.orthogonal_map)
        parts["lift"] = ChannelMix(pixels, config.channels[0], size, **mix)
        widths = list(config.channels)
        for i, (width, steps) in enumerate(zip(widths, config.stage_steps, strict=True), start=1):
            parts[f"stage{i}"] = stage(config, width, size, steps)
            next_width = widths[i] if i < len(widths) else width
            parts[f"down{i}"] = nn.Sequential(
                nn.PixelUnshuffle(2),
                ChannelMix(4 * width, next_width, size // 2, **mix),
            )
            size //= 2
        parts["flatten"] = nn.Flatten()
        features = widths[-1] * size * size
        head = NormalizedLinear if orthogonal else nn.Linear
        parts["head"] = head(features, config.num_classes)
        super().__init__(parts)
        self.config = config

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c = self.config
        return (c.in_channels, c.image_size, c.image_size)

    def lipschitz_bound(self) -> float:
        """Proven L2 bound, composed part by part by :func:`certify.lipschitz_bound`."""
        from certify import lipschitz_bound

        return lipschitz_bound(self, self.input_shape)


# ------------------------------------------------------------------ vector data


class LipschitzMLP(nn.Sequential):
    """1-Lipschitz classifier for vectors: isometric lift, dense pairs, normalised head."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        width: int = 64,
        pairs: int = 4,
        h_c_range: tuple[float, float] = (0.15, 0.5),
    ):
        in_features, width = _positive("in_features", in_features), _positive("width", width)
        if width < in_features:
            raise ValueError(f"width {width} must be ≥ in_features {in_features} for an isometric lift")
        steps = [
            ExpansiveContractivePair(
                ExpansiveStep(DenseOperator(width, width), None),
                ContractiveStep(DenseOperator(width, width), None),
                LearnedStepSizes(h_c_range),
            )
            for _ in range(_positive("pairs", pairs))
        ]
        super().__init__(
            DenseOperator(in_features, width),
            *steps,
            NormalizedLinear(width, _positive("num_classes", num_classes)),
        )


class EulerMLP(nn.Sequential):
    """Unconstrained ResNet baseline for vectors: ``x + h B Σ(Ax + b)`` steps."""

    def __init__(self, in_features: int, num_classes: int, width: int = 64, steps: int = 8):
        super().__init__(
            nn.Linear(_positive("in_features", in_features), _positive("width", width)),
            *(
                EulerStep(DenseOperator(width, width, orthogonal=False),
                          DenseOperator(width, width, orthogonal=False), 0.5)
                for _ in range(_positive("steps", steps))
            ),
            nn.Linear(width, _positive("num_classes", num_classes)),
        )


class VolumePreservingNet(nn.Sequential):
    """A stack of :class:`VolumePreservingStep`: ``|det J| = 1`` and an exact inverse."""

    def __init__(self, dim: int, steps: int = 4, step_size: float = 0.5):
        if int(dim) != dim or dim < 2 or dim % 2:
            raise ValueError(f"dim must be an even integer ≥ 2 (state (x, v)), got {dim!r}")
        super().__init__(
            *(VolumePreservingStep(dim // 2, step_size) for _ in range(_positive("steps", steps)))
        )

    def inverse(self, y: Tensor) -> Tensor:
        for step in reversed(self):
            y = step.inverse(y)
        return y


class MassPreservingNet(nn.Sequential):
    """A stack of :class:`MassPreservingStep`: ``Σ_i x_i`` is invariant through the network."""

    def __init__(self, dim: int, steps: int = 4, step_size: float = 0.1):
        super().__init__(
            *(MassPreservingStep(dim, step_size) for _ in range(_positive("steps", steps)))
        )


def build_model(config: NetworkConfig) -> ImageClassifier:
    """The classifier described by ``config``."""
    return ImageClassifier(config)
