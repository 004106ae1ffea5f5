"""Losses, learning-rate schedules, training runs, checkpoints, resume, the NaN guard, DDP.

Training runs use the ``micro`` preset on a small synthetic data set (never the real one).
"""

from __future__ import annotations

import math
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import robustflow.train as train_module
from certify import Certifier, pairwise_radius
from robustflow.checkpoint import (
    FORMAT,
    atomic_torch_save,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from robustflow.data import ImageSet, write_cifar_folder
from robustflow.errors import UserError
from robustflow.losses import (
    certified_cross_entropy,
    final_linear,
    make_loss,
    multiclass_hinge,
    pairwise_certified_cross_entropy,
    row_distances,
)
from robustflow.networks import build_model, preset
from robustflow.train import TrainConfig, TrainingDiverged, evaluate, learning_rate, train
from tests.conftest import synthetic_set

REPO = Path(__file__).resolve().parents[1]




@pytest.fixture(autouse=True)
def _no_default_data(monkeypatch) -> None:
    """A test that forgot to pass data must fail, not read the real data set from the env."""
    monkeypatch.delenv("ROBUSTFLOW_DATA", raising=False)


@pytest.fixture(scope="module")
def sets() -> tuple[ImageSet, ImageSet]:
    return synthetic_set(200, 0), synthetic_set(100, 1)


def config(out: Path, **changes) -> TrainConfig:
    base = dict(preset="micro", epochs=2, batch_size=32, val_size=50, device="cpu", progress=False,
                seed=0, out=str(out))
    return TrainConfig(**{**base, **changes})


@pytest.fixture(scope="module")
def run(tmp_path_factory, sets):
    """One uninterrupted two-epoch run: (model, record, checkpoint path)."""
    out = tmp_path_factory.mktemp("run") / "model.pt"
    model, record = train(config(out), train_set=sets[0], val_set=sets[1], log=lambda _: None)
    return model, record, out


class Evil:
    def __init__(self, func, arg) -> None:
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


# ------------------------------------------------------------------ losses and schedules


def test_multiclass_hinge_by_hand() -> None:
    logits = torch.tensor([[1.0, 0.9, -0.2], [0.1, 0.3, 0.2]])
    labels = torch.tensor([0, 2])
    # row 0: max(0, 0.9-1+0.15) + max(0, -0.2-1+0.15) = 0.05
    # row 1: max(0, 0.1-0.2+0.15) + max(0, 0.3-0.2+0.15) = 0.05 + 0.25
    assert multiclass_hinge(logits, labels, margin=0.15).item() == pytest.approx(0.175, abs=1e-6)
    assert multiclass_hinge(logits, labels, margin=0.0).item() == pytest.approx(0.05, abs=1e-6)
    assert make_loss("hinge", margin=0.15)(logits, labels).item() == pytest.approx(0.175, abs=1e-6)


def test_certified_cross_entropy() -> None:
    logits = torch.randn(6, 10)
    labels = torch.randint(0, 10, (6,))
    ce = F.cross_entropy(logits, labels)
    assert torch.allclose(certified_cross_entropy(logits, labels, eps=0.0, temperature=1.0), ce)
    assert torch.allclose(certified_cross_entropy(logits, labels, eps=0.0, temperature=0.25),
                          0.25 * F.cross_entropy(logits / 0.25, labels))
    # ε lowers the true logit by √2 L ε
    shifted = logits.clone()
    shifted[torch.arange(6), labels] -= math.sqrt(2) * 2.0 * 0.1
    assert torch.allclose(certified_cross_entropy(logits, labels, 0.1, lipschitz=2.0, temperature=1.0),
                          F.cross_entropy(shifted, labels))
    values = [certified_cross_entropy(logits, labels, eps, temperature=0.25).item()
              for eps in (0.0, 0.1, 0.3, 1.0)]
    assert all(a < b for a, b in zip(values, values[1:], strict=False))
    assert make_loss("cce", eps=0.3, temperature=0.25)(logits, labels).item() == pytest.approx(values[2])
    with pytest.raises(ValueError, match="unknown loss"):
        make_loss("mse")


def test_row_distances_match_cdist_and_carry_gradients() -> None:
    weight = torch.randn(10, 40, dtype=torch.float64, requires_grad=True)
    d = row_distances(weight)
    assert torch.allclose(d, torch.cdist(weight, weight).detach(), atol=1e-6)
    assert torch.all(d.diagonal() == 0)
    d.sum().backward()
    assert torch.isfinite(weight.grad).all() and weight.grad.abs().sum() > 0


def test_pairwise_cce_is_cce_for_orthonormal_rows_and_lower_for_closer_rows() -> None:
    torch.manual_seed(0)
    logits, labels = torch.randn(16, 10), torch.randint(0, 10, (16,))
    rows = torch.linalg.qr(torch.randn(32, 10)).Q.T  # ‖w_i − w_j‖ = √2 for every pair
    assert torch.allclose(pairwise_certified_cross_entropy(logits, labels, rows, 0.3),
                          certified_cross_entropy(logits, labels, 0.3), atol=1e-6)
    # rows as close as a norm-1 head allows for some pairs: every offset ≤ √2 ε, so a lower loss
    closer = rows.clone()
    closer[1] = (rows[0] + rows[1]) / math.sqrt(2.0)
    assert pairwise_certified_cross_entropy(logits, labels, closer, 0.3) < \
        certified_cross_entropy(logits, labels, 0.3)
    # the offset of rival j is exactly ε ‖w_y − w_j‖
    by_hand = logits + 0.3 * torch.cdist(closer, closer)[labels]
    assert torch.allclose(pairwise_certified_cross_entropy(logits, labels, closer, 0.3, temperature=1.0),
                          F.cross_entropy(by_hand, labels), atol=1e-5)


def test_pairwise_cce_penalises_exactly_the_uncertified_pairs() -> None:
    """With a steep temperature the loss vanishes iff certify's pairwise radius exceeds ε."""
    torch.manual_seed(1)
    head = torch.randn(10, 24, dtype=torch.float64)
    head = head / torch.linalg.matrix_norm(head, ord=2)
    features = torch.randn(200, 24, dtype=torch.float64)
    logits, labels = features @ head.T, torch.randint(0, 10, (200,))
    eps = 0.05
    radius = pairwise_radius(logits, labels, 1.0, torch.cdist(head, head))
    losses = torch.stack([pairwise_certified_cross_entropy(logits[i:i + 1], labels[i:i + 1], head,
                                                           eps, temperature=1e-4) for i in range(200)])
    certified = radius > eps
    assert certified.any() and (~certified).any()
    assert torch.all(losses[certified] < 1e-6)
    assert torch.all(losses[~certified] > 0)


def test_cce_pairwise_reads_the_model_head() -> None:
    model = build_model(preset("micro"))
    assert final_linear(model) is model.head
    loss = make_loss("cce-pairwise", eps=0.2, temperature=0.25, model=model)
    logits, labels = torch.randn(4, 10), torch.tensor([0, 1, 2, 3])
    expected = pairwise_certified_cross_entropy(logits, labels, model.head.weight, 0.2)
    assert torch.allclose(loss(logits, labels), expected)
    with pytest.raises(ValueError, match="needs the model"):
        make_loss("cce-pairwise")
    with pytest.raises(ValueError, match="ends in a linear layer; Sequential ends in ReLU"):
        make_loss("cce-pairwise", model=torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU()))


def test_training_with_the_pairwise_loss(tmp_path, sets) -> None:
    model, record = train(config(tmp_path / "p.pt", loss="cce-pairwise", epochs=1, val_size=0),
                          train_set=sets[0], log=lambda _: None)
    assert record["train"]["loss"] == "cce-pairwise"
    assert math.isfinite(record["history"][0]["train_loss"])
    assert model.lipschitz_bound() <= 1.0


@pytest.mark.parametrize("schedule, expected", [
    ("cosine", (1.0, 0.5, 0.0)),
    ("step", (1.0, 0.1, 0.01)),
    ("constant", (1.0, 1.0, 1.0)),
])
def test_learning_rate(schedule: str, expected: tuple[float, float, float]) -> None:
    for p, e in zip((0.0, 0.5, 1.0), expected, strict=True):
        assert learning_rate(0.2, schedule, p) == pytest.approx(0.2 * e, abs=1e-12)
    # out-of-range progress (a time budget overrun) is clamped
    assert learning_rate(0.2, schedule, 1.7) == pytest.approx(0.2 * expected[2], abs=1e-12)
    assert learning_rate(0.2, schedule, -0.1) == pytest.approx(0.2, abs=1e-12)


def test_step_schedule_boundaries() -> None:
    assert learning_rate(1.0, "step", 0.33) == 1.0
    assert learning_rate(1.0, "step", 0.34) == pytest.approx(0.1)
    assert learning_rate(1.0, "step", 0.67) == pytest.approx(0.01)


# ------------------------------------------------------------------ a training run


def test_training_lowers_the_loss(run, sets) -> None:
    model, record, _ = run
    history = record["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[1]["train_loss"] < history[0]["train_loss"]
    torch.manual_seed(0)
    initial = build_model(preset("micro")).eval()
    x, y = sets[0].floats()
    loss = make_loss("cce", eps=0.25, temperature=0.25)
    with torch.no_grad():
        assert loss(model(x), y).item() < 0.9 * loss(initial(x), y).item()
    held_out = sets[1].subset(slice(0, 50))  # val_size: the last epoch's figures, recomputed
    x_val, y_val = held_out.floats()
    with torch.no_grad():
        assert history[1]["clean_accuracy"] == int((model(x_val).argmax(1) == y_val).sum()) / 50
    batch = Certifier(model, (3, 32, 32))(x_val, y_val)
    assert history[1]["certified_accuracy"] == int((batch.correct & (batch.radius > 36 / 255)).sum()) / 50


def test_checkpoint_record_and_reload(run, sets) -> None:
    model, record, out = run
    assert out.is_file()
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temp files left
    payload = load_checkpoint(out)
    assert payload["format"] == FORMAT
    saved = payload["record"]
    for key in ("config", "classes", "normalization", "eps", "epoch", "metrics", "versions"):
        assert key in saved, key
    assert saved["epoch"] == 2 and saved["metrics"] == record["metrics"]
    assert saved["eps"] == pytest.approx(36 / 255)
    assert saved["config"]["channels"] == [4, 8]
    assert set(saved["versions"]) >= {"robustflow", "torch"}
    assert payload["training"]["epoch"] == 2 and payload["training"]["step"] == 2 * (200 // 32)

    loaded, loaded_record = model_from_checkpoint(out)
    assert loaded_record == saved
    assert not loaded.training
    x, _ = sets[1].floats(slice(0, 16))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.lipschitz_bound() <= 1 + 1e-5


# ------------------------------------------------------------------ checkpoint files


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()],
                         ids=["OSError", "KeyboardInterrupt"])
def test_atomic_save_keeps_old_file_on_failure(tmp_path: Path, monkeypatch, error) -> None:
    path = tmp_path / "model.pt"
    model = build_model(preset("micro"))
    save_checkpoint(path, model, {"epoch": 1})
    before = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise error

    monkeypatch.setattr(torch, "save", broken_save)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(type(error)):
        save_checkpoint(path, model, {"epoch": 2})
    assert path.read_bytes() == before
    assert load_checkpoint(path)["record"] == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_atomic_save_replaces_and_creates_folders(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "x.pt"
    atomic_torch_save({"v": torch.arange(3)}, path)
    atomic_torch_save({"v": torch.arange(5)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["v"], torch.arange(5))
    assert [p.name for p in path.parent.iterdir()] == ["x.pt"]


def test_record_must_be_json(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="JSON"):
        save_checkpoint(tmp_path / "m.pt", build_model(preset("micro")), {"bad": object()})
    assert not (tmp_path / "m.pt").exists()


def _broken_checkpoints(tmp_path: Path, marker: Path) -> dict[str, Path]:
    good = tmp_path / "good.pt"
    model = build_model(preset("micro"))
    save_checkpoint(good, model, {"config": model.config.to_dict()})
    data = good.read_bytes()
    files = {
        "corrupt": os.urandom(4096),
        "truncated": data[: len(data) // 2],
        "empty": b"",
    }
    paths = {}
    for name, content in files.items():
        paths[name] = tmp_path / f"{name}.pt"
        paths[name].write_bytes(content)
    paths["state_dict"] = tmp_path / "state_dict.pt"
    torch.save(model.state_dict(), paths["state_dict"])
    paths["other_version"] = tmp_path / "other_version.pt"
    torch.save({"format": FORMAT, "version": 99, "record": {}, "state_dict": {}}, paths["other_version"])
    paths["evil_zip"] = tmp_path / "evil_zip.pt"
    torch.save({"format": FORMAT, "version": 1, "record": Evil(os.system, f"touch {marker}")},
               paths["evil_zip"])
    paths["evil_pickle"] = tmp_path / "evil_pickle.pt"
    paths["evil_pickle"].write_bytes(pickle.dumps(Evil(eval, f"open({str(marker)!r}, 'w')"), protocol=2))
    return paths


@pytest.mark.parametrize("name, match", [
    ("corrupt", "not a readable checkpoint"),
    ("truncated", "not a readable checkpoint"),
    ("empty", "not a readable checkpoint"),
    ("state_dict", "not a robustflow model checkpoint"),
    ("other_version", "version 99"),
    ("evil_zip", "not a readable checkpoint"),
    ("evil_pickle", "not a readable checkpoint"),
])
def test_unloadable_checkpoints(tmp_path: Path, name: str, match: str) -> None:
    marker = tmp_path / "pwned"
    path = _broken_checkpoints(tmp_path, marker)[name]
    with pytest.raises(UserError, match=match) as err:
        model_from_checkpoint(path)
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)
    assert not marker.exists()


def damaged_variants(good: bytes, count: int, seed: int = 0):
    """Noise, truncations and bit flips of ``good``, deterministic for ``seed``."""
    rng = random.Random(seed)
    for i in range(count):
        if i % 3 == 0:
            yield rng.randbytes(rng.choice([16, 64, 512]))
        elif i % 3 == 1:
            yield good[: rng.randrange(len(good))]
        else:
            damaged = bytearray(good)
            for _ in range(rng.randint(1, 4)):
                damaged[rng.randrange(len(good))] = rng.randrange(256)
            yield bytes(damaged)


def test_damaged_checkpoints_give_user_errors(tmp_path: Path) -> None:
    """Whatever the damage, loading ends in a one-line UserError or a well-formed model."""
    good = tmp_path / "good.pt"
    model = build_model(preset("micro"))
    save_checkpoint(good, model, {"config": model.config.to_dict()})
    path = tmp_path / "damaged.pt"
    refused = 0
    for damaged in damaged_variants(good.read_bytes(), 180):
        path.write_bytes(damaged)
        try:
            loaded, _ = model_from_checkpoint(path)
        except UserError as err:
            assert str(path) in str(err) and "\n" not in str(err)
            refused += 1
        else:  # a flip in bytes nobody reads (zip padding, unused record bytes)
            assert loaded(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    assert refused >= 120


def test_malicious_checkpoint_payloads_are_live(tmp_path: Path) -> None:
    """Plain unpickling would run them, so the refusal above is what keeps the marker away."""
    marker = tmp_path / "pwned"
    path = _broken_checkpoints(tmp_path, marker)["evil_zip"]
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_missing_and_unbuildable_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="checkpoint not found"):
        model_from_checkpoint(tmp_path / "missing.pt")
    path = tmp_path / "odd.pt"
    save_checkpoint(path, build_model(preset("micro")), {"config": {"channels": [4, 8], "wings": 2}})
    with pytest.raises(UserError, match="does not describe a model"):
        model_from_checkpoint(path)
    save_checkpoint(path, build_model(preset("micro")), {"config": preset("tiny").to_dict()})
    with pytest.raises(UserError, match="does not describe a model"):  # weights of another shape
        model_from_checkpoint(path)


# ------------------------------------------------------------------ resume


class _Killed(Exception):
    pass


def test_resume_equals_uninterrupted(run, sets, tmp_path: Path, monkeypatch) -> None:
    reference, reference_record, _ = run
    out = tmp_path / "model.pt"
    real_save = train_module.save_checkpoint

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise _Killed  # killed right after the first epoch's checkpoint

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        train(config(out), train_set=sets[0], val_set=sets[1], log=lambda _: None)
    assert load_checkpoint(out)["record"]["epoch"] == 1
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)

    torch.manual_seed(123)  # resuming must not depend on the caller's global RNG
    resumed, record = train(config(out, resume=True), train_set=sets[0], val_set=sets[1],
                            log=lambda _: None)
    expected = reference.state_dict()
    got = resumed.state_dict()
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert record["epoch"] == 2
    assert [h["train_loss"] for h in record["history"]] == \
        [h["train_loss"] for h in reference_record["history"]]


def test_ema_model_is_the_average_of_the_trained_weights(run, sets, tmp_path: Path,
                                                        monkeypatch) -> None:
    """--ema d: training follows the same weights as without it, and the model evaluated, saved
    and returned is θ̄_t = d θ̄_{t−1} + (1 − d) θ_t (θ̄_1 = θ_1) over every step, recomputed
    here by hand from the weights after each step."""
    decay = 0.9
    steps: list[dict[str, torch.Tensor]] = []
    original = train_module.optimizer_step

    def recording(net, optimizer, loss_fn, x, y):
        result = original(net, optimizer, loss_fn, x, y)
        steps.append({k: p.detach().clone() for k, p in net.named_parameters()})
        return result

    monkeypatch.setattr(train_module, "optimizer_step", recording)
    out = tmp_path / "ema.pt"
    model, record = train(config(out, ema=decay), train_set=sets[0], val_set=sets[1],
                          log=lambda _: None)
    trained = load_checkpoint(out)["training"]["weights"]
    for key, value in run[0].state_dict().items():  # the trained weights are untouched by --ema
        assert torch.equal(trained[key], value), key
    expected = dict(steps[0])
    for weights in steps[1:]:
        for key in expected:
            expected[key] = decay * expected[key] + (1 - decay) * weights[key]
    got = dict(model.named_parameters())
    assert len(steps) == 12 and got.keys() == expected.keys()
    for key in expected:
        assert torch.allclose(got[key], expected[key], atol=1e-6), key
    assert all(not torch.equal(got[key], trained[key]) for key in got)
    assert model.lipschitz_bound() <= 1.0  # the same maps of averaged parameters: still bounded
    saved = load_checkpoint(out)
    assert record["train"]["ema"] == decay and saved["training"]["averaged"] == 12
    assert record["metrics"]["clean_accuracy"] == evaluate(model, sets[1].subset(slice(0, 50)),
                                                           36 / 255, torch.device("cpu"))["clean_accuracy"]


def test_ema_resume_equals_uninterrupted(sets, tmp_path: Path, monkeypatch) -> None:
    reference, _ = train(config(tmp_path / "whole.pt", ema=0.9), train_set=sets[0],
                         val_set=None, log=lambda _: None)
    out = tmp_path / "model.pt"
    real_save = train_module.save_checkpoint

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise _Killed

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        train(config(out, ema=0.9), train_set=sets[0], val_set=None, log=lambda _: None)
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    with pytest.raises(UserError, match="trained with --ema 0.9; resume it with the same --ema"):
        train(config(out, resume=True), train_set=sets[0], val_set=None, log=lambda _: None)
    resumed, _ = train(config(out, ema=0.9, resume=True), train_set=sets[0], val_set=None,
                       log=lambda _: None)
    expected, got = reference.state_dict(), resumed.state_dict()
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def test_resume_errors(run, sets, tmp_path: Path) -> None:
    out = tmp_path / "copy.pt"
    out.write_bytes(run[2].read_bytes())
    with pytest.raises(UserError, match="checkpoint not found"):
        train(config(tmp_path / "none.pt", resume=True, val_size=0), train_set=sets[0], val_set=None)
    with pytest.raises(UserError, match="another network config"):
        train(config(out, resume=True, kind="euler", val_size=0), train_set=sets[0], val_set=None)
    bare = tmp_path / "bare.pt"
    model = build_model(preset("micro"))
    save_checkpoint(bare, model, {"config": model.config.to_dict()})
    with pytest.raises(UserError, match="no training state"):
        train(config(bare, resume=True, val_size=0), train_set=sets[0], val_set=None)
    with pytest.raises(UserError, match="trained without --ema; resume it with the same --ema"):
        train(config(out, resume=True, ema=0.99, val_size=0), train_set=sets[0], val_set=None)


def test_init_starts_a_new_run_from_a_checkpoints_weights(run, sets, tmp_path: Path,
                                                         monkeypatch) -> None:
    """--init: the first step starts from the checkpoint's weights (the model before training
    equals it), with a fresh optimiser and schedule; the record names where the weights came
    from."""
    model, record, source = run
    seen = []
    original = train_module.optimizer_step

    def first_step(net, optimizer, loss_fn, x, y):
        if not seen:
            seen.append(({k: v.clone() for k, v in net.state_dict().items()},
                         len(optimizer.state), optimizer.param_groups[0]["lr"]))
        return original(net, optimizer, loss_fn, x, y)

    monkeypatch.setattr(train_module, "optimizer_step", first_step)
    out = tmp_path / "tuned.pt"
    tuned, tuned_record = train(config(out, epochs=1, lr=0.001, init=str(source), augment=True),
                                train_set=sets[0], val_set=sets[1], log=lambda _: None)
    start, optimizer_entries, lr = seen[0]
    for key, value in model.state_dict().items():
        assert torch.equal(start[key], value), key
    assert optimizer_entries == 0 and lr == pytest.approx(0.001)
    assert any(not torch.equal(tuned.state_dict()[k], v) for k, v in start.items())
    assert tuned_record["init"]["checkpoint"] == str(source)
    assert tuned_record["init"]["epoch"] == record["epoch"] == 2
    assert tuned_record["init"]["train"]["augment"] is False
    assert [h["epoch"] for h in tuned_record["history"]] == [1]
    assert load_checkpoint(out)["record"]["init"] == tuned_record["init"]
    # a resumed fine-tuning run still names the weights it started from
    _, resumed = train(config(out, epochs=2, lr=0.001, resume=True, augment=True),
                       train_set=sets[0], val_set=sets[1], log=lambda _: None)
    assert resumed["init"] == tuned_record["init"] and resumed["epoch"] == 2


def test_init_errors(run, sets, tmp_path: Path) -> None:
    source = run[2]
    with pytest.raises(UserError, match="use one of them"):
        train(config(tmp_path / "a.pt", init=str(source), resume=True), train_set=sets[0])
    with pytest.raises(UserError, match="another network"):
        train(config(tmp_path / "b.pt", init=str(source), kind="euler", val_size=0),
              train_set=sets[0], val_set=None)
    with pytest.raises(UserError, match="checkpoint not found"):
        train(config(tmp_path / "c.pt", init=str(tmp_path / "none.pt"), val_size=0),
              train_set=sets[0], val_set=None)
    assert not any((tmp_path / name).exists() for name in ("a.pt", "b.pt", "c.pt"))


# ------------------------------------------------------------------ NaN guard


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_divergence_keeps_last_good_checkpoint(sets, tmp_path: Path, monkeypatch, bad: str) -> None:
    out = tmp_path / "model.pt"
    steps_per_epoch = 200 // 32
    real_make_loss, real_save = train_module.make_loss, train_module.save_checkpoint
    calls = {"n": 0}
    saved: list[bytes] = []

    def make_loss_breaking(*args, **kwargs):
        loss = real_make_loss(*args, **kwargs)

        def wrapped(logits, labels):
            calls["n"] += 1
            value = loss(logits, labels)
            return value * float(bad) if calls["n"] == steps_per_epoch + 2 else value
        return wrapped

    def save_and_remember(path, *args, **kwargs):
        result = real_save(path, *args, **kwargs)
        saved.append(Path(path).read_bytes())
        return result

    monkeypatch.setattr(train_module, "make_loss", make_loss_breaking)
    monkeypatch.setattr(train_module, "save_checkpoint", save_and_remember)
    with pytest.raises(TrainingDiverged) as err:
        train(config(out, epochs=3, val_size=0), train_set=sets[0], val_set=None, log=lambda _: None)
    assert isinstance(err.value, UserError)
    message = str(err.value)
    assert bad in message and str(out) in message and "epoch 2, step 2" in message
    assert "last good checkpoint (epoch 1)" in message
    assert len(saved) == 1 and out.read_bytes() == saved[0]
    assert load_checkpoint(out)["record"]["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_divergence_on_first_step_writes_nothing(sets, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(train_module, "make_loss", lambda *a, **k: lambda f, y: f.sum() * float("nan"))
    out = tmp_path / "model.pt"
    with pytest.raises(TrainingDiverged, match="nan.*no checkpoint was written"):
        train(config(out, val_size=0), train_set=sets[0], val_set=None, log=lambda _: None)
    assert not out.exists()


@pytest.mark.parametrize("bad, match", [
    (dict(epochs=0), "--epochs"), (dict(batch_size=0), "--batch-size"), (dict(lr=0.0), "--lr"),
    (dict(lr=float("nan")), "--lr"), (dict(optimizer="lbfgs"), "--optimizer"),
    (dict(schedule="linear"), "--schedule"), (dict(loss="mse"), "--loss"), (dict(limit=0), "--limit"),
    (dict(val_size=-1), "--val-size"), (dict(time_budget=0.0), "--time-budget"),
    (dict(train_eps=-0.1), "ε values"), (dict(preset="huge"), "unknown preset"),
    (dict(device="tpu"), "--device"), (dict(ema=1.0), "--ema"), (dict(ema=-0.5), "--ema"),
])
def test_config_validation(tmp_path: Path, bad: dict, match: str) -> None:
    cfg = config(tmp_path / "unused.pt", **{"val_size": 0, **bad})
    with pytest.raises(UserError, match=match):
        train(cfg, train_set=synthetic_set(10, 0), val_set=None)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ DDP


def test_ddp_two_cpu_processes(tmp_path: Path, sets) -> None:
    write_cifar_folder(tmp_path / "cifar", *sets)
    out = tmp_path / "ddp" / "model.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    # --standalone: the rendezvous binds a free local port itself (no port chosen here to race for)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "robustflow.cli", "train", "--preset", "micro", "--data-root", str(tmp_path / "cifar"),
               "--epochs", "1", "--batch-size", "32", "--val-size", "20", "--device", "cpu",
               "--out", str(out), "--no-progress"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count(f"saved {out}") == 1  # only rank 0 reports and saves
    assert f"saved {out} after epoch 1" in done.stdout
    assert [p.name for p in out.parent.iterdir()] == ["model.pt"]
    model, record = model_from_checkpoint(out)
    assert record["epoch"] == 1 and record["train_images"] == 200
    # each rank took 100 of the 200 images: 3 steps of 32, not the 6 of a single process
    assert load_checkpoint(out)["training"]["step"] == 100 // 32
    assert record["history"][0]["epoch"] == 1
    assert model.lipschitz_bound() <= 1 + 1e-5
    # under a time budget every rank follows rank 0's clock: one schedule, one last step
    # (a rank that stopped alone would leave the other waiting in all-reduce until the timeout)
    budgeted = [*command[:command.index("--epochs")], "--epochs", "400", "--time-budget", "2",
                *command[command.index("--batch-size"):]]
    done = subprocess.run(budgeted, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(stopped: time budget)" in done.stdout
    _, record = model_from_checkpoint(out)
    assert record["stopped"] == "time budget" and record["epoch"] < 400


def test_a_bound_above_one_is_folded_into_the_head(tmp_path: Path, sets, monkeypatch) -> None:
    """A bound above 1 (here from a centering with σ = 0.5, a factor 2) is folded into the head
    at the end of training: the saved model's proven bound is at most 1 (not 1 + rounding), its
    logits the trained ones times the factor (weight and bias scaled), so its predictions
    unchanged."""
    import dataclasses

    import robustflow.networks as networks

    monkeypatch.setitem(networks.PRESETS, "scaled",
                        dataclasses.replace(networks.PRESETS["micro"], std=(0.5, 0.5, 0.5)))
    out = tmp_path / "scaled.pt"
    lines: list[str] = []
    model, record = train(config(out, preset="scaled", epochs=1), train_set=sets[0],
                          log=lines.append)
    assert 0.4 < record["bound_folded_into_head"] < 1.0
    assert 1.0 - 1e-3 < model.lipschitz_bound() <= 1.0
    loaded, _ = model_from_checkpoint(out)
    assert loaded.lipschitz_bound() == pytest.approx(model.lipschitz_bound(), rel=1e-9)
    assert any(line.startswith("proven bound was 1 + ") for line in lines)
    x = sets[1].floats(slice(0, 20))[0]
    factor = record["bound_folded_into_head"]
    with torch.no_grad():  # the head as trained: scale 1, the bias before the fold
        folded = model(x)
        model.head.parametrizations.weight[0].scale.fill_(1.0)
        model.head.bias.div_(factor)
        unfolded = model(x)
    assert torch.equal(folded.argmax(1), unfolded.argmax(1))
    assert torch.allclose(folded, unfolded * factor, atol=1e-6)


def test_resume_continues_the_clock(sets, tmp_path: Path, monkeypatch) -> None:
    """Seconds accumulate across a resume and images per second count this process's images
    over this process's time (a clock that advances 10 s per reading makes both exact)."""
    readings = iter(range(0, 10_000, 10))
    monkeypatch.setattr(train_module.time, "monotonic", lambda: float(next(readings)))
    out = tmp_path / "model.pt"
    train(config(out, epochs=2, val_size=0), train_set=sets[0], val_set=None, log=lambda _: None)
    checkpoint = torch.load(out, weights_only=True)
    checkpoint["record"]["history"].pop()  # as if stopped after the first epoch
    checkpoint["training"]["epoch"] = 1
    checkpoint["training"]["step"] //= 2
    torch.save(checkpoint, out)
    _, record = train(config(out, epochs=2, val_size=0, resume=True), train_set=sets[0],
                      val_set=None, log=lambda _: None)
    first, second = record["history"]
    per_epoch = (len(sets[0]) // 32) * 32
    assert first["seconds"] == 10.0 and second["seconds"] == 20.0
    assert second["images_per_second"] == pytest.approx(per_epoch / 10.0)
