"""Tests for keras_bn.models.lrn.LocalResponseNormalization, on every Keras backend."""

import json

import keras
import numpy as np
import pytest
from conftest import run_python

from keras_bn.models import LocalResponseNormalization, lrn

DEFAULTS = dict(depth_radius=2, bias=1.0, alpha=1e-4 / 5, beta=0.75)
CASES = [dict(), dict(depth_radius=1, bias=2.0, alpha=0.1, beta=0.5), dict(depth_radius=0)]
ON_TENSORFLOW = keras.backend.backend() == "tensorflow"


def _window_sum(a, depth_radius):
    """sum(a[..., d - depth_radius : d + depth_radius + 1]) for every channel d (float64)."""
    channels = a.shape[-1]
    out = np.empty(a.shape, "float64")
    for d in range(channels):
        lo, hi = max(0, d - depth_radius), min(channels, d + depth_radius + 1)
        out[..., d] = np.sum(a[..., lo:hi].astype("float64"), axis=-1)
    return out


def _reference(x, depth_radius, bias, alpha, beta):
    return x / (bias + alpha * _window_sum(np.square(x.astype("float64")), depth_radius)) ** beta


def _reference_gradient(x, dy, depth_radius, bias, alpha, beta):
    """d sum(dy * lrn(x)) / dx: the window is symmetric, so channel k feeds exactly W(k)."""
    x, dy = x.astype("float64"), dy.astype("float64")
    norm = bias + alpha * _window_sum(np.square(x), depth_radius)
    through_sums = _window_sum(dy * x * norm ** (-beta - 1), depth_radius)
    return dy * norm**-beta - 2 * alpha * beta * x * through_sums


def _inputs():
    rng = np.random.default_rng(0)
    x = rng.normal(scale=3.0, size=(2, 3, 4, 7)).astype("float32")
    return x, rng.normal(size=x.shape).astype("float32")


@pytest.mark.parametrize("kwargs", CASES)
def test_matches_formula(kwargs):
    x, _ = _inputs()
    layer = LocalResponseNormalization(**kwargs)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(layer(x)),
        _reference(x, **DEFAULTS | kwargs),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.skipif(not ON_TENSORFLOW, reason="compares against TensorFlow's LRN kernel")
@pytest.mark.parametrize("kwargs", CASES)
def test_keras_ops_formula_matches_tensorflow_kernel_and_gradient(kwargs):
    import tensorflow as tf

    x, dy = map(tf.constant, _inputs())
    full = DEFAULTS | kwargs
    gradients = []
    for fn in (tf.nn.local_response_normalization, lrn.local_response_normalization):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = fn(x, **full)
            loss = tf.reduce_sum(y * dy)
        gradients.append(tape.gradient(loss, x).numpy())
        np.testing.assert_allclose(y.numpy(), _reference(x.numpy(), **full), rtol=1e-5, atol=1e-6)
    for gradient in gradients:
        expected = _reference_gradient(x.numpy(), dy.numpy(), **full)
        np.testing.assert_allclose(gradient, expected, rtol=1e-4, atol=1e-5)


# One interpreter per backend (Keras picks it at import): the layer's outputs (float32 and
# float16 inputs) and its input gradient, through the backend's own autodiff.
_LRN_ON_BACKEND = """
import json
import keras, numpy as np
from keras_bn.models import LocalResponseNormalization

rng = np.random.default_rng(0)
x = rng.normal(scale=3.0, size=(2, 3, 4, 7)).astype("float32")
dy = rng.normal(size=x.shape).astype("float32")
backend = keras.backend.backend()


def gradient(layer):
    if backend == "jax":
        import jax

        return jax.grad(lambda v: (layer(v) * dy).sum())(x)
    import torch

    v = torch.tensor(x, requires_grad=True)
    (layer(v) * torch.tensor(dy)).sum().backward()
    return v.grad


report = {"backend": backend, "cases": []}
for kwargs in CASES:
    layer = LocalResponseNormalization(**kwargs)
    report["cases"].append({
        "y": keras.ops.convert_to_numpy(layer(x)).tolist(),
        "dx": keras.ops.convert_to_numpy(gradient(layer)).tolist(),
    })
half = LocalResponseNormalization(dtype="float16", alpha=1.0)
y16 = keras.ops.convert_to_numpy(half(np.full((1, 2, 2, 5), 300.0, "float16")))
report["float16"] = {"dtype": str(y16.dtype), "y": y16.astype("float64").tolist()}
print("REPORT", json.dumps(report))
"""


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_matches_formula_and_its_gradient_on_backend(backend):
    code = f"CASES = {CASES!r}\n" + _LRN_ON_BACKEND
    out = run_python(code, env={"KERAS_BACKEND": backend}, timeout=120)
    report = json.loads(next(line for line in out.splitlines() if line.startswith("REPORT "))[7:])
    assert report["backend"] == backend
    x, dy = _inputs()
    for kwargs, case in zip(CASES, report["cases"], strict=True):
        full = DEFAULTS | kwargs
        np.testing.assert_allclose(case["y"], _reference(x, **full), rtol=1e-5, atol=1e-6)
        expected = _reference_gradient(x, dy, **full)
        np.testing.assert_allclose(case["dx"], expected, rtol=1e-4, atol=1e-5)
    half = np.full((1, 2, 2, 5), 300.0, "float16")
    assert report["float16"]["dtype"] == "float16"
    np.testing.assert_allclose(
        report["float16"]["y"], _reference(half, 2, 1.0, 1.0, 0.75), rtol=1e-2
    )


def test_defaults_are_googlenet_constants():
    layer = LocalResponseNormalization()
    assert (layer.depth_radius, layer.bias, layer.beta) == (2, 1.0, 0.75)
    assert layer.alpha == pytest.approx(2e-5)  # Caffe alpha 1e-4 over a window of 5


def test_float16_input_keeps_dtype_and_does_not_overflow():
    x = np.full((1, 2, 2, 5), 300.0, dtype="float16")  # 5 * 300^2 overflows float16
    layer = LocalResponseNormalization(dtype="float16", alpha=1.0)
    out = keras.ops.convert_to_numpy(layer(x))
    assert out.dtype == np.float16 and np.all(np.isfinite(out))
    np.testing.assert_allclose(out, _reference(x, 2, 1.0, 1.0, 0.75), rtol=1e-2)


def test_config_and_keras_file_round_trip(tmp_path):
    layer = LocalResponseNormalization(depth_radius=3, alpha=1e-3, name="lrn")
    clone = LocalResponseNormalization.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    inputs = keras.Input((4, 4, 8))
    model = keras.Model(inputs, layer(inputs))
    path = tmp_path / "lrn.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.get_layer("lrn"), LocalResponseNormalization)
    assert loaded.get_layer("lrn").depth_radius == 3
    x = np.random.default_rng(1).normal(size=(2, 4, 4, 8)).astype("float32")
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(loaded(x)), keras.ops.convert_to_numpy(model(x))
    )


@pytest.mark.parametrize(
    "kwargs, match", [(dict(depth_radius=-1), "depth_radius"), (dict(bias=0.0), "bias")]
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LocalResponseNormalization(**kwargs)


def test_rank_other_than_4_raises():
    with pytest.raises(ValueError, match="rank-4"):
        LocalResponseNormalization()(np.zeros((2, 8), "float32"))
