"""``robustflow demo``: the main job, offline, on the bundled models and test sample."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attacks import minimal_adversarial_distance
from robustflow.data import CLASSES, ImageSet
from robustflow.evaluation import attack_dataset, certify_dataset
from robustflow.export import export_plain
from robustflow.plots import draw_curves, draw_plane_cat, find_plane_cat, save_figure
from robustflow.pretrained import load_model, load_sample_set

#: ε values of the table and of the PGD runs; the certified curve uses the finer grid.
TABLE_EPS = (("36/255", 36 / 255), ("0.3", 0.3))
CURVE_EPS = (("0.1", 0.1), ("36/255", 36 / 255), ("0.3", 0.3), ("0.5", 0.5), ("0.75", 0.75),
             ("1", 1.0))


@dataclass
class DemoResult:
    """What the demo measured and where it wrote it."""

    rows: list[dict[str, Any]]
    files: list[Path]
    seconds: float


def run_demo(out_dir: str | Path = "robustflow-demo", *, limit: int | None = None, steps: int = 10,
             distance_points: int = 100, lipschitz: str = "lipschitz", baseline: str = "baseline",
             data: ImageSet | None = None, progress: bool = True, log=print) -> DemoResult:
    """Certify and attack the bundled 1-Lipschitz model and the baseline; draw the pictures.

    Writes ``certify.json``, ``attack-lipschitz.json``, ``attack-baseline.json``,
    ``plane-cat.png``, ``curves.png`` and ``summary.json`` into ``out_dir``.
    """
    started = time.monotonic()
    out = Path(out_dir)
    data = data if data is not None else load_sample_set()
    if limit is not None:
        data = data.subset(slice(0, limit))
    models = {"lipschitz": load_model(lipschitz), "baseline": load_model(baseline)}
    files: list[Path] = []

    def dump(name: str, payload: dict) -> None:
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2))
        files.append(path)

    log(f"certifying the 1-Lipschitz model on {len(data)} images")
    cert = certify_dataset(models["lipschitz"], data, CURVE_EPS, progress=progress,
                           name="bundled lipschitz")
    dump("certify.json", {**cert.to_dict(), "radii": cert.radii.tolist()})
    attacks = {}
    for name in ("lipschitz", "baseline"):
        log(f"PGD-L2 ({steps} steps) on the {name} model")
        report = attack_dataset(models[name], data, "pgd-l2", TABLE_EPS, steps=steps,
                                progress=progress, name=f"bundled {name}")
        attacks[name] = report
        dump(f"attack-{name}.json", report.to_dict())

    log(f"minimal adversarial distances (DDN) on {distance_points} images")
    x, y = data.floats(slice(0, distance_points))
    distances = minimal_adversarial_distance(export_plain(models["lipschitz"]), x, y, "DDNAttack", steps=50)

    log("searching an airplane the baseline calls cat at ε = 0.3")
    images, labels = data.floats()
    example = find_plane_cat(models["baseline"], models["lipschitz"], images, labels, eps=0.3,
                             steps=50, restarts=5, max_candidates=32)
    files.append(save_figure(draw_plane_cat(example, CLASSES), out / "plane-cat.png"))
    robust = {f"PGD-L2 ({name})": {0.0: attacks[name].clean_accuracy,
                                   **{e: attacks[name].robust_accuracy[k] for k, e in TABLE_EPS}}
              for name in attacks}
    certified = {e: cert.certified_accuracy[k] for k, e in CURVE_EPS}
    fig = draw_curves(certified, robust, cert.clean_accuracy, cert.radii[: distance_points],
                      distances.cpu().numpy(), title=f"CIFAR-10, {len(data)} test images")
    files.append(save_figure(fig, out / "curves.png"))

    rows = []
    for label, _ in TABLE_EPS:
        rows.append({"eps": label, "model": "1-Lipschitz", "clean": cert.clean_accuracy,
                     "certified": cert.certified_accuracy[label],
                     "pgd": attacks["lipschitz"].robust_accuracy[label]})
        rows.append({"eps": label, "model": "baseline", "clean": attacks["baseline"].clean_accuracy,
                     "certified": None, "pgd": attacks["baseline"].robust_accuracy[label]})
    finite = distances[torch.isfinite(distances)]
    summary = {
        "n": len(data), "rows": rows, "lipschitz_bound": cert.lipschitz_bound,
        "plane_cat": {"index": example.index, "flipped": example.flipped, "eps": example.eps,
                      "baseline_adversarial_label": CLASSES[example.baseline.adversarial_prediction],
                      "lipschitz_adversarial_label": CLASSES[example.lipschitz.adversarial_prediction],
                      "certified_radius": example.radius, "note": example.note},
        "median_min_distance": float(np.median(finite.cpu().numpy())) if len(finite) else None,
        "median_certified_radius": float(np.median(cert.radii[:distance_points])),
    }
    dump("summary.json", summary)
    return DemoResult(rows, files, time.monotonic() - started)
