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
from conftest import TESTS_DIR, run_python


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


def test_jax_with_float64_enabled_keeps_float64_statistics():
    out = run_python(
        """
import numpy as np, keras, keras_bn
x = np.random.default_rng(0).normal(1e4, 1.0, (8, 3))
layer = keras_bn.BatchNormalization(dtype="float64", momentum=0.0)
y = layer(x, training=True)
assert str(layer.moving_mean.value.dtype) == "float64" and str(y.dtype) == "float64"
np.testing.assert_allclose(layer.moving_mean.numpy(), x.mean(0), rtol=1e-12)
print("float64 OK")
""",
        env={"KERAS_BACKEND": "jax", "JAX_ENABLE_X64": "1"},
    )
    assert "float64 OK" in out


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_the_layer_imports_no_other_framework(backend):
    # A fresh interpreter: Keras itself imports TensorFlow where it is installed once anything
    # saves a model or seeds its RNG, which the other tests do. (It imports jax under torch.)
    out = run_python(
        """
import sys
import keras, numpy as np, keras_bn
layer = keras_bn.BatchNormalization(renorm=True, momentum=None)
layer(np.ones((4, 3), "float32"), training=True)
others = {"jax": ("tensorflow", "torch"), "torch": ("tensorflow",)}[keras.backend.backend()]
print("IMPORTED", [name for name in others if name in sys.modules])
""",
        env={"KERAS_BACKEND": backend},
    )
    assert "IMPORTED []" in out, out
