"""Training-step speed of one BN layer: keras_bn vs keras.layers.BatchNormalization
(and tf_keras's fused layer when installed), same inputs, same run.

Each step is forward + backward (gradients w.r.t. the input, gamma and beta) plus the
moving-statistics update, compiled with tf.function, with and without XLA. Implementations
are interleaved within each repetition so machine noise hits all of them alike.

    python benchmarks/layer_step.py            # all shapes, ~3 minutes on 2 CPU cores
    python benchmarks/layer_step.py --repeats 50 --shapes 32,28,28,192
    python benchmarks/layer_step.py --suite renorm ghost --shapes 32,28,28,192 4096,1024
    python benchmarks/layer_step.py --suite fused
    python benchmarks/layer_step.py --backend jax --shapes 32,28,28,192 4096,1024
    python benchmarks/layer_step.py --backend torch --suite bn renorm --no-compile

Suites: ``bn`` (plain BN: ours, Keras 3, tf_keras), ``renorm`` (Batch Renormalization: ours
against Keras 3's ``renorm=True``), ``ghost`` (ghost batches of a quarter of the batch: ours
against tf_keras's ``virtual_batch_size``), ``fused`` (our layer with each fused implementation
forced: FusedBatchNormV3 against the XLA formulation; what the default of
``keras_bn.backends.tensorflow`` rests on).

``--backend jax|torch`` runs the ``bn`` and ``renorm`` suites (ours against Keras's own layer;
``ghost`` and ``fused`` are TensorFlow's) in a process of that backend (KERAS_BACKEND is set from
``--backend`` before Keras is imported; the default is tensorflow, whatever the environment says).
JAX: one step is ``jax.value_and_grad`` of ``layer.stateless_call`` (the moving statistics come
back as the new non-trainable values, fed to the next step), ``jax.jit``-compiled or run eagerly
(op by op). PyTorch: eager ``layer(x, training=True)`` and ``torch.autograd.grad``, and the same
forward under ``torch.compile`` (Inductor compiles the backward too; the first call's compile time
is printed, a layer that fails to compile is named with the error and its column reads nan;
``--no-compile`` skips it).

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
import sys
import time

BACKENDS = ("tensorflow", "jax", "torch")
SUITES = {"tensorflow": ("bn", "renorm", "ghost", "fused"), "jax": ("bn", "renorm")}
SUITES["torch"] = SUITES["jax"]
DEFAULT_SHAPES = ["32,28,28,192", "32,56,56,64", "4096,1024"]


def _parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=BACKENDS, default="tensorflow")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--no-compile", action="store_true", help="PyTorch: eager only, no torch.compile"
    )
    parser.add_argument(
        "--shapes", nargs="*", default=DEFAULT_SHAPES, help="comma-separated shapes, channels last"
    )
    parser.add_argument("--suite", nargs="*", default=["bn"], choices=SUITES["tensorflow"])
    return parser


if __name__ == "__main__":
    # Keras reads its backend once, at import: set it from the command line first.
    os.environ["KERAS_BACKEND"] = _parser().parse_known_args()[0].backend
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_bn  # noqa: E402


class XlaFormulationBN(keras_bn.BatchNormalization):
    """Our layer with the fused path forced to the XLA formulation (no public switch: on a CPU
    the default picks it inside XLA-compiled steps, and outside them where oneDNN is off)."""

    _tf_fused_implementation = "xla"  # read by keras_bn.backends.tensorflow


def _implementations(suite, batch):
    """{name: layer factory}; the first is ours, the others the anchors of the ratios."""
    tf_keras = None
    if keras.backend.backend() == "tensorflow":
        try:
            import tf_keras
        except ImportError:
            pass
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


def _inputs(shape):
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, shape).astype(np.float32)
    return x, rng.normal(size=shape).astype(np.float32)


def _built_layers(suite, shape):
    layers = {}
    for name, make in _implementations(suite, shape[0]).items():
        layers[name] = make()
        layers[name].build(shape)
    return layers


def _timed(steps, repeats, warmup=3):
    """Median milliseconds of each of ``steps`` ({name: step(), which blocks until done}),
    interleaved within each repetition."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


# ---- TensorFlow: tf.function, with and without XLA.


def _make_step(layer, jit):
    import tensorflow as tf

    def step(x, dy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * dy)
        return tape.gradient(loss, [x] + layer.trainable_weights)

    return tf.function(step, jit_compile=jit)


def bench(shape, jit, repeats, suite="bn", warmup=3):
    import tensorflow as tf

    x, dy = (tf.constant(a) for a in _inputs(shape))
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


# ---- JAX: value_and_grad of stateless_call, jitted or eager.


def _jax_step(layer, x, dy, jit):
    """A blocking step: gradients w.r.t. x, gamma and beta; the moving statistics carried."""
    import jax
    import jax.numpy as jnp

    def loss(trainable, x, dy, non_trainable):
        y, non_trainable = layer.stateless_call(trainable, non_trainable, x, training=True)
        return jnp.sum(y * dy), non_trainable

    grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    grads = jax.jit(grads) if jit else grads
    trainable = [v.value for v in layer.trainable_variables]
    state = {"non_trainable": [v.value for v in layer.non_trainable_variables]}

    def step():
        (_, state["non_trainable"]), gradients = grads(trainable, x, dy, state["non_trainable"])
        jax.block_until_ready((gradients, state["non_trainable"]))

    return step


def _bench_jax(suite, shape, jit, args):
    import jax.numpy as jnp

    x, dy = (jnp.asarray(a) for a in _inputs(shape))
    layers = _built_layers(suite, shape)
    steps = {name: _jax_step(layer, x, dy, jit) for name, layer in layers.items()}
    return _timed(steps, args.repeats)


# ---- PyTorch: eager, and torch.compile of the forward (Inductor compiles its backward too).


def _torch_step(layer, x, dy, compiled):
    import torch

    def loss(x, dy):
        return torch.sum(layer(x, training=True) * dy)

    loss = torch.compile(loss) if compiled else loss
    wrt = [x] + [v.value for v in layer.trainable_variables]

    def step():
        torch.autograd.grad(loss(x, dy), wrt)

    return step


def _bench_torch(suite, shape, compiled, args):
    import torch

    x, dy = (torch.from_numpy(a) for a in _inputs(shape))
    x.requires_grad_(True)
    layers = _built_layers(suite, shape)
    steps = {name: _torch_step(layer, x, dy, compiled) for name, layer in layers.items()}
    notes = []
    if compiled:  # the first call compiles: timed apart, and shown
        seconds = {}
        for name, step in list(steps.items()):
            start = time.perf_counter()
            try:
                step()
            except Exception as error:  # noqa: BLE001  (reported, and the row goes on)
                del steps[name]
                message = str(error).strip().splitlines()[0][:200]
                notes.append(f"{name}: torch.compile failed ({type(error).__name__}: {message})")
                continue
            seconds[name] = time.perf_counter() - start
        notes.insert(
            0, "first call (compilation) " + ", ".join(f"{n} {s:.1f} s" for n, s in seconds.items())
        )
    ms = _timed(steps, args.repeats)
    return {name: ms.get(name, float("nan")) for name in layers}, notes


def _header(args):
    backend = keras.backend.backend()
    cpus = f"{os.cpu_count()} CPUs"
    if backend == "tensorflow":
        import tensorflow as tf

        return (
            f"TensorFlow {tf.__version__}, Keras {keras.__version__}, "
            f"{cpus}, oneDNN {onednn_state()}, median of {args.repeats} steps"
        )
    if backend == "jax":
        import jax

        return (
            f"JAX {jax.__version__} ({jax.default_backend()}), Keras {keras.__version__}, "
            f"{cpus}, median of {args.repeats} steps"
        )
    import torch

    return (
        f"PyTorch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"Keras {keras.__version__}, {cpus}, median of {args.repeats} steps"
    )


def main(argv=None):
    args = _parser().parse_args(argv)
    if keras.backend.backend() != args.backend:
        raise SystemExit(
            f"Keras runs {keras.backend.backend()!r}, not --backend {args.backend}: run "
            "benchmarks/layer_step.py as a script (each backend in its own process)."
        )
    unsupported = sorted(set(args.suite) - set(SUITES[args.backend]))
    if unsupported:
        raise SystemExit(f"--suite {' '.join(unsupported)} runs on TensorFlow only")
    print(_header(args))
    # The compilation column: XLA on TensorFlow, jax.jit, torch.compile.
    column = {"tensorflow": "xla", "jax": "jit", "torch": "compile"}[args.backend]
    width = max(6, len(column) + 2)
    modes = (False, True)
    if args.backend == "torch" and args.no_compile:
        modes = (False,)
    notes = []
    for suite in args.suite:
        ours, *anchors = names = list(_implementations(suite, 4))
        label = "ours" if ours == "keras_bn" else ours
        print(
            f"{'suite':<8}{'shape':<18}{column:<{width}}"
            + "".join(f"{n + ' ms':>14}" for n in names)
            + "".join(f"{label + '/' + n:>15}" for n in anchors)
        )
        for spec in args.shapes:
            shape = tuple(int(d) for d in spec.split(","))
            for jit in modes:
                if args.backend == "tensorflow":
                    ms = bench(shape, jit, args.repeats, suite)
                elif args.backend == "jax":
                    ms = _bench_jax(suite, shape, jit, args)
                else:
                    ms, torch_notes = _bench_torch(suite, shape, jit, args)
                    notes += [f"torch.compile, {suite} {shape}: {note}" for note in torch_notes]
                row = f"{suite:<8}{str(shape):<18}{str(jit):<{width}}"
                row += "".join(f"{v:>14.2f}" for v in ms.values())
                row += "".join(f"{ms[ours] / ms[n]:>15.2f}" for n in anchors)
                print(row, flush=True)
    for note in notes:
        print(note)
    if args.backend == "torch" and args.no_compile:
        print("torch.compile skipped (--no-compile)")


if __name__ == "__main__":
    sys.exit(main())
