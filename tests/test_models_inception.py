"""Tests for keras_bn.models.inception: BN-Inception, the baseline Inception, BN-x5-Sigmoid."""

import functools

import keras
import numpy as np
import pytest

import keras_bn
from keras_bn import models
from keras_bn.models import inception
from keras_bn.models.lrn import LocalResponseNormalization

KERAS_BN = keras.layers.BatchNormalization
NORM_TYPES = (KERAS_BN, keras_bn.models._common.default_norm_layer())
SMALL = dict(depth_multiplier=0.1, input_shape=(75, 75, 3), num_classes=4, seed=0)
CONV_TYPES = (keras.layers.Conv2D, keras.layers.SeparableConv2D)


def _counts(model):
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    non_trainable = sum(int(np.prod(w.shape)) for w in model.non_trainable_weights)
    return trainable, non_trainable


def _layers_of(model, types):
    return [layer for layer in model.layers if isinstance(layer, types)]


def _conv_unit_names(model):
    return [layer.name[: -len("_conv")] for layer in _layers_of(model, CONV_TYPES)]


@functools.cache
def _small(name, **kwargs):
    """A small model shared by the topology tests (they never change its weights)."""
    return models.get(name, **{**SMALL, **kwargs})


def _synthetic_batch(n=8, size=75, classes=4, seed=0):
    """Images whose class sets their mean colour, plus noise: learnable within a few steps."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    colours = rng.uniform(-1, 1, size=(classes, 1, 1, 3))
    images = colours[labels] + 0.5 * rng.normal(size=(n, size, size, 3))
    return images.astype("float32"), labels.astype("int32")


# ---------------------------------------------------------------- full size: shapes and counts


@pytest.fixture(scope="module")
def full_bn_inception():
    return models.get("bn_inception")


def test_end_point_shapes_224(full_bn_inception):
    model = full_bn_inception
    for end_point in inception.END_POINTS:
        shape = tuple(model.get_layer(end_point).output.shape[1:])
        assert shape == inception.END_POINT_SHAPES_224[end_point], end_point
    # The list: 28x28x256, 28x28x320, 14x14x576 (x5), 7x7x1024 (x3).
    mixed = [tuple(model.get_layer(n).output.shape[1:]) for n in inception.PAPER_NAMES]
    assert mixed == [(28, 28, 256), (28, 28, 320)] + [(14, 14, 576)] * 5 + [(7, 7, 1024)] * 3
    assert model.output_shape == (None, 1000)
    assert sorted(inception.PAPER_NAMES) == [n for n in inception.END_POINTS if "Mixed" in n]


def test_bn_inception_parameter_count_matches_the_figure5_table(full_bn_inception):
    # Arithmetic over Figure 5's widths: slim widths, separable stem, gamma + beta, 1000 classes.
    assert _counts(full_bn_inception) == (11_188_288, 19_904)
    assert full_bn_inception.count_params() == 11_188_288 + 19_904


@pytest.mark.parametrize(
    "name, kwargs, expected",
    [
        # Arithmetic over Figure 5's widths.
        ("bn_inception", dict(separable_stem=False), (11_194_984, 19_904)),
        ("bn_inception", dict(paper_widths=True), (11_278_528, 20_032)),
        ("bn_inception", dict(bn_scale=False, num_classes=1001), (11_179_361, 19_904)),
        # Measured, documented in the module docstring: the baseline has conv biases, no BN.
        ("inception", dict(), (11_178_336, 0)),
        ("bn_inception", dict(norm_layer=KERAS_BN), (11_188_288, 19_904)),
    ],
)
def test_parameter_counts(name, kwargs, expected):
    assert _counts(models.get(name, **kwargs)) == expected


def test_paper_widths_give_608_and_1056_channels():
    model = models.get("bn_inception", paper_widths=True, norm_layer=KERAS_BN)
    shapes = {n: tuple(model.get_layer(n).output.shape[1:]) for n in inception.END_POINTS}
    assert shapes["Mixed_4c"] == (14, 14, 576)
    assert shapes["Mixed_4d"] == (14, 14, 608)
    assert shapes["Mixed_4e"] == (14, 14, 608)
    assert shapes["Mixed_5a"] == (7, 7, 1056)
    assert shapes["Mixed_5b"] == shapes["Mixed_5c"] == (7, 7, 1024)


# ---------------------------------------------------------------- topology (small models)


def test_bn_before_every_nonlinearity_and_no_conv_bias():
    model = _small("bn_inception")
    units = _conv_unit_names(model)
    assert len(units) == 69  # stem 1 + 2, 8 modules x 7 units, 2 stride-2 modules x 5 units
    assert len(_layers_of(model, NORM_TYPES)) == 69
    for unit in units:
        conv = model.get_layer(f"{unit}_conv")
        norm = model.get_layer(f"{unit}_bn")
        act = model.get_layer(unit)
        assert not conv.use_bias, unit
        assert norm.input is conv.output and act.input is norm.output, unit
        assert act.get_config()["activation"] == "relu"
        assert norm.get_config()["scale"] and norm.get_config()["center"]
    assert not _layers_of(model, (LocalResponseNormalization, keras.layers.Dropout))
    # Stride-2 modules have no 1x1 branch and pass a 3x3/2 max pool through.
    assert isinstance(
        model.get_layer("Mixed_4a_Branch_2_MaxPool_1a_3x3"), keras.layers.MaxPooling2D
    )
    assert isinstance(
        model.get_layer("Mixed_5c_Branch_3_MaxPool_0a_3x3"), keras.layers.MaxPooling2D
    )
    assert isinstance(
        model.get_layer("Mixed_5b_Branch_3_AvgPool_0a_3x3"), keras.layers.AveragePooling2D
    )
    stem = model.get_layer("Conv2d_1a_7x7_conv")
    assert isinstance(stem, keras.layers.SeparableConv2D)
    assert stem.depth_multiplier == 5  # slim: min(depth(64) // 3, 8) with depth(64) = 16


def test_full_width_stem_has_depth_multiplier_8(full_bn_inception):
    stem = full_bn_inception.get_layer("Conv2d_1a_7x7_conv")
    assert stem.depth_multiplier == 8 and stem.kernel_size == (7, 7) and stem.strides == (2, 2)


def test_sigmoid_variant():
    model = _small("bn_inception_sigmoid")
    activations = _layers_of(model, keras.layers.Activation)
    assert len(activations) == 69
    assert {a.get_config()["activation"] for a in activations} == {"sigmoid"}
    assert all(n.get_config()["scale"] for n in _layers_of(model, NORM_TYPES))
    assert model.count_params() == _small("bn_inception").count_params()


def test_baseline_inception_topology():
    model = _small("inception")
    assert not _layers_of(model, NORM_TYPES)
    assert all(conv.use_bias for conv in _layers_of(model, CONV_TYPES))
    lrn = _layers_of(model, LocalResponseNormalization)
    assert [layer.name for layer in lrn] == ["MaxPool_2a_3x3_lrn", "Conv2d_2c_3x3_lrn"]
    assert model.get_layer("MaxPool_2a_3x3_lrn").input is model.get_layer("MaxPool_2a_3x3").output
    (dropout,) = _layers_of(model, keras.layers.Dropout)
    assert dropout.rate == pytest.approx(0.4)
    assert model.get_layer("Logits").input is dropout.output
    # The switches work on both nets (BN-Baseline keeps them; BN-x5 drops them).
    bn_baseline = models.get("bn_inception", use_lrn=True, dropout_rate=0.4, **SMALL)
    assert len(_layers_of(bn_baseline, LocalResponseNormalization)) == 2
    assert len(_layers_of(bn_baseline, keras.layers.Dropout)) == 1
    plain = models.get("inception", use_lrn=False, dropout_rate=0.0, **SMALL)
    assert not _layers_of(plain, (LocalResponseNormalization, keras.layers.Dropout))


def test_norm_layer_keras_builds_same_topology():
    ours = _small("bn_inception")
    theirs = _small("bn_inception", norm_layer=KERAS_BN)

    def signature(model):
        rows = []
        for layer in model.layers:
            kind = "norm" if isinstance(layer, NORM_TYPES) else type(layer).__name__
            rows.append((layer.name, kind, [tuple(w.shape) for w in layer.weights]))
        return rows

    assert signature(ours) == signature(theirs)
    assert _counts(ours) == _counts(theirs)
    assert all(isinstance(n, KERAS_BN) for n in _layers_of(theirs, NORM_TYPES))


def test_bn_arguments_pass_through():
    model = models.get("bn_inception", bn_momentum=0.9997, bn_epsilon=1e-5, bn_scale=False, **SMALL)
    norms = _layers_of(model, NORM_TYPES)
    assert {n.momentum for n in norms} == {0.9997}
    assert {n.epsilon for n in norms} == {1e-5}
    assert all(n.gamma is None for n in norms)


def test_depth_multiplier_follows_slim_rule():
    model = models.get("bn_inception", depth_multiplier=0.25, input_shape=(96, 96, 3))
    # Mixed_3b: max(int(d * 0.25), 16) for 64, 64, 96, 32 -> 16 + 16 + 24 + 16.
    assert model.get_layer("Mixed_3b").output.shape[-1] == 72
    assert model.get_layer("Conv2d_2c_3x3").output.shape[-1] == 48
    wide = models.get("bn_inception", depth_multiplier=0.25, min_depth=32, input_shape=(96, 96, 3))
    assert wide.get_layer("Mixed_3b").output.shape[-1] == 32 * 3 + 32


def test_weight_decay_is_slim_convention_on_kernels_only():
    s = 1e-3
    model = models.get("bn_inception", weight_decay=s, norm_layer=KERAS_BN, **SMALL)
    kernels = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.SeparableConv2D):
            kernels += [layer.depthwise_kernel, layer.pointwise_kernel]
        elif isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            kernels.append(layer.kernel)
    assert len(kernels) == 69 + 1 + 1  # convs, the separable stem's second kernel, logits
    expected = s / 2 * sum(float(np.sum(np.square(k.numpy()))) for k in kernels)
    actual = float(sum(keras.ops.convert_to_numpy(loss) for loss in model.losses))
    assert len(model.losses) == len(kernels)
    np.testing.assert_allclose(actual, expected, rtol=1e-5)
    assert not models.get("bn_inception", weight_decay=0.0, **SMALL).losses


# ---------------------------------------------------------------- input sizes and errors


def test_any_input_from_75_up():
    model = models.get(
        "bn_inception", depth_multiplier=0.1, num_classes=3, input_shape=(None, None, 3)
    )
    for shape in [(2, 75, 75, 3), (2, 80, 131, 3)]:
        assert tuple(model(np.zeros(shape, "float32"), training=False).shape) == (2, 3)
    assert models.get("inception", **{**SMALL, "input_shape": (75, 200, 3)}).output_shape == (
        None,
        4,
    )


@pytest.mark.parametrize("name", ["bn_inception", "inception", "bn_inception_sigmoid"])
@pytest.mark.parametrize("shape", [(74, 74, 3), (75, 32, 3), (224, 224)])
def test_small_or_malformed_input_raises(name, shape):
    with pytest.raises(ValueError, match="input_shape"):
        models.get(name, input_shape=shape)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(depth_multiplier=0.0), "depth_multiplier"),
        (dict(min_depth=0), "min_depth"),
        (dict(activation="nope"), "activation"),
        (dict(dropout_rate=1.0), "dropout_rate"),
        (dict(weight_decay=-1.0), "weight_decay"),
        (dict(norm_layer="batch_norm"), "norm_layer"),
        (dict(final_endpoint="Mixed_6a"), "final_endpoint` must be one of Conv2d_1a_7x7"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        models.get("bn_inception", **{**SMALL, **kwargs})


@pytest.mark.parametrize("name", ["bn_inception", "inception"])
def test_final_endpoint_stops_the_network_there_with_the_same_layers(name):
    full = _small(name)
    short = models.get(name, **SMALL, final_endpoint="Mixed_3b")
    names = [layer.name for layer in short.layers]
    assert names[names.index("Mixed_3b") + 1] == "AvgPool_1a"
    assert "Mixed_3c" not in names and short.output_shape == (None, 4)
    assert short.get_layer("Logits").kernel.shape[0] == full.get_layer("Mixed_3b").output.shape[-1]
    # The same layers up to the end point, built in the same order: the same initial weights.
    for layer in short.layers:
        if layer.name != "Logits":
            for a, b in zip(layer.weights, full.get_layer(layer.name).weights, strict=True):
                np.testing.assert_array_equal(a.numpy(), b.numpy())
    stem = models.get(name, **SMALL, final_endpoint="Conv2d_1a_7x7")
    assert stem.get_layer("AvgPool_1a").input.shape[1:] == (38, 38, 16)


def test_seed_makes_weights_reproducible():
    a = _small("bn_inception")
    b = models.get("bn_inception", **SMALL)
    c = models.get("bn_inception", **{**SMALL, "seed": 1})
    for wa, wb in zip(a.weights, b.weights, strict=True):
        np.testing.assert_array_equal(wa.numpy(), wb.numpy())
    kernel = "Mixed_3b_Branch_0_Conv2d_0a_1x1_conv"
    assert not np.array_equal(
        a.get_layer(kernel).kernel.numpy(), c.get_layer(kernel).kernel.numpy()
    )


# ---------------------------------------------------------------- training and saving


def _train(name, steps, learning_rate):
    images, labels = _synthetic_batch()
    model = models.get(name, **SMALL)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    # Eager steps: tracing this 230-layer graph costs far more than a few steps on 2 CPU cores.
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss, run_eagerly=True)
    before = float(loss(labels, model(images, training=False)))
    losses = [float(model.train_on_batch(images, labels)) for _ in range(steps)]
    after = float(loss(labels, model(images, training=False)))
    return model, images, losses, before, after


@pytest.fixture(scope="module", params=["bn_inception", "bn_inception_sigmoid", "inception"])
def trained(request):
    if request.param == "inception":
        return request.param, *_train(request.param, steps=5, learning_rate=1e-3)
    return request.param, *_train(request.param, steps=3, learning_rate=3e-3)


def test_few_steps_reduce_the_loss(trained):
    name, _, _, losses, before, after = trained
    assert all(np.isfinite(losses))
    if name == "inception":
        # Dropout makes its training losses noisy: compare the inference-mode loss instead.
        assert after < before - 0.05, (before, after)
    else:
        # Inference uses moving statistics that barely moved in 3 steps: use training losses.
        assert losses[-1] < 0.75 * losses[0], losses


def test_keras_file_round_trip(trained, tmp_path):
    name, model, images, _, _, _ = trained
    path = tmp_path / f"{name}.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert [type(layer) for layer in loaded.layers] == [type(layer) for layer in model.layers]
    for wa, wb in zip(model.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(wa.numpy(), wb.numpy())
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(loaded(images, training=False)),
        keras.ops.convert_to_numpy(model(images, training=False)),
    )


def test_mixed_precision_gives_float32_logits():
    images, _ = _synthetic_batch(n=2)
    previous = keras.config.dtype_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        for name in ("bn_inception", "inception"):  # the baseline has the LRN layers
            model = models.get(name, **SMALL)
            assert model.get_layer("Conv2d_2c_3x3_conv").compute_dtype == "float16"
            logits = model(images, training=True)
            assert keras.backend.standardize_dtype(logits.dtype) == "float32"
            assert np.all(np.isfinite(keras.ops.convert_to_numpy(logits)))
    finally:
        keras.mixed_precision.set_global_policy(previous)
