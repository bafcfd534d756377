"""Alg. 1's training transform, written once: the per-channel math every path uses.

Training normalizes with the batch statistics and applies the affine map::

    y = gamma' * (x - mean) / sqrt(variance + epsilon) + beta'

where ``(gamma', beta') = (gamma, beta)`` for Batch Normalization and, with Batch
Renormalization (Ioffe, 2017, Alg. 1), ``gamma' = gamma * r`` and ``beta' = beta + gamma * d`` with
``r`` and ``d`` computed from the batch statistics and the renorm moving averages, clipped, and
carrying no gradient. Renorm is therefore a per-channel change of gamma and beta: every
implementation of the transform (the plain TensorFlow ops in ``keras_bn.layer``, the fused kernel
and the XLA formulation in ``keras_bn.fused``, local or across replicas) calls these functions and
nothing else defines them. They are written with ``keras.ops`` and run on every backend.

Training outputs are computed as ``(x - mean) * m + beta'`` (:func:`apply`), never as
``x * m + c`` with ``c = beta' - mean * m``: the second form cancels catastrophically when
``|mean| >> std`` (on a batch of ``12000 +/- 0.5`` it loses three digits in float32), the first
costs nothing more. Inference is the linear map ``x * m + c`` (:func:`inference_affine`), as in
Keras and as :func:`keras_bn.fold_batch_norm` folds it, so converted and folded models agree
with the original to the last bit where the arithmetic allows.

The functions are pure and shape-agnostic: the statistics, gamma, beta and the renorm state only
need to broadcast against one another (per-channel vectors, or the keepdims layout of the input).
"""

from __future__ import annotations

from typing import NamedTuple

from keras import ops


class Renorm(NamedTuple):
    """What Batch Renormalization needs to correct one batch (read before the update).

    Attributes:
        mean: the ``renorm_mean`` moving average (``mu`` in the renorm paper).
        stddev: the ``renorm_stddev`` moving average (``sigma``).
        clipping: ``(rmin, rmax, dmax)`` Python floats (``0, inf, inf`` when not clipped).
    """

    mean: object
    stddev: object
    clipping: object


def multiplier(variance, gamma, epsilon):
    """``m = gamma / sqrt(variance + epsilon)``, the per-channel scale of the transform."""
    return gamma * ops.rsqrt(variance + epsilon)


def apply(x, mean, multiplier, beta):
    """``(x - mean) * m + beta``: the transform, in the form that keeps precision."""
    return (x - mean) * multiplier + beta


def inference_affine(mean, variance, gamma, beta, epsilon):
    """``(m, c)`` of the inference map ``x * m + c`` with population statistics: the linear
    map Keras's layer and :func:`keras_bn.fold_batch_norm` compute, to the same rounding, so
    a converted or folded model gives the same outputs as the original."""
    m = multiplier(variance, gamma, epsilon)
    return m, beta - mean * m


def training_scale_and_offset(mean, variance, gamma, beta, epsilon, renorm: Renorm | None):
    """Alg. 1's per-channel terms with the batch statistics: ``(m, beta', correction)`` so that
    the output is ``apply(x, mean, m, beta')``.

    ``correction`` is renorm's ``(r, d)`` (None without renorm), which the backward pass needs.
    """
    correction = renorm_correction(mean, variance, epsilon, renorm)
    gamma, beta = corrected_params(gamma, beta, correction)
    return multiplier(variance, gamma, epsilon), beta, correction


def renorm_correction(mean, variance, epsilon, renorm: Renorm | None):
    """The renorm paper's ``r = clip(sigma_B / sigma)`` and ``d = clip((mu_B - mu) / sigma)``,
    with no gradient; None when ``renorm`` is None (plain Batch Normalization).

    ``sigma_B = sqrt(variance + epsilon)``; ``sigma`` is floored at ``sqrt(epsilon)`` so a zero
    initial stddev cannot divide by zero (as Keras does).
    """
    if renorm is None:
        return None
    epsilon = ops.cast(epsilon, mean.dtype)
    sigma = ops.maximum(ops.cast(renorm.stddev, mean.dtype), ops.sqrt(epsilon))
    rmin, rmax, dmax = (ops.cast(v, mean.dtype) for v in renorm.clipping)
    r = ops.clip(ops.sqrt(variance + epsilon) / sigma, rmin, rmax)
    d = ops.clip((mean - ops.cast(renorm.mean, mean.dtype)) / sigma, -dmax, dmax)
    return ops.stop_gradient(r), ops.stop_gradient(d)


def corrected_params(gamma, beta, correction):
    """``(gamma * r, beta + gamma * d)``, or ``(gamma, beta)`` when ``correction`` is None."""
    if correction is None:
        return gamma, beta
    r, d = correction
    return gamma * r, beta + gamma * d


def corrected_scale(gamma, correction):
    """``gamma * r`` (``gamma`` without renorm): the scale the input gradient flows through."""
    return gamma if correction is None else gamma * correction[0]


def params_grad(sum_dy, sum_dy_x_hat, correction):
    """``(dgamma, dbeta)`` from the two per-channel sums of the transform's backward pass.

    Without renorm they are ``sum dy * x_hat`` and ``sum dy``; with it, the chain rule through
    ``gamma' = gamma * r`` and ``beta' = beta + gamma * d`` (r, d constant).
    """
    if correction is None:
        return sum_dy_x_hat, sum_dy
    r, d = correction
    return sum_dy_x_hat * r + sum_dy * d, sum_dy
