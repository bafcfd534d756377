"""Keras's own test file for its BatchNormalization, run against keras_bn.BatchNormalization.

The file ``keras/src/layers/normalization/batch_normalization_test.py`` ships in the keras wheel.
It is loaded from the INSTALLED keras package at test time (never copied here) in a fresh
subprocess, with ``keras.src.layers.BatchNormalization`` replaced by ours, and every test in it
is run twice, on each of Keras's backends (TensorFlow, JAX, PyTorch; one subprocess each), with
the same outcome on all three:

- with ``unbiased_variance=False`` (Keras's rule for the moving variance): every test passes;
- with our defaults: 10 pass, and the 23 failures are exactly the documented differences
  below, all of them the paper's ``n/(n-1)`` correction of the moving variance (Keras
  asserts the biased one):

  - ``test_correctness*`` (16 cases): after three ``momentum=0`` steps on normalized data
    Keras expects ``moving_variance`` ~ 1.0; ours is ``n/(n-1)`` (n = 10 to 45 values per
    channel, so 1.02 to 1.11).
  - ``test_bachnorm_ignore_masked_values*`` (6 cases): Keras expects ``[0.25, 0.0]``; ours is
    ``0.25 * 20/19`` for the first channel (20 unmasked values).
  - ``test_renorm_correctness``: Keras expects ``moving_stddev`` to move toward
    ``sqrt(biased variance + epsilon)``; ours uses the unbiased variance (n = 3).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

DOCUMENTED_DIFFERENCES = (
    "test_correctness",
    "test_bachnorm_ignore_masked_values",
    "test_renorm_correctness",
)
KERAS_TEST_COUNT = 33


def _is_documented(test_name: str) -> bool:
    # absl's parameterized cases are the method name followed by the case number.
    return any(re.fullmatch(re.escape(name) + r"\d*", test_name) for name in DOCUMENTED_DIFFERENCES)


BACKENDS = ("tensorflow", "jax", "torch")


@pytest.fixture(scope="module", params=BACKENDS)
def outcomes(request):
    """{run: {test name: outcome}} from one subprocess per backend running Keras's file twice."""
    env = dict(
        os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="", KERAS_BACKEND=request.param
    )
    result = subprocess.run(
        [sys.executable, __file__],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert result.returncode == 0 and lines, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(lines[-1])


def test_every_keras_test_passes_with_keras_variance_rule(outcomes):
    run = outcomes["unbiased_variance=False"]
    assert len(run) == KERAS_TEST_COUNT
    failed = {name: outcome for name, outcome in run.items() if outcome != "passed"}
    assert not failed


def test_default_run_fails_exactly_the_documented_differences(outcomes):
    run = outcomes["default"]
    assert len(run) == KERAS_TEST_COUNT
    failed = sorted(name for name, outcome in run.items() if outcome != "passed")
    expected = sorted(name for name in run if _is_documented(name))
    assert failed == expected
    # Every documented difference still exists (the list is not stale).
    for name in DOCUMENTED_DIFFERENCES:
        assert any(_is_documented(f) and f.startswith(name) for f in failed), name


def _run_keras_test_file(layer_class):
    """Runs every test of Keras's file with ``layers.BatchNormalization = layer_class``."""
    import importlib.util
    import unittest

    import keras
    from keras.src import layers

    path = os.path.join(
        os.path.dirname(keras.__file__),
        "src",
        "layers",
        "normalization",
        "batch_normalization_test.py",
    )
    spec = importlib.util.spec_from_file_location("keras_batch_normalization_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    original = layers.BatchNormalization
    layers.BatchNormalization = layer_class
    try:
        suite = unittest.defaultTestLoader.loadTestsFromModule(module)
        # Named before running: a suite drops its tests as it runs them.
        outcomes = {test._testMethodName: "passed" for test in _iterate(suite)}
        result = unittest.TestResult()
        suite.run(result)
    finally:
        layers.BatchNormalization = original
    for kind, tests in (("failed", result.failures), ("error", result.errors)):
        for test, trace in tests:
            outcomes[test._testMethodName] = kind
            if os.environ.get("KERAS_BN_SUITE_VERBOSE"):
                print(test._testMethodName, trace, file=sys.stderr)
    for test, _ in result.skipped:
        outcomes[test._testMethodName] = "skipped"
    return outcomes


def _iterate(suite):
    for item in suite:
        if hasattr(item, "__iter__"):
            yield from _iterate(item)
        else:
            yield item


def main():
    # This worktree's keras_bn, not an installed copy (the script's folder is tests/).
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import keras

    import keras_bn

    @keras.saving.register_keras_serializable(package="keras_bn_suite")
    class KerasVarianceBatchNormalization(keras_bn.BatchNormalization):
        """Ours with Keras's (biased) moving-variance rule as the default."""

        def __init__(self, *args, unbiased_variance=False, **kwargs):
            super().__init__(*args, unbiased_variance=unbiased_variance, **kwargs)

    outcomes = {
        "default": _run_keras_test_file(keras_bn.BatchNormalization),
        "unbiased_variance=False": _run_keras_test_file(KerasVarianceBatchNormalization),
    }
    print("\n" + json.dumps(outcomes), flush=True)


if __name__ == "__main__":
    main()
