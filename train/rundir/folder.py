"""The model_dir: its layout, atomic writes, refusing mixed runs, and cleaning up failed starts.

Layout of a run directory::

    config.json      the resolved configuration (rewritten at each start)
    metrics.jsonl    one JSON object per evaluation
    summary.json     final metrics, wall time and output paths
    checkpoints/     tf.train.CheckpointManager files
    tensorboard/     train/ and eval/ event files

Every file is written to a temporary name in the same folder and renamed into place, so a run
killed at any instant leaves either the old or the new version, never half of one.

Example:

>>> import tempfile
>>> run = RunDir(tempfile.mkdtemp() + "/run")
>>> with run.claim({"model": "mlp"}, '{"model": "mlp"}'):
...     run.commit()
>>> run.check({"model": "mlp"}) is not None
True
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from typing import Any


class RunConflictError(ValueError):
    """The model_dir holds a different run (or something that is not a run)."""


# Read once, at import: changing the umask briefly while other threads create files (TensorFlow's
# writers) would give those files the wrong mode.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to `path` through a temporary file and an atomic rename.

    The file gets the mode a plain `open(path, "w")` would give it (0666 minus the umask), not
    the 0600 of the temporary file.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_writable(path: str | os.PathLike, flag: str) -> None:
    """Checks that the folder `path` can be created (if missing) and written, by writing to it.

    Probes with a real temporary file in `path` or its nearest existing parent (permission bits
    say nothing for root, nor for read-only file systems), and removes it again.

    Raises:
        OSError: naming `flag` and the reason, if `path` cannot be written.
    """
    path = pathlib.Path(path).absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    where = "" if existing == path else f" (its parent {existing} exists)"
    if existing == path and not path.is_dir():
        raise OSError(f"{flag}={path} exists and is not a directory.")
    if not existing.is_dir():
        raise OSError(f"{flag}={path} cannot be created: {existing} is not a directory.")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".keras-bn-write-test-")
    except OSError as error:
        raise OSError(
            f"{flag}={path} is not writable{where}: {error.strerror or error}; choose a "
            "folder you can write."
        ) from error
    os.close(fd)
    os.unlink(probe)


def json_text(data: Any) -> str:
    """`data` as the project's JSON files hold it: indented, keys sorted, a final newline."""
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    """Writes `data` as indented JSON, atomically."""
    atomic_write_text(path, json_text(data))


def publish(
    output_dir: str | os.PathLike, writers: Mapping[str, Callable[[pathlib.Path], object]]
) -> dict[str, str]:
    """Writes a set of files all or none: `atomic_write_text` for several files at once.

    Every writer writes its file into a scratch folder inside `output_dir`, in the order given;
    only when all have succeeded is each file synced and renamed over the old one. A failing
    writer leaves the previous outputs as they were, and no partial file.

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
            with open(scratch / name, "rb") as f:
                os.fsync(f.fileno())
            os.replace(scratch / name, output_dir / name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {name: str(output_dir / name) for name in writers}


class RunDir:
    """A run directory (see the module docstring for its layout).

    Args:
        path: the `--model_dir`.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        self._created: pathlib.Path | None = None
        self._emptied = False
        self._committed = False
        self._metrics: list[dict[str, Any]] | None = None

    @property
    def checkpoint_dir(self) -> pathlib.Path:
        return self.path / "checkpoints"

    @property
    def tensorboard_dir(self) -> pathlib.Path:
        return self.path / "tensorboard"

    @property
    def config_path(self) -> pathlib.Path:
        return self.path / "config.json"

    @property
    def metrics_path(self) -> pathlib.Path:
        return self.path / "metrics.jsonl"

    @property
    def summary_path(self) -> pathlib.Path:
        return self.path / "summary.json"

    def check(self, identity: Mapping[str, Any]) -> dict[str, Any] | None:
        """Checks that this directory is new, empty, or holds a run with the same identity.

        Args:
            identity: the configuration fields that must match (`TrainConfig.identity()`,
                JSON-compatible).

        Returns:
            The saved configuration when the directory holds a compatible run, else None.

        Raises:
            RunConflictError: if the directory holds a run with a different identity, or files
                that are not a run.
        """
        if not self.path.exists():
            return None
        if not self.path.is_dir():
            raise RunConflictError(f"--model_dir={self.path} exists and is not a directory.")
        if not self.config_path.exists():
            if any(self.path.iterdir()):
                raise RunConflictError(
                    f"--model_dir={self.path} is not empty and holds no config.json; "
                    "choose a new or empty directory."
                )
            return None
        saved = json.loads(self.config_path.read_text())
        wanted = json.loads(json.dumps(dict(identity)))  # normalize tuples, ints vs floats
        kind = saved.get("experiment")
        if kind != wanted.get("experiment"):  # one line, not every field of the other kind
            held = f"an --experiment={kind} folder" if kind else "a training run"
            raise RunConflictError(
                f"--model_dir={self.path} holds a run with different flags: it is {held}; use "
                "a new --model_dir, or that run's own command to resume it."
            )
        diffs = [
            f"{k}: {saved.get(k, '<unset>')!r} != {v!r}"
            for k, v in sorted(wanted.items())
            if saved.get(k, "<unset>") != v
        ]
        if diffs:
            raise RunConflictError(
                f"--model_dir={self.path} holds a run with different flags ("
                + "; ".join(diffs)
                + "); use a new --model_dir or repeat that run's flags to resume it."
            )
        return saved

    @contextlib.contextmanager
    def claim(self, identity: Mapping[str, Any], config_json: str) -> Iterator[RunDir]:
        """Creates the directory and writes `config_json`; undoes it if the body fails early.

        If the body raises before `commit()` (i.e. before the first checkpoint), everything this
        call created is removed again, so a failed start leaves no half-written model_dir. A
        directory that already held a run is never removed.

        Args:
            identity: as for `check`, which runs first.
            config_json: the text of `config.json`.
        """
        existing = self.check(identity)
        if not self.path.exists():
            top = self.path
            while not top.parent.exists():
                top = top.parent
            self._created = top
            self.path.mkdir(parents=True)
        elif existing is None:
            self._emptied = True  # an empty directory we fill
        atomic_write_text(self.config_path, config_json)
        try:
            yield self
        except BaseException:
            if not self._committed:
                self._undo()
            raise

    def commit(self) -> None:
        """Marks the run as worth keeping (called once the first checkpoint exists)."""
        self._committed = True

    def _undo(self) -> None:
        if self._created is not None:
            shutil.rmtree(self._created, ignore_errors=True)
        elif self._emptied:
            for child in self.path.iterdir():
                if child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)

    # Metrics: a small file, rewritten atomically with each record.

    def metrics(self) -> list[dict[str, Any]]:
        """Returns the records of metrics.jsonl (a torn last line is dropped)."""
        if self._metrics is None:
            self._metrics = []
            if self.metrics_path.exists():
                for line in self.metrics_path.read_text().splitlines():
                    try:
                        self._metrics.append(json.loads(line))
                    except json.JSONDecodeError:
                        break
        return self._metrics

    def truncate_metrics(self, step: int) -> None:
        """Drops records after `step` (written by a run killed before its next checkpoint)."""
        kept = [r for r in self.metrics() if r.get("step", 0) <= step]
        if len(kept) != len(self.metrics()) or self.metrics_path.exists():
            self._metrics = kept
            self._write_metrics()

    def append_metrics(self, record: Mapping[str, Any]) -> None:
        """Adds one record to metrics.jsonl."""
        self.metrics().append(dict(record))
        self._write_metrics()

    def _write_metrics(self) -> None:
        atomic_write_text(
            self.metrics_path,
            "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.metrics()),
        )
