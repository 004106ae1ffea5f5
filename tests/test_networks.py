"""Whole networks: 1-Lipschitz by construction, export, config round trip."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.nn.utils import parametrize

from robustflow.data import ImageSet
from robustflow.evaluation import certify_dataset
from robustflow.export import export_plain
from robustflow.networks import (
    EulerMLP,
    ImageClassifier,
    LipschitzMLP,
    MassPreservingNet,
    NetworkConfig,
    VolumePreservingNet,
    build_model,
    preset,
)
from robustflow.train import TrainConfig
from tests.conftest import jacobian_norm, push_output_norm

TWO_CHANNEL = dict(in_channels=2, mean=(0.5, 0.5))


def _max_jacobian_norm(model: torch.nn.Module, shape: tuple[int, ...], points: int = 4) -> float:
    return max(jacobian_norm(model, torch.rand(*shape, dtype=torch.float64)) for _ in range(points))


@pytest.mark.parametrize(
    "overrides",
    [{}, dict(kind="euler"), dict(stem="unshuffle", channels=(8, 8), pair_rule="exact"),
     dict(orthogonal_map="cayley"), dict(expansive_kernel_size=1),
     # the default preset's steps: h_C up to 1.9 under the exact rule
     dict(orthogonal_map="cayley", expansive_kernel_size=1, pair_rule="exact", h_c_range=(0.15, 1.9)),
     dict(kind="euler", stem="unshuffle", channels=(8, 8)),
     # one count per stage; the first stage has no pair, only its down-sampling
     dict(steps_per_stage=(0, 2), pair_rule="exact", h_c_range=(0.15, 1.9)),
     dict(kind="euler", steps_per_stage=(2, 0))],
)
def test_small_image_model_bound_holds_before_and_after_training(overrides: dict) -> None:
    model = build_model(preset("tiny", **TWO_CHANNEL, **overrides)).double()
    shape = model.input_shape
    assert shape == (2, 8, 8)
    for _ in range(2):
        bound = model.lipschitz_bound()
        assert _max_jacobian_norm(model, shape) <= bound * (1 + 1e-5)
        if overrides.get("kind") != "euler":
            assert bound <= 1 + 1e-4
        push_output_norm(model, shape)


@pytest.mark.parametrize("name", ["small", TrainConfig().preset])
def test_default_cifar_models_are_one_lipschitz(name: str) -> None:
    model = build_model(preset(name)).double()
    bound = model.lipschitz_bound()
    assert bound <= 1 + 1e-5
    assert _max_jacobian_norm(model, model.input_shape, points=2) <= bound * (1 + 1e-5)


def test_expansive_kernel_size_sets_only_the_expansive_operator() -> None:
    model = build_model(preset("tiny", expansive_kernel_size=1))
    pair = model.stage1[0]
    assert pair.expansive.W.kernel().shape[-2:] == (1, 1)
    assert pair.contractive.A.kernel().shape[-2:] == (3, 3)
    assert NetworkConfig.from_dict(model.config.to_dict()) == model.config


def test_steps_per_stage_may_name_each_stage() -> None:
    cfg = preset("micro", steps_per_stage=[2, 0])  # a list, as JSON gives it
    assert cfg.steps_per_stage == (2, 0) and cfg.stage_steps == (2, 0)
    assert preset("micro").stage_steps == (2, 2)
    model = build_model(cfg)
    assert len(model.stage1) == 1 and len(model.stage2) == 0
    assert NetworkConfig.from_dict(cfg.to_dict()) == cfg
    again = build_model(NetworkConfig.from_dict(cfg.to_dict()))
    again.load_state_dict(model.state_dict())  # the same parameters, stage by stage
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(again(x), model(x))
    # certify bounds the empty stage as the identity, float32 rounding included
    images = ImageSet(torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8), torch.arange(6))
    report = certify_dataset(model.eval(), images, [("0.1", 0.1)], progress=False)
    assert report.lipschitz_bound <= 1 + 1e-5
    with torch.no_grad():
        logits = model(images.images.double().div(255).float()).double()
        weights = model.head.weight.double()
    predicted = logits.argmax(1)
    assert torch.equal(torch.as_tensor(report.predictions), predicted)
    for i, p in enumerate(predicted):  # no radius beyond the exact pairwise one
        others = [j for j in range(10) if j != p]
        exact = min((logits[i, p] - logits[i, j]) / (weights[p] - weights[j]).norm() for j in others)
        assert 0 <= report.radii[i] <= float(exact) / report.lipschitz_bound + 1e-6


def test_paper_preset_has_the_papers_layout() -> None:
    cfg = preset("paper")
    model = build_model(cfg)
    assert cfg.channels == (32, 64, 128) and cfg.steps_per_stage == 8
    assert sum(len(getattr(model, f"stage{i}")) for i in (1, 2, 3)) * 2 == 24
    assert model.head.in_features == 2048
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 1.0e6


def test_mlp_is_one_lipschitz_and_baseline_is_bounded() -> None:
    mlp = LipschitzMLP(5, 3, width=8, pairs=3).double()
    push_output_norm(mlp, (5,))
    from certify import lipschitz_bound

    bound = lipschitz_bound(mlp, (5,))
    assert bound <= 1 + 1e-5
    assert _max_jacobian_norm(mlp, (5,)) <= bound * (1 + 1e-5)
    base = EulerMLP(5, 3, width=8, steps=3).double()
    assert _max_jacobian_norm(base, (5,)) <= lipschitz_bound(base, (5,)) * (1 + 1e-5)


def test_structure_preserving_networks_keep_their_invariants() -> None:
    vp = VolumePreservingNet(8, steps=5).double()
    for p in vp.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(4, 8, dtype=torch.float64)
    assert torch.allclose(vp.inverse(vp(x)), x, atol=1e-5)
    jac = torch.autograd.functional.jacobian(lambda v: vp(v[None])[0], x[0])
    assert abs(abs(float(torch.linalg.det(jac))) - 1) < 1e-5
    mp = MassPreservingNet(5, steps=20).double()
    for p in mp.parameters():
        torch.nn.init.normal_(p, std=0.5)
    y = torch.rand(8, 5, dtype=torch.float64)
    assert float((mp(y).sum(1) - y.sum(1)).abs().max().detach()) < 1e-6
    with pytest.raises(ValueError, match="even integer"):
        VolumePreservingNet(7)


def test_export_gives_plain_modules_same_outputs_same_bound() -> None:
    model = build_model(preset("tiny")).eval()
    push_output_norm(model.double(), model.input_shape, steps=3)
    model = model.float()
    plain = export_plain(model)
    assert not any(parametrize.is_parametrized(m) for m in plain.modules())
    assert not any("geotorch" in type(m).__module__ for m in plain.modules())
    x = torch.rand(16, *model.input_shape)
    with torch.no_grad():
        assert float((plain(x) - model(x)).abs().max()) <= 1e-5
    assert plain.lipschitz_bound() == pytest.approx(model.lipschitz_bound(), rel=1e-6)
    # the exported model trains no further constraint: its step sizes are frozen buffers
    assert all(not p.requires_grad or "step" not in n for n, p in plain.named_parameters())


def test_config_round_trip_and_validation() -> None:
    cfg = preset("small", kind="euler")
    again = NetworkConfig.from_dict(dataclasses.asdict(cfg))
    assert again == cfg
    model = ImageClassifier(again)
    assert model.config.kind == "euler"
    for bad, fragment in [
        (dict(kind="resnet"), "kind must be one of"),
        (dict(steps_per_stage=3), "must be even"),
        (dict(steps_per_stage=(2, 1, 2)), "must be even"),
        (dict(steps_per_stage=(2, 2)), "names 2 stages for 3 widths"),
        (dict(steps_per_stage=(0, 0, 0)), "not all 0"),
        (dict(steps_per_stage=(2, -2, 2)), "counts ≥ 0"),
        (dict(channels=(16, 0)), "positive integer"),
        (dict(image_size=30), "divisible"),
        (dict(channels=(4, 32)), "quadruple"),
        (dict(stem="patchify"), "stem must be one of"),
        (dict(pair_rule="loose"), "pair_rule must be one of"),
        (dict(orthogonal_map="qr"), "orthogonal_map must be one of"),
        (dict(expansive_kernel_size=2), "expansive_kernel_size must be an odd positive integer"),
        (dict(stem="unshuffle", channels=(8, 8, 8, 8, 8)), "and so does the unshuffle stem"),
    ]:
        with pytest.raises(ValueError, match=fragment):
            preset("small", **bad)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")
    with pytest.raises(ValueError, match="unknown network config keys"):
        NetworkConfig.from_dict({"depth": 3})


def test_wrong_image_shape_is_reported_clearly() -> None:
    model = build_model(preset("tiny"))
    with pytest.raises(ValueError, match=r"expects input of shape"):
        model(torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match=r"Centering expects images \(batch, 3, H, W\)"):
        model(torch.rand(2, 8, 8))
