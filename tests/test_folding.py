"""Tests for keras_bn.folding: BN folded into Conv/Dense kernels, or turned into AffineChannel."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_bn import BatchNormalization as OurBN
from keras_bn.folding import AffineChannel, fold_batch_norm

L = keras.layers

BN_CLASSES = [L.BatchNormalization, OurBN]
BN_IDS = ["keras", "keras_bn"]


# --------------------------------------------------------------------------------------------
# Helpers


def _all_layers(model):
    """Every layer of `model`, recursing into sub-models."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)


def _bn_layers(model):
    return [layer for layer in _all_layers(model) if isinstance(layer, tuple(BN_CLASSES))]


def _count(model, cls):
    return sum(isinstance(layer, cls) for layer in _all_layers(model))


def _make_bn_stats_nontrivial(model, x, seed=0, train=True):
    """Random gamma/beta/moving statistics, then (if `train`) one SGD step in training mode.

    The training step moves the statistics (momentum 0.5) and all weights, so the folded
    weights come from a trained state rather than from initializers.
    """
    rng = np.random.default_rng(seed)
    for bn in _bn_layers(model):
        for var, low, high in [
            (bn.moving_mean, -1.0, 1.0),
            (bn.moving_variance, 0.3, 3.0),
            (bn.gamma, 0.5, 2.0),
            (bn.beta, -1.0, 1.0),
        ]:
            if var is not None:
                var.assign(rng.uniform(low, high, var.shape).astype(var.dtype))
    if not train:
        return
    optimizer = keras.optimizers.SGD(0.01)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(model(x, training=True)))
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))


def _infer(model, x):
    return np.asarray(model(x, training=False))


def _assert_same_outputs(model, folded, x, jit=False):
    if jit:  # TF has no channels_first Conv1D/Conv2D kernel on CPU; XLA has. One compilation.
        both = tf.function(lambda x: (model(x, training=False), folded(x)), jit_compile=True)
        ref, out = (np.asarray(y) for y in both(x))
    else:
        ref, out = _infer(model, x), _infer(folded, x)
    assert out.shape == ref.shape
    # 1e-5 relative to the output scale (elementwise rtol alone fails on entries near 0).
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def _random_input(shape, seed=1):
    return np.random.default_rng(seed).normal(size=(3, *shape)).astype("float32")


def _bn(bn_cls, **kwargs):
    return bn_cls(momentum=0.5, **kwargs)


# --------------------------------------------------------------------------------------------
# Folding into each layer type

# (id, layer factory, input shape without batch, data_format). Convs without bias in
# channels_last and with bias in channels_first, so both bias cases are covered.
_CL, _CF = "channels_last", "channels_first"
_PRODUCERS = [
    ("conv1d", lambda f, b: L.Conv1D(4, 3, data_format=f, use_bias=b), (9, 3), _CL),
    ("conv1d", lambda f, b: L.Conv1D(4, 3, data_format=f, use_bias=b), (3, 9), _CF),
    ("conv2d", lambda f, b: L.Conv2D(4, 3, data_format=f, use_bias=b), (7, 7, 3), _CL),
    ("conv2d", lambda f, b: L.Conv2D(4, 3, data_format=f, use_bias=b), (3, 7, 7), _CF),
    ("conv3d", lambda f, b: L.Conv3D(4, 2, data_format=f, use_bias=b), (4, 4, 4, 3), _CL),
    ("conv3d", lambda f, b: L.Conv3D(4, 2, data_format=f, use_bias=b), (3, 4, 4, 4), _CF),
    (
        "depthwise1d",
        lambda f, b: L.DepthwiseConv1D(3, depth_multiplier=2, data_format=f, use_bias=b),
        (9, 3),
        _CL,
    ),
    (
        "depthwise2d",
        lambda f, b: L.DepthwiseConv2D(3, depth_multiplier=2, data_format=f, use_bias=b),
        (7, 7, 3),
        _CL,
    ),
    (
        "depthwise2d",
        lambda f, b: L.DepthwiseConv2D(3, depth_multiplier=2, data_format=f, use_bias=b),
        (3, 7, 7),
        _CF,
    ),
    (
        "separable1d",
        lambda f, b: L.SeparableConv1D(4, 3, depth_multiplier=2, data_format=f, use_bias=b),
        (9, 3),
        _CL,
    ),
    (
        "separable2d",
        lambda f, b: L.SeparableConv2D(4, 3, depth_multiplier=2, data_format=f, use_bias=b),
        (7, 7, 3),
        _CL,
    ),
    (
        "separable2d",
        lambda f, b: L.SeparableConv2D(4, 3, depth_multiplier=2, data_format=f, use_bias=b),
        (3, 7, 7),
        _CF,
    ),
    ("dense", lambda f, b: L.Dense(5, use_bias=b), (6,), _CL),
    ("dense_rank3", lambda f, b: L.Dense(5, use_bias=b), (4, 6), _CF),  # use_bias=True
]
_NEEDS_XLA = {("conv1d", _CF), ("conv2d", _CF)}


@pytest.mark.parametrize("bn_cls", BN_CLASSES, ids=BN_IDS)
@pytest.mark.parametrize(
    "name, make_producer, shape, data_format",
    _PRODUCERS,
    ids=[f"{p[0]}-{p[3]}" for p in _PRODUCERS],
)
def test_folds_into_each_layer_type(bn_cls, name, make_producer, shape, data_format):
    use_bias = data_format == _CF
    channel_axis = 1 if data_format == _CF and not name.startswith("dense") else -1
    inputs = keras.Input(shape)
    producer = make_producer(data_format, use_bias)
    outputs = L.ReLU()(_bn(bn_cls, axis=channel_axis)(producer(inputs)))
    model = keras.Model(inputs, outputs)
    x = _random_input(shape)
    jit = (name, data_format) in _NEEDS_XLA
    # No eager training step where TF's CPU kernels lack channels_first (random stats only).
    _make_bn_stats_nontrivial(model, x, train=not jit)

    folded = fold_batch_norm(model)

    assert _bn_layers(folded) == []
    assert _count(folded, AffineChannel) == 0  # Folded, not merely converted.
    new_producer = folded.get_layer(producer.name)
    assert type(new_producer) is type(producer)
    assert new_producer.use_bias
    _assert_same_outputs(model, folded, x, jit=jit)


@pytest.mark.parametrize("bn_cls", BN_CLASSES, ids=BN_IDS)
@pytest.mark.parametrize("scale, center", [(False, True), (True, False), (False, False)])
def test_scale_or_center_false(bn_cls, scale, center):
    inputs = keras.Input((6, 6, 3))
    x = L.Conv2D(4, 3, use_bias=False)(inputs)
    x = _bn(bn_cls, scale=scale, center=center)(x)
    x = L.ReLU()(x)
    x = _bn(bn_cls, scale=scale, center=center)(x)  # Not foldable: becomes AffineChannel.
    model = keras.Model(inputs, L.Dense(3)(L.Flatten()(x)))
    x = _random_input((6, 6, 3))
    _make_bn_stats_nontrivial(model, x)

    folded = fold_batch_norm(model)

    assert _bn_layers(folded) == []
    assert _count(folded, AffineChannel) == 1
    _assert_same_outputs(model, folded, x)


# --------------------------------------------------------------------------------------------
# BN layers that do not fold become AffineChannel


@pytest.mark.parametrize("bn_cls", BN_CLASSES, ids=BN_IDS)
def test_unfoldable_bn_becomes_affine(bn_cls):
    inputs = keras.Input((6, 6, 3))
    a = _bn(bn_cls, name="bn_on_input")(inputs)
    b = L.Conv2D(4, 3, padding="same", activation="relu")(a)
    b = _bn(bn_cls, name="bn_after_activation")(b)
    c = L.Conv2D(4, 3, padding="same")(a)  # Two consumers: the BN and the Add below.
    c2 = _bn(bn_cls, name="bn_two_consumers")(c)
    x = L.Concatenate()([b, c2, L.Add()([c, c2])])
    x = _bn(bn_cls, name="bn_after_concat")(x)
    shared = _bn(bn_cls, name="bn_shared")  # Called twice.
    d = L.Conv2D(12, 1)(x)
    x = L.Add()([shared(d), shared(x)])
    x = L.Conv2D(5, 1)(x)
    out_bn = _bn(bn_cls, name="bn_folded")(x)
    model = keras.Model(inputs, out_bn)
    x = _random_input((6, 6, 3))
    _make_bn_stats_nontrivial(model, x)

    folded = fold_batch_norm(model)

    assert _bn_layers(folded) == []
    affine = {layer.name for layer in folded.layers if isinstance(layer, AffineChannel)}
    assert affine == {
        "bn_on_input",
        "bn_after_activation",
        "bn_two_consumers",
        "bn_after_concat",
        "bn_shared",
    }
    _assert_same_outputs(model, folded, x)


def test_bn_that_is_a_model_output_of_conv_also_output():
    # The conv output is a model output too: folding would change it, so the BN stays affine.
    inputs = keras.Input((5, 5, 2))
    c = L.Conv2D(3, 3)(inputs)
    model = keras.Model(inputs, [c, L.BatchNormalization()(c)])
    x = _random_input((5, 5, 2))
    _make_bn_stats_nontrivial(model, x)

    folded = fold_batch_norm(model)

    assert _count(folded, AffineChannel) == 1
    for out, ref in zip(folded(x), model(x, training=False), strict=True):
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_multi_axis_bn_becomes_affine():
    inputs = keras.Input((4, 5, 3))
    x = L.Conv2D(6, 1)(inputs)
    x = _bn(OurBN, axis=[2, 3])(x)  # Per (width, channel) statistics: not foldable.
    model = keras.Model(inputs, x)
    x = _random_input((4, 5, 3))
    _make_bn_stats_nontrivial(model, x)

    folded = fold_batch_norm(model)

    assert _bn_layers(folded) == []
    (affine,) = [layer for layer in folded.layers if isinstance(layer, AffineChannel)]
    assert tuple(affine.scale.shape) == (5, 6)
    _assert_same_outputs(model, folded, x)


# --------------------------------------------------------------------------------------------
# Model kinds


@pytest.mark.parametrize("bn_cls", BN_CLASSES, ids=BN_IDS)
def test_sequential(bn_cls):
    model = keras.Sequential(
        [
            keras.Input((10,)),
            L.Dense(8, use_bias=False),
            _bn(bn_cls),
            L.Activation("sigmoid"),
            _bn(bn_cls),
            L.Dense(4),
        ]
    )
    x = _random_input((10,))
    _make_bn_stats_nontrivial(model, x)

    folded = fold_batch_norm(model)

    assert isinstance(folded, keras.Sequential)
    assert [type(layer) for layer in folded.layers] == [
        L.Dense,
        L.Activation,
        AffineChannel,
        L.Dense,
    ]
    _assert_same_outputs(model, folded, x)


def test_sequential_built_without_input_layer():
    model = keras.Sequential([L.Conv1D(3, 2), L.BatchNormalization(axis=2), L.ReLU()])
    model.build((None, 6, 2))
    x = _random_input((6, 2))
    _make_bn_stats_nontrivial(model, x)

    folded = fold_batch_norm(model)

    assert _bn_layers(folded) == [] and _count(folded, AffineChannel) == 0
    _assert_same_outputs(model, folded, x)


@pytest.mark.parametrize("bn_cls", BN_CLASSES, ids=BN_IDS)
def test_nested_models_fold_recursively(bn_cls):
    block = keras.Sequential(
        [keras.Input((6, 6, 4)), L.Conv2D(4, 3, padding="same"), _bn(bn_cls), L.ReLU()],
        name="block",
    )
    inner_in = keras.Input((6, 6, 4))
    inner = keras.Model(inner_in, L.Conv2D(4, 1)(block(inner_in)), name="inner")
    inputs = keras.Input((6, 6, 3))
    x = L.Conv2D(4, 1)(inputs)
    x = inner(x)
    x = _bn(bn_cls, name="across_boundary")(x)  # Its producer is inside `inner`.
    model = keras.Model(inputs, x)
    x = _random_input((6, 6, 3))
    _make_bn_stats_nontrivial(model, x)

    folded = fold_batch_norm(model)

    assert _bn_layers(folded) == []
    assert [layer.name for layer in _all_layers(folded) if isinstance(layer, AffineChannel)] == [
        "across_boundary"
    ]
    assert folded.get_layer("inner") is not inner
    _assert_same_outputs(model, folded, x)


def test_original_model_is_unchanged():
    inputs = keras.Input((6, 6, 3))
    x = L.Conv2D(4, 3, use_bias=False)(inputs)
    x = L.BatchNormalization()(x)
    x = L.ReLU()(L.BatchNormalization()(L.Dense(5)(L.Flatten()(x))))
    model = keras.Model(inputs, x)
    x = _random_input((6, 6, 3))
    _make_bn_stats_nontrivial(model, x)
    layers = list(model.layers)
    weights = [np.array(w) for w in model.get_weights()]
    ref = _infer(model, x)

    folded = fold_batch_norm(model)

    assert model.layers == layers
    assert not model.get_layer(layers[1].name).use_bias
    for before, after in zip(weights, model.get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)
    np.testing.assert_array_equal(_infer(model, x), ref)
    # The folded model owns its variables: changing them leaves the original alone.
    original_ids = {id(v) for v in model.weights}
    assert not any(id(v) in original_ids for v in folded.weights)
    for v in folded.weights:
        v.assign(np.zeros(v.shape, v.dtype))
    np.testing.assert_array_equal(_infer(model, x), ref)


def test_folded_weights_follow_the_formula():
    inputs = keras.Input((4,))
    dense = L.Dense(3)
    bn = L.BatchNormalization(epsilon=0.01)
    model = keras.Model(inputs, bn(dense(inputs)))
    _make_bn_stats_nontrivial(model, _random_input((4,)))

    folded = fold_batch_norm(model).get_layer(dense.name)

    w, b = (np.asarray(v, np.float64) for v in dense.get_weights())
    gamma, beta, mean, var = (np.asarray(v, np.float64) for v in bn.get_weights())
    inv = gamma / np.sqrt(var + 0.01)
    np.testing.assert_allclose(np.asarray(folded.kernel), w * inv, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(folded.bias), beta + (b - mean) * inv, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Serialization


def _small_folded_model():
    inputs = keras.Input((6, 6, 3))
    x = L.SeparableConv2D(4, 3, use_bias=False)(inputs)
    x = L.BatchNormalization()(x)
    x = L.ReLU()(x)
    x = L.BatchNormalization()(x)
    model = keras.Model(inputs, L.GlobalAveragePooling2D()(x))
    x = _random_input((6, 6, 3))
    _make_bn_stats_nontrivial(model, x)
    return model, fold_batch_norm(model), x


def test_export_savedmodel(tmp_path):
    model, folded, x = _small_folded_model()
    path = os.fspath(tmp_path / "folded")

    folded.export(path, verbose=False)
    reloaded = tf.saved_model.load(path)  # Keep a reference: `serve` needs its variables.
    served = reloaded.serve(tf.constant(x))

    np.testing.assert_allclose(np.asarray(served), _infer(model, x), rtol=1e-5, atol=1e-6)


def test_keras_file_roundtrip(tmp_path):
    model, folded, x = _small_folded_model()
    path = os.fspath(tmp_path / "folded.keras")

    folded.save(path)
    loaded = keras.saving.load_model(path)

    assert _count(loaded, AffineChannel) == 1
    np.testing.assert_allclose(_infer(loaded, x), _infer(model, x), rtol=1e-5, atol=1e-6)


def test_affine_channel_config_roundtrip():
    layer = AffineChannel(axis=[1, 3], name="a")
    restored = AffineChannel.from_config(layer.get_config())
    assert restored.axis == [1, 3] and restored.name == "a"
    with pytest.raises(ValueError, match="axis"):
        AffineChannel(axis="last")


# --------------------------------------------------------------------------------------------
# Errors


def test_rejects_non_models():
    with pytest.raises(ValueError, match="must be a keras.Model"):
        fold_batch_norm(L.Dense(3))


def test_rejects_unbuilt_model():
    model = keras.Sequential([L.Dense(3), L.BatchNormalization()])
    with pytest.raises(ValueError, match="not built"):
        fold_batch_norm(model)


def test_rejects_subclassed_model():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = L.Dense(3)
            self.bn = L.BatchNormalization()

        def call(self, x, training=None):
            return self.bn(self.dense(x), training=training)

    model = Net()
    model(np.zeros((1, 4), "float32"))
    with pytest.raises(ValueError, match="subclassed"):
        fold_batch_norm(model)


# --------------------------------------------------------------------------------------------
# The zoo


def test_bn_inception_folds_completely():
    from keras_bn import models as zoo  # keras_bn itself never imports the zoo.

    model = zoo.get("bn_inception", depth_multiplier=0.25, input_shape=(96, 96, 3), num_classes=10)
    rng = np.random.default_rng(0)
    n_bn = len(_bn_layers(model))
    for bn in _bn_layers(model):  # Mild random statistics: 69 layers deep, nothing explodes.
        for var, low, high in [
            (bn.moving_mean, -0.2, 0.2),
            (bn.moving_variance, 0.5, 2.0),
            (bn.gamma, 0.8, 1.25),
            (bn.beta, -0.2, 0.2),
        ]:
            if var is not None:
                var.assign(rng.uniform(low, high, var.shape).astype(var.dtype))

    folded = fold_batch_norm(model)

    assert n_bn > 50
    assert _bn_layers(folded) == []
    assert _count(folded, AffineChannel) == 0  # Figure 5: every BN follows a conv.
    _assert_same_outputs(model, folded, _random_input((96, 96, 3)))


def test_custom_layer_with_bn_inside_is_copied_with_a_warning():
    class Block(L.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = L.Dense(3)
            self.bn = L.BatchNormalization()

        def call(self, x, training=None):
            return self.bn(self.dense(x), training=training)

    inputs = keras.Input((4,))
    model = keras.Model(inputs, Block()(inputs))
    x = _random_input((4,))
    _make_bn_stats_nontrivial(model, x)

    with pytest.warns(UserWarning, match="cannot rewrite"):
        folded = fold_batch_norm(model)

    _assert_same_outputs(model, folded, x)


def test_compiled_model_stays_compiled():
    model = keras.Sequential([keras.Input((3,)), L.Dense(2), L.BatchNormalization()])
    model.compile(optimizer="sgd", loss="mse")
    assert fold_batch_norm(model).compiled
