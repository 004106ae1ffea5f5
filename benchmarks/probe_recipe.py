"""Short probes for choosing the default preset and recipe: accuracy per image and per second.

    python benchmarks/probe_recipe.py NAME '{"augment": false, "net": {"stem": "unshuffle"}}' \
        --data-root DIR [--images 44800] [--budget S] [--test-n 2000] [--log probes.jsonl]

Trains robustflow's default recipe with the given overrides — ``TrainConfig`` fields at the
top level, ``NetworkConfig`` fields under ``"net"``, applied to ``"preset"`` (default
``small``) — for one pass over the first ``--images`` training images (``"epochs"`` passes
if given; ``--budget`` seconds end it earlier), then prints one JSON line: parameters,
training seconds and images per second, clean accuracy and certified accuracy at 36/255
and 0.3 on the first ``--test-n`` test images, and the proven Lipschitz bound. The probes
behind the ``fast`` preset are in ``docs/results/probes.jsonl`` (one core each, two probes
at a time, measured with an earlier copy of this script whose ``img_s`` included data loading).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import robustflow.networks as networks
from robustflow.console import line_buffered_output
from robustflow.data import load_cifar10
from robustflow.evaluation import certify_dataset
from robustflow.train import TrainConfig, train


def probe(name: str, overrides: dict, data_root: str | None, images: int, budget: float | None,
          test_n: int) -> dict:
    """Train one variant and measure it (see the module docstring)."""
    overrides = dict(overrides)
    net = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.pop("net", {}).items()}
    base = overrides.pop("preset", "small")
    networks.PRESETS["probe"] = dataclasses.replace(networks.preset(base), **net)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            fields = dict(epochs=1, limit=images, val_size=0, time_budget=budget, progress=False)
            fields.update(overrides)  # e.g. several epochs ended by --budget
            cfg = dataclasses.replace(TrainConfig(), preset="probe", out=str(Path(tmp) / "probe.pt"),
                                      **fields)
            started = time.monotonic()
            model, record = train(cfg, data_root=data_root, log=lambda *_: None)
            seconds = time.monotonic() - started
    finally:
        del networks.PRESETS["probe"]
    test = load_cifar10(data_root, False, limit=test_n)
    report = certify_dataset(model, test, [("36/255", 36 / 255), ("0.3", 0.3)], progress=False)
    return {"name": name, "overrides": {**overrides, "preset": base, "net": net},
            "params": sum(p.numel() for p in model.parameters()), "train_s": round(seconds),
            "img_s": round(record["metrics"]["images_per_second"]),
            "clean": report.clean_accuracy, "c36": report.certified_accuracy["36/255"],
            "c03": report.certified_accuracy["0.3"], "L": round(model.lipschitz_bound(), 3)}


def main(argv: list[str] | None = None) -> dict:
    line_buffered_output()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("overrides", nargs="?", default="{}", help="JSON object of overrides")
    parser.add_argument("--data-root")
    parser.add_argument("--images", type=int, default=44800, help="training images (one pass)")
    parser.add_argument("--budget", type=float, help="training seconds (optional)")
    parser.add_argument("--test-n", type=int, default=2000)
    parser.add_argument("--log", help="append the JSON line to this file")
    args = parser.parse_args(argv)
    try:
        overrides = json.loads(args.overrides)
    except json.JSONDecodeError as err:
        parser.error(f"overrides must be a JSON object: {err}")
    if not isinstance(overrides, dict):
        parser.error("overrides must be a JSON object, e.g. '{\"augment\": false}'")
    result = probe(args.name, overrides, args.data_root, args.images, args.budget, args.test_n)
    line = json.dumps(result)
    print(line)
    if args.log:
        with open(args.log, "a") as log:
            log.write(line + "\n")
    return result


if __name__ == "__main__":
    main()
