"""``--device`` for the benchmarks: where inputs, layers and models live, on every backend.

Two steps, because Keras reads its backend (and, on PyTorch, its device) once, at import:

    configure_environment("torch", "cuda")   # before `import keras`
    place = placement("torch", "cuda", "layer_step.py")   # after; exits 2 if there is no GPU
    with place.scope():
        ...   # build layers, make inputs
    place.sync()   # wait for the device (steps on a GPU are asynchronous)

``cpu`` is the default; ``gpu`` and ``cuda`` mean the first GPU. TensorFlow: ``tf.device``;
JAX: ``jax.default_device`` (Keras creates its variables with ``jnp`` under it); PyTorch: Keras
follows ``KERAS_TORCH_DEVICE`` (read when ``keras.src.backend.torch.core`` is imported), plain
tensors and ``torch.nn`` modules follow ``torch.device`` used as a context manager. The header of
each benchmark prints the device a probe tensor actually landed on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import Callable

DEVICES = ("cpu", "gpu", "cuda")


def add_device_flag(parser):
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default="cpu",
        help="cpu, or gpu/cuda: the first GPU (a missing GPU is an error, exit 2)",
    )


def configure_environment(backend, device):
    """Sets what Keras reads at import: its backend and, on PyTorch, its device."""
    os.environ["KERAS_BACKEND"] = backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if backend == "torch":
        os.environ["KERAS_TORCH_DEVICE"] = "cpu" if device == "cpu" else "cuda"


@dataclasses.dataclass
class Placement:
    """A device of one backend: `scope()` places what is built in it, `sync()` waits for it."""

    name: str
    scope: Callable[[], contextlib.AbstractContextManager]
    sync: Callable[[], None]
    handle: object = None  # tf device string, jax.Device or torch.device


def _missing(prog, device, why):
    print(f"{prog}: error: --device {device}: {why}", file=sys.stderr)
    raise SystemExit(2)


def placement(backend, device, prog):
    """The Placement of `device` on `backend`; a missing device is a one-line error, exit 2."""
    gpu = device != "cpu"
    if backend == "tensorflow":
        import tensorflow as tf

        if gpu and not tf.config.list_logical_devices("GPU"):
            _missing(prog, device, "TensorFlow sees no GPU (a CPU-only build, or no driver)")
        spec = "/GPU:0" if gpu else "/CPU:0"
        with tf.device(spec):
            probe = tf.zeros(())
        sync = tf.test.experimental.sync_devices if gpu else (lambda: None)
        return Placement(probe.device, lambda: tf.device(spec), sync, spec)
    if backend == "jax":
        import jax

        try:
            target = jax.devices("gpu" if gpu else "cpu")[0]
        except RuntimeError as error:
            _missing(prog, device, f"JAX has no such device ({str(error).splitlines()[0]})")
        with jax.default_device(target):
            probe = jax.numpy.zeros(())
        name = f"{next(iter(probe.devices()))} ({target.device_kind})"
        return Placement(name, lambda: jax.default_device(target), lambda: None, target)
    import torch

    if gpu and not torch.cuda.is_available():
        _missing(prog, device, f"torch {torch.__version__} sees no CUDA device")
    target = torch.device("cuda:0" if gpu else "cpu")
    probe = torch.zeros((), device=target)
    name = str(probe.device)
    if gpu:
        name += f" ({torch.cuda.get_device_name(target)})"
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    return Placement(name, lambda: target, sync, target)
