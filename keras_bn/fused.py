"""Training-mode Batch Normalization as one fused computation, forward and backward.

Two interchangeable implementations of Alg. 1 for inputs whose feature axes form one contiguous
block, either last ("NHWC"-like) or right after the batch axis ("NCHW"-like), of any rank:

- ``"kernel"``: TensorFlow's FusedBatchNormV3 and FusedBatchNormGradV3 (cuDNN on a GPU).
- ``"xla"``: the same math written as two small XLA-compiled functions (forward; and the
  paper's closed-form backward) tied together by ``tf.custom_gradient``. On CPUs this is
  1.5-4x faster than the fused kernel (see ``benchmarks/layer_step.py``), because XLA fuses the
  reductions and the elementwise passes; it also works inside an outer ``jit_compile``.

Both view the input as ``[A, C]`` (channels-last) or ``[A, C, B]`` (channels-first) with
statistics over every axis but ``C``, so any rank works with one code path.
"""

from __future__ import annotations

import tensorflow as tf

# cuDNN's fused kernel refuses epsilon below 1e-5.
KERNEL_MIN_EPSILON = 1.001e-5
SUPPORTED_DTYPES = (tf.float32, tf.float16, tf.bfloat16)


def fused_layout(feature_axes: list[int], rank: int) -> str | None:
    """"NHWC" when the sorted feature axes are a contiguous block at the end, "NCHW" when they
    are a contiguous block right after the batch axis, else None (no fused path)."""
    if feature_axes != list(range(feature_axes[0], feature_axes[-1] + 1)):
        return None
    if feature_axes[-1] == rank - 1:
        return "NHWC"
    if feature_axes[0] == 1:
        return "NCHW"
    return None


def default_implementation() -> str:
    """The fused kernel where a GPU is visible (cuDNN), the XLA formulation on CPUs."""
    return "kernel" if tf.config.list_logical_devices("GPU") else "xla"


def _as_channels_second(x, layout, channels, num_feature_axes):
    """``[A, C]`` for channels-last (cheapest for XLA to reduce), ``[A, C, B]`` otherwise."""
    if layout == "NHWC":
        return tf.reshape(x, [-1, channels])
    shape = tf.shape(x)
    rest = tf.reduce_prod(shape[1 + num_feature_axes :])
    return tf.reshape(x, tf.stack([shape[0], channels, rest]))


def _reduction_axes(x):
    return [0] if x.shape.rank == 2 else [0, 2]


def _per_channel(v, x):
    """A length-C vector shaped to broadcast against ``x`` ([A, C] or [A, C, B])."""
    return v if x.shape.rank == 2 else v[:, None]


def batch_norm_training(x, gamma, beta, epsilon, layout, channels, num_feature_axes,
                        implementation):
    """Alg. 1 on ``x``: returns ``(y, mean, variance)``.

    Args:
        x: float32/float16/bfloat16 input of any rank.
        gamma, beta: float32 vectors of length ``channels`` (ones/zeros when disabled).
        epsilon: Python float.
        layout: "NHWC" or "NCHW" (see :func:`fused_layout`).
        channels: product of the feature dimensions.
        num_feature_axes: how many axes the feature block spans.
        implementation: "kernel" or "xla".

    Returns:
        ``y`` with the shape and dtype of ``x``; float32 ``mean`` and *biased* ``variance``
        of length ``channels``.
    """
    x3 = _as_channels_second(x, layout, channels, num_feature_axes)
    if implementation == "kernel":
        y3, mean, variance = _kernel_training(x3, gamma, beta, epsilon, layout)
    else:
        y3, mean, variance = _xla_training(x3, gamma, beta, tf.constant(epsilon, tf.float32))
    return tf.reshape(y3, tf.shape(x)), mean, variance


def _kernel_training(x3, gamma, beta, epsilon, layout):
    channels = x3.shape[1]
    # [A, C] -> NHWC [A, 1, 1, C] (same memory order); [A, C, B] -> NCHW [A, C, B, 1].
    x4 = tf.reshape(x3, [-1, 1, 1, channels]) if layout == "NHWC" else x3[..., None]
    empty = tf.zeros([0], tf.float32)
    y4, mean, corrected, _, _, _ = tf.raw_ops.FusedBatchNormV3(
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
    count = tf.cast(tf.size(x3) // channels, tf.float32)
    # The kernel returns n/(n-1) * var (0 for n == 1); give back the biased variance.
    variance = corrected * tf.maximum(count - 1.0, 0.0) / tf.maximum(count, 1.0)
    return tf.reshape(y4, tf.shape(x3)), mean, variance


@tf.function(jit_compile=True)
def _xla_forward(x3, gamma, beta, epsilon):
    x = tf.cast(x3, tf.float32)
    axes = _reduction_axes(x)
    mean = tf.reduce_mean(x, axes, keepdims=True)
    variance = tf.reduce_mean(tf.math.squared_difference(x, mean), axes, keepdims=True)
    multiplier = _per_channel(gamma, x) * tf.math.rsqrt(variance + epsilon)
    y = x * multiplier + (_per_channel(beta, x) - mean * multiplier)
    return tf.cast(y, x3.dtype), tf.reshape(mean, [-1]), tf.reshape(variance, [-1])


@tf.function(jit_compile=True)
def _xla_backward(dy3, x3, mean, variance, gamma, epsilon):
    """The paper's chain rule for Alg. 1, statistics over every axis but 1."""
    x = tf.cast(x3, tf.float32)
    dy = tf.cast(dy3, tf.float32)
    axes = _reduction_axes(x)
    inv = _per_channel(tf.math.rsqrt(variance + epsilon), x)
    x_hat = (x - _per_channel(mean, x)) * inv
    d_beta = tf.reduce_sum(dy, axes)
    d_gamma = tf.reduce_sum(dy * x_hat, axes)
    n = tf.cast(tf.size(x) // tf.shape(x)[1], tf.float32)
    dx = (_per_channel(gamma, x) * inv / n) * (
        n * dy - _per_channel(d_beta, x) - x_hat * _per_channel(d_gamma, x)
    )
    return tf.cast(dx, x3.dtype), d_gamma, d_beta


def _xla_training(x3, gamma, beta, epsilon):
    @tf.custom_gradient
    def training(x3, gamma, beta):
        y3, mean, variance = _xla_forward(x3, gamma, beta, epsilon)

        def grad(dy3, d_mean, d_variance):
            # The mean/variance outputs only feed the moving statistics (no gradient).
            del d_mean, d_variance
            return _xla_backward(dy3, x3, mean, variance, gamma, epsilon)

        return (y3, mean, variance), grad

    return training(x3, gamma, beta)
