"""Tests for keras_bn.models.mlp: the paper's MNIST net with and without BN."""

import keras
import numpy as np
import pytest

from keras_bn import models
from keras_bn.models import mlp

KERAS_BN = keras.layers.BatchNormalization
NORM_TYPES = (KERAS_BN, models._common.default_norm_layer())


def _counts(model):
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    non_trainable = sum(int(np.prod(w.shape)) for w in model.non_trainable_weights)
    return trainable, non_trainable


def _batch(n=60, seed=0):
    """Binary 784-pixel inputs whose label is set by which quarter of the pixels is brightest."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    probs = np.full((n, 4, 196), 0.2)
    probs[np.arange(n), labels] = 0.6
    images = (rng.uniform(size=probs.shape) < probs).reshape(n, 784)
    return images.astype("float32"), labels.astype("int32")


@pytest.mark.parametrize("norm_layer", [None, KERAS_BN])
def test_bn_net_structure_and_counts(norm_layer):
    model = models.get("mlp", batch_norm=True, norm_layer=norm_layer)
    assert model.input_shape == (None, 784) and model.output_shape == (None, 10)
    for i in (1, 2, 3):
        dense = model.get_layer(f"hidden{i}_dense")
        norm = model.get_layer(f"hidden{i}_bn")
        sigmoid = model.get_layer(f"hidden{i}_sigmoid")
        assert not dense.use_bias and dense.units == 100
        assert isinstance(norm, NORM_TYPES)
        assert norm.input is dense.output and sigmoid.input is norm.output
        assert sigmoid.get_config()["activation"] == "sigmoid"
    if norm_layer is KERAS_BN:
        assert isinstance(model.get_layer("hidden1_bn"), KERAS_BN)
    logits = model.get_layer("logits")
    assert logits.use_bias and logits.get_config()["activation"] == "linear"
    # 784*100 + 2 * 100*100 + 100*10 + 10 weights, gamma and beta for 300 units.
    assert _counts(model) == (99_410 + 600, 600)


def test_baseline_structure_and_counts():
    model = models.get("mlp", batch_norm=False)
    assert not [layer for layer in model.layers if isinstance(layer, NORM_TYPES)]
    for i in (1, 2, 3):
        assert model.get_layer(f"hidden{i}_dense").use_bias
        assert (
            model.get_layer(f"hidden{i}_sigmoid").input
            is model.get_layer(f"hidden{i}_dense").output
        )
    assert _counts(model) == (99_710, 0)


def test_outputs_are_logits():
    x, _ = _batch(8)
    out = keras.ops.convert_to_numpy(models.get("mlp", batch_norm=False, seed=0)(x))
    assert not np.allclose(out.sum(axis=-1), 1.0)  # a softmax would sum to 1


def test_gaussian_init_with_documented_std_and_seed():
    a = models.get("mlp", seed=3)
    b = models.get("mlp", seed=3)
    c = models.get("mlp", seed=4)
    kernel = a.get_layer("hidden1_dense").kernel.numpy()
    assert mlp.DEFAULT_INIT_STDDEV == 0.01
    assert abs(kernel.mean()) < 1e-3
    assert kernel.std() == pytest.approx(0.01, rel=0.03)
    assert np.abs(kernel).max() > 3 * 0.01  # a plain Gaussian, not truncated at 2 std
    assert models.get("mlp", init_stddev=0.5, seed=0).get_layer("logits").kernel.numpy().std() == (
        pytest.approx(0.5, rel=0.1)
    )
    for wa, wb in zip(a.weights, b.weights, strict=True):
        np.testing.assert_array_equal(wa.numpy(), wb.numpy())
    assert not np.array_equal(kernel, c.get_layer("hidden1_dense").kernel.numpy())
    # Distinct layers get distinct draws even with one seed.
    k2 = a.get_layer("hidden2_dense").kernel.numpy()
    assert not np.array_equal(k2, a.get_layer("hidden3_dense").kernel.numpy())


def test_preactivation_model_baseline_is_wu_plus_b():
    x, _ = _batch(16)
    model = models.get("mlp", batch_norm=False, seed=0)
    pre = mlp.preactivation_model(model)
    outs = [keras.ops.convert_to_numpy(t) for t in pre(x)]
    assert len(outs) == 3 and all(o.shape == (16, 100) for o in outs)
    u = x
    for i, out in enumerate(outs, start=1):
        dense = model.get_layer(f"hidden{i}_dense")
        expected = u @ dense.kernel.numpy() + dense.bias.numpy()
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
        u = 1 / (1 + np.exp(-expected))


@pytest.mark.parametrize("norm_layer", [None, KERAS_BN])
def test_preactivation_model_bn_training_view(norm_layer):
    x, _ = _batch(32)
    model = models.get("mlp", norm_layer=norm_layer, seed=0)
    norm = model.get_layer("hidden1_bn")
    norm.gamma.assign(np.linspace(0.5, 2.0, 100).astype("float32"))
    norm.beta.assign(np.linspace(-1.0, 1.0, 100).astype("float32"))
    pre = mlp.preactivation_model(model)
    first = keras.ops.convert_to_numpy(pre(x, training=True)[0])
    wu = x @ model.get_layer("hidden1_dense").kernel.numpy()
    x_hat = (wu - wu.mean(0)) / np.sqrt(wu.var(0) + norm.epsilon)  # Alg. 1: biased variance
    np.testing.assert_allclose(
        first, norm.gamma.numpy() * x_hat + norm.beta.numpy(), rtol=1e-4, atol=1e-4
    )
    assert pre.get_layer("hidden3_bn") is model.get_layer("hidden3_bn")  # shares weights


def test_preactivation_model_needs_named_layers():
    inputs = keras.Input((4,))
    other = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    with pytest.raises(ValueError, match="hidden1_sigmoid"):
        mlp.preactivation_model(other)


# The baseline at the default N(0, 0.01^2) init barely moves for hundreds of steps (vanishing
# sigmoid gradients, the point of Figure 1); a larger init lets this test see it learn.
@pytest.mark.parametrize("batch_norm, init_stddev", [(True, mlp.DEFAULT_INIT_STDDEV), (False, 0.1)])
def test_sgd_steps_reduce_the_loss_and_keras_round_trip(batch_norm, init_stddev, tmp_path):
    x, y = _batch(60)
    model = models.get("mlp", batch_norm=batch_norm, num_classes=4, init_stddev=init_stddev, seed=0)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=loss)
    losses = [float(model.train_on_batch(x, y)) for _ in range(100)]
    assert losses[-1] < 0.5 * losses[0], losses

    path = tmp_path / "mlp.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(loaded(x, training=False)),
        keras.ops.convert_to_numpy(model(x, training=False)),
    )
    assert len(mlp.preactivation_model(loaded).outputs) == 3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(init_stddev=0.0), "init_stddev"),
        (dict(hidden_units=()), "hidden_units"),
        (dict(num_classes=0), "num_classes"),
        (dict(seed=1.5), "seed"),
        (dict(norm_layer=3), "norm_layer"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        models.get("mlp", **kwargs)


def test_baseline_ignores_norm_layer_and_other_widths_work():
    model = models.get("mlp", batch_norm=False, norm_layer=KERAS_BN, hidden_units=(7, 5))
    assert [layer.name for layer in model.layers if "sigmoid" in layer.name] == [
        "hidden1_sigmoid",
        "hidden2_sigmoid",
    ]
    assert len(mlp.preactivation_model(model).outputs) == 2
