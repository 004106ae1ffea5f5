"""Screening probe, kept as the record of a rejected idea (HISTORY.md, 2026-12-07, tenth session).

The default network without its last space-to-depth and channel mix (48.9% against 48.8%).

    OMP_NUM_THREADS=1 python docs/results/probe-no-last-mix.py NAME MODE --data-root DIR [--budget 900]

``MODE=nomix``: ``down3`` (space-to-depth 96·4 → an orthogonal 384 → 96 mix, whose geotorch Cayley
map solves a 384 × 384 system every step) is removed and the head reads the 96 × 4 × 4 features
directly (``NormalizedLinear(1536, 10)``). ``MODE=mix``: the default network, under the same screen.
The probe certifies with the head's pairwise margins alone, taking the body as 1-Lipschitz (true by
construction up to float32 rounding): a screen, compared only with its own control. One JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile

import torch
from torch import nn

import robustflow.networks as networks
import robustflow.train as training
from robustflow.data import load_cifar10
from robustflow.layers import NormalizedLinear


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("mode", choices=["mix", "nomix"])
    parser.add_argument("--data-root")
    parser.add_argument("--budget", type=float, default=900.0)
    args = parser.parse_args()

    if args.mode == "nomix":
        build = networks.ImageClassifier.__init__

        def without_last_mix(self, config):
            build(self, config)
            last = len(config.channels)
            setattr(self, f"down{last}", nn.Identity())
            width, size = config.channels[-1], config.image_size // 2 ** last
            self.head = NormalizedLinear(width * size * size, config.num_classes)

        networks.ImageClassifier.__init__ = without_last_mix
        training.fold_bound_excess = lambda *_, **__: 1.0
    with tempfile.TemporaryDirectory() as tmp:
        cfg = dataclasses.replace(training.TrainConfig(), epochs=1000, val_size=0,
                                  time_budget=args.budget, progress=False, out=f"{tmp}/probe.pt")
        model, record = training.train(cfg, data_root=args.data_root, log=lambda *_: None)
    test = load_cifar10(args.data_root, False)
    model.eval()
    rows = model.head.weight.detach()
    counts = {"clean": 0, "c36": 0, "c03": 0}
    with torch.no_grad():
        for i in range(0, len(test), 500):
            x, y = test.images[i:i + 500].float() / 255, test.labels[i:i + 500]
            z = model(x)
            distances = (rows[y][:, None] - rows[None]).norm(dim=2).clamp_min(1e-12)
            gaps = (z.gather(1, y[:, None]) - z) / distances
            gaps[torch.arange(len(y)), y] = float("inf")
            radius, right = gaps.min(1).values, z.argmax(1) == y
            counts["clean"] += int(right.sum())
            counts["c36"] += int((right & (radius > 36 / 255)).sum())
            counts["c03"] += int((right & (radius > 0.3)).sum())
    print(json.dumps({"name": args.name, "mode": args.mode,
                      "params": sum(p.numel() for p in model.parameters()),
                      "img_s": record["metrics"]["images_per_second"],
                      "epochs": record["metrics"].get("epoch"),
                      **{key: value / len(test) for key, value in counts.items()}}))


if __name__ == "__main__":
    main()
