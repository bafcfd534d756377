"""Keeping TensorFlow's C++ log lines off the terminal of keras-bn's own command line.

TensorFlow's C++ runtime writes straight to file descriptor 2, from the moment it is imported
(oneDNN, CUDA-stub and CPU-feature notes, before `TF_CPP_MIN_LOG_LEVEL` is even read) to the
`failed call to cuInit` error on every machine without a GPU. The trainer's command line
(`keras-bn-train`, `python -m keras_bn.train`) points descriptor 2 at /dev/null and gives
Python's `sys.stderr` a descriptor of its own on the terminal, so every message of the trainer,
Python warning and traceback still shows. `import keras_bn` does this only when the process IS
that command line (and TensorFlow's lines were not asked for with
`KERAS_BN_TF_LOGS=1`): a user's program that imports keras_bn keeps its stderr as it is.

Example:

>>> wanted() == (os.environ.get("KERAS_BN_TF_LOGS", "") not in ("", "0"))
True
>>> is_trainer_command_line(["/venv/bin/keras-bn-train"], ["python", "/venv/bin/keras-bn-train"])
True
>>> is_trainer_command_line(["script.py"], ["python", "script.py"])
False
"""

import os
import sys

ENV = "KERAS_BN_TF_LOGS"
_MODULES = ("keras_bn.train", "keras_bn.train.__main__")
_terminal = None  # sys.stderr on the terminal once descriptor 2 is redirected


def wanted():
    """Whether TensorFlow's C++ logs are asked for: `KERAS_BN_TF_LOGS=1`, their own switch.

    `--verbose` only says how much the trainer itself prints.
    """
    return os.environ.get(ENV, "") not in ("", "0")


def is_trainer_command_line(argv=None, orig_argv=None):
    """Whether this process is `keras-bn-train` or `python -m keras_bn.train`."""
    argv = sys.argv if argv is None else argv
    orig_argv = getattr(sys, "orig_argv", []) if orig_argv is None else orig_argv
    if argv and os.path.basename(argv[0]) == "keras-bn-train":
        return True
    for i, arg in enumerate(orig_argv):
        module = orig_argv[i + 1] if arg == "-m" and i + 1 < len(orig_argv) else arg[2:]
        if arg.startswith("-m") and module in _MODULES:
            return True
    return False


def redirect():
    """Points descriptor 2 at /dev/null and `sys.stderr` at the terminal; once per process.

    Returns the previous `sys.stderr` (on the first call) or None (already redirected).
    """
    global _terminal
    if _terminal is not None:
        return None
    old = sys.stderr
    old.flush()
    terminal = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    _terminal = os.fdopen(terminal, "w", buffering=1, encoding=old.encoding, errors="replace")
    sys.stderr = _terminal
    return old


def hide_tensorflow_startup_lines():
    """Called by `import keras_bn` before TensorFlow loads: redirects for the trainer's CLI only."""
    if is_trainer_command_line() and not wanted():
        redirect()
