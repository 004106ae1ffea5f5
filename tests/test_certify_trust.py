"""What certify trusts: the arithmetic, the modules and the inputs it is given.

A certificate must not depend on the caller's precision settings, on hooks or overridden
internals, or on the shape of the inputs; and rounding must never make it more generous than
the same decision computed in float64.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from certify import Certifier, NotCertifiable, freeze, lipschitz_bound, register
from certify.bounds import conv_abs_norm
from certify.rounding import exact_arithmetic, precision_state, unit_roundoff
from robustflow.networks import build_model, preset

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations made in a test are undone after it."""
    from certify import bounds

    monkeypatch.setattr(bounds, "_REGISTRY", dict(bounds._REGISTRY))


def _model(seed: int = 0, name: str = "tiny") -> nn.Module:
    torch.manual_seed(seed)
    model = build_model(preset(name)).eval()
    with torch.no_grad():  # spread the logits so that radii cover a range
        model.head.parametrizations.weight.original.mul_(8.0)
        for pair in (m for m in model.modules() if hasattr(m, "contractive")):
            pair.contractive.bias.normal_(0, 0.3)
            pair.expansive.bias.normal_(0, 0.3)
    return model


def _images(n: int, size: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------- 1. arithmetic


def _tf32(t: torch.Tensor) -> torch.Tensor:
    """Round float32 values to TF32's 10-bit mantissa (round to nearest)."""
    bits = t.contiguous().view(torch.int32)
    rounded = (bits + 0x1000) & ~0x1FFF
    return rounded.view(torch.float32)


class EmulatedCudnnConv(nn.Module):
    """A 1×1 channel mix that, like cuDNN on a recent GPU, rounds its inputs and weights to TF32
    whenever the TF32 switch of cuDNN convolutions is on."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if torch.backends.cudnn.conv.fp32_precision == "tf32" and x.dtype == torch.float32:
            x, w = _tf32(x), _tf32(w)
        return F.conv2d(x, w[:, :, None, None])


def _register_emulated() -> None:
    def bound(module: EmulatedCudnnConv, io) -> float:
        return float(torch.linalg.matrix_norm(module.weight.detach().double(), 2)) * (1 + 1e-6)

    def rounding(module: EmulatedCudnnConv, io, x):
        size = max(math.prod(s[1:]) for s in io[1])
        kernel = module.weight.detach()[:, :, None, None]
        return x.linear(bound(module, io), conv_abs_norm(kernel), kernel.shape[1], size)

    register(EmulatedCudnnConv, bound, rounding=rounding, name="test: emulated cuDNN 1×1")


def _emulated_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(EmulatedCudnnConv(torch.randn(48, 3)), nn.ReLU(), nn.Flatten(),
                          nn.Linear(48 * 16, 10))
    with torch.no_grad():
        model[3].weight.mul_(4.0)
    return model.eval()


@pytest.fixture
def tf32_on():
    """The caller's settings of a GPU user: TF32 in cuDNN convolutions and CUDA matmuls."""
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    saved = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision, matmul.fp32_precision = "tf32", "tf32"
    yield
    conv.fp32_precision, matmul.fp32_precision = saved


def test_emulated_tf32_forward_never_certifies_more_than_float64(registry, tf32_on) -> None:
    _register_emulated()
    model = _emulated_model()
    x, y = _images(200, 4), torch.arange(200) % 10
    with torch.no_grad():
        y = model(x).argmax(dim=1)  # all correct: every point is a candidate
        tf32_logits, exact = model(x).double(), copy.deepcopy(model).double()(x.double())
    assert (tf32_logits - exact).abs().max() > 1e-4  # the caller's arithmetic is coarse
    certifier = Certifier(model, (3, 4, 4))
    reference = Certifier(copy.deepcopy(model).double(), (3, 4, 4))
    radii = reference(x.double(), y).radius
    epsilons = radii[radii > 0].quantile(torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    ours = certifier(x, y, epsilons.tolist())
    for eps in epsilons.tolist():
        assert torch.equal(ours.correct & (ours.radius > eps), radii > eps)
    assert torch.backends.cudnn.conv.fp32_precision == "tf32"  # the caller's setting is back


def test_precision_switches_are_strict_inside_and_restored_after(registry, tf32_on) -> None:
    seen = []

    class Probe(nn.Identity):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(precision_state())
            return x

    register(Probe, lambda module, io: 1.0, rounding=lambda module, io, x: x, name="test: probe")
    model = nn.Sequential(Probe(), nn.Flatten(), nn.Linear(12, 3)).eval()
    before = precision_state()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        certifier = Certifier(model, (3, 2, 2))
        batch = certifier(torch.rand(5, 3, 2, 2), torch.zeros(5, dtype=torch.long), [0.1])
        assert torch.is_autocast_enabled("cpu")
    assert batch.margin.dtype == torch.float64 and seen
    for state in seen:
        assert all(v == "ieee" for k, v in state.items() if k.endswith("fp32_precision"))
        assert state["autocast_cpu"] is False
        assert state["cudnn.enabled"] is False and state["nnpack.enabled"] is False
    assert precision_state() == before


def test_convolutions_run_as_inner_products_during_certification() -> None:
    """The rounding bound covers inner products, not Winograd or FFT convolutions. With oneDNN
    switched off by the caller, torch computes a batch of 3×3 convolutions on the CPU with
    NNPACK (Winograd/FFT); inside :func:`exact_arithmetic` it falls back to im2col + GEMM."""
    x, w = torch.randn(64, 32, 10, 10), torch.randn(32, 32, 3, 3)

    def backend() -> str:
        return str(torch._C._select_conv_backend(x, w, None, [1, 1], [1, 1], [1, 1], False,
                                                 [0, 0], 1, None))

    with torch.backends.mkldnn.flags(enabled=False):
        outside = backend()
        with exact_arithmetic():
            inside = backend()
        assert backend() == outside  # the caller's setting is back
    if torch._nnpack_available():
        assert "Nnpack" in outside
    assert "Nnpack" not in inside and "Winograd" not in inside and inside.endswith("Slow2d")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tf32_is_off_during_certification_on_cuda(tf32_on) -> None:
    model = _model().cuda()
    x = _images(64).cuda()
    y = model(x).argmax(dim=1)
    with exact_arithmetic():
        inside = (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
    cuda = Certifier(model, (3, 8, 8))(x, y, [0.05]).radius.cpu()
    cpu = Certifier(model.cpu(), (3, 8, 8))(x.cpu(), y.cpu(), [0.05]).radius
    assert inside == ("ieee", "ieee")
    assert torch.backends.cudnn.conv.fp32_precision == "tf32"
    assert torch.equal(cuda > 0.05, cpu > 0.05)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_models_are_refused(dtype: torch.dtype) -> None:
    model = _model().to(dtype)
    with pytest.raises(ValueError, match=f"computes in {dtype}.*float32"):
        Certifier(model, (3, 8, 8))


@pytest.mark.parametrize("name", ["tiny", "micro"])
def test_rounding_bound_covers_the_float32_error(name: str) -> None:
    model = _model(name=name)
    size = 8 if name == "tiny" else 32
    x = _images(32, size)
    certifier = Certifier(model, (3, size, size))
    with torch.inference_mode(), exact_arithmetic():
        logits, slack = certifier._forward(x)
        exact = certifier._model64(x.double())
    error = (logits.double() - exact).norm(dim=1)
    assert (error > 0).any()  # float32 does round
    assert (math.sqrt(2) * error <= slack).all()
    a_priori = certifier._slack(torch.float32, x.double().flatten(1).norm(dim=1))
    assert (slack <= a_priori).all()
    assert certifier.error[torch.float64].slope < 1e-9 * certifier.error[torch.float32].slope + 1e-9
    assert unit_roundoff(torch.float32) == 2.0**-24


def test_decisions_equal_float64_decisions_and_radii_stay_below(monkeypatch) -> None:
    """The float32 pass is pushed by rounding-sized errors towards certifying: the decisions at
    the requested ε still equal the float64 ones (thanks to the re-check), and without the
    re-check a wrong decision appears — so the test can fail."""
    model = _model(seed=3)
    x = _images(400)
    certifier = Certifier(model, (3, 8, 8))
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    reference = Certifier(copy.deepcopy(certifier.model).double(), (3, 8, 8))
    radii = reference(x.double(), y).radius
    epsilons = radii[radii > 0][:25].tolist()  # ε exactly at float64 radii: the hardest cases
    forward = certifier._forward

    def optimistic(inputs: torch.Tensor, dtype: torch.dtype | None = None, contributions=None):
        if dtype == torch.float64:
            return forward(inputs, dtype)
        logits, slack = forward(inputs, dtype, contributions)
        top = logits.argmax(dim=1, keepdim=True)  # = y: every point is classified correctly
        push = torch.full_like(logits, -0.49).scatter(1, top, 0.49)
        return logits + push * (slack / math.sqrt(2)).to(logits.dtype)[:, None] / math.sqrt(
            logits.shape[1]), slack

    monkeypatch.setattr(certifier, "_forward", optimistic)
    batch = certifier(x, y, epsilons)
    assert batch.rechecked.any()
    for eps in epsilons:
        assert torch.equal(batch.correct & (batch.radius > eps), radii > eps)
    assert (batch.radius[~batch.rechecked] <= radii[~batch.rechecked] + 1e-12).all()

    monkeypatch.setattr(certifier, "_forward", lambda inputs, dtype=None, contributions=None: (
        (optimistic(inputs.float())[0].double(), torch.zeros(len(inputs), dtype=torch.float64))
        if dtype == torch.float64 else optimistic(inputs, dtype, contributions)))
    fooled = certifier(x, y, epsilons)
    assert any(((fooled.radius > eps) & ~(radii > eps)).any() for eps in epsilons)


# --------------------------------------------------------------------------- 3. modules


class Times100(nn.Linear):
    def _conv_forward(self, x: torch.Tensor) -> torch.Tensor:  # an "internal" a subclass adds
        return 100 * x


class ScaledConv(nn.Conv2d):
    def _conv_forward(self, x, weight, bias):
        return 100 * super()._conv_forward(x, weight, bias)


def _hooked(kind: str) -> tuple[nn.Module, str]:
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    if kind == "hook":
        model[1].register_forward_hook(lambda module, args, out: 100 * out)
    elif kind == "pre-hook":
        model[1].register_forward_pre_hook(lambda module, args: (100 * args[0],))
    elif kind == "instance-forward":
        layer = model[1]
        model[1].forward = lambda x: 100 * F.linear(x, layer.weight, layer.bias)
    elif kind == "subclass":
        model[1] = Times100(12, 5)
    return model, "model.1"


@pytest.mark.parametrize("kind", ["hook", "pre-hook", "instance-forward", "subclass"])
def test_modified_modules_are_refused_by_name(kind: str) -> None:
    model, path = _hooked(kind)
    with pytest.raises(NotCertifiable, match=rf"^{path} \("):
        lipschitz_bound(model, (3, 2, 2))
    with pytest.raises(NotCertifiable, match=rf"^{path} \("):
        Certifier(model, (3, 2, 2))


def test_overridden_conv_internals_are_refused() -> None:
    model = nn.Sequential(ScaledConv(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(64, 2))
    with pytest.raises(NotCertifiable, match=r"^model.0 \(ScaledConv\): is a subclass of .*Conv2d"):
        lipschitz_bound(model, (3, 4, 4))


def test_hooks_inside_robustflow_layers_and_global_hooks_are_refused() -> None:
    model = _model()
    handle = model.stage1[0].expansive.W.register_forward_hook(lambda m, a, out: 100 * out)
    with pytest.raises(NotCertifiable, match=r"^model.stage1.0.expansive.W \(OrthogonalConv\)"):
        Certifier(model, (3, 8, 8))
    handle.remove()
    Certifier(model, (3, 8, 8))  # without the hook it is certifiable
    handle = nn.modules.module.register_module_forward_hook(lambda m, a, out: out)
    try:
        with pytest.raises(NotCertifiable, match="global forward hook"):
            Certifier(model, (3, 8, 8))
    finally:
        handle.remove()


def test_an_active_torch_function_mode_is_refused() -> None:
    class Doubling(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            return 2 * out if func is F.linear else out

    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    with Doubling(), pytest.raises(NotCertifiable, match="function or dispatch mode"):
        Certifier(model, (3, 2, 2))


def test_report_names_the_rule_of_each_part() -> None:
    certifier = Certifier(_model(), (3, 8, 8))
    rules = {part["path"]: part["rule"] for part in certifier.parts}
    assert rules["model.stage1.0"].startswith("robustflow ExpansiveContractivePair")
    assert rules["model.head"].startswith("nn.Linear") and rules["model.centering"].startswith(
        "robustflow Centering")


def test_the_certifier_uses_a_frozen_copy_with_identical_outputs() -> None:
    model = _model()
    x = _images(16)
    frozen = freeze(model)
    assert not any(hasattr(m, "parametrizations") for m in frozen.modules())
    with torch.no_grad():
        assert torch.equal(frozen(x), model(x))
    certifier = Certifier(model, (3, 8, 8))
    with torch.no_grad():
        model.head.bias.add_(10.0)  # later changes to the model do not reach the certifier
        assert torch.equal(certifier.model(x), frozen(x))


# ---------------------------------------------------------------------------- 4. inputs


def test_the_certifier_checks_shape_and_dtype() -> None:
    certifier = Certifier(_model(), (3, 8, 8))
    y = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"built for inputs of shape \(N, 3, 8, 8\), got \(4, 3, 16, 16\)"):
        certifier(torch.rand(4, 3, 16, 16), y)
    with pytest.raises(ValueError, match="computes in torch.float32, got inputs of torch.float64"):
        certifier(torch.rand(4, 3, 8, 8, dtype=torch.float64), y)
    assert Certifier(_model().double(), (3, 8, 8))(torch.rand(4, 3, 8, 8).double(), y).radius.shape == (4,)


class Amplify(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 100 * x


def test_an_attack_on_certified_points_catches_a_false_registration(registry) -> None:
    """Registering is a statement of trust: vouching for a ×100 layer with the bound 1 makes
    certificates that an attack breaks, and ``attack_certified`` counts them."""
    from robustflow.data import ImageSet
    from robustflow.evaluation import attack_dataset

    register(Amplify, lambda module, io: 1.0, rounding=lambda module, io, x: x,
             name="test: a false bound")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), Amplify(), nn.Linear(48, 3)).eval()
    images = torch.randint(0, 256, (40, 3, 4, 4), dtype=torch.uint8)
    with torch.no_grad():  # labels the model gets right, so that every point can be certified
        labels = model(images.float() / 255).argmax(dim=1)
    data = ImageSet(images, labels)
    epsilons = [("0.1", 0.1)]
    report = attack_dataset(model, data, "pgd-l2", epsilons, steps=10, progress=False,
                            attack_certified=True)
    assert report.certified_attacked["0.1"] == round(40 * report.certified_accuracy["0.1"]) > 0
    assert report.certified_broken["0.1"] > 0
    skipping = attack_dataset(model, data, "pgd-l2", epsilons, steps=10, progress=False)
    assert skipping.certified_broken is None  # without the check the false bound goes unseen
    assert skipping.robust_accuracy["0.1"] > report.robust_accuracy["0.1"]
