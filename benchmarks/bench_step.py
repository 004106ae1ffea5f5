"""Seconds per training step of each preset (forward, certified loss, backward, Adam update).

    python benchmarks/bench_step.py [--batch 256] [--threads 1] [--presets fast,wide]

Prints, per preset, the parameters, the mean seconds of ``--repeats`` steps (after two warm-up
steps) on random images, and images per second. The cost side of choosing a preset: what an
image teaches is measured by training (``bench_train.py``, ``probe_recipe.py``).
"""

from __future__ import annotations

import argparse
import time

import torch

from robustflow.console import line_buffered_output
from robustflow.losses import make_loss
from robustflow.networks import PRESETS, build_model, preset
from robustflow.train import TrainConfig, optimizer_step


def step_seconds(name: str, batch: int, repeats: int) -> dict:
    """Mean seconds of one training step of preset ``name`` on a random batch."""
    cfg = TrainConfig()
    torch.manual_seed(0)
    model = build_model(preset(name))
    loss_fn = make_loss(cfg.loss, margin=cfg.margin, eps=cfg.train_eps, temperature=cfg.temperature,
                        model=model)
    optimizer = torch.optim.Adam(model.parameters(), cfg.lr)
    x, y = torch.rand(batch, *model.input_shape), torch.randint(0, 10, (batch,))
    for _ in range(2):
        optimizer_step(model, optimizer, loss_fn, x, y)
    started = time.perf_counter()
    for _ in range(repeats):
        optimizer_step(model, optimizer, loss_fn, x, y)
    seconds = (time.perf_counter() - started) / repeats
    return {"preset": name, "parameters": sum(p.numel() for p in model.parameters()),
            "seconds": seconds, "images_per_second": batch / seconds}


def main(argv: list[str] | None = None) -> list[dict]:
    line_buffered_output()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="fast,wide")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.presets.split(",")]
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        parser.error(f"unknown presets {unknown}; choose from {sorted(PRESETS)}")
    torch.set_num_threads(args.threads)
    rows = []
    for name in names:
        row = step_seconds(name, args.batch, args.repeats)
        rows.append(row)
        print(f"{name:>8}  {row['parameters']:>7} parameters  {row['seconds']:.3f} s/step  "
              f"{row['images_per_second']:.0f} img/s")
    return rows


if __name__ == "__main__":
    main()
