"""``robustflow demo`` and ``robustflow plot`` end to end, on the bundled models."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch

from certify import Certifier
from robustflow.cli import main
from robustflow.demo import ATTACK_EPS
from robustflow.pretrained import load_model, load_sample_set


def _png_size(path: Path) -> tuple[int, int]:
    height, width = matplotlib.image.imread(path).shape[:2]
    return width, height


def test_demo_runs_end_to_end_on_a_reduced_sample(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--limit", "60", "--steps", "3", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "1-Lipschitz" in printed and "baseline" in printed
    files = ("certify.json", "attack-lipschitz.json", "attack-baseline.json",
             "distances-lipschitz.json", "summary.json")
    cert, attack, baseline, distances, summary = (json.loads((out / f).read_text()) for f in files)
    assert _png_size(out / "plane-cat.png")[0] > 300
    assert _png_size(out / "curves.png")[0] > 300
    for report in (attack, baseline):  # the curves: PGD at every ε of the grid
        assert list(report["robust_accuracy"]) == [label for label, _ in ATTACK_EPS]
    for row in summary["rows"]:  # the table is what the reports say
        report = attack if row["model"] == "1-Lipschitz" else baseline
        assert row["pgd"] == report["robust_accuracy"][row["eps"]]
        assert row["certified"] == (cert["certified_accuracy"][row["eps"]]
                                    if row["model"] == "1-Lipschitz" else None)
    # the scatter: per-image radii and DDN distances of the same 60 images, and no certified
    # radius beyond an adversarial that DDN found
    assert distances["labels"] == cert["labels"] == load_sample_set().labels[:60].tolist()
    radii, found = np.array(cert["radii"]), np.array(distances["min_distances"])
    assert len(found) == 60 and np.isfinite(found).any()
    assert summary["radius_above_distance"] == int((radii > found).sum()) == 0
    assert main(["plot", "curves", "--certify-report", str(out / "certify.json"), "--attack-report",
                 str(out / "attack-lipschitz.json"), "--distances-report",
                 str(out / "distances-lipschitz.json"), "--out", str(tmp_path / "again.png")]) == 0
    assert _png_size(tmp_path / "again.png") == _png_size(out / "curves.png")
    shown = (radii > 0) & np.isfinite(found) & (found > 0)
    assert (f"radius against distance: 0 of {int(((found > 0) & np.isfinite(found)).sum())} images"
            in capsys.readouterr().out) and shown.any()
    assert summary["lipschitz_bound"] <= 1 + 1e-5
    autoattack = json.loads((out / "autoattack-lipschitz.json").read_text())
    pgd = json.loads((out / "attack-lipschitz.json").read_text())
    assert autoattack["n"] == 60 and list(autoattack["per_attack"]) == ["apgd-ce", "apgd-t"]
    for eps, robust in autoattack["robust_accuracy"].items():  # the same 60 images
        assert autoattack["certified_accuracy"][eps] <= robust <= pgd["robust_accuracy"][eps], eps
    assert "AutoAttack (fast version at a reduced budget" in printed
    cat = summary["plane_cat"]  # an airplane, and its certificate recomputed from the model
    images, labels = load_sample_set().floats()
    assert int(labels[cat["index"]]) == 0
    lipschitz = load_model("lipschitz").eval()
    image = images[cat["index"]][None]
    with torch.no_grad():
        prediction = lipschitz(image).argmax(dim=1)
    certifier = Certifier(lipschitz, tuple(image.shape[1:]))  # exact at the figure's ε, as in the demo
    radius = float(certifier(image, prediction, epsilons=(cat["eps"],)).radius[0])
    assert radius == pytest.approx(cat["certified_radius"], rel=1e-6)


def test_plot_commands_write_images(tmp_path: Path) -> None:
    reports = tmp_path / "r"
    assert main(["certify", "--limit", "40", "--eps", "0.1,36/255,0.3", "--json",
                 str(reports / "c.json"), "--no-progress"]) == 0
    assert main(["attack", "--limit", "40", "--steps", "3", "--eps", "0.1,36/255,0.3", "--json",
                 str(reports / "a.json"), "--no-progress"]) == 0
    curves = tmp_path / "curves.png"
    assert main(["plot", "curves", "--certify-report", str(reports / "c.json"),
                 "--attack-report", str(reports / "a.json"), "--out", str(curves)]) == 0
    assert curves.stat().st_size > 0 and _png_size(curves)[0] > 300
    cat = tmp_path / "plane.png"
    assert main(["plot", "plane-cat", "--steps", "5", "--out", str(cat)]) == 0
    assert _png_size(cat)[0] > 300


@pytest.mark.parametrize(
    "argv",
    [
        ["plot", "curves", "--certify-report", "missing.json"],
        ["plot", "unicorn"],
        ["plot", "curves", "--attack-report", "{bad}", "--out", "x.png"],
        ["plot", "plane-cat", "--out", "/proc/forbidden/plane.png", "--steps", "2"],
        ["plot", "plane-cat", "--index", "100000"],
        ["demo", "--limit", "0"],
    ],
)
def test_bad_plot_input_is_one_line_and_exit_2(argv: list[str], tmp_path: Path, capsys,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "{bad}").write_text("not json")
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("robustflow") and "Traceback" not in err[0]
