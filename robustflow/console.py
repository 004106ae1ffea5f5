"""Console output that reaches a log file as it is written.

Python block-buffers ``sys.stdout`` when it is a file or a pipe, so ``robustflow train ... >
train.log`` would show nothing for minutes and then many epoch lines at once. Programs call
:func:`line_buffered_output` once at their entry point; every ``print`` after it is flushed
at its newline.
"""

from __future__ import annotations

import sys


def line_buffered_output() -> None:
    """Flush ``sys.stdout`` and ``sys.stderr`` at every newline, whatever they are attached to.

    Streams that cannot be reconfigured (a notebook's output, a test's capture object without
    ``reconfigure``) are left as they are.
    """
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(line_buffering=True)
