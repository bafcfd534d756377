"""Training throughput of bn_inception with keras_bn's BN layer vs keras.layers.BatchNormalization.

Builds the same network twice (`keras_bn.models.get("bn_inception", norm_layer=...)`), compiles
each with SGD + momentum and sparse cross-entropy on logits, without and with XLA
(`jit_compile`), and times `train_on_batch` on one fixed synthetic batch. The two layers are
timed in alternating rounds so that load from other processes hits both alike; the table reports
the median images/second over the rounds and the ratio ours / Keras's (> 1: ours is faster).
The first steps (tracing and compilation) are timed separately and not counted.

Usage (the issue's configuration is 224x224, batch 32; the defaults finish in a few minutes on a
2-core CPU):

    python benchmarks/model_step.py
    python benchmarks/model_step.py --batch_size=32 --rounds=5 --steps=3
    python benchmarks/model_step.py --mixed_precision   # on a GPU
    python benchmarks/model_step.py --compare fused --xla off   # our layer: kernel vs XLA

`--compare fused` times our layer twice instead, with each fused implementation forced
(FusedBatchNormV3 against the XLA formulation, as `layer_step.py --suite fused` does for one
layer): whether the one-layer difference survives in a whole network.
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from layer_step import XlaFormulationBN, onednn_state  # noqa: E402  (this folder is on the path)

import keras_bn  # noqa: E402
from keras_bn import models  # noqa: E402

# --compare: {column name: norm layer}; the first is the ratio's numerator.
COMPARISONS = {
    "keras": {"keras_bn": keras_bn.BatchNormalization, "keras": keras.layers.BatchNormalization},
    "fused": {
        "kernel": lambda **kwargs: keras_bn.BatchNormalization(fused=True, **kwargs),
        "xla": XlaFormulationBN,
    },
}


def _parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--depth_multiplier", type=float, default=1.0)
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed rounds")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model per round")
    parser.add_argument("--xla", choices=["both", "off", "on"], default="both")
    parser.add_argument("--mixed_precision", action="store_true", help="mixed_float16 policy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--compare",
        choices=sorted(COMPARISONS),
        default="keras",
        help="keras: our layer vs Keras's; fused: our layer with the kernel vs the XLA formulation",
    )
    args = parser.parse_args(argv)
    if args.image_size < 75:
        parser.error("--image_size must be >= 75 (the smallest input bn_inception takes).")
    for name in ("batch_size", "warmup", "rounds", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1.")
    return args


def _build(norm_layer, jit_compile, args):
    model = models.get(
        "bn_inception",
        norm_layer=norm_layer,
        num_classes=args.num_classes,
        input_shape=(args.image_size, args.image_size, 3),
        depth_multiplier=args.depth_multiplier,
        seed=args.seed,
    )
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    return model


def _timed_steps(model, images, labels, steps):
    start = time.perf_counter()
    for _ in range(steps):
        loss = model.train_on_batch(images, labels)
    float(loss)  # the loss comes back to the host: the steps have finished
    return time.perf_counter() - start


def run(args):
    """Runs the benchmark; returns rows of (xla, {layer: (images/s, compile seconds)})."""
    if args.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    rng = np.random.default_rng(args.seed)
    shape = (args.batch_size, args.image_size, args.image_size, 3)
    images = tf.constant(rng.uniform(-1, 1, size=shape).astype("float32"))
    labels = tf.constant(rng.integers(0, args.num_classes, size=args.batch_size).astype("int32"))
    settings = {"both": [False, True], "off": [False], "on": [True]}[args.xla]
    rows = []
    for jit_compile in settings:
        keras.utils.clear_session(free_memory=True)  # drop the previous setting's pair
        layers = COMPARISONS[args.compare]
        built, compile_s, rates = {}, {}, {name: [] for name in layers}
        for name, layer in layers.items():
            built[name] = _build(layer, jit_compile, args)
            compile_s[name] = _timed_steps(built[name], images, labels, 1)
            if args.warmup > 1:
                _timed_steps(built[name], images, labels, args.warmup - 1)
        for _ in range(args.rounds):
            for name in layers:
                seconds = _timed_steps(built[name], images, labels, args.steps)
                rates[name].append(args.steps * args.batch_size / seconds)
        rows.append((jit_compile, {n: (statistics.median(rates[n]), compile_s[n]) for n in layers}))
        print(_format([rows[-1]], args, header=len(rows) == 1), flush=True)
    return rows


def _format(rows, args, header=True):
    lines = []
    if header:
        policy = "mixed_float16" if args.mixed_precision else "float32"
        device = (
            "GPU" if tf.config.list_physical_devices("GPU") else f"CPU, oneDNN {onednn_state()}"
        )
        a, b = COMPARISONS[args.compare]
        lines += [
            f"bn_inception train step, {device}, {policy}, batch {args.batch_size}, "
            f"{args.image_size}x{args.image_size}, depth_multiplier {args.depth_multiplier}, "
            f"median of {args.rounds} rounds x {args.steps} steps",
            f"| XLA | {a} img/s | {b} img/s | {a}/{b} | first step s ({a} / {b}) |",
            "|-----|----------------|-------------|------------|-----------------------------|",
        ]
    for jit_compile, result in rows:
        (ours, ours_first), (theirs, theirs_first) = result.values()
        lines.append(
            f"| {'on ' if jit_compile else 'off'} | {ours:14.2f} | {theirs:11.2f} | "
            f"{ours / theirs:10.2f} | {ours_first:12.1f} / {theirs_first:<12.1f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    run(_parse_args(argv))


if __name__ == "__main__":
    main()
