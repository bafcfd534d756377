"""Training-step speed of one BN layer: keras_bn vs keras.layers.BatchNormalization
(and tf_keras's fused layer when installed), same inputs, same run.

Each step is forward + backward (gradients w.r.t. the input, gamma and beta) plus the
moving-statistics update, compiled with tf.function, with and without XLA. Implementations
are interleaved within each repetition so machine noise hits all of them alike.

    python benchmarks/layer_step.py            # all shapes, ~3 minutes on 2 CPU cores
    python benchmarks/layer_step.py --repeats 50 --shapes 32,28,28,192

Prints the median milliseconds per step and the ratio ours/theirs (below 1 = we are faster).
Targets (2-core CPU): ours <= 0.6x Keras 3 without XLA on the 4-D shapes, <= 1.0x with XLA
and on the dense shape.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_bn  # noqa: E402

DEFAULT_SHAPES = ["32,28,28,192", "32,56,56,64", "4096,1024"]


def _implementations():
    impls = {"keras_bn": keras_bn.BatchNormalization, "keras3": keras.layers.BatchNormalization}
    try:
        import tf_keras

        impls["tf_keras"] = lambda: tf_keras.layers.BatchNormalization(fused=None)
    except ImportError:
        pass
    return impls


def _make_step(layer, jit):
    def step(x, dy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * dy)
        return tape.gradient(loss, [x] + layer.trainable_weights)

    return tf.function(step, jit_compile=jit)


def bench(shape, jit, repeats, warmup=3):
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(1.0, 2.0, shape).astype(np.float32))
    dy = tf.constant(rng.normal(size=shape).astype(np.float32))
    steps = {}
    for name, make in _implementations().items():
        layer = make()
        layer.build(shape)
        if name == "tf_keras":
            layer(x, training=True)  # tf_keras builds on first call
        steps[name] = _make_step(layer, jit)
    times = {name: [] for name in steps}
    for step in steps.values():
        for _ in range(warmup):
            _ = [t.numpy() for t in step(x, dy)]
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            _ = [t.numpy() for t in step(x, dy)]
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--shapes", nargs="*", default=DEFAULT_SHAPES,
                        help="comma-separated shapes, channels last")
    args = parser.parse_args(argv)
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, "
          f"{os.cpu_count()} CPUs, median of {args.repeats} steps")
    header = f"{'shape':<18}{'xla':<6}" + "".join(
        f"{n + ' ms':>14}" for n in _implementations()
    ) + f"{'ours/keras3':>13}" + (f"{'ours/tf_keras':>15}" if "tf_keras" in _implementations()
                                  else "")
    print(header)
    for spec in args.shapes:
        shape = tuple(int(d) for d in spec.split(","))
        for jit in (False, True):
            ms = bench(shape, jit, args.repeats)
            row = f"{str(shape):<18}{str(jit):<6}" + "".join(f"{v:>14.2f}" for v in ms.values())
            row += f"{ms['keras_bn'] / ms['keras3']:>13.2f}"
            if "tf_keras" in ms:
                row += f"{ms['keras_bn'] / ms['tf_keras']:>15.2f}"
            print(row, flush=True)


if __name__ == "__main__":
    main()
