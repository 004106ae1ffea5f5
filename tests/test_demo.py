"""``robustflow demo`` and ``robustflow plot`` end to end, on the bundled models."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import pytest

from robustflow.cli import main


def _png_size(path: Path) -> tuple[int, int]:
    height, width = matplotlib.image.imread(path).shape[:2]
    return width, height


def test_demo_runs_end_to_end_on_a_reduced_sample(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--limit", "60", "--steps", "3", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "1-Lipschitz" in printed and "baseline" in printed
    for name in ("certify.json", "attack-lipschitz.json", "attack-baseline.json", "summary.json"):
        assert (out / name).stat().st_size > 0
    assert _png_size(out / "plane-cat.png")[0] > 300
    assert _png_size(out / "curves.png")[0] > 300
    summary = json.loads((out / "summary.json").read_text())
    for row in summary["rows"]:
        if row["certified"] is not None:
            assert row["certified"] <= row["pgd"] <= row["clean"]
    assert summary["lipschitz_bound"] <= 1 + 1e-5
    cat = summary["plane_cat"]
    if cat["certified_radius"] > cat["eps"]:
        assert cat["lipschitz_adversarial_label"] == "airplane"


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
