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


def renorm_correction(x, axes, epsilon, mu, sigma, rmin=0.0, rmax=np.inf, dmax=np.inf, mask=None):
    """Batch Renormalization (Ioffe 2017, Alg. 1): r = clip(sigma_B / sigma), d = clip((mu_B -
    mu) / sigma) with sigma_B = sqrt(var_B + eps), sigma floored at sqrt(eps) as Keras does."""
    _, mean, var = moments(x, axes, mask)
    sigma = np.maximum(sigma, np.sqrt(epsilon))
    r = np.clip(np.sqrt(var + epsilon) / sigma, rmin, rmax)
    d = np.clip((mean - mu) / sigma, -dmax, dmax)
    return r, d


def renorm_forward(x, axes, gamma, beta, epsilon, r, d, mask=None):
    """y = gamma * (x_hat * r + d) + beta, x_hat normalized with the batch statistics."""
    _, mean, var = moments(x, axes, mask)
    x_hat = (np.asarray(x, np.float64) - mean) / np.sqrt(var + epsilon)
    return gamma * (x_hat * r + d) + beta


def renorm_backward(x, dy, axes, gamma, epsilon, r, d, mask=None):
    """Alg. 1's gradients with r and d treated as constants: (dx, dgamma, dbeta)."""
    dx, dgamma_bn, dbeta = backward(x, dy, axes, gamma * r, epsilon, mask)
    return dx, dgamma_bn * r + dbeta * d, dbeta


def renorm_state_after(x, axes, epsilon, state, momentum, renorm_momentum, unbiased, mask=None):
    """One batch's update of (moving_mean, moving_stddev, renorm_mean, renorm_stddev), and the
    derived moving_variance = max(moving_stddev**2 - eps, 0). ``momentum`` None is not modelled
    here: pass the batch weight as ``1 - momentum``."""
    n, mean, var = moments(x, axes, mask)
    population = var * n / (n - 1) if unbiased else var
    moving_mean, moving_stddev, renorm_mean, renorm_stddev = state
    w, rw = 1.0 - momentum, 1.0 - renorm_momentum
    moving_mean = moving_mean + w * (mean - moving_mean)
    moving_stddev = moving_stddev + w * (np.sqrt(population + epsilon) - moving_stddev)
    renorm_mean = renorm_mean + rw * (mean - renorm_mean)
    renorm_stddev = renorm_stddev + rw * (np.sqrt(var + epsilon) - renorm_stddev)
    moving_variance = np.maximum(moving_stddev**2 - epsilon, 0.0)
    return (moving_mean, moving_stddev, renorm_mean, renorm_stddev), moving_variance
