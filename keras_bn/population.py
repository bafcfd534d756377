"""Exact population statistics after training (Alg. 2 of Ioffe & Szegedy, 2015), on every backend.

`recompute_population_statistics` runs training batches through a trained model in training mode
and writes the averaged batch statistics into every `keras_bn.BatchNormalization`;
`PopulationStatistics` is the Keras callback. The estimators and their bias are discussed in
`docs/population_statistics.md`.

How: while a layer's `_statistics_observer` is set, the layer calls `observer(mean, variance,
count)` with its batch statistics (biased variance; count = values behind each entry, global under
`synchronized=True`; one call per device slice of a JAX data-parallel batch) instead of updating
its moving statistics. The observers add them to float64 accumulators:

- TensorFlow (`keras_bn._population_tf`, imported only on that backend): the step is a
  `tf.function` run with `strategy.run`; the observers are read when it is traced and add to ON_READ
  float64 `tf.Variable`s, reduced across replicas once at the end.
- JAX and PyTorch: the model is called eagerly on each batch and the observers add concrete arrays
  to float64 NumPy accumulators; `torch.distributed` ranks sum theirs once at the end.

The estimator math (what one batch adds, how replicas' totals combine, the final estimate) is
written once, below, against a small array namespace (NumPy here, TensorFlow in the TF module).
"""

import itertools
import sys
import types
import warnings

import keras
import numpy as np

from keras_bn import backends
from keras_bn.layer import BatchNormalization
from keras_bn.model_graph import sublayers

ESTIMATORS = ("paper", "pooled")


# --------------------------------------------------------------------------- estimator math


def _np_divide_no_nan(a, b):
    a, b = np.broadcast_arrays(np.asarray(a, np.float64), np.asarray(b, np.float64))
    return np.divide(a, b, out=np.zeros_like(a), where=b != 0)


# The array operations the estimators use; `keras_bn._population_tf.TF_OPS` has the same names.
NUMPY_OPS = types.SimpleNamespace(
    float64=lambda x: np.asarray(x, np.float64),
    broadcast_to=np.broadcast_to,
    shape=np.shape,
    isfinite=np.isfinite,
    where=np.where,
    stack=np.stack,
    unstack=list,
    zeros_like=np.zeros_like,
    ones_like=np.ones_like,
    square=np.square,
    divide_no_nan=_np_divide_no_nan,
)


def _usable_float64(mean, variance, count, min_count, xp):
    """(mean, variance, count) in float64 and the entries that may enter the estimate."""
    mean = xp.float64(mean)
    variance = xp.float64(variance)
    count = xp.broadcast_to(xp.float64(count), xp.shape(mean))
    usable = xp.isfinite(mean) & xp.isfinite(variance) & (count > min_count)
    return mean, variance, count, usable


class _Paper:
    """Alg. 2: [sum n_b, sum n_b mu_b, sum n_b var_b, sum (n_b - 1), batches], batches of n_b > 1.

    Bias: unbiased mean; variance unbiased for independent batches, low by any excess
    between-batch variance (docs/population_statistics.md).
    """

    rows = 5
    # Rows that are sums over observations (what a synchronized layer reports R times).
    extensive_rows = (0, 1, 2, 3, 4)

    @staticmethod
    def updated(state, mean, variance, count, xp):
        """The state after one batch's (mean, biased variance, count)."""
        mean, variance, count, ok = _usable_float64(mean, variance, count, 1, xp)
        rows = [count, count * mean, count * variance, count - 1.0, xp.ones_like(mean)]
        # where after the product: a non-finite statistic must not leak through 0 * nan.
        return state + xp.stack([xp.where(ok, row, xp.zeros_like(row)) for row in rows])

    @staticmethod
    def combined(state, all_sum, xp):
        """The replicas' states merged; `all_sum` sums a tensor over the replicas."""
        return all_sum(state)

    @staticmethod
    def finalize(totals, unbiased):
        """(mean, variance, count, batches, mean usable, variance usable) from NumPy totals."""
        n, sum_mean, sum_var, dof, batches = totals
        ok = n > 0
        mean = np.divide(sum_mean, n, out=np.zeros_like(n), where=ok)
        variance = np.divide(sum_var, dof if unbiased else n, out=np.zeros_like(n), where=ok)
        return mean, variance, n, batches, ok, ok


class _Pooled:
    """Running (N, mean, M2, batches) of all values pooled (Chan et al.), batches of n_b >= 1.

    Bias: unbiased mean and variance of every value seen; high against the within-batch spread
    the layer normalizes with whenever batch means vary (docs/population_statistics.md).
    """

    rows = 4
    extensive_rows = (0, 2, 3)

    @staticmethod
    def updated(state, mean, variance, count, xp):
        mean, variance, count, ok = _usable_float64(mean, variance, count, 0, xp)
        zero = xp.zeros_like(mean)
        n_b = xp.where(ok, count, zero)
        mean_b = xp.where(ok, mean, zero)
        m2_b = xp.where(ok, count * variance, zero)
        n, mu, m2, batches = xp.unstack(state)
        total = n + n_b
        weight = xp.divide_no_nan(n_b, total)
        delta = mean_b - mu
        merged = [
            total,
            mu + delta * weight,
            m2 + m2_b + delta * delta * n * weight,
            batches + xp.where(ok, xp.ones_like(mean), zero),
        ]
        return xp.stack(merged)

    @staticmethod
    def combined(state, all_sum, xp):
        # Two-pass merge of the replicas' (N, mean, M2): exact and as stable as Chan's formula.
        n, mu, m2, batches = xp.unstack(state)
        total, sum_mean, total_batches = xp.unstack(all_sum(xp.stack([n, n * mu, batches])))
        grand_mean = xp.divide_no_nan(sum_mean, total)
        total_m2 = all_sum(m2 + n * xp.square(mu - grand_mean))
        return xp.stack([total, grand_mean, total_m2, total_batches])

    @staticmethod
    def finalize(totals, unbiased):
        n, mean, m2, batches = totals
        mean_ok = n > 0
        var_ok = n > 1 if unbiased else mean_ok
        variance = np.divide(m2, n - 1.0 if unbiased else n, out=np.zeros_like(n), where=var_ok)
        return mean, variance, n, batches, mean_ok, var_ok


_ESTIMATORS = {"paper": _Paper, "pooled": _Pooled}


# ------------------------------------------------------------------------ layers and checks


def _bn_layers(model):
    """(ours, keras') BatchNormalization layers of `model`, nested models included, no repeats."""
    if not isinstance(model, keras.layers.Layer):
        raise ValueError(
            f"`model` must be a Keras model or layer; got {type(model).__name__}. Pass the model "
            "whose BatchNormalization layers should receive population statistics."
        )
    layers = [model, *sublayers(model)]
    ours = [layer for layer in layers if isinstance(layer, BatchNormalization)]
    theirs = [
        layer
        for layer in layers
        if isinstance(layer, keras.layers.BatchNormalization)
        and not isinstance(layer, BatchNormalization)
    ]
    return ours, theirs


def _layer_key(layer, used):
    key = getattr(layer, "path", None) or layer.name
    base, i = key, 1
    while key in used:
        key, i = f"{base}_{i}", i + 1
    return key


def _validate_steps(steps):
    if steps is None:
        return None
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(
            f"`steps` must be a positive integer or None (the whole finite dataset); got {steps!r}."
        )
    return int(steps)


def _validate_estimator(estimator):
    if estimator not in ESTIMATORS:
        raise ValueError(f"`estimator` must be one of {ESTIMATORS}; got {estimator!r}.")
    return estimator


def _read(variable):
    # `.value`: NumPy warns that a Keras variable's `__array__` takes no `copy` (JAX).
    return np.asarray(keras.ops.convert_to_numpy(variable.value))


def _check_layers(model):
    """The trainable keras_bn layers to recompute, and Keras's BN layers, with warnings."""
    ours, theirs = _bn_layers(model)
    if not ours:
        raise ValueError(
            "`model` contains no keras_bn.BatchNormalization layer, so there is nothing to "
            "recompute. (keras.layers.BatchNormalization layers are not supported.)"
        )
    if not model.built or not all(layer.built for layer in ours):
        raise ValueError(
            "`model` (or one of its BatchNormalization layers) is not built: call it on a batch "
            "(or `model.build(input_shape)`) first."
        )
    frozen = [layer.name for layer in ours if not layer.trainable]
    active = [layer for layer in ours if layer.trainable]
    if frozen:
        warnings.warn(
            f"BatchNormalization layers {frozen} have trainable=False: they run in inference "
            "mode and keep their moving statistics.",
            stacklevel=3,
        )
    if not active:
        raise ValueError(
            "Every keras_bn.BatchNormalization layer of `model` has trainable=False, so none "
            "produces batch statistics: set `trainable=True` on the layers to recompute."
        )
    if theirs:
        warnings.warn(
            f"keras.layers.BatchNormalization layers {[layer.name for layer in theirs]} are not "
            "supported by recompute_population_statistics and are left unchanged.",
            stacklevel=3,
        )
    return active, theirs


# ------------------------------------------------------------------------------- datasets


def _refuse_single_array(dataset):
    tf = sys.modules.get("tensorflow")
    if (
        isinstance(dataset, np.ndarray)
        or keras.ops.is_tensor(dataset)
        or (tf is not None and tf.is_tensor(dataset))
    ):
        raise ValueError(
            "`dataset` must be a tf.data.Dataset or an iterable of batches, not a single array: "
            "use e.g. tf.data.Dataset.from_tensor_slices(x).batch(batch_size), or a list of "
            "batches."
        )


def _tf_dataset_steps(dataset, steps):
    """`steps` for a tf.data.Dataset: its cardinality when None; an error if infinite."""
    tf = sys.modules["tensorflow"]
    cardinality = int(dataset.cardinality())
    if cardinality == tf.data.INFINITE_CARDINALITY and steps is None:
        raise ValueError(
            "`dataset` is infinite and `steps` is None: pass `steps=` (number of batches)."
        )
    if steps is None and cardinality >= 0:
        steps = cardinality
    return steps


def _python_batches(dataset, steps):
    """(iterator of at most `steps` elements of an iterable, number of steps or None)."""
    try:
        iterator = iter(dataset)
    except TypeError:
        raise ValueError(
            "`dataset` must be a tf.data.Dataset or an iterable of batches (x, (x, y) or "
            f"(x, y, sample_weight)); got {type(dataset).__name__}."
        ) from None
    if steps is None and hasattr(dataset, "__len__"):
        steps = len(dataset)
    return itertools.islice(iterator, steps), steps


def _model_input(element):
    return keras.utils.unpack_x_y_sample_weight(element)[0]


def _run_steps(batches, target, step, verbose, steps, stacklevel=4):
    """Calls `step(x)` on each batch (`batches` stops after `steps`); returns the count.
    `stacklevel`: of the running-out warning, so that it names the user's call."""
    progbar = keras.utils.Progbar(target, verbose=verbose) if verbose else None
    seen = 0
    for x in batches:
        step(x)
        seen += 1
        if progbar is not None:
            progbar.update(seen)
    if progbar is not None and target != seen:
        progbar.update(seen, finalize=True)
    if seen == 0:
        raise ValueError("`dataset` yielded no batches.")
    if steps is not None and seen < steps:
        warnings.warn(
            f"`dataset` ran out of data after {seen} of {steps} steps; the population "
            f"statistics use those {seen} batches.",
            stacklevel=stacklevel,
        )
    return seen


# ------------------------------------------------------------------------------ JAX, torch


def _eager_batches(dataset, steps):
    """(iterator of model inputs, number of steps or None) for the JAX and torch backends."""
    _refuse_single_array(dataset)
    tf = sys.modules.get("tensorflow")  # only if the user imported it: never needed here
    if tf is not None and isinstance(dataset, tf.distribute.DistributedDataset):
        raise ValueError(
            "A tf.distribute distributed dataset needs the TensorFlow backend; with the "
            f"{keras.backend.backend()} backend pass the tf.data.Dataset or an iterable of "
            "batches."
        )
    if tf is not None and isinstance(dataset, tf.data.Dataset):
        steps = _tf_dataset_steps(dataset, steps)
        if steps is not None:
            dataset = dataset.take(steps)
        iterator = dataset.as_numpy_iterator()
    else:
        iterator, steps = _python_batches(dataset, steps)
    return (_model_input(element) for element in iterator), steps


def _jax_placed(x):
    """A global batch placed as `keras.distribution`'s data layout says (device slices)."""
    distribution = keras.distribution.distribution()
    if distribution is None:
        return x
    slices = backends.current().device_slices()
    for leaf in keras.tree.flatten(x):
        size = leaf.shape[0]
        if slices > 1 and size % slices:
            raise ValueError(
                f"A batch of {size} examples does not split over the {slices} devices of the "
                f"current keras.distribution (each device slice is one batch of Alg. 2): use "
                f"a batch size divisible by {slices} (e.g. tf.data's drop_remainder=True)."
            )

    def place(leaf):
        layout = distribution.get_data_layout(leaf.shape)
        return keras.distribution.distribute_tensor(leaf, layout)

    return keras.tree.map_structure(place, x)


class _AgreedBatches:
    """Batches of this torch.distributed rank while EVERY rank still has one.

    The layers exchange statistics across ranks in every training call, so all ranks must run
    the same number of steps: before each step the ranks sum a has-a-batch flag (one tiny
    all-reduce) and all stop as soon as one has run out.
    """

    def __init__(self, batches, replicas):
        self.batches, self.replicas = iter(batches), replicas

    def __iter__(self):
        steps = 0
        while True:
            batch = next(self.batches, None)
            flag = keras.ops.convert_to_tensor(
                np.array([0.0 if batch is None else 1.0], np.float32)
            )
            if keras.ops.convert_to_numpy(self.replicas.sum(flag))[0] < self.replicas.count:
                if batch is not None:
                    warnings.warn(
                        f"torch.distributed rank {self.replicas.index} stopped after {steps} "
                        "steps with data left: another rank ran out (every rank runs the same "
                        f"number of steps); the population statistics use those {steps} steps.",
                        stacklevel=5,
                    )
                return
            steps += 1
            yield batch


def _no_grad():
    if keras.backend.backend() == "torch":
        import torch

        return torch.no_grad()
    import contextlib

    return contextlib.nullcontext()


def _accumulate_eager(model, dataset, steps, layers, estimator, verbose):
    """JAX and torch: eager training-mode calls; float64 NumPy accumulators; totals, replicas."""
    replicas = backends.current().replica_group()  # torch.distributed ranks, else None
    states = [np.zeros((estimator.rows, *layer.moving_mean.shape)) for layer in layers]

    def observer(i):
        def observe(mean, variance, count):
            mean, variance, count = (keras.ops.convert_to_numpy(v) for v in (mean, variance, count))
            with np.errstate(invalid="ignore", over="ignore"):
                states[i] = estimator.updated(states[i], mean, variance, count, NUMPY_OPS)

        return observe

    for i, layer in enumerate(layers):
        layer._statistics_observer = observer(i)

    place = _jax_placed if keras.backend.backend() == "jax" else lambda x: x

    def step(x):
        with _no_grad():
            model(place(x), training=True)

    batches, target = _eager_batches(dataset, steps)
    if replicas is not None:
        batches = _AgreedBatches(batches, replicas)
    _run_steps(batches, target, step, verbose, steps)
    if replicas is None:
        return states, 1

    def all_sum(value):
        summed = replicas.sum(keras.ops.convert_to_tensor(value, dtype="float64"))
        return np.asarray(keras.ops.convert_to_numpy(summed), np.float64)

    # The estimators work channel by channel: every layer's channels side by side make one
    # state, so the ranks exchange once ("paper") or twice ("pooled") for the whole model.
    packed = np.concatenate([s.reshape(estimator.rows, -1) for s in states], axis=1)
    packed = estimator.combined(packed, all_sum, NUMPY_OPS)
    bounds = np.cumsum([0] + [s[0].size for s in states])
    return [
        packed[:, a:b].reshape(s.shape)
        for a, b, s in zip(bounds[:-1], bounds[1:], states, strict=True)
    ], replicas.count


# ------------------------------------------------------------------------------ the function


def recompute_population_statistics(model, dataset, steps=None, *, estimator="paper", verbose=1):
    """Computes exact population statistics (Alg. 2) and writes them into every BN layer.

    Runs `steps` batches of `dataset` through `model` in training mode, so that every
    `keras_bn.BatchNormalization` normalizes with its batch statistics and sees the inputs it saw
    in training (the paper's N_BN^tr). Per layer and channel the batch statistics are accumulated
    in float64 and the estimate is written into `moving_mean` and `moving_variance`. Trainable
    weights and optimizer state are not touched. Other layers run in training mode too (Dropout
    drops, as in N_BN^tr).

    With n_b the values behind a channel's statistic in batch b (batch x spatial positions,
    unmasked only, over all replicas for `synchronized=True` layers) and mu_b, var_b the batch mean
    and biased variance:

    - `"paper"` (Alg. 2): `E[x] = sum n_b mu_b / sum n_b`,
      `Var[x] = sum n_b var_b / sum (n_b - 1)` (the paper's `m/(m-1) E_B[var_B]` for equal
      batches). Unbiased for independent batches; biased low by any excess between-batch variance.
    - `"pooled"`: mean and `M2 / (N - 1)` of every value seen (Chan et al.). Unbiased for the
      values; biased high against the within-batch spread whenever batch means vary.

    With `unbiased_variance=False` on a layer the variance divides by `sum n_b` (or `N`). Batches
    with too few values (`n_b <= 1` for "paper", 0 for "pooled") or non-finite statistics are
    skipped per channel; a channel with none keeps its old value. The derivations, and how the
    estimators work under each backend's data parallelism, are in `docs/population_statistics.md`.

    Backends and data parallelism (a "batch" of Alg. 2 is what one replica normalizes with):

    - TensorFlow: each step is a `tf.function`. Under a `tf.distribute` strategy (Mirrored,
      MultiWorkerMirrored, TPU) it runs with `strategy.run`; each replica's batch is one batch
      (the global batch for `synchronized=True` layers, counted once), and the replicas'
      accumulators are reduced once at the end.
    - JAX: the model is called eagerly on each batch. Under `keras.distribution.DataParallel`
      (any distribution with a batch axis) each batch is placed with the distribution's data
      layout and each DEVICE SLICE of it is one batch (as a TensorFlow replica's), or the global
      batch for `synchronized=True` layers; the batch size must be divisible by the number of
      devices (a ValueError otherwise).
    - PyTorch: the model is called eagerly (under `torch.no_grad()`) on each batch. Under
      `torch.distributed` with more than one rank, call this on every rank with that rank's own
      data (e.g. a `DistributedSampler` shard; batch sizes may differ across ranks): each rank's
      batch is one batch (the global batch for `synchronized=True` layers, counted once), the
      ranks stop together when any runs out of data, and their accumulators are summed at the
      end (one float64 all-reduce for "paper", two for "pooled", for all layers at once), so
      every rank writes the same statistics.

    Accumulation is float64 everywhere (NumPy on JAX and torch, so it needs no `jax_enable_x64`).
    The written statistics take the dtype of the layer's variables: float32, or float64 for a
    float64 layer (on JAX only with `jax_enable_x64`; without it JAX makes those variables
    float32, and the float64 estimate is rounded to float32 when written).

    Layers: every `keras_bn.BatchNormalization` reachable from `model`, nested models included;
    one with `trainable=False` runs in inference mode and is left unchanged (with a warning).
    `keras.layers.BatchNormalization` layers are not supported: their moving statistics are
    restored after the pass (with a warning). A layer called several times per step contributes
    one batch per call. A renorm layer also gets `moving_stddev = sqrt(Var[x] + epsilon)`, from
    which its training updates derive the moving variance; its `renorm_mean`/`renorm_stddev`
    (the r, d state of training) are not changed.

    Args:
        model: a built Keras model (or layer) containing `keras_bn.BatchNormalization` layers. On
            TensorFlow, if it was built under a `tf.distribute` strategy (or this is called in a
            strategy scope), each step runs with `strategy.run`.
        dataset: TRAINING batches, preprocessed as in training, of the training batch size: a
            `tf.data.Dataset` or an iterable of numpy/tensor batches (a list, a generator, a
            `torch.utils.data.DataLoader`). On TensorFlow also a distributed dataset; there an
            iterable's batches are split evenly over the replicas of a strategy. On JAX and torch
            TensorFlow is never needed; a `tf.data.Dataset` is read as NumPy. Elements are `x`,
            `(x, y)` or `(x, y, sample_weight)`; only `x` is used.
        steps: number of batches. `None` runs the whole dataset, which must be finite. If the
            data end first, the batches seen are used and a warning says so.
        estimator: `"paper"` (default) or `"pooled"`.
        verbose: 0 silent, 1 progress bar, 2 one line at the end (`keras.utils.Progbar`).

    Returns:
        A dict from each updated layer's path (`layer.path`, else its name) to a dict with
        `"mean"` and `"variance"` (the arrays written), `"count"` (values that entered the
        estimate, per channel) and `"batches"` (batch statistics that entered it, per channel).

    Raises:
        ValueError: bad `estimator`/`steps`/`dataset`, an infinite dataset without `steps`, an
            empty dataset, an unbuilt model, no trainable `keras_bn.BatchNormalization`, or (JAX
            data parallelism) a batch the devices do not divide.

    Example (any backend):

    ```python
    model.fit(train_ds, epochs=10)
    keras_bn.recompute_population_statistics(model, train_ds, steps=200)
    model.evaluate(test_ds)  # inference uses exact population statistics
    ```

    JAX on several devices (each device's slice of each batch is one batch of Alg. 2):

    ```python
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=keras.distribution.list_devices())
    )
    model = build_model()  # after set_distribution
    model.fit(x, y, batch_size=256, epochs=10)
    keras_bn.recompute_population_statistics(model, batches_of_256, estimator="paper")
    ```

    Reference:
        Ioffe & Szegedy, 2015, Alg. 2. Chan, Golub & LeVeque, "Updating formulae and a pairwise
        algorithm for computing sample variances", 1979.
    """
    estimator = _ESTIMATORS[_validate_estimator(estimator)]
    steps = _validate_steps(steps)
    active, theirs = _check_layers(model)
    saved_observers = [layer._statistics_observer for layer in active]
    saved_keras_stats = [
        (_read(layer.moving_mean), _read(layer.moving_variance)) for layer in theirs
    ]
    try:
        if keras.backend.backend() == "tensorflow":
            from keras_bn import _population_tf

            totals, replicas = _population_tf.accumulate(
                model, dataset, steps, active, estimator, verbose
            )
        else:
            totals, replicas = _accumulate_eager(model, dataset, steps, active, estimator, verbose)
    finally:
        for layer, observer in zip(active, saved_observers, strict=True):
            layer._statistics_observer = observer
        for layer, (mean, variance) in zip(theirs, saved_keras_stats, strict=True):
            layer.moving_mean.assign(mean)
            layer.moving_variance.assign(variance)
    return _write(active, estimator, totals, replicas)


def _write(layers, estimator, totals, replicas):
    result, unobserved = {}, []
    for layer, total in zip(layers, totals, strict=True):
        total = np.asarray(total, np.float64)
        if replicas > 1 and layer.synchronized:
            # Every replica observed the same global statistics: count them once.
            total = total.copy()
            total[list(estimator.extensive_rows)] /= replicas
        mean, variance, count, batches, mean_ok, var_ok = estimator.finalize(
            total, layer.unbiased_variance
        )
        if not np.any(mean_ok):
            unobserved.append(layer.name)
            continue
        old_mean, old_variance = _read(layer.moving_mean), _read(layer.moving_variance)
        new_mean = np.where(mean_ok, mean, old_mean).astype(old_mean.dtype)
        new_variance = np.where(var_ok, variance, old_variance).astype(old_variance.dtype)
        layer.moving_mean.assign(new_mean)
        layer.moving_variance.assign(new_variance)
        if layer.renorm:
            # The renorm layer's moving variance is derived from moving_stddev at every training
            # update: keep the two consistent. renorm_mean/renorm_stddev (training-only r, d
            # state) are left as they are.
            layer.moving_stddev.assign(
                np.sqrt(new_variance + layer.epsilon).astype(old_variance.dtype)
            )
        result[_layer_key(layer, result)] = {
            "mean": new_mean,
            "variance": new_variance,
            "count": count,
            "batches": batches,
        }
    if unobserved:
        warnings.warn(
            f"BatchNormalization layers {unobserved} received no usable batch statistics (not "
            "called in training mode, or only batches of <= 1 value / non-finite statistics); "
            "their moving statistics are unchanged.",
            stacklevel=3,
        )
    return result


class PopulationStatistics(keras.callbacks.Callback):
    """Keras callback: exact population statistics (Alg. 2) at the end of training.

    Calls `recompute_population_statistics(model, dataset, steps, estimator=...)` in
    `on_train_end`, so the model that `fit` returns carries population statistics instead of
    moving averages. With `recompute_before_evaluation=True` it also recomputes in
    `on_test_begin`: before `fit`'s validation at the end of each epoch (after the epoch's last
    weight update; `on_epoch_end` would come after validation) and before
    `model.evaluate(..., callbacks=[cb])`. The end-of-training recompute is skipped when the last
    validation already recomputed with the final weights.

    Works with `model.fit` on every backend and in the same distribution setups as the function
    (a `tf.distribute` strategy, JAX's `keras.distribution.DataParallel`, `torch.distributed`
    ranks: there every rank's `fit` calls it with that rank's own `dataset`).

    Pass a re-iterable `dataset` (a `tf.data.Dataset`, a list, a `DataLoader`): a one-shot
    iterator would be used up by the first recompute. The last result is in `last_result`.

    Args:
        dataset: training batches, as for `recompute_population_statistics`.
        steps: batches per recompute; `None` means the whole (finite) dataset.
        estimator: `"paper"` (Alg. 2, default) or `"pooled"`.
        recompute_before_evaluation: also recompute before each evaluation (see above).
        verbose: progress bar of each recompute (0 by default, so it does not interleave with
            fit's own progress bar).

    Example:

    ```python
    callback = keras_bn.PopulationStatistics(train_ds, steps=100)
    model.fit(train_ds, epochs=10, callbacks=[callback])
    ```
    """

    def __init__(
        self,
        dataset,
        steps=None,
        estimator="paper",
        recompute_before_evaluation=False,
        verbose=0,
    ):
        super().__init__()
        self.dataset = dataset
        self.steps = _validate_steps(steps)
        self.estimator = _validate_estimator(estimator)
        self.recompute_before_evaluation = bool(recompute_before_evaluation)
        self.verbose = verbose
        self.last_result = None
        # True while the statistics match the current weights (no epoch started since).
        self._fresh = False

    def recompute(self):
        """Recomputes now and returns the result dict."""
        self.last_result = recompute_population_statistics(
            self.model, self.dataset, self.steps, estimator=self.estimator, verbose=self.verbose
        )
        self._fresh = True
        return self.last_result

    def on_train_begin(self, logs=None):
        self._fresh = False

    def on_epoch_begin(self, epoch, logs=None):
        self._fresh = False

    def on_test_begin(self, logs=None):
        if self.recompute_before_evaluation:
            self.recompute()

    def on_train_end(self, logs=None):
        if not self._fresh:
            self.recompute()


__all__ = ["PopulationStatistics", "recompute_population_statistics"]
