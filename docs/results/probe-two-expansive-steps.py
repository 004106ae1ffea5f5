"""Screening probe, kept as the record of a rejected idea (HISTORY.md, 2026-12-07, eighth session).

    OMP_NUM_THREADS=1 python docs/results/probe-two-expansive-steps.py NAME K --data-root DIR [--budget 900]

Trains preset ``fast`` for ``--budget`` seconds with every pair running ``K`` expansive 1×1 steps
before its contractive step, each with ``h = (1 + h_E)^(1/K) − 1`` so that their product of bounds
is the pair's ``1 + h_E`` and the pair rule still holds. ``certify`` has no rule for this test-only
pair (and refuses it), so the probe certifies with the head's pairwise margins alone, taking the body
as 1-Lipschitz (true by construction, up to float32 rounding): a screen, not a certificate.
``K = 1`` is the default network under the same screen. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile

import torch
from probe_screen import head_margin_accuracies
from torch import nn

import robustflow.networks as networks
import robustflow.train as training
from robustflow.data import load_cifar10
from robustflow.operators import OrthogonalConv
from robustflow.steps import ContractiveStep, ExpansiveContractivePair, ExpansiveStep, LearnedStepSizes


class MultiExpansivePair(ExpansiveContractivePair):
    """``Ψ_C ∘ Ψ_E^(K) ∘ … ∘ Ψ_E^(1)`` with ``∏ (1 + h) = 1 + h_E``."""

    def __init__(self, expansives: list[ExpansiveStep], contractive: ContractiveStep,
                 sizes: LearnedStepSizes):
        super().__init__(expansives[0], contractive, sizes)
        self.more = nn.ModuleList(expansives[1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h_e, h_c = self.step_sizes()
        h = (1 + h_e) ** (1.0 / (1 + len(self.more))) - 1
        x = self.expansive(x, h)
        for step in self.more:
            x = step(x, h)
        return self.contractive(x, h_c)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("k", type=int)
    parser.add_argument("--data-root")
    parser.add_argument("--budget", type=float, default=900.0)
    args = parser.parse_args()

    def stage(cfg: networks.NetworkConfig, channels: int, size: int) -> nn.Sequential:
        pairs = []
        for _ in range(cfg.steps_per_stage // 2):
            expansives = [ExpansiveStep(OrthogonalConv(channels, size, 1, orthogonal_map=cfg.orthogonal_map),
                                        None) for _ in range(args.k)]
            a = OrthogonalConv(channels, size, cfg.kernel_size, orthogonal_map=cfg.orthogonal_map)
            sizes = LearnedStepSizes(cfg.h_c_range, cfg.expansive_share, cfg.pair_rule)
            pairs.append(MultiExpansivePair(expansives, ContractiveStep(a, None), sizes))
        return nn.Sequential(*pairs)

    networks._lipschitz_stage = stage
    training.fold_bound_excess = lambda *_, **__: 1.0  # needs certify, which refuses this pair
    with tempfile.TemporaryDirectory() as tmp:
        cfg = dataclasses.replace(training.TrainConfig(), preset="fast", epochs=1000, val_size=0,
                                  time_budget=args.budget, progress=False, out=f"{tmp}/probe.pt")
        model, record = training.train(cfg, data_root=args.data_root, log=lambda *_: None)
    test = load_cifar10(args.data_root, False)
    scores = head_margin_accuracies(model, test)
    print(json.dumps({"name": args.name, "K": args.k, "params": sum(p.numel() for p in model.parameters()),
                      "img_s": record["metrics"]["images_per_second"],
                      **scores}))


if __name__ == "__main__":
    main()
