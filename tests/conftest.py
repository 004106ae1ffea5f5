"""Shared helpers for the property tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from robustflow.data import ImageSet


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and lose 10x to spinning on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def jacobian_norm(fn, x: torch.Tensor) -> float:
    """Exact spectral norm of the Jacobian of ``fn`` at one sample ``x`` (float64)."""
    flat = x.reshape(-1)

    def f(v: torch.Tensor) -> torch.Tensor:
        return fn(v.reshape(1, *x.shape)).reshape(-1)

    jac = torch.autograd.functional.jacobian(f, flat, vectorize=True)
    return float(torch.linalg.matrix_norm(jac.double(), ord=2))


def push_output_norm(module: torch.nn.Module, shape: tuple[int, ...], steps: int = 20) -> None:
    """Optimiser steps that try to make ``module`` as expansive as possible."""
    opt = torch.optim.Adam(module.parameters(), lr=0.05)
    for _ in range(steps):
        x = torch.randn(8, *shape, dtype=torch.float64)
        delta = 1e-2 * torch.randn_like(x)
        loss = -(module(x + delta) - module(x)).pow(2).sum() / delta.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()


def synthetic_set(n: int, seed: int, size: int = 32) -> ImageSet:
    """``n`` noisy images whose mean colour depends on the class (learnable, not trivial)."""
    rng = np.random.default_rng(seed)
    palette = np.random.default_rng(1234).integers(30, 226, size=(10, 3))
    labels = rng.permutation(np.arange(n) % 10)
    noise = rng.integers(-30, 31, size=(n, 3, size, size))
    images = np.clip(palette[labels][:, :, None, None] + noise, 0, 255).astype(np.uint8)
    return ImageSet(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)))
