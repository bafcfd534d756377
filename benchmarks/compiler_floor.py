"""What the compiler's own kernels need for a BN step's passes: the floor a compiled step can reach.

layer_step.py's floor assumes every full-tensor pass runs at the speed of a copy. A compiled
step is made of the compiler's kernels, and on a CPU its column reductions (a sum over the rows
of each channel) need not stream as a copy does. This script times, compiled by the backend's
compiler (XLA for TensorFlow, ``jax.jit``, ``torch.compile``), the smallest kernels that make up
layer_step.py's training step, each alone, on the same tensor:

    stats      sum(x), sum(x * x) over the batch axes                   1 pass  (column sums)
    loss       sum((x * a + b) * dy), a scalar                            2 passes
    grad sums  sum(dy), sum(dy * x) over the batch axes                 2 passes (column sums)
    dx         dy * a + x * b + c                                    3 passes (2 reads, 1 write)

Their sum is the compiler floor: a step whose compiled program makes these 8 passes in these
kernels cannot be faster unless the compiler's kernels are. It prints each kernel (ms, and the
GB/s it moves), their sum over the copy floor of layer_step.py, and every implementation's
compiled step from layer_step.py (ours and the peers, interleaved with the kernels and the copy)
over the compiler floor.

    python benchmarks/compiler_floor.py --backend tensorflow --shapes 32,28,28,192 4096,1024
    python benchmarks/compiler_floor.py --backend jax
    python benchmarks/compiler_floor.py --backend torch --device cuda

The table is Markdown, ready to paste into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import devices  # noqa: E402  (this folder)

BACKENDS = ("tensorflow", "jax", "torch")
KERNELS = {"stats": 1, "loss": 2, "grad sums": 2, "dx": 3}  # name: full-tensor passes


def _parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=BACKENDS, default="tensorflow")
    devices.add_device_flag(parser)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--shapes", nargs="*", default=["32,28,28,192", "4096,1024"], help="channels last"
    )
    return parser


if __name__ == "__main__":
    _known = _parser().parse_known_args()[0]
    devices.configure_environment(_known.backend, _known.device)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import layer_step  # noqa: E402  (this folder)
from keras import ops  # noqa: E402


def _kernels(rank):
    """{name: function of (x, dy, a, b, c)}: the step's kernels in keras.ops; a, b and c are
    per-channel vectors, as the step's statistics and gradients are."""
    axes = tuple(range(rank - 1))
    return {
        "stats": lambda x, dy, a, b, c: (ops.sum(x, axes), ops.sum(x * x, axes)),
        "loss": lambda x, dy, a, b, c: ops.sum((x * a + b) * dy),
        "grad sums": lambda x, dy, a, b, c: (ops.sum(dy, axes), ops.sum(dy * x, axes)),
        "dx": lambda x, dy, a, b, c: dy * a + x * b + c,
    }


def _compiled(function, name):
    """``function`` compiled by the backend's compiler, and a blocking call of it."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        compiled = tf.function(function, jit_compile=True)
        return lambda *args: keras.tree.map_structure(lambda t: t.numpy(), compiled(*args))
    if backend == "jax":
        import jax

        compiled = jax.jit(function)
        return lambda *args: jax.block_until_ready(compiled(*args))
    import torch

    # A frame of its own per kernel and shape (layer_step.own_code): every shape's kernels come
    # from the same lambdas, and Dynamo would recompile the second shape with dynamic shapes.
    return torch.compile(layer_step.own_code(function, name))


def _kernel_steps(shape, place):
    """{kernel name: blocking step} on the row's tensors, on the device."""
    x, dy = layer_step._inputs(shape)
    with place.scope():
        x, dy = ops.convert_to_tensor(x), ops.convert_to_tensor(dy)
        a, b, c = (ops.convert_to_tensor([0.5 + i] * shape[-1], "float32") for i in range(3))
    steps = {}
    for name, kernel in _kernels(len(shape)).items():
        compiled = _compiled(kernel, name)

        def step(compiled=compiled):
            with place.scope():
                compiled(x, dy, a, b, c)
            place.sync()

        steps[name] = step
    return steps


def _row(array, bandwidth, kernel_ms, step_ms):
    shape, nbytes = array.shape, array.nbytes
    floor = sum(kernel_ms.values())
    _, copy_floor = layer_step.floor_ms(array, bandwidth)
    cells = [",".join(map(str, shape)), f"{copy_floor:.2f}"]
    for name, passes in KERNELS.items():
        rate = passes * nbytes / (kernel_ms[name] * 1e-3) / 1e9
        cells.append(f"{kernel_ms[name]:.2f} ({rate:.0f})")
    cells.append(f"{floor:.2f} ({floor / copy_floor:.1f}x)")
    cells += [f"{ms:.2f} ({ms / floor:.2f}x)" for ms in step_ms.values()]
    return "| " + " | ".join(cells) + " |"


def main(argv=None):
    args = _parser().parse_args(argv)
    layer_step.check_backend(args, "compiler_floor.py")
    heap = layer_step.keep_freed_memory()  # as layer_step.py's default
    place = devices.placement(args.backend, args.device, "compiler_floor.py")
    print(f"{layer_step._header(args, place)}, {heap}")
    compiler = {"tensorflow": "XLA", "jax": "jax.jit", "torch": "torch.compile"}[args.backend]
    print(
        f"kernels compiled by {compiler}, each alone: ms (GB/s moved); compiler floor = their "
        f"sum; copy floor = {layer_step.PASSES} passes at the bandwidth of a copy, the faster of "
        "one timed alone and one interleaved with the kernels (as in layer_step.py)"
    )
    columns = layer_step.columns("bn")
    cells = ["shape", "copy floor ms"] + [f"{k} ms (GB/s)" for k in KERNELS]
    cells += ["compiler floor ms (/ copy floor)"]
    cells += [f"{n} ms (/ compiler floor)" for n in columns]
    print()
    print("| " + " | ".join(cells) + " |\n|" + "---|" * len(cells), flush=True)
    make_steps = layer_step.STEPS[args.backend]
    for spec in args.shapes:
        shape = tuple(int(d) for d in spec.split(","))
        steps, _ = make_steps("bn", shape, True, place)
        kernels = _kernel_steps(shape, place)
        array = layer_step._inputs(shape)[0]
        alone, _ = layer_step.copy_bandwidth(array, place, args.repeats)
        copy = {layer_step.COPY: layer_step._copy_step(array, place)}
        ms = layer_step._timed({**steps, **kernels, **copy}, args.repeats)
        # The faster of the copy alone and interleaved, as layer_step.py's floor.
        bandwidth = max(alone, layer_step.copy_rate(array, ms[layer_step.COPY]))
        step_ms = {n: ms.get(n, float("nan")) for n in columns}
        print(_row(array, bandwidth, {k: ms[k] for k in KERNELS}, step_ms), flush=True)


if __name__ == "__main__":
    sys.exit(main())
