"""What differs per Keras backend: how per-replica statistics travel, and the fast paths.

One module per backend (``tensorflow``, ``jax``, ``torch``), imported only when that backend
is Keras's, so ``import keras_bn`` never loads another framework. Each module gives:

- ``replica_group()``: the replicas whose batches the call sees one of (a ``tf.distribute``
  step, ``torch.distributed`` ranks), with ``count``, ``index`` and ``sum(value)`` (one
  exchange, no gradient); None when the call sees the whole batch.
- ``device_slices()``: how many device slices the batch the call sees is made of (a JAX
  data-parallel batch; 1 elsewhere); ``replicated(value)`` gathers such per-slice values on
  every device.
- ``synced_moments(x, axes, mask, replicas)``: the global batch's moments, differentiable, with
  one exchange forward and one backward.
- ``fusable(...)``, ``FUSED_PATHS``, ``fused_plan(...)``: the fused training transforms
  (``averages``: renorm's averages as the layer read them for the call, or None).
- ``compiled(function)``: the moving-average update, compiled where that pays.
"""

from __future__ import annotations

import importlib

import keras

_LOADED = {}


def current():
    """The module of Keras's current backend (a dict look-up after the first call, which
    ``torch.compile`` traces without a graph break)."""
    name = keras.backend.backend()
    module = _LOADED.get(name)
    if module is None:
        module = _LOADED[name] = importlib.import_module(f"keras_bn.backends.{name}")
    return module
