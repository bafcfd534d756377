"""The training loop: SGD with momentum under a tf.distribute strategy, resumable exactly.

One `Trainer` owns the model, the optimizer, the global step and a `tf.train.CheckpointManager`.
State saved in each checkpoint: every model variable (weights, moving statistics and the seed
state of random layers), every optimizer variable, and the step. The data position is a pure
function of the step (`data.Data.train_dataset(start_step)`), so a run killed at any point and
restarted with the same flags continues with the very batches it would have seen and ends with
the same weights as an uninterrupted run.

Two input paths give the same batches in the same order. Data held in memory (the packaged
MNIST, no augmentation) on an unreplicated strategy: each block of up to `steps_per_loop` steps
is ONE compiled `tf.while_loop` that gathers its batches from the in-memory tensors by the
indices of `Data.train_indices` (evaluation is an in-memory loop too). Everything else, and
every replicated strategy (Mirrored, MultiWorkerMirrored, TPU): a distributed tf.data pipeline
and `strategy.run` per step. Both compile with XLA when `config.jit_compile`; its default (None)
means XLA for the in-memory path, where fusing the gather, the step and the loop is what makes
it fast, and none for tf.data.

The loss is softmax cross-entropy on the model's logits, averaged over the GLOBAL batch on each
replica (`tf.nn.compute_average_loss`), plus the model's regularization losses divided by the
replica count; Keras's optimizer sums the gradients over replicas.

Example:

```python
trainer = Trainer(config, strategy, data, run_dir)
trainer.restore()
weights = trainer.model.trainable_variables
trainer.train(on_evaluate=lambda step, metrics: {"norm": float(tf.linalg.global_norm(weights))})
```
"""

from __future__ import annotations

import functools
import math
import sys
import tempfile
import time
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import summary_pb2

from keras_bn.train.config.settings import TrainConfig
from keras_bn.train.data.pipeline import Data
from keras_bn.train.engine.model import build_model
from keras_bn.train.messages import say
from keras_bn.train.rundir import checkpoints
from keras_bn.train.rundir.folder import RunDir

KEEP_CHECKPOINTS = 3
# Strategies whose step runs on several replicas (collectives): batches come through tf.data.
_REPLICATED = (
    tf.distribute.MirroredStrategy,
    tf.distribute.MultiWorkerMirroredStrategy,
    tf.distribute.TPUStrategy,
)
# What verbose=2 prints of each metrics record, in this order.
_PRINTED = (
    "train_loss train_accuracy eval_loss eval_accuracy eval_top5_accuracy steps_per_sec".split()
)
# The progress bar (verbose=1 on a terminal) shows the metrics under their metrics.jsonl names:
# the loss and accuracy averaged over the bar (one evaluation interval), as there; these two as
# their latest values.
_BAR_LATEST = ["learning_rate", "steps_per_sec"]
_SCALAR_METADATA = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
    data_class=summary_pb2.DATA_CLASS_SCALAR,
).SerializeToString()


def learning_rate_fn(config: TrainConfig, num_train_examples: int, step: tf.Variable):
    """Returns a callable giving the learning rate at the current value of `step`.

    Staircase exponential decay: `lr * rate ** floor(examples_seen / (epochs * N))`.
    """
    lr = config.learning_rate
    if config.lr_decay_epochs <= 0 or config.lr_decay_rate == 1.0:
        return lambda: tf.constant(lr, tf.float32)
    decay_steps = config.lr_decay_epochs * num_train_examples / config.batch_size

    def schedule():
        exponent = tf.floor(tf.cast(step, tf.float64) / decay_steps)
        return tf.cast(
            lr * tf.pow(tf.constant(config.lr_decay_rate, tf.float64), exponent), tf.float32
        )

    return schedule


class Trainer:
    """Trains one model as `config` says, writing into `run_dir`.

    Args:
        config: the resolved configuration.
        strategy: the tf.distribute strategy (global batch split over its replicas).
        data: the input pipelines.
        run_dir: where checkpoints, TensorBoard logs and metrics go.
        model: a model built under `strategy.scope()` (default: `build_model(config, ...)`).
        chief: whether this process writes checkpoints, logs and metrics into `run_dir`
            (False on non-chief multi-worker replicas: they checkpoint into a temporary
            folder and restore from the chief's checkpoints, which must be on a shared file
            system).
        in_memory: False reads the batches through tf.data even where the in-memory path
            applies (the same batches; for comparisons). Default: the in-memory path for
            in-memory data on an unreplicated strategy.
    """

    def __init__(
        self,
        config: TrainConfig,
        strategy: tf.distribute.Strategy,
        data: Data,
        run_dir: RunDir,
        model: keras.Model | None = None,
        chief: bool = True,
        in_memory: bool | None = None,
    ):
        self.config = config
        self.chief = chief
        self.train_seconds = 0.0  # wall time of the last `train()` call
        self.strategy = strategy
        self.data = data
        self.run_dir = run_dir
        with strategy.scope():
            self.model = model if model is not None else build_model(config, data.spec)
            self.step = tf.Variable(
                0,
                dtype=tf.int64,
                trainable=False,
                name="global_step",
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
            )
            self.learning_rate = learning_rate_fn(config, data.spec.num_train_examples, self.step)
            optimizer = keras.optimizers.SGD(
                learning_rate=self.learning_rate, momentum=config.momentum
            )
            if config.mixed_precision == "float16":
                optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
            optimizer.build(self.model.trainable_variables)
            self.optimizer = optimizer
        self.checkpoint = tf.train.Checkpoint(
            model=self.model,
            optimizer=self.optimizer,
            step=self.step,
            # Tracked explicitly: Keras does not expose e.g. seed-generator states to tf.train.
            model_variables=list(self.model.variables),
            optimizer_variables=list(self.optimizer.variables),
        )
        self.manager: tf.train.CheckpointManager | None = None  # made by restore()
        self.saved_step: int | None = None  # the step of the last checkpoint restored or saved
        self._train_fn = None
        self._eval_fn = None
        self._eval_dataset = None
        self._writers: dict[str, Any] = {}
        self._bar = False  # a progress bar, a line per evaluation (`train` decides)
        self._lines = config.verbose == 2
        self._eta = _Eta(0, config.train_steps)
        self._summary_fns: dict[tuple, Any] = {}
        # Batches gathered from in-memory tensors inside one compiled loop per block of steps, or
        # read through tf.data: the same batches in the same order (Data.train_indices).
        self.in_memory = data.in_memory and not isinstance(strategy, _REPLICATED)
        if in_memory is not None:
            self.in_memory = self.in_memory and in_memory
        self.jit_compile = self.in_memory if config.jit_compile is None else config.jit_compile
        if data.in_memory and not self.in_memory and chief and config.verbose:
            say(
                f"Reading batches through tf.data: the in-memory path runs without replication "
                f"(default or one-device strategy), not under {type(strategy).__name__}."
            )

    # State --------------------------------------------------------------------------------

    @property
    def current_step(self) -> int:
        return int(self.step.numpy())

    def restore(self, found: checkpoints.Found | None = None) -> int:
        """Restores the newest checkpoint that loads, if any; returns its step (0 if none).

        Args:
            found: the result of `checkpoints.find_restorable` on the run's checkpoint folder
                (looked up here when omitted).
        """
        if found is None:
            found = checkpoints.find_restorable(self.run_dir.checkpoint_dir)
        if self.chief:
            checkpoints.repair_state(self.run_dir.checkpoint_dir, found)
        self._make_manager()
        if found.path is None:
            return 0
        self.checkpoint.restore(found.path).assert_consumed()
        self.saved_step = self.current_step
        return self.current_step

    def _make_manager(self) -> None:
        # Non-chief workers take part in every save (it may need collectives) into a folder of
        # their own that nobody reads.
        if self.chief:
            directory = str(self.run_dir.checkpoint_dir)
        else:
            self._scratch = tempfile.TemporaryDirectory(prefix="keras-bn-worker-")
            directory = self._scratch.name
        self.manager = tf.train.CheckpointManager(
            self.checkpoint,
            directory,
            max_to_keep=KEEP_CHECKPOINTS,
            checkpoint_name=checkpoints.PREFIX,
        )

    def save(self) -> str:
        """Writes a checkpoint for the current step and reads it back.

        The manager deletes the oldest of its `KEEP_CHECKPOINTS` checkpoints as it writes a new
        one; since every checkpoint is read back right after it is written, the ones deleted
        are always older than at least one checkpoint known to load.

        Raises:
            OSError: if the checkpoint just written does not load.
        """
        if self.manager is None:
            self._make_manager()
        step = self.current_step
        path = self.manager.save(checkpoint_number=step)
        if self.chief:
            reason = checkpoints.unreadable_reason(path)
            if reason is not None:
                raise OSError(f"the checkpoint just written, {path}, does not load: {reason}.")
        self.saved_step = step
        return path

    # Compiled functions -------------------------------------------------------------------

    def _summed(self, replica_step, batch):
        """Runs `replica_step` on every replica and sums its results."""
        per_replica = self.strategy.run(replica_step, args=(batch,))
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    def _replica_train_step(self, batch):
        x, y = batch
        model, optimizer = self.model, self.optimizer
        with tf.GradientTape() as tape:
            logits = tf.cast(model(x, training=True), tf.float32)
            per_example = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=self.config.batch_size)
            if model.losses:
                loss += tf.nn.scale_regularization_loss(
                    tf.add_n([tf.cast(v, tf.float32) for v in model.losses])
                )
            scaled = optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        correct = tf.reduce_sum(
            tf.cast(tf.equal(tf.argmax(logits, -1, tf.int32), tf.cast(y, tf.int32)), tf.float32)
        )
        count = tf.cast(tf.shape(y)[0], tf.float32)
        return tf.stack([tf.reduce_sum(per_example), correct, count])

    def _make_train_fn(self):
        """Compiles one block of training steps; returns `(loss, correct, count)` summed.

        In memory: `fn(indices)` runs one step per row of the `(steps, batch)` example indices,
        gathering each batch inside the loop. Through tf.data: `fn(iterator, steps)`.
        """
        step, replica_step = self.step, self._replica_train_step
        if self.in_memory:
            images, labels = self.data.arrays("train")
            preprocess = self.data.preprocess_batch

            def train_block(indices):
                def body(i, totals):
                    batch = (
                        preprocess(tf.gather(images, indices[i])),
                        tf.gather(labels, indices[i]),
                    )
                    totals += self._summed(replica_step, batch)
                    step.assign_add(1)
                    return i + 1, totals

                n = tf.shape(indices)[0]
                return tf.while_loop(lambda i, _: i < n, body, (0, tf.zeros([3])))[1]

            signature = [tf.TensorSpec([None, self.config.batch_size], tf.int64)]
            return tf.function(train_block, input_signature=signature, jit_compile=self.jit_compile)

        if self.jit_compile:
            replica_step = tf.function(replica_step, jit_compile=True)

        @tf.function
        def train_steps(iterator, n):
            totals = tf.zeros([3])
            for _ in tf.range(n):
                totals += self._summed(replica_step, next(iterator))
                step.assign_add(1)
            return totals

        return train_steps

    def _replica_eval_step(self, batch):
        x, y = batch
        logits = tf.cast(self.model(x, training=False), tf.float32)
        y = tf.cast(y, tf.int32)
        per_example = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
        top1 = tf.cast(tf.equal(tf.argmax(logits, -1, tf.int32), y), tf.float32)
        k = min(5, self.data.spec.num_classes)
        top5 = tf.cast(tf.math.in_top_k(y, logits, k), tf.float32)
        count = tf.cast(tf.shape(y)[0], tf.float32)
        return tf.stack(
            [tf.reduce_sum(per_example), tf.reduce_sum(top1), tf.reduce_sum(top5), count]
        )

    def _make_eval_fn(self):
        replica_step = self._replica_eval_step
        if self.in_memory:
            images, labels = self.data.arrays("eval")
            preprocess = self.data.preprocess_batch
            size = self.config.evaluation_batch_size
            count = int(labels.shape[0])
            count = min(count, self.config.eval_limit or count)
            full = count // size

            @tf.function(jit_compile=self.jit_compile)
            def summed(x, y):  # (batches, size, ...): one evaluation batch per row
                def body(i, totals):
                    return i + 1, totals + self._summed(replica_step, (preprocess(x[i]), y[i]))

                return tf.while_loop(lambda i, _: i < tf.shape(x)[0], body, (0, tf.zeros([4])))[1]

            # The batches of `Data.eval_dataset`, summed in the same order: the full ones in
            # one loop, then the smaller last one (a second, static shape).
            blocks = [(images[: full * size], labels[: full * size], full)]
            if count > full * size:
                blocks.append((images[full * size : count], labels[full * size : count], 1))
            blocks = [
                (tf.reshape(x, [k, -1, *x.shape[1:]]), tf.reshape(y, [k, -1]))
                for x, y, k in blocks
                if k
            ]
            return lambda: functools.reduce(tf.add, [summed(x, y) for x, y in blocks])

        @tf.function
        def evaluate(dataset):
            totals = tf.zeros([4])
            for batch in dataset:
                totals += self._summed(replica_step, batch)
            return totals

        return evaluate

    # Evaluation ---------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Evaluates on the evaluation split; returns loss, accuracy (and top-5 accuracy)."""
        if self._eval_fn is None:
            self._eval_fn = self._make_eval_fn()
            if not self.in_memory:
                static_shapes = isinstance(self.strategy, tf.distribute.TPUStrategy)
                self._eval_dataset = self.strategy.experimental_distribute_dataset(
                    self.data.eval_dataset(drop_remainder=static_shapes)
                )
        args = () if self.in_memory else (self._eval_dataset,)
        loss, top1, top5, count = self._eval_fn(*args).numpy().tolist()
        if count == 0:
            raise ValueError("the evaluation split is empty.")
        result = {"eval_loss": loss / count, "eval_accuracy": top1 / count}
        if self.data.spec.num_classes > 10:
            result["eval_top5_accuracy"] = top5 / count
        return result

    # Training -----------------------------------------------------------------------------

    def _summaries(self, name: str, step: int, values: dict[str, float]) -> None:
        if not self.chief:
            return
        tags = tuple(key.removeprefix(f"{name}_") for key in values)
        if (name, tags) not in self._summary_fns:  # one compiled call per record: it is cheaper
            if name not in self._writers:
                path = str(self.run_dir.tensorboard_dir / name)
                self._writers[name] = tf.summary.create_file_writer(path)
            writer = self._writers[name]

            @tf.function
            def write(step, values):
                with writer.as_default(step=step):
                    for i, tag in enumerate(tags):
                        # tf.summary.write + scalar metadata: TensorBoard's format without
                        # needing the tensorboard package (tf.summary.scalar does).
                        tf.summary.write(tag, values[i], metadata=_SCALAR_METADATA)

            self._summary_fns[(name, tags)] = write
        self._summary_fns[(name, tags)](
            tf.constant(step, tf.int64), tf.constant(list(values.values()), tf.float32)
        )

    def train(self, on_checkpoint=None, on_evaluate=None) -> dict[str, Any]:
        """Trains from the current step to `config.train_steps`.

        Evaluates every `eval_every` steps and at the end, checkpoints every
        `checkpoint_interval` steps and at the end, logs to TensorBoard and metrics.jsonl.

        Args:
            on_checkpoint: called with the step after each checkpoint is written.
            on_evaluate: called as `on_evaluate(step, eval_metrics)` after each evaluation,
                with the model as trained to that step; the dict of floats it returns joins
                that step's metrics record (metrics.jsonl, TensorBoard's eval folder). This is
                how an experiment records what it needs between evaluation blocks.

        Returns:
            The metrics record of the final step.
        """
        c = self.config
        start = step = self.current_step
        record = self._begin(start)
        t_start = time.perf_counter()
        run_chunk = self._chunk_runner(start) if step < c.train_steps else None
        progbar = None
        while step < c.train_steps:
            if progbar is None and self._bar:  # one bar per evaluation interval
                progbar = self._new_bar(step)
            chunk = min(c.steps_per_loop, self._next_boundary(step) - step)
            values = run_chunk(step, chunk)
            step += chunk
            self._summaries("train", step, values)
            if progbar is not None:
                progbar.update(step - self._interval.start_step, list(values.items()))
            if step % c.eval_every == 0 or step == c.train_steps:
                record = self._evaluate_and_record(step, progbar, on_evaluate)
                progbar = None
            if step % c.checkpoint_interval == 0 or step == c.train_steps:
                self.save()
                if on_checkpoint is not None:
                    on_checkpoint(step)
        if record is None or record["step"] != step:
            record = self._evaluate_and_record(step, None, on_evaluate)
        for writer in self._writers.values():
            writer.flush()
        self.train_seconds = time.perf_counter() - t_start
        return record

    def _begin(self, start: int) -> dict[str, Any] | None:
        """Prepares a `train` call from `start`; returns the metrics record of `start`, if any."""
        c = self.config
        checkpoints.check_not_past(start, c.train_steps, self.run_dir.path)
        if self.chief:
            self.run_dir.truncate_metrics(start)
        self._interval = _Interval(start)
        # A progress bar redraws itself with control characters: only on a terminal. Elsewhere
        # (a log file) verbose=1 prints verbose=2's line per evaluation.
        self._bar = c.verbose == 1 and self.chief and sys.stdout.isatty()
        self._lines = c.verbose == 2 or (c.verbose == 1 and self.chief and not self._bar)
        self._eta = _Eta(start, c.train_steps)
        return next((r for r in self.run_dir.metrics() if r["step"] == start), None)

    def _chunk_runner(self, start: int):
        """`run(step, chunk)`: trains `chunk` steps from `step`; returns their training metrics."""
        if self._train_fn is None:
            self._train_fn = self._make_train_fn()
        if not self.in_memory:
            iterator = iter(
                self.strategy.experimental_distribute_dataset(
                    self.data.train_dataset(start_step=start)
                )
            )

        def run(step: int, chunk: int) -> dict[str, float]:
            chunk_start = time.perf_counter()
            if self.in_memory:
                totals = self._train_fn(tf.constant(self.data.train_indices(step, chunk)))
            else:
                totals = self._train_fn(iterator, tf.constant(chunk, tf.int64))
            totals = totals.numpy()
            rate = chunk / max(time.perf_counter() - chunk_start, 1e-9)
            self._interval.totals += totals
            return {
                "train_loss": float(totals[0] / totals[2]),
                "train_accuracy": float(totals[1] / totals[2]),
                "learning_rate": float(self.learning_rate()),
                "steps_per_sec": rate,
            }

        return run

    def _new_bar(self, step: int) -> keras.utils.Progbar:
        c = self.config
        target = min(c.train_steps, (step // c.eval_every + 1) * c.eval_every)
        say(f"Steps {step}-{target} of {c.train_steps}{self._eta.text(step)}")
        return keras.utils.Progbar(target - step, unit_name="step", stateful_metrics=_BAR_LATEST)

    def _next_boundary(self, step: int) -> int:
        """The next step at which to evaluate, checkpoint or stop."""
        c = self.config
        return min(
            c.train_steps,
            (step // c.eval_every + 1) * c.eval_every,
            (step // c.checkpoint_interval + 1) * c.checkpoint_interval,
        )

    def _evaluate_and_record(self, step: int, progbar, on_evaluate=None) -> dict[str, Any]:
        c = self.config
        values = self.evaluate()
        if on_evaluate is not None:
            values.update(on_evaluate(step, dict(values)) or {})
        self._summaries("eval", step, values)
        record = {
            "step": step,
            "epoch": step * c.batch_size / self.data.spec.num_train_examples,
            "learning_rate": float(self.learning_rate()),
            **self._interval.train_metrics(),
            **values,
            **self._interval.speed(step),
            "wall_time": time.time(),
        }
        if progbar is not None:
            progbar.update(
                step - self._interval.start_step,
                list(values.items()),
                finalize=True,
            )
        elif self._lines:
            say(_format_record(record) + self._eta.text(step))
        if self.chief:
            self.run_dir.append_metrics(record)
        self._interval = _Interval(step)
        return record


class _Eta:
    """The time left for the whole run, from the rate since this process started training."""

    def __init__(self, start_step: int, train_steps: int):
        self.start_step, self.train_steps = start_step, train_steps
        self.started = time.perf_counter()

    def text(self, step: int) -> str:
        done, left = step - self.start_step, self.train_steps - step
        if done <= 0 or left <= 0:
            return ""
        seconds = int(left * (time.perf_counter() - self.started) / done)
        return f" - run ETA {seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _Interval:
    """Training loss/accuracy sums and timing since the last evaluation."""

    def __init__(self, step: int):
        self.start_step = step
        self.start_time = time.perf_counter()
        self.totals = np.zeros(3)

    def train_metrics(self) -> dict[str, float]:
        loss, correct, count = self.totals
        if not count:
            return {}
        return {"train_loss": float(loss / count), "train_accuracy": float(correct / count)}

    def speed(self, step: int) -> dict[str, float]:
        seconds = time.perf_counter() - self.start_time
        done = step - self.start_step
        if not done or seconds <= 0:
            return {}
        return {"steps_per_sec": done / seconds, "examples_per_sec": self.totals[2] / seconds}


def _format_record(record: dict[str, Any]) -> str:
    parts = [f"step {record['step']}"]
    for key in _PRINTED:
        value = record.get(key)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            parts.append(f"{key} {value:.4f}")
    return " - ".join(parts)
