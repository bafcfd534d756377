"""The population estimates' update from one batch (pure ``keras.ops``; compiled per backend).

The layer moves ``moving_mean`` / ``moving_variance`` toward each training batch's
population estimate. The per-channel arithmetic (the estimate included) is some twenty tiny
operations; on TensorFlow ``keras_bn.backends.tensorflow`` compiles it into one XLA function
(one launch, ~23 us on a CPU, instead of twenty ops of ~4 us each per layer and step).
"""

from __future__ import annotations

from keras import ops

from keras_bn.moments import Estimate, estimate


def usable_estimate(batch, unbiased, cumulative) -> Estimate:
    """The :class:`keras_bn.moments.Estimate` of ``batch`` (its :class:`Moments`, or an
    estimate already: ghost batches average theirs). With ``cumulative`` (``momentum=None``) a
    channel moves only where mean and variance both may, so one count of batches weighs both."""
    target = batch if isinstance(batch, Estimate) else estimate(batch, unbiased)
    return target._replace(mean_ok=target.variance_ok) if cumulative else target


def moved_toward_batch(moving_mean, moving_variance, batch, weight, unbiased, cumulative):
    """The moving statistics after one batch: ``(new_mean, new_variance, mean_ok, variance_ok)``.

    ``new = old + weight * (batch - old)`` per channel, toward the batch's population estimate
    (variance ``n/(n-1)``-corrected when ``unbiased``). Channels whose mean (or variance) is not
    usable (no value, non-finite statistics; one value for a corrected variance) keep their old
    values exactly; the masks say which moved.

    Args:
        moving_mean, moving_variance: current estimates.
        batch: the batch's :class:`keras_bn.moments.Moments` (or an ``Estimate``), same shape.
        weight: weight of the batch (``1 - momentum``, or ``1 / (batches seen + 1)`` per
            channel for a cumulative average); broadcastable.
        unbiased, cumulative: Python bools (``unbiased_variance``; ``momentum is None``).

    Example:
        >>> from keras_bn.moments import Moments
        >>> batch = Moments(ops.array([5.0, 1.0]), ops.array([1.0, 2.0]), ops.array([4.0, 0.0]))
        >>> new_mean, new_var, _, _ = moved_toward_batch(
        ...     ops.zeros([2]), ops.ones([2]), batch, 0.5, True, False)
        >>> ops.convert_to_numpy(new_mean).tolist(), ops.convert_to_numpy(new_var).tolist()
        ([0.5, 1.0], [3.0, 1.0])
    """
    target = usable_estimate(batch, unbiased, cumulative)
    weight = ops.cast(weight, target.mean.dtype)
    return (
        _moved(moving_mean, target.mean, weight, target.mean_ok),
        _moved(moving_variance, target.variance, weight, target.variance_ok),
        target.mean_ok,
        target.variance_ok,
    )


def renorm_moved_toward_batch(
    moving_mean, moving_stddev, moving_variance, renorm_mean, renorm_stddev, batch, weight,
    renorm_weight, epsilon, unbiased, cumulative,
):  # fmt: skip
    """Batch Renormalization's moving statistics after one batch.

    The renorm averages (``mu``, ``sigma`` of the renorm paper, Keras's ``renorm_mean`` /
    ``renorm_stddev``) move with ``renorm_weight`` toward the batch mean and
    ``sqrt(variance + epsilon)`` (the batch's biased variance: they define the training
    transform, as in Keras); ``batch`` is its :class:`keras_bn.moments.Moments`. The inference
    statistics move with ``weight``: ``moving_mean`` toward the mean, ``moving_stddev`` toward
    ``sqrt(population variance + epsilon)``, and ``moving_variance = max(moving_stddev**2 -
    epsilon, 0)`` (as Keras). Channels that may not move keep every value, ``moving_variance``
    included.

    Returns:
        ``(moving_mean, moving_stddev, moving_variance, renorm_mean, renorm_stddev, mean_ok,
        variance_ok)``.
    """
    target = usable_estimate(batch, unbiased, cumulative)
    dtype = target.mean.dtype
    epsilon = ops.cast(epsilon, dtype)
    weight = ops.cast(weight, dtype)
    renorm_weight = ops.cast(renorm_weight, dtype)
    ok = target.variance_ok
    new_stddev = _moved(moving_stddev, ops.sqrt(target.variance + epsilon), weight, ok)
    new_variance = ops.where(ok, ops.relu(ops.square(new_stddev) - epsilon), moving_variance)
    return (
        _moved(moving_mean, target.mean, weight, target.mean_ok),
        new_stddev,
        new_variance,
        _moved(renorm_mean, target.mean, renorm_weight, target.mean_ok),
        _moved(renorm_stddev, ops.sqrt(batch.variance + epsilon), renorm_weight, ok),
        target.mean_ok,
        ok,
    )


def _moved(old, batch, weight, usable):
    """``old + weight * (batch - old)`` on usable channels; the others keep ``old`` exactly."""
    new = old + weight * (ops.where(usable, batch, 0.0) - old)
    return ops.where(usable, new, old)
