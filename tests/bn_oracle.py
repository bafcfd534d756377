"""NumPy oracles for the paper's Alg. 1 (training transform and its gradient) and the
moving-statistics rule, in float64, on whole (concatenated) batches.

Axes convention: ``axes`` are the REDUCTION axes; statistics broadcast in keepdims layout.
A ``mask`` (same shape as x, bool) selects the values the statistics are taken over; every
entry is normalized, as the layer does.
"""

import numpy as np


def moments(x, axes, mask=None):
    """(count, mean, biased variance) over ``axes``, keepdims."""
    x = np.asarray(x, np.float64)
    m = np.ones_like(x) if mask is None else np.broadcast_to(mask, x.shape).astype(np.float64)
    n = m.sum(axis=axes, keepdims=True)
    mean = (m * x).sum(axis=axes, keepdims=True) / n
    var = (m * (x - mean) ** 2).sum(axis=axes, keepdims=True) / n
    return n, mean, var


def forward(x, axes, gamma, beta, epsilon, mask=None):
    """Alg. 1: y = gamma * (x - mean) / sqrt(var + eps) + beta with batch statistics."""
    _, mean, var = moments(x, axes, mask)
    return gamma * (np.asarray(x, np.float64) - mean) / np.sqrt(var + epsilon) + beta


def backward(x, dy, axes, gamma, epsilon, mask=None):
    """The paper's chain rule for Alg. 1: returns (dx, dgamma, dbeta), keepdims for params.

    Masked-out entries are normalized too but do not enter the statistics, so they get only
    the direct term gamma/sigma * dy.
    """
    x = np.asarray(x, np.float64)
    dy = np.asarray(dy, np.float64)
    m = np.ones_like(x) if mask is None else np.broadcast_to(mask, x.shape).astype(np.float64)
    n, mean, var = moments(x, axes, mask)
    inv = 1.0 / np.sqrt(var + epsilon)
    xhat = (x - mean) * inv
    dgamma = (dy * xhat).sum(axis=axes, keepdims=True)
    dbeta = dy.sum(axis=axes, keepdims=True)
    dxhat = dy * gamma
    dvar = (dxhat * (x - mean)).sum(axis=axes, keepdims=True) * -0.5 * inv**3
    dmean = -(dxhat * inv).sum(axis=axes, keepdims=True)
    dx = dxhat * inv + m * (dmean + 2.0 * dvar * (x - mean)) / n
    return dx, dgamma, dbeta


def moving_after(batches, axes, momentum, init_mean=0.0, init_var=1.0, unbiased=True, mask=None):
    """Moving mean/variance after feeding ``batches`` (EMA with ``momentum`` or, for None, the
    cumulative average), each batch variance multiplied by n/(n-1) when ``unbiased``."""
    mean_state, var_state = init_mean, init_var
    for k, x in enumerate(batches):
        n, mean, var = moments(x, axes, mask)
        if unbiased:
            var = var * n / (n - 1)
        w = 1.0 / (k + 1) if momentum is None else 1.0 - momentum
        mean_state = mean_state + w * (mean - mean_state)
        var_state = var_state + w * (var - var_state)
    return np.squeeze(mean_state), np.squeeze(var_state)
