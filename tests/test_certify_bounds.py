"""The composed Lipschitz bound is an upper bound, tight where it claims to be exact."""

from __future__ import annotations

import math

import geotorch
import pytest
import torch
from torch import nn

from certify.bounds import NotCertifiable, lipschitz_bound, split_head

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (2, 6, 6)



def jacobian_norms(model: nn.Module, xs: torch.Tensor) -> torch.Tensor:
    """Spectral norms of the Jacobians of ``model`` at each sample of the batch ``xs``."""
    jac = torch.func.vmap(torch.func.jacrev(lambda v: model(v.unsqueeze(0)).reshape(-1)))(xs)
    return torch.linalg.matrix_norm(jac.reshape(len(xs), jac.shape[1], -1).detach(), 2)


def jacobian_norm(model: nn.Module, x: torch.Tensor) -> float:
    """Spectral norm of the Jacobian of ``model`` at one sample ``x``."""
    return float(jacobian_norms(model, x.unsqueeze(0))[0])


RANDOM_MODELS = {
    "circular-zero-stride2": lambda: nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, padding_mode="circular"), nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.LeakyReLU(0.3),
        nn.Flatten(), nn.Linear(36, 5)),
    "valid-maxpool": lambda: nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16, 3)),
    "grouped-dilated-avgpool": lambda: nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=2, dilation=2, groups=2, padding_mode="circular"),
        nn.LeakyReLU(-1.5), nn.AvgPool2d(2), nn.Conv2d(6, 4, 1), nn.Flatten(),
        nn.Linear(36, 4)),
    "overlapping-maxpool-nested": lambda: nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(),
        nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), nn.Sigmoid()),
        nn.Flatten(), nn.Linear(108, 2)),
    "strided-kernel-mlp": lambda: nn.Sequential(
        nn.Conv2d(2, 4, 2, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(36, 6), nn.ReLU(),
        nn.Linear(6, 3)),
    "pixel-unshuffle-same": lambda: nn.Sequential(
        nn.PixelUnshuffle(2), nn.Conv2d(8, 4, 3, padding="same"), nn.ReLU(),
        nn.Flatten(), nn.Linear(36, 3)),
}


@pytest.mark.parametrize("name", sorted(RANDOM_MODELS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bound_dominates_jacobian_norm(name: str, seed: int) -> None:
    torch.manual_seed(seed)
    model = RANDOM_MODELS[name]().double()
    bound = lipschitz_bound(model, SHAPE)
    scales = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64).repeat_interleave(10)
    xs = scales.view(-1, 1, 1, 1) * torch.randn(len(scales), *SHAPE, dtype=torch.float64)
    norms = jacobian_norms(model, xs)
    assert norms.min() > 0 and norms.max() <= bound


@pytest.mark.parametrize("layer", [
    nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"),
    nn.Conv2d(2, 4, 5, padding=2, padding_mode="circular"),
    nn.Conv2d(2, 4, 3, padding=2, dilation=2, groups=2, padding_mode="circular"),
    nn.Linear(72, 7),
    geotorch.orthogonal(nn.Linear(72, 72), "weight"),
], ids=["circular3", "circular5", "circular-grouped-dilated", "linear", "orthogonal"])
def test_single_linear_layer_is_tight(layer: nn.Module) -> None:
    model = nn.Sequential(nn.Flatten(), layer) if isinstance(layer, nn.Linear) else layer
    model = model.double()
    bound = lipschitz_bound(model, SHAPE)
    assert bound == pytest.approx(jacobian_norm(model, torch.zeros(SHAPE, dtype=torch.float64)),
                                  rel=1e-5)


def test_orthogonal_linear_is_one() -> None:
    layer = geotorch.orthogonal(nn.Linear(16, 16), "weight")
    assert 1.0 <= lipschitz_bound(layer, (16,)) <= 1.0 + 1e-5


@pytest.mark.parametrize(("pool", "spike", "expected"), [
    (nn.MaxPool2d(3, stride=1), (3, 3), 3.0),  # (3, 3) is in all 9 windows
    (nn.MaxPool2d(3, stride=2), (2, 2), 2.0),  # 2 is in the windows starting at 0 and 2
    (nn.MaxPool2d(2, stride=2, dilation=2), (2, 2), 2.0),  # taps {0, 2}: windows 0 and 1
    (nn.MaxPool2d(2, stride=2, dilation=3), (2, 2), 1.0),  # taps {0, 3}: one parity each
    (nn.MaxPool2d(2), (1, 1), 1.0),
])
def test_maxpool_bound_is_attained_at_a_spike(pool: nn.Module, spike: tuple[int, int],
                                              expected: float) -> None:
    x = torch.zeros(1, 7, 7, dtype=torch.float64)
    x[0, spike[0], spike[1]] = 1.0
    bound = lipschitz_bound(pool, (1, 7, 7))
    assert bound == pytest.approx(expected, rel=1e-5)
    assert jacobian_norm(pool, x) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(("pool", "expected"), [
    (nn.AvgPool2d(3), 1 / 3),  # disjoint windows: 1/k, attained
    (nn.AvgPool2d(3, stride=1), 1.0),
    (nn.AvgPool2d(3, stride=2, padding=1), 2 / 3),
])
def test_avgpool_bound(pool: nn.Module, expected: float) -> None:
    bound = lipschitz_bound(pool, (1, 9, 9))
    assert bound == pytest.approx(expected, rel=1e-5) and bound >= expected
    norm = jacobian_norm(pool, torch.rand(1, 9, 9, dtype=torch.float64))
    assert norm <= bound
    assert pool.stride != pool.kernel_size or norm == pytest.approx(expected)


@pytest.mark.parametrize(("kernel", "padding", "stride", "n"), [
    (3, 1, 1, 6), (3, 1, 2, 6), (5, 2, 1, 4), (3, 0, 1, 5), (4, 3, 3, 5)])
def test_zero_padded_conv_is_bounded_by_padded_circular(kernel: int, padding: int,
                                                        stride: int, n: int) -> None:
    for seed in range(3):
        torch.manual_seed(seed)
        conv = nn.Conv2d(2, 3, kernel, padding=padding, stride=stride).double()
        bound = lipschitz_bound(conv, (2, n, n))
        assert jacobian_norm(conv, torch.zeros(2, n, n, dtype=torch.float64)) <= bound


@pytest.mark.parametrize("padding", [1, "same"])
def test_zero_padded_laplacian_on_one_pixel(padding: int | str) -> None:
    """Its taps sum to 0, so a circular convolution on the unpadded 1x1 grid would give 0;
    on the padded 3x3 grid every non-zero frequency gives 8 + 1 = 9."""
    conv = nn.Conv2d(1, 1, 3, padding=padding, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[-1.0, -1.0, -1.0], [-1.0, 8.0, -1.0], [-1.0, -1.0, -1.0]]))
    assert jacobian_norm(conv.double(), torch.zeros(1, 1, 1, dtype=torch.float64)) == 8.0
    assert lipschitz_bound(conv, (1, 1, 1)) == pytest.approx(9.0, rel=1e-5)


def test_hand_computed_three_layer_bound() -> None:
    first, last = nn.Linear(4, 4), nn.Linear(4, 2)
    with torch.no_grad():
        first.weight.copy_(torch.diag(torch.tensor([3.0, -2.0, 1.0, 0.5])))
        last.weight.copy_(torch.tensor([[0.0, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, -0.25]]))
    model = nn.Sequential(first, nn.LeakyReLU(negative_slope=2.0), last)
    bound = lipschitz_bound(model, (4,))
    assert 3.0 <= bound == pytest.approx(3.0 * 2.0 * 0.5, rel=1e-5)


class Doubler(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.inner(x)


class ScaledLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 10 * super().forward(x)


@pytest.mark.parametrize(("model", "shape", "path", "type_name"), [
    (nn.Sequential(nn.Linear(4, 4), nn.ReLU(), Doubler()), (4,), "model.2", "Doubler"),
    (nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU(), Doubler())), (4,),
     "model.1.1", "Doubler"),
    (Residual(), (4,), "model", "Residual"),
    (nn.Sequential(nn.Identity(), ScaledLinear(4, 4)), (4,), "model.1", "ScaledLinear"),
    (nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2)).train(), SHAPE,
     "model.1", "BatchNorm2d"),
    (nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).train(), (4,), "model.1", "Dropout"),
    (nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")), SHAPE,
     "model.0", "Conv2d"),
    (nn.Sequential(nn.AvgPool2d(2, ceil_mode=True)), (1, 5, 5), "model.0", "AvgPool2d"),
], ids=["custom", "nested", "container", "overridden-forward", "batchnorm-train",
        "dropout-train", "reflect-padding", "avgpool-ceil"])
def test_unboundable_module_is_named(model: nn.Module, shape: tuple[int, ...], path: str,
                                     type_name: str) -> None:
    with pytest.raises(NotCertifiable, match=rf"^{path} \({type_name}\)"):
        lipschitz_bound(model, shape)


def test_eval_batchnorm_and_dropout_are_bounded() -> None:
    norm = nn.BatchNorm2d(2)
    with torch.no_grad():
        norm.running_var.copy_(torch.tensor([0.04, 2.0]))
        norm.running_mean.copy_(torch.tensor([0.3, -1.0]))
        norm.weight.copy_(torch.tensor([0.5, -3.0]))
    model = nn.Sequential(nn.Dropout(0.5), norm).double().eval()
    bound = lipschitz_bound(model, SHAPE)
    assert bound == pytest.approx(jacobian_norm(model, torch.rand(SHAPE, dtype=torch.float64)),
                                  rel=1e-5)
    assert bound == pytest.approx(0.5 / math.sqrt(0.04 + norm.eps), rel=1e-5)


class SelfReporting(nn.Module):
    """Says it is 0.5-Lipschitz; it computes 0.25 · Doubler(x), which is."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = Doubler()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.25 * self.inner(x)

    def lipschitz_bound(self) -> float:
        return 0.5


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations made in a test are undone after it."""
    from certify import bounds

    monkeypatch.setattr(bounds, "_REGISTRY", dict(bounds._REGISTRY))


def test_a_module_is_bounded_only_by_a_registered_rule(registry) -> None:
    from certify import register, register_component

    linear = nn.Linear(4, 4)
    with torch.no_grad():
        linear.weight.copy_(4 * torch.eye(4))
    with pytest.raises(NotCertifiable, match=r"^model.1 \(SelfReporting\): is not a type"):
        lipschitz_bound(nn.Sequential(linear, SelfReporting()), (4,))
    register(SelfReporting, lambda module, io: 0.5, name="test: 0.25 · 2")
    with pytest.raises(NotCertifiable, match=r"^model.1.inner \(Doubler\)"):
        lipschitz_bound(nn.Sequential(linear, SelfReporting()), (4,))  # its parts must be known
    register_component(Doubler)
    assert lipschitz_bound(nn.Sequential(linear, SelfReporting()), (4,)) == pytest.approx(2.0, rel=1e-5)
    with pytest.raises(NotCertifiable, match=r"^model \(Doubler\): is only known as a part"):
        lipschitz_bound(Doubler(), (4,))


def test_modes_are_restored() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).train()
    model[1].eval()
    lipschitz_bound(model, (4,))
    assert [m.training for m in model.modules()] == [True, True, False, True]


def test_split_head() -> None:
    head = geotorch.orthogonal(nn.Linear(8, 8), "weight")
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), head)
    body, found = split_head(model)
    assert found is head and len(body) == 2
    x = torch.randn(5, 4)
    assert torch.allclose(found(body(x)), model(x))
    assert split_head(nn.Sequential(nn.Linear(4, 4), nn.ReLU())) is None
    assert split_head(nn.Sequential(nn.Linear(4, 4), ScaledLinear(4, 2))) is None
    assert split_head(nn.Linear(4, 2)) is None
