"""Moving statistics: closed-form EMA / cumulative values with n/(n-1) on n = m*p*q,
degenerate batches, and the inference transform."""

import bn_oracle
import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_bn


def _batches(shape, k, seed=0):
    rng = np.random.default_rng(seed)
    return [
        rng.normal(rng.normal(0, 3), rng.uniform(0.5, 3), shape).astype(np.float32)
        for _ in range(k)
    ]


@pytest.mark.parametrize("momentum", [0.9, 0.5, 0.0, None])
@pytest.mark.parametrize(
    "shape,axis",
    [((60, 5), -1), ((8, 6, 7, 3), -1), ((8, 3, 6, 7), 1), ((8, 6, 7, 3), [1, 3])],
    ids=["dense", "nhwc", "nchw", "axes_list"],
)
def test_moving_statistics_closed_form(momentum, shape, axis):
    batches = _batches(shape, 4)
    layer = keras_bn.BatchNormalization(axis=axis, momentum=momentum)
    step = tf.function(lambda x: layer(x, training=True))
    for x in batches:
        step(x)
    red = tuple(a for a in range(len(shape)) if a not in layer._feature_axes)
    ref_mean, ref_var = bn_oracle.moving_after(batches, red, momentum)
    np.testing.assert_allclose(
        layer.moving_mean.numpy(), ref_mean.reshape(layer._param_shape), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        layer.moving_variance.numpy(), ref_var.reshape(layer._param_shape), rtol=1e-5, atol=1e-5
    )


def test_unbiased_factor_uses_values_per_feature_map():
    # m=2 images of 3x4: n = 24 per channel, so the factor is 24/23, not 2/1.
    x = _batches((2, 3, 4, 5), 1, seed=3)[0]
    layer = keras_bn.BatchNormalization(momentum=0.0)
    layer(x, training=True)
    biased = x.reshape(-1, 5).astype(np.float64).var(axis=0)
    np.testing.assert_allclose(layer.moving_variance.numpy(), biased * 24 / 23, rtol=1e-5)


def test_biased_option_matches_keras_rule():
    x = _batches((16, 4), 1, seed=4)[0]
    ours = keras_bn.BatchNormalization(momentum=0.0, unbiased_variance=False)
    theirs = keras.layers.BatchNormalization(momentum=0.0)
    ours(x, training=True)
    theirs(x, training=True)
    np.testing.assert_allclose(
        ours.moving_variance.numpy(), theirs.moving_variance.numpy(), rtol=1e-5
    )


def test_mask_excludes_entries_from_statistics_and_count():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(4, 6, 3)).astype(np.float32)
    mask = np.ones((4, 6), bool)
    mask[:, 4:] = False
    x[:, 4:] = 1e6  # padding garbage must not leak into the statistics
    layer = keras_bn.BatchNormalization(momentum=0.0)
    layer(x, training=True, mask=mask)
    kept = x[:, :4].reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(layer.moving_mean.numpy(), kept.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(), kept.var(0) * 16 / 15, rtol=1e-5)


def _state(layer):
    return layer.moving_mean.numpy().copy(), layer.moving_variance.numpy().copy()


@pytest.mark.parametrize("momentum", [0.9, None])
@pytest.mark.parametrize(
    "batch",
    [
        np.zeros((0, 3), np.float32),
        np.ones((1, 3), np.float32),
        np.zeros((0, 4, 4, 3), np.float32),
        np.ones((1, 1, 1, 3), np.float32),
        np.full((5, 3), np.inf, np.float32),
        np.full((5, 3), np.nan, np.float32),
        np.array([[np.inf, -np.inf, 1e4]] * 4, np.float16),
    ],
    ids=["empty", "single", "empty_conv", "single_pixel", "inf", "nan", "fp16_overflow"],
)
def test_degenerate_batches_leave_statistics_unchanged(batch, momentum):
    layer = keras_bn.BatchNormalization(momentum=momentum)
    layer(_batches((6,) + batch.shape[1:], 1)[0], training=True)
    before = _state(layer)
    # Graph mode must not raise either.
    tf.function(lambda t: layer(t, training=True))(tf.constant(batch))
    after = _state(layer)
    finite_channels = np.isfinite(batch.astype(np.float64)).all(axis=0).reshape(-1, 3).all(0)
    stale = ~finite_channels if len(batch) > 1 else np.ones(3, bool)
    # One value per channel: its mean moves (see test_one_value_per_channel_*), its
    # corrected variance n/(n-1) * 0 is undefined; with momentum=None neither moves.
    one_value = batch.size == 3
    for i, (b, a) in enumerate(zip(before, after)):
        if one_value and i == 0 and momentum is not None:
            continue
        np.testing.assert_array_equal(a[stale], b[stale])


@pytest.mark.parametrize("unbiased", [True, False])
def test_one_value_per_channel_moves_as_keras_or_keeps_the_undefined_variance(unbiased):
    x = np.array([[1.0, 2.0, 3.0]], np.float32)
    ours = keras_bn.BatchNormalization(momentum=0.5, unbiased_variance=unbiased)
    ours(x, training=True)
    mean, var = _state(ours)
    np.testing.assert_allclose(mean, [0.5, 1.0, 1.5])
    if unbiased:
        np.testing.assert_array_equal(var, [1.0, 1.0, 1.0])
    else:
        theirs = keras.layers.BatchNormalization(momentum=0.5)
        theirs(x, training=True)
        np.testing.assert_allclose(var, theirs.moving_variance.numpy())
        np.testing.assert_allclose(var, [0.5, 0.5, 0.5])


def test_nan_channel_only_that_channel_is_skipped():
    x = np.array([[1, 2, 3], [np.nan, 1, 2], [0, 0, 0]], np.float32)
    layer = keras_bn.BatchNormalization(momentum=0.0)
    layer(x, training=True)
    np.testing.assert_array_equal(layer.moving_mean.numpy()[0], 0.0)  # initial value kept
    np.testing.assert_allclose(layer.moving_mean.numpy()[1:], [1.0, 5 / 3], rtol=1e-6)


def test_moving_constraints_apply_to_moved_channels_only():
    # Channel 0 is skipped (NaN); its initial -1 must survive the NonNeg constraint untouched.
    x = np.array([[np.nan, -4.0, 3.0], [1.0, -2.0, 5.0]], np.float32)
    layer = keras_bn.BatchNormalization(
        momentum=0.0,
        moving_mean_initializer=keras.initializers.Constant(-1.0),
        moving_mean_constraint=keras.constraints.NonNeg(),
        moving_variance_constraint=lambda v: tf.minimum(v, 1.5),
    )
    layer(x, training=True)
    mean, var = _state(layer)
    np.testing.assert_array_equal(mean, [-1.0, 0.0, 4.0])
    np.testing.assert_allclose(var, [1.0, 1.5, 1.5])


def test_masked_channel_with_one_value_moves_its_mean_only():
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    mask = np.zeros((4, 3), bool)
    mask[:, 0] = True  # channel 0: 4 values
    mask[0, 1] = True  # channel 1: 1 value
    layer = keras_bn.BatchNormalization(momentum=0.0)
    layer(x, training=True, mask=mask)
    mean, var = _state(layer)
    np.testing.assert_allclose(mean, [4.5, 1.0, 0.0])
    np.testing.assert_allclose(var, [x[:, 0].astype(np.float64).var() * 4 / 3, 1.0, 1.0], rtol=1e-6)


def test_cumulative_average_ignores_degenerate_batches():
    layer = keras_bn.BatchNormalization(momentum=None)
    a, b = _batches((10, 2), 2, seed=7)
    layer(a, training=True)
    layer(np.ones((1, 2), np.float32), training=True)
    layer(b, training=True)
    ref_mean, ref_var = bn_oracle.moving_after([a, b], (0,), None)
    np.testing.assert_allclose(layer.moving_mean.numpy(), ref_mean, rtol=1e-5)
    np.testing.assert_allclose(layer.moving_variance.numpy(), ref_var, rtol=1e-5)
    np.testing.assert_array_equal(layer.moving_count.numpy(), [2.0, 2.0])


@pytest.mark.parametrize("shape,axis", [((5, 4), -1), ((3, 4, 5, 6), 1), ((3, 4, 5, 6), [1, 3])])
def test_inference_is_the_affine_map_of_population_statistics(shape, axis):
    rng = np.random.default_rng(8)
    layer = keras_bn.BatchNormalization(axis=axis)
    layer.build(shape)
    for v in (layer.gamma, layer.beta, layer.moving_mean):
        v.assign(rng.normal(size=v.shape).astype(np.float32))
    layer.moving_variance.assign(
        rng.uniform(0.5, 2, layer.moving_variance.shape).astype(np.float32)
    )
    x = rng.normal(size=shape).astype(np.float32)
    bshape = [shape[a] if a in layer._feature_axes else 1 for a in range(len(shape))]
    g, b, m, v = (
        t.numpy().reshape(bshape).astype(np.float64)
        for t in (layer.gamma, layer.beta, layer.moving_mean, layer.moving_variance)
    )
    ref = g / np.sqrt(v + layer.epsilon) * x + (b - g * m / np.sqrt(v + layer.epsilon))
    np.testing.assert_allclose(layer(x, training=False).numpy(), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer(x).numpy(), ref, rtol=1e-5, atol=1e-5)


def test_trainable_false_runs_in_inference_mode_and_freezes_statistics():
    x = _batches((16, 3), 1, seed=9)[0]
    layer = keras_bn.BatchNormalization()
    layer(x, training=True)
    layer.trainable = False
    before = _state(layer)
    y = layer(x, training=True).numpy()
    np.testing.assert_allclose(y, layer(x, training=False).numpy())
    for b, a in zip(before, _state(layer)):
        np.testing.assert_array_equal(a, b)


def test_synchronized_without_strategy_is_the_local_layer():
    x = _batches((12, 4, 4, 3), 1, seed=10)[0]
    local = keras_bn.BatchNormalization(momentum=0.5)
    synced = keras_bn.BatchNormalization(momentum=0.5, synchronized=True)
    np.testing.assert_allclose(synced(x, training=True), local(x, training=True), rtol=1e-6)
    np.testing.assert_allclose(
        synced.moving_variance.numpy(), local.moving_variance.numpy(), rtol=1e-6
    )
