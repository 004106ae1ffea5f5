"""CIFAR-10 through torchvision, loaded so that a tampered batch file cannot run code.

The batch files are pickles. :class:`SafeCIFAR10` is torchvision's ``CIFAR10`` with the
loading replaced by :func:`safe_unpickle`, a restricted unpickler that admits only what a
CIFAR batch holds (numpy arrays, dtypes, strings, lists, ints). Checksums are checked only
when downloading or when asked (``verify=True``), so a local copy whose batch files differ
from torchvision's md5 list (same pixels, other metadata) still loads.

Images are kept in memory as ``uint8`` tensors and augmented on whole batches
(:func:`augment`: random crop with 4-pixel zero padding, horizontal flip); there is no
per-channel std scaling, which would multiply the Lipschitz bound.
"""

from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision.datasets import CIFAR10
from torchvision.datasets.utils import check_integrity

from robustflow.errors import UserError

#: Environment variable naming the default data root.
DATA_ENV = "ROBUSTFLOW_DATA"
BASE_FOLDER = "cifar-10-batches-py"
CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
}


#: What unpickling a damaged file raises (besides refusals): bit flips and truncation reach
#: many corners of the unpickler (bad memo index, unknown encoding, huge lengths, ...).
_DAMAGED = (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, LookupError,
            OverflowError, MemoryError)


def _first_line(err: BaseException) -> str:
    """Error messages stay on one line (some unpickler messages span two)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: a CIFAR batch holds only arrays, strings and ints"
        )


def safe_unpickle(path: str | os.PathLike) -> Any:
    """Unpickle ``path`` admitting only the globals a CIFAR-10 batch needs."""
    with open(path, "rb") as f:
        return _RestrictedUnpickler(io.BytesIO(f.read()), encoding="latin1").load()


def _as_str_keys(entry: Any, path: Path) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise UserError(f"{path} is not a CIFAR-10 batch (a dict was expected)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}


class SafeCIFAR10(CIFAR10):
    """``torchvision.datasets.CIFAR10`` with safe unpickling and optional checksums.

    ``root`` is the folder that contains ``cifar-10-batches-py/``. Errors are
    :class:`UserError` with a one-line message saying what is missing and how to get it.
    """

    def __init__(self, root: str | os.PathLike, train: bool = True, *, download: bool = False,
                 verify: bool = False, transform: Any = None) -> None:
        super(CIFAR10, self).__init__(root, transform=transform)
        self.train = train
        if download:
            self.download()  # torchvision downloads and md5-checks the archive
        if verify and not self._check_integrity():
            raise UserError(f"CIFAR-10 under {self.root} does not match torchvision's checksums")
        folder = Path(self.root) / self.base_folder
        files = [name for name, _ in (self.train_list if train else self.test_list)]
        missing = [f for f in [*files, self.meta["filename"]] if not (folder / f).is_file()]
        if missing:
            raise UserError(
                f"CIFAR-10 not found: expected {', '.join(missing)} in {folder}; pass --data-root "
                f"DIR (the folder containing {BASE_FOLDER}/), set {DATA_ENV}, or add --download"
            )
        data, targets = [], []
        for name in files:
            images, labels = _read_batch(folder / name)
            data.append(images)
            targets.extend(labels)
        self.data = np.vstack(data).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        self.targets = targets
        self._load_meta()

    def _load_meta(self) -> None:
        path = Path(self.root) / self.base_folder / self.meta["filename"]
        try:
            meta = _as_str_keys(safe_unpickle(path), path)
            self.classes = [str(c) for c in meta[self.meta["key"]]]
        except _DAMAGED as err:
            raise UserError(f"{path} is not a valid CIFAR-10 meta file ({_first_line(err)})") from None
        if len(self.classes) != 10:
            raise UserError(f"{path} names {len(self.classes)} classes, CIFAR-10 has 10")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    def _check_integrity(self) -> bool:
        folder = Path(self.root) / self.base_folder
        return all(check_integrity(str(folder / f), md5) for f, md5 in self.train_list + self.test_list)


def _read_batch(path: Path) -> tuple[np.ndarray, list[int]]:
    try:
        entry = _as_str_keys(safe_unpickle(path), path)
    except _DAMAGED as err:
        raise UserError(f"{path} is not a valid CIFAR-10 batch ({_first_line(err)})") from None
    images, labels = entry.get("data"), entry.get("labels")
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 2 \
            or images.shape[1] != 3072:
        raise UserError(f"{path}: 'data' must be a uint8 array of shape (N, 3072)")
    if not isinstance(labels, list) or len(labels) != len(images) \
            or not all(isinstance(v, int) and 0 <= v < 10 for v in labels):
        raise UserError(f"{path}: 'labels' must be {len(images)} ints in 0..9")
    return images, labels


def resolve_data_root(root: str | os.PathLike | None, download: bool = False) -> Path:
    """``root``, else ``$ROBUSTFLOW_DATA``; a :class:`UserError` if neither is usable."""
    chosen = root if root is not None else os.environ.get(DATA_ENV)
    if chosen is None:
        raise UserError(
            f"no CIFAR-10 location given: pass --data-root DIR (the folder containing "
            f"{BASE_FOLDER}/) or set {DATA_ENV}"
        )
    path = Path(chosen).expanduser()
    if not download and not (path / BASE_FOLDER).is_dir():
        source = "--data-root" if root is not None else f"${DATA_ENV}"
        raise UserError(
            f"CIFAR-10 not found: {path / BASE_FOLDER} does not exist (location from {source}); "
            f"point --data-root or {DATA_ENV} at the folder containing {BASE_FOLDER}/ or add --download"
        )
    return path


@dataclass
class ImageSet:
    """Images as ``uint8`` (N, 3, H, W) and labels as int64 (N,), kept in memory."""

    images: Tensor
    labels: Tensor
    classes: tuple[str, ...] = CLASSES

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: Tensor | slice) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index], self.classes)

    def floats(self, index: Tensor | slice = slice(None)) -> tuple[Tensor, Tensor]:
        """Images in [0, 1] (float32) and labels."""
        return self.images[index].float().div_(255), self.labels[index]


def load_cifar10(root: str | os.PathLike | None, train: bool, *, download: bool = False,
                 verify: bool = False, limit: int | None = None) -> ImageSet:
    """CIFAR-10 (train or test split) as an :class:`ImageSet`, first ``limit`` images."""
    path = resolve_data_root(root, download)
    dataset = SafeCIFAR10(path, train=train, download=download, verify=verify)
    images = torch.from_numpy(np.ascontiguousarray(dataset.data.transpose(0, 3, 1, 2)))
    labels = torch.tensor(dataset.targets, dtype=torch.int64)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return ImageSet(images, labels, tuple(dataset.classes))


def augment(images: Tensor, generator: torch.Generator, pad: int = 4) -> Tensor:
    """Random crop (zero padding ``pad``) and horizontal flip, drawn per image.

    Works on a whole batch (N, C, H, W) at once, so no per-image PIL round trip.
    """
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = dx[:, None] + torch.arange(w)
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]
    batch = torch.arange(n)[:, None, None, None]
    chans = torch.arange(images.shape[1])[None, :, None, None]
    return padded[batch, chans, rows, cols]


def write_cifar_batch(path: str | os.PathLike, images: np.ndarray, labels: list[int],
                      label: str = "synthetic batch") -> None:
    """Write a batch in the real CIFAR-10 pickle format (for tests and small samples)."""
    flat = np.ascontiguousarray(images.reshape(len(images), -1), dtype=np.uint8)
    entry = {"batch_label": label, "labels": [int(v) for v in labels], "data": flat,
             "filenames": [f"img_{i:05d}.png" for i in range(len(labels))]}
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)


def write_cifar_folder(root: str | os.PathLike, train: ImageSet | None, test: ImageSet,
                       train_batches: int = 5) -> Path:
    """A ``cifar-10-batches-py/`` folder under ``root`` holding the given images."""
    folder = Path(root) / BASE_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    if train is not None:
        chunks = np.array_split(np.arange(len(train)), train_batches)
        for i, idx in enumerate(chunks, start=1):
            sub = train.subset(torch.from_numpy(idx))
            write_cifar_batch(folder / f"data_batch_{i}", sub.images.numpy(), sub.labels.tolist())
    write_cifar_batch(folder / "test_batch", test.images.numpy(), test.labels.tolist())
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(CLASSES), "num_cases_per_batch": 10000,
                     "num_vis": 3072}, f, protocol=2)
    return folder
