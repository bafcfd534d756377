"""Training-step speed of one BN layer against every peer on its backend, and the memory floor.

Each step is forward + backward (gradients w.r.t. the input, gamma and beta) plus the
moving-statistics update, with and without compilation (XLA / ``jax.jit`` / ``torch.compile``).
All implementations of a row run in one process, interleaved within each repetition, so machine
noise hits them alike; the table gives median milliseconds per step.

    python benchmarks/layer_step.py            # TensorFlow, all shapes, ~3 minutes on 2 CPU cores
    python benchmarks/layer_step.py --repeats 50 --shapes 32,28,28,192
    python benchmarks/layer_step.py --suite renorm ghost --shapes 32,28,28,192 4096,1024
    python benchmarks/layer_step.py --suite fused
    python benchmarks/layer_step.py --backend jax --shapes 32,28,28,192 4096,1024
    python benchmarks/layer_step.py --backend torch --suite bn renorm --no-compile
    python benchmarks/layer_step.py --backend torch --device cuda

Peers (the columns after ours), per backend:

- TensorFlow: Keras 3's layer and tf_keras's (``fused=None``; when ``tf_keras`` is installed),
  one ``tf.function`` step each, with and without ``jit_compile``.
- JAX: Keras 3's layer (``jax.value_and_grad`` of ``layer.stateless_call``, the moving statistics
  carried to the next step) and Flax's ``nn.BatchNorm`` (linen; when ``flax`` is installed, else
  the header says so): ``jax.value_and_grad`` of ``apply(..., mutable=["batch_stats"])`` w.r.t.
  the input and scale/bias, the new statistics carried. Jitted, and eager (op by op).
- PyTorch: Keras 3's layer and ``torch.nn.BatchNorm2d`` (4-D: on the same NHWC data, viewed as
  NCHW with ``torch.channels_last`` strides, no copy) / ``torch.nn.BatchNorm1d`` (2-D), column
  ``torch.nn``: ``torch.autograd.grad`` of the loss w.r.t. the input, weight and bias. Eager, and
  the loss under ``torch.compile`` (Inductor compiles its backward too; the first call's compile
  time is printed, an implementation that fails to compile is named with the error and reads
  nan; ``--no-compile`` skips it). Each implementation compiles a frame of its own
  (:func:`own_code`).

The same epsilon (1e-3) and momentum (0.99, torch's 0.01) everywhere.

The memory floor. Before the rows, the script times a copy (read + write: ``tf.raw_ops.DeepCopy``,
``jnp.copy``, ``Tensor.copy_`` into one reused tensor) of a tensor of each shape and
dtype, on the benchmark's device, median of ``--repeats``; bandwidth = 2 x tensor bytes / copy
time (header). A training step must move at least ``PASSES`` = 8 full tensors:

    forward   read x for the statistics (one pass: sum and sum of squares)   1
              read x, write y                                                  2
    backward  read dy and x for the two gradient sums (sum dy, sum dy * x)    2
              read dy and x, write dx                                          3

(the per-channel vectors are negligible). The same copy is timed again in every row, interleaved
with the row's steps so that load from other processes hits it alike; each row prints the faster
of the two bandwidths (``GB/s``: the floor must not flatter a step whose copy ran slow between
other work), the bytes a step moves (``MB``, the tensor's actual dtype size), the floor
time = bytes / bandwidth (= 4 copies), every implementation's milliseconds and its ratio to the
floor (``/floor``), and ``ours/best``: ours over the fastest peer of the row (below 1 = ours is
fastest). A tensor of a few tens of MB may sit in a large last-level cache: the copy then measures
the bandwidth a step of that size actually sees.

Suites: ``bn`` (plain BN: ours and every peer above), ``renorm`` (Batch Renormalization: ours
against Keras 3's ``renorm=True``; Flax and torch.nn have none), ``ghost`` (ghost batches of a
quarter of the batch: on TensorFlow ours against tf_keras's ``virtual_batch_size``; on JAX and
PyTorch, where no peer has ghost batches, ours against our own plain ``keras.ops`` path,
``fused=False``, column ``keras_bn_plain``), ``fused``
(TensorFlow: our layer with each fused implementation forced, FusedBatchNormV3 against the XLA
formulation; what the default of ``keras_bn.backends.tensorflow`` rests on), ``masked`` (every
backend: a Keras mask of ``shape[:-1]`` keeping 80% of the positions, ours against Keras 3's
layer given the same mask; torch.nn and Flax are left out).

``--backend`` selects the Keras backend (KERAS_BACKEND is set from it before Keras is imported;
the default is tensorflow, whatever the environment says). ``--device`` (devices.py): cpu, or
gpu/cuda; the header prints the device used; a missing one is a one-line error, exit 2. The
tables are Markdown, ready to paste into docs/benchmarks.md.

Targets (issue 22): every row at or below its best peer, and on 4-D shapes the compiled rows at
most 2x the floor. The header says whether TensorFlow runs its oneDNN kernels: where it does not
(its default on some CPUs; ``TF_ENABLE_ONEDNN_OPTS=1`` turns them on), FusedBatchNormV3 is slow on
a CPU and our layer uses its XLA formulation outside XLA as well (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import devices  # noqa: E402  (this folder)

BACKENDS = ("tensorflow", "jax", "torch")
SUITES = {
    "tensorflow": ("bn", "renorm", "ghost", "fused", "masked"),
    "jax": ("bn", "renorm", "ghost", "masked"),
}
SUITES["torch"] = SUITES["jax"]
DEFAULT_SHAPES = ["32,28,28,192", "32,56,56,64", "4096,1024"]
PASSES = 8  # full-tensor reads and writes of one training step (module docstring)
EPSILON, MOMENTUM = 1e-3, 0.99  # Keras's defaults, given to every peer
COPY = "(copy)"  # the bandwidth step's name among a row's steps


def _parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=BACKENDS, default="tensorflow")
    devices.add_device_flag(parser)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--no-compile", action="store_true", help="PyTorch: eager only, no torch.compile"
    )
    parser.add_argument(
        "--shapes", nargs="*", default=DEFAULT_SHAPES, help="comma-separated shapes, channels last"
    )
    parser.add_argument("--suite", nargs="*", default=["bn"], choices=SUITES["tensorflow"])
    parser.add_argument(
        "--heap",
        choices=("kept", "default"),
        default="kept",
        help="kept: freed memory stays in the process for every column (glibc: no mmap of "
        "large blocks, no trimming; see keep_freed_memory); default: the allocator's defaults",
    )
    return parser


def keep_freed_memory():
    """Keeps freed memory in the process, for every column alike; returns the header's words.

    By default glibc serves large blocks with ``mmap`` (up to its dynamic threshold) and gives
    the top of its heap back to the system once a free leaves more than its trim threshold
    there; the next step then page-faults its full-size tensors in again, several ms a step on
    this benchmark's shapes, and which implementation pays depends on the order of the steps and
    where the small blocks land, not on its kernels (docs/benchmarks.md, PyTorch). Other
    allocators (jemalloc, tcmalloc, which PyTorch's CPU tuning guide recommends) keep freed
    memory too. Elsewhere than glibc this is a no-op and the header says so.
    """
    import ctypes

    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallopt"):
        return "heap: the allocator's defaults (no mallopt here)"
    m_trim_threshold, m_mmap_max = -1, -4  # malloc.h
    if libc.mallopt(m_mmap_max, 0) != 1 or libc.mallopt(m_trim_threshold, 2**31 - 1) != 1:
        return "heap: the allocator's defaults (mallopt refused)"
    return "heap kept (glibc mallopt: no mmap, no trim)"


if __name__ == "__main__":
    # Keras reads its backend (and torch device) once, at import: set them first.
    _known = _parser().parse_known_args()[0]
    devices.configure_environment(_known.backend, _known.device)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_bn  # noqa: E402


class XlaFormulationBN(keras_bn.BatchNormalization):
    """Our layer with the fused path forced to the XLA formulation (no public switch: on a CPU
    the default picks it inside XLA-compiled steps, and outside them where oneDNN is off)."""

    _tf_fused_implementation = "xla"  # read by keras_bn.backends.tensorflow


def _tf_keras():
    if keras.backend.backend() != "tensorflow":
        return None
    try:
        import tf_keras
    except ImportError:
        return None
    return tf_keras


def _flax_missing():
    """Why the Flax column is absent (None when flax imports)."""
    try:
        import flax.linen  # noqa: F401
    except ImportError as error:
        return f"flax is not installed ({error}; pip install flax), its column is left out"
    return None


def _implementations(suite, batch):
    """{name: Keras layer factory}; the first is ours, the others peers."""
    if suite == "masked":
        return {"keras_bn": keras_bn.BatchNormalization, "keras3": keras.layers.BatchNormalization}
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
    tf_keras = _tf_keras()
    if suite == "ghost":
        size = batch // 4
        ours = {"keras_bn": lambda: keras_bn.BatchNormalization(virtual_batch_size=size)}
        if keras.backend.backend() != "tensorflow":
            # No peer has ghost batches here: our plain keras.ops path is the reference.
            return ours | {
                "keras_bn_plain": lambda: keras_bn.BatchNormalization(
                    virtual_batch_size=size, fused=False
                )
            }
        if tf_keras is None:
            raise SystemExit("the ghost suite needs tf_keras (pip install tf_keras)")
        return ours | {
            "tf_keras": lambda: tf_keras.layers.BatchNormalization(virtual_batch_size=size)
        }
    impls = {"keras_bn": keras_bn.BatchNormalization, "keras3": keras.layers.BatchNormalization}
    if tf_keras is not None:
        impls["tf_keras"] = lambda: tf_keras.layers.BatchNormalization(fused=None)
    return impls


def _native_peers(suite):
    """The peers that are not Keras layers, on this backend: flax (JAX), torch.nn (PyTorch)."""
    if suite != "bn":
        return []
    backend = keras.backend.backend()
    if backend == "jax":
        return [] if _flax_missing() else ["flax"]
    return ["torch.nn"] if backend == "torch" else []


def columns(suite):
    """Every implementation of a suite's rows, ours first."""
    return list(_implementations(suite, 4)) + _native_peers(suite)


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


# ---- The memory floor: a copy of the benchmark's tensor with the backend's own ops.


def _copy_step(array, place):
    """A blocking step that copies `array` (on the device): into a fresh output on TensorFlow
    and JAX, whose allocators reuse the memory, into one reused output on PyTorch."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with place.scope():
            x = tf.constant(array)

        def step():
            with place.scope():
                tf.raw_ops.DeepCopy(x=x)
            place.sync()

        return step
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        x = jax.device_put(array, place.handle)
        probe = jnp.copy(x)
        if probe.unsafe_buffer_pointer() == x.unsafe_buffer_pointer():
            raise RuntimeError("jnp.copy returned its input's buffer: not a copy")
        return lambda: jnp.copy(x).block_until_ready()
    import torch

    x = torch.from_numpy(array).to(place.handle)
    out = torch.empty_like(x)  # reused: a fresh 19 MB tensor per copy adds page faults (~2x)

    def step():
        out.copy_(x)
        place.sync()

    return step


def copy_bandwidth(array, place, repeats):
    """(GB/s, copy ms): median over `repeats` copies of `array` on the device, read + write."""
    ms = _timed({"copy": _copy_step(array, place)}, repeats)["copy"]
    return copy_rate(array, ms), ms


def copy_rate(array, copy_ms):
    """GB/s of a copy of `array` (read + write) that took `copy_ms`."""
    return 2 * array.nbytes / (copy_ms * 1e-3) / 1e9


def floor_ms(array, bandwidth):
    """(MB a training step moves, the floor milliseconds at `bandwidth` GB/s)."""
    moved = PASSES * array.nbytes
    return moved / 1e6, moved / (bandwidth * 1e9) * 1e3


# ---- TensorFlow: tf.function, with and without XLA.


def _mask(suite, shape):
    """The ``masked`` suite's Keras mask (``shape[:-1]``, 80% kept, fixed), else None."""
    if suite != "masked":
        return None
    return np.random.default_rng(1).random(shape[:-1]) < 0.8


def _make_step(layer, jit, mask=None):
    import tensorflow as tf

    def step(x, dy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True, mask=mask)
            loss = tf.reduce_sum(y * dy)
        return tape.gradient(loss, [x] + layer.trainable_weights)

    return tf.function(step, jit_compile=jit)


def _tf_steps(suite, shape, jit, place):
    import tensorflow as tf

    with place.scope():
        x, dy = (tf.constant(a) for a in _inputs(shape))
        mask = _mask(suite, shape)
        mask = None if mask is None else tf.constant(mask)
        steps = {}
        for name, make in _implementations(suite, shape[0]).items():
            layer = make()
            layer.build(shape)
            if name == "tf_keras":
                layer(x, training=True)  # tf_keras builds on first call
            fn = _make_step(layer, jit, mask)
            steps[name] = lambda fn=fn: [t.numpy() for t in fn(x, dy)]
    return steps, []


def onednn_state():
    """Whether TensorFlow runs its oneDNN CPU kernels ("on"/"off"): on a CPU it decides which
    fused implementation our layer uses outside XLA
    (`keras_bn.backends.tensorflow.default_implementation`)."""
    from keras_bn.backends import tensorflow as tf_backend

    return "on" if tf_backend.onednn_enabled() else "off"


# ---- JAX: value_and_grad of stateless_call (and of Flax's apply), jitted or eager.


def _jax_grad_step(loss, params, x, dy, state, jit):
    """A blocking step: gradients of ``loss(params, x, dy, state) -> (value, new state)``
    w.r.t. the parameters and x; the new state is carried to the next step."""
    import jax

    grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    grads = jax.jit(grads) if jit else grads
    carried = {"state": state}

    def step():
        (_, carried["state"]), gradients = grads(params, x, dy, carried["state"])
        jax.block_until_ready((gradients, carried["state"]))

    return step


def _jax_step(layer, x, dy, jit, mask=None):
    import jax.numpy as jnp

    def loss(trainable, x, dy, non_trainable):
        y, non_trainable = layer.stateless_call(
            trainable, non_trainable, x, training=True, mask=mask
        )
        return jnp.sum(y * dy), non_trainable

    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]
    return _jax_grad_step(loss, trainable, x, dy, non_trainable, jit)


def _flax_step(x, dy, jit):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    bn = nn.BatchNorm(use_running_average=False, momentum=MOMENTUM, epsilon=EPSILON, axis=-1)
    variables = bn.init(jax.random.PRNGKey(0), x)

    def loss(params, x, dy, stats):
        y, updates = bn.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
        return jnp.sum(y * dy), updates["batch_stats"]

    return _jax_grad_step(loss, variables["params"], x, dy, variables["batch_stats"], jit)


def _jax_steps(suite, shape, jit, place):
    import jax

    with place.scope():
        x, dy = (jax.device_put(a, place.handle) for a in _inputs(shape))
        layers = _built_layers(suite, shape)
        mask = _mask(suite, shape)
        mask = None if mask is None else jax.device_put(mask, place.handle)
        steps = {name: _jax_step(layer, x, dy, jit, mask) for name, layer in layers.items()}
        if "flax" in _native_peers(suite):
            steps["flax"] = _flax_step(x, dy, jit)
    return steps, []


# ---- PyTorch: eager, and torch.compile of the loss (Inductor compiles its backward too).


def own_code(function, tag):
    """``function`` with a code object of its own, named after ``tag``.

    Dynamo keeps compiled frames per code object, guarded by what each trace read. The
    implementations of a row share one ``loss`` closure: an entry compiled for a peer that
    graph-breaks inside its layer guards on little more than the tensors, and then matched our
    layer's call too, which ran as two graphs (the layer, then the loss, the output written
    and read back between them: 1.1-1.4x the time of our layer compiled in a process of its
    own). Each implementation compiles its own frame, as in a program that defines its model
    once."""
    code = function.__code__
    name = f"{code.co_name}_{''.join(c if c.isalnum() else '_' for c in tag)}"
    code = code.replace(co_name=name, co_qualname=name)
    return types.FunctionType(
        code, function.__globals__, name, function.__defaults__, function.__closure__
    )


def _torch_grad_step(forward, x, dy, wrt, compiled, place, name):
    import torch

    def loss(x, dy):
        return torch.sum(forward(x) * dy)

    loss = torch.compile(own_code(loss, name)) if compiled else loss

    def step():
        torch.autograd.grad(loss(x, dy), wrt)
        place.sync()

    return step


def _torch_nn_step(x_nhwc, dy_nhwc, compiled, place):
    """torch.nn.BatchNorm2d on the NHWC data viewed as NCHW (channels_last strides, no copy),
    BatchNorm1d on 2-D data."""
    import torch

    channels = x_nhwc.shape[-1]
    if x_nhwc.dim() == 4:
        x = x_nhwc.detach().permute(0, 3, 1, 2).requires_grad_(True)
        dy = dy_nhwc.permute(0, 3, 1, 2)
        assert x.is_contiguous(memory_format=torch.channels_last)
        bn = torch.nn.BatchNorm2d(channels, eps=EPSILON, momentum=1 - MOMENTUM)
    elif x_nhwc.dim() == 2:
        x, dy = x_nhwc, dy_nhwc
        bn = torch.nn.BatchNorm1d(channels, eps=EPSILON, momentum=1 - MOMENTUM)
    else:
        raise SystemExit(f"torch.nn peer: 2-D or 4-D shapes only, not {tuple(x_nhwc.shape)}")
    bn = bn.to(place.handle).train()
    return _torch_grad_step(bn, x, dy, [x, bn.weight, bn.bias], compiled, place, "torch.nn")


def _torch_steps(suite, shape, compiled, place):
    import torch

    with place.scope():
        x, dy = (torch.from_numpy(a).to(place.handle) for a in _inputs(shape))
        x.requires_grad_(True)
        layers = _built_layers(suite, shape)
        mask = _mask(suite, shape)
        mask = None if mask is None else torch.from_numpy(mask).to(place.handle)
        steps = {}
        for name, layer in layers.items():
            forward = lambda x, layer=layer: layer(x, training=True, mask=mask)
            wrt = [x] + [v.value for v in layer.trainable_variables]
            steps[name] = _torch_grad_step(forward, x, dy, wrt, compiled, place, name)
        if "torch.nn" in _native_peers(suite):
            steps["torch.nn"] = _torch_nn_step(x, dy, compiled, place)
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
    return steps, notes


# ---- Output.


def _header(args, place):
    backend = keras.backend.backend()
    common = f"device {place.name}, {os.cpu_count()} CPUs, median of {args.repeats} steps"
    if backend == "tensorflow":
        import tensorflow as tf

        return (
            f"TensorFlow {tf.__version__}, Keras {keras.__version__}, "
            f"oneDNN {onednn_state()}, {common}"
        )
    if backend == "jax":
        import jax

        flax = "flax not installed"
        if not _flax_missing():
            import flax

            flax = f"Flax {flax.__version__}"
        return f"JAX {jax.__version__}, {flax}, Keras {keras.__version__}, {common}"
    import torch

    return (
        f"PyTorch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"Keras {keras.__version__}, {common}"
    )


def _table_header(suite, column):
    names = columns(suite)
    cells = ["suite", "shape", column, "GB/s", "MB", "floor ms"]
    cells += [f"{n} ms" for n in names] + [f"{n}/floor" for n in names]
    cells.append(("ours" if names[0] == "keras_bn" else names[0]) + "/best")
    return "| " + " | ".join(cells) + " |\n|" + "---|" * len(cells)


def _row(suite, shape, compiled, bandwidth, moved_mb, floor, ms):
    ours, *peers = columns(suite)
    best = min((ms[n] for n in peers if ms[n] == ms[n]), default=float("nan"))  # nan: failed
    cells = [suite, ",".join(map(str, shape)), "on" if compiled else "off"]
    cells += [f"{bandwidth:.1f}", f"{moved_mb:.1f}", f"{floor:.2f}"]
    cells += [f"{ms[n]:.2f}" for n in ms] + [f"{ms[n] / floor:.1f}" for n in ms]
    cells.append(f"{ms[ours] / best:.2f}")
    return "| " + " | ".join(cells) + " |"


# Each backend's row of steps: ``(suite, shape, compiled, place) -> ({name: step}, notes)``.
STEPS = {"tensorflow": _tf_steps, "jax": _jax_steps, "torch": _torch_steps}


def check_backend(args, script):
    """Exits with a one-line reason when Keras runs another backend than ``--backend``."""
    if keras.backend.backend() != args.backend:
        raise SystemExit(
            f"Keras runs {keras.backend.backend()!r}, not --backend {args.backend}: run "
            f"benchmarks/{script} as a script (each backend in its own process)."
        )


def main(argv=None):
    args = _parser().parse_args(argv)
    check_backend(args, "layer_step.py")
    unsupported = sorted(set(args.suite) - set(SUITES[args.backend]))
    if unsupported:
        raise SystemExit(f"--suite {' '.join(unsupported)} runs on TensorFlow only")
    heap = keep_freed_memory() if args.heap == "kept" else "heap: the allocator's defaults"
    place = devices.placement(args.backend, args.device, "layer_step.py")
    shapes = [tuple(int(d) for d in spec.split(",")) for spec in args.shapes]
    print(f"{_header(args, place)}, {heap}")
    if args.backend == "jax" and "bn" in args.suite and _flax_missing():
        print(f"note: {_flax_missing()}")
    # The floor of each shape, measured now on the same device (module docstring).
    alone = {}
    for shape in shapes:
        array = _inputs(shape)[0]
        bandwidth, copy_ms = alone[shape] = copy_bandwidth(array, place, args.repeats)
        moved, floor = floor_ms(array, bandwidth)
        print(
            f"memory: copy of {','.join(map(str, shape))} {array.dtype} "
            f"({array.nbytes / 1e6:.1f} MB) {copy_ms:.2f} ms = {bandwidth:.1f} GB/s "
            f"(read + write); a step moves {PASSES} passes = {moved:.1f} MB, "
            f"floor {floor:.2f} ms"
        )
    print(
        "each row times the same copy again, interleaved with its steps; its floor uses the "
        "faster of the two copies (GB/s column)"
    )
    # The compilation column: XLA on TensorFlow, jax.jit, torch.compile.
    column = {"tensorflow": "xla", "jax": "jit", "torch": "compile"}[args.backend]
    modes = (False, True)
    if args.backend == "torch" and args.no_compile:
        modes = (False,)
    notes = []
    for suite in args.suite:
        print()
        print(_table_header(suite, column), flush=True)
        for shape in shapes:
            for compiled in modes:
                steps, row_notes = STEPS[args.backend](suite, shape, compiled, place)
                notes += [f"torch.compile, {suite} {shape}: {note}" for note in row_notes]
                array = _inputs(shape)[0]
                steps[COPY] = _copy_step(array, place)
                ms = _timed(steps, args.repeats)
                interleaved = copy_rate(array, ms.pop(COPY))
                # The stricter floor: the copy runs slower between other work than alone.
                fastest = max(interleaved, alone[shape][0])
                ms = {name: ms.get(name, float("nan")) for name in columns(suite)}
                row = _row(suite, shape, compiled, fastest, *floor_ms(array, fastest), ms)
                print(row, flush=True)
    if notes:
        print()
    for note in notes:
        print(note)
    if args.backend == "torch" and args.no_compile:
        print("torch.compile skipped (--no-compile)")


if __name__ == "__main__":
    sys.exit(main())
