"""Tests for keras_bn.models.lrn.LocalResponseNormalization."""

import keras
import numpy as np
import pytest

from keras_bn.models import LocalResponseNormalization


def _reference(x, depth_radius, bias, alpha, beta):
    channels = x.shape[-1]
    out = np.empty_like(x, dtype="float64")
    for d in range(channels):
        lo, hi = max(0, d - depth_radius), min(channels, d + depth_radius + 1)
        sqr_sum = np.sum(np.square(x[..., lo:hi].astype("float64")), axis=-1)
        out[..., d] = x[..., d] / (bias + alpha * sqr_sum) ** beta
    return out


@pytest.mark.parametrize(
    "kwargs", [dict(), dict(depth_radius=1, bias=2.0, alpha=0.1, beta=0.5), dict(depth_radius=0)]
)
def test_matches_formula(kwargs):
    x = np.random.default_rng(0).normal(scale=3.0, size=(2, 3, 4, 7)).astype("float32")
    layer = LocalResponseNormalization(**kwargs)
    full = dict(depth_radius=2, bias=1.0, alpha=1e-4 / 5, beta=0.75) | kwargs
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(layer(x)), _reference(x, **full), rtol=1e-5, atol=1e-6
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
