"""Batch Renormalization (Ioffe, 2017): the NumPy oracle of the renorm paper's Alg. 1 on every
path (generic, masked, fused kernel, XLA), and loading Keras 3's renorm layers."""

import bn_oracle
import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_bn

CLIPPING = {"rmin": 0.8, "rmax": 1.25, "dmax": 0.4}

# name, input shape, axis, mask shape
CASES = [
    ("dense", (16, 5), -1, None),
    ("nhwc", (4, 3, 3, 6), -1, None),
    ("nchw", (4, 6, 3, 3), 1, None),
    ("sequence_mask", (6, 7, 5), -1, (6, 7)),
]


def _layer_and_data(shape, axis, mask_shape, fused, momentum=0.9, seed=0):
    rng = np.random.default_rng(seed)
    layer = keras_bn.BatchNormalization(
        axis=axis,
        momentum=momentum,
        renorm=True,
        renorm_clipping=CLIPPING,
        renorm_momentum=0.7,
        fused=fused,
    )
    layer.build(shape)
    channels = layer._param_shape
    spread = np.linspace(0.0, 1.0, int(np.prod(channels))).reshape(channels)
    # Renorm averages spread around the batch's statistics (mean 3, stddev 2), so some
    # channels clip r from below, some from above, and some clip d.
    for variable, value in (
        (layer.gamma, rng.uniform(0.5, 1.5, channels)),
        (layer.beta, rng.uniform(-1, 1, channels)),
        (layer.renorm_mean, 3.0 + 2.0 * (spread - 0.5)),
        (layer.renorm_stddev, 1.0 + 3.0 * spread),
        (layer.moving_mean, rng.normal(0, 1, channels)),
        (layer.moving_stddev, rng.uniform(0.5, 2.0, channels)),
    ):
        variable.assign(value.astype(np.float32))
    x = rng.normal(3.0, 2.0, shape).astype(np.float32)
    dy = rng.normal(size=shape).astype(np.float32)
    mask = None if mask_shape is None else rng.random(mask_shape) < 0.7
    return layer, x, dy, mask


def _keepdims(layer, v):
    shape = [d if a in layer._feature_axes else 1 for a, d in enumerate(layer._broadcast_shape)]
    return np.asarray(v, np.float64).reshape(shape)


def _state(layer):
    return tuple(
        _keepdims(layer, v.numpy())
        for v in (layer.moving_mean, layer.moving_stddev, layer.renorm_mean, layer.renorm_stddev)
    )


@pytest.mark.parametrize("name,shape,axis,mask_shape", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("fused", [None, True, False], ids=["xla", "kernel", "plain"])
def test_renorm_matches_paper_algorithm_1(name, shape, axis, mask_shape, fused):
    layer, x, dy, mask = _layer_and_data(shape, axis, mask_shape, fused)
    red = tuple(a for a in range(len(shape)) if a not in layer._feature_axes)
    full_mask = None if mask is None else np.broadcast_to(mask[..., None], shape)
    gamma, beta = _keepdims(layer, layer.gamma.numpy()), _keepdims(layer, layer.beta.numpy())
    state = _state(layer)
    eps = layer.epsilon
    r, d = bn_oracle.renorm_correction(
        x,
        red,
        eps,
        state[2],
        state[3],
        CLIPPING["rmin"],
        CLIPPING["rmax"],
        CLIPPING["dmax"],
        full_mask,
    )
    # Clipping is exercised: r at both bounds, d at dmax.
    assert np.any(r == CLIPPING["rmin"]) and np.any(r == CLIPPING["rmax"])
    assert np.any(np.abs(d) == CLIPPING["dmax"])

    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = layer(xt, training=True, mask=mask)
        loss = tf.reduce_sum(y * dy)
    dx, dgamma, dbeta = tape.gradient(loss, [xt, layer.gamma, layer.beta])

    ref_y = bn_oracle.renorm_forward(x, red, gamma, beta, eps, r, d, full_mask)
    ref_dx, ref_dgamma, ref_dbeta = bn_oracle.renorm_backward(
        x, dy, red, gamma, eps, r, d, full_mask
    )
    np.testing.assert_allclose(y.numpy(), ref_y, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dx.numpy(), ref_dx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dgamma.numpy(), ref_dgamma.reshape(-1), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(dbeta.numpy(), ref_dbeta.reshape(-1), rtol=1e-4, atol=1e-3)

    ref_state, ref_variance = bn_oracle.renorm_state_after(
        x, red, eps, state, 0.9, 0.7, unbiased=True, mask=full_mask
    )
    for got, want in zip(_state(layer), ref_state):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        _keepdims(layer, layer.moving_variance.numpy()), ref_variance, rtol=1e-5, atol=1e-5
    )


def test_r_and_d_carry_no_gradient():
    # With r and d constant, the input gradient is Alg. 1's with gamma * r: if r, d were
    # differentiated, dx would also flow through the renorm correction's batch statistics.
    layer, x, dy, _ = _layer_and_data((16, 5), -1, None, fused=False, seed=3)
    red = (0,)
    state = _state(layer)
    r, d = bn_oracle.renorm_correction(x, red, layer.epsilon, state[2], state[3], **CLIPPING)
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        loss = tf.reduce_sum(layer(xt, training=True) * dy)
    gamma = _keepdims(layer, layer.gamma.numpy())
    ref_dx, _, _ = bn_oracle.renorm_backward(x, dy, red, gamma, layer.epsilon, r, d)
    np.testing.assert_allclose(tape.gradient(loss, xt).numpy(), ref_dx, rtol=1e-4, atol=1e-4)


def test_renorm_inference_uses_moving_statistics_only():
    layer, x, _, _ = _layer_and_data((16, 5), -1, None, fused=None)
    mean, variance = layer.moving_mean.numpy(), layer.moving_variance.numpy()
    gamma, beta = layer.gamma.numpy(), layer.beta.numpy()
    expected = gamma * (x - mean) / np.sqrt(variance + layer.epsilon) + beta
    np.testing.assert_allclose(layer(x, training=False).numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("clipping", [None, {"rmax": 3.0, "rmin": 0.3, "dmax": 5.0}])
@pytest.mark.parametrize("shape", [(32, 6), (8, 4, 4, 6)])
def test_keras_renorm_config_and_weights_give_the_same_outputs(clipping, shape):
    rng = np.random.default_rng(1)
    theirs = keras.layers.BatchNormalization(
        renorm=True, renorm_clipping=clipping, renorm_momentum=0.8, momentum=0.9
    )
    batches = [rng.normal(2.0, 3.0, shape).astype(np.float32) for _ in range(4)]
    for x in batches[:2]:
        theirs(x, training=True)
    ours = keras_bn.BatchNormalization.from_config(
        {**theirs.get_config(), "unbiased_variance": False}
    )
    ours.build(shape)
    ours.set_weights(theirs.get_weights())
    assert [w.name for w in ours.weights] == [w.name for w in theirs.weights]
    for x in batches[2:]:
        np.testing.assert_allclose(
            ours(x, training=True).numpy(), theirs(x, training=True).numpy(), atol=2e-5
        )
        for mine, keras_weight in zip(ours.weights, theirs.weights):
            np.testing.assert_allclose(mine.numpy(), keras_weight.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(
            ours(x, training=False).numpy(), theirs(x, training=False).numpy(), atol=2e-5
        )


def test_keras_renorm_model_file_loads_into_ours(tmp_path):
    inputs = keras.Input((6,))
    model = keras.Model(inputs, keras.layers.BatchNormalization(renorm=True)(inputs))
    x = np.random.default_rng(2).normal(1.0, 2.0, (32, 6)).astype(np.float32)
    model(x, training=True)
    path = str(tmp_path / "keras.weights.h5")
    model.save_weights(path)
    ours_model = keras.Model(inputs, keras_bn.BatchNormalization(renorm=True)(inputs))
    ours_model.load_weights(path)
    np.testing.assert_allclose(ours_model(x).numpy(), model(x).numpy(), atol=1e-6)


def test_renorm_with_cumulative_moving_average():
    layer = keras_bn.BatchNormalization(momentum=None, renorm=True, unbiased_variance=False)
    rng = np.random.default_rng(4)
    batches = [rng.normal(i, 1.0 + i, (20, 3)).astype(np.float32) for i in range(3)]
    for x in batches:
        layer(x, training=True)
    stddevs = [np.sqrt(b.var(0) + layer.epsilon) for b in batches]
    np.testing.assert_allclose(layer.moving_count.numpy(), [3, 3, 3])
    np.testing.assert_allclose(
        layer.moving_mean.numpy(), np.mean([b.mean(0) for b in batches], 0), rtol=1e-5
    )
    # The cumulative average's first batch replaces the initial stddev.
    np.testing.assert_allclose(layer.moving_stddev.numpy(), np.mean(stddevs, 0), rtol=1e-5)


def test_renorm_argument_errors_match_keras():
    with pytest.raises(ValueError, match="Received invalid keys"):
        keras_bn.BatchNormalization(renorm=True, renorm_clipping={"random_key": 1.0})
    with pytest.raises(ValueError, match="rmax should be"):
        keras_bn.BatchNormalization(renorm=True, renorm_clipping={"rmax": 0.0, "rmin": 1.0})
    with pytest.raises(ValueError, match="dmax should be non-negative"):
        keras_bn.BatchNormalization(renorm=True, renorm_clipping={"dmax": -1.0})
    with pytest.raises(ValueError, match="renorm_momentum"):
        keras_bn.BatchNormalization(renorm=True, renorm_momentum=1.0)


RENORM_ACROSS_REPLICAS = """
from test_distributed import PRELUDE
exec(PRELUDE.format(replicas=3))
from test_layer_renorm import CLIPPING

def case(sizes, tail, synchronized, mask_tail=None, seed=0):
    rng = np.random.default_rng(seed)
    xs = [rng.normal(rng.normal(3, 2), rng.uniform(0.5, 3), (n,) + tail).astype(np.float32)
          for n in sizes]
    dys = [rng.normal(size=(n,) + tail).astype(np.float32) for n in sizes]
    masks = None if mask_tail is None else [rng.random((n,) + mask_tail) < 0.7 for n in sizes]
    c = tail[-1]
    with strategy.scope():
        layer = keras_bn.BatchNormalization(
            momentum=0.5, renorm=True, renorm_clipping=CLIPPING, renorm_momentum=0.7,
            synchronized=synchronized)
        layer.build((None,) + tail)
    layer.renorm_mean.assign(np.linspace(1.0, 5.0, c).astype(np.float32))
    layer.renorm_stddev.assign(np.linspace(1.0, 4.0, c).astype(np.float32))
    layer.gamma.assign(np.linspace(0.5, 1.5, c).astype(np.float32))
    state = [v.numpy().astype(np.float64) for v in (
        layer.moving_mean, layer.moving_stddev, layer.renorm_mean, layer.renorm_stddev)]
    gamma = layer.gamma.numpy().astype(np.float64)
    per_replica = lambda arrays: strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(arrays[ctx.replica_id_in_sync_group]))

    @tf.function
    def run(x, dy, m):
        def step(x, dy, m):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_sum(layer(x, training=True, mask=m) * dy)
            dx, dg, db = tape.gradient(loss, [x, layer.gamma.value, layer.beta.value])
            ctx = tf.distribute.get_replica_context()
            return dx, ctx.all_reduce("sum", dg), ctx.all_reduce("sum", db)
        return strategy.run(step, args=(x, dy, m))

    @tf.function
    def forward(x, m):
        return strategy.run(lambda x, m: layer(x, training=True, mask=m), args=(x, m))

    dist_m = per_replica(masks) if masks else None
    local = lambda t: [v.numpy() for v in strategy.experimental_local_results(t)]
    # Outputs from a forward whose update we undo, then the gradient step (one update).
    saved = [v.numpy() for v in layer.non_trainable_weights]
    y = local(forward(per_replica(xs), dist_m))
    for v, s in zip(layer.non_trainable_weights, saved):
        v.assign(s)
    dx, dg, db = run(per_replica(xs), per_replica(dys), dist_m)
    dx, dg, db = local(dx), local(dg)[0], local(db)[0]
    groups = [slice(0, sum(sizes))] if synchronized else [
        slice(sum(sizes[:i]), sum(sizes[:i + 1])) for i in range(len(sizes))]
    x, dy = np.concatenate(xs), np.concatenate(dys)
    y, dx = np.concatenate(y), np.concatenate(dx)
    mask = None if not masks else np.broadcast_to(np.concatenate(masks)[..., None], x.shape)
    red = tuple(range(x.ndim - 1))
    ref_dg = np.zeros(c)
    ref_db = np.zeros(c)
    for g in groups:
        m = None if mask is None else mask[g]
        r, d = bn_oracle.renorm_correction(x[g], red, layer.epsilon, state[2], state[3],
                                           mask=m, **CLIPPING)
        np.testing.assert_allclose(y[g], bn_oracle.renorm_forward(
            x[g], red, gamma, 0.0, layer.epsilon, r, d, m), rtol=1e-4, atol=1e-4)
        ref_dx, g_dg, g_db = bn_oracle.renorm_backward(x[g], dy[g], red, gamma, layer.epsilon,
                                                       r, d, m)
        np.testing.assert_allclose(dx[g], ref_dx, rtol=1e-4, atol=1e-4)
        ref_dg += g_dg.reshape(-1)
        ref_db += g_db.reshape(-1)
    np.testing.assert_allclose(dg, ref_dg, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(db, ref_db, rtol=1e-4, atol=1e-3)
    # Moving statistics: the global batch (also for the local layer), identical on replicas.
    ref_state, ref_var = bn_oracle.renorm_state_after(
        x, red, layer.epsilon, state, 0.5, 0.7, unbiased=True, mask=mask)
    names = ("moving_mean", "moving_stddev", "renorm_mean", "renorm_stddev")
    for name, want in zip(names, ref_state):
        copies = local(getattr(layer, name).value)
        for got in copies:
            np.testing.assert_allclose(got, want.reshape(-1), rtol=1e-5, atol=1e-5)
    print("OK", synchronized, mask_tail)

case([5, 3, 4], (2, 2, 4), synchronized=True)               # fused synced path
case([5, 3, 4], (6, 4), synchronized=True, mask_tail=(6,))   # masked: generic synced path
case([5, 3, 4], (2, 2, 4), synchronized=False, seed=1)       # local r, d on each replica
"""


def test_renorm_across_replicas_matches_oracle_on_global_and_local_batches(python_subprocess):
    out = python_subprocess(RENORM_ACROSS_REPLICAS)
    assert out.count("OK") == 3


RENORM_READS_ACROSS_REPLICAS = """
from test_distributed import PRELUDE
exec(PRELUDE.format(replicas=3))
import tf_graph

for synchronized in (False, True):
    with strategy.scope():
        layer = keras_bn.BatchNormalization(renorm=True, synchronized=synchronized)
        layer.build((None, 2, 2, 4))

    @tf.function(input_signature=[tf.TensorSpec((None, 2, 2, 4))])
    def step(x):
        return strategy.run(lambda x: layer(x, training=True), args=(x,))

    graph = step.get_concrete_function().graph
    for variable in (layer.renorm_mean, layer.renorm_stddev):
        for copy in variable.value.values:  # each replica's own
            reads, (assign,) = tf_graph.variable_ops(graph, copy)
            assert len(reads) == 1, [op.name for op in reads]
            assert reads[0].name in tf_graph.data_ancestors(assign), (copy.name, assign.name)
    print("OK", synchronized)
"""


def test_each_replica_update_moves_the_averages_its_outputs_read(python_subprocess):
    # MirroredStrategy calls one layer from a thread per replica at once: the read that feeds a
    # replica's update must be that replica's own (state kept on the layer for the call mixed
    # replicas up, and a replica's update no longer depended on its own read).
    out = python_subprocess(RENORM_READS_ACROSS_REPLICAS)
    assert out.count("OK") == 2
