"""Checkpoints: written atomically, loaded with ``torch.load(weights_only=True)``.

A checkpoint is a dict of tensors and JSON-serialisable values::

    {"format": "robustflow-checkpoint", "version": 1,
     "record": {...},            # config, classes, normalisation, eps, epoch, metrics, versions
     "state_dict": {...},        # model weights (parametrisation originals included)
     "training": {...} | None}   # optimiser state, step counter, RNG state (for --resume)

Everything a certificate depends on (step sizes, centering, weights) is in ``state_dict``;
the bound is recomputed from it on load, never trusted from the file.
"""

from __future__ import annotations

import json
import os
import platform
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustflow.errors import UserError
from robustflow.layers import Centering
from robustflow.networks import ImageClassifier, NetworkConfig
from robustflow.steps import (
    ContractiveStep,
    EulerStep,
    ExpansiveStep,
    FixedStepSizes,
    LearnedStepSizes,
)

FORMAT = "robustflow-checkpoint"
VERSION = 1


def library_versions() -> dict[str, str]:
    """Versions of the libraries a checkpoint was made with."""
    import geotorch
    import torchvision

    from robustflow import __version__

    return {"robustflow": __version__, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "geotorch": getattr(geotorch, "__version__", "?"),
            "python": platform.python_version()}


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename.

    A crash or kill at any moment leaves either the old file or the new one, never a
    partial file under ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_checkpoint(path: str | os.PathLike, model: nn.Module, record: dict[str, Any],
                    training: dict[str, Any] | None = None) -> Path:
    """Write ``model``'s weights with ``record`` (must be JSON-serialisable)."""
    try:  # the round trip also turns str subclasses (torch.__version__) into plain str
        record = json.loads(json.dumps(record))
    except (TypeError, ValueError) as err:
        raise ValueError(f"checkpoint record must be JSON-serialisable: {err}") from None
    payload = {"format": FORMAT, "version": VERSION, "record": record,
               "state_dict": model.state_dict(), "training": training}
    return atomic_torch_save(payload, path)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint safely; a :class:`UserError` if it is missing, corrupt or foreign."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():  # damaged files warn "Detected pickle protocol N" first
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # damaged bytes fail anywhere in the unpickler (IndexError, KeyError, ...)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path} is not a readable checkpoint (corrupt, truncated or unsafe): "
                        f"{first[:200]}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path} is not a robustflow model checkpoint")
    if payload.get("version") != VERSION:
        raise UserError(f"{path} has checkpoint version {payload.get('version')}, "
                        f"this robustflow reads version {VERSION}")
    return payload


def load_weights(model: nn.Module, state_dict: dict[str, Any]) -> None:
    """Load ``state_dict`` into ``model`` strictly, then :func:`check_model`.

    Checkpoints written before the steps of a pair lost their unused ``step_size`` buffer
    still carry it; those keys are dropped (the pair's own step sizes are what it uses). Those
    written before the head had a scale get scale 1, which is what they computed.
    """
    expected = model.state_dict()
    state = {k: v for k, v in state_dict.items()
             if k in expected or not _OBSOLETE.search(k)}
    for key in expected:  # files written before the head had a scale: scale 1
        if key.endswith(".parametrizations.weight.0.scale") and key not in state:
            state[key] = torch.ones_like(expected[key])
    model.load_state_dict(state)
    check_model(model)


_OBSOLETE = re.compile(r"\.(expansive|contractive)\.step_size$")


def check_model(model: nn.Module) -> None:
    """``ValueError`` naming the parameter or buffer, unless every value a bound depends on is
    one the bound holds for: all finite, step sizes ≥ 0, scales > 0, step-size ranges and fixed
    step sizes inside their pair rule."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{name} holds non-finite values")
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        step_size = getattr(module, "step_size", None)
        if isinstance(module, (EulerStep, ExpansiveStep, ContractiveStep)) and \
                isinstance(step_size, torch.Tensor) and float(step_size) < 0:
            raise ValueError(f"{prefix}step_size = {float(step_size):g} must be ≥ 0")
        if isinstance(module, Centering) and not bool((module.std > 0).all()):
            raise ValueError(f"{prefix}std = {module.std.flatten().tolist()} must be > 0")
        if isinstance(module, (LearnedStepSizes, FixedStepSizes)):
            try:
                module.check()
            except ValueError as err:
                raise ValueError(f"{prefix}{err}") from None


def model_from_checkpoint(path: str | os.PathLike,
                          map_location: str | torch.device = "cpu") -> tuple[ImageClassifier, dict]:
    """Rebuild the model a checkpoint describes, in eval mode, with its record; every value a
    bound depends on is checked (:func:`check_model`)."""
    payload = load_checkpoint(path, map_location)
    record = payload["record"]
    try:
        config = NetworkConfig.from_dict(record["config"])
        model = ImageClassifier(config)
        load_weights(model, payload["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0]
        raise UserError(f"{path} does not describe a model this robustflow can use: "
                        f"{first[:300]}") from None
    return model.to(map_location).eval(), record
