"""Certification cost against one plain inference pass over the same images.

    python benchmarks/bench_certify.py --data-root DIR          # full 10,000-image test set
    python benchmarks/bench_certify.py                          # bundled 1,000-image sample

Prints the seconds of a plain forward pass over every image (the exported model, batch
500, inference mode), the seconds of ``certify_dataset`` (which also computes the
Lipschitz bound once, in float64) and their ratio. Aim: ratio ≤ 1.1.
"""

from __future__ import annotations

import argparse
import time

import torch

from robustflow.data import load_cifar10
from robustflow.evaluation import batches, certify_dataset
from robustflow.export import export_plain
from robustflow.pretrained import load_model, load_sample_set


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="lipschitz")
    parser.add_argument("--data-root")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    args = parser.parse_args()
    data = load_cifar10(args.data_root, False) if args.data_root else load_sample_set()
    model = load_model(args.checkpoint)
    plain = export_plain(model)
    eps = [("36/255", 36 / 255), ("0.3", 0.3)]

    def inference() -> None:
        with torch.inference_mode():
            for x, _ in batches(data, args.batch_size):
                plain(x)

    def certification() -> None:
        certify_dataset(model, data, eps, batch_size=args.batch_size, progress=False)

    timings = {}
    for name, fn in (("inference", inference), ("certify", certification)):
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        timings[name] = best
    print(f"images: {len(data)}  threads: {torch.get_num_threads()}")
    print(f"plain inference: {timings['inference']:.2f} s")
    print(f"certification:   {timings['certify']:.2f} s (bound included)")
    print(f"ratio:           {timings['certify'] / timings['inference']:.3f}")


if __name__ == "__main__":
    main()
