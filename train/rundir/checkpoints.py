"""Finding the checkpoint to resume from: the newest one that loads, whatever the state file says.

`tf.train.CheckpointManager` writes the checkpoints and keeps the last few, but it finds them
through its state file (`checkpoints/checkpoint`) alone: a state file that is missing or holds
garbage makes TensorFlow start again from step 0, and a truncated newest checkpoint fails the
restore although an intact older one is there. This module looks at the files present
(`ckpt-<step>.index`), newest first, reads each candidate completely and takes the first that
loads; it then rewrites the state file so that the manager knows (and later rotates) every
checkpoint up to that one. Checkpoints that do not load are left untouched on disk: the next
save of the same step replaces them.

Example:

>>> import tempfile
>>> found = find_restorable(tempfile.mkdtemp())
>>> found.path is None, found.skipped
(True, [])
"""

from __future__ import annotations

import dataclasses
import os
import re

import tensorflow as tf

PREFIX = "ckpt"
_INDEX = re.compile(rf"^{PREFIX}-(\d+)\.index$")


@dataclasses.dataclass
class Found:
    """The result of `find_restorable`.

    Attributes:
        path: the prefix of the newest checkpoint that loads (e.g. `.../ckpt-400`), or None.
        step: its step (the number in its name), or None.
        skipped: `(prefix, reason)` for every newer checkpoint that does not load.
        older: prefixes of the checkpoints older than `path` (not read).
    """

    path: str | None = None
    step: int | None = None
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    older: list[str] = dataclasses.field(default_factory=list)

    def describe(self) -> list[str]:
        """One line per skipped checkpoint saying why it was skipped."""
        return [
            f"skipped checkpoint {os.path.basename(path)}: {reason}"
            for path, reason in self.skipped
        ]


def unreadable_reason(prefix: str) -> str | None:
    """Reads the checkpoint `prefix` completely; returns why it does not load, or None if it does.

    Every tensor is read, so a truncated or corrupted data file is found as well as a damaged
    index.
    """
    if not tf.io.gfile.exists(prefix + ".index"):
        return "its .index file is missing"
    try:
        reader = tf.train.load_checkpoint(prefix)
        for name in reader.get_variable_to_dtype_map():
            reader.get_tensor(name)
    except Exception as error:  # noqa: BLE001 - the reader raises OpError, IndexError, ...
        message = getattr(error, "message", None) or str(error)
        first_line = message.strip().splitlines()[0] if message.strip() else ""
        return f"it does not load ({type(error).__name__}: {first_line})"
    return None


def _steps_present(checkpoint_dir: str) -> dict[int, str]:
    """step -> prefix for every `ckpt-<step>` named by an index file or by the state file."""
    steps = {}
    if tf.io.gfile.isdir(checkpoint_dir):
        for name in tf.io.gfile.listdir(checkpoint_dir):
            match = _INDEX.match(name)
            if match:
                steps[int(match.group(1))] = os.path.join(checkpoint_dir, name[: -len(".index")])
    state = _state(checkpoint_dir)
    for path in list(state.all_model_checkpoint_paths) if state else []:
        match = re.search(rf"{PREFIX}-(\d+)$", path)
        if match:
            steps.setdefault(int(match.group(1)), os.path.join(checkpoint_dir, match.group(0)))
    return steps


def _state(checkpoint_dir: str):
    """The parsed state file, or None when it is missing or unreadable."""
    try:
        return tf.train.get_checkpoint_state(checkpoint_dir)
    except (tf.errors.OpError, ValueError):
        return None


def find_restorable(checkpoint_dir: str | os.PathLike) -> Found:
    """Finds the newest checkpoint in `checkpoint_dir` that loads completely.

    Candidates are the `ckpt-<step>` checkpoints whose files are present, and any the state file
    names; they are tried newest first.

    Returns:
        A `Found` (with `path=None` when no checkpoint loads).
    """
    checkpoint_dir = str(checkpoint_dir)
    found = Found()
    steps = _steps_present(checkpoint_dir)
    for step in sorted(steps, reverse=True):
        prefix = steps[step]
        if found.path is not None:
            found.older.insert(0, prefix)
            continue
        reason = unreadable_reason(prefix)
        if reason is None:
            found.path, found.step = prefix, step
        else:
            found.skipped.append((prefix, reason))
    return found


def check_not_past(step: int | None, train_steps: int, model_dir: str | os.PathLike) -> None:
    """Refuses to resume a run at `step` that `--train_steps` would end earlier.

    Example:

    >>> check_not_past(60, 30, "runs/a")
    Traceback (most recent call last):
    ...
    ValueError: --model_dir=runs/a is already trained to step 60 > --train_steps=30; ...
    """
    if step is not None and step > train_steps:
        raise ValueError(
            f"--model_dir={model_dir} is already trained to step {step} > "
            f"--train_steps={train_steps}; pass --train_steps>={step}."
        )


def repair_state(checkpoint_dir: str | os.PathLike, found: Found) -> bool:
    """Rewrites the state file to name `found.path` as the latest checkpoint, if it does not.

    Called by the one process that writes the model_dir, before `tf.train.CheckpointManager`
    reads the state file: the manager then rotates the older checkpoints as usual and never
    deletes one that is newer than what it knows.

    Returns:
        Whether the state file was rewritten.
    """
    if found.path is None:
        return False
    checkpoint_dir = str(checkpoint_dir)
    listed = [*found.older, found.path]
    state = _state(checkpoint_dir)
    if (
        state is not None
        and state.model_checkpoint_path == found.path
        and list(state.all_model_checkpoint_paths) == listed
    ):
        return False
    # With a timestamp each (the index file's), the manager rotates these checkpoints like its
    # own; without, it would keep them forever and out of its list.
    times = [_mtime(path) for path in listed]
    tf.compat.v1.train.update_checkpoint_state(
        checkpoint_dir,
        found.path,
        all_model_checkpoint_paths=listed,
        all_model_checkpoint_timestamps=times,
        last_preserved_timestamp=min(times) - 1,
    )
    return True


def _mtime(prefix: str) -> float:
    try:
        return tf.io.gfile.stat(prefix + ".index").mtime_nsec / 1e9
    except tf.errors.OpError:
        return 0.0
