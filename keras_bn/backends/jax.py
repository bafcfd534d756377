"""The JAX backend: a data-parallel batch seen whole, its device slices as a view.

Under ``keras.distribution.DataParallel`` (or a ``ModelParallel`` mesh with a batch axis)
``model.fit`` jits one program over a batch-sharded array, so the layer's ``call`` sees the
GLOBAL batch. Per-device statistics (``synchronized=False``, what a TensorFlow replica or a
torch rank computes) are then a view of the batch as ``[devices, batch / devices, ...]``: the
reductions run over unsharded axes, with no collective. Global statistics need no code at all:
XLA inserts the all-reduces of reductions over the sharded batch axis. The one exchange this
module makes is :func:`replicated`: the per-device rows the moving statistics merge, gathered
on every device in one collective so every device's copy receives the same update.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import keras

from keras_bn import moments as moments_lib
from keras_bn import transform

FUSED_PATHS = "JAX has no fused training transform in keras_bn yet"


def replica_group():
    """A JAX call sees the whole batch: no replicas to exchange with."""
    return None


def _batch_mesh():
    """``(device mesh, batch axis name, devices on it)`` of the current distribution, or None."""
    distribution = keras.distribution.distribution()
    name = getattr(distribution, "batch_dim_name", None)
    if distribution is None or name is None:
        return None
    mesh = distribution.device_mesh
    return mesh, name, mesh.shape[list(mesh.axis_names).index(name)]


def device_slices() -> int:
    """How many devices the batch axis is sharded over under the current distribution."""
    found = _batch_mesh()
    return 1 if found is None else found[2]


def replicated(value):
    """``value`` (per-device rows) gathered on every device: one collective."""
    found = _batch_mesh()
    if found is None:
        return value
    sharding = jax.sharding.NamedSharding(found[0].backend_mesh, jax.sharding.PartitionSpec())
    return jax.lax.with_sharding_constraint(value, sharding)


def fusable(feature_axes, rank, virtual_batch_size) -> bool:
    return False


def fused_plan(layer, inputs, mask, replicas, slices):
    """``synchronized=True`` over a batch sharded on several devices: the transform with a
    closed-form backward (:func:`_synced_training`), one collective forward and one backward.
    Left to XLA's partitioner, the plain reductions take 2 forward and 4 backward."""
    found = _batch_mesh()
    if (
        not layer.synchronized
        or layer._fused_option is False
        or layer.virtual_batch_size is not None
        or found is None
        or found[2] == 1
    ):
        return None
    return functools.partial(_synced_training, layer, inputs, mask, found[2])


def _synced_training(layer, inputs, mask, slices):
    """Alg. 1 over the global (sharded) batch: ``(outputs, moments, group axes)``.

    Forward: each device slice's (count, mean, M2) rows, gathered on every device in ONE
    collective, merged exactly (Chan). Backward: each slice's sums of ``dy`` and
    ``dy * x_hat``, gathered in ONE collective, then the paper's chain rule locally. With a mask,
    masked entries are normalized but enter neither the statistics nor their gradient.
    """
    dtype = layer._statistics_dtype
    shape = layer._broadcast_shape
    groups = moments_lib.Groups(slices)
    axes = groups.axes(layer._reduction_axes)
    gamma, beta = (
        jnp.broadcast_to(jnp.asarray(p, dtype), shape) for p in layer._params(dtype, shape)
    )
    renorm = layer._renorm_state(shape)
    renorm_state = (renorm.mean, renorm.stddev) if renorm is not None else ()
    epsilon = jnp.asarray(layer.epsilon, dtype)
    masked = mask is not None
    mask = mask if masked else jnp.zeros((), bool)

    def statistics(x, mask):
        count, mean, m2 = moments_lib.rows(
            groups.split(x), axes, groups.split(mask) if masked else None
        )
        gathered = replicated(jnp.stack([count, mean, m2]))
        merged = moments_lib.merge_rows(gathered[0], gathered[1], gathered[2], axis=0)
        return moments_lib.Moments(*(v[0] for v in merged))

    def correction(batch, renorm_state):
        if not renorm_state:
            return None
        state = transform.Renorm(*renorm_state, layer._clipping)
        return transform.renorm_correction(batch.mean, batch.variance, epsilon, state)

    @jax.custom_vjp
    def training(x, gamma, beta, mask, renorm_state):
        return forward(x, gamma, beta, mask, renorm_state)[0]

    def forward(x, gamma, beta, mask, renorm_state):
        batch = statistics(x, mask)
        r_d = correction(batch, renorm_state)
        scale, offset = transform.corrected_params(gamma, beta, r_d)
        multiplier = transform.multiplier(batch.variance, scale, epsilon)
        y = transform.apply(x, batch.mean, multiplier, offset)
        return (y, *batch), (x, mask, batch, gamma, r_d)

    def backward(residuals, cotangents):
        x, mask, batch, gamma, r_d = residuals
        dy = cotangents[0]  # the statistics' cotangents: they only feed the moving averages
        inverse = jax.lax.rsqrt(batch.variance + epsilon)
        x_hat = (x - batch.mean) * inverse
        split_dy, split_x_hat = groups.split(dy), groups.split(x_hat)
        local = jnp.stack(
            [
                jnp.sum(split_dy, axis=axes, keepdims=True),
                jnp.sum(split_dy * split_x_hat, axis=axes, keepdims=True),
            ]
        )
        sum_dy, sum_dy_x_hat = jnp.sum(replicated(local), axis=1)
        scale = transform.corrected_scale(gamma, r_d) * inverse
        inner = (sum_dy + x_hat * sum_dy_x_hat) / jnp.maximum(batch.count, 1.0)
        if masked:
            inner = jnp.where(mask, inner, 0.0)
        d_gamma, d_beta = transform.params_grad(sum_dy, sum_dy_x_hat, r_d)
        return (
            scale * (dy - inner),
            d_gamma,
            d_beta,
            None,
            tuple(jnp.zeros_like(v) for v in renorm_state),
        )

    training.defvjp(lambda *args: forward(*args), backward)
    x = jnp.asarray(inputs, dtype)
    y, count, mean, variance = training(x, gamma, beta, mask, renorm_state)
    return y, moments_lib.Moments(count, mean, variance), []


def compiled(function):
    """The update runs inside the jitted step anyway."""
    return function


def has_float64() -> bool:
    """float64 arrays exist only with ``jax_enable_x64`` (else JAX truncates them to float32)."""
    return bool(jax.config.jax_enable_x64)
