"""The bundled models and sample: loadable offline, provably 1-Lipschitz, certificates hold."""

from __future__ import annotations

import pytest
import torch

from attacks import PGD
from certify import Certifier
from robustflow.export import export_plain
from robustflow.pretrained import load_model, load_test_sample, model_path


def test_bundled_files_load_and_describe_themselves() -> None:
    images, labels = load_test_sample()
    assert images.shape == (1000, 3, 32, 32) and images.dtype == torch.float32
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    assert labels.bincount().tolist() == [100] * 10
    lipschitz, baseline = load_model("lipschitz"), load_model("baseline")
    assert lipschitz.config.kind == "lipschitz" and baseline.config.kind == "euler"
    assert lipschitz.lipschitz_bound() <= 1 + 1e-5
    total = sum(model_path(n).stat().st_size for n in ("lipschitz", "baseline"))
    assert total < 10e6


def _certified_points_resist(count: int, steps: int, restarts: int) -> int:
    """Attack every certified point of the first ``count`` images at 0.99× its radius."""
    model = load_model("lipschitz")
    images, labels = load_test_sample()
    x, y = images[:count], labels[:count]
    cert = Certifier(model, (3, 32, 32))(x, y)
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
