"""Synchronized BN under MirroredStrategy over 2 logical CPUs: keras_bn vs
keras.layers.BatchNormalization(synchronized=True), same net, same data, same run.

A small conv net with 4 BN layers; each step is forward + backward + SGD update inside
strategy.run, the two nets timed alternately. Prints the median step time, the ratio
ours/keras (below 1 = we are faster) and the collectives (all-reduce calls) that the BN
layers issue per step and replica, counted when the step is traced (the optimizer's
gradient all-reduce is not counted). keras_bn's exchanges are in-graph sums under
MirroredStrategy (see keras_bn.backends.tensorflow.all_reduce_sum); Keras's go to the
collective runtime.

    python benchmarks/sync_step.py                # ~1-2 minutes on 2 CPU cores
    python benchmarks/sync_step.py --batch 64 --repeats 30

Also times the same net with the BN layers replaced by an identity, so the time spent in the BN
layers themselves (step minus that floor) can be compared too, and with keras_bn's local layer
(synchronized=False), which separates the cost of the exchanges from the layer's arithmetic.

Targets: ratio <= 0.8; collectives <= 2 per BN layer (Keras 3: 5).
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402
from tensorflow.python.distribute import distribute_lib  # noqa: E402

import keras_bn  # noqa: E402
from keras_bn.backends.tensorflow import all_reduce_sum  # noqa: E402

BN_LAYERS = 4
# One entry (the calling thread) per cross-replica exchange: a ReplicaContext.all_reduce call
# (Keras), or a merge_call made outside one (keras_bn's in-graph sums under MirroredStrategy;
# all_reduce itself goes through merge_call there, which must not count twice).
_calls = []
_inside_all_reduce = threading.local()
_original_all_reduce = distribute_lib.ReplicaContext.all_reduce
_original_merge_call = distribute_lib.ReplicaContext.merge_call


def _counting_all_reduce(self, *args, **kwargs):
    _calls.append(threading.get_ident())
    _inside_all_reduce.depth = getattr(_inside_all_reduce, "depth", 0) + 1
    try:
        return _original_all_reduce(self, *args, **kwargs)
    finally:
        _inside_all_reduce.depth -= 1


def _counting_merge_call(self, *args, **kwargs):
    if not getattr(_inside_all_reduce, "depth", 0):
        _calls.append(threading.get_ident())
    return _original_merge_call(self, *args, **kwargs)


distribute_lib.ReplicaContext.all_reduce = _counting_all_reduce
distribute_lib.ReplicaContext.merge_call = _counting_merge_call


class Identity(keras.layers.Layer):
    """The same net without normalization: the floor the BN layers' cost sits on."""

    def call(self, x, training=None):
        return x


def build(make_norm, image, width):
    layers = [keras.Input((image, image, 3))]
    for i in range(BN_LAYERS):
        layers += [
            keras.layers.Conv2D(width, 3, padding="same", use_bias=False, strides=2 if i else 1),
            make_norm(),
            keras.layers.ReLU(),
        ]
    layers += [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10)]
    return keras.Sequential(layers)


def make_step(make_norm, strategy, batch, image, width):
    """A compiled, warmed-up train step and its BN collectives per layer and replica."""
    with strategy.scope():
        model = build(make_norm, image, width)
        optimizer = keras.optimizers.SGD(0.01)
        optimizer.build(model.trainable_variables)
    rng = np.random.default_rng(0)
    per_replica = batch // strategy.num_replicas_in_sync
    xs = [
        tf.constant(rng.normal(r, 1 + r, (per_replica, image, image, 3)).astype(np.float32))
        for r in range(strategy.num_replicas_in_sync)
    ]
    ys = [tf.constant(rng.integers(0, 10, (per_replica,))) for _ in xs]
    dist = lambda values: strategy.experimental_distribute_values_from_function(
        lambda ctx: values[ctx.replica_id_in_sync_group]
    )
    x, y = dist(xs), dist(ys)
    bn_calls = {}

    @tf.function
    def train_step(x, y):
        def step(x, y):
            me = threading.get_ident()
            before = _calls.count(me)
            with tf.GradientTape() as tape:
                logits = model(x, training=True)
                loss = (
                    tf.reduce_sum(
                        keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
                    )
                    / batch
                )
            grads = tape.gradient(loss, model.trainable_variables)
            bn_calls[me] = _calls.count(me) - before
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss

        return strategy.run(step, args=(x, y))

    run = lambda: strategy.experimental_local_results(train_step(x, y))[0].numpy()
    for _ in range(3):
        run()
    counts = set(bn_calls.values())
    assert len(counts) == 1, bn_calls
    return run, counts.pop() / BN_LAYERS


def exchange_cost_ms(strategy, chained=16, repeats=30):
    """Median cost of one exchange of a small packed tensor, through the collective runtime
    (ReplicaContext.all_reduce) and as keras_bn's in-graph sum, from a step of ``chained``
    dependent exchanges."""

    def make_step(exchange):
        @tf.function
        def step(n):
            def chain():
                ctx = tf.distribute.get_replica_context()
                v = tf.ones([2, 3, 64])
                for _ in range(n):
                    v = exchange(ctx, v) * 0.5
                return v

            return strategy.run(chain)

        return step

    costs = {}
    for name, exchange in (
        ("collective runtime", lambda ctx, v: ctx.all_reduce("sum", v)),
        ("in-graph sum", all_reduce_sum),
    ):
        step = make_step(exchange)
        medians = []
        for n in (1, 1 + chained):
            step(n)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                step(n)
                times.append(time.perf_counter() - start)
            medians.append(statistics.median(times))
        costs[name] = (medians[1] - medians[0]) / chained * 1e3
    return costs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32, help="global batch size")
    parser.add_argument("--image", type=int, default=32)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    steps = {
        name: make_step(make_norm, strategy, args.batch, args.image, args.width)
        for name, make_norm in (
            ("keras_bn", lambda: keras_bn.BatchNormalization(synchronized=True)),
            ("keras3", lambda: keras.layers.BatchNormalization(synchronized=True)),
            ("keras_bn_local", lambda: keras_bn.BatchNormalization(synchronized=False)),
            ("no_bn", Identity),
        )
    }
    times = {name: [] for name in steps}
    for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
        for name, (run, _) in steps.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    results = {
        name: (statistics.median(times[name]) * 1e3, calls) for name, (_, calls) in steps.items()
    }
    print(
        f"MirroredStrategy, 2 logical CPUs, global batch {args.batch}, "
        f"{args.image}x{args.image} images, {BN_LAYERS} BN layers, median of {args.repeats}"
    )
    print(f"{'layer':<15}{'step ms':>10}{'collectives per BN layer':>27}")
    for name, (ms, calls) in results.items():
        print(f"{name:<15}{ms:>10.2f}{calls:>27.1f}")
    print(f"ratio keras_bn/keras3, whole step: {results['keras_bn'][0] / results['keras3'][0]:.2f}")
    floor = results["no_bn"][0]
    ours, theirs = results["keras_bn"][0] - floor, results["keras3"][0] - floor
    print(
        f"time in the BN layers (step minus the no_bn step): keras_bn {ours:.2f} ms, "
        f"keras3 {theirs:.2f} ms, ratio {ours / theirs:.2f}"
    )
    costs = exchange_cost_ms(strategy)
    print(
        "one exchange (2x3x64 floats): "
        + ", ".join(f"{name} {ms:.3f} ms" for name, ms in costs.items())
    )


if __name__ == "__main__":
    main()
