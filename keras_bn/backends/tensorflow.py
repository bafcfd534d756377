"""The TensorFlow backend: ``tf.distribute`` replica exchanges and the fused training paths.

What differs on TensorFlow from the ``keras.ops`` layer (``keras_bn.layer``):

- **Replicas.** Under a ``tf.distribute`` strategy the layer's ``call`` sees one replica's
  batch. :func:`replica_group` names the replica context; :func:`all_reduce_sum` is its one
  exchange (an in-graph sum under MirroredStrategy, whose replicas share one graph);
  :func:`synced_moments` gives the global batch's moments with one exchange forward and one
  backward.
- **Fused paths**, for inputs whose feature axes form one contiguous block, either last
  ("NHWC"-like) or right after the batch axis ("NCHW"-like), of any rank:

  - ``"kernel"``: TensorFlow's FusedBatchNormV3 and FusedBatchNormGradV3 (cuDNN on a GPU).
  - ``"xla"``: the same math written as two small XLA-compiled functions (forward; and the
    paper's closed-form backward) tied together by ``tf.custom_gradient``. Inside an outer
    ``jit_compile`` it fuses with its neighbours; it also implements the cross-replica and the
    ghost-batch variants, which the kernel cannot.

Which fused implementation is faster depends on the machine (``python benchmarks/layer_step.py
--suite fused``; tables in ``docs/benchmarks.md``). On CPUs where TensorFlow runs its oneDNN
kernels the kernel takes 0.65-0.85x the XLA formulation's time outside XLA; where it leaves
oneDNN off (its default on some CPUs, e.g. without AVX-512), TensorFlow's own kernel takes
1.55-1.61x. Inside an outer ``jit_compile`` the kernel is not a kernel any more: XLA lowers
FusedBatchNormV3 with ``E[x^2] - E[x]^2``, which loses the statistics of data far from zero,
so there the XLA formulation always runs (``fused=True`` included). Hence
:func:`default_implementation`.

Both compute the one training transform of :mod:`keras_bn.transform` (Batch Renormalization
included: it only changes gamma and beta per channel), for any rank, with statistics over
every axis but ``C``. The kernel sees the input as a 4-D tensor in its own memory order, its
real last spatial axis kept (:func:`_kernel_view`); the XLA formulation views it as ``[A, C]``
(channels-last) or ``[A, C, B]`` (channels-first).
"""

from __future__ import annotations

import math

import tensorflow as tf

from keras_bn import moments as moments_lib
from keras_bn import transform
from keras_bn.moments import Moments, merge_packed_rows, pack_row

# cuDNN's fused kernel refuses epsilon below 1e-5.
KERNEL_MIN_EPSILON = 1.001e-5


def default_implementation() -> str:
    """The XLA formulation inside XLA compilation (where the kernel would be lowered with
    ``E[x^2] - E[x]^2``); outside it the fused kernel where a GPU is visible (cuDNN; not
    measured here) and on CPUs where TensorFlow runs oneDNN, else the XLA formulation (see the
    module docstring)."""
    if _inside_xla_compilation():
        return "xla"
    if tf.config.list_logical_devices("GPU"):
        return "kernel"
    return "kernel" if onednn_enabled() else "xla"


def onednn_enabled() -> bool:
    """Whether TensorFlow runs its oneDNN CPU kernels (True when it cannot tell)."""
    try:
        # No public query; the benchmarks print the same flag.
        from tensorflow.python.util import _pywrap_util_port

        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):  # pragma: no cover
        return True


def _inside_xla_compilation() -> bool:
    """True while tracing inside a ``jit_compile=True`` function (or when TF cannot tell)."""
    try:
        # TF has no public test for this; tf-keras uses the same module.
        from tensorflow.python.ops import control_flow_util
    except ImportError:  # pragma: no cover - a TF release without it keeps the old default
        return True
    return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))


def _as_channels_second(x, layout, channels, num_feature_axes):
    """``[A, C]`` for channels-last (cheapest for XLA to reduce), ``[A, C, B]`` otherwise."""
    if layout == "NHWC":
        return tf.reshape(x, [-1, channels])
    shape = tf.shape(x)
    rest = tf.reduce_prod(shape[1 + num_feature_axes :])
    return tf.reshape(x, tf.stack([shape[0], channels, rest]))


def _reduction_axes(x):
    return [0] if x.shape.rank == 2 else [0, 2]


# Rows per block in the first stage of :func:`_channel_sums` (8, 16 and 32 measured alike).
_BLOCK_ROWS = 16


def _channel_sums(values):
    """Per-channel sums of an expression computed inside an XLA-compiled function.

    On the ``[A, C]`` view the sum runs in two stages: blocks of ``_BLOCK_ROWS`` rows, then the
    ``[A / 16, C]`` block sums, with an optimization barrier between them so XLA keeps them
    apart. Summed in one ``reduce``, XLA's CPU backend splits the reduction itself but first
    writes ``values`` out in full and reads it back: two extra passes over the tensor per
    sum, 12 instead of 8 for a training step (counted in the optimized HLO; the two-stage form
    takes 0.6-0.7x the step's time on (32, 28, 28, 192) and (4096, 1024)). The first stage of the
    two-stage form fuses with the expression, so ``values`` is never stored; blocked sums also
    round less than one long running sum. Other views use one ``reduce``.
    """
    if values.shape.rank != 2 or _optimization_barrier is None:
        return tf.reduce_sum(values, _reduction_axes(values))
    rows = _BLOCK_ROWS
    # Zero rows up to a multiple of the block (a no-op XLA removes when A is one already).
    padding = tf.math.floormod(-tf.shape(values)[0], rows)
    columns = values.shape[1] if values.shape[1] is not None else tf.shape(values)[1]
    blocks = tf.reshape(tf.pad(values, [[0, padding], [0, 0]]), [-1, rows, columns])
    return tf.reduce_sum(_kept_apart(tf.reduce_sum(blocks, 1)), 0)


@tf.custom_gradient
def _kept_apart(value):
    """``value``, computed by XLA apart from its users (TensorFlow defines no gradient for the
    barrier; it is the identity's)."""
    (kept,) = _optimization_barrier(value)
    return kept, lambda upstream: upstream


def _load_optimization_barrier():
    try:
        from tensorflow.compiler.tf2xla.python import xla
    except ImportError:  # pragma: no cover - then every sum is one reduce
        return None
    return getattr(xla, "optimization_barrier", None)


_optimization_barrier = _load_optimization_barrier()


def _per_channel(v, x):
    """A statistic shaped to broadcast against ``x``: length C for ``[A, C]`` or ``[A, C, B]``,
    ``[G, C]`` for the ghost-batch view ``[v, G, B, C]``."""
    if x.shape.rank == 2:
        return v
    if x.shape.rank == 3:
        return v[:, None]
    return v if v.shape.rank == 1 else v[None, :, None, :]


def _summed_over_ghost_batches(d_gamma, d_beta, x):
    """gamma/beta gradients: per channel, summed over the ghost batches of the ghost view.

    One reduction of the stacked ``[2, G, C]`` sums. Reduced one by one, XLA's algebraic
    simplifier folds each "sum over ghost batches of a per-ghost-batch sum" into a second
    full pass over ``dy`` and over ``dy * x_hat`` (measured on CPU: 11 full-tensor reads per
    step instead of 9, and 1.1-1.2x tf-keras's time on (32, 56, 56, 64); see
    ``docs/benchmarks.md``).
    """
    if x.shape.rank != 4:
        return d_gamma, d_beta
    return tf.unstack(tf.reduce_sum(tf.stack([d_gamma, d_beta]), 1))


def batch_norm_training(
    x, gamma, beta, epsilon, layout, channels, num_feature_axes, implementation, renorm=None
):
    """Alg. 1 on ``x``: returns ``(y, mean, variance)``.

    Args:
        x: float32/float16/bfloat16 input of any rank.
        gamma, beta: float32 vectors of length ``channels`` (ones/zeros when disabled).
        epsilon: Python float.
        layout: "NHWC" or "NCHW" (see :func:`fused_layout`).
        channels: product of the feature dimensions.
        num_feature_axes: how many axes the feature block spans.
        implementation: "kernel" or "xla".
        renorm: optional :class:`keras_bn.transform.Renorm` (length-``channels`` fields):
            Batch Renormalization's correction of gamma and beta.

    Returns:
        ``y`` with the shape and dtype of ``x``; float32 ``mean`` and *biased* ``variance``
        of length ``channels``.
    """
    if implementation == "kernel":
        x4 = _kernel_view(x, layout, channels, num_feature_axes)
        y4, mean, variance = _kernel_training(x4, gamma, beta, epsilon, layout, renorm)
        return tf.reshape(y4, tf.shape(x)), mean, variance
    x3 = _as_channels_second(x, layout, channels, num_feature_axes)
    y3, mean, variance = _xla_training(x3, gamma, beta, tf.constant(epsilon, tf.float32), renorm)
    return tf.reshape(y3, tf.shape(x)), mean, variance


def _kernel_view(x, layout, channels, num_feature_axes):
    """``x`` as the 4-D tensor FusedBatchNormV3 takes, in the same memory order: ``[N, S, W, C]``
    (NHWC) or ``[N, C, S, W]`` (NCHW), where ``W`` is the last non-feature axis and ``S`` the
    product of the others after the batch axis (1 where there are none). A 4-D input with one
    feature axis is passed as it is.

    tf-keras passes the real shape too. oneDNN's kernels (TensorFlow's default on x86 CPUs)
    run the same values viewed as ``[N * H * W, 1, 1, C]`` a little slower: 2-4% more CPU
    time for the forward and backward kernels on (32, 28, 28, 192), measured on a loaded
    2-core machine (small against its noise).
    """
    rank = x.shape.rank
    if rank == 4 and num_feature_axes == 1:
        return x
    shape = tf.shape(x)
    if layout == "NHWC":
        spatial = shape[1 : rank - num_feature_axes]
    else:
        spatial = shape[1 + num_feature_axes :]
    spatial = tf.concat([[1, 1], spatial], 0)
    outer, inner = tf.reduce_prod(spatial[:-1]), spatial[-1]
    if layout == "NHWC":
        return tf.reshape(x, tf.stack([shape[0], outer, inner, channels]))
    return tf.reshape(x, tf.stack([shape[0], channels, outer, inner]))


def _kernel_training(x4, gamma, beta, epsilon, layout, renorm=None):
    if renorm is not None:
        return _kernel_renorm_training(x4, gamma, beta, epsilon, layout, renorm)
    y4, mean, variance, _ = _kernel_forward(x4, gamma, beta, epsilon, layout)
    return y4, mean, variance


def _kernel_forward(x4, gamma, beta, epsilon, layout):
    """FusedBatchNormV3 in training mode: ``(y4, mean, biased variance, reserve spaces)``."""
    empty = tf.zeros([0], tf.float32)
    y4, mean, corrected, *reserve = tf.raw_ops.FusedBatchNormV3(
        x=x4,
        scale=gamma,
        offset=beta,
        mean=empty,
        variance=empty,
        epsilon=epsilon,
        exponential_avg_factor=1.0,
        data_format=layout,
        is_training=True,
    )
    count = tf.cast(tf.size(x4) // tf.size(mean), tf.float32)
    # The kernel returns n/(n-1) * var (0 for n == 1); give back the biased variance.
    variance = corrected * tf.maximum(count - 1.0, 0.0) / tf.maximum(count, 1.0)
    return y4, mean, variance, reserve


def _kernel_renorm_training(x4, gamma, beta, epsilon, layout, renorm):
    """Renorm on the kernel: the corrected gamma/beta depend on this batch's moments, so the
    kernel normalizes (gamma 1, beta 0) and one per-channel multiply-add applies them; the
    backward is ONE FusedBatchNormGradV3 with gamma * r, as for plain BN."""

    def per_channel(v):
        return v if layout == "NHWC" else v[:, None, None]

    @tf.custom_gradient
    def training(x4, gamma, beta):
        # float32 in: the kernel returns x_hat in its input dtype, and renorm's scale and
        # offset must apply to the unrounded x_hat.
        x32 = tf.cast(x4, tf.float32)
        x_hat, mean, variance, reserve = _kernel_forward(
            x32, tf.ones_like(gamma), tf.zeros_like(beta), epsilon, layout
        )
        correction = transform.renorm_correction(mean, variance, epsilon, renorm)
        scale, offset = transform.corrected_params(gamma, beta, correction)
        y4 = tf.cast(x_hat * per_channel(scale) + per_channel(offset), x4.dtype)

        def grad(dy4, d_mean, d_variance):
            del d_mean, d_variance  # statistics feed only the moving averages
            dx, sum_dy_x_hat, sum_dy, _, _ = tf.raw_ops.FusedBatchNormGradV3(
                y_backprop=tf.cast(dy4, tf.float32),
                x=x32,
                scale=scale,
                reserve_space_1=reserve[0],
                reserve_space_2=reserve[1],
                reserve_space_3=reserve[2],
                epsilon=epsilon,
                data_format=layout,
                is_training=True,
            )
            d_gamma, d_beta = transform.params_grad(sum_dy, sum_dy_x_hat, correction)
            return tf.cast(dx, x4.dtype), d_gamma, d_beta

        return (y4, mean, variance), grad

    return training(x4, gamma, beta)


# ---- XLA formulation. The Python helpers below are traced into each compiled function.


def _corrected_affine(x, mean, variance, gamma, beta, epsilon, renorm):
    """The transform with renorm's correction (if any), for length-C statistics:
    ``(y, correction)``."""
    multiplier, offset, correction = transform.training_scale_and_offset(
        mean, variance, gamma, beta, epsilon, renorm
    )
    y = transform.apply(
        x, _per_channel(mean, x), _per_channel(multiplier, x), _per_channel(offset, x)
    )
    return y, correction


def _normalized(x, mean, variance, epsilon):
    """``x_hat = (x - mean) / sqrt(variance + epsilon)`` for length-C statistics."""
    return (x - _per_channel(mean, x)) * _per_channel(tf.math.rsqrt(variance + epsilon), x)


def _grad_sums(dy, x, mean, variance, epsilon):
    """(sum dy, sum dy * x_hat) per channel: dbeta and dgamma, the two reductions dx needs."""
    axes = _reduction_axes(x)
    x_hat = _normalized(x, mean, variance, epsilon)
    return tf.reduce_sum(dy, axes), _channel_sums(dy * x_hat), x_hat


def _input_grad(dy, x_hat, variance, gamma, epsilon, sum_dy, sum_dy_x_hat, n):
    """The paper's chain rule for Alg. 1: dx from dy and the (possibly global) sums over n."""
    scale = gamma * tf.math.rsqrt(variance + epsilon) / n
    return _per_channel(scale, dy) * (
        n * dy - _per_channel(sum_dy, dy) - x_hat * _per_channel(sum_dy_x_hat, dy)
    )


def _count(x):
    """Values behind each statistic (per ghost batch in the ghost view)."""
    statistics = tf.shape(x)[1] * (tf.shape(x)[3] if x.shape.rank == 4 else 1)
    return tf.cast(tf.size(x) // statistics, tf.float32)


def _params_and_input_grads(
    dy, x_hat, variance, gamma, epsilon, sum_dy, sum_dy_x_hat, n, correction
):
    """``(dx, dgamma, dbeta)`` of the (possibly renorm-corrected) transform."""
    scale = transform.corrected_scale(gamma, correction)
    dx = _input_grad(dy, x_hat, variance, scale, epsilon, sum_dy, sum_dy_x_hat, n)
    d_gamma, d_beta = transform.params_grad(sum_dy, sum_dy_x_hat, correction)
    return dx, d_gamma, d_beta


@tf.function(jit_compile=True)
def _xla_forward(x3, gamma, beta, epsilon, renorm):
    x = tf.cast(x3, tf.float32)
    mean = _channel_sums(x) / _count(x)
    squares = _channel_sums(tf.math.squared_difference(x, _per_channel(mean, x)))
    variance = squares / _count(x)
    y, correction = _corrected_affine(x, mean, variance, gamma, beta, epsilon, renorm)
    return tf.cast(y, x3.dtype), mean, variance, correction


@tf.function(jit_compile=True)
def _xla_backward(dy3, x3, mean, variance, gamma, epsilon, correction):
    x, dy = tf.cast(x3, tf.float32), tf.cast(dy3, tf.float32)
    sum_dy, sum_dy_x_hat, x_hat = _grad_sums(dy, x, mean, variance, epsilon)
    dx, d_gamma, d_beta = _params_and_input_grads(
        dy, x_hat, variance, gamma, epsilon, sum_dy, sum_dy_x_hat, _count(x), correction
    )
    d_gamma, d_beta = _summed_over_ghost_batches(d_gamma, d_beta, x)
    return tf.cast(dx, x3.dtype), d_gamma, d_beta


def _xla_training(x3, gamma, beta, epsilon, renorm=None):
    @tf.custom_gradient
    def training(x3, gamma, beta):
        y3, mean, variance, correction = _xla_forward(x3, gamma, beta, epsilon, renorm)

        def grad(dy3, d_mean, d_variance):
            # The mean/variance outputs only feed the moving statistics (no gradient).
            del d_mean, d_variance
            return _xla_backward(dy3, x3, mean, variance, gamma, epsilon, correction)

        return (y3, mean, variance), grad

    return training(x3, gamma, beta)


def ghost_batch_norm_training(x, gamma, beta, epsilon, channels, ghost_size):
    """Ghost batch normalization with the XLA formulation, for feature axes last.

    ``x`` is viewed as ``[v, N / v, B, C]`` (``v = ghost_size``; tf-keras's grouping, see
    :class:`keras_bn.moments.Groups`); each ghost batch is normalized with its own statistics.

    Returns:
        ``(y, count, mean, variance)``: ``y`` like ``x``; the values behind each ghost batch's
        statistics, and the ``[N / v, C]`` means and biased variances.
    """
    split = split_ghost_batches(x, ghost_size)
    ghosts = tf.shape(split)[1]
    epsilon = tf.constant(epsilon, tf.float32)
    if x.shape.rank == 2:
        # One value per example and channel: [v, N/v * C] is the plain [A, C] layout (the
        # fastest to reduce), with gamma and beta repeated for each ghost batch.
        x2 = tf.reshape(split, tf.stack([ghost_size, ghosts * channels]))
        y, mean, variance = _xla_training(
            x2, tf.tile(gamma, [ghosts]), tf.tile(beta, [ghosts]), epsilon
        )
        shape = tf.stack([ghosts, channels])
        mean, variance = tf.reshape(mean, shape), tf.reshape(variance, shape)
        return tf.reshape(y, tf.shape(x)), _count(x2), mean, variance
    x4 = tf.reshape(split, tf.stack([ghost_size, ghosts, -1, channels]))
    y4, mean, variance = _xla_training(x4, gamma, beta, epsilon)
    return tf.reshape(y4, tf.shape(x)), _count(x4), mean, variance


def split_ghost_batches(x, ghost_size):
    """``[N, ...]`` as ``[ghost_size, N / ghost_size, ...]``; a batch size known only at run
    time that ``ghost_size`` does not divide fails there, naming both."""
    moments_lib.Groups(1, ghost_size).check(x.shape[0])
    checks = []
    if x.shape[0] is None:
        message = (
            f"virtual_batch_size={ghost_size} must divide the batch size in training; got a "
            "batch of another size"
        )
        checks.append(
            tf.debugging.assert_equal(tf.math.floormod(tf.shape(x)[0], ghost_size), 0, message)
        )
    with tf.control_dependencies(checks):
        return tf.reshape(x, tf.concat([[ghost_size, -1], tf.shape(x)[1:]], 0))


# ---- Synchronized (cross-replica) variant: the same math around two collectives.


@tf.function(jit_compile=True)
def _xla_replica_row(x3, replica_id, replicas):
    """This replica's (count, mean, M2) per channel, in its row of the ``[R, 3, C]`` message
    (:func:`keras_bn.moments.pack_row`); an empty replica sends zeros."""
    x = tf.cast(x3, tf.float32)
    axes = _reduction_axes(x)
    count = _count(x)
    mean = tf.reduce_sum(x, axes) / tf.maximum(count, 1.0)
    m2 = _channel_sums(tf.math.squared_difference(x, _per_channel(mean, x)))
    return pack_row(tf.fill(tf.shape(mean), count), mean, m2, replica_id, replicas)


@tf.function(jit_compile=True)
def _xla_merge_and_apply(x3, gathered, gamma, beta, epsilon, renorm):
    """The global moments from every replica's row, and the affine map with them."""
    merged = merge_packed_rows(gathered)
    y, correction = _corrected_affine(
        tf.cast(x3, tf.float32), merged.mean, merged.variance, gamma, beta, epsilon, renorm
    )
    return tf.cast(y, x3.dtype), merged.count, merged.mean, merged.variance, correction


@tf.function(jit_compile=True)
def _xla_local_grad_sums(dy3, x3, mean, variance, epsilon, correction):
    """This replica's ``[sum dy, sum dy * x_hat]`` as one message, and its dgamma, dbeta."""
    sum_dy, sum_dy_x_hat, _ = _grad_sums(
        tf.cast(dy3, tf.float32), tf.cast(x3, tf.float32), mean, variance, epsilon
    )
    d_gamma, d_beta = transform.params_grad(sum_dy, sum_dy_x_hat, correction)
    return tf.stack([sum_dy, sum_dy_x_hat]), d_gamma, d_beta


@tf.function(jit_compile=True)
def _xla_synced_input_grad(dy3, x3, mean, variance, gamma, epsilon, sums, n, correction):
    x, dy = tf.cast(x3, tf.float32), tf.cast(dy3, tf.float32)
    x_hat = _normalized(x, mean, variance, epsilon)
    scale = transform.corrected_scale(gamma, correction)
    # Without a mask every channel has the same global count.
    dx = _input_grad(
        dy, x_hat, variance, scale, epsilon, sums[0], sums[1], tf.maximum(tf.reduce_max(n), 1.0)
    )
    return tf.cast(dx, x3.dtype)


def synchronized_batch_norm_training(
    x, gamma, beta, epsilon, layout, channels, num_feature_axes, replica_context, renorm=None
):
    """Alg. 1 over the GLOBAL batch of all replicas: ``(y, count, mean, variance)``.

    Forward: local (count, mean, M2) in one compiled pass, ONE all-reduce, then the exact
    merge (:func:`keras_bn.moments.merge_packed_rows`) and the affine map in a second
    compiled pass. Backward: the local sums of dy and dy * x_hat in one pass, ONE all-reduce
    of those 2C values, then dx; dgamma/dbeta stay local (the optimizer sums them over
    replicas). The small per-channel steps live inside the compiled passes: on CPUs each
    separate TensorFlow op would cost more than its arithmetic.
    Arguments are as for :func:`batch_norm_training` (renorm's r and d come from the global
    moments); count/mean/variance have length C.
    """
    x3 = _as_channels_second(x, layout, channels, num_feature_axes)
    epsilon = tf.constant(epsilon, tf.float32)
    replicas = replica_context.num_replicas_in_sync

    @tf.custom_gradient
    def training(x3, gamma, beta):
        row = _xla_replica_row(x3, replica_context.replica_id_in_sync_group, replicas)
        y3, count, mean, variance, correction = _xla_merge_and_apply(
            x3, all_reduce_sum(replica_context, row), gamma, beta, epsilon, renorm
        )

        def grad(dy3, d_count, d_mean, d_variance):
            del d_count, d_mean, d_variance  # statistics feed only the moving averages
            local, d_gamma, d_beta = _xla_local_grad_sums(
                dy3, x3, mean, variance, epsilon, correction
            )
            sums = all_reduce_sum(replica_context, local)
            dx = _xla_synced_input_grad(
                dy3, x3, mean, variance, gamma, epsilon, sums, count, correction
            )
            return dx, d_gamma, d_beta

        return (y3, count, mean, variance), grad

    y3, count, mean, variance = training(x3, gamma, beta)
    return tf.reshape(y3, tf.shape(x)), count, mean, variance


# ---- Replicas: what the layer exchanges under a tf.distribute strategy.


class Replicas:
    """The replicas of the current ``tf.distribute`` step (more than one, in sync)."""

    def __init__(self, context):
        self.context = context
        self.count = context.num_replicas_in_sync
        self.index = context.replica_id_in_sync_group

    def sum(self, value):
        """The sum of ``value`` over replicas, as one exchange (no gradient)."""
        return all_reduce_sum(self.context, tf.stop_gradient(value))


def replica_group() -> Replicas | None:
    """The current replicas when more than one is in sync, else None (a cross-replica context,
    or no strategy: moments are local)."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync <= 1:
        return None
    return Replicas(context)


def device_slices() -> int:
    """A TensorFlow replica's call sees its own batch: one slice."""
    return 1


def all_reduce_sum(replica_context, value):
    """The sum of ``value`` over all replicas, as one exchange; every replica gets the result.

    Under MirroredStrategy (all replicas in this process, traced into one graph) the sum is an
    ``add_n`` on one replica's device followed by copies back, reached through ``merge_call``:
    the same synchronization point ``ReplicaContext.all_reduce`` uses there, minus the collective
    runtime's fixed cost per call (about 0.35 ms per all-reduce on 2 CPU replicas, against
    0.02 ms for the in-graph sum; it sits on the critical path twice per layer and step).
    Everywhere else (MultiWorkerMirroredStrategy, TPUStrategy, and MirroredStrategy inside an
    XLA-compiled step on GPUs, where the strategy itself avoids ``merge_call``) it is
    ``replica_context.all_reduce``.

    Callers use it inside custom gradients or on stopped gradients: the in-graph path is not
    meant to be differentiated.
    """
    if _sums_in_graph(replica_context.strategy):
        reducer = tf.distribute.ReductionToOneDevice()
        return replica_context.merge_call(
            lambda _, per_replica: reducer.reduce(
                tf.distribute.ReduceOp.SUM, per_replica, destinations=per_replica
            ),
            args=(value,),
        )
    return replica_context.all_reduce(tf.distribute.ReduceOp.SUM, value)


def _sums_in_graph(strategy) -> bool:
    if not isinstance(strategy, tf.distribute.MirroredStrategy):
        return False
    # MirroredStrategy's own test for whether merge_call is usable here (it is not inside an
    # XLA-compiled replica function on GPUs); if a TF release drops it, use the collectives.
    uses_merge_call = getattr(strategy.extended, "_use_merge_call", None)
    return bool(callable(uses_merge_call) and uses_merge_call())


def synced_moments(x, axes, mask, replicas: Replicas) -> Moments:
    """Global moments over every replica's ``x``: one all-reduce forward, one backward.

    Differentiable in ``x``. The gradient sums the upstream gradients of the (shared) global
    mean and variance over replicas in one packed all-reduce, then applies
    ``dmean/dx = 1/N`` and ``dvar/dx = 2 (x - mean) / N`` locally (masked entries get zero).
    """
    context = replicas.context

    @tf.custom_gradient
    def _moments(x):
        count, mean, m2 = moments_lib.rows(x, axes, mask)
        row = pack_row(count, mean, m2, replicas.index, replicas.count)
        merged = merge_packed_rows(all_reduce_sum(context, row))
        n = tf.maximum(merged.count, 1.0)

        def grad(d_count, d_mean, d_variance):
            del d_count  # counts do not depend on values
            d_mean = tf.zeros_like(merged.mean) if d_mean is None else d_mean
            d_variance = tf.zeros_like(merged.mean) if d_variance is None else d_variance
            summed = all_reduce_sum(context, tf.stack([d_mean, d_variance]))
            dx = (summed[0] + 2.0 * summed[1] * (x - merged.mean)) / n
            if mask is not None:
                dx = tf.where(mask, dx, 0.0)
            return dx

        return (merged.count, merged.mean, merged.variance), grad

    return Moments(*_moments(x))


def compiled(function):
    """``function`` compiled by XLA into one launch (the moving-average update)."""
    return tf.function(function, jit_compile=True)


# ---- The layer's fused training transform on TensorFlow.

SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")
FUSED_PATHS = (
    "TensorFlow fuses feature axes that form one contiguous block, last or right after the "
    "batch axis; with virtual_batch_size, last"
)


def fusable(feature_axes, rank, virtual_batch_size) -> bool:
    """Whether a fused path exists for these axes (``layer.fused``; ``fused=True``'s check)."""
    layout = moments_lib.feature_layout(feature_axes, rank)
    return layout is not None and (virtual_batch_size is None or layout == "NHWC")


def fused_plan(layer, inputs, mask, replicas, slices, averages):
    """The fused training transform for this call, as a function of no argument, or None
    where the plain ``keras.ops`` path runs (float64, ``fused=False``; masks with the features
    first, with renorm, ghost batches or synchronized statistics)."""
    if slices != 1:
        return None
    implementation = _implementation(layer, inputs.dtype.name)
    if implementation is None:
        return None
    if mask is not None:
        plain = replicas is not None or layer.renorm or layer.virtual_batch_size is not None
        if plain or layer._fused_layout != "NHWC":
            return None
        return lambda: masked_training(layer, inputs, mask)
    return lambda: fused_training(layer, inputs, replicas, implementation, averages)


def _implementation(layer, dtype):
    """Which fused implementation the layer's unmasked training transform runs, or None.

    ``fused=False`` never fuses; otherwise the feature axes must be a contiguous block first
    or last (ghost batches: last), the inputs float32/float16/bfloat16 and the statistics
    float32. Returns "kernel", "xla" or None.
    """
    if not layer.fused or not _fusable(layer, dtype):
        return None
    forced = getattr(layer, "_tf_fused_implementation", None)  # benchmarks/layer_step.py's A/B
    if forced is not None:
        return forced
    if layer.virtual_batch_size is not None:
        return "xla"  # FusedBatchNormV3 has no ghost batches.
    if layer._fused_option and not _inside_xla_compilation():
        return "kernel"
    if layer.epsilon < KERNEL_MIN_EPSILON:
        return "xla"
    return default_implementation()


def _fusable(layer, dtype):
    return (
        layer._fused_layout is not None
        and (layer.virtual_batch_size is None or layer._fused_layout == "NHWC")
        and dtype in SUPPORTED_DTYPES
        and layer._statistics_dtype == "float32"
    )


def fused_training(layer, inputs, replicas, implementation, averages):
    """The training transform as one fused computation, for any rank; over the global batch
    when ``replicas`` is given. Returns ``(outputs, moments, group_axes)``: the batch moments
    per channel (``[C]``), or per ghost batch (``[G, C]`` with ``group_axes == [0]``)."""
    channels = math.prod(layer._param_shape)
    args = (
        inputs,
        *_param_vectors(layer, channels),
        layer.epsilon,
        layer._fused_layout,
        channels,
        len(layer._feature_axes),
    )
    renorm = layer._renorm_state([channels], averages)
    if layer.virtual_batch_size is not None:
        outputs, count, mean, variance = ghost_batch_norm_training(
            *args[:4], channels, layer.virtual_batch_size
        )
        return outputs, Moments(count, mean, variance), [0]
    if replicas is not None:
        outputs, count, mean, variance = synchronized_batch_norm_training(
            *args, replicas.context, renorm
        )
        return outputs, Moments(count, mean, variance), []
    outputs, mean, variance = batch_norm_training(*args, implementation, renorm)
    count = moments_lib.values_per_statistic(inputs, layer._reduction_axes)
    return outputs, Moments(count, mean, variance), []


def _param_vectors(layer, channels):
    """gamma and beta as float32 vectors of length ``channels`` (ones / zeros when disabled)."""
    gamma = tf.reshape(layer.gamma, [channels]) if layer.scale else tf.ones([channels])
    beta = tf.reshape(layer.beta, [channels]) if layer.center else tf.zeros([channels])
    return tf.cast(gamma, tf.float32), tf.cast(beta, tf.float32)


def masked_training(layer, inputs, mask):
    """Alg. 1 over the entries ``mask`` keeps (features last), as one XLA-compiled forward and
    one XLA-compiled closed-form backward (the formula of
    ``keras_bn.backends.torch._ClosedFormNormalization``): every entry is normalized with the kept
    entries' statistics, masked values (even inf or nan) stay out of them, and an empty channel
    gets mean 0 and variance 0, as on the plain path. Returns ``(outputs, moments, [])``."""
    channels = math.prod(layer._param_shape)
    gamma, beta = _param_vectors(layer, channels)
    x2 = tf.reshape(inputs, [-1, channels])
    keep = tf.reshape(mask, [-1, channels])
    epsilon = tf.constant(layer.epsilon, tf.float32)

    @tf.custom_gradient
    def training(x2, gamma, beta):
        y2, count, mean, variance = _xla_masked_forward(x2, keep, gamma, beta, epsilon)

        def grad(dy2, d_count, d_mean, d_variance):
            # The statistics only feed the moving statistics (no gradient).
            del d_count, d_mean, d_variance
            return _xla_masked_backward(dy2, x2, keep, count, mean, variance, gamma, epsilon)

        return (y2, count, mean, variance), grad

    y2, count, mean, variance = training(x2, gamma, beta)
    return tf.reshape(y2, tf.shape(inputs)), Moments(count, mean, variance), []


@tf.function(jit_compile=True)
def _xla_masked_forward(x2, keep, gamma, beta, epsilon):
    x = tf.cast(x2, tf.float32)
    count = _channel_sums(tf.cast(keep, tf.float32))
    safe = tf.maximum(count, 1.0)
    mean = _channel_sums(tf.where(keep, x, 0.0)) / safe
    centered = x - mean
    variance = _channel_sums(tf.square(tf.where(keep, centered, 0.0))) / safe
    y = centered * (tf.math.rsqrt(variance + epsilon) * gamma) + beta
    return tf.cast(y, x2.dtype), count, mean, variance


@tf.function(jit_compile=True)
def _xla_masked_backward(dy2, x2, keep, count, mean, variance, gamma, epsilon):
    x, dy = tf.cast(x2, tf.float32), tf.cast(dy2, tf.float32)
    centered = x - mean
    inverse = tf.math.rsqrt(variance + epsilon)
    scale = inverse * gamma
    d_beta = tf.reduce_sum(dy, 0)
    d_gamma = _channel_sums(dy * centered) * inverse  # sum(dy * x_hat)
    per_entry = scale / tf.maximum(count, 1.0)
    correction = per_entry * d_beta + centered * (per_entry * d_gamma * inverse)
    dx = dy * scale - tf.where(keep, correction, 0.0)
    return tf.cast(dx, x2.dtype), d_gamma, d_beta


def has_float64() -> bool:
    return True
