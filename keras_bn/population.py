"""Exact population statistics after training (Alg. 2 of Ioffe & Szegedy, 2015).

`recompute_population_statistics` runs training batches through a trained model in training mode
and writes the averaged batch statistics into every `keras_bn.BatchNormalization`;
`PopulationStatistics` is the Keras callback. The estimators and their bias are discussed in
`docs/population_statistics.md`.

How: while a layer's `_statistics_observer` is set, the layer calls `observer(mean, variance,
count)` with its batch statistics (biased variance; count = values behind each entry, global under
`synchronized=True`) instead of updating its moving statistics. The observers below add them to
float64 accumulators.
"""

import warnings

import keras
import numpy as np
import tensorflow as tf

from keras_bn.layer import BatchNormalization
from keras_bn.model_graph import sublayers

ESTIMATORS = ("paper", "pooled")


# Each accumulator is ONE float64 variable, ON_READ / SUM: under a strategy every replica adds to
# its own copy with no communication per step, and `combine` all-reduces the copies at the end.


def _new_accumulator(shape):
    return tf.Variable(
        tf.zeros(shape, tf.float64),
        trainable=False,
        synchronization=tf.VariableSynchronization.ON_READ,
        aggregation=tf.VariableAggregation.SUM,
    )


def _usable_float64(mean, variance, count, min_count):
    """(mean, variance, count) in float64 and the entries that may enter the estimate."""
    mean = tf.cast(mean, tf.float64)
    variance = tf.cast(variance, tf.float64)
    count = tf.broadcast_to(tf.cast(count, tf.float64), tf.shape(mean))
    usable = tf.math.is_finite(mean) & tf.math.is_finite(variance) & (count > min_count)
    return mean, variance, count, usable


class _PaperAccumulator:
    """Alg. 2: [sum n_b, sum n_b mu_b, sum n_b var_b, sum (n_b - 1), batches], batches of n_b > 1.

    Bias: unbiased mean; variance unbiased for independent batches, low by any excess
    between-batch variance (docs/population_statistics.md).
    """

    extensive_rows = (0, 1, 2, 3, 4)

    def __init__(self, shape):
        self.state = _new_accumulator((5,) + tuple(shape))

    def observe(self, mean, variance, count):
        mean, variance, count, ok = _usable_float64(mean, variance, count, min_count=1)
        rows = [count, count * mean, count * variance, count - 1.0, tf.ones_like(mean)]
        # tf.where after the product: a non-finite statistic must not leak through 0 * nan.
        self.state.assign_add(tf.stack([tf.where(ok, row, tf.zeros_like(row)) for row in rows]))

    def combine(self):
        ctx = tf.distribute.get_replica_context()
        return ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.identity(self.state))

    @staticmethod
    def finalize(totals, unbiased):
        n, sum_mean, sum_var, dof, batches = totals
        ok = n > 0
        mean = np.divide(sum_mean, n, out=np.zeros_like(n), where=ok)
        variance = np.divide(sum_var, dof if unbiased else n, out=np.zeros_like(n), where=ok)
        return mean, variance, n, batches, ok, ok


class _PooledAccumulator:
    """Running (N, mean, M2, batches) of all values pooled (Chan et al.), batches of n_b >= 1.

    Bias: unbiased mean and variance of every value seen; high against the within-batch spread
    the layer normalizes with whenever batch means vary (docs/population_statistics.md).
    """

    extensive_rows = (0, 2, 3)

    def __init__(self, shape):
        self.state = _new_accumulator((4,) + tuple(shape))

    def observe(self, mean, variance, count):
        mean, variance, count, ok = _usable_float64(mean, variance, count, min_count=0)
        zero = tf.zeros_like(mean)
        n_b = tf.where(ok, count, zero)
        mean_b = tf.where(ok, mean, zero)
        m2_b = tf.where(ok, count * variance, zero)
        n, mu, m2, batches = tf.unstack(tf.identity(self.state))
        total = n + n_b
        weight = tf.math.divide_no_nan(n_b, total)
        delta = mean_b - mu
        merged = [
            total,
            mu + delta * weight,
            m2 + m2_b + delta * delta * n * weight,
            batches + tf.cast(ok, tf.float64),
        ]
        self.state.assign(tf.stack(merged))

    def combine(self):
        # Two-pass merge of the replicas' (N, mean, M2): exact and as stable as Chan's formula.
        ctx = tf.distribute.get_replica_context()
        n, mu, m2, batches = tf.unstack(tf.identity(self.state))
        first = ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.stack([n, n * mu, batches]))
        total, sum_mean, total_batches = tf.unstack(first)
        grand_mean = tf.math.divide_no_nan(sum_mean, total)
        total_m2 = ctx.all_reduce(tf.distribute.ReduceOp.SUM, m2 + n * tf.square(mu - grand_mean))
        return tf.stack([total, grand_mean, total_m2, total_batches])

    @staticmethod
    def finalize(totals, unbiased):
        n, mean, m2, batches = totals
        mean_ok = n > 0
        var_ok = n > 1 if unbiased else mean_ok
        variance = np.divide(m2, n - 1.0 if unbiased else n, out=np.zeros_like(n), where=var_ok)
        return mean, variance, n, batches, mean_ok, var_ok


_ACCUMULATORS = {"paper": _PaperAccumulator, "pooled": _PooledAccumulator}


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


def _select_x(*element):
    data = element if len(element) > 1 else element[0]
    return keras.utils.unpack_x_y_sample_weight(data)[0]


def _pick_strategy(model):
    if tf.distribute.has_strategy():
        return tf.distribute.get_strategy()
    strategy = getattr(model, "distribute_strategy", None)
    return strategy if strategy is not None else tf.distribute.get_strategy()


def _split_for_replicas(x, strategy):
    """Distributes one global batch (nested tensors) evenly over the replicas, like tf.data does."""
    replicas = strategy.num_replicas_in_sync
    size = int(tf.nest.flatten(x)[0].shape[0])
    bounds = [size * r // replicas for r in range(replicas + 1)]

    def value_fn(ctx):
        r = ctx.replica_id_in_sync_group
        return tf.nest.map_structure(lambda t: t[bounds[r] : bounds[r + 1]], x)

    return strategy.experimental_distribute_values_from_function(value_fn)


def _batches(dataset, steps, strategy):
    """(iterator of model inputs ready for `strategy.run`, number of steps or None)."""
    if isinstance(dataset, (np.ndarray, tf.Tensor)) or keras.ops.is_tensor(dataset):
        raise ValueError(
            "`dataset` must be a tf.data.Dataset or an iterable of batches, not a single array: "
            "use e.g. tf.data.Dataset.from_tensor_slices(x).batch(batch_size)."
        )
    if isinstance(dataset, tf.distribute.DistributedDataset):
        return iter(dataset), steps
    if isinstance(dataset, tf.data.Dataset):
        cardinality = int(dataset.cardinality())
        if cardinality == tf.data.INFINITE_CARDINALITY and steps is None:
            raise ValueError(
                "`dataset` is infinite and `steps` is None: pass `steps=` (number of batches)."
            )
        if steps is None and cardinality >= 0:
            steps = cardinality
        if steps is not None:
            dataset = dataset.take(steps)
        dataset = dataset.map(_select_x)
        if strategy.num_replicas_in_sync > 1:
            dataset = strategy.experimental_distribute_dataset(dataset)
        return iter(dataset), steps
    try:
        iterator = iter(dataset)
    except TypeError:
        raise ValueError(
            "`dataset` must be a tf.data.Dataset or an iterable of batches (x, (x, y) or "
            f"(x, y, sample_weight)); got {type(dataset).__name__}."
        ) from None
    if steps is None and hasattr(dataset, "__len__"):
        steps = len(dataset)

    def generate():
        for element in iterator:
            x = keras.utils.unpack_x_y_sample_weight(element)[0]
            x = tf.nest.map_structure(tf.convert_to_tensor, x)
            yield _split_for_replicas(x, strategy) if strategy.num_replicas_in_sync > 1 else x

    return generate(), steps


def _read(variable):
    return np.asarray(keras.ops.convert_to_numpy(variable))


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
    estimators work under a `tf.distribute` strategy, are in `docs/population_statistics.md`.

    Layers: every `keras_bn.BatchNormalization` reachable from `model`, nested models included;
    one with `trainable=False` runs in inference mode and is left unchanged (with a warning).
    `keras.layers.BatchNormalization` layers are not supported: their moving statistics are
    restored after the pass (with a warning). A layer called several times per step contributes
    one batch per call. A renorm layer also gets `moving_stddev = sqrt(Var[x] + epsilon)`, from
    which its training updates derive the moving variance; its `renorm_mean`/`renorm_stddev`
    (the r, d state of training) are not changed.

    Args:
        model: a built Keras model (or layer) containing `keras_bn.BatchNormalization` layers. If
            it was built under a `tf.distribute` strategy (or this is called in a strategy
            scope), each step runs with `strategy.run`.
        dataset: TRAINING batches, preprocessed as in training, of the training batch size: a
            `tf.data.Dataset` (or a distributed one) or an iterable of numpy/tensor batches
            (split evenly over the replicas under a strategy). Elements are `x`, `(x, y)` or
            `(x, y, sample_weight)`; only `x` is used.
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
            empty dataset, an unbuilt model, or no trainable `keras_bn.BatchNormalization`.

    Example:

    ```python
    model.fit(train_ds, epochs=10)
    keras_bn.recompute_population_statistics(model, train_ds, steps=200)
    model.evaluate(test_ds)  # inference uses exact population statistics
    ```

    Reference:
        Ioffe & Szegedy, 2015, Alg. 2. Chan, Golub & LeVeque, "Updating formulae and a pairwise
        algorithm for computing sample variances", 1979.
    """
    estimator = _validate_estimator(estimator)
    steps = _validate_steps(steps)
    active, theirs = _check_layers(model)
    strategy = _pick_strategy(model)
    saved_observers = [layer._statistics_observer for layer in active]
    saved_keras_stats = [
        (_read(layer.moving_mean), _read(layer.moving_variance)) for layer in theirs
    ]
    try:
        with strategy.scope():
            accumulators = [
                _ACCUMULATORS[estimator](tuple(layer.moving_mean.shape)) for layer in active
            ]
            # Observers are read when the step is traced: set them before tracing.
            for layer, accumulator in zip(active, accumulators, strict=True):
                layer._statistics_observer = accumulator.observe
            totals = _accumulate(model, dataset, steps, strategy, accumulators, verbose)
    finally:
        for layer, observer in zip(active, saved_observers, strict=True):
            layer._statistics_observer = observer
        for layer, (mean, variance) in zip(theirs, saved_keras_stats, strict=True):
            layer.moving_mean.assign(mean)
            layer.moving_variance.assign(variance)
    return _write(active, accumulators, totals, strategy.num_replicas_in_sync)


def _accumulate(model, dataset, steps, strategy, accumulators, verbose):
    """Runs the batches through `model` and returns each accumulator's reduced totals."""
    # A distributed dataset arrives whole: pick x inside the replica step.
    select_in_step = isinstance(dataset, tf.distribute.DistributedDataset)

    def replica_step(x):
        if select_in_step:
            x = keras.utils.unpack_x_y_sample_weight(x)[0]
        model(x, training=True)

    # Retracing on a new batch shape (the last, partial batch) is expected; relax it.
    @tf.function(reduce_retracing=True)
    def step(x):
        strategy.run(replica_step, args=(x,))

    @tf.function
    def combine():
        return strategy.run(lambda: [acc.combine() for acc in accumulators])

    iterator, target = _batches(dataset, steps, strategy)
    progbar = keras.utils.Progbar(target, verbose=verbose) if verbose else None
    seen = 0
    for x in iterator:
        step(x)
        seen += 1
        if progbar is not None:
            progbar.update(seen)
        if seen == steps:
            break
    if progbar is not None and target != seen:
        progbar.update(seen, finalize=True)
    if seen == 0:
        raise ValueError("`dataset` yielded no batches.")
    if steps is not None and seen < steps:
        warnings.warn(
            f"`dataset` ran out of data after {seen} of {steps} steps; the population "
            f"statistics use those {seen} batches.",
            stacklevel=3,
        )
    totals = tf.nest.map_structure(lambda v: strategy.experimental_local_results(v)[0], combine())
    return [np.asarray(t, np.float64) for t in totals]


def _write(layers, accumulators, totals, replicas):
    result, unobserved = {}, []
    for layer, accumulator, total in zip(layers, accumulators, totals, strict=True):
        if replicas > 1 and layer.synchronized:
            # Every replica observed the same global statistics: count them once.
            total = total.copy()
            total[list(accumulator.extensive_rows)] /= replicas
        mean, variance, count, batches, mean_ok, var_ok = accumulator.finalize(
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

    Pass a re-iterable `dataset` (a `tf.data.Dataset` or a list): a one-shot iterator would be
    used up by the first recompute. The last result is in `last_result`.

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
