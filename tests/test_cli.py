"""The ``robustflow`` command line: train, certify and attack end to end, and bad input.

Runs in-process through :func:`robustflow.cli.main` on a synthetic CIFAR folder and a tiny
checkpoint trained here; never on the real data set or the bundled models.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from certify import Certifier, parse_epsilon
from robustflow.checkpoint import model_from_checkpoint
from robustflow.cli import main
from robustflow.data import load_cifar10, write_cifar_folder
from robustflow.export import export_plain
from tests.conftest import synthetic_set

REPO = Path(__file__).resolve().parents[1]




def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of ``robustflow ARGV`` (argparse errors exit via SystemExit)."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic-cifar")
    write_cifar_folder(root, synthetic_set(200, 0), synthetic_set(100, 1))
    return root


@pytest.fixture(scope="session")
def checkpoint(data_root: Path, tmp_path_factory) -> Path:
    """A micro model trained for two epochs through ``robustflow train``."""
    out = tmp_path_factory.mktemp("ckpt") / "micro.pt"
    code = main(["train", "--preset", "micro", "--data-root", str(data_root), "--epochs", "2",
                 "--batch-size", "32", "--val-size", "20", "--device", "cpu", "--out", str(out),
                 "--no-progress"])
    assert code == 0 and out.is_file()
    return out


@pytest.fixture(autouse=True)
def _no_default_data(monkeypatch) -> None:
    monkeypatch.delenv("ROBUSTFLOW_DATA", raising=False)


# ------------------------------------------------------------------ working runs


def test_train_reports_and_saves(data_root: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "m.pt"
    code, stdout, _ = run(["train", "--preset", "micro", "--data-root", data_root, "--epochs", "1",
                           "--batch-size", "50", "--limit", "100", "--val-size", "10", "--device", "cpu",
                           "--out", out, "--no-progress", "--loss", "hinge", "--schedule", "step",
                           "--augment"], capsys)
    assert code == 0
    assert "epoch   1" in stdout and f"saved {out} after epoch 1" in stdout
    _, record = model_from_checkpoint(out)
    assert record["train_images"] == 100 and record["train"]["loss"] == "hinge"
    assert record["train"]["schedule"] == "step" and record["metrics"]["epoch"] == 1
    assert record["train"]["augment"] is True


def test_certify(checkpoint: Path, data_root: Path, tmp_path: Path, capsys) -> None:
    report, per_sample = tmp_path / "out" / "cert.json", tmp_path / "out" / "cert.csv"
    code, stdout, _ = run(["certify", "--checkpoint", checkpoint, "--data-root", data_root,
                           "--limit", "50", "--eps", "36/255,0.3", "--json", report,
                           "--per-sample", per_sample, "--no-progress", "--device", "cpu"], capsys)
    assert code == 0
    assert "on 50 images (CIFAR-10 test split)" in stdout
    header = next(line for line in stdout.splitlines() if line.split()[:1] == ["eps"])
    assert header.split() == ["eps", "clean", "certified"]
    assert any(line.split()[:1] == ["36/255"] for line in stdout.splitlines())
    assert any(line.split()[:1] == ["0.3"] for line in stdout.splitlines())

    data = json.loads(report.read_text())
    for key in ("model", "lipschitz_bound", "n", "clean_accuracy", "certified_accuracy",
                "radius_quantiles", "method"):
        assert key in data, key
    assert data["n"] == 50 and set(data["certified_accuracy"]) == {"36/255", "0.3"}
    assert 0 < data["lipschitz_bound"] <= 1 + 1e-5
    cert = data["certified_accuracy"]

    with open(per_sample, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 50
    test = load_cifar10(data_root, train=False, limit=50)
    assert [int(r["label"]) for r in rows] == test.labels.tolist()
    correct = [int(r["label"]) == int(r["prediction"]) for r in rows]
    radii = [float(r["radius"]) for r in rows]
    assert sum(correct) / 50 == pytest.approx(data["clean_accuracy"])
    for label, eps in (("36/255", 36 / 255), ("0.3", 0.3)):
        certified = sum(c and r > eps for c, r in zip(correct, radii, strict=True)) / 50
        assert certified == pytest.approx(cert[label])
    assert all(r == 0 for c, r in zip(correct, radii, strict=True) if not c)
    assert data["labels"] == test.labels.tolist() and data["radii"] == pytest.approx(radii)
    for q, value in data["radius_quantiles"].items():
        assert value == pytest.approx(np.quantile(radii, float(q)), abs=1e-6), q

    model, _ = model_from_checkpoint(checkpoint)  # the table's predictions are the model's
    with torch.no_grad():
        predictions = model(test.floats()[0]).argmax(1).tolist()
    assert predictions == [int(r["prediction"]) for r in rows]


def test_certify_in_float64_keeps_the_decisions_and_tightens_the_radii(
        checkpoint: Path, data_root: Path, tmp_path: Path, capsys) -> None:
    """float32 certificates lower each radius by the proven float32 rounding bound and take
    float64's decision at each ε; certifying in float64 gives the same accuracies and radii
    at least as large (both are sound lower bounds of the exact-arithmetic radius)."""
    reports = {}
    for precision in ("float32", "float64"):
        path = tmp_path / f"{precision}.json"
        code, stdout, _ = run(["certify", "--checkpoint", checkpoint, "--data-root", data_root,
                               "--limit", "60", "--eps", "0.01,36/255", "--json", path,
                               "--precision", precision, "--no-progress", "--device", "cpu"],
                              capsys)
        assert code == 0 and f"arithmetic: {precision}" in stdout
        reports[precision] = json.loads(path.read_text())
        measured = reports[precision]["arithmetic"]["measured_logit_error_bound"]
        assert f"measured on the pass, median {measured['median']:.2g}" in stdout
    r32, r64 = (np.array(reports[p]["radii"]) for p in ("float32", "float64"))
    assert reports["float32"]["certified_accuracy"] == reports["float64"]["certified_accuracy"]
    assert (r32 <= r64 + 1e-9).all() and r64.sum() > r32.sum()
    assert reports["float64"]["arithmetic"]["logit_error_bound"]["const"] < \
        1e-6 * reports["float32"]["arithmetic"]["logit_error_bound"]["const"]
    code, _, err = run(["certify", "--checkpoint", checkpoint, "--data-root", data_root,
                        "--precision", "float16"], capsys)
    assert code == 2 and "invalid choice: 'float16'" in err


def test_attack(checkpoint: Path, data_root: Path, tmp_path: Path, capsys) -> None:
    report, adv = tmp_path / "attack.json", tmp_path / "adv.npz"
    code, stdout, _ = run(["attack", "--checkpoint", checkpoint, "--data-root", data_root,
                           "--limit", "40", "--steps", "5", "--json", report, "--save-adv", adv,
                           "--no-progress", "--device", "cpu"], capsys)
    assert code == 0
    assert "pgd-l2, 5 steps" in stdout
    data = json.loads(report.read_text())
    for key in ("model", "attack", "steps", "restarts", "n", "clean_accuracy", "robust_accuracy"):
        assert key in data, key
    assert data["n"] == 40 and data["steps"] == 5 and data["attack"] == "pgd-l2"
    assert set(data["robust_accuracy"]) == {"36/255", "0.3"}

    test = load_cifar10(data_root, train=False, limit=40)
    model = export_plain(model_from_checkpoint(checkpoint)[0]).eval()  # the model attacked
    certificate = Certifier(model, (3, 32, 32))(*test.floats())
    x = test.floats()[0].numpy()
    with np.load(adv, allow_pickle=False) as saved:
        labels = [str(v) for v in saved["epsilons"]]
        assert labels == ["36/255", "0.3"]
        for i, label in enumerate(labels):
            images = saved[f"eps_{i}"]
            assert images.shape == x.shape
            assert images.min() >= 0 and images.max() <= 1
            distance = np.sqrt(((images - x) ** 2).reshape(len(x), -1).sum(axis=1))
            assert distance.max() <= parse_epsilon(label) + 1e-5
            with torch.no_grad():  # robust: the images whose saved adversarial is still right
                held = model(torch.from_numpy(images)).argmax(dim=1) == test.labels
            assert data["robust_accuracy"][label] == int(held.sum()) / 40, label
            certified = certificate.correct & (certificate.radius > parse_epsilon(label))
            assert data["certified_accuracy"][label] == pytest.approx(int(certified.sum()) / 40), label


def test_attack_linf_targeted(checkpoint: Path, data_root: Path, tmp_path: Path, capsys) -> None:
    report = tmp_path / "attack.json"
    code, stdout, _ = run(["attack", "--checkpoint", checkpoint, "--data-root", data_root,
                           "--limit", "20", "--steps", "3", "--attack", "pgd-linf", "--eps", "2/255",
                           "--target", "cat", "--json", report, "--no-progress"], capsys)
    assert code == 0 and "target cat" in stdout
    data = json.loads(report.read_text())
    assert data["target"] == 3 and data["attack"] == "pgd-linf"


def test_attack_autoattack(checkpoint: Path, data_root: Path, tmp_path: Path, capsys) -> None:
    report = tmp_path / "autoattack.json"
    code, stdout, _ = run(["attack", "--checkpoint", checkpoint, "--data-root", data_root,
                           "--limit", "20", "--attack", "autoattack", "--steps", "3", "--queries",
                           "20", "--eps", "0.1,0.5", "--json", report, "--no-progress"], capsys)
    assert code == 0
    assert "autoattack, 3 steps, 20 queries, l2" in stdout
    header = next(line for line in stdout.splitlines() if line.lstrip().startswith("eps"))
    assert header.split() == ["eps", "clean", "certified", "apgd-ce", "apgd-t", "fab-t", "square",
                              "robust"]
    data = json.loads(report.read_text())
    assert data["attack"] == "autoattack" and data["norm"] == "l2" and data["queries"] == 20
    stages = data["per_attack"]
    assert list(stages) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    for label, robust in data["robust_accuracy"].items():
        after = [stages[name][label] for name in stages]
        assert after == sorted(after, reverse=True) and after[-1] == robust, label
        assert data["certified_accuracy"][label] <= robust <= data["clean_accuracy"], label
        assert data["attacked_points"][label] <= round(data["n"] * (data["clean_accuracy"]
                                                                   - data["certified_accuracy"][label]))


def test_attack_autoattack_linf_parts(checkpoint: Path, data_root: Path, tmp_path: Path,
                                      capsys) -> None:
    report = tmp_path / "apgd.json"
    code, stdout, _ = run(["attack", "--checkpoint", checkpoint, "--data-root", data_root,
                           "--limit", "20", "--attack", "apgd-t", "--norm", "linf", "--steps", "3",
                           "--eps", "8/255", "--target", "cat", "--json", report, "--no-progress"],
                          capsys)
    assert code == 0 and "apgd-t, 3 steps, 1 restart(s), linf, target cat" in stdout
    data = json.loads(report.read_text())
    assert data["norm"] == "linf" and data["per_attack"] is None
    assert data["robust_accuracy"]["8/255"] <= data["clean_accuracy"]


def test_attack_foolbox_minimisation_uses_the_steps_asked_for(checkpoint: Path, data_root: Path,
                                                               tmp_path: Path, monkeypatch,
                                                               capsys) -> None:
    """``--steps`` reaches foolbox's attack and the distance search, and the report says so."""
    from robustflow import evaluation

    asked = []
    search = evaluation.minimal_adversarial_distance

    def recording(*args, **kwargs):
        asked.append(kwargs.get("steps"))
        return search(*args, **kwargs)

    monkeypatch.setattr(evaluation, "minimal_adversarial_distance", recording)
    report = tmp_path / "ddn.json"
    code, stdout, _ = run(["attack", "--checkpoint", checkpoint, "--data-root", data_root,
                           "--limit", "10", "--attack", "foolbox:DDNAttack", "--steps", "3",
                           "--eps", "0.5", "--json", report, "--no-progress"], capsys)
    assert code == 0 and "foolbox:DDNAttack, 3 steps" in stdout
    data = json.loads(report.read_text())
    assert data["steps"] == 3 and asked and set(asked) == {3}
    assert len(data["min_distances"]) == 10


def test_attack_certified_attacks_every_certified_point(checkpoint: Path, data_root: Path,
                                                        tmp_path: Path, capsys) -> None:
    report = tmp_path / "audit.json"
    code, stdout, err = run(["attack", "--checkpoint", checkpoint, "--data-root", data_root,
                             "--limit", "40", "--steps", "5", "--eps", "0.05,0.1",
                             "--attack-certified", "--json", report, "--no-progress"], capsys)
    assert code == 0 and err == ""
    data = json.loads(report.read_text())
    test = load_cifar10(data_root, train=False, limit=40)
    model = export_plain(model_from_checkpoint(checkpoint)[0]).eval()
    certificate = Certifier(model, (3, 32, 32))(*test.floats())
    correct = int(certificate.correct.sum())
    counts = []
    for label in ("0.05", "0.1"):
        certified = int((certificate.correct & (certificate.radius > parse_epsilon(label))).sum())
        assert data["certified_attacked"][label] == certified > 0, label
        assert data["certified_broken"][label] == 0, label
        assert data["attacked_points"][label] == correct, label  # certified points included
        counts.append(f"0 of {certified} at {label}")
    assert f"certified points the attack broke: {', '.join(counts)}" in stdout


def test_attack_certified_fails_on_an_unsound_certificate(checkpoint: Path, data_root: Path,
                                                          monkeypatch, capsys) -> None:
    """A certifier that inflates every radius 1,000-fold is caught: exit 1, one line."""
    from robustflow import evaluation

    class Inflating(Certifier):
        def __call__(self, *args, **kwargs):
            batch = super().__call__(*args, **kwargs)
            batch.radius = batch.radius * 1000
            return batch

    monkeypatch.setattr(evaluation, "Certifier", Inflating)
    code, stdout, err = run(["attack", "--checkpoint", checkpoint, "--data-root", data_root,
                             "--limit", "40", "--steps", "5", "--eps", "0.5",
                             "--attack-certified", "--no-progress"], capsys)
    broken = int(stdout.split("certified points the attack broke: ")[1].split(" of ")[0])
    assert code == 1 and broken > 0
    assert err.startswith("robustflow: error: the attack broke certified points")
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_bundled_sample(checkpoint: Path, tmp_path: Path, capsys) -> None:
    report = tmp_path / "cert.json"
    code, stdout, _ = run(["certify", "--checkpoint", checkpoint, "--limit", "20", "--json", report,
                           "--no-progress"], capsys)
    assert code == 0 and "bundled test sample" in stdout
    assert json.loads(report.read_text())["n"] == 20
    code, stdout, _ = run(["attack", "--checkpoint", checkpoint, "--limit", "20", "--steps", "2",
                           "--json", report, "--no-progress"], capsys)
    assert code == 0 and "bundled test sample" in stdout
    data = json.loads(report.read_text())
    assert data["n"] == 20 and data["steps"] == 2


def test_help_version_and_no_command(capsys) -> None:
    code, stdout, _ = run([], capsys)
    assert code == 0 and "certify" in stdout
    code, stdout, _ = run(["--version"], capsys)
    assert code == 0 and stdout.startswith("robustflow ")


def _subprocess(*argv) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "robustflow.cli", *map(str, argv)],
                          capture_output=True, text=True, env=env, timeout=120)


def test_real_process_help_and_error(checkpoint: Path, tmp_path: Path) -> None:
    """Through the real interpreter: exit codes, and no warning lines around the one error line."""
    done = _subprocess("--help")
    assert done.returncode == 0, done.stderr
    for command in ("train", "certify", "attack"):
        assert command in done.stdout
    assert done.stderr == ""
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(checkpoint.read_bytes()[:5000])
    done = _subprocess("certify", "--checkpoint", corrupt, "--no-progress")
    assert_one_line_error(done.returncode, done.stderr)
    assert "not a readable checkpoint" in done.stderr and done.stdout == ""


# ------------------------------------------------------------------ bad input


def assert_one_line_error(code: int, err: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    assert lines[0].startswith("robustflow") and "error" in lines[0], err


@pytest.mark.parametrize("argv, expected", [
    (["certify", "--eps", "-1"], "non-negative"),
    (["certify", "--eps", "abc"], "neither a number nor a fraction"),
    (["certify", "--eps", "1/0"], "zero denominator"),
    (["certify", "--eps", "0.1,"], "epsilon"),
    (["certify", "--limit", "0"], "≥ 1"),
    (["attack", "--steps", "0"], "≥ 1"),
    (["attack", "--attack", "nonsense"], "unknown attack"),
    (["attack", "--target", "zebra"], "unknown target class"),
    (["attack", "--attack", "autoattack-plus"], "unknown attack"),
    (["attack", "--attack", "pgd-l2", "--norm", "linf"], "pgd-l2 attacks in l2, not linf"),
    (["attack", "--attack", "foolbox:DDNAttack", "--norm", "linf"], "attacks in l2, not linf"),
    (["attack", "--attack", "foolbox:FGSM", "--steps", "3"], "FGSM does not take steps"),
    (["attack", "--attack", "foolbox:DDNAttack", "--restarts", "2"], "restarts must be 1"),
    (["attack", "--attack", "autoattack", "--norm", "l1"], "invalid choice"),
    (["attack", "--attack", "autoattack", "--target", "cat"], "untargeted"),
    (["attack", "--attack", "autoattack", "--restarts", "2"], "restarts must be 1"),
    (["attack", "--attack", "square", "--queries", "0"], "≥ 1"),
    (["train", "--epochs", "0"], "≥ 1"),
    (["train", "--eps", "abc"], "neither a number"),
    (["train", "--optimizer", "lbfgs"], "invalid choice"),
    (["train", "--init", "x.pt", "--resume"], "use one of them"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments(argv: list[str], expected: str, checkpoint: Path, capsys) -> None:
    if argv[0] in ("certify", "attack"):
        argv = [*argv, "--checkpoint", checkpoint, "--no-progress"]
    code, stdout, err = run(argv, capsys)
    assert_one_line_error(code, err)
    assert expected in err


def test_missing_checkpoint(tmp_path: Path, capsys) -> None:
    for command in ("certify", "attack"):
        code, _, err = run([command, "--checkpoint", tmp_path / "missing.pt", "--no-progress"], capsys)
        assert_one_line_error(code, err)
        assert "checkpoint not found" in err and "missing.pt" in err


def test_foreign_and_corrupt_checkpoints(tmp_path: Path, checkpoint: Path, capsys) -> None:
    model, _ = model_from_checkpoint(checkpoint)
    foreign, corrupt = tmp_path / "weights.pt", tmp_path / "corrupt.pt"
    torch.save(model.state_dict(), foreign)
    corrupt.write_bytes(checkpoint.read_bytes()[:5000])
    for path, expected in ((foreign, "not a robustflow model checkpoint"),
                           (corrupt, "not a readable checkpoint")):
        code, _, err = run(["certify", "--checkpoint", path, "--no-progress"], capsys)
        assert_one_line_error(code, err)
        assert expected in err


def test_empty_data_root(tmp_path: Path, checkpoint: Path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    for command in ("certify", "attack"):
        code, _, err = run([command, "--checkpoint", checkpoint, "--data-root", empty, "--no-progress"],
                           capsys)
        assert_one_line_error(code, err)
        assert "CIFAR-10 not found" in err and "--data-root" in err
    out = tmp_path / "m.pt"
    code, _, err = run(["train", "--preset", "micro", "--data-root", empty, "--out", out,
                        "--device", "cpu", "--no-progress"], capsys)
    assert_one_line_error(code, err)
    assert "CIFAR-10 not found" in err
    code, _, err = run(["train", "--preset", "micro", "--out", out, "--device", "cpu"], capsys)
    assert_one_line_error(code, err)  # no --data-root and no $ROBUSTFLOW_DATA
    assert "ROBUSTFLOW_DATA" in err
    assert list(tmp_path.iterdir()) == [empty]


def test_broken_batch_in_data_root(tmp_path: Path, checkpoint: Path, capsys) -> None:
    write_cifar_folder(tmp_path, None, synthetic_set(10, 3))
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"\x80\x02}q\x00(X")
    code, _, err = run(["certify", "--checkpoint", checkpoint, "--data-root", tmp_path, "--no-progress"],
                       capsys)
    assert_one_line_error(code, err)
    assert "test_batch is not a valid CIFAR-10 batch" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu(tmp_path: Path, data_root: Path, checkpoint: Path, capsys) -> None:
    code, _, err = run(["train", "--preset", "micro", "--data-root", data_root, "--device", "cuda",
                        "--out", tmp_path / "m.pt"], capsys)
    assert_one_line_error(code, err)
    assert "no CUDA device" in err
    code, _, err = run(["certify", "--checkpoint", checkpoint, "--device", "cuda"], capsys)
    assert_one_line_error(code, err)
    assert not (tmp_path / "m.pt").exists()


def test_bad_train_values(tmp_path: Path, data_root: Path, capsys) -> None:
    for extra, expected in ((["--lr", "0"], "--lr"), (["--preset", "enormous"], "unknown preset"),
                            (["--device", "tpu"], "--device"), (["--time-budget", "-3"], "--time-budget"),
                            (["--resume"], "checkpoint not found")):
        code, _, err = run(["train", "--data-root", data_root, "--out", tmp_path / "m.pt",
                            "--device", "cpu", "--no-progress", *extra], capsys)
        assert_one_line_error(code, err)
        assert expected in err, extra
    assert list(tmp_path.iterdir()) == []


def test_unwritable_report(checkpoint: Path, tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, _, err = run(["certify", "--checkpoint", checkpoint, "--limit", "5", "--no-progress",
                        "--json", blocker / "report.json"], capsys)
    assert_one_line_error(code, err)
    assert "cannot write" in err
