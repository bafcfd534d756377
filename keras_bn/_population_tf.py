"""Alg. 2 on the TensorFlow backend: `tf.function` steps under any `tf.distribute` strategy.

Imported by `keras_bn.population` only when Keras's backend is TensorFlow. The estimator math is
`keras_bn.population`'s, run here on TensorFlow tensors (`TF_OPS`).

Each accumulator is ONE float64 variable, ON_READ / SUM: under a strategy every replica adds to
its own copy with no communication per step, and the estimator's `combined` all-reduces the
copies once at the end.
"""

import itertools
import types

import numpy as np
import tensorflow as tf

from keras_bn import population

TF_OPS = types.SimpleNamespace(
    float64=lambda x: tf.cast(x, tf.float64),
    broadcast_to=tf.broadcast_to,
    shape=tf.shape,
    isfinite=tf.math.is_finite,
    where=tf.where,
    stack=tf.stack,
    unstack=tf.unstack,
    zeros_like=tf.zeros_like,
    ones_like=tf.ones_like,
    square=tf.square,
    divide_no_nan=tf.math.divide_no_nan,
)


class _Accumulator:
    """One layer's estimator state as an ON_READ / SUM float64 variable."""

    def __init__(self, estimator, shape):
        self.estimator = estimator
        self.state = tf.Variable(
            tf.zeros((estimator.rows,) + tuple(shape), tf.float64),
            trainable=False,
            synchronization=tf.VariableSynchronization.ON_READ,
            aggregation=tf.VariableAggregation.SUM,
        )

    def observe(self, mean, variance, count):
        # In a replica context the read is this replica's copy.
        state = tf.identity(self.state)
        self.state.assign(self.estimator.updated(state, mean, variance, count, TF_OPS))

    def combine(self):
        ctx = tf.distribute.get_replica_context()
        return self.estimator.combined(
            tf.identity(self.state),
            lambda value: ctx.all_reduce(tf.distribute.ReduceOp.SUM, value),
            TF_OPS,
        )


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
    """(iterator of at most `steps` model inputs ready for `strategy.run`, steps or None)."""
    population._refuse_single_array(dataset)
    if isinstance(dataset, tf.distribute.DistributedDataset):
        return itertools.islice(iter(dataset), steps), steps
    if isinstance(dataset, tf.data.Dataset):
        steps = population._tf_dataset_steps(dataset, steps)
        if steps is not None:
            dataset = dataset.take(steps)
        dataset = dataset.map(lambda *element: population._model_input(_one(element)))
        if strategy.num_replicas_in_sync > 1:
            dataset = strategy.experimental_distribute_dataset(dataset)
        return iter(dataset), steps
    iterator, steps = population._python_batches(dataset, steps)

    def generate():
        for element in iterator:
            x = population._model_input(element)
            x = tf.nest.map_structure(tf.convert_to_tensor, x)
            yield _split_for_replicas(x, strategy) if strategy.num_replicas_in_sync > 1 else x

    return generate(), steps


def _one(element):
    return element if len(element) > 1 else element[0]


def accumulate(model, dataset, steps, layers, estimator, verbose):
    """Sets the layers' observers, runs the batches, returns (each layer's totals, replicas)."""
    strategy = _pick_strategy(model)
    with strategy.scope():
        accumulators = [_Accumulator(estimator, layer.moving_mean.shape) for layer in layers]
        # Observers are read when the step is traced: set them before tracing.
        for layer, accumulator in zip(layers, accumulators, strict=True):
            layer._statistics_observer = accumulator.observe
        totals = _run(model, dataset, steps, strategy, accumulators, verbose)
    return totals, strategy.num_replicas_in_sync


def _run(model, dataset, steps, strategy, accumulators, verbose):
    # A distributed dataset arrives whole: pick x inside the replica step.
    select_in_step = isinstance(dataset, tf.distribute.DistributedDataset)

    def replica_step(x):
        if select_in_step:
            x = population._model_input(x)
        model(x, training=True)

    # Retracing on a new batch shape (the last, partial batch) is expected; relax it.
    @tf.function(reduce_retracing=True)
    def step(x):
        strategy.run(replica_step, args=(x,))

    @tf.function
    def combine():
        return strategy.run(lambda: [acc.combine() for acc in accumulators])

    batches, target = _batches(dataset, steps, strategy)
    population._run_steps(batches, target, step, verbose, steps, stacklevel=5)
    totals = tf.nest.map_structure(lambda v: strategy.experimental_local_results(v)[0], combine())
    return [np.asarray(t, np.float64) for t in totals]


__all__ = ["TF_OPS", "accumulate"]
