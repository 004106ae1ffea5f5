"""The screen the probe scripts in this folder share: certified accuracy from the head alone.

Their networks have parts ``certify`` has no rule for (and refuses), so they are scored with the
head's pairwise margins, the body taken as 1-Lipschitz (true by construction, up to float32
rounding): ``min_{j≠y} (f_y − f_j) / ‖w_y − w_j‖``. A screen, compared only with its own control.
"""

from __future__ import annotations

import torch
from torch import nn

from robustflow.data import ImageSet


def head_margin_accuracies(model: nn.Module, test: ImageSet, batch_size: int = 500
                           ) -> dict[str, float]:
    """Clean accuracy and the screen's certified accuracy at 36/255 and 0.3 over ``test``."""
    model.eval()
    rows = model.head.weight.detach()
    counts = {"clean": 0, "c36": 0, "c03": 0}
    with torch.no_grad():
        for i in range(0, len(test), batch_size):
            x, y = test.images[i:i + batch_size].float() / 255, test.labels[i:i + batch_size]
            z = model(x)
            distances = (rows[y][:, None] - rows[None]).norm(dim=2).clamp_min(1e-12)
            gaps = (z.gather(1, y[:, None]) - z) / distances
            gaps[torch.arange(len(y)), y] = float("inf")
            radius, right = gaps.min(1).values, z.argmax(1) == y
            counts["clean"] += int(right.sum())
            counts["c36"] += int((right & (radius > 36 / 255)).sum())
            counts["c03"] += int((right & (radius > 0.3)).sum())
    return {key: value / len(test) for key, value in counts.items()}
