"""Keeping TensorFlow's C++ log lines off the terminal of the command line.

TensorFlow's C++ runtime writes its log lines (a `failed call to cuInit` error on every machine
without a GPU, oneDNN and CPU-feature notes, gRPC and coordination-service chatter in
multi-worker runs) straight to file descriptor 2, and `TF_CPP_MIN_LOG_LEVEL` only counts when
set before TensorFlow is loaded. The command line therefore points descriptor 2 at /dev/null
and gives Python's `sys.stderr` a descriptor of its own on the terminal: every message of the
trainer, Python warning and traceback still shows, TensorFlow's C++ lines do not.

Only the command line does this (never `cli()` or the library): the environment variable
`KERAS_BN_TF_LOGS=1` keeps TensorFlow's lines.
"""

from __future__ import annotations

import logging
import sys

from absl import logging as absl_logging

from keras_bn import _native_stderr

wanted = _native_stderr.wanted  # The command line's check (`quiet.wanted`), defined once.


def silence_native_stderr() -> None:
    """Sends file descriptor 2 to /dev/null; `sys.stderr` keeps writing to the terminal.

    `import keras_bn` has usually done the redirect already (before TensorFlow's start-up lines);
    Python log handlers that were writing to the old `sys.stderr` (absl's, TensorFlow's) follow
    it to the terminal either way.
    """
    _native_stderr.redirect()
    handlers = [*logging.getLogger().handlers, *logging.getLogger("tensorflow").handlers]
    handlers.append(absl_logging.get_absl_handler().python_handler)
    for handler in handlers:
        # A handler made before the redirect still writes to descriptor 2, now /dev/null.
        if isinstance(handler, logging.StreamHandler) and _writes_to_fd2(handler.stream):
            handler.setStream(sys.stderr)


def _writes_to_fd2(stream) -> bool:
    try:
        return stream.fileno() == 2
    except (OSError, ValueError):
        return False
