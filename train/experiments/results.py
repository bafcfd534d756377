"""What an experiment reports beside its curves (shared by `--experiment=figure1` and
`--experiment=table2`; their files are written with `rundir.folder.publish`)."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence


def environment() -> dict:
    """Versions and machine facts recorded with an experiment's results."""
    import keras
    import tensorflow as tf

    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }


def first_step_at(
    steps: Sequence[int], accuracies: Sequence[float], threshold: float
) -> int | None:
    """The first evaluated step whose accuracy is >= `threshold`, or None.

    >>> first_step_at([100, 200, 300], [0.5, 0.9, 0.95], 0.9)
    200
    """
    return next((s for s, a in zip(steps, accuracies, strict=True) if a >= threshold), None)
