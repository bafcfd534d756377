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

import jax
import keras

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
    return None


def compiled(function):
    """The update runs inside the jitted step anyway."""
    return function
