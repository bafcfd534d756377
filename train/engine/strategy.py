"""Devices, tf.distribute strategies and mixed precision for the trainer.

Scaling out is tf.distribute's job: this module only picks and configures a strategy.

Example:

>>> strategy = make_strategy("one_device")
>>> strategy.num_replicas_in_sync
1
"""

from __future__ import annotations

import json
import os

import tensorflow as tf


def split_cpu(replicas: int) -> None:
    """Splits the first CPU into `replicas` logical devices (a testing aid for mirrored runs).

    Must run before TensorFlow initializes its devices, i.e. before the first op.

    Raises:
        ValueError: if TensorFlow is already initialized (the split would be ignored).
    """
    if replicas <= 1:
        return
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration()] * replicas
        )
    except RuntimeError as error:
        raise ValueError(
            f"--cpu_replicas={replicas} must be applied before TensorFlow starts: {error}"
        ) from error


def make_strategy(name: str, tpu: str = "") -> tf.distribute.Strategy:
    """Returns the tf.distribute strategy called `name`.

    Args:
        name: `auto` (MirroredStrategy over all GPUs when there are several, OneDeviceStrategy
            on the GPU when there is one, else the default strategy), `one_device` (the first
            GPU, else the CPU), `mirrored` (all GPUs, else all logical CPUs), `multi_worker`
            (MultiWorkerMirroredStrategy configured by TF_CONFIG) or `tpu`.
        tpu: the TPU name or address for `tpu` ("" means the local TPU).

    Raises:
        ValueError: for an unknown name, or a TPU that cannot be reached.
    """
    if name == "multi_worker":
        # First: collectives must be configured before anything initializes TensorFlow's
        # context (listing devices below would, and the strategy would then refuse to start).
        try:
            return tf.distribute.MultiWorkerMirroredStrategy()
        except tf.errors.UnknownError as error:  # gRPC could not listen: the port is taken
            raise ValueError(
                f"--strategy=multi_worker: cannot serve this worker's address {own_address()} "
                f"from TF_CONFIG ({_first_line(error.message)}); is another process using "
                "that port?"
            ) from None
    gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
    cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
    if name == "auto":
        if len(gpus) > 1:
            return tf.distribute.MirroredStrategy(gpus)
        if len(gpus) == 1:
            return tf.distribute.OneDeviceStrategy(gpus[0])
        return tf.distribute.get_strategy()
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy((gpus or cpus)[0])
    if name == "mirrored":
        return tf.distribute.MirroredStrategy(gpus or cpus)
    if name == "tpu":
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "local")
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (ValueError, RuntimeError, tf.errors.OpError) as error:
            raise ValueError(f"--strategy=tpu: no TPU found ({error}).") from error
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"--strategy must be auto|one_device|mirrored|multi_worker|tpu, got {name!r}.")


def own_address() -> str:
    """This task's address in TF_CONFIG (`cluster[task.type][task.index]`), or "unknown"."""
    try:
        tf_config = json.loads(os.environ.get("TF_CONFIG", ""))
        task = tf_config["task"]
        return str(tf_config["cluster"][task["type"]][int(task["index"])])
    except (ValueError, KeyError, IndexError, TypeError):
        return "unknown"


def _first_line(message: str | None) -> str:
    lines = [line.strip() for line in (message or "").splitlines() if line.strip()]
    return lines[0] if lines else "no reason given"


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the run's files (always, except on non-chief workers).

    Under MultiWorkerMirroredStrategy every worker runs the same program (collectives need all
    of them) but only the chief, or worker 0 when the cluster has no chief, writes the
    model_dir; the others checkpoint into a temporary folder, as tf.distribute recommends.
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type in (None, "chief"):
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return task_type == "worker" and task_id == 0 and not has_chief


# What a collective raises on the survivors when a worker dies: TensorFlow's coordination service
# notices the missing heartbeats (or the closed connection) and aborts every collective.
PEER_FAILURES = (
    tf.errors.UnavailableError,
    tf.errors.AbortedError,
    tf.errors.CancelledError,
    tf.errors.DeadlineExceededError,
)


def is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
    """Whether `strategy` spans several worker processes."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return False
    jobs = resolver.cluster_spec().as_dict()
    return sum(len(jobs.get(job, ())) for job in ("chief", "worker")) > 1


def peer_failure_message(error: tf.errors.OpError, saved_step: int | None) -> str:
    """The one-line message of a worker whose cluster lost a peer."""
    lines = [line.strip() for line in (error.message or "").splitlines() if line.strip()]
    cause = next(
        (line.split("aborted by:", 1)[1].strip() for line in lines if "aborted by:" in line),
        lines[0] if lines else "collective aborted",
    )
    resume = (
        f"from the checkpoint of step {saved_step}"
        if saved_step
        else "from the last checkpoint in --model_dir"
    )
    return (
        f"the cluster lost a worker ({type(error).__name__}: {cause}); this worker stops too. "
        f"Start every worker again with the same command to resume {resume}."
    )


def check_batch_size(batch_size: int, strategy: tf.distribute.Strategy, flag: str) -> None:
    """Raises ValueError unless the global `batch_size` splits evenly over the replicas."""
    replicas = strategy.num_replicas_in_sync
    if batch_size % replicas:
        raise ValueError(
            f"{flag}={batch_size} is not divisible by the {replicas} replicas of the strategy; "
            f"use a multiple of {replicas}."
        )


def dtype_policy(mixed_precision: str) -> str:
    """Maps `--mixed_precision` to a Keras dtype policy name."""
    return {"none": "float32", "float16": "mixed_float16", "bfloat16": "mixed_bfloat16"}[
        mixed_precision
    ]
