"""A checkpoint edited in any value a bound depends on is refused when it is loaded.

Every buffer and parameter that enters a Lipschitz bound (step-size ranges, step sizes, the
centering, the orthogonal parametrisations) is tampered with in turn; loading must name it in one
line (API: ``UserError``, a ``ValueError``-like error; CLI: exit status 2, no traceback).
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from robustflow.checkpoint import check_model, load_weights, model_from_checkpoint, save_checkpoint
from robustflow.errors import UserError
from robustflow.networks import build_model, preset

pytestmark = pytest.mark.usefixtures("one_thread")


def _saved(tmp_path: Path, kind: str = "lipschitz") -> Path:
    model = build_model(preset("micro", kind=kind))
    path = tmp_path / f"{kind}.pt"
    save_checkpoint(path, model, {"config": model.config.to_dict()})
    return path


def _tampered(path: Path, key: str, value) -> Path:
    payload = torch.load(path, weights_only=True)
    state = payload["state_dict"]
    assert key in state, sorted(state)
    state[key] = torch.as_tensor(value, dtype=state[key].dtype).reshape(state[key].shape) \
        if not callable(value) else value(state[key])
    out = path.with_name(f"tampered-{key.replace('.', '-')}.pt")
    torch.save(payload, out)
    return out


CASES = [
    ("lipschitz", "stage1.0.step_sizes.h_c_range", [0.15, 3.0], "h_c_range = \\[0.15, 3\\]"),
    ("lipschitz", "stage1.0.step_sizes.h_c_range", [0.5, 0.2], "h_c_range"),
    ("lipschitz", "stage2.0.step_sizes.raw_h_c", math.inf, "stage2.0.step_sizes.raw_h_c"),
    ("lipschitz", "centering.std", [0.0, 1.0, 1.0], "centering.std"),
    ("lipschitz", "centering.std", [-1.0, 1.0, 1.0], "centering.std"),
    ("lipschitz", "centering.mean", [math.nan, 0.0, 0.0], "centering.mean"),
    ("lipschitz", "lift.parametrizations.matrix.0.base", lambda t: t * math.nan, "lift.parametrizations"),
    ("lipschitz", "head.parametrizations.weight.original", lambda t: t * math.inf, "head.parametrizations"),
    ("euler", "stage1.0.step_size", -0.5, "stage1.0.step_size = -0.5"),
]


@pytest.mark.parametrize(("kind", "key", "value", "named"), CASES,
                         ids=[f"{c[1]}={c[2] if not callable(c[2]) else 'nan/inf'}" for c in CASES])
def test_a_tampered_value_is_named_when_loading(tmp_path: Path, kind: str, key: str, value,
                                                named: str) -> None:
    good = _saved(tmp_path, kind)
    model_from_checkpoint(good)  # the untouched file loads
    bad = _tampered(good, key, value)
    with pytest.raises(UserError, match=named) as err:
        model_from_checkpoint(bad)
    assert "\n" not in str(err.value)


def test_the_cli_refuses_a_tampered_checkpoint_in_one_line(tmp_path: Path) -> None:
    bad = _tampered(_saved(tmp_path), "stage1.0.step_sizes.h_c_range", [0.15, 3.0])
    done = subprocess.run([sys.executable, "-m", "robustflow.cli", "certify", "--checkpoint",
                           str(bad), "--limit", "8", "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "stage1.0.step_sizes.h_c_range" in done.stderr


def test_check_model_accepts_a_trained_model_and_old_files_load() -> None:
    model = build_model(preset("micro"))
    check_model(model)
    state = model.state_dict()
    # files written before the steps of a pair lost their unused step_size buffer
    state["stage1.0.expansive.step_size"] = torch.tensor(0.1)
    state["stage1.0.contractive.step_size"] = torch.tensor(0.5)
    again = build_model(preset("micro"))
    load_weights(again, state)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    state["stage1.0.surprise"] = torch.tensor(1.0)  # anything else is still an error
    with pytest.raises(RuntimeError, match="surprise"):
        load_weights(build_model(preset("micro")), state)


def test_files_from_before_the_head_scale_load_with_scale_one() -> None:
    model = build_model(preset("micro"))
    state = model.state_dict()
    del state["head.parametrizations.weight.0.scale"]
    again = build_model(preset("micro"))
    load_weights(again, state)
    assert float(again.head.parametrizations.weight[0].scale) == 1.0
