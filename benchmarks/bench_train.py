"""Certified accuracy after a fixed wall-clock budget of CPU training.

    python benchmarks/bench_train.py --data-root DIR --budget 900

Trains the default preset (``robustflow train`` defaults) on the full CIFAR-10 training
set for ``--budget`` seconds, then certifies on the full 10,000-image test set and prints
clean accuracy, certified accuracy at 36/255 and 0.3, and training images per second.
Aim at 900 s on 2 CPU cores: certified accuracy above 45% at 36/255 and 30% at 0.3.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from robustflow.console import line_buffered_output
from robustflow.data import load_cifar10
from robustflow.evaluation import certify_dataset
from robustflow.losses import LOSSES
from robustflow.train import TrainConfig, train


def main() -> None:
    line_buffered_output()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root")
    parser.add_argument("--budget", type=float, default=900.0, help="seconds of training")
    parser.add_argument("--preset", default=TrainConfig.preset)
    parser.add_argument("--kind", default=TrainConfig.kind)
    parser.add_argument("--augment", action="store_true", help="crop + flip (default off)")
    parser.add_argument("--loss", choices=LOSSES, default=TrainConfig.loss)
    parser.add_argument("--train-eps", type=float, default=TrainConfig.train_eps,
                        help="margin of the certified loss")
    parser.add_argument("--temperature", type=float, default=TrainConfig.temperature,
                        help="temperature of the certified loss")
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--lr", type=float, default=TrainConfig.lr)
    parser.add_argument("--out", default="runs/bench-train.pt")
    args = parser.parse_args()
    cfg = dataclasses.replace(TrainConfig(), preset=args.preset, kind=args.kind, epochs=1000,
                              time_budget=args.budget, out=args.out, progress=False,
                              augment=args.augment, loss=args.loss, train_eps=args.train_eps,
                              batch_size=args.batch_size, lr=args.lr,
                              temperature=args.temperature)
    model, record = train(cfg, data_root=args.data_root)
    test = load_cifar10(args.data_root, False)
    report = certify_dataset(model, test, [("36/255", 36 / 255), ("0.3", 0.3)], progress=False)
    metrics = record["metrics"]
    print(f"preset {args.preset} ({args.kind}), {args.budget:.0f} s budget, loss {args.loss}, "
          f"training ε {args.train_eps:g}, temperature {args.temperature:g}, batch {args.batch_size}, "
          f"lr {args.lr:g}, "
          f"{'crop + flip' if args.augment else 'no augmentation'}, "
          f"{torch.get_num_threads()} threads, {record['epoch']} epochs")
    print(f"training images/s: {metrics['images_per_second']:.0f}")
    print(f"test clean accuracy: {100 * report.clean_accuracy:.2f}%")
    for eps, acc in report.certified_accuracy.items():
        print(f"certified accuracy at {eps}: {100 * acc:.2f}%")


if __name__ == "__main__":
    main()
