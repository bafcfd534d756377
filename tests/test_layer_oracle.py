"""Alg. 1 against the NumPy oracle: outputs and gradients w.r.t. input, gamma and beta."""

import bn_oracle
import numpy as np
import pytest
import tensorflow as tf

import keras_bn

# name, input shape, axis, mask shape (None: no mask)
CASES = [
    ("dense", (32, 8), -1, None),
    ("nhwc", (4, 5, 6, 3), -1, None),
    ("nchw", (4, 3, 5, 6), 1, None),
    ("ndhwc", (2, 3, 4, 5, 4), -1, None),
    ("ncdhw", (2, 4, 3, 4, 5), 1, None),
    ("axes_list_noncontiguous", (4, 5, 6, 3), [1, 3], None),
    ("axes_list_contiguous_last", (4, 5, 2, 3), [2, 3], None),
    ("axes_list_contiguous_first", (4, 2, 3, 5), [1, 2], None),
    ("middle_axis", (4, 5, 6, 3), 2, None),
    ("sequence_mask", (6, 7, 5), -1, (6, 7)),
    ("full_rank_mask_nhwc", (4, 5, 6, 3), -1, (4, 5, 6, 3)),
]


def _setup(shape, axis, mask_shape, seed, fused=None):
    rng = np.random.default_rng(seed)
    x = rng.normal(1.5, 2.0, shape).astype(np.float32)
    dy = rng.normal(0.0, 1.0, shape).astype(np.float32)
    mask = None if mask_shape is None else rng.random(mask_shape) < 0.7
    layer = keras_bn.BatchNormalization(
        axis=axis,
        gamma_initializer=keras_bn_init(rng),
        beta_initializer=keras_bn_init(rng),
        fused=fused,
    )
    layer.build(shape)
    feature_axes = layer._feature_axes
    red = tuple(a for a in range(len(shape)) if a not in feature_axes)
    bshape = [shape[a] if a in feature_axes else 1 for a in range(len(shape))]
    gamma = layer.gamma.numpy().astype(np.float64).reshape(bshape)
    beta = layer.beta.numpy().astype(np.float64).reshape(bshape)
    full_mask = None
    if mask is not None:
        full_mask = mask
        if mask.ndim < len(shape):
            for a in feature_axes:
                full_mask = np.expand_dims(full_mask, a)
        full_mask = np.broadcast_to(full_mask, shape)
    return layer, x, dy, mask, full_mask, red, gamma, beta


def _fusable(shape, axis):
    layer = keras_bn.BatchNormalization(axis=axis)
    layer.build(shape)
    return layer.fused


def keras_bn_init(rng):
    import keras

    return keras.initializers.RandomUniform(0.5, 1.5, seed=int(rng.integers(1 << 30)))


def _run(layer, x, dy, mask, dtype, jit):
    def step(x, dy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True, mask=mask)
            loss = tf.reduce_sum(tf.cast(y, tf.float32) * dy)
        dx, dgamma, dbeta = tape.gradient(loss, [x, layer.gamma.value, layer.beta.value])
        return y, dx, dgamma, dbeta

    if jit:
        step = tf.function(step, jit_compile=True)
    out = step(tf.cast(x, dtype), tf.constant(dy))
    return [np.asarray(tf.cast(t, tf.float64)) for t in out]


# fused=None: the default (XLA formulation on CPU); True: FusedBatchNormV3; False: plain ops.
IMPLEMENTATIONS = [(None, False), (None, True), (True, False), (False, False)]


@pytest.mark.parametrize("name,shape,axis,mask_shape", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize(
    "fused,jit", IMPLEMENTATIONS, ids=["auto", "auto-in-jit", "kernel", "unfused"]
)
def test_float32_outputs_and_gradients_match_oracle(name, shape, axis, mask_shape, fused, jit):
    if fused is True and not _fusable(shape, axis):
        with pytest.raises(ValueError, match="fused=True"):
            _setup(shape, axis, mask_shape, seed=1, fused=fused)
        return
    layer, x, dy, mask, full_mask, red, gamma, beta = _setup(
        shape, axis, mask_shape, seed=1, fused=fused
    )
    y, dx, dgamma, dbeta = _run(layer, x, dy, mask, tf.float32, jit)
    ref_y = bn_oracle.forward(x, red, gamma, beta, layer.epsilon, full_mask)
    ref_dx, ref_dgamma, ref_dbeta = bn_oracle.backward(x, dy, red, gamma, layer.epsilon, full_mask)
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(dgamma.reshape(-1), ref_dgamma.reshape(-1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dbeta.reshape(-1), ref_dbeta.reshape(-1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize(
    "name,shape,axis,mask_shape",
    [CASES[0], CASES[1], CASES[2], CASES[9]],
    ids=["dense", "nhwc", "nchw", "sequence_mask"],
)
@pytest.mark.parametrize("fused", [None, True])
def test_half_precision_inputs_match_oracle(dtype, name, shape, axis, mask_shape, fused):
    layer, x, dy, mask, full_mask, red, gamma, beta = _setup(
        shape, axis, mask_shape, seed=2, fused=fused
    )
    # The oracle sees exactly the values the layer sees after the cast.
    x = np.asarray(tf.cast(tf.cast(x, dtype), tf.float32))
    y, dx, dgamma, dbeta = _run(layer, x, dy, mask, getattr(tf, dtype), jit=False)
    ref_y = bn_oracle.forward(x, red, gamma, beta, layer.epsilon, full_mask)
    ref_dx, ref_dgamma, _ = bn_oracle.backward(x, dy, red, gamma, layer.epsilon, full_mask)
    tol = 1e-2 if dtype == "float16" else 4e-2  # the output is rounded to the half type
    np.testing.assert_allclose(y, ref_y, rtol=tol, atol=tol)
    np.testing.assert_allclose(dx, ref_dx, rtol=tol, atol=tol)
    np.testing.assert_allclose(dgamma.reshape(-1), ref_dgamma.reshape(-1), rtol=tol, atol=tol)
