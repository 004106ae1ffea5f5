"""The bundled models and sample: loadable offline, provably 1-Lipschitz, certificates hold."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attacks import PGD
from certify import Certifier
from robustflow.errors import UserError
from robustflow.export import export_plain
from robustflow.pretrained import load_model, load_test_sample, model_path


def test_bundled_files_load_and_describe_themselves() -> None:
    images, labels = load_test_sample()
    assert images.shape == (1000, 3, 32, 32) and images.dtype == torch.float32
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    assert labels.bincount().tolist() == [100] * 10
    lipschitz, baseline = load_model("lipschitz"), load_model("baseline")
    assert lipschitz.config.kind == "lipschitz" and baseline.config.kind == "euler"
    assert lipschitz.lipschitz_bound() <= 1.0  # packaging folds any rounding excess into the head
    assets = model_path("lipschitz").parent
    assert sum(f.stat().st_size for f in assets.iterdir() if f.is_file()) < 20e6  # all assets


def _certified_points_resist(count: int, steps: int, restarts: int) -> int:
    """Attack every certified point of the first ``count`` images at 0.99× its radius (the
    float64 certificate: float32's is lowered by a rounding bound of about 2 logits)."""
    model = load_model("lipschitz")
    images, labels = load_test_sample()
    x, y = images[:count], labels[:count]
    cert = Certifier(load_model("lipschitz").double(), (3, 32, 32))(x.double(), y)
    certified = cert.correct & (cert.radius > 0)
    x, y, radius = x[certified], y[certified], cert.radius[certified]
    fast = export_plain(model)
    attack = PGD(norm="l2", steps=steps, restarts=restarts, seed=0)
    broken = 0
    for xi, yi, ri in zip(x, y, radius, strict=True):
        _, _, success = attack(fast, xi[None], yi[None], epsilons=[0.99 * float(ri)])
        broken += int(success.sum())
    assert broken == 0, f"{broken} certified points fell"
    return len(x)


def test_certified_points_of_the_bundled_model_resist_pgd() -> None:
    assert _certified_points_resist(count=40, steps=20, restarts=2) >= 10


@pytest.mark.slow
def test_certified_points_resist_a_long_attack() -> None:
    assert _certified_points_resist(count=200, steps=100, restarts=3) >= 60


def _synthetic_test_set(per_class: int = 6):
    from robustflow.data import ImageSet

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(10).repeat(per_class)[torch.randperm(10 * per_class, generator=g)]
    images = torch.randint(0, 256, (len(labels), 3, 32, 32), dtype=torch.uint8, generator=g)
    return ImageSet(images, labels)


def test_sample_names_its_plane_cat_image(tmp_path) -> None:
    """write_sample puts the chosen test image into the sample in place of its class's last
    pick, keeps the classes balanced and records where it is; sample_plane_cat reads it back."""
    from robustflow.pretrained import load_sample_set, sample_plane_cat, write_sample

    test_set = _synthetic_test_set()
    airplanes = (test_set.labels == 0).nonzero().squeeze(1)
    chosen = int(airplanes[-1])  # not among the first 3 airplanes
    path = write_sample(test_set, tmp_path / "s.npz", per_class=3, plane_cat=chosen)
    sample = load_sample_set(path)
    assert torch.bincount(sample.labels, minlength=10).tolist() == [3] * 10
    position = sample_plane_cat(path)
    assert torch.equal(sample.images[position], test_set.images[chosen])
    with np.load(path) as data:
        assert int(data["test_index"][position]) == chosen
        assert (data["test_index"][sample.labels.numpy() == 0].tolist()
                == airplanes[:2].tolist() + [chosen])
    plain = write_sample(test_set, tmp_path / "p.npz", per_class=3)
    assert sample_plane_cat(plain) is None
    with pytest.raises(UserError, match="not an index"):
        write_sample(test_set, tmp_path / "bad.npz", per_class=3, plane_cat=10_000)


def test_plot_plane_cat_defaults_to_the_samples_image(tmp_path, monkeypatch, capsys) -> None:
    """With no --index, `plot plane-cat` on the bundled sample draws the image it names."""
    import shutil

    from robustflow import pretrained
    from robustflow.cli import main

    assets = tmp_path / "assets"
    assets.mkdir()
    for name in pretrained.MODELS.values():
        shutil.copy(pretrained.ASSETS / name, assets / name)
    test_set = _synthetic_test_set()
    chosen = int((test_set.labels == 0).nonzero()[-1])
    pretrained.write_sample(test_set, assets / pretrained.SAMPLE, per_class=3, plane_cat=chosen)
    monkeypatch.setattr(pretrained, "ASSETS", assets)
    position = pretrained.sample_plane_cat()
    assert main(["plot", "plane-cat", "--steps", "2", "--out", str(tmp_path / "p.png")]) == 0
    assert f"image {position}:" in capsys.readouterr().out


def test_package_model_keeps_weights_and_record_drops_training_state(tmp_path) -> None:
    """The packaged file computes the same logits and keeps the record; the optimiser state
    that only --resume needs is gone, and a damaged checkpoint is refused, not bundled."""
    from robustflow.checkpoint import load_checkpoint
    from robustflow.pretrained import package_model
    from robustflow.train import TrainConfig, train
    from tests.conftest import synthetic_set

    source = tmp_path / "run.pt"
    train(TrainConfig(preset="micro", epochs=1, batch_size=32, val_size=0, device="cpu",
                      progress=False, out=str(source)), train_set=synthetic_set(64, 0),
          val_set=None, log=lambda _: None)
    assert load_checkpoint(source)["training"] is not None
    packaged = package_model(source, tmp_path / "bundled.pt")
    payload = load_checkpoint(packaged)
    assert payload["training"] is None
    assert payload["record"] == load_checkpoint(source)["record"]
    x = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_model(packaged)(x), load_model(source)(x))
    assert packaged.stat().st_size < source.stat().st_size
    damaged = load_checkpoint(source)
    key = next(k for k in damaged["state_dict"] if k.endswith("step_sizes.raw") or "head" in k)
    damaged["state_dict"][key] = damaged["state_dict"][key] * float("nan")
    torch.save(damaged, tmp_path / "damaged.pt")
    with pytest.raises(UserError):
        package_model(tmp_path / "damaged.pt", tmp_path / "never.pt")
    assert not (tmp_path / "never.pt").exists()


def test_the_bundled_plane_cat_image_is_a_proof() -> None:
    """The sample's plane-versus-cat airplane: the bundled 1-Lipschitz model certifies it beyond
    0.3 (decided exactly), and the bundled baseline's targeted PGD of norm 0.3 makes it a cat."""
    from robustflow.pretrained import sample_plane_cat

    position = sample_plane_cat()
    assert position is not None
    images, labels = load_test_sample()
    x, y = images[position:position + 1], labels[position:position + 1]
    assert int(y) == 0  # an airplane
    lipschitz, baseline = load_model("lipschitz"), load_model("baseline")
    certificate = Certifier(lipschitz, (3, 32, 32))(x, y, epsilons=(0.3,))
    assert bool(certificate.correct[0]) and float(certificate.radius[0]) > 0.3
    cat = torch.tensor([3])
    _, (adversarial,), success = PGD(norm="l2", steps=100, seed=0)(export_plain(baseline), x, y,
                                                                    epsilons=[0.3], target=cat)
    assert bool(success[0, 0])
    assert float((adversarial - x).norm()) <= 0.3 + 1e-5
    with torch.no_grad():
        assert int(baseline(adversarial).argmax()) == 3 and int(lipschitz(adversarial).argmax()) == 0


def test_package_model_folds_a_bound_above_one_into_the_head(tmp_path) -> None:
    """A checkpoint whose proven bound exceeds 1 (here its head scale times 4) is bundled with
    the excess folded into its head: the packaged model is proven ≤ 1, its predictions are the
    source's, and the record says by what factor the logits shrank."""
    from certify import lipschitz_bound
    from robustflow.checkpoint import load_checkpoint
    from robustflow.pretrained import package_model
    from robustflow.train import TrainConfig, train
    from tests.conftest import synthetic_set

    source = tmp_path / "run.pt"
    train(TrainConfig(preset="micro", epochs=1, batch_size=32, val_size=0, device="cpu",
                      progress=False, out=str(source)), train_set=synthetic_set(64, 0),
          val_set=None, log=lambda _: None)
    payload = load_checkpoint(source)
    key = next(k for k in payload["state_dict"] if k.endswith("weight.0.scale"))
    payload["state_dict"][key] = payload["state_dict"][key] * 4.0
    torch.save(payload, tmp_path / "scaled.pt")
    scaled = load_model(tmp_path / "scaled.pt")
    assert lipschitz_bound(scaled, (3, 32, 32)) > 1.5
    packaged = package_model(tmp_path / "scaled.pt", tmp_path / "bundled.pt")
    folded = load_model(packaged)
    assert lipschitz_bound(folded, (3, 32, 32)) <= 1.0
    factor = load_checkpoint(packaged)["record"]["bound_folded_into_head"]
    previous = payload["record"].get("bound_folded_into_head", 1.0)
    assert factor / previous == pytest.approx(1 / lipschitz_bound(scaled, (3, 32, 32)), rel=1e-5)
    x = torch.rand(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(folded(x).argmax(1), scaled(x).argmax(1))


def test_attacks_skip_exactly_the_points_certify_certifies() -> None:
    """The skip mask of an attack is certify's decision at each ε, float64 re-check included:
    the bundled model's float32 rounding bound (about 1 logit) would otherwise leave most
    certified points unskipped and under-report certified accuracy."""
    from robustflow.data import ImageSet
    from robustflow.evaluation import attack_dataset, certify_dataset
    from robustflow.pretrained import load_sample_set

    sample = load_sample_set()
    data = ImageSet(sample.images[:100], sample.labels[:100])
    epsilons = [("36/255", 36 / 255), ("0.3", 0.3)]
    model = load_model("lipschitz")
    certified = certify_dataset(model, data, epsilons, progress=False).certified_accuracy
    attacked = attack_dataset(model, data, "pgd-l2", epsilons, steps=1, progress=False)
    assert attacked.certified_accuracy == certified
    assert certified["36/255"] >= 0.3  # the rounding bound matters here: most would be lost
