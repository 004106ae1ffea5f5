"""CIFAR-10 loading from synthetic batch files, the restricted unpickler, and augmentation.

Every test makes its own small data in the real CIFAR batch format; the real data set is
never read here.
"""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from robustflow.data import (
    BASE_FOLDER,
    CLASSES,
    DATA_ENV,
    ImageSet,
    SafeCIFAR10,
    augment,
    load_cifar10,
    resolve_data_root,
    write_cifar_batch,
    write_cifar_folder,
)
from robustflow.errors import UserError
from tests.conftest import synthetic_set

N_TRAIN, N_TEST = 200, 100




@pytest.fixture(scope="module")
def sets() -> tuple[ImageSet, ImageSet]:
    return synthetic_set(N_TRAIN, 0), synthetic_set(N_TEST, 1)


@pytest.fixture
def root(tmp_path: Path, sets) -> Path:
    """A fresh synthetic ``cifar-10-batches-py/`` per test (tests below damage it)."""
    write_cifar_folder(tmp_path / "cifar", *sets)
    return tmp_path / "cifar"


class Evil:
    """Unpickling this runs ``func(arg)``: a stand-in for a tampered batch file."""

    def __init__(self, func, arg) -> None:
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


def payloads(marker: Path) -> list:
    return [Evil(os.system, f"touch {marker}"),
            Evil(eval, f"open({str(marker)!r}, 'w').write('ran')")]


# ------------------------------------------------------------------ loading


def test_loads_synthetic_folder_in_batch_format(root: Path, sets) -> None:
    train, test = sets
    loaded = load_cifar10(root, train=True)
    assert loaded.images.shape == (N_TRAIN, 3, 32, 32) and loaded.images.dtype == torch.uint8
    assert loaded.labels.dtype == torch.int64
    assert torch.equal(loaded.images, train.images)  # five batches, in order, pixel for pixel
    assert torch.equal(loaded.labels, train.labels)
    assert loaded.classes == CLASSES
    held_out = load_cifar10(root, train=False, limit=30)
    assert torch.equal(held_out.images, test.images[:30])
    assert torch.equal(held_out.labels, test.labels[:30])
    x, y = held_out.floats(slice(0, 4))
    assert x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1
    assert torch.allclose(x * 255, test.images[:4].float())


def test_classes_come_from_meta_file(root: Path) -> None:
    names = [f"class{i}" for i in range(10)]
    with open(root / BASE_FOLDER / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names}, f, protocol=2)
    assert load_cifar10(root, train=False).classes == tuple(names)


def test_bytes_keys_as_in_python2_pickles(root: Path, sets) -> None:
    """The real files were written by Python 2; keys may come back as bytes."""
    _, test = sets
    flat = test.images.numpy().reshape(N_TEST, -1)
    with open(root / BASE_FOLDER / "test_batch", "wb") as f:
        pickle.dump({b"data": flat, b"labels": test.labels.tolist()}, f, protocol=2)
    with open(root / BASE_FOLDER / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": list(CLASSES)}, f, protocol=2)
    loaded = load_cifar10(root, train=False)
    assert torch.equal(loaded.images, test.images)
    assert torch.equal(loaded.labels, test.labels)
    assert loaded.classes == CLASSES


def test_checksums_only_when_asked(root: Path) -> None:
    dataset = SafeCIFAR10(root, train=False)
    assert not dataset._check_integrity()  # synthetic md5s never match torchvision's list
    assert len(dataset.data) == N_TEST
    with pytest.raises(UserError, match="checksums"):
        load_cifar10(root, train=False, verify=True)


# ------------------------------------------------------------------ tampered pickles


@pytest.mark.parametrize("kind", [0, 1], ids=["os.system", "builtins.eval"])
def test_payloads_are_live_under_plain_pickle(tmp_path: Path, kind: int) -> None:
    """The refusals below mean something only if plain ``pickle`` would run the payload."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(payloads(marker)[kind], protocol=2))
    assert marker.exists()


@pytest.mark.parametrize("which", ["data_batch_1", "test_batch", "batches.meta"])
@pytest.mark.parametrize("nested", [False, True], ids=["top-level", "inside-dict"])
@pytest.mark.parametrize("kind", [0, 1], ids=["os.system", "builtins.eval"])
def test_malicious_pickle_is_refused_without_running(root: Path, tmp_path: Path, which: str,
                                                     nested: bool, kind: int) -> None:
    marker = tmp_path / "pwned"
    evil = payloads(marker)[kind]
    if nested:
        entry = {"label_names": evil} if which == "batches.meta" else \
            {"data": evil, "labels": [0] * 10}
    else:
        entry = evil
    with open(root / BASE_FOLDER / which, "wb") as f:
        pickle.dump(entry, f, protocol=2)
    with pytest.raises(UserError, match=which):
        load_cifar10(root, train=which == "data_batch_1")
    assert not marker.exists()


# ------------------------------------------------------------------ missing or broken data


def test_missing_root_mentions_both_ways_to_point_at_data(tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:
        load_cifar10(tmp_path / "nowhere", train=True)
    message = str(err.value)
    assert "--data-root" in message and DATA_ENV in message and "nowhere" in message


def test_no_root_and_no_env(monkeypatch) -> None:
    monkeypatch.delenv(DATA_ENV, raising=False)
    with pytest.raises(UserError) as err:
        resolve_data_root(None)
    assert "--data-root" in str(err.value) and DATA_ENV in str(err.value)


def test_env_var_is_the_default_root(monkeypatch, root: Path, tmp_path: Path) -> None:
    monkeypatch.setenv(DATA_ENV, str(root))
    assert resolve_data_root(None) == root
    assert len(load_cifar10(None, train=False)) == N_TEST
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "gone"))
    assert resolve_data_root(root) == root  # an explicit root wins over the env var
    with pytest.raises(UserError, match=f"gone.*{DATA_ENV}"):
        resolve_data_root(None)


@pytest.mark.parametrize("name", ["data_batch_3", "batches.meta"])
def test_missing_batch_file(root: Path, name: str) -> None:
    (root / BASE_FOLDER / name).unlink()
    with pytest.raises(UserError) as err:
        load_cifar10(root, train=True)
    message = str(err.value)
    assert name in message and "--data-root" in message and DATA_ENV in message
    if name == "data_batch_3":
        assert len(load_cifar10(root, train=False)) == N_TEST  # the test split needs no train batch


def test_truncated_batch(root: Path) -> None:
    path = root / BASE_FOLDER / "data_batch_2"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="data_batch_2 is not a valid CIFAR-10 batch"):
        load_cifar10(root, train=True)


def test_empty_meta_file(root: Path) -> None:
    (root / BASE_FOLDER / "batches.meta").write_bytes(b"")
    with pytest.raises(UserError, match="batches.meta is not a valid CIFAR-10 meta file"):
        load_cifar10(root, train=False)


def _write_entry(path: Path, entry) -> None:
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)


@pytest.mark.parametrize("name", ["test_batch", "batches.meta"])
def test_damaged_files_give_user_errors(tmp_path: Path, name: str) -> None:
    """Bit flips, truncation and noise: a clean load or a UserError, never another exception."""
    write_cifar_folder(tmp_path, None, synthetic_set(10, 2))
    path = tmp_path / BASE_FOLDER / name
    good = path.read_bytes()
    rng = random.Random(0)
    refused = 0
    for i in range(300):
        if i % 3 == 0:
            damaged = rng.randbytes(rng.choice([8, 64, 512]))
        elif i % 3 == 1:
            damaged = good[: rng.randrange(len(good))]
        else:
            damaged = bytearray(good)
            for _ in range(rng.randint(1, 3)):
                damaged[rng.randrange(min(len(good), 300))] = rng.randrange(256)
        path.write_bytes(bytes(damaged))
        try:
            loaded = load_cifar10(tmp_path, train=False)
        except UserError as err:
            assert name in str(err) and "\n" not in str(err)
            refused += 1
        else:  # a flip in an unimportant byte: what loads must still be well formed
            assert loaded.images.shape == (10, 3, 32, 32) and loaded.images.dtype == torch.uint8
            assert len(loaded.classes) == 10 and int(loaded.labels.max()) <= 9
    assert refused > 200


@pytest.mark.parametrize("case, match", [
    ("small images", r"shape \(N, 3072\)"),
    ("float images", r"uint8 array"),
    ("label 10", r"ints in 0\.\.9"),
    ("label -1", r"ints in 0\.\.9"),
    ("too few labels", r"'labels' must be 10 ints"),
    ("no labels", r"'labels'"),
    ("a list", r"a dict was expected"),
])
def test_malformed_batch(root: Path, case: str, match: str) -> None:
    path = root / BASE_FOLDER / "test_batch"
    images = np.zeros((10, 3, 32, 32), np.uint8)
    labels = list(range(10))
    if case == "small images":
        write_cifar_batch(path, np.zeros((10, 3, 16, 16), np.uint8), labels)
    elif case == "float images":
        _write_entry(path, {"data": images.reshape(10, -1).astype(np.float32), "labels": labels})
    elif case.startswith("label "):
        write_cifar_batch(path, images, labels[:-1] + [int(case.split()[1])])
    elif case == "too few labels":
        write_cifar_batch(path, images, labels[:-1])
    elif case == "no labels":
        _write_entry(path, {"data": images.reshape(10, -1)})
    else:
        _write_entry(path, [images, labels])
    with pytest.raises(UserError, match=match) as err:
        load_cifar10(root, train=False)
    assert "test_batch" in str(err.value)


@pytest.mark.parametrize("entry, match", [
    ({"label_names": list(CLASSES[:9])}, "names 9 classes"),
    ({"names": list(CLASSES)}, "not a valid CIFAR-10 meta file"),
    ({"label_names": 5}, "not a valid CIFAR-10 meta file"),
    ("not a dict", "a dict was expected"),
])
def test_malformed_meta(root: Path, entry, match: str) -> None:
    _write_entry(root / BASE_FOLDER / "batches.meta", entry)
    with pytest.raises(UserError, match=match):
        load_cifar10(root, train=False)


# ------------------------------------------------------------------ augmentation


def _crop_params(out: torch.Tensor, image: torch.Tensor, pad: int) -> list[tuple[int, int, bool]]:
    """Every (dy, dx, flip) for which ``out`` is that crop of the zero-padded ``image``."""
    padded = torch.nn.functional.pad(image, (pad, pad, pad, pad))
    h, w = image.shape[1:]
    found = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy:dy + h, dx:dx + w]
            for flip in (False, True):
                if torch.equal(out, crop.flip(-1) if flip else crop):
                    found.append((dy, dx, flip))
    return found


def test_augment_is_a_padded_crop_or_flip() -> None:
    images = torch.randint(0, 256, (24, 3, 12, 10), dtype=torch.uint8)
    out = augment(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    params = []
    for i in range(len(images)):
        found = _crop_params(out[i], images[i], pad=4)
        assert len(found) == 1, f"image {i}: {found}"  # random pixels: the crop is unique
        params.append(found[0])
    # drawn per image: several offsets and both flip states occur
    assert len({p[:2] for p in params}) > 5
    assert {p[2] for p in params} == {False, True}


def test_augment_same_image_varies_across_batch() -> None:
    image = torch.randint(0, 256, (1, 3, 8, 8), dtype=torch.uint8)
    out = augment(image.expand(32, -1, -1, -1).contiguous(), torch.Generator().manual_seed(3))
    distinct = {tuple(o.flatten().tolist()) for o in out}
    assert len(distinct) > 10
    for o in out[:5]:
        assert len(_crop_params(o, image[0], pad=4)) >= 1


def test_augment_without_padding_only_flips() -> None:
    images = torch.randint(0, 256, (16, 3, 6, 6), dtype=torch.uint8)
    out = augment(images, torch.Generator().manual_seed(1), pad=0)
    for o, x in zip(out, images, strict=True):
        assert torch.equal(o, x) or torch.equal(o, x.flip(-1))


def test_augment_is_deterministic_per_seed() -> None:
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    before = images.clone()
    a = augment(images, torch.Generator().manual_seed(7))
    b = augment(images, torch.Generator().manual_seed(7))
    c = augment(images, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(images, before)  # the input is not modified
