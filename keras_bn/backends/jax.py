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

FUSED_PATHS = "JAX's closed-form training transform runs every configuration"


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
    """The closed-form path takes any feature axes, masks, renorm and ghost batches."""
    return True


def fused_plan(layer, inputs, mask, replicas, slices, averages):
    """The transform with a closed-form backward (:func:`_closed_form_training`) for every
    call but ``fused=False``: local statistics (each device slice's or ghost batch's, no
    collective either way) or, with ``synchronized=True`` over a batch sharded on several
    devices, global ones with one collective forward and one backward (left to XLA's
    partitioner, the plain reductions take 2 forward and 4 backward)."""
    if not layer.fused:
        return None
    devices = device_slices()
    synced = layer.synchronized and devices > 1
    return functools.partial(
        _closed_form_training,
        layer,
        inputs,
        mask,
        devices if synced else slices,
        synced,
        averages,
    )


def _closed_form_training(layer, inputs, mask, slices, synced, averages):
    """Alg. 1 with the paper's chain rule (:func:`_closed_form`): ``(outputs, moments, group
    axes)``, on the batch viewed as ``slices`` device slices and, with ``virtual_batch_size``,
    ghost batches (:class:`keras_bn.moments.Groups`, the plain path's view).
    """
    dtype = layer._statistics_dtype
    groups = moments_lib.Groups(slices, layer.virtual_batch_size)
    shape = groups.shape(layer._broadcast_shape)
    gamma, beta = (
        jnp.broadcast_to(jnp.asarray(p, dtype), shape) for p in layer._params(dtype, shape)
    )
    renorm = layer._renorm_state(shape, averages)
    renorm_state = (renorm.mean, renorm.stddev) if renorm is not None else ()
    masked = mask is not None
    found = _batch_mesh() if synced else None
    training = _closed_form(
        tuple(groups.axes(layer._reduction_axes)),
        float(layer.epsilon),
        layer._clipping if renorm is not None else None,
        masked,
        synced,
        None if found is None else (found[0].backend_mesh, found[1]),
        tuple(groups.group_axes()),
    )
    x = groups.split(jnp.asarray(inputs, dtype))
    mask = groups.split(mask) if masked else jnp.zeros((), bool)
    y, count, mean, variance = training(x, gamma, beta, mask, renorm_state)
    batch = moments_lib.Moments(count, mean, variance)
    if synced:
        return groups.merge(y, inputs), moments_lib.Moments(*(v[0] for v in batch)), []
    return groups.merge(y, inputs), batch, groups.group_axes()


@functools.cache
def _closed_form(axes, epsilon, clipping, masked, synced, mesh, group_axes):
    """The training transform as a jitted ``jax.custom_vjp``: ``training(x, gamma, beta, mask,
    renorm_state) -> (y, count, mean, variance)``, one per configuration (``mesh``, the batch
    mesh of a synchronized layer, only keys the cache: :func:`replicated` reads it).

    Forward: each group's (device slice's, ghost batch's) (count, mean, M2); the parameters'
    gradients add up over ``group_axes``. With ``synced`` they are gathered on every device
    in ONE collective and merged exactly (Chan), else each slice normalizes with its own.
    Backward: each slice's sums of ``dy`` and ``dy * x_hat`` (gathered in ONE collective and
    added when ``synced``), then ``dx`` elementwise. With a mask, masked entries are
    normalized but enter neither the statistics nor their gradient.

    Jitted so that an eager (op-by-op) step runs the forward and the backward as one compiled
    program each; inside an outer ``jax.jit`` it is inlined like any nested jit.
    """

    def statistics(x, mask):
        count, mean, m2 = moments_lib.rows(x, axes, mask if masked else None)
        if not synced:
            return moments_lib.Moments(count, mean, m2 / jnp.maximum(count, 1.0))
        gathered = replicated(jnp.stack([count, mean, m2]))
        return moments_lib.merge_rows(gathered[0], gathered[1], gathered[2], axis=0)

    def correction(batch, renorm_state, eps):
        if not renorm_state:
            return None
        state = transform.Renorm(*renorm_state, clipping)
        return transform.renorm_correction(batch.mean, batch.variance, eps, state)

    @jax.custom_vjp
    def training(x, gamma, beta, mask, renorm_state):
        return forward(x, gamma, beta, mask, renorm_state)[0]

    def forward(x, gamma, beta, mask, renorm_state):
        eps = jnp.asarray(epsilon, x.dtype)
        batch = statistics(x, mask)
        r_d = correction(batch, renorm_state, eps)
        scale, offset = transform.corrected_params(gamma, beta, r_d)
        multiplier = transform.multiplier(batch.variance, scale, eps)
        mean, multiplier, offset = _own_copy(batch.mean, multiplier, offset)
        y = transform.apply(x, mean, multiplier, offset)
        return (y, *batch), (x, mask, batch, gamma, r_d, renorm_state)

    def backward(residuals, cotangents):
        x, mask, batch, gamma, r_d, renorm_state = residuals
        dy = cotangents[0]  # the statistics' cotangents: they only feed the moving averages
        inverse = jax.lax.rsqrt(batch.variance + jnp.asarray(epsilon, x.dtype))
        # sum(dy * x_hat) as sum(dy * (x - mean)) * inverse: one broadcast less in the pass.
        centred = x - _own_copy(batch.mean)[0]
        sums = jnp.stack(
            [
                jnp.sum(dy, axis=axes, keepdims=True),
                jnp.sum(dy * centred, axis=axes, keepdims=True) * inverse,
            ]
        )
        if synced:
            sums = jnp.sum(replicated(sums), axis=1, keepdims=True)
        sum_dy, sum_dy_x_hat = sums
        scale = transform.corrected_scale(gamma, r_d) * inverse
        mean, inverse = _own_copy(batch.mean, inverse)
        x_hat = (x - mean) * inverse
        inner = (sum_dy + x_hat * sum_dy_x_hat) / jnp.maximum(batch.count, 1.0)
        if masked:
            inner = jnp.where(mask, inner, 0.0)
        d_gamma, d_beta = transform.params_grad(sum_dy, sum_dy_x_hat, r_d)
        # Parameters are shared by every group (device slice, ghost batch): gradients add up.
        if group_axes:
            d_gamma, d_beta = (jnp.sum(g, group_axes, keepdims=True) for g in (d_gamma, d_beta))
        d_gamma, d_beta = (jnp.broadcast_to(g, gamma.shape) for g in (d_gamma, d_beta))
        return (
            scale * (dy - inner),
            d_gamma,
            d_beta,
            None,
            tuple(jnp.zeros_like(v) for v in renorm_state),
        )

    training.defvjp(lambda *args: forward(*args), backward)
    return jax.jit(training)


def _own_copy(*statistics):
    """``statistics`` (per-channel values) as new XLA values, through an optimization barrier.

    Each full-size pass over the batch (the centred sum of squares, the output, the two
    gradient sums, the input gradient) reads the statistics through its own copy, so XLA does
    not merge (CSE) the passes' common ``x - mean`` into one full-size tensor with several
    users, which it then writes to memory and reads back: XLA:CPU's reduction kernels (its
    YNNPACK fusions) take in an elementwise producer only when the reduction is its one user.
    With a copy each, every pass recomputes ``x - mean`` from ``x`` in registers and the
    step's only full-size write is the input gradient (and the output where it is stored).
    The barrier costs nothing at run time (it is removed after fusion).
    """
    return jax.lax.optimization_barrier(statistics)


def compiled(function):
    """The moving-average update jitted: an eager step dispatches it once instead of some
    twenty small ops; an outer ``jax.jit`` inlines it. Its Python flags are static."""
    return jax.jit(function, static_argnames=("unbiased", "cumulative"))


def has_float64() -> bool:
    """float64 arrays exist only with ``jax_enable_x64`` (else JAX truncates them to float32)."""
    return bool(jax.config.jax_enable_x64)
