"""Local response normalization (across channels), the baseline Inception's normalization."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_bn")
class LocalResponseNormalization(keras.layers.Layer):
    """Local response normalization across channels, as in AlexNet and GoogLeNet.

    Keras 3 has no LRN layer. This one has `tf.nn.local_response_normalization`'s semantics on
    every Keras backend and computes in float32 whatever the input dtype. Each value is divided
    by a power of the sum of squares over a window of `2 * depth_radius + 1` neighbouring
    channels at the same position, the window zero-padded at the first and last channels:

        sqr_sum[..., d] = sum(inputs[..., d - depth_radius : d + depth_radius + 1] ** 2)
        output = inputs / (bias + alpha * sqr_sum) ** beta

    On TensorFlow it runs TensorFlow's own LRN kernel (forward and backward), which is several
    times faster there than the same formula in `keras.ops`; elsewhere it sums
    `2 * depth_radius + 1` shifted slices of the squares (exact, unlike a banded matmul, whose
    default precision on GPUs and TPUs drops float32 mantissa bits).

    The defaults are Caffe GoogLeNet's `local_size 5, alpha 1e-4, beta 0.75`: Caffe divides
    `alpha` by the window size and TensorFlow does not, so `alpha = 1e-4 / 5`. The BN paper does
    not give its LRN constants; these are GoogLeNet's (the BVLC Caffe model).

    Args:
        depth_radius: int >= 0, half-width of the channel window.
        bias: positive float added before raising to the power `beta`.
        alpha: float scale of the sum of squares (not divided by the window size).
        beta: float exponent.
        **kwargs: base layer keyword arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: a tensor with channels last, of rank 4.

    Returns:
        A tensor of the same shape, in the layer's compute dtype.

    Reference:
        Krizhevsky et al., 2012, section 3.3; Szegedy et al., 2014 (GoogLeNet).

    Example:

    >>> layer = LocalResponseNormalization()
    >>> tuple(layer(keras.ops.ones((1, 2, 2, 8))).shape)
    (1, 2, 2, 8)
    """

    def __init__(self, depth_radius=2, bias=1.0, alpha=1e-4 / 5, beta=0.75, **kwargs):
        super().__init__(**kwargs)
        if isinstance(depth_radius, bool) or not isinstance(depth_radius, int) or depth_radius < 0:
            raise ValueError(
                f"`depth_radius` must be an int >= 0 (window of 2 * depth_radius + 1 channels); "
                f"received {depth_radius!r}."
            )
        if not bias > 0:
            raise ValueError(
                f"`bias` must be > 0 so the divisor never vanishes; received {bias!r}."
            )
        self.depth_radius = depth_radius
        self.bias = float(bias)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.supports_masking = True

    def call(self, inputs):
        if len(inputs.shape) != 4:
            raise ValueError(
                f"LocalResponseNormalization expects a rank-4 channels-last tensor; received "
                f"shape {inputs.shape}."
            )
        # float32 math: squares of float16 activations overflow easily.
        inputs = ops.cast(inputs, "float32")
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            outputs = tf.nn.local_response_normalization(
                inputs,
                depth_radius=self.depth_radius,
                bias=self.bias,
                alpha=self.alpha,
                beta=self.beta,
            )
        else:
            outputs = local_response_normalization(
                inputs, self.depth_radius, self.bias, self.alpha, self.beta
            )
        return ops.cast(outputs, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "depth_radius": self.depth_radius,
                "bias": self.bias,
                "alpha": self.alpha,
                "beta": self.beta,
            }
        )
        return config


def local_response_normalization(inputs, depth_radius, bias, alpha, beta):
    """`tf.nn.local_response_normalization` in `keras.ops`, for any backend (channels last).

    Computes in the dtype of `inputs` (the layer passes float32).
    """
    channels = inputs.shape[-1]
    squares = ops.pad(
        ops.square(inputs), [(0, 0)] * (len(inputs.shape) - 1) + [(depth_radius, depth_radius)]
    )
    sqr_sum = squares[..., :channels]
    for offset in range(1, 2 * depth_radius + 1):
        sqr_sum = sqr_sum + squares[..., offset : offset + channels]
    return inputs * ops.power(bias + alpha * sqr_sum, -beta)
