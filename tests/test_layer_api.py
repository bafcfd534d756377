"""Serialization, export, argument errors, mixed precision and the fused path."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_bn
from keras_bn.backends import tensorflow as fused_lib

NON_DEFAULT = dict(
    axis=[1, 3],
    momentum=None,
    epsilon=1e-4,
    center=False,
    scale=True,
    beta_initializer="ones",
    gamma_initializer=keras.initializers.Constant(2.0),
    moving_mean_initializer="ones",
    moving_variance_initializer=keras.initializers.Constant(3.0),
    beta_regularizer=keras.regularizers.L2(1e-3),
    gamma_regularizer=keras.regularizers.L1(1e-2),
    beta_constraint=keras.constraints.NonNeg(),
    gamma_constraint=keras.constraints.MaxNorm(2.0),
    moving_mean_constraint=keras.constraints.NonNeg(),
    moving_variance_constraint=keras.constraints.NonNeg(),
    renorm=True,
    renorm_clipping={"rmin": 0.5, "rmax": 2.0, "dmax": 1.0},
    renorm_momentum=0.9,
    synchronized=True,
    unbiased_variance=False,
    fused=False,
    name="bn_all_args",
)


def test_get_config_round_trips_every_argument():
    layer = keras_bn.BatchNormalization(**NON_DEFAULT)
    config = layer.get_config()
    clone = keras_bn.BatchNormalization.from_config(config)
    assert clone.get_config() == config
    for key in NON_DEFAULT:
        assert key in config, key
    assert config["axis"] == [1, 3] and config["momentum"] is None
    default = keras_bn.BatchNormalization().get_config()
    assert default["momentum"] == 0.99 and default["unbiased_variance"] is True
    assert keras.layers.deserialize(keras.layers.serialize(layer)).get_config() == config


def test_every_keras_config_loads_and_virtual_batch_size_round_trips():
    for keras_layer in (
        keras.layers.BatchNormalization(),
        keras.layers.BatchNormalization(renorm=True, renorm_clipping={"rmax": 3.0}, axis=1),
    ):
        config = keras_layer.get_config()
        ours = keras_bn.BatchNormalization.from_config(config)
        assert {k: ours.get_config()[k] for k in config} == config
    layer = keras_bn.BatchNormalization(virtual_batch_size=8)
    assert keras_bn.BatchNormalization.from_config(layer.get_config()).virtual_batch_size == 8


def _trained_model():
    rng = np.random.default_rng(0)
    inputs = keras.Input((6, 6, 4))
    h = keras.layers.Conv2D(5, 3, use_bias=False)(inputs)
    h = keras_bn.BatchNormalization(momentum=0.5)(h)
    h = keras.layers.Flatten()(h)
    h = keras_bn.BatchNormalization(momentum=None)(keras.layers.Dense(3)(h))
    model = keras.Model(inputs, h)
    model.compile("sgd", "mse")
    x = rng.normal(size=(16, 6, 6, 4)).astype(np.float32)
    model.fit(x, rng.normal(size=(16, 3)), batch_size=8, epochs=2, verbose=0)
    return model, x


def test_keras_file_round_trip(tmp_path):
    model, x = _trained_model()
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded(x, training=False), model(x, training=False), rtol=1e-6)
    for a, b in zip(loaded.weights, model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_saved_model_export_gives_same_inference_outputs(tmp_path):
    model, x = _trained_model()
    path = str(tmp_path / "exported")
    model.export(path, verbose=False)
    reloaded = tf.saved_model.load(path)
    np.testing.assert_allclose(reloaded.serve(x), model(x, training=False), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,words",
    [
        (dict(momentum=1.0), "momentum"),
        (dict(momentum=-0.1), "momentum"),
        (dict(epsilon=0.0), "epsilon"),
        (dict(epsilon=-1e-3), "epsilon"),
        (dict(axis=[1, 1]), "axis"),
        (dict(axis="channels"), "axis"),
        (dict(axis=[]), "axis"),
    ],
)
def test_constructor_errors_name_the_argument(kwargs, words):
    with pytest.raises(ValueError, match=words):
        keras_bn.BatchNormalization(**kwargs)


@pytest.mark.parametrize("axis", [4, -5, [1, -3]])
def test_axis_out_of_range_or_duplicated_for_the_input(axis):
    with pytest.raises(ValueError, match="axis"):
        keras_bn.BatchNormalization(axis=axis)(np.zeros((2, 3, 4, 5), np.float32))


def test_rank_change_after_build_is_an_error():
    layer = keras_bn.BatchNormalization()
    layer(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="rank"):
        layer(np.zeros((2, 4, 3), np.float32))


def test_feature_size_change_after_build_names_both_sizes():
    layer = keras_bn.BatchNormalization()
    layer(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match=r"built for \(3,\) features.*with \(5,\)"):
        layer(np.zeros((2, 5), np.float32))


@pytest.mark.parametrize("dtype", ["int32", "int64", "uint8", "bool"])
@pytest.mark.parametrize("training", [True, False])
def test_integer_and_boolean_inputs_are_cast_as_keras_casts_them(dtype, training):
    x = (np.arange(24).reshape(8, 3) % 5).astype(dtype)
    ours = keras_bn.BatchNormalization(unbiased_variance=False)
    theirs = keras.layers.BatchNormalization()
    y = ours(x, training=training)
    expected = theirs(x, training=training)
    assert y.dtype == expected.dtype == tf.float32
    np.testing.assert_allclose(y.numpy(), keras.ops.convert_to_numpy(expected), atol=1e-5)
    np.testing.assert_allclose(ours.moving_mean.numpy(), theirs.moving_mean.numpy(), atol=1e-6)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_keeps_float32_state_and_compute_dtype_output(policy):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        layer = keras_bn.BatchNormalization(momentum=0.0)
        x = np.random.default_rng(1).normal(100.0, 50.0, (32, 4, 4, 3)).astype(np.float32)
        for training in (True, False):
            for mask in (None, np.ones((32, 4, 4), bool)):
                y = layer(x, training=training, mask=mask)
                assert y.dtype == policy.split("_")[1]
        assert all(w.dtype == "float32" for w in layer.weights)
        x_half = np.asarray(tf.cast(tf.cast(x, policy.split("_")[1]), tf.float32), np.float64)
        n = 32 * 16
        np.testing.assert_allclose(
            layer.moving_variance.numpy(), x_half.reshape(-1, 3).var(0) * n / (n - 1), rtol=1e-4
        )
    finally:
        keras.config.set_dtype_policy(previous)


FUSABLE = [
    ((4, 5, 5, 3), -1, True),
    ((4, 3, 5, 5), 1, True),
    ((8, 3), -1, True),
    ((2, 3, 4, 5, 6), -1, True),
    ((4, 5, 5, 3), 2, False),
    ((4, 5, 5, 3), [1, 3], False),
]


def _must_compile(op):
    try:
        return bool(op.get_attr("_XlaMustCompile"))
    except ValueError:
        return False


def _training_step_ops(shape, axis, jit_compile=False, **kwargs):
    layer = keras_bn.BatchNormalization(axis=axis, **kwargs)
    layer.build(shape)

    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
        return tape.gradient(y, x)

    step = tf.function(step, jit_compile=jit_compile)
    graph = step.get_concrete_function(tf.TensorSpec(shape, tf.float32)).graph
    ops = {op.type for op in graph.get_operations()}
    xla_calls = [op for op in graph.get_operations() if _must_compile(op)]
    # One compiled call updates the moving statistics on every path; count the others.
    updates = [op for op in xla_calls if "moved_toward_batch" in op.get_attr("f").name]
    assert len(updates) == 1, [op.get_attr("f").name for op in xla_calls]
    return ops, len(xla_calls) - len(updates)


@pytest.mark.parametrize("shape,axis,fusable", FUSABLE)
def test_fused_kernel_when_asked(shape, axis, fusable):
    if not fusable:
        with pytest.raises(ValueError, match="fused=True, but no fused training transform"):
            _training_step_ops(shape, axis, fused=True)
        assert keras_bn.BatchNormalization(axis=axis, fused=None)(np.zeros(shape)).shape
        return
    ops, _ = _training_step_ops(shape, axis, fused=True)
    assert ("FusedBatchNormV3" in ops) == fusable
    assert ("FusedBatchNormGradV3" in ops) == fusable
    # Counts come from shapes: no tensor of ones the size of the input.
    assert "OnesLike" not in ops and "Fill" not in ops


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn_on", "onednn_off"])
@pytest.mark.parametrize("shape,axis,fusable", FUSABLE)
def test_default_on_cpu_follows_onednn_outside_xla_and_is_the_xla_formulation_inside(
    shape, axis, fusable, onednn, monkeypatch
):
    # No GPU here. Outside XLA the kernel is faster on CPUs where TensorFlow runs oneDNN, the
    # XLA formulation where it does not (keras_bn.fused's docstring).
    monkeypatch.setattr(fused_lib, "onednn_enabled", lambda: onednn)
    ops, xla_calls = _training_step_ops(shape, axis)
    if onednn:
        assert ("FusedBatchNormV3" in ops) == fusable
        assert xla_calls == 0
    else:
        assert "FusedBatchNormV3" not in ops
        assert (xla_calls == 2) == fusable
    # Inside an XLA-compiled step: forward and backward, each one compiled cluster.
    ops, xla_calls = _training_step_ops(shape, axis, jit_compile=True)
    assert "FusedBatchNormV3" not in ops
    assert (xla_calls == 2) == fusable
    assert "OnesLike" not in ops and "Fill" not in ops


def test_onednn_enabled_reads_tensorflow():
    from tensorflow.python.util import _pywrap_util_port

    assert fused_lib.onednn_enabled() == bool(_pywrap_util_port.IsMklEnabled())


def test_unfused_uses_plain_ops():
    ops, xla_calls = _training_step_ops((4, 5, 5, 3), -1, fused=False)
    assert "FusedBatchNormV3" not in ops and xla_calls == 0


def test_fused_true_needs_kernel_epsilon():
    with pytest.raises(ValueError, match="epsilon"):
        keras_bn.BatchNormalization(fused=True, epsilon=1e-6)
    keras_bn.BatchNormalization(epsilon=1e-6)  # the default picks a path that allows it


def test_masked_inputs_take_the_generic_path():
    layer = keras_bn.BatchNormalization()
    layer.build((4, 5, 3))
    graph = (
        tf.function(lambda x, m: layer(x, training=True, mask=m))
        .get_concrete_function(tf.TensorSpec((4, 5, 3)), tf.TensorSpec((4, 5), tf.bool))
        .graph
    )
    ops = {op.type for op in graph.get_operations()}
    assert "FusedBatchNormV3" not in ops and "StatefulPartitionedCall" not in ops


def test_package_docstring_example_runs():
    layer = keras_bn.BatchNormalization()
    x = np.random.default_rng(0).normal(3.0, 2.0, (60, 100)).astype("float32")
    assert abs(float(keras.ops.mean(layer(x, training=True)))) < 1e-5


def test_readme_opens_with_two_runnable_commands():
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    blocks = [b.split("```")[0].strip() for b in readme.split("```bash")[1:3]]
    assert len(blocks) == 2 and "pytest" in blocks[1]
    ci = open(os.path.join(os.path.dirname(__file__), "..", ".ci", "run")).read()
    assert blocks[1].split("&&")[-1].strip() in ci, "CI must run the README's test command"


# ------------------------------------------------ precision of every TensorFlow training path


@pytest.mark.parametrize("fused", [None, True, False])
@pytest.mark.parametrize("jit", [False, True], ids=["eager_graph", "jit_compile"])
def test_every_path_keeps_precision_far_from_zero(fused, jit):
    # x = 12000 +/- 0.5: E[x^2] - E[x]^2 (what XLA lowers FusedBatchNormV3 to) loses it all,
    # and x * m + c cancels three digits; (x - mean) * m + beta keeps the kernel's +/-0.99801.
    layer = keras_bn.BatchNormalization(momentum=0.0, fused=fused)
    step = tf.function(lambda x: layer(x, training=True), jit_compile=jit)
    y = step(tf.constant([[12000.5], [11999.5]])).numpy()[:, 0]
    np.testing.assert_allclose(y, [0.99801, -0.99801], atol=2e-4)
    np.testing.assert_allclose(layer.moving_variance.numpy(), [0.5], rtol=1e-3)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_renorm_on_the_kernel_keeps_float32_math_for_half_inputs(dtype):
    x = np.random.default_rng(0).normal(0.0, 1e-3, (64, 4)).astype(np.float32)
    outputs = []
    for fused in (True, False):
        layer = keras_bn.BatchNormalization(
            renorm=True, fused=fused, dtype=keras.DTypePolicy(f"mixed_{dtype}")
        )
        layer.build(x.shape)
        layer.renorm_stddev.assign(np.full(4, 0.5, np.float32))
        outputs.append(tf.cast(layer(tf.cast(x, dtype), training=True), tf.float32).numpy())
    np.testing.assert_allclose(outputs[0], outputs[1], atol=5e-3 if dtype == "float16" else 3e-2)


@pytest.mark.parametrize("fused", [None, False])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_empty_batch_gives_zero_gradients_on_every_path(fused, dtype):
    layer = keras_bn.BatchNormalization(fused=fused, dtype=dtype)
    layer.build((None, 3))
    x = tf.zeros([0, 3], dtype)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(layer(x, training=True) * 2.0)
    grads = tape.gradient(loss, [layer.gamma.value, layer.beta.value])
    for g in grads:
        np.testing.assert_array_equal(g.numpy(), np.zeros(3))
