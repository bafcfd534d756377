"""Every layer feature on the current Keras backend, against the NumPy oracle of Alg. 1/2.

Written with ``keras.ops`` and NumPy only, so the same file runs under
``KERAS_BACKEND=tensorflow|jax|torch`` (one process per backend):
``tests/test_every_backend.py`` runs it under JAX and PyTorch; the main run collects it under
TensorFlow.
"""

import os

import bn_oracle
import keras
import numpy as np
import pytest
from keras import ops

import keras_bn

BACKEND = keras.backend.backend()

CASES = [
    ("dense", (12, 5), -1, None),
    ("nhwc", (4, 3, 3, 6), -1, None),
    ("nchw", (4, 6, 3, 3), 1, None),
    ("axes_list", (4, 3, 5, 2), [1, 3], None),
    ("sequence_mask", (4, 7, 3), -1, (4, 7)),
]


def gradients(layer, x, dy, mask=None):
    """``(y, dx, dgamma, dbeta)`` of ``sum(layer(x, training=True) * dy)`` as NumPy arrays."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        x = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True, mask=mask)
            loss = tf.reduce_sum(tf.cast(y, tf.float32) * dy)
        grads = tape.gradient(loss, [x, layer.gamma.value, layer.beta.value])
        return [np.asarray(ops.convert_to_numpy(t), np.float64) for t in [y, *grads]]
    if BACKEND == "jax":
        import jax

        layer.build(x.shape) if not layer.built else None
        trainable = [v.value for v in layer.trainable_variables]
        others = [v.value for v in layer.non_trainable_variables]

        def loss(x, trainable):
            y, _ = layer.stateless_call(trainable, others, x, training=True, mask=mask)
            return jax.numpy.sum(y.astype("float32") * dy), y

        (_, y), (dx, (dgamma, dbeta)) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
            x, trainable
        )
        return [np.asarray(t, np.float64) for t in (y, dx, dgamma, dbeta)]
    import torch

    x = torch.tensor(x, requires_grad=True)
    y = layer(x, training=True, mask=None if mask is None else torch.tensor(mask))
    (y.float() * torch.tensor(dy)).sum().backward()
    return [
        t.detach().double().numpy()
        for t in (y, x.grad, layer.gamma.value.grad, layer.beta.value.grad)
    ]


def _setup(shape, axis, mask_shape, seed=0, **kwargs):
    rng = np.random.default_rng(seed)
    x = rng.normal(rng.normal(0, 3), rng.uniform(0.5, 3), shape).astype(np.float32)
    dy = rng.normal(size=shape).astype(np.float32)
    mask = None if mask_shape is None else rng.random(mask_shape) < 0.7
    layer = keras_bn.BatchNormalization(
        axis=axis,
        gamma_initializer=keras.initializers.RandomUniform(0.5, 1.5, seed=seed),
        beta_initializer=keras.initializers.RandomUniform(-1, 1, seed=seed + 1),
        **kwargs,
    )
    layer.build(shape)
    features = layer._feature_axes
    red = tuple(a for a in range(len(shape)) if a not in features)
    bshape = [shape[a] if a in features else 1 for a in range(len(shape))]
    gamma = ops.convert_to_numpy(layer.gamma).astype(np.float64).reshape(bshape)
    beta = ops.convert_to_numpy(layer.beta).astype(np.float64).reshape(bshape)
    full = None
    if mask is not None:
        full = np.broadcast_to(mask[..., None], shape)
    return layer, x, dy, mask, full, red, gamma, beta


def _state(layer):
    return [ops.convert_to_numpy(v).astype(np.float64) for v in layer.non_trainable_variables]


@pytest.mark.parametrize("name,shape,axis,mask_shape", CASES, ids=[c[0] for c in CASES])
def test_outputs_gradients_and_moving_statistics_match_the_oracle(name, shape, axis, mask_shape):
    layer, x, dy, mask, full, red, gamma, beta = _setup(shape, axis, mask_shape, momentum=0.5)
    y, dx, dgamma, dbeta = gradients(layer, x, dy, mask)
    np.testing.assert_allclose(y, bn_oracle.forward(x, red, gamma, beta, 1e-3, full), atol=2e-5)
    ref_dx, ref_dgamma, ref_dbeta = bn_oracle.backward(x, dy, red, gamma, 1e-3, full)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(dgamma.reshape(-1), ref_dgamma.reshape(-1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dbeta.reshape(-1), ref_dbeta.reshape(-1), rtol=1e-4, atol=1e-4)
    if BACKEND != "jax":  # stateless_call returns the new state instead of assigning it
        mean, var = bn_oracle.moving_after([x], red, 0.5, mask=full)
        got_mean, got_var = _state(layer)
        np.testing.assert_allclose(got_mean.reshape(-1), mean.reshape(-1), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got_var.reshape(-1), var.reshape(-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("momentum", [0.9, None])
@pytest.mark.parametrize("unbiased", [True, False])
def test_moving_statistics_over_batches(momentum, unbiased):
    rng = np.random.default_rng(3)
    batches = [rng.normal(2.0, 3.0, (8, 3, 3, 4)).astype(np.float32) for _ in range(3)]
    layer = keras_bn.BatchNormalization(momentum=momentum, unbiased_variance=unbiased)
    for x in batches:
        layer(x, training=True)
    mean, var = bn_oracle.moving_after(batches, (0, 1, 2), momentum, unbiased=unbiased)
    got = _state(layer)
    np.testing.assert_allclose(got[0], mean.reshape(-1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1], var.reshape(-1), rtol=1e-5, atol=1e-5)
    x = rng.normal(size=(5, 3, 3, 4)).astype(np.float32)
    expected = (x - got[0]) / np.sqrt(got[1] + 1e-3)
    np.testing.assert_allclose(ops.convert_to_numpy(layer(x)), expected, atol=1e-5)


@pytest.mark.parametrize("unbiased", [True, False])
def test_one_value_per_channel(unbiased):
    x = np.array([[1.0, 2.0, 3.0]], np.float32)
    layer = keras_bn.BatchNormalization(momentum=0.5, unbiased_variance=unbiased)
    layer(x, training=True)
    mean, var = _state(layer)
    np.testing.assert_allclose(mean, [0.5, 1.0, 1.5])
    np.testing.assert_allclose(var, [1.0] * 3 if unbiased else [0.5] * 3)


@pytest.mark.parametrize(
    "batch",
    [np.zeros((0, 3)), np.full((4, 3), np.nan), np.array([[np.inf, 1.0, 2.0]] * 4)],
    ids=["empty", "nan", "inf_channel"],
)
def test_degenerate_batches_keep_their_channels(batch):
    layer = keras_bn.BatchNormalization(momentum=0.5)
    layer(np.ones((4, 3), np.float32), training=True)
    before = _state(layer)
    layer(batch.astype(np.float32), training=True)
    after = _state(layer)
    stale = ~np.isfinite(batch).all(0) if len(batch) else np.ones(3, bool)
    for b, a in zip(before, after):
        np.testing.assert_array_equal(a[stale], b[stale])


def test_empty_batch_has_finite_gradients():
    layer = keras_bn.BatchNormalization()
    layer.build((0, 3))
    _, dx, dgamma, dbeta = gradients(layer, np.zeros((0, 3), np.float32), np.zeros((0, 3)))
    assert np.isfinite(dgamma).all() and np.isfinite(dbeta).all()


def test_precision_far_from_zero():
    # |mean| >> std: (x - mean) * m + beta keeps it; x * m + c would cancel.
    x = np.array([[12000.5], [11999.5]], np.float32)
    layer = keras_bn.BatchNormalization(momentum=0.0)
    y = ops.convert_to_numpy(layer(x, training=True))
    np.testing.assert_allclose(y[:, 0], [0.998, -0.998], atol=2e-3)
    np.testing.assert_allclose(_state(layer)[1], [0.5], rtol=1e-3)


def test_renorm_matches_its_algorithm_and_keeps_skipped_channels():
    shape, red = (6, 4), (0,)
    layer, x, dy, _, _, _, gamma, beta = _setup(
        shape, -1, None, renorm=True, renorm_clipping={"rmax": 1.5, "dmax": 0.5}, momentum=0.5
    )
    y, dx, _, _ = gradients(layer, x, dy)
    r, d = bn_oracle.renorm_correction(x, red, 1e-3, 0.0, 1.0, 0.0, 1.5, 0.5)
    ref = bn_oracle.renorm_forward(x, red, gamma, beta, 1e-3, r, d)
    np.testing.assert_allclose(y, ref, atol=2e-5)
    ref_dx, _, _ = bn_oracle.renorm_backward(x, dy, red, gamma, 1e-3, r, d)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-4, atol=2e-5)
    # One value per channel (unbiased): the variance of renorm's inference state stays put.
    guard = keras_bn.BatchNormalization(renorm=True, epsilon=0.5)
    guard(np.array([[1.0, 2.0, 3.0]], np.float32), training=True)
    np.testing.assert_allclose(ops.convert_to_numpy(guard.moving_variance), [1.0] * 3)


def test_ghost_batches_group_as_tf_keras_and_average_each_ones_estimate():
    x = np.arange(8, dtype=np.float32).reshape(8, 1) ** 2
    layer = keras_bn.BatchNormalization(
        virtual_batch_size=4, momentum=0.0, unbiased_variance=False, center=False, scale=False
    )
    y = ops.convert_to_numpy(layer(x, training=True))
    for j in range(2):
        group = x[j::2, 0]
        np.testing.assert_allclose(
            y[j::2, 0], (group - group.mean()) / np.sqrt(group.var() + 1e-3), atol=1e-5
        )
    # Masked, unequal counts: each ghost batch's own n/(n-1) (1 * 2/1 and 2/3 * 3/2), averaged.
    x = np.array([[0, 2, 9], [0, 1, 2]], np.float32)[..., None]
    mask = np.array([[1, 1, 0], [1, 1, 1]], bool)
    layer = keras_bn.BatchNormalization(virtual_batch_size=1, momentum=0.0)
    layer(x, training=True, mask=mask)
    np.testing.assert_allclose(_state(layer)[1], [1.5], rtol=1e-6)
    # A ghost batch whose values are all masked adds nothing.
    mask = np.array([[1, 1, 0], [0, 0, 0]], bool)
    layer = keras_bn.BatchNormalization(virtual_batch_size=1, momentum=0.0)
    layer(x, training=True, mask=mask)
    np.testing.assert_allclose(_state(layer), [[1.0], [2.0]], rtol=1e-6)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_inputs_use_float32_math(dtype):
    rng = np.random.default_rng(5)
    x = rng.normal(1.0, 2.0, (16, 4)).astype(np.float32)
    layer = keras_bn.BatchNormalization(dtype=keras.DTypePolicy(f"mixed_{dtype}"))
    y = layer(ops.cast(x, dtype), training=True)
    assert keras.backend.standardize_dtype(y.dtype) == dtype
    assert keras.backend.standardize_dtype(layer.moving_mean.dtype) == "float32"
    x16 = ops.convert_to_numpy(ops.cast(ops.cast(x, dtype), "float32")).astype(np.float64)
    ref = (x16 - x16.mean(0)) / np.sqrt(x16.var(0) + 1e-3)
    tolerance = 1e-2 if dtype == "float16" else 5e-2
    np.testing.assert_allclose(ops.convert_to_numpy(ops.cast(y, "float32")), ref, atol=tolerance)
    renorm = keras_bn.BatchNormalization(renorm=True, dtype=keras.DTypePolicy(f"mixed_{dtype}"))
    assert keras.backend.standardize_dtype(renorm(ops.cast(x, dtype), training=True).dtype) == (
        dtype
    )


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="epsilon must be a number"):
        keras_bn.BatchNormalization(epsilon="small")
    with pytest.raises(ValueError, match="momentum must be a number"):
        keras_bn.BatchNormalization(momentum="0.9x")
    with pytest.raises(ValueError, match=r"renorm_clipping\['rmax'\] must be a number"):
        keras_bn.BatchNormalization(renorm=True, renorm_clipping={"rmax": "big"})
    with pytest.raises(ValueError, match="default rmin"):
        keras_bn.BatchNormalization(renorm=True, renorm_clipping={"rmax": -1})
    layer = keras_bn.BatchNormalization()
    with pytest.raises(ValueError, match="mask"):
        layer(np.zeros((4, 5, 3), np.float32), mask=np.ones((4, 4), bool))


def test_the_fast_path_moves_the_moving_statistics_as_the_plain_path():
    # Several steps (PyTorch: the kernel's own running average, in place); in the second, a
    # channel of +-2**66 has mean 0 but a variance past float32: its mean moves, its
    # variance keeps its value.
    rng = np.random.default_rng(6)
    batches = [rng.normal(2.0, 3.0, (8, 3, 3, 4)).astype(np.float32) for _ in range(3)]
    batches[1][..., 0] = np.where(np.arange(72).reshape(8, 3, 3) % 2, 2.0**66, -(2.0**66))
    states = []
    for fused in (None, False):
        layer = keras_bn.BatchNormalization(momentum=0.7, fused=fused)
        layer.build(batches[0].shape)
        for step, x in enumerate(batches):
            layer(x, training=True)
            if step == 1:
                kept = _state(layer)[1][0]
        states.append(_state(layer))
    first = batches[0][..., 0].astype(np.float64).var(ddof=1)
    np.testing.assert_allclose(kept, 1.0 + 0.3 * (first - 1.0), rtol=1e-6)  # step 0's value
    for fast, plain in zip(*states):
        np.testing.assert_allclose(fast, plain, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(BACKEND == "jax", reason="JAX variables never change in place")
def test_stateless_call_returns_the_moving_statistics_and_leaves_the_variables():
    rng = np.random.default_rng(7)
    x = rng.normal(2.0, 3.0, (8, 3, 3, 4)).astype(np.float32)
    called, stateless = (keras_bn.BatchNormalization(momentum=0.7) for _ in range(2))
    for layer in (called, stateless):
        layer.build(x.shape)
    called(x, training=True)
    before = _state(stateless)
    trainable = [v.value for v in stateless.trainable_variables]
    others = [v.value for v in stateless.non_trainable_variables]
    _, new = stateless.stateless_call(trainable, others, x, training=True)
    for after, old in zip(_state(stateless), before):
        np.testing.assert_array_equal(after, old)
    for got, expected in zip(new, _state(called)):
        np.testing.assert_allclose(ops.convert_to_numpy(got), expected, rtol=1e-6)


@pytest.mark.skipif(BACKEND != "torch", reason="torch.compile")
@pytest.mark.parametrize(
    "kwargs,masked",
    [({}, False), ({"renorm": True}, False), ({"virtual_batch_size": 4}, False), ({}, True)],
    ids=["kernel", "renorm", "ghost", "masked"],
)
def test_torch_compile_equals_eager(kwargs, masked):
    # The kernel's in-place update, renorm (whose averages the backward keeps while the update
    # overwrites them), and the closed-form Function (ghost batches, masks) under
    # torch.compile: the same gradients and state, step by step. All but renorm (which breaks
    # the graph on purpose) compile as one graph: a break there ran the Function eagerly.
    import torch

    rng = np.random.default_rng(8)
    xs = [rng.normal(2.0, 3.0, (8, 3, 3, 4)).astype(np.float32) for _ in range(2)]
    dy = torch.tensor(rng.normal(size=xs[0].shape).astype(np.float32))
    mask = torch.tensor(rng.random(xs[0].shape[:-1]) < 0.7) if masked else None
    results = []
    for compiled in (False, True):
        layer = keras_bn.BatchNormalization(momentum=0.7, **kwargs)
        layer.build(xs[0].shape)
        if "renorm" in kwargs:  # renorm's r and d away from 1 and 0
            layer.renorm_stddev.assign(ops.full(layer.renorm_stddev.shape, 0.8))

        def loss(x, layer=layer):
            return torch.sum(layer(x, training=True, mask=mask) * dy)

        if compiled:
            loss = torch.compile(loss, fullgraph="renorm" not in kwargs)
        got = []
        for x in xs:
            x = torch.tensor(x, requires_grad=True)
            grads = torch.autograd.grad(loss(x), [x, layer.gamma.value, layer.beta.value])
            got += [g.detach().numpy().astype(np.float64) for g in grads] + _state(layer)
        results.append(got)
    for fast, eager in zip(*results):
        np.testing.assert_allclose(fast, eager, rtol=1e-5, atol=1e-5)


def test_is_a_keras_batch_normalization_and_reports_fused():
    layer = keras_bn.BatchNormalization()
    assert isinstance(layer, keras.layers.BatchNormalization)
    layer.build((2, 3))
    assert layer.fused is True  # every backend has a fast path for this layout
    assert keras_bn.BatchNormalization(fused=False).build((2, 3)) is None
    # Ghost batches on a middle axis: only JAX's closed form runs them.
    ghost = keras_bn.BatchNormalization(fused=True, axis=2, virtual_batch_size=2)
    if BACKEND == "jax":
        ghost.build((4, 3, 5, 2))
        assert ghost.fused is True
    else:
        with pytest.raises(ValueError, match="fused=True"):
            ghost.build((4, 3, 5, 2))


def test_config_and_keras_file_round_trip(tmp_path):
    layer = keras_bn.BatchNormalization(axis=[1, 3], momentum=None, renorm=True)
    clone = keras_bn.BatchNormalization.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    model = keras.Sequential([keras.Input((3, 2, 4)), keras_bn.BatchNormalization(momentum=None)])
    x = np.random.default_rng(0).normal(size=(6, 3, 2, 4)).astype(np.float32)
    model(x, training=True)
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(
        ops.convert_to_numpy(loaded(x)), ops.convert_to_numpy(model(x)), atol=1e-6
    )


def test_fit_updates_the_moving_statistics():
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 2.0, (64, 4)).astype(np.float32)
    layer = keras_bn.BatchNormalization(momentum=0.0)
    model = keras.Sequential([keras.Input((4,)), layer])
    model.compile(keras.optimizers.SGD(0.0), "mse")
    model.fit(x, np.zeros_like(x), batch_size=64, epochs=1, verbose=0, shuffle=False)
    np.testing.assert_allclose(_state(layer)[0], x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(_state(layer)[1], x.var(0) * 64 / 63, rtol=1e-5)


def test_float64_statistics_or_a_warning_where_the_backend_has_none():
    x = np.random.default_rng(0).normal(1e4, 1.0, (8, 3))
    without = BACKEND == "jax" and not keras_bn.backends.current().has_float64()
    layer = keras_bn.BatchNormalization(dtype="float64", momentum=0.0)
    if without:
        with pytest.warns(UserWarning, match="jax_enable_x64"):
            layer.build(x.shape)
    y = layer(x, training=True)
    dtype = "float32" if without else "float64"
    assert keras.backend.standardize_dtype(layer.moving_mean.value.dtype) == dtype
    assert keras.backend.standardize_dtype(y.dtype) == dtype
    tolerance = 1e-3 if without else 1e-9
    np.testing.assert_allclose(_state(layer)[0], x.mean(0), rtol=tolerance)


@pytest.mark.parametrize(
    "shape,axis,kwargs",
    [
        ((16, 5), -1, {}),
        ((4, 3, 3, 6), -1, {"renorm": True, "renorm_clipping": {"rmax": 1.2, "dmax": 0.3}}),
        ((4, 6, 3, 3), 1, {"momentum": None}),
        ((4, 3, 3, 6), [-2, -1], {}),
        ((8, 3, 3, 6), -1, {"virtual_batch_size": 2}),
        ((16, 5), -1, {"virtual_batch_size": 4, "momentum": None}),
    ],
    ids=[
        "dense",
        "nhwc_renorm",
        "nchw_cumulative",
        "two_feature_axes",
        "ghost",
        "ghost_cumulative",
    ],
)
def test_the_fast_path_equals_the_plain_path(shape, axis, kwargs):
    results = []
    for fused in (None, False):
        layer, x, dy, *_ = _setup(shape, axis, None, seed=4, fused=fused, **kwargs)
        if "renorm" in kwargs:  # renorm's r and d away from 1 and 0
            layer.renorm_stddev.assign(ops.full(layer.renorm_stddev.shape, 0.8))
        results.append((*gradients(layer, x, dy), *_state(layer)))
    for fast, plain in zip(*results):
        np.testing.assert_allclose(fast, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "shape,mask_kind",
    [((6, 5, 4), "rows"), ((24, 5), "entries"), ((24, 5), "empty_channel"), ((6, 5, 4), "nan")],
)
def test_masked_fast_path_equals_the_plain_path(shape, mask_kind):
    """Masked inputs (PyTorch's closed form; the plain path elsewhere) against the plain path:
    Keras's per-row mask, a mask per entry, a channel with every entry masked, and masked
    entries holding nan and inf (kept out of the statistics by ``where``)."""
    rng = np.random.default_rng(7)
    mask = rng.random(shape[:-1] if mask_kind in ("rows", "nan") else shape) < 0.7
    if mask_kind == "empty_channel":
        mask[:, 2] = False
    kept = np.broadcast_to(mask[..., None], shape) if mask.ndim < len(shape) else mask
    results = []
    for fused in (None, False):
        layer, x, dy, *_ = _setup(shape, -1, None, seed=5, fused=fused, momentum=0.5)
        if mask_kind == "nan":
            x = np.where(kept, x, np.where(rng.random(shape) < 0.5, np.nan, np.inf))
            x = x.astype(np.float32)
        y, dx, dgamma, dbeta = gradients(layer, x, dy, mask)
        # Masked entries that hold nan or inf give nan/inf outputs on every path: the kept ones
        # are compared, and the parameters' gradients (sums over every output) are nan on both.
        results.append((y[kept], dx[kept], dgamma, dbeta, *_state(layer)))
    for fast, plain in zip(*results):
        np.testing.assert_array_equal(np.isfinite(fast), np.isfinite(plain))
        finite = np.isfinite(plain)
        np.testing.assert_allclose(fast[finite], plain[finite], rtol=1e-5, atol=1e-5)
