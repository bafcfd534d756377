"""The population estimates' update from one batch (pure ``keras.ops``; compiled per backend).

The layer moves ``moving_mean`` / ``moving_variance`` toward each training batch's
:class:`keras_bn.moments.Estimate`. The per-channel arithmetic is some twenty tiny operations;
on TensorFlow ``keras_bn.backends.tensorflow`` compiles it into one XLA function (one launch,
~23 us on a CPU, instead of twenty ops of ~4 us each per layer and step).
"""

from __future__ import annotations

from keras import ops


def moved_toward_batch(moving_mean, moving_variance, estimate, weight):
    """The moving statistics after one batch: ``(new_mean, new_variance)``.

    ``new = old + weight * (batch - old)`` per channel, where the batch variance is already
    the population estimate (``n/(n-1)``-corrected when the layer is unbiased). Channels whose
    mean (or variance) is not usable (no value, non-finite statistics; one value for a
    corrected variance) keep their old values exactly.

    Args:
        moving_mean, moving_variance: current estimates.
        estimate: the batch's :class:`keras_bn.moments.Estimate`, same shape.
        weight: weight of the batch (``1 - momentum``, or ``1 / (batches seen + 1)`` per
            channel for a cumulative average); broadcastable.

    Example:
        >>> from keras import ops
        >>> from keras_bn.moments import Moments, estimate
        >>> batch = estimate(Moments(ops.array([5.0, 1.0]), ops.array([1.0, 2.0]),
        ...                          ops.array([4.0, 0.0])), unbiased=True)
        >>> new_mean, new_var = moved_toward_batch(ops.zeros([2]), ops.ones([2]), batch, 0.5)
        >>> ops.convert_to_numpy(new_mean).tolist(), ops.convert_to_numpy(new_var).tolist()
        ([0.5, 1.0], [3.0, 1.0])
    """
    weight = ops.cast(weight, estimate.mean.dtype)
    return (
        _moved(moving_mean, estimate.mean, weight, estimate.mean_ok),
        _moved(moving_variance, estimate.variance, weight, estimate.variance_ok),
    )


def renorm_moved_toward_batch(
    moving_mean, moving_stddev, moving_variance, renorm_mean, renorm_stddev, estimate, biased,
    weight, renorm_weight, epsilon,
):  # fmt: skip
    """Batch Renormalization's moving statistics after one batch.

    The renorm averages (``mu``, ``sigma`` of the renorm paper, Keras's ``renorm_mean`` /
    ``renorm_stddev``) move with ``renorm_weight`` toward the batch mean and
    ``sqrt(biased + epsilon)`` (the biased batch variance: they define the training
    transform, as in Keras). The inference statistics move with ``weight``: ``moving_mean``
    toward the mean, ``moving_stddev`` toward ``sqrt(population variance + epsilon)``, and
    ``moving_variance = max(moving_stddev**2 - epsilon, 0)`` (as Keras). Channels that may not
    move keep every value, ``moving_variance`` included.

    Returns:
        ``(moving_mean, moving_stddev, moving_variance, renorm_mean, renorm_stddev)``.
    """
    dtype = estimate.mean.dtype
    epsilon = ops.cast(epsilon, dtype)
    weight = ops.cast(weight, dtype)
    renorm_weight = ops.cast(renorm_weight, dtype)
    ok = estimate.variance_ok
    new_stddev = _moved(moving_stddev, ops.sqrt(estimate.variance + epsilon), weight, ok)
    new_variance = ops.where(ok, ops.relu(ops.square(new_stddev) - epsilon), moving_variance)
    return (
        _moved(moving_mean, estimate.mean, weight, estimate.mean_ok),
        new_stddev,
        new_variance,
        _moved(renorm_mean, estimate.mean, renorm_weight, estimate.mean_ok),
        _moved(renorm_stddev, ops.sqrt(biased + epsilon), renorm_weight, ok),
    )


def _moved(old, batch, weight, usable):
    """``old + weight * (batch - old)`` on usable channels; the others keep ``old`` exactly."""
    new = old + weight * (ops.where(usable, batch, 0.0) - old)
    return ops.where(usable, new, old)
