"""Exact population statistics after training (Alg. 2 of Ioffe & Szegedy, 2015).

During training a BatchNormalization layer tracks its inference statistics with an exponential
moving average of batch statistics that were produced by ever-changing weights. Alg. 2 of the
paper instead freezes the trained network, runs many *training* mini-batches through it in training
mode (every BN layer normalizes with its batch statistics, so each layer sees the inputs it saw in
training, the paper's N_BN^tr), averages the per-batch statistics and writes

    E[x] = E_B[mu_B]            Var[x] = m / (m - 1) * E_B[sigma_B^2]

into every layer. `recompute_population_statistics` does exactly that for every
`keras_bn.BatchNormalization` of a model; `PopulationStatistics` is the Keras callback.

How it works: each layer has a `_statistics_observer` hook. While it is set and the layer runs in
training mode, the layer calls `observer(mean, variance, count)` with its batch statistics (biased
variance, count = values behind each entry, global under `synchronized=True`) and leaves its moving
statistics alone. The observers below add those statistics to float64 accumulators; nothing is
differentiated, so trainable weights and optimizer state are never touched.
"""

import warnings

import keras
import numpy as np
import tensorflow as tf

from keras_bn.layer import BatchNormalization

ESTIMATORS = ("paper", "pooled")


# ---------------------------------------------------------------------------------------------
# Per-layer accumulators.
#
# Every accumulator is ONE float64 tf.Variable with synchronization ON_READ and aggregation SUM.
# Under a tf.distribute strategy each replica adds its own batch statistics to its own local copy
# (no communication per step); `combine` then reduces the copies with all-reduces inside
# `strategy.run`, so it works for Mirrored, MultiWorkerMirrored and TPU strategies alike.
#
# A `synchronized=True` layer under R replicas hands every replica the same GLOBAL statistics and
# count, so every extensive total (counts, sums, M2, batch counts) comes back exactly R times too
# large. In the paper estimator's ratios (sum n*mu / sum n, sum n*var / sum (n-1)) the factor R
# cancels, but in the pooled estimator's M2 / (N - 1) it does not (R*M2 / (R*N - 1)), and the
# reported counts would be wrong, so `_finalize` divides the extensive totals by R for those layers.
# ---------------------------------------------------------------------------------------------


def _new_accumulator(shape):
    return tf.Variable(
        tf.zeros(shape, tf.float64),
        trainable=False,
        synchronization=tf.VariableSynchronization.ON_READ,
        aggregation=tf.VariableAggregation.SUM,
    )


def _as_float64(mean, variance, count):
    mean = tf.cast(mean, tf.float64)
    variance = tf.cast(variance, tf.float64)
    count = tf.broadcast_to(tf.cast(count, tf.float64), tf.shape(mean))
    return mean, variance, count


def _usable(mean, variance, count, min_count):
    """Entries whose batch statistics may enter the estimate."""
    finite = tf.math.is_finite(mean) & tf.math.is_finite(variance)
    return finite & (count > min_count)


class _PaperAccumulator:
    """Sums for Alg. 2: [sum n_b, sum n_b mu_b, sum n_b var_b, sum (n_b - 1), batches].

    Only batches with n_b > 1 and finite statistics count (per channel): a batch of one value
    has no within-batch variance.
    """

    extensive_rows = (0, 1, 2, 3, 4)

    def __init__(self, shape):
        self.state = _new_accumulator((5,) + tuple(shape))

    def observe(self, mean, variance, count):
        mean, variance, count = _as_float64(mean, variance, count)
        ok = _usable(mean, variance, count, min_count=1)
        zero = tf.zeros_like(mean)
        # tf.where after the product: a non-finite statistic must not leak through 0 * nan.
        update = tf.stack(
            [
                tf.where(ok, count, zero),
                tf.where(ok, count * mean, zero),
                tf.where(ok, count * variance, zero),
                tf.where(ok, count - 1.0, zero),
                tf.where(ok, tf.ones_like(mean), zero),
            ]
        )
        self.state.assign_add(update)

    def combine(self):
        ctx = tf.distribute.get_replica_context()
        return ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.identity(self.state))

    @staticmethod
    def finalize(totals, unbiased):
        n, sum_mean, sum_var, dof, batches = totals
        ok = n > 0
        mean = np.divide(sum_mean, n, out=np.zeros_like(n), where=ok)
        denominator = dof if unbiased else n
        variance = np.divide(sum_var, denominator, out=np.zeros_like(n), where=ok)
        return mean, variance, n, batches, ok, ok


class _PooledAccumulator:
    """Running (N, mean, M2, batches) of all values pooled, merged batch by batch (Chan et al.).

    Any batch with n_b >= 1 and finite statistics counts (per channel).
    """

    extensive_rows = (0, 2, 3)

    def __init__(self, shape):
        self.state = _new_accumulator((4,) + tuple(shape))

    def observe(self, mean, variance, count):
        mean, variance, count = _as_float64(mean, variance, count)
        ok = _usable(mean, variance, count, min_count=0)
        zero = tf.zeros_like(mean)
        n_b = tf.where(ok, count, zero)
        mean_b = tf.where(ok, mean, zero)
        m2_b = tf.where(ok, count * variance, zero)
        n, mu, m2, batches = tf.unstack(tf.identity(self.state))
        total = n + n_b
        weight = tf.math.divide_no_nan(n_b, total)
        delta = mean_b - mu
        self.state.assign(
            tf.stack(
                [
                    total,
                    mu + delta * weight,
                    m2 + m2_b + delta * delta * n * weight,
                    batches + tf.cast(ok, tf.float64),
                ]
            )
        )

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
        denominator = n - 1.0 if unbiased else n
        variance = np.divide(m2, denominator, out=np.zeros_like(n), where=var_ok)
        return mean, variance, n, batches, mean_ok, var_ok


_ACCUMULATORS = {"paper": _PaperAccumulator, "pooled": _PooledAccumulator}


# ---------------------------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------------------------


def _bn_layers(model):
    """(ours, keras') BatchNormalization layers of `model`, nested models included, no repeats."""
    if not isinstance(model, keras.layers.Layer):
        raise ValueError(
            f"`model` must be a Keras model or layer; got {type(model).__name__}. Pass the model "
            "whose BatchNormalization layers should receive population statistics."
        )
    # Keras has no public recursive layer walk; `_flatten_layers` is what Keras itself uses.
    layers = model._flatten_layers(include_self=True, recursive=True)
    ours = [layer for layer in layers if isinstance(layer, BatchNormalization)]
    theirs = [
        layer
        for layer in layers
        if isinstance(layer, keras.layers.BatchNormalization)
        and not isinstance(layer, BatchNormalization)
    ]
    return ours, theirs


def _receives_global_statistics(layer, replicas):
    """Whether every replica's observer receives the same, global, statistics.

    The layer's hook contract: under a strategy with several replicas in sync, a
    `synchronized=True` layer reports the global batch's statistics and count on every replica;
    any other layer reports its replica's local batch.
    """
    return replicas > 1 and bool(getattr(layer, "synchronized", False))


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


# ---------------------------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------------------------


def recompute_population_statistics(model, dataset, steps=None, *, estimator="paper", verbose=1):
    """Computes exact population statistics (Alg. 2) and writes them into every BN layer.

    Runs `steps` batches of `dataset` through `model` in training mode, so that every
    `keras_bn.BatchNormalization` normalizes with its batch statistics and each layer sees the
    inputs it saw during training (the paper's N_BN^tr). Per layer and per channel, the batch
    statistics are accumulated in float64; at the end the estimates are written into the layer's
    `moving_mean` and `moving_variance`. Nothing is differentiated: trainable weights, optimizer
    state and (until the final write) moving statistics are not touched. Other layers do run in
    training mode (Dropout drops, as in N_BN^tr; random layers advance their seed state).

    Estimators (n_b = values behind a channel's statistic in batch b: batch size times spatial
    positions, unmasked entries only, summed over replicas for `synchronized=True` layers;
    mu_b, var_b = the batch mean and BIASED batch variance the layer normalized with):

    - `"paper"` (default, Alg. 2): `E[x] = sum n_b mu_b / sum n_b` and the pooled within-batch
      variance `Var[x] = sum n_b var_b / sum (n_b - 1)`, which is the paper's
      `m / (m - 1) * E_B[var_B]` when every batch has the same size m and weights unequal
      batches by their degrees of freedom. Batches with n_b <= 1 or non-finite statistics are
      skipped (per channel). With `unbiased_variance=False` on the layer it writes
      `sum n_b var_b / sum n_b`, the count-weighted mean of the biased batch variances.
      Bias: the mean is unbiased. The variance is unbiased for Var[x] when the batches are
      independent samples of x; it measures spread *within* batches only, so when batch means
      differ by more than sampling explains (unshuffled or correlated data, or deeper layers
      whose inputs depend on the batch through upstream BN) it is biased low by that excess
      between-batch variance (law of total variance). Its value depends on how the data are cut
      into batches, not only on the data; more batches reduce its noise, not that dependence.
      The `unbiased_variance=False` form is further biased low by (n - 1) / n (it is what the
      layer normalized with in training, on average).
    - `"pooled"`: the mean and variance of ALL values pooled, merged batch by batch with Chan et
      al.'s parallel formula on (n, mean, M2) in float64: `M2 / (N - 1)` (or `M2 / N` with
      `unbiased_variance=False`). Batches with n_b >= 1 and finite statistics count.
      Bias: the mean is unbiased; the variance is the unbiased sample variance of every value
      seen, between-batch spread included, so it converges to Var[x] whatever the batch size
      (even batches of one value); at the first BN layer it does not depend on how the data are
      batched. Relative to the within-batch spread the layer normalizes with in training it is
      biased high whenever batch means vary (M2 / N is biased low by (N - 1) / N, negligible).

    Distribution: if `model` was built under a `tf.distribute` strategy (or this is called inside
    a strategy scope), each step runs with `strategy.run` on a distributed dataset (an iterable
    of numpy batches is split evenly over the replicas). Accumulators are float64 variables with
    synchronization ON_READ / aggregation SUM: each replica adds its own batch's statistics (for
    non-synchronized layers every replica's local batch is one "batch" of the estimators) and the
    copies are reduced once at the end. A `synchronized=True` layer hands every replica the same
    global statistics; summing R identical copies cancels in the paper estimator's ratios but not
    in `M2 / (N - 1)` or in the counts, so totals of synchronized layers are divided by R.

    Layers: every `keras_bn.BatchNormalization` reachable from `model` (nested models included).
    A layer with `trainable=False` runs in inference mode (as in Keras), produces no batch
    statistics and is left unchanged, with a warning. `keras.layers.BatchNormalization` layers are
    not supported: their moving statistics are saved before the pass and restored after it (they
    would otherwise drift), with a warning. A layer called several times per step contributes one
    batch per call. A channel that received no usable statistics keeps its old value. Each layer's
    `_statistics_observer`, `momentum` and `trainable` are left as they were, even on error.

    Args:
        model: a built Keras model (or layer) containing `keras_bn.BatchNormalization` layers.
        dataset: a `tf.data.Dataset` (or a distributed one) or an iterable of numpy/tensor
            batches. Elements are `x`, `(x, y)` or `(x, y, sample_weight)`; only `x` is used.
            Pass TRAINING batches, preprocessed as in training, of the training batch size.
        steps: number of batches to run. `None` runs the whole dataset, which must then be
            finite (an infinite `tf.data.Dataset` raises). If the data end first, the batches
            seen are used and a warning says so.
        estimator: `"paper"` (Alg. 2, default) or `"pooled"`, see above.
        verbose: 0 silent, 1 progress bar, 2 one line at the end (`keras.utils.Progbar`).

    Returns:
        A dict mapping each updated layer's path (`layer.path`, else its name) to a dict with
        `"mean"` and `"variance"` (the arrays written, parameter shape), `"count"` (float64
        array: values that entered the estimate per channel) and `"batches"` (float64 array:
        batch statistics that entered it per channel). Skipped layers are absent.

    Raises:
        ValueError: bad `estimator`/`steps`/`dataset`, an infinite dataset without `steps`, an
            empty dataset, an unbuilt model, or a model without any trainable
            `keras_bn.BatchNormalization` layer.

    Example:

    ```python
    model.fit(train_ds, epochs=10)
    keras_bn.recompute_population_statistics(model, train_ds, steps=200)
    model.evaluate(test_ds)  # inference uses exact population statistics
    ```

    Reference:
        Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing
        Internal Covariate Shift", ICML 2015, Alg. 2. Chan, Golub & LeVeque, "Updating formulae
        and a pairwise algorithm for computing sample variances", 1979.
    """
    estimator = _validate_estimator(estimator)
    steps = _validate_steps(steps)
    ours, theirs = _bn_layers(model)
    if not ours:
        raise ValueError(
            "`model` contains no keras_bn.BatchNormalization layer, so there is nothing to "
            "recompute. (keras.layers.BatchNormalization layers are not supported.)"
        )
    if not model.built:
        raise ValueError(
            "`model` is not built: call it on a batch (or `model.build(input_shape)`) first."
        )
    unbuilt = [layer.name for layer in ours if not layer.built]
    if unbuilt:
        raise ValueError(
            f"BatchNormalization layers {unbuilt} are not built: call the model on a batch first."
        )
    frozen = [layer for layer in ours if not layer.trainable]
    active = [layer for layer in ours if layer.trainable]
    if frozen:
        warnings.warn(
            f"BatchNormalization layers {[layer.name for layer in frozen]} have trainable=False: "
            "they run in inference mode and keep their moving statistics.",
            stacklevel=2,
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
            stacklevel=2,
        )

    strategy = _pick_strategy(model)
    replicas = strategy.num_replicas_in_sync
    saved_observers = [layer._statistics_observer for layer in ours]
    saved_flags = [(layer.momentum, layer.trainable) for layer in ours]
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
            while steps is None or seen < steps:
                try:
                    x = next(iterator)
                except StopIteration:
                    break
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
                    stacklevel=2,
                )
            totals = tf.nest.map_structure(
                lambda v: strategy.experimental_local_results(v)[0], combine()
            )
            totals = [np.asarray(t, np.float64) for t in totals]
    finally:
        for layer, observer, (momentum, trainable) in zip(
            ours, saved_observers, saved_flags, strict=True
        ):
            layer._statistics_observer = observer
            # Only write what changed: the trainable setter also walks the layer's variables.
            if layer.momentum != momentum:
                layer.momentum = momentum
            if layer.trainable != trainable:
                layer.trainable = trainable
        for layer, (mean, variance) in zip(theirs, saved_keras_stats, strict=True):
            layer.moving_mean.assign(mean)
            layer.moving_variance.assign(variance)

    return _write(active, accumulators, totals, replicas)


def _write(layers, accumulators, totals, replicas):
    result, unobserved = {}, []
    for layer, accumulator, total in zip(layers, accumulators, totals, strict=True):
        if _receives_global_statistics(layer, replicas):
            rows = list(accumulator.extensive_rows)
            total = total.copy()
            total[rows] /= replicas
        unbiased = getattr(layer, "unbiased_variance", True)
        mean, variance, count, batches, mean_ok, var_ok = accumulator.finalize(total, unbiased)
        if not np.any(mean_ok):
            unobserved.append(layer.name)
            continue
        old_mean, old_variance = _read(layer.moving_mean), _read(layer.moving_variance)
        new_mean = np.where(mean_ok, mean, old_mean).astype(old_mean.dtype)
        new_variance = np.where(var_ok, variance, old_variance).astype(old_variance.dtype)
        layer.moving_mean.assign(new_mean)
        layer.moving_variance.assign(new_variance)
        key = _layer_key(layer, result)
        result[key] = {
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
    `on_train_end`, so the model that `fit` returns carries exact population statistics instead
    of the moving averages. With `recompute_before_evaluation=True` it also recomputes in
    `on_test_begin`, i.e. before every evaluation that receives this callback: `fit`'s validation
    at the end of an epoch (fit passes its callbacks to evaluate), and `model.evaluate(...,
    callbacks=[cb])`. `on_test_begin` is the sound hook: it runs after the epoch's last weight
    update and before the first validation batch, whereas `on_epoch_end` runs after validation.
    The recomputed values then also seed the moving averages for the next epoch (training itself
    normalizes with batch statistics and is unaffected). The recompute at the end of training is
    skipped when the last validation already recomputed with the final weights.

    Pass a re-iterable `dataset` (a `tf.data.Dataset` or a list); a one-shot iterator would be
    consumed by the first recompute. The result of the last recompute is in `last_result`.

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
            self.model,
            self.dataset,
            self.steps,
            estimator=self.estimator,
            verbose=self.verbose,
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
