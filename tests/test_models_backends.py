"""The zoo on every Keras backend: each model trains a step on JAX and PyTorch, in a subprocess.

Keras picks its backend once, at import, so each backend gets one fresh interpreter
(`KERAS_BACKEND` set before keras is imported) that builds every model of `keras_bn.models.names()`
small, trains it one `model.fit` step with Keras's BatchNormalization and with the zoo's default
(`keras_bn.BatchNormalization`), and reports each case as JSON; the tests read the report.
"""

import ast
import functools
import json
import math
import pathlib

import pytest
from conftest import run_python

from keras_bn import models

BACKENDS = ("jax", "torch")
# The baseline has no normalization layer: its one run (norm_layer ignored) covers it.
WITHOUT_NORM_LAYER = {"inception"}
CASES = [
    (name, norm)
    for name in models.names()
    for norm in ("keras", "default")
    if norm == "keras" or name not in WITHOUT_NORM_LAYER
]

_TRAIN_EVERY_MODEL = """
import inspect, json, sys
import keras, numpy as np
import keras_bn.models as models

report = {"backend": keras.backend.backend(), "tensorflow_imported": "tensorflow" in sys.modules}
for name, norm in CASES:
    try:
        builder = models._BUILDERS[name]
        kwargs = {"num_classes": 3, "seed": 0}
        if "final_endpoint" in inspect.signature(builder).parameters:  # the Inception nets
            kwargs.update(depth_multiplier=0.1, final_endpoint="Mixed_3b", input_shape=(75, 75, 3))
        if norm == "keras":
            kwargs["norm_layer"] = keras.layers.BatchNormalization
        model = models.get(name, **kwargs)
        rng = np.random.default_rng(0)
        x = rng.normal(size=(4,) + model.input_shape[1:]).astype("float32")
        y = np.arange(4) % 3
        model.compile(
            optimizer=keras.optimizers.SGD(0.01),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        before = [np.array(w) for w in model.trainable_weights]
        loss = model.fit(x, y, batch_size=4, epochs=1, verbose=0).history["loss"][0]
        moved = any(
            not np.array_equal(a, np.array(w)) for a, w in zip(before, model.trainable_weights)
        )
        norm_layers = sum(type(layer).__name__ == "BatchNormalization" for layer in model.layers)
        report[f"{name}-{norm}"] = {"loss": float(loss), "moved": moved, "norm_layers": norm_layers}
    except Exception as error:  # reported, and failed by the test of that case
        report[f"{name}-{norm}"] = {"error": f"{type(error).__name__}: {error}"[:3000]}
print("REPORT", json.dumps(report))
"""


@functools.cache
def _report(backend):
    """Runs every case on `backend` in one fresh interpreter (once per backend per session)."""
    code = f"CASES = {CASES!r}\n" + _TRAIN_EVERY_MODEL
    # XLA's CPU backend optimizes each compiled step for longer than the step runs here.
    fast_compile = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    env = {"KERAS_BACKEND": backend, "XLA_FLAGS": fast_compile}
    out = run_python(code, env=env, timeout=600)
    line = next(line for line in out.splitlines() if line.startswith("REPORT "))
    report = json.loads(line[len("REPORT ") :])
    assert report["backend"] == backend
    return report


@pytest.mark.parametrize("name, norm", CASES, ids=[f"{name}-{norm}" for name, norm in CASES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_model_trains_a_fit_step(backend, name, norm):
    result = _report(backend)[f"{name}-{norm}"]
    assert "error" not in result, result["error"]
    assert math.isfinite(result["loss"]), result
    assert result["moved"], "one SGD step left every trainable weight unchanged"
    if name in WITHOUT_NORM_LAYER:
        assert result["norm_layers"] == 0
    else:
        assert result["norm_layers"] > 0


def test_models_import_no_backend_at_module_level():
    """`keras_bn.models` reaches TensorFlow only inside the LRN fast path, on TensorFlow."""
    folder = pathlib.Path(models.__file__).parent
    for path in sorted(folder.glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                imported = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                imported = [node.module or ""]
            else:
                continue
            for module in imported:
                top = module.split(".")[0]
                assert top not in {"tensorflow", "jax", "torch"}, f"{path.name} imports {module}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_importing_the_zoo_does_not_import_tensorflow(backend):
    assert not _report(backend)["tensorflow_imported"]
