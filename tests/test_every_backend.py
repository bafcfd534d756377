"""The backend-portable tests of ``tests/every_backend/`` under JAX and PyTorch.

Keras picks its backend once per process, so each backend gets its own pytest run in a
subprocess (the main run collects the same files under TensorFlow). A failure shows that run's
summary and failures.
"""

import os
import re
import subprocess
import sys

import pytest
from conftest import TESTS_DIR


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_every_backend_suite_passes(backend):
    env = dict(os.environ, KERAS_BACKEND=backend, CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = TESTS_DIR + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "every_backend"],
        capture_output=True,
        text=True,
        env=env,
        cwd=TESTS_DIR,
        timeout=1200,
    )
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert re.search(r"\d+ passed", summary) and "failed" not in summary, summary
