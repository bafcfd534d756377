"""Training throughput of bn_inception with keras_bn's BN layer vs Keras's, on any backend.

Builds the same network three times (`keras_bn.models.get("bn_inception", norm_layer=...)`):
with our layer, with `keras.layers.BatchNormalization`, and with an identity in place of every
BN layer. Each is compiled with SGD + momentum and sparse cross-entropy on logits, without and
with compilation (`model.compile(jit_compile=...)`: XLA on TensorFlow; on JAX Keras's stateless
train step under `jax.jit`, or op by op; on PyTorch eager, or the step under `torch.compile`,
which is opt-in: `--compile both|on`; on the 2-core CPU of docs/benchmarks.md, compiling even a
net cut at Mixed_3b did not finish in 15 minutes under load),
and `train_on_batch` is timed on one fixed synthetic batch placed on `--device`. The models are
timed in alternating rounds so that load from other processes hits them alike; the table
reports the median images/second over the rounds and the ratio ours / Keras's (> 1: ours is
faster). The first step (tracing and compilation) is timed separately and not counted; a model
that fails to compile is named with the error and its column reads nan.

The BN layers' share of the step: the identity net does everything else the step does (convs,
activations, pooling, the loss, the optimizer on the remaining weights), so for a norm layer
share = 1 - t_identity / t_bn, with t = 1 / (images/s), both from the same rounds (an
approximation: without BN the optimizer updates no gamma/beta and the activations differ, which
does not change the conv cost). It bounds what a faster layer can gain on the whole net.

Usage (the paper's configuration is 224x224, batch 32; the defaults below, 112x112 at depth
multiplier 0.5, batch 8, finish in a few minutes on a 2-core CPU per backend):

    python benchmarks/model_step.py                      # TensorFlow, XLA off and on
    python benchmarks/model_step.py --backend jax        # jax.jit and eager
    python benchmarks/model_step.py --backend torch      # eager
    python benchmarks/model_step.py --backend torch --compile both   # and torch.compile (slow)
    python benchmarks/model_step.py --image_size=224 --depth_multiplier=1 --rounds=5 --steps=3
    python benchmarks/model_step.py --backend torch --device cuda --mixed_precision
    python benchmarks/model_step.py --compare fused --compile off   # TF: kernel vs XLA formulation

`--compare fused` (TensorFlow) times our layer twice instead, with each fused implementation
forced (FusedBatchNormV3 against the XLA formulation, as `layer_step.py --suite fused` does for
one layer): whether the one-layer difference survives in a whole network. `--xla` is the old
name of `--compile`. The table is Markdown, ready to paste into docs/benchmarks.md.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import devices  # noqa: E402  (this folder)

BACKENDS = ("tensorflow", "jax", "torch")
COMPILE_NAME = {"tensorflow": "XLA", "jax": "jax.jit", "torch": "torch.compile"}


def _parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=BACKENDS, default="tensorflow")
    devices.add_device_flag(parser)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--image_size", type=int, default=112)
    parser.add_argument("--depth_multiplier", type=float, default=0.5)
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument(
        "--final_endpoint",
        default="Mixed_5c",
        help="the last end point built (a shallower net for a quick run)",
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model")
    # 3 rounds proved too few on a 2-core VM (docs/benchmarks.md).
    parser.add_argument("--rounds", type=int, default=7, help="alternating timed rounds")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model per round")
    parser.add_argument(
        "--compile",
        "--xla",
        dest="compile",
        choices=["both", "off", "on"],
        default=None,
        help="compilation: XLA (TensorFlow), jax.jit (JAX), torch.compile (PyTorch); default "
        "both, but off on PyTorch (torch.compile of the whole step takes over 15 minutes here)",
    )
    parser.add_argument("--mixed_precision", action="store_true", help="mixed_float16 policy")
    parser.add_argument("--no-identity", action="store_true", help="skip the identity net")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--compare",
        choices=["fused", "keras"],
        default="keras",
        help="keras: our layer vs Keras's; fused (TensorFlow): the kernel vs the XLA formulation",
    )
    return parser


def _parse_args(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    if args.image_size < 75:
        parser.error("--image_size must be >= 75 (the smallest input bn_inception takes).")
    for name in ("batch_size", "warmup", "rounds", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1.")
    if args.compile is None:
        args.compile = "off" if args.backend == "torch" else "both"
    if args.compare == "fused" and args.backend != "tensorflow":
        parser.error("--compare fused runs on TensorFlow only.")
    return args


if __name__ == "__main__":
    # Keras reads its backend (and torch device) once, at import: set them first.
    _known = _parser().parse_known_args()[0]
    devices.configure_environment(_known.backend, _known.device)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from layer_step import XlaFormulationBN, onednn_state, own_code  # noqa: E402  (this folder)

import keras_bn  # noqa: E402
from keras_bn import models  # noqa: E402


def identity_norm(name=None, **_):
    """A norm_layer that is no layer at all: the net without BN, for the BN layers' share."""
    return keras.layers.Identity(name=name)


def comparison(compare, identity=True):
    """{column name: norm layer}; the first is the ratio's numerator, then the anchor."""
    if compare == "fused":
        layers = {
            "kernel": lambda **kwargs: keras_bn.BatchNormalization(fused=True, **kwargs),
            "xla": XlaFormulationBN,
        }
    else:
        layers = {
            "keras_bn": keras_bn.BatchNormalization,
            "keras": keras.layers.BatchNormalization,
        }
    if identity:
        layers["identity"] = identity_norm
    return layers


def _build(name, norm_layer, jit_compile, args):
    model = models.get(
        "bn_inception",
        norm_layer=norm_layer,
        num_classes=args.num_classes,
        input_shape=(args.image_size, args.image_size, 3),
        depth_multiplier=args.depth_multiplier,
        final_endpoint=args.final_endpoint,
        seed=args.seed,
    )
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    if jit_compile and keras.backend.backend() == "torch":
        # Keras compiles every model's step from one closure; Dynamo would let one net's
        # entries serve the other's calls (layer_step.own_code): a frame of its own per net.
        import torch

        model.make_train_function()
        step = model.train_function.__wrapped__  # torch.compile wraps with functools.wraps
        model.train_function = torch.compile(own_code(step, name))
    return model


def _timed_steps(model, images, labels, steps):
    start = time.perf_counter()
    for _ in range(steps):
        loss = model.train_on_batch(images, labels)
    float(loss)  # the loss comes back to the host: the steps have finished
    return time.perf_counter() - start


def run(args, place):
    """Runs the benchmark; prints and returns rows of
    (compiled, {layer: (images/s, first step s)}, notes)."""
    if args.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    rng = np.random.default_rng(args.seed)
    shape = (args.batch_size, args.image_size, args.image_size, 3)
    with place.scope():
        images = keras.ops.convert_to_tensor(rng.uniform(-1, 1, size=shape).astype("float32"))
        labels = keras.ops.convert_to_tensor(
            rng.integers(0, args.num_classes, size=args.batch_size).astype("int32")
        )
    settings = {"both": [False, True], "off": [False], "on": [True]}[args.compile]
    rows = []
    for jit_compile in settings:
        keras.utils.clear_session(free_memory=True)  # drop the previous setting's models
        layers = comparison(args.compare, identity=not args.no_identity)
        built, first_s, rates, notes = {}, {}, {name: [] for name in layers}, []
        with place.scope():
            for name, layer in layers.items():
                built[name] = _build(name, layer, jit_compile, args)
                try:
                    first_s[name] = _timed_steps(built[name], images, labels, 1)
                except Exception as error:  # noqa: BLE001  (reported, and the row goes on)
                    message = str(error).strip().splitlines()[0][:200]
                    notes.append(
                        f"{name}: the first step failed ({type(error).__name__}: {message})"
                    )
                    del built[name]
                    continue
                if args.warmup > 1:
                    _timed_steps(built[name], images, labels, args.warmup - 1)
            for _ in range(args.rounds):
                for name, model in built.items():
                    seconds = _timed_steps(model, images, labels, args.steps)
                    rates[name].append(args.steps * args.batch_size / seconds)
        result = {
            name: (
                statistics.median(rates[name]) if rates[name] else float("nan"),
                first_s.get(name, float("nan")),
            )
            for name in layers
        }
        rows.append((jit_compile, result, notes))
        print(_format([rows[-1]], args, place, header=len(rows) == 1), flush=True)
    for _, _, notes in rows:
        for note in notes:
            print(f"note: {note}")
    return rows


def _format(rows, args, place, header=True):
    names = list(comparison(args.compare, identity=not args.no_identity))
    ours, anchor = names[:2]
    shares = [n for n in (ours, anchor) if "identity" in names]
    lines = []
    if header:
        policy = "mixed_float16" if args.mixed_precision else "float32"
        backend = keras.backend.backend()
        extra = f", oneDNN {onednn_state()}" if backend == "tensorflow" else ""
        lines += [
            f"bn_inception train step, Keras {keras.__version__} on {backend}, device "
            f"{place.name}{extra}, {policy}, batch {args.batch_size}, "
            f"{args.image_size}x{args.image_size}, depth_multiplier {args.depth_multiplier}, "
            f"up to {args.final_endpoint}, median of {args.rounds} rounds x {args.steps} steps",
            "",
        ]
        cells = [COMPILE_NAME[backend]] + [f"{n} img/s" for n in names]
        cells += [f"{ours}/{anchor}"] + [f"BN share {n}" for n in shares]
        cells += [f"first step s ({' / '.join(names)})"]
        lines += ["| " + " | ".join(cells) + " |", "|" + "---|" * len(cells)]
    for compiled, result, _ in rows:
        rate = {name: result[name][0] for name in names}
        cells = ["on" if compiled else "off"] + [f"{rate[n]:.2f}" for n in names]
        cells.append(f"{rate[ours] / rate[anchor]:.2f}")
        cells += [f"{1 - rate[n] / rate['identity']:.2f}" for n in shares]
        cells.append(" / ".join(f"{result[n][1]:.1f}" for n in names))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = _parse_args(argv)
    if keras.backend.backend() != args.backend:
        raise SystemExit(
            f"Keras runs {keras.backend.backend()!r}, not --backend {args.backend}: run "
            "benchmarks/model_step.py as a script (each backend in its own process)."
        )
    run(args, devices.placement(args.backend, args.device, "model_step.py"))


if __name__ == "__main__":
    main()
