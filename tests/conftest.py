"""Shared pytest setup: quiet TensorFlow, and a runner for tests that need several CPUs."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
# The oracle helpers (bn_oracle) for tests in sub-folders too.
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)


def run_python(code: str, *, env: dict | None = None, timeout: int = 300) -> str:
    """Runs ``code`` in a fresh interpreter (so it can configure logical CPUs before TF starts).

    The tests folder is on ``sys.path`` there, so the code may import the oracle helpers.
    Returns stdout; fails the test with stderr when the process exits non-zero.
    """
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = TESTS_DIR + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )
    if proc.returncode != 0:
        pytest.fail(
            f"subprocess failed (exit {proc.returncode}):\n--- stdout\n{proc.stdout[-4000:]}"
            f"\n--- stderr\n{proc.stderr[-8000:]}"
        )
    return proc.stdout


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for TF_CONFIG clusters of worker processes)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def python_subprocess():
    return run_python


def cli_error(capsys, argv, status: int = 2) -> str:
    """Runs the trainer's command line in this process; returns its one error line.

    The command must exit with `status` and end with exactly one `keras-bn-train: error:` line
    on stderr, without a traceback.
    """
    from keras_bn.train.cli.main import cli

    with pytest.raises(SystemExit) as exit_info:
        cli(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    ours = [line for line in lines if line.startswith("keras-bn-train: error: ")]
    assert exit_info.value.code == status, err[-3000:]
    assert len(ours) == 1 and lines[-1] == ours[0] and "Traceback" not in err, err[-3000:]
    return ours[0]


def kill_when(command, ready, *, env=None, timeout: int = 300) -> int:
    """Starts `command` and SIGKILLs it as soon as `ready()` holds; returns its exit status.

    Fails the test if the process ends before, or `ready()` does not hold within `timeout` s.
    """
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert process.poll() is None, f"{command} ended before it was killed"
            assert time.monotonic() < deadline, f"not ready to be killed after {timeout} s"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    return process.returncode
