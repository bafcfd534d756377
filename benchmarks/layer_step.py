"""Training-step speed of one BN layer: keras_bn vs keras.layers.BatchNormalization
(and tf_keras's fused layer when installed), same inputs, same run.

Each step is forward + backward (gradients w.r.t. the input, gamma and beta) plus the
moving-statistics update, compiled with tf.function, with and without XLA. Implementations
are interleaved within each repetition so machine noise hits all of them alike.

    python benchmarks/layer_step.py            # all shapes, ~3 minutes on 2 CPU cores
    python benchmarks/layer_step.py --repeats 50 --shapes 32,28,28,192
    python benchmarks/layer_step.py --suite renorm ghost --shapes 32,28,28,192 4096,1024
    python benchmarks/layer_step.py --suite fused

Suites: ``bn`` (plain BN: ours, Keras 3, tf_keras), ``renorm`` (Batch Renormalization: ours
against Keras 3's ``renorm=True``), ``ghost`` (ghost batches of a quarter of the batch: ours
against tf_keras's ``virtual_batch_size``), ``fused`` (our layer with each fused implementation
forced: FusedBatchNormV3 against the XLA formulation; what the default of
``keras_bn.backends.tensorflow`` rests on).

Prints the median milliseconds per step and the ratio of the first column to each other one
(below 1 = the first is faster).
Targets (2-core CPU): ``bn``: ours <= 0.6x Keras 3 without XLA on the 4-D shapes, <= 1.0x with
XLA and on the dense shape; ``renorm``: <= 0.6x Keras 3 without XLA, <= 1.0x with XLA;
``ghost``: <= 1.0x tf_keras.
The header says whether TensorFlow runs its oneDNN kernels: where it does not (its default on
some CPUs; ``TF_ENABLE_ONEDNN_OPTS=1`` turns them on), FusedBatchNormV3 is slow on a CPU and our
layer uses its XLA formulation outside XLA as well (docs/benchmarks.md).
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


class XlaFormulationBN(keras_bn.BatchNormalization):
    """Our layer with the fused path forced to the XLA formulation (no public switch: on a CPU
    the default picks it inside XLA-compiled steps, and outside them where oneDNN is off)."""

    _tf_fused_implementation = "xla"  # read by keras_bn.backends.tensorflow


def _implementations(suite, batch):
    """{name: layer factory}; the first is ours, the others the anchors of the ratios."""
    try:
        import tf_keras
    except ImportError:
        tf_keras = None
    if suite == "renorm":
        return {
            "keras_bn": lambda: keras_bn.BatchNormalization(renorm=True),
            "keras3": lambda: keras.layers.BatchNormalization(renorm=True),
        }
    if suite == "fused":
        return {
            "kernel": lambda: keras_bn.BatchNormalization(fused=True),
            "xla": XlaFormulationBN,
        }
    if suite == "ghost":
        if tf_keras is None:
            raise SystemExit("the ghost suite needs tf_keras (pip install tf_keras)")
        size = batch // 4
        return {
            "keras_bn": lambda: keras_bn.BatchNormalization(virtual_batch_size=size),
            "tf_keras": lambda: tf_keras.layers.BatchNormalization(virtual_batch_size=size),
        }
    impls = {"keras_bn": keras_bn.BatchNormalization, "keras3": keras.layers.BatchNormalization}
    if tf_keras is not None:
        impls["tf_keras"] = lambda: tf_keras.layers.BatchNormalization(fused=None)
    return impls


def _make_step(layer, jit):
    def step(x, dy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * dy)
        return tape.gradient(loss, [x] + layer.trainable_weights)

    return tf.function(step, jit_compile=jit)


def bench(shape, jit, repeats, suite="bn", warmup=3):
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(1.0, 2.0, shape).astype(np.float32))
    dy = tf.constant(rng.normal(size=shape).astype(np.float32))
    steps = {}
    for name, make in _implementations(suite, shape[0]).items():
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


def onednn_state():
    """Whether TensorFlow runs its oneDNN CPU kernels ("on"/"off"): on a CPU it decides which
    fused implementation our layer uses outside XLA
    (`keras_bn.backends.tensorflow.default_implementation`)."""
    from keras_bn.backends import tensorflow as tf_backend

    return "on" if tf_backend.onednn_enabled() else "off"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--shapes", nargs="*", default=DEFAULT_SHAPES, help="comma-separated shapes, channels last"
    )
    parser.add_argument(
        "--suite", nargs="*", default=["bn"], choices=["bn", "renorm", "ghost", "fused"]
    )
    args = parser.parse_args(argv)
    print(
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}, "
        f"{os.cpu_count()} CPUs, oneDNN {onednn_state()}, median of {args.repeats} steps"
    )
    for suite in args.suite:
        ours, *anchors = names = list(_implementations(suite, 4))
        label = "ours" if ours == "keras_bn" else ours
        print(
            f"{'suite':<8}{'shape':<18}{'xla':<6}"
            + "".join(f"{n + ' ms':>14}" for n in names)
            + "".join(f"{label + '/' + n:>15}" for n in anchors)
        )
        for spec in args.shapes:
            shape = tuple(int(d) for d in spec.split(","))
            for jit in (False, True):
                ms = bench(shape, jit, args.repeats, suite)
                row = f"{suite:<8}{str(shape):<18}{str(jit):<6}"
                row += "".join(f"{v:>14.2f}" for v in ms.values())
                row += "".join(f"{ms[ours] / ms[n]:>15.2f}" for n in anchors)
                print(row, flush=True)


if __name__ == "__main__":
    main()
