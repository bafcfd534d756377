"""TensorFlow's fused training paths: FusedBatchNormV3 on the input's own 4-D view, and the XLA
formulation's per-channel sums, each equal to the plain path (or float64) to float rounding."""

import re

import numpy as np
import pytest
import tensorflow as tf
import tf_graph

import keras_bn
from keras_bn.backends import tensorflow as tf_backend

# input shape, axis, the 4-D view FusedBatchNormV3 runs on
VIEWS = [
    ((8, 5), -1, (8, 1, 1, 5)),
    ((6, 7, 5), -1, (6, 1, 7, 5)),
    ((4, 5, 6, 3), -1, (4, 5, 6, 3)),
    ((2, 3, 4, 5, 4), -1, (2, 12, 5, 4)),
    ((4, 5, 2, 3), [2, 3], (4, 1, 5, 6)),
    ((6, 5, 7), 1, (6, 5, 1, 7)),
    ((4, 3, 5, 6), 1, (4, 3, 5, 6)),
    ((2, 4, 3, 4, 5), 1, (2, 4, 12, 5)),
    ((4, 2, 3, 5), [1, 2], (4, 6, 1, 5)),
]
IDS = ["dense", "nwc", "nhwc", "ndhwc", "nhwc_2axes", "ncw", "nchw", "ncdhw", "nchw_2axes"]


def _view(shape, axis, batch=None):
    """The kernel's view of an input of ``shape`` (its batch size unknown when ``batch`` is
    None in the spec), from a traced function."""
    layer = keras_bn.BatchNormalization(axis=axis)
    layer.build(shape)
    num_axes = len(layer._feature_axes)
    channels = int(np.prod(layer._param_shape))

    @tf.function(input_signature=[tf.TensorSpec((batch,) + shape[1:])])
    def view(x):
        return tf_backend._kernel_view(x, layer._fused_layout, channels, num_axes)

    x = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    return view(x).numpy(), x


@pytest.mark.parametrize("shape,axis,expected", VIEWS, ids=IDS)
@pytest.mark.parametrize("known_batch", [True, False], ids=["static", "dynamic_batch"])
def test_kernel_view_is_4d_in_memory_order_with_the_real_last_spatial_axis(
    shape, axis, expected, known_batch
):
    # A 4-D NHWC/NCHW input reaches oneDNN with its own H and W (tf-keras's view), not as
    # [N*H*W, 1, 1, C].
    view, x = _view(shape, axis, shape[0] if known_batch else None)
    assert view.shape == expected
    np.testing.assert_array_equal(view.reshape(-1), x.reshape(-1))


def _step(layer, x, dy, jit=False):
    def step(x, dy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * dy)
        return [y] + tape.gradient(loss, [x, layer.gamma.value, layer.beta.value])

    spec = tf.TensorSpec((None,) + x.shape[1:])
    step = tf.function(step, jit_compile=jit, input_signature=[spec, spec])
    return [t.numpy() for t in step(x, dy)]


@pytest.mark.parametrize("renorm", [False, True], ids=["bn", "renorm"])
@pytest.mark.parametrize("shape,axis,expected", VIEWS, ids=IDS)
def test_kernel_on_its_view_equals_the_plain_path(shape, axis, expected, renorm):
    del expected
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, shape).astype(np.float32)
    dy = rng.normal(0.0, 1.0, shape).astype(np.float32)
    results = []
    for fused in (True, False):
        layer = keras_bn.BatchNormalization(axis=axis, fused=fused, renorm=renorm)
        layer.build(shape)
        channels = layer._param_shape
        layer.gamma.assign(np.linspace(0.5, 1.5, np.prod(channels)).reshape(channels))
        layer.beta.assign(np.linspace(-1.0, 1.0, np.prod(channels)).reshape(channels))
        if renorm:  # renorm averages away from the batch's: r and d are not 1 and 0
            layer.renorm_stddev.assign(np.full(channels, 2.5, np.float32))
            layer.renorm_mean.assign(np.full(channels, 1.5, np.float32))
        outputs = _step(layer, x, dy)
        results.append(outputs + [layer.moving_mean.numpy(), layer.moving_variance.numpy()])
    names = ["y", "dx", "dgamma", "dbeta", "moving_mean", "moving_variance"]
    for name, kernel, plain in zip(names, *results):
        np.testing.assert_allclose(kernel, plain, rtol=2e-5, atol=2e-5, err_msg=name)


@pytest.mark.parametrize("columns", [5, None], ids=["static_columns", "dynamic_columns"])
@pytest.mark.parametrize("rows", [0, 1, 15, 16, 17, 4099])
def test_channel_sums_equal_float64_sums_for_any_row_count(rows, columns):
    # Blocks of 16 rows, the last one padded with zeros; no rows gives zeros.
    x = np.random.default_rng(rows).normal(3.0, 1.0, (rows, 5)).astype(np.float32)

    @tf.function(jit_compile=True, input_signature=[tf.TensorSpec((None, columns))])
    def sums(values):
        return tf_backend._channel_sums(values * 2.0)

    expected = 2.0 * x.astype(np.float64).sum(0)
    np.testing.assert_allclose(sums(x).numpy(), expected, rtol=1e-6, atol=1e-5)


def test_xla_formulation_is_twice_differentiable_through_its_sums():
    # The optimization barrier has no gradient of its own: the sums give it the identity's.
    x = tf.constant(np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32))
    with tf.GradientTape() as outer:
        outer.watch(x)
        with tf.GradientTape() as inner:
            inner.watch(x)
            total = tf.reduce_sum(tf_backend._channel_sums(x * x))
        grad = inner.gradient(total, x)
        norm = tf.reduce_sum(grad * grad)
    np.testing.assert_allclose(grad.numpy(), 2.0 * x.numpy(), rtol=1e-6)
    np.testing.assert_allclose(outer.gradient(norm, x).numpy(), 8.0 * x.numpy(), rtol=1e-6)


def _full_size_results(shape):
    """The instructions of the optimized XLA training step that write a tensor of the input's
    size, as ``(name, shape)``."""
    layer = keras_bn.BatchNormalization()
    layer.build(shape)

    @tf.function(jit_compile=True)
    def step(x, dy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x, training=True) * dy)
        return tape.gradient(loss, [x, layer.gamma.value, layer.beta.value])

    x = tf.random.normal(shape)
    hlo = step.experimental_get_compiler_ir(x, x)(stage="optimized_hlo")
    entry = hlo[hlo.index("ENTRY") :]
    entry = entry[: entry.index("\n}")]
    size = int(np.prod(shape))
    written = []
    for name, dims, op in re.findall(r"%(\S+) = f32\[([\d,]*)\]\S* (\S+?)\(", entry):
        elements = int(np.prod([int(d) for d in dims.split(",") if d]))
        if elements == size and op not in ("parameter", "bitcast"):
            written.append((name, op))
    return written


@pytest.mark.parametrize("shape", [(4096, 8), (16, 16, 16, 8)], ids=["dense", "nhwc"])
def test_xla_step_writes_one_full_size_tensor(shape):
    # The gradient w.r.t. the input is the only tensor of the input's size the step stores
    # (y is dead here): (x - mean)^2 and dy * x_hat are reduced where they are computed.
    assert len(_full_size_results(shape)) == 1, _full_size_results(shape)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_renorm_outputs_and_update_share_one_read_of_each_average(fused):
    # Renorm's outputs read renorm_mean / renorm_stddev, which the same step overwrites. With a
    # read of their own, only that read op was ordered before the AssignVariableOp, and
    # Grappler's dependency optimizer drops the edge: under load the fused step then normalized
    # with its own update's averages (the kernel test above failed about one run in three beside
    # two busy processes). One read feeding both orders the assign after it by data.
    layer = keras_bn.BatchNormalization(axis=[1, 2], fused=fused, renorm=True)
    layer.build((4, 2, 3, 5))
    outputs = []

    @tf.function(input_signature=[tf.TensorSpec((None, 2, 3, 5))])
    def step(x):
        outputs.append(layer(x, training=True))
        return outputs[-1]

    graph = step.get_concrete_function().graph
    for variable in (layer.renorm_mean, layer.renorm_stddev):
        reads, (assign,) = tf_graph.variable_ops(graph, variable.value)
        assert len(reads) == 1, [op.name for op in reads]
        assert reads[0].name in tf_graph.data_ancestors(outputs[0].op)
        assert reads[0].name in tf_graph.data_ancestors(assign), f"{assign.name} may run first"
