"""Keeping TensorFlow's C++ log lines off the terminal of the command line.

TensorFlow's C++ runtime writes its log lines (a `failed call to cuInit` error on every machine
without a GPU, oneDNN and CPU-feature notes, gRPC and coordination-service chatter in
multi-worker runs) straight to file descriptor 2, and `TF_CPP_MIN_LOG_LEVEL` only counts when
set before TensorFlow is loaded. The command line therefore points descriptor 2 at /dev/null
and gives Python's `sys.stderr` a descriptor of its own on the terminal: every message of the
trainer, Python warning and traceback still shows, TensorFlow's C++ lines do not.

Only the command line does this (never `cli()` or the library): `--verbose=2` or the
environment variable `KERAS_BN_TF_LOGS=1` keeps TensorFlow's lines.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import logging as absl_logging

ENV = "KERAS_BN_TF_LOGS"


def wanted(argv: list[str]) -> bool:
    """Whether the command line `argv` (or the environment) asks for TensorFlow's C++ logs.

    Looked up before the flags are parsed: by then TensorFlow may already be logging.

    Example:

    >>> wanted(["--preset=mnist_bn", "--verbose", "2"])
    True
    """
    verbose_two = any(
        arg == "--verbose=2" or (arg == "--verbose" and value == "2")
        for arg, value in zip(argv, [*argv[1:], ""], strict=True)
    )
    return verbose_two or os.environ.get(ENV, "") not in ("", "0")


def silence_native_stderr() -> None:
    """Sends file descriptor 2 to /dev/null; `sys.stderr` keeps writing to the terminal.

    Python log handlers that were writing to the old `sys.stderr` (absl's, TensorFlow's) follow
    it to the terminal.
    """
    old = sys.stderr
    old.flush()
    terminal = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    sys.stderr = os.fdopen(terminal, "w", buffering=1, encoding=old.encoding, errors="replace")
    handlers = [*logging.getLogger().handlers, *logging.getLogger("tensorflow").handlers]
    handlers.append(absl_logging.get_absl_handler().python_handler)
    for handler in handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is old:
            handler.setStream(sys.stderr)
