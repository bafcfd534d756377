"""keras_bn.convert_model: every Keras BN of an existing model becomes ours, weights kept."""

import json
import os
import warnings

import keras
import numpy as np
import pytest
from conftest import run_python
from test_folding import _all_layers, _make_bn_stats_nontrivial

import keras_bn

L = keras.layers
APPLICATIONS = ["MobileNetV2", "ResNet50", "EfficientNetB0"]
# Training under MirroredStrategy costs 20-40 s per net (model.fit traces the step on both
# replicas), so CI trains one; KERAS_BN_CONVERT_NETS=MobileNetV2,ResNet50,EfficientNetB0 all.
MIRRORED_NETS = os.environ.get("KERAS_BN_CONVERT_NETS", "MobileNetV2").split(",")
# A Keras config key of every BN argument that is not about Batch Renormalization.
SHARED_KEYS = [
    "name", "trainable", "dtype", "axis", "momentum", "epsilon", "center", "scale",
    "beta_initializer", "gamma_initializer", "moving_mean_initializer",
    "moving_variance_initializer", "beta_regularizer", "gamma_regularizer", "beta_constraint",
    "gamma_constraint", "synchronized",
]  # fmt: skip


def _bns(model, cls):
    return [layer for layer in _all_layers(model) if isinstance(layer, cls)]


def _application(name):
    return getattr(keras.applications, name)(
        weights=None, input_shape=(32, 32, 3), classes=10, classifier_activation=None
    )


def _snapshot(model):
    return [
        (type(layer), [w.numpy().copy() for w in layer.weights]) for layer in _all_layers(model)
    ]


def _assert_unchanged(model, snapshot):
    now = _snapshot(model)
    assert [kind for kind, _ in now] == [kind for kind, _ in snapshot]
    for (_, weights), (_, before) in zip(now, snapshot, strict=True):
        for w, b in zip(weights, before, strict=True):
            np.testing.assert_array_equal(w, b)


def _max_abs_difference(model, converted, x):
    return float(np.abs(np.asarray(model(x, training=False)) - converted(x, training=False)).max())


def _nested_model():
    """Functional model holding a nested Functional and a nested Sequential, one shared Dense."""
    inner_in = keras.Input((6, 6, 4))
    h = L.Conv2D(5, 3, padding="same", use_bias=False)(inner_in)
    h = L.BatchNormalization(axis=-1, epsilon=1e-2, name="inner_bn")(h)
    inner = keras.Model(inner_in, L.ReLU()(h), name="inner")
    head = keras.Sequential(
        [L.GlobalAveragePooling2D(), L.Dense(7), L.BatchNormalization(momentum=0.5)], name="head"
    )
    shared = L.Dense(3, name="shared")
    inputs = keras.Input((6, 6, 4), name="image")
    x = L.BatchNormalization(center=False, name="input_bn")(inputs)
    y = head(inner(x))
    outputs = L.Add()([shared(y), shared(L.BatchNormalization(scale=False)(y))])
    return keras.Model(inputs, outputs, name="outer")


# --------------------------------------------------------------------------------------------
# Same function, same configuration, same weights


@pytest.mark.parametrize("name", APPLICATIONS)
def test_applications_net_gives_the_same_inference_outputs(name):
    model = _application(name)
    x = np.random.default_rng(1).normal(size=(4, 32, 32, 3)).astype("float32")
    _make_bn_stats_nontrivial(model, x, train=False)
    snapshot = _snapshot(model)
    converted = keras_bn.convert_model(model, synchronized=True)

    # Ours subclasses Keras's layer: every BN layer of the result must be exactly ours.
    assert {type(bn) for bn in _bns(converted, L.BatchNormalization)} == {
        keras_bn.BatchNormalization
    }
    ours = _bns(converted, keras_bn.BatchNormalization)
    assert len(ours) == len(_bns(model, L.BatchNormalization)) > 40
    assert all(bn.synchronized for bn in ours)
    assert _max_abs_difference(model, converted, x) <= 1e-5
    assert {id(v) for v in converted.weights}.isdisjoint(id(v) for v in model.weights)
    _assert_unchanged(model, snapshot)


def test_nested_models_keep_configuration_weights_and_sharing(tmp_path):
    model = _nested_model()
    x = np.random.default_rng(2).normal(2.0, 3.0, (5, 6, 6, 4)).astype("float32")
    _make_bn_stats_nontrivial(model, x)
    model.get_layer("inner").trainable = False  # a frozen backbone stays frozen
    snapshot = _snapshot(model)
    converted = keras_bn.convert_model(model)
    assert not converted.get_layer("inner").trainable
    assert len(converted.trainable_weights) == len(model.trainable_weights)

    assert converted.name == "outer" and converted.input.name == "image"
    assert [layer.name for layer in converted.layers] == [layer.name for layer in model.layers]
    assert isinstance(converted.get_layer("head"), keras.Sequential)
    shared = [layer for layer in converted.layers if layer.name == "shared"]
    assert len(shared) == 1 and len(shared[0]._inbound_nodes) == 2  # still one shared layer
    originals, converts = (_bns(m, (L.BatchNormalization, keras_bn.BatchNormalization))
                           for m in (model, converted))  # fmt: skip
    assert len(converts) == len(originals) == 4
    for keras_bn_layer, ours in zip(originals, converts, strict=True):
        assert type(ours) is keras_bn.BatchNormalization
        keras_config, our_config = keras_bn_layer.get_config(), ours.get_config()
        assert {k: our_config[k] for k in SHARED_KEYS} == {k: keras_config[k] for k in SHARED_KEYS}
        assert our_config["unbiased_variance"] is True  # our default: Keras's config has none
        ours_by_name = {w.name: w.numpy() for w in ours.weights}
        for w in keras_bn_layer.weights:
            np.testing.assert_array_equal(ours_by_name[w.name], w.numpy())
    assert _max_abs_difference(model, converted, x) <= 1e-5
    _assert_unchanged(model, snapshot)
    converted.save(tmp_path / "converted.keras")
    reloaded = keras.models.load_model(tmp_path / "converted.keras")
    assert _max_abs_difference(converted, reloaded, x) == 0.0


def test_configuration_of_every_kind_is_carried():
    bn = L.BatchNormalization(
        axis=1, momentum=0.9, epsilon=1e-4, center=False,
        gamma_initializer="random_uniform", moving_variance_initializer="zeros",
        gamma_regularizer=keras.regularizers.L2(1e-3), gamma_constraint="non_neg",
        trainable=False, dtype="mixed_float16", name="frozen",
    )  # fmt: skip
    model = keras.Sequential([keras.Input((3, 4)), bn])
    converted = keras_bn.convert_model(model, unbiased_variance=False)
    ours = converted.layers[0]
    config = ours.get_config()
    assert {k: config[k] for k in SHARED_KEYS} == {k: bn.get_config()[k] for k in SHARED_KEYS}
    assert config["unbiased_variance"] is False
    assert not ours.trainable and ours.compute_dtype == "float16" and ours.beta is None
    x = np.random.default_rng(3).normal(size=(2, 3, 4)).astype("float32")
    np.testing.assert_array_equal(model(x), converted(x))


def test_keras_training_step_is_reproduced_with_keras_variance_rule():
    """Converted with unbiased_variance=False, one training step updates what Keras updates."""
    model = keras.Sequential(
        [keras.Input((8,)), L.Dense(6), L.BatchNormalization(momentum=0.8), L.Dense(1)]
    )
    x = np.random.default_rng(4).normal(1.0, 2.0, (32, 8)).astype("float32")
    y = np.random.default_rng(5).normal(size=(32, 1)).astype("float32")
    _make_bn_stats_nontrivial(model, x, train=False)
    converted = keras_bn.convert_model(model, unbiased_variance=False)
    for m in (model, converted):
        m.compile(keras.optimizers.SGD(0.1), "mse")
        m.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    for ref, got in zip(model.weights, converted.weights, strict=True):
        np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-5, atol=1e-6)


def test_model_without_bn_is_an_equivalent_copy():
    model = keras.Sequential([keras.Input((4,)), L.Dense(3), L.Dropout(0.5), L.Dense(2)])
    converted = keras_bn.convert_model(model, synchronized=True)
    assert converted is not model and isinstance(converted, keras.Sequential)
    assert [type(layer) for layer in converted.layers] == [type(layer) for layer in model.layers]
    for ref, got in zip(model.weights, converted.weights, strict=True):
        assert ref is not got
        np.testing.assert_array_equal(got.numpy(), ref.numpy())


def test_unbuilt_sequential_converts_and_builds_later():
    model = keras.Sequential([L.Dense(3), L.BatchNormalization()])
    converted = keras_bn.convert_model(model)
    assert not converted.built and isinstance(converted.layers[1], keras_bn.BatchNormalization)
    assert converted(np.ones((2, 4), "float32")).shape == (2, 3)


# --------------------------------------------------------------------------------------------
# The way back: to="keras"


def test_way_back_keeps_structure_weights_and_outputs(tmp_path):
    model = _nested_model()
    x = np.random.default_rng(2).normal(2.0, 3.0, (5, 6, 6, 4)).astype("float32")
    _make_bn_stats_nontrivial(model, x)
    model.get_layer("inner").trainable = False
    ours = keras_bn.convert_model(model, momentum=None)
    ours(x, training=True)  # the counts move to 2 (the frozen inner model's stay at 1)
    with pytest.warns(UserWarning, match="cannot carry") as caught:
        back = keras_bn.convert_model(ours, to="keras", momentum=0.9)
    (message,) = [str(w.message) for w in caught if w.category is UserWarning]
    assert "momentum=None" not in message  # the override gives every layer a momentum
    assert "- unbiased_variance=True (" in message and "all 4 converted layers" in message

    bns = _bns(back, L.BatchNormalization)
    assert len(bns) == 4 and {type(bn) for bn in bns} == {L.BatchNormalization}
    assert {bn.momentum for bn in bns} == {0.9}
    assert [layer.name for layer in back.layers] == [layer.name for layer in model.layers]
    assert not back.get_layer("inner").trainable
    shared = [layer for layer in back.layers if layer.name == "shared"]
    assert len(shared) == 1 and len(shared[0]._inbound_nodes) == 2
    for original, keras_layer in zip(_bns(ours, L.BatchNormalization), bns, strict=True):
        ours_by_name = {w.name: w.numpy() for w in original.weights}
        assert [w.name for w in keras_layer.weights] == [
            w.name for w in original.weights if w.name != "moving_count"
        ]
        for w in keras_layer.weights:
            np.testing.assert_array_equal(w.numpy(), ours_by_name[w.name])
    assert _max_abs_difference(ours, back, x) <= 1e-6 * max(1.0, np.abs(back(x)).max())
    back.save(tmp_path / "back.keras")
    config = json.dumps(back.get_config())
    assert "keras_bn" not in config and "unbiased_variance" not in config


def test_way_back_of_keras_layers_is_a_copy_without_warning():
    model = keras.Sequential([keras.Input((3,)), L.Dense(2), L.BatchNormalization(epsilon=0.1)])
    _make_bn_stats_nontrivial(model, None, train=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        back = keras_bn.convert_model(model, to="keras")
    assert type(back.layers[1]) is L.BatchNormalization and back.layers[1].epsilon == 0.1
    x = np.random.default_rng(9).normal(size=(4, 3)).astype("float32")
    np.testing.assert_array_equal(model(x), back(x))


# --------------------------------------------------------------------------------------------
# Overrides, moving_count, layers that are already ours


def test_momentum_none_counts_the_keras_statistics_as_one_batch():
    model = keras.Sequential([keras.Input((3,)), L.BatchNormalization()])
    _make_bn_stats_nontrivial(model, None, train=False)
    converted = keras_bn.convert_model(model, momentum=None)
    ours = converted.layers[0]
    assert ours.momentum is None
    np.testing.assert_array_equal(ours.moving_count.numpy(), np.ones(3))
    copied = model.layers[0].moving_mean.numpy()
    np.testing.assert_array_equal(ours.moving_mean.numpy(), copied)
    x = np.random.default_rng(6).normal(size=(10, 3)).astype("float32")
    ours(x, training=True)  # the average of the copied statistics and this batch (count 1 -> 2)
    np.testing.assert_allclose(ours.moving_mean.numpy(), (copied + x.mean(0)) / 2, rtol=1e-5)
    np.testing.assert_array_equal(ours.moving_count.numpy(), np.full(3, 2.0))


def test_our_layers_get_the_overrides_and_keep_their_count():
    model = keras.Sequential(
        [keras.Input((3,)), keras_bn.BatchNormalization(momentum=None, fused=False)]
    )
    model.layers[0](np.random.default_rng(7).normal(size=(4, 3)).astype("float32"), training=True)
    counted = keras_bn.convert_model(model, synchronized=True).layers[0]
    assert counted.synchronized and counted.momentum is None and counted.fused is False
    np.testing.assert_array_equal(counted.moving_count.numpy(), np.ones(3))
    with_momentum = keras_bn.convert_model(model, momentum=0.9).layers[0]
    assert with_momentum.moving_count is None  # the count is meaningless for momentum 0.9
    np.testing.assert_array_equal(
        with_momentum.moving_variance.numpy(), model.layers[0].moving_variance.numpy()
    )


@pytest.mark.parametrize("name", ["sync", "name"])
def test_override_that_is_not_a_layer_argument_is_refused(name):
    model = keras.Sequential([keras.Input((3,)), L.BatchNormalization()])
    with pytest.raises(ValueError, match=f"'{name}' is not an argument.*Accepted: .*synchronized"):
        keras_bn.convert_model(model, **{name: True})


def test_invalid_override_value_names_the_layer():
    model = keras.Sequential([keras.Input((3,)), L.BatchNormalization(name="bn7")])
    with pytest.raises(ValueError, match="'bn7'.*momentum must be in"):
        keras_bn.convert_model(model, momentum=1.5)


def test_override_that_would_drop_a_weight_is_refused():
    model = keras.Sequential([keras.Input((3,)), L.BatchNormalization(name="bn8")])
    with pytest.raises(ValueError, match=r"'bn8' has weights \['gamma'\].*would be lost"):
        keras_bn.convert_model(model, scale=False)


def test_renorm_layer_converts_with_its_renorm_weights():
    bn = L.BatchNormalization(renorm=True, renorm_clipping={"rmax": 2.0}, renorm_momentum=0.9)
    model = keras.Sequential([keras.Input((3,)), bn])
    x = np.random.default_rng(8).normal(size=(6, 3)).astype("float32")
    bn(x, training=True)
    converted = keras_bn.convert_model(model, unbiased_variance=False)
    ours = converted.layers[0]
    assert ours.get_config()["renorm_clipping"] == bn.get_config()["renorm_clipping"]
    ours_by_name = {w.name: w.numpy() for w in ours.weights}
    for w in bn.weights:
        np.testing.assert_array_equal(ours_by_name[w.name], w.numpy())
    np.testing.assert_allclose(converted(x, training=True), model(x, training=True), atol=1e-5)


# --------------------------------------------------------------------------------------------
# Models it cannot rebuild, compiled models


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.bn = L.BatchNormalization()

    def call(self, x):
        return self.bn(x)


class _Block(L.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.bn = L.BatchNormalization()

    def call(self, x):
        return self.bn(x)


def test_subclassed_model_is_refused_with_what_to_do():
    model = _Subclassed()
    model(np.ones((2, 3), "float32"))
    with pytest.raises(ValueError, match="subclassed model.*Use keras_bn.BatchNormalization"):
        keras_bn.convert_model(model)


def test_custom_layer_with_bn_inside_is_refused_with_what_to_do():
    model = keras.Sequential([keras.Input((3,)), _Block(name="block")])
    with pytest.raises(ValueError, match="'block' .*BN inside.*Use keras_bn.BatchNormalization"):
        keras_bn.convert_model(model)


def test_not_a_model_is_refused():
    with pytest.raises(ValueError, match="must be a keras.Model"):
        keras_bn.convert_model(L.BatchNormalization())


def _plain_function_loss(y_true, y_pred):
    return keras.ops.mean(keras.ops.square(y_true - y_pred))


def test_compiled_model_with_a_plain_function_loss_converts_uncompiled():
    # keras.models.clone_model fails on this model: it recompiles from a config it cannot load.
    model = keras.Sequential([keras.Input((3,)), L.Dense(2), L.BatchNormalization()])
    model.compile("adam", _plain_function_loss)
    converted = keras_bn.convert_model(model)
    assert model.compiled and not converted.compiled


# --------------------------------------------------------------------------------------------
# Training under MirroredStrategy

TRAIN_UNDER_MIRRORED = """
import os, json
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
import keras_bn
from test_folding import _make_bn_stats_nontrivial

strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
rng = np.random.default_rng(0)
# model.fit gives each replica half of every global batch of 8: replica 0 images around 0,
# replica 1 images around 2, so synchronized statistics differ from either replica's.
x = np.concatenate([rng.normal(0, 1, (4, 32, 32, 3)), rng.normal(2, 3, (4, 32, 32, 3))] * 2)
x = x.astype("float32")
y = rng.integers(0, 10, 16)
results = {}
for name in NAMES:
    with strategy.scope():
        original = getattr(keras.applications, name)(
            weights=None, input_shape=(32, 32, 3), classes=10, classifier_activation=None)
        _make_bn_stats_nontrivial(original, None, train=False)
        model = keras_bn.convert_model(original, synchronized=True)
        model.compile(keras.optimizers.SGD(0.01),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    bns = [layer for layer in model._flatten_layers()
           if isinstance(layer, keras_bn.BatchNormalization)]
    before = [bn.moving_mean.numpy() for bn in bns]
    history = model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)  # 2 steps
    copies = lambda v: [c.numpy() for c in strategy.experimental_local_results(v.value)]
    results[name] = dict(
        loss=history.history["loss"][-1],
        synchronized=all(bn.synchronized for bn in bns),
        changed=sum(not np.allclose(bn.moving_mean.numpy(), m) for bn, m in zip(bns, before)),
        bns=len(bns),
        spread=max(float(np.abs(a - b).max()) for bn in bns
                   for a, b in [copies(bn.moving_mean), copies(bn.moving_variance)]))
print(json.dumps(results))
"""


def test_converted_applications_nets_train_under_mirrored_strategy():
    out = run_python(f"NAMES = {MIRRORED_NETS!r}\n" + TRAIN_UNDER_MIRRORED, timeout=900)
    results = json.loads(out.strip().splitlines()[-1])
    print(results)
    assert sorted(results) == sorted(MIRRORED_NETS)
    for name in MIRRORED_NETS:
        r = results[name]
        assert np.isfinite(r["loss"]) and r["synchronized"], (name, r)
        assert r["changed"] == r["bns"] > 40, (name, r)  # every BN layer's statistics moved
        assert r["spread"] == 0.0, (name, r)  # and are identical on both replicas
