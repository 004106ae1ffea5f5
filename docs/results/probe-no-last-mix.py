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

from probe_screen import head_margin_accuracies
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
    scores = head_margin_accuracies(model, test)
    print(json.dumps({"name": args.name, "mode": args.mode,
                      "params": sum(p.numel() for p in model.parameters()),
                      "img_s": record["metrics"]["images_per_second"],
                      "epochs": record["metrics"].get("epoch"),
                      **scores}))


if __name__ == "__main__":
    main()
