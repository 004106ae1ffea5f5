"""Certification cost against one plain inference pass over the same images.

    python benchmarks/bench_certify.py --data-root DIR          # full 10,000-image test set
    python benchmarks/bench_certify.py                          # bundled 1,000-image sample

Prints the seconds of a plain forward pass over every image (the exported model, batch
500, inference mode), the seconds of ``certify_dataset`` (which also computes the
Lipschitz bound once, in float64, the proven rounding bound of every margin and the float64
re-check of the decisions that bound could flip) and their ratio. Aim: ratio ≤ 1.5.
"""

from __future__ import annotations

import argparse
import time

import torch

from robustflow.console import line_buffered_output
from robustflow.data import ImageSet, load_cifar10
from robustflow.evaluation import batches, certify_dataset
from robustflow.export import export_plain
from robustflow.pretrained import load_model, load_sample_set

EPSILONS = [("36/255", 36 / 255), ("0.3", 0.3)]


def measure(model: torch.nn.Module, data: ImageSet, batch_size: int = 500, repeats: int = 3,
            epsilons: list[tuple[str, float]] = EPSILONS) -> dict:
    """Best-of-``repeats`` seconds of plain inference and of ``certify_dataset`` over ``data``.

    Returns ``{"images", "threads", "inference_seconds", "certify_seconds", "ratio",
    "lipschitz_bound"}``; certification includes computing the Lipschitz bound.
    """
    plain = export_plain(model)
    report = None

    def inference() -> None:
        with torch.inference_mode():
            for x, _ in batches(data, batch_size):
                plain(x)

    def certification() -> None:
        nonlocal report
        report = certify_dataset(model, data, epsilons, batch_size=batch_size, progress=False)

    timings = {"inference": float("inf"), "certify": float("inf")}
    for _ in range(repeats):  # interleaved, so that a slow spell of the machine hits both
        for name, fn in (("inference", inference), ("certify", certification)):
            start = time.perf_counter()
            fn()
            timings[name] = min(timings[name], time.perf_counter() - start)
    return {"images": len(data), "threads": torch.get_num_threads(),
            "inference_seconds": timings["inference"], "certify_seconds": timings["certify"],
            "ratio": timings["certify"] / timings["inference"],
            "lipschitz_bound": report.lipschitz_bound}


def main() -> None:
    line_buffered_output()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="lipschitz")
    parser.add_argument("--data-root")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    args = parser.parse_args()
    data = load_cifar10(args.data_root, False) if args.data_root else load_sample_set()
    result = measure(load_model(args.checkpoint), data, args.batch_size, args.repeats)
    print(f"images: {result['images']}  threads: {result['threads']}")
    print(f"plain inference: {result['inference_seconds']:.2f} s")
    print(f"certification:   {result['certify_seconds']:.2f} s (bound included)")
    print(f"ratio:           {result['ratio']:.3f}")


if __name__ == "__main__":
    main()
