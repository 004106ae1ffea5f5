"""The bundled models and test sample: the embedded default everything runs on offline.

``assets/`` holds ``lipschitz.pt`` (the default 1-Lipschitz model, preset ``wide``),
``baseline.pt`` (an unconstrained Euler-ResNet, preset ``wide``) and ``cifar10_sample.npz``
(1,000 CIFAR-10 test images, 100 per class, uint8). Loading needs no network; ``README.md``
records how each was made and what it measures.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from robustflow.checkpoint import atomic_torch_save, load_checkpoint, model_from_checkpoint
from robustflow.data import CLASSES, ImageSet
from robustflow.errors import UserError
from robustflow.layers import fold_bound_excess

ASSETS = Path(__file__).resolve().parent / "assets"
MODELS = {"lipschitz": "lipschitz.pt", "baseline": "baseline.pt"}
SAMPLE = "cifar10_sample.npz"


def model_path(name: str) -> Path:
    """Path of a bundled model (``"lipschitz"`` or ``"baseline"``)."""
    if name not in MODELS:
        raise UserError(f"unknown bundled model {name!r}; choose one of {sorted(MODELS)}")
    path = ASSETS / MODELS[name]
    if not path.is_file():
        raise UserError(f"the bundled model {path.name} is missing from {ASSETS}; reinstall robustflow")
    return path


def load_model(name_or_path: str | os.PathLike = "lipschitz",
               device: str | torch.device = "cpu") -> nn.Module:
    """A bundled model by name, or any robustflow checkpoint by path, in eval mode."""
    key = str(name_or_path)
    path = model_path(key) if key in MODELS else Path(key)
    model, _ = model_from_checkpoint(path, device)
    return model


def load_test_sample(path: str | os.PathLike | None = None) -> tuple[Tensor, Tensor]:
    """The bundled test sample: images float32 (N, 3, 32, 32) in [0, 1] and int64 labels."""
    sample = load_sample_set(path)
    return sample.floats()


def load_sample_set(path: str | os.PathLike | None = None) -> ImageSet:
    """The bundled sample (or a file written by :func:`write_sample`) as an ImageSet."""
    path = Path(path) if path is not None else ASSETS / SAMPLE
    if not path.is_file():
        raise UserError(f"test sample not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            images, labels = data["images"], data["labels"]
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{path} is not a robustflow test sample ({err})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != 3 or len(labels) != len(images):
        raise UserError(f"{path} must hold uint8 images (N, 3, H, W) and N labels")
    return ImageSet(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)), CLASSES)


def balanced_indices(labels: Tensor, per_class: int) -> Tensor:
    """The first ``per_class`` indices of every class, in data order."""
    picks = [torch.nonzero(labels == c).flatten()[:per_class] for c in range(int(labels.max()) + 1)]
    return torch.sort(torch.cat(picks)).values


def write_sample(test_set: ImageSet, path: str | os.PathLike, per_class: int = 100,
                 plane_cat: int | None = None) -> Path:
    """Save the first ``per_class`` test images of each class as a compressed array, with
    their test-set indices. ``plane_cat`` (a test-set index) joins the sample in place of the
    last pick of its class, and the file records its position as the default image of the
    plane-versus-cat figure (:func:`sample_plane_cat`)."""
    index = balanced_indices(test_set.labels, per_class)
    extra = {}
    if plane_cat is not None:
        if not 0 <= plane_cat < len(test_set):
            raise UserError(f"plane_cat {plane_cat} is not an index of the {len(test_set)} test images")
        if plane_cat not in index:
            same = (test_set.labels[index] == test_set.labels[plane_cat]).nonzero().squeeze(1)
            index[same[-1]] = plane_cat
            index = torch.sort(index).values
        extra["plane_cat"] = np.int64(int((index == plane_cat).nonzero()[0]))
    path = Path(path)
    np.savez_compressed(path, images=test_set.images[index].numpy(),
                        labels=test_set.labels[index].numpy().astype(np.int64),
                        test_index=index.numpy(), **extra)
    return path


def sample_plane_cat(path: str | os.PathLike | None = None) -> int | None:
    """Position in the sample of its plane-versus-cat image, if the file names one."""
    path = Path(path) if path is not None else ASSETS / SAMPLE
    with np.load(path, allow_pickle=False) as data:
        if "plane_cat" not in data.files:
            return None
        position = int(data["plane_cat"])
        if not 0 <= position < len(data["labels"]):
            raise UserError(f"{path} names image {position} for the plane-versus-cat figure but "
                            f"holds {len(data['labels'])} images; rewrite it with write_sample")
        return position


def package_model(checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    """A training checkpoint as a bundled model: its weights and record (recipe, history,
    versions), without the optimiser and RNG state that only ``--resume`` needs; written
    atomically. The model is rebuilt and checked first, so a damaged file is never bundled. A
    1-Lipschitz model whose proven bound exceeds 1 (float32 rounding of its orthogonal weights)
    has the excess folded into its head (:func:`~robustflow.layers.fold_bound_excess`), recorded
    in ``bound_folded_into_head``, so every bundled 1-Lipschitz model is proven ≤ 1."""
    model, record = model_from_checkpoint(checkpoint)  # refuses non-finite values, bad step sizes, …
    payload = load_checkpoint(checkpoint)
    payload["training"] = None
    if model.config.kind == "lipschitz":
        size = model.config.image_size
        factor = fold_bound_excess(model, (model.config.in_channels, size, size))
        if factor < 1.0:
            payload["state_dict"] = model.state_dict()
            payload["record"]["bound_folded_into_head"] = factor * record.get("bound_folded_into_head", 1.0)
    return atomic_torch_save(payload, out)
