"""Programs print their progress as it happens, also into a pipe or a file (``tail -f``).

Each program runs as a real subprocess with stdout on a pipe, where Python would
block-buffer it; its first epoch line must arrive while it is still training.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from robustflow.data import write_cifar_folder
from tests.conftest import synthetic_set

REPO = Path(__file__).resolve().parents[1]
#: Start-up (importing torch) and one epoch of 200 images, on a busy machine; without line
#: buffering the line comes only when the program ends, hundreds of epochs later.
WAIT_SECONDS = 120


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic-cifar")
    write_cifar_folder(root, synthetic_set(200, 0), synthetic_set(60, 1))
    return root


def first_line_while_running(argv: list[str], starts: str) -> tuple[str, bool]:
    """The first stdout line of ``argv`` that begins with ``starts``, and whether the
    program was still running when it arrived; the program is then stopped."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env["OMP_NUM_THREADS"] = "1"
    process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + WAIT_SECONDS
    seen: list[str] = []
    try:
        while True:
            try:
                line = lines.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                pytest.fail(f"no line starting {starts!r} within {WAIT_SECONDS} s; got {seen}")
            if line is None:
                pytest.fail(f"the program ended without a line starting {starts!r}: {seen}")
            seen.append(line)
            if line.startswith(starts):
                return line, process.poll() is None
    finally:
        process.kill()
        process.wait()
        process.stdout.close()


def test_train_prints_each_epoch_as_it_ends(data_root: Path, tmp_path: Path) -> None:
    line, running = first_line_while_running(
        [sys.executable, "-m", "robustflow.cli", "train", "--preset", "micro", "--data-root",
         str(data_root), "--epochs", "1000", "--batch-size", "32", "--val-size", "20",
         "--device", "cpu", "--out", str(tmp_path / "m.pt"), "--no-progress"], "epoch")
    assert line.split()[:2] == ["epoch", "1"] and "certified@" in line
    assert running


def test_benchmark_prints_each_epoch_as_it_ends(data_root: Path, tmp_path: Path) -> None:
    line, running = first_line_while_running(
        [sys.executable, "benchmarks/bench_train.py", "--data-root", str(data_root), "--budget",
         "600", "--preset", "micro", "--out", str(tmp_path / "b.pt")], "epoch")
    assert line.split()[:2] == ["epoch", "1"]
    assert running
