"""Export: a trained model with plain tensors instead of parametrisations."""

from __future__ import annotations

import copy

from torch import nn


def export_plain(model: nn.Module) -> nn.Module:
    """A copy of ``model`` without geotorch/parametrize machinery, with identical outputs.

    Every part that knows how (``part.export()``) is replaced by its plain twin: orthogonal
    convolutions become ordinary circular convolutions with the assembled kernel, learned
    step sizes become fixed buffers (still checked against the pair rule), the normalised
    head a plain ``nn.Linear``. Bounds are computed from weights, so they carry over.
    """
    plain = copy.deepcopy(model).eval()
    return _export(plain)


def _export(module: nn.Module) -> nn.Module:
    export = getattr(module, "export", None)
    if callable(export):
        return export()
    for name, child in list(module.named_children()):
        setattr(module, name, _export(child))
    return module
