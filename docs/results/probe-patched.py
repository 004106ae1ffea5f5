"""Screening probes, kept as the record of rejected ideas (HISTORY.md, thirteenth session).

``benchmarks/probe_recipe.py`` with changes it cannot set:

    OMP_NUM_THREADS=1 python docs/results/probe-patched.py NAME OVERRIDES [--slope A] \
        [--flip-only] [--no-pair-in-stage S] --data-root DIR --images 50000 --budget 900 \
        --test-n 10000 [--log FILE]

``--slope A``: ``Σ(x) = max{x, A x}`` in training and certification, and the exact pair rule
``max(|1 − h_C|, 1 − A h_C)(1 + h_E) ≤ 1`` (a contractive step with an isometric ``A`` has
Jacobian ``I − h AᵀDA``, ``D`` in ``[A, 1]``), whose largest ``h_E`` is ``2A / (1 − A)`` at
``h_C = 2 / (1 + A)``: 3 for ``A = 0.6`` against 2 for the default 1/2. The steps' bounds read the
patched slope; the float32 rounding bound still takes ``A x`` as exact, so this is a screen.
``--flip-only``: augmentation is a horizontal flip of half the images, no crop (give
``"augment": true`` in OVERRIDES).
``--no-pair-in-stage S``: stage ``S`` (1, 2, …) keeps no residual pair (the down-sampling mixes
stay), so its cost goes to more images per second; the same network as ``"steps_per_stage"``
with 0 for that stage (added after these probes).

The fifteenth session's pairwise-loss probes (``PAIR*`` in ``probes.jsonl``) ran this script with
a flag that patched in the loss now built in as ``"loss": "cce-pairwise"`` (the same formula);
``benchmarks/probe_recipe.py`` with that override reruns them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import robustflow.activations as activations
import robustflow.networks as networks
import robustflow.steps as steps
import robustflow.train as training


def _take(argv: list[str], flag: str, has_value: bool) -> str | bool | None:
    if flag not in argv:
        return None
    i = argv.index(flag)
    value = argv[i + 1] if has_value else True
    del argv[i:i + 1 + has_value]
    return value


def flip_only(images: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """A horizontal flip of each image with probability 1/2 (``pad`` unused)."""
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(3), images)


def main() -> None:
    argv = sys.argv[1:]
    slope = _take(argv, "--slope", True)
    if slope is not None:
        alpha = float(slope)
        activations.SIGMA_MIN_SLOPE = alpha
        steps.SIGMA_MIN_SLOPE = alpha
        steps.exact_contraction_factor = lambda h: max(abs(1.0 - h), 1.0 - alpha * h)
    if _take(argv, "--flip-only", False):
        training.augment = flip_only
    empty = _take(argv, "--no-pair-in-stage", True)
    if empty is not None:
        build_stage = networks._lipschitz_stage

        def stage(cfg: networks.NetworkConfig, channels: int, size: int,
                  steps: int) -> torch.nn.Sequential:
            if channels == cfg.channels[int(empty) - 1]:  # stage widths differ in these probes
                return torch.nn.Sequential()
            return build_stage(cfg, channels, size, steps)

        networks._lipschitz_stage = stage
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import probe_recipe

    probe_recipe.main(argv)


if __name__ == "__main__":
    main()
