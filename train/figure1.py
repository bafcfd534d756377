"""Figure 1 of the paper: the MNIST net with and without Batch Normalization, from one call.

`run_figure1` trains the paper's section 4.1 network (784 -> 3 x 100 sigmoid -> 10, batch 60,
50,000 steps) twice, as the baseline and with BN before every hidden sigmoid, with the same
optimizer, learning rate, initial weights and batch order. Every `eval_every` steps it records

- the test accuracy on the full 10,000-image test set (Figure 1(a)); the BN net is evaluated
  in inference mode with its moving averages, which the paper allows for tracking accuracy
  during training (they lag behind the weights in the first few hundred steps);
- the 15th, 50th and 85th percentiles of the input of one fixed sigmoid of the last hidden
  layer (unit `percentile_unit` of `hidden3`) over a fixed batch, the first
  `percentile_examples` test images, in training mode (Figure 1(b, c)). For the BN net this is
  the training network N_BN^tr: `gamma * x_hat + beta` with the statistics of that fixed batch.
  It is computed with `stateless_call`, so it never moves the BN layers' moving statistics.

At the end, if `keras_bn.recompute_population_statistics` is available, the BN net's moving
statistics are replaced by exact population statistics (Alg. 2, one epoch of training batches)
and its test accuracy is reported once more.

Speed: the data live in memory as tensors, batch order is a precomputed list of shuffled
epochs, and `eval_every` SGD steps run as ONE XLA-compiled `tf.while_loop` call, so Python and
TensorFlow dispatch cost once per evaluation, not once per step.

Outputs in `output_dir` (each written to a temporary file first and renamed into place, and
only after both nets have trained, so a failed run leaves no partial output):
`figure1.png` (three panels as the paper's Figure 1), `figure1.json` and `figure1.csv` (the
curves), `summary.md` (final accuracies, wall time, settings).

Example:

```python
from keras_bn.train.figure1 import run_figure1

result = run_figure1("runs/figure1")
print(result["baseline_test_accuracy"], result["bn_test_accuracy"], result["figure"])
```

Reference:
    Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing
    Internal Covariate Shift", ICML 2015, section 4.1 and Figure 1.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import pathlib
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

# The percentiles of Figure 1(b, c), recorded at step 0 and after every `eval_every` steps.
PERCENTILES = (15, 50, 85)
# Plain SGD with one learning rate for both nets and the spec's "small Gaussian" init
# (spec section 2.2; the paper states neither). docs/figure1_summary.md has the sweep over
# both: BN ends above the baseline at every setting tried, by 1.3-1.4 points at these.
DEFAULT_LEARNING_RATE = 0.5
DEFAULT_INIT_STDDEV = 0.01
NETS = ("baseline", "bn")
# "Trains faster": the first evaluated step at which the test accuracy reaches this.
MILESTONE_ACCURACY = 0.95
_OUTPUT_FILES = ("figure1.png", "figure1.json", "figure1.csv", "summary.md")


def run_figure1(
    output_dir,
    *,
    steps=50000,
    batch_size=60,
    eval_every=500,
    learning_rate=DEFAULT_LEARNING_RATE,
    seed=0,
    binarize=True,
    verbose=1,
    init_stddev=DEFAULT_INIT_STDDEV,
    percentile_examples=1000,
    percentile_unit=0,
    population_statistics=True,
):
    """Reproduces the paper's Figure 1 and writes the figure, curves and a summary.

    Both nets are `keras_bn.models.get("mlp", batch_norm=..., seed=seed,
    init_stddev=init_stddev)`; with the same seed their weight matrices start equal, and
    they see the same batches in the same order. Loss: softmax cross-entropy on the logits.
    Optimizer: `keras.optimizers.SGD(learning_rate)`, no momentum, no decay.

    Args:
        output_dir: folder for the outputs; created if missing. Existing outputs of an
            earlier run are replaced (atomically, file by file) only when this run succeeds.
        steps: int, SGD steps per net (the paper: 50,000). A multiple of `eval_every`.
        batch_size: int >= 2, examples per step (the paper: 60). BN needs at least 2.
        eval_every: int, steps between two evaluations; also the number of steps run by one
            compiled call.
        learning_rate: float > 0, the SGD learning rate, the same for both nets.
        seed: int >= 0; fixes the initial weights and the batch order.
        binarize: bool, the paper's binary inputs (`pixel / 255 > 0.5`); False gives
            `pixel / 255` in [0, 1].
        verbose: 0 silent; 1 a log line at every 10% of each net's training; 2 a line at every
            evaluation. Lines show steps/s and the ETA of the whole experiment.
        init_stddev: float > 0, std of the Gaussian initialization of every weight matrix.
        percentile_examples: int in [2, 10000], size of the fixed batch (the first test images)
            over which the sigmoid-input percentiles are taken.
        percentile_unit: int, which unit of the last hidden layer is the "typical sigmoid".
        population_statistics: bool; at the end also evaluate the BN net with exact
            population statistics (Alg. 2) when `keras_bn.recompute_population_statistics`
            exists.

    Returns:
        A dict with `"baseline_test_accuracy"`, `"bn_test_accuracy"` (final, moving averages),
        `"bn_test_accuracy_population"` (final, Alg. 2; None if not computed),
        `"wall_time_s"` (the whole call), `"train_time_s"` (per net), `"figure"`, `"json"`,
        `"csv"`, `"summary"` (paths of the outputs), and `"curves"` (the dict saved as JSON).

    Raises:
        ValueError: an argument is out of range or of the wrong type.
    """
    start = time.perf_counter()
    config = _validate(
        steps=steps,
        batch_size=batch_size,
        eval_every=eval_every,
        learning_rate=learning_rate,
        seed=seed,
        binarize=binarize,
        verbose=verbose,
        init_stddev=init_stddev,
        percentile_examples=percentile_examples,
        percentile_unit=percentile_unit,
        population_statistics=population_statistics,
    )
    output_dir = pathlib.Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"`output_dir` {str(output_dir)!r} exists and is not a folder.")

    import tensorflow as tf

    from keras_bn.train.mnist_files import load_mnist

    x_train, y_train = _prepare(*load_mnist("train"), binarize)
    x_test, y_test = _prepare(*load_mnist("test"), binarize)
    indices = batch_indices(steps, batch_size, len(x_train), seed)
    data = {
        "x_train": tf.constant(x_train),
        "y_train": tf.constant(y_train),
        "x_test": tf.constant(x_test),
        "y_test": tf.constant(y_test),
        "x_fixed": tf.constant(x_test[:percentile_examples]),
    }
    log = _Logger(verbose, total_steps=len(NETS) * steps)
    log.line(
        f"figure1: 2 nets x {steps} steps, batch {batch_size}, SGD lr {learning_rate}, "
        f"init N(0, {init_stddev}^2), eval every {eval_every} steps on {len(x_test)} test images"
    )
    nets = {}
    for name in NETS:
        nets[name] = _train_net(name, config, data, indices, log)

    population_accuracy = None
    if population_statistics:
        population_accuracy = _population_accuracy(nets["bn"], data, indices, batch_size)

    curves = {
        "steps": [i * eval_every for i in range(steps // eval_every + 1)],
        "percentiles": list(PERCENTILES),
        "config": config,
        "environment": _environment(),
    }
    for name in NETS:
        curves[name] = nets[name]["curves"]
    curves["bn"]["final_test_accuracy_population"] = population_accuracy
    curves["wall_time_s"] = time.perf_counter() - start  # rewritten below, with the writing
    paths = _write_outputs(output_dir, curves, start)

    result = {
        "baseline_test_accuracy": curves["baseline"]["final_test_accuracy"],
        "bn_test_accuracy": curves["bn"]["final_test_accuracy"],
        "bn_test_accuracy_population": population_accuracy,
        "wall_time_s": curves["wall_time_s"],
        "train_time_s": {name: curves[name]["train_time_s"] for name in NETS},
        "curves": curves,
        **paths,
    }
    pop = "" if population_accuracy is None else f" ({population_accuracy:.4f} Alg. 2)"
    log.line(
        f"figure1: test accuracy baseline {result['baseline_test_accuracy']:.4f}, "
        f"BN {result['bn_test_accuracy']:.4f}{pop}; wall time {result['wall_time_s']:.0f} s; "
        f"wrote {paths['figure']}, {paths['json']}, {paths['csv']}, {paths['summary']}"
    )
    return result


# ------------------------------------------------------------------------------ arguments


def _is_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_int(name, value, minimum, maximum=None):
    if not _is_int(value) or value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"`{name}` must be an int {bound}; received {value!r}.")
    return int(value)


def _check_positive_float(name, value):
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.floating, np.integer))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"`{name}` must be a finite number > 0; received {value!r}.")
    return float(value)


def _validate(**kwargs):
    """Checks every argument of `run_figure1`; returns them as plain JSON-able values."""
    config = {}
    config["steps"] = _check_int("steps", kwargs["steps"], 1)
    config["eval_every"] = _check_int("eval_every", kwargs["eval_every"], 1)
    if config["steps"] % config["eval_every"]:
        fixed = max(1, config["steps"] // config["eval_every"]) * config["eval_every"]
        raise ValueError(
            f"`steps` ({config['steps']}) must be a multiple of `eval_every` "
            f"({config['eval_every']}); e.g. steps={fixed}."
        )
    config["batch_size"] = _check_int("batch_size", kwargs["batch_size"], 2, 60000)
    config["learning_rate"] = _check_positive_float("learning_rate", kwargs["learning_rate"])
    config["seed"] = _check_int("seed", kwargs["seed"], 0, 2**31 - 1)
    config["init_stddev"] = _check_positive_float("init_stddev", kwargs["init_stddev"])
    for flag in ("binarize", "population_statistics"):
        if not isinstance(kwargs[flag], (bool, np.bool_)):
            raise ValueError(f"`{flag}` must be a bool; received {kwargs[flag]!r}.")
        config[flag] = bool(kwargs[flag])
    if kwargs["verbose"] not in (0, 1, 2) or isinstance(kwargs["verbose"], bool):
        raise ValueError(f"`verbose` must be 0, 1 or 2; received {kwargs['verbose']!r}.")
    config["verbose"] = int(kwargs["verbose"])
    config["percentile_examples"] = _check_int(
        "percentile_examples", kwargs["percentile_examples"], 2, 10000
    )
    # The zoo's hidden layers have 100 units; the builder is asked for exactly that below.
    config["percentile_unit"] = _check_int("percentile_unit", kwargs["percentile_unit"], 0, 99)
    return config


# ----------------------------------------------------------------------------------- data


def _prepare(images, labels, binarize):
    """uint8 (N, 28, 28) -> float32 (N, 784), binary (pixel / 255 > 0.5) or scaled to [0, 1]."""
    x = images.reshape(len(images), -1)
    x = (x > 127.5) if binarize else x / 255.0
    return x.astype(np.float32), labels.astype(np.int32)


def batch_indices(steps, batch_size, num_examples, seed):
    """Example indices of every training step: shuffled epochs, one after another.

    Every example is used once per epoch; a batch may straddle two epochs when `num_examples`
    is not a multiple of `batch_size`. Depends only on the arguments (NumPy PCG64).

    Args:
        steps: number of steps.
        batch_size: examples per step.
        num_examples: size of the training set.
        seed: int seed of the shuffling.

    Returns:
        int32 array `(steps, batch_size)`.

    Example:

    >>> batch_indices(3, 2, 4, seed=0).shape
    (3, 2)
    """
    rng = np.random.default_rng(seed)
    total = steps * batch_size
    epochs = -(-total // num_examples)
    order = np.concatenate([rng.permutation(num_examples) for _ in range(epochs)])
    return order[:total].reshape(steps, batch_size).astype(np.int32)


def first_step_at(accuracies, eval_every, threshold):
    """The first evaluated step whose accuracy is >= `threshold`, or None if none is.

    Example:

    >>> first_step_at([0.1, 0.5, 0.96, 0.97], 500, 0.95)
    1000
    """
    for i, accuracy in enumerate(accuracies):
        if accuracy >= threshold:
            return i * eval_every
    return None


def percentiles(values):
    """The 15th, 50th and 85th percentiles (linear interpolation) of a 1-D array."""
    return [float(p) for p in np.percentile(np.asarray(values, np.float64), PERCENTILES)]


# ------------------------------------------------------------------------------- training


def build_net(name, config):
    """Builds the baseline (`name="baseline"`) or BN (`"bn"`) net from the zoo."""
    from keras_bn import models

    return models.get(
        "mlp",
        batch_norm=name == "bn",
        hidden_units=(100, 100, 100),
        init_stddev=config["init_stddev"],
        seed=config["seed"],
    )


def make_step_functions(model, data, percentile_unit, learning_rate):
    """Compiles the three functions one net needs.

    Args:
        model: a zoo `mlp`.
        data: dict of tensors `x_train, y_train, x_test, y_test, x_fixed`.
        percentile_unit: unit of the last hidden layer whose sigmoid input is recorded.
        learning_rate: SGD learning rate.

    Returns:
        `(train_chunk, evaluate, sigmoid_input)`: `train_chunk(indices)` runs one SGD step per
        row of the int32 `(k, batch)` tensor and returns the mean training loss;
        `evaluate()` returns the test accuracy in inference mode; `sigmoid_input()` returns
        the fixed unit's sigmoid input over `x_fixed` in training mode, without moving any
        statistics.
    """
    import keras
    import tensorflow as tf

    from keras_bn.models.mlp import preactivation_model

    optimizer = keras.optimizers.SGD(learning_rate)
    variables = model.trainable_variables
    optimizer.build(variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    x_train, y_train = data["x_train"], data["y_train"]

    @tf.function(jit_compile=True)
    def train_chunk(indices):
        def body(i, total):
            x = tf.gather(x_train, indices[i])
            y = tf.gather(y_train, indices[i])
            with tf.GradientTape() as tape:
                loss = loss_fn(y, model(x, training=True))
                if model.losses:
                    loss = loss + tf.add_n(model.losses)
            optimizer.apply(tape.gradient(loss, variables), variables)
            return i + 1, total + tf.cast(loss, tf.float32)

        count = tf.shape(indices)[0]
        _, total = tf.while_loop(lambda i, _: i < count, body, (tf.constant(0), tf.constant(0.0)))
        return total / tf.cast(count, tf.float32)

    @tf.function(jit_compile=True)
    def evaluate():
        logits = model(data["x_test"], training=False)
        predicted = tf.argmax(logits, axis=-1, output_type=tf.int32)
        return tf.reduce_mean(tf.cast(tf.equal(predicted, data["y_test"]), tf.float32))

    preactivations = preactivation_model(model)

    @tf.function
    def sigmoid_input():
        # stateless_call: training-mode BN (batch statistics of x_fixed) whose moving-statistics
        # updates are returned and dropped instead of assigned.
        outputs, _ = preactivations.stateless_call(
            [v.value for v in preactivations.trainable_variables],
            [v.value for v in preactivations.non_trainable_variables],
            data["x_fixed"],
            training=True,
        )
        return outputs[-1][:, percentile_unit]

    return train_chunk, evaluate, sigmoid_input


def _bn_momentum(model):
    """The momentum of the BN layers, or a list if they differ."""
    momenta = sorted(
        {getattr(layer, "momentum", None) for layer in model.layers if "_bn" in layer.name},
        key=str,
    )
    return momenta[0] if len(momenta) == 1 else momenta


def _train_net(name, config, data, indices, log):
    import tensorflow as tf

    model = build_net(name, config)
    train_chunk, evaluate, sigmoid_input = make_step_functions(
        model, data, config["percentile_unit"], config["learning_rate"]
    )
    steps, eval_every = config["steps"], config["eval_every"]
    evals = steps // eval_every
    record = {
        "test_accuracy": [],
        "train_loss": [None],  # no training loss before the first step
        "sigmoid_input_percentiles": {f"p{p}": [] for p in PERCENTILES},
    }

    def observe():
        record["test_accuracy"].append(float(evaluate()))
        for p, value in zip(PERCENTILES, percentiles(sigmoid_input().numpy()), strict=True):
            record["sigmoid_input_percentiles"][f"p{p}"].append(value)

    observe()
    start = time.perf_counter()
    every = 1 if config["verbose"] == 2 else max(1, evals // 10)
    for k in range(evals):
        loss = float(train_chunk(tf.constant(indices[k * eval_every : (k + 1) * eval_every])))
        if k == 0:
            log.compiled(eval_every, time.perf_counter() - start)
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"figure1: the {name} net's training loss is {loss} at step "
                f"{(k + 1) * eval_every}; lower `learning_rate` ({config['learning_rate']})."
            )
        record["train_loss"].append(loss)
        observe()
        if (k + 1) % every == 0 or k + 1 == evals:
            log.progress(name, (k + 1) * eval_every, steps, time.perf_counter() - start, record)
    log.finish_net(steps)
    record["train_time_s"] = time.perf_counter() - start
    record["steps_per_s"] = steps / record["train_time_s"]
    record["final_test_accuracy"] = record["test_accuracy"][-1]
    best = int(np.argmax(record["test_accuracy"]))
    record["best_test_accuracy"] = record["test_accuracy"][best]
    record["best_step"] = best * eval_every
    record["first_step_at_milestone"] = first_step_at(
        record["test_accuracy"], eval_every, MILESTONE_ACCURACY
    )
    if name == "bn":
        record["bn_momentum"] = _bn_momentum(model)
    return {"model": model, "curves": record}


def _population_accuracy(net, data, indices, batch_size):
    """Test accuracy of the BN net after Alg. 2 over one epoch of its own training batches."""
    import tensorflow as tf

    import keras_bn

    recompute = getattr(keras_bn, "recompute_population_statistics", None)
    if recompute is None:
        return None
    model = net["model"]
    x_train = data["x_train"].numpy()
    # The last epoch's worth of the net's own training batches, as numpy arrays.
    batches = indices[-min(len(indices), -(-len(x_train) // batch_size)) :]
    recompute(model, (x_train[idx] for idx in batches), steps=len(batches), verbose=0)
    logits = model(data["x_test"], training=False)
    predicted = tf.argmax(logits, axis=-1, output_type=tf.int32)
    return float(tf.reduce_mean(tf.cast(tf.equal(predicted, data["y_test"]), tf.float32)))


# -------------------------------------------------------------------------------- logging


class _Logger:
    """Progress lines with steps/s and the ETA of the whole experiment (both nets)."""

    def __init__(self, verbose, total_steps):
        self.verbose = verbose
        self.total_steps = total_steps
        self.done_steps = 0
        self.first_chunk = (0, 0.0)

    def line(self, text):
        if self.verbose:
            print(text, flush=True)

    def compiled(self, steps, elapsed):
        """Marks the end of the first (compiling) chunk, left out of the steps/s rate."""
        self.first_chunk = (steps, elapsed)

    def progress(self, name, step, steps, elapsed, record):
        first_steps, first_elapsed = self.first_chunk
        if step > first_steps:
            rate = (step - first_steps) / max(elapsed - first_elapsed, 1e-9)
        else:
            rate = step / max(elapsed, 1e-9)
        remaining = self.total_steps - self.done_steps - step
        p = record["sigmoid_input_percentiles"]
        self.line(
            f"figure1 [{name:>8}] step {step:>{len(str(steps))}}/{steps} "
            f"loss {record['train_loss'][-1]:.4f} test acc {record['test_accuracy'][-1]:.4f} "
            f"sigmoid input p15/50/85 {p['p15'][-1]:+.2f}/{p['p50'][-1]:+.2f}/"
            f"{p['p85'][-1]:+.2f} | {rate:.0f} steps/s, ETA {remaining / rate:.0f} s"
        )

    def finish_net(self, steps):
        self.done_steps += steps


# -------------------------------------------------------------------------------- outputs


def _environment():
    import keras
    import tensorflow as tf

    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }


def curves_csv(curves):
    """The curves as CSV text: one row per evaluation step, one column per series."""
    columns = ["step"]
    series = []
    for name in NETS:
        columns += [f"{name}_test_accuracy", f"{name}_train_loss"]
        series += [curves[name]["test_accuracy"], curves[name]["train_loss"]]
        for p in PERCENTILES:
            columns.append(f"{name}_sigmoid_input_p{p}")
            series.append(curves[name]["sigmoid_input_percentiles"][f"p{p}"])
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for i, step in enumerate(curves["steps"]):
        writer.writerow([step] + ["" if s[i] is None else repr(s[i]) for s in series])
    return out.getvalue()


def summary_markdown(curves):
    """summary.md: the final accuracies, timings and every setting of the run."""
    c = curves["config"]

    def milestone(record):
        step = record["first_step_at_milestone"]
        return "never" if step is None else str(step)

    rows = []
    for name, label in (("baseline", "Baseline (no BN)"), ("bn", "BN")):
        r = curves[name]
        rows.append(
            f"| {label} | {r['final_test_accuracy']:.4f} | {r['best_test_accuracy']:.4f} "
            f"(step {r['best_step']}) | {milestone(r)} | {r['train_time_s']:.1f} | "
            f"{r['steps_per_s']:.0f} |"
        )
    pop = curves["bn"].get("final_test_accuracy_population")
    pop_line = (
        "not computed (`population_statistics=False` or "
        "`keras_bn.recompute_population_statistics` unavailable)"
        if pop is None
        else f"{pop:.4f}"
    )
    env = curves["environment"]
    inputs = "binarized (pixel / 255 > 0.5)" if c["binarize"] else "pixel / 255"
    return "\n".join(
        [
            "# Figure 1: MNIST, 3 x 100 sigmoid, with and without Batch Normalization",
            "",
            f"Test accuracy on the 10,000 MNIST test images after {c['steps']} steps:",
            "",
            f"| Net | Final test accuracy | Best test accuracy | First step at "
            f">= {MILESTONE_ACCURACY:.0%} | Training time (s) | Steps/s |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            f"- BN net with exact population statistics (Alg. 2, one epoch of training "
            f"batches): {pop_line}.",
            f"- Total wall time (data, compilation, both nets, evaluations, outputs): "
            f"{curves['wall_time_s']:.1f} s.",
            "",
            "## Settings",
            "",
            f"- Nets: `keras_bn.models.get('mlp', batch_norm=False|True)`: 784 -> 3 x 100 "
            f"sigmoid -> 10 logits; BN net: Dense (no bias) -> keras_bn.BatchNormalization "
            f"(momentum {curves['bn'].get('bn_momentum')}) -> sigmoid.",
            f"- Init: every weight matrix N(0, {c['init_stddev']}^2), seed {c['seed']} (both "
            f"nets start from the same weight matrices); biases, beta 0; gamma 1.",
            f"- Data: packaged MNIST, {inputs}; "
            f"shuffled epochs (NumPy seed {c['seed']}), the same batch order for both nets.",
            f"- Training: {c['steps']} steps of plain SGD (no momentum, no decay), learning rate "
            f"{c['learning_rate']} for both nets, batch {c['batch_size']}, softmax "
            f"cross-entropy.",
            f"- Test accuracy: every {c['eval_every']} steps on all 10,000 test images, in "
            f"inference mode (BN net: moving averages of the batch statistics).",
            f"- Figure 1(b, c): 15th/50th/85th percentiles of the input of sigmoid unit "
            f"{c['percentile_unit']} of the last hidden layer (`hidden3`) over the first "
            f"{c['percentile_examples']} test images, in training mode (BN net: "
            f"`gamma * x_hat + beta` with the batch statistics of those images; moving "
            f"statistics untouched).",
            f"- Environment: Python {env['python']}, TensorFlow {env['tensorflow']}, Keras "
            f"{env['keras']}, {env['cpu_count']} CPUs ({env['machine']}).",
            "",
            "Produced by `keras_bn.train.figure1.run_figure1` with "
            + ", ".join(f"{k}={v!r}" for k, v in c.items())
            + ".",
            "",
        ]
    )


def _write_outputs(output_dir, curves, start):
    """Writes all outputs into a temporary folder, then renames them into `output_dir`."""
    from keras_bn.train.figure1_plot import plot_figure1

    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".figure1-", dir=output_dir))
    try:
        plot_figure1(curves, tmp / "figure1.png")
        (tmp / "figure1.csv").write_text(curves_csv(curves))
        curves["wall_time_s"] = time.perf_counter() - start
        (tmp / "figure1.json").write_text(json.dumps(curves, indent=1) + "\n")
        (tmp / "summary.md").write_text(summary_markdown(curves))
        for filename in _OUTPUT_FILES:
            os.replace(tmp / filename, output_dir / filename)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "figure": str(output_dir / "figure1.png"),
        "json": str(output_dir / "figure1.json"),
        "csv": str(output_dir / "figure1.csv"),
        "summary": str(output_dir / "summary.md"),
    }


if __name__ == "__main__":  # pragma: no cover - convenience: python -m keras_bn.train.figure1 DIR
    run_figure1(sys.argv[1] if len(sys.argv) > 1 else "runs/figure1")
