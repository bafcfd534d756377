"""What the trainer tells its user, written in one place: progress and results on stdout,
warnings and the one-line errors on stderr, each line flushed at once (a log file follows a
run as it goes). `RunError` carries a message and the command line's exit status to `cli`.

Example:

>>> say("step 100 - train_loss 0.5000")
step 100 - train_loss 0.5000
"""

from __future__ import annotations

import sys

PROG = "keras-bn-train"


class RunError(Exception):
    """A run that could not start or finish; the message says why and what to do.

    Attributes:
        status: the command line's exit status: 2 the settings or outputs are wrong (nothing
            was trained), 1 training failed, 75 a multi-worker peer was lost, 130 interrupted.
    """

    def __init__(self, message: object, status: int = 2):
        super().__init__(str(message))
        self.status = status


def say(text: str) -> None:
    """One line (or block) of progress or results, on stdout."""
    print(text, flush=True)


def usage(text: str) -> None:
    """The usage text a command without flags prints before its error line, on stderr."""
    print(text, file=sys.stderr, flush=True)


def warn(text: str) -> None:
    """A warning, prefixed with the program's name, on stderr."""
    print(f"{PROG}: warning: {text}", file=sys.stderr, flush=True)


def error(text: object) -> None:
    """The one-line error a failing command ends with, on stderr (whitespace folded)."""
    print(f"{PROG}: error: {' '.join(str(text).split())}", file=sys.stderr, flush=True)
