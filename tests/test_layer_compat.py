"""Coming from Keras 3 and tf-keras: Keras's mask convention for every axis, ghost batches
grouped as tf-keras groups them, and Keras's weights loaded with ``momentum=None``."""

import bn_oracle
import keras
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import keras_bn

# ---------------------------------------------------------------- masks (Keras convention)


@pytest.mark.parametrize(
    "shape,axis",
    [((5, 2, 3), 1), ((4, 3, 3), 1), ((4, 3, 3), -1), ((6, 4, 2, 3), 1)],
    ids=["axis1_former_crash", "axis1_former_silent", "axis_last", "rank4_axis1"],
)
def test_mask_of_rank_minus_one_is_inputs_shape_without_last_axis(shape, axis):
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, shape).astype(np.float32)
    x[1, -1] = 0.0  # masked by Masking(0.0): one time step of one example
    x[3, 0] = 0.0
    inputs = keras.Input(shape[1:])
    masked = keras.layers.Masking(0.0)(inputs)
    layer = keras_bn.BatchNormalization(axis=axis, momentum=0.0, unbiased_variance=False)
    model = keras.Model(inputs, layer(masked))
    y = model(x, training=True).numpy()

    mask = np.any(x != 0.0, axis=-1)  # what Masking produces: inputs.shape[:-1]
    full_mask = np.broadcast_to(mask[..., None], shape)
    red = tuple(a for a in range(len(shape)) if a != axis % len(shape))
    np.testing.assert_allclose(y, bn_oracle.forward(x, red, 1.0, 0.0, 1e-3, full_mask), atol=1e-4)
    _, mean, variance = bn_oracle.moments(x, red, full_mask)
    # A channel with no unmasked value keeps its moving statistics.
    np.testing.assert_allclose(
        layer.moving_mean.numpy(), np.nan_to_num(mean.reshape(-1), nan=0.0), atol=1e-5
    )
    np.testing.assert_allclose(
        layer.moving_variance.numpy(), np.nan_to_num(variance.reshape(-1), nan=1.0), atol=1e-5
    )

    # Keras's own layer follows the same convention.
    keras_layer = keras.layers.BatchNormalization(axis=axis, momentum=0.0)
    keras_y = keras.Model(inputs, keras_layer(masked))(x, training=True)
    np.testing.assert_allclose(y, keras.ops.convert_to_numpy(keras_y), atol=1e-4)


def test_issue_example_fully_masked_channel_keeps_its_moving_mean():
    # (4, 3, 3) inputs, axis=1, a (4, 3) mask that masks channel 2 for every example.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 3, 3)).astype(np.float32)
    mask = np.ones((4, 3), bool)
    mask[:, 2] = False
    layer = keras_bn.BatchNormalization(axis=1, momentum=0.0)
    layer(x, training=True, mask=mask)
    expected = x[:, :2, :].mean(axis=(0, 2))
    np.testing.assert_allclose(layer.moving_mean.numpy()[:2], expected, atol=1e-6)
    assert layer.moving_mean.numpy()[2] == 0.0


def test_full_rank_mask_still_works_and_wrong_mask_is_a_clear_error():
    x = np.random.default_rng(1).normal(size=(4, 3, 5)).astype(np.float32)
    layer = keras_bn.BatchNormalization(axis=1)
    layer(x, training=True, mask=np.ones((4, 3, 5), bool))
    with pytest.raises(ValueError, match=r"inputs.shape\[:-1\]"):
        layer(x, training=True, mask=np.ones((4, 5), bool))


# ----------------------------------------------------------- ghost batches (tf-keras grouping)


@pytest.mark.parametrize("shape", [(16, 6), (12, 3, 3, 4)], ids=["dense", "nhwc"])
@pytest.mark.parametrize("path", ["fused", "plain", "all_true_mask"])
def test_ghost_batches_match_tf_keras_outputs_gradients_and_moving_statistics(shape, path):
    rng = np.random.default_rng(2)
    ours = keras_bn.BatchNormalization(
        virtual_batch_size=4,
        momentum=0.9,
        unbiased_variance=False,
        fused=None if path == "fused" else False,
    )
    mask = np.ones(shape[:-1], bool) if path == "all_true_mask" else None
    theirs = tf_keras.layers.BatchNormalization(virtual_batch_size=4, momentum=0.9)
    # Every example has its own scale and offset, so the grouping matters.
    per_example = (-1,) + (1,) * (len(shape) - 1)
    scale = (1.0 + np.arange(shape[0])).reshape(per_example)
    for _ in range(3):
        offset = rng.normal(0.0, 3.0, shape[0]).reshape(per_example)
        x = tf.constant((rng.normal(size=shape) * scale + offset).astype(np.float32))
        dy = tf.constant(rng.normal(size=shape).astype(np.float32))
        results = []
        for layer in (ours, theirs):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True, mask=mask if layer is ours else None)
                loss = tf.reduce_sum(y * dy)
            results.append((y, tape.gradient(loss, x)))
        (y, dx), (ref_y, ref_dx) = results
        np.testing.assert_allclose(y.numpy(), ref_y.numpy(), atol=2e-5)
        np.testing.assert_allclose(dx.numpy(), ref_dx.numpy(), atol=2e-5)
        for mine, ref in (
            (ours.moving_mean, theirs.moving_mean),
            (ours.moving_variance, theirs.moving_variance),
        ):
            np.testing.assert_allclose(mine.numpy(), ref.numpy().reshape(-1), atol=1e-5)
    # Inference uses the population statistics for a batch of any size.
    x = rng.normal(size=(7,) + shape[1:]).astype(np.float32)
    expected = (x - ours.moving_mean.numpy()) / np.sqrt(ours.moving_variance.numpy() + 1e-3)
    np.testing.assert_allclose(ours(x, training=False).numpy(), expected, atol=1e-5)


def test_ghost_batch_grouping_is_strided_as_in_tf_keras():
    # 8 examples, ghost size 4: ghost batch j holds examples j, j + 2, j + 4, j + 6.
    x = np.arange(8, dtype=np.float32).reshape(8, 1) ** 2
    layer = keras_bn.BatchNormalization(
        virtual_batch_size=4, momentum=0.0, unbiased_variance=False, center=False, scale=False
    )
    y = layer(x, training=True).numpy()
    for j in range(2):
        group = x[j::2, 0]
        np.testing.assert_allclose(
            y[j::2, 0], (group - group.mean()) / np.sqrt(group.var() + 1e-3), atol=1e-5
        )
    means = [x[j::2, 0].mean() for j in range(2)]
    np.testing.assert_allclose(layer.moving_mean.numpy(), [np.mean(means)], rtol=1e-6)


def test_ghost_batch_errors_name_what_is_wrong():
    layer = keras_bn.BatchNormalization(virtual_batch_size=4)
    with pytest.raises(ValueError, match=r"virtual_batch_size=4.*batch of 6"):
        layer(np.zeros((6, 3), np.float32), training=True)
    layer(np.zeros((6, 3), np.float32), training=False)  # inference: any batch size
    with pytest.raises(ValueError, match="synchronized=True"):
        keras_bn.BatchNormalization(virtual_batch_size=4, synchronized=True)
    with pytest.raises(ValueError, match="renorm=True"):
        keras_bn.BatchNormalization(virtual_batch_size=4, renorm=True)
    with pytest.raises(ValueError, match="positive integer"):
        keras_bn.BatchNormalization(virtual_batch_size=0)
    with pytest.raises(ValueError, match="axis 0"):
        keras_bn.BatchNormalization(axis=0, virtual_batch_size=2)(np.zeros((4, 3), np.float32))


def test_ghost_batch_size_not_dividing_a_dynamic_batch_fails_with_both_sizes():
    layer = keras_bn.BatchNormalization(virtual_batch_size=4)
    step = tf.function(
        lambda x: layer(x, training=True),
        input_signature=[tf.TensorSpec([None, 3], tf.float32)],
    )
    step(tf.zeros([8, 3]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="virtual_batch_size=4"):
        step(tf.zeros([6, 3]))


# ------------------------------------------------------------ momentum=None and Keras weights


def test_momentum_none_loads_keras_weights_counting_them_as_one_batch(tmp_path):
    inputs = keras.Input((5,))
    keras_model = keras.Model(inputs, keras.layers.BatchNormalization()(inputs))
    rng = np.random.default_rng(3)
    for _ in range(3):
        keras_model(rng.normal(2.0, 3.0, (16, 5)).astype(np.float32), training=True)
    path = str(tmp_path / "keras.weights.h5")
    keras_model.save_weights(path)

    layer = keras_bn.BatchNormalization(momentum=None, unbiased_variance=False)
    ours = keras.Model(inputs, layer(inputs))
    ours.load_weights(path)
    keras_layer = keras_model.layers[1]
    for name in ("gamma", "beta", "moving_mean", "moving_variance"):
        np.testing.assert_array_equal(
            getattr(layer, name).numpy(), getattr(keras_layer, name).numpy()
        )
    np.testing.assert_array_equal(layer.moving_count.numpy(), np.ones(5))

    # The next batch is averaged with the loaded statistics as with one batch seen.
    x = rng.normal(size=(16, 5)).astype(np.float32)
    old = layer.moving_mean.numpy()
    ours(x, training=True)
    np.testing.assert_allclose(layer.moving_mean.numpy(), (old + x.mean(0)) / 2, rtol=1e-5)

    # set_weights takes Keras's four weights too.
    other = keras_bn.BatchNormalization(momentum=None)
    other.build((None, 5))
    other.set_weights(keras_layer.get_weights())
    np.testing.assert_array_equal(other.moving_count.numpy(), np.ones(5))
