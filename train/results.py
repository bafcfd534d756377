"""What an experiment leaves behind: its output files, written all or none, and the facts kept
with its results (shared by `--experiment=figure1` and `--experiment=table2`)."""

from __future__ import annotations

import os
import pathlib
import platform
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence


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


def publish(
    output_dir: str | os.PathLike, writers: Mapping[str, Callable[[pathlib.Path], object]]
) -> dict[str, str]:
    """Writes each file with its writer, then moves them all into `output_dir`.

    Every writer writes into a scratch folder inside `output_dir`, in the order given; only when
    all have succeeded are the files renamed over the old ones. A failing writer leaves the
    previous outputs as they were, and no partial file.

    Args:
        output_dir: the folder (created if needed).
        writers: file name -> `writer(path)`.

    Returns:
        File name -> its path in `output_dir`.
    """
    output_dir = pathlib.Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    scratch = pathlib.Path(tempfile.mkdtemp(prefix=".outputs-", dir=output_dir))
    try:
        for name, write in writers.items():
            write(scratch / name)
        for name in writers:
            os.replace(scratch / name, output_dir / name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {name: str(output_dir / name) for name in writers}
