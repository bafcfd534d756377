"""Figure 1 of the paper (section 4.1): the MNIST net trained with and without BN, side by side.

A module of its own because the figure records what a training run does not: at every
evaluation, the 15th/50th/85th percentiles of one last-layer sigmoid input over a fixed batch,
in training mode (the paper's N_BN^tr), computed with `stateless_call` so the moving statistics
never move. Everything else is the trainer's: both nets are ordinary runs (presets
`mnist_baseline`, `mnist_bn`) with the same initial weights and batch order, trained by
`keras_bn.train.engine.run.train`, so they checkpoint and resume; the percentiles join each
run's metrics.jsonl, so a resumed net reads its whole curve back.

Decisions: accuracy is tracked with the moving averages (the paper allows it; they lag in the
first few hundred steps), and once more at the end with exact population statistics (Alg. 2).
Outputs are published only after both nets have trained, so a failure leaves none half-written.

Example (the command line is `keras-bn-train --experiment=figure1 --model_dir=runs/figure1`)::

    from keras_bn.train.experiments.figure1 import run_figure1

    result = run_figure1("/tmp/fig1", steps=200, eval_every=100, runs_dir="/tmp/fig1")
    print(result["baseline_test_accuracy"], result["bn_test_accuracy"], result["figure"])
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import pathlib
import tempfile
import time
import typing

import numpy as np

from keras_bn.train.config import presets
from keras_bn.train.config.settings import setting
from keras_bn.train.experiments.results import environment, first_step_at
from keras_bn.train.messages import say
from keras_bn.train.rundir.folder import publish

# The percentiles of Figure 1(b, c), recorded at step 0 and after every `eval_every` steps.
PERCENTILES = (15, 50, 85)
# Plain SGD with one learning rate for both nets (the paper changes only BN) and a "small
# random Gaussian" init (section 4.1; the paper states neither the optimizer nor the scale).
# docs/figure1_summary.md has the sweep over both: BN ends above the baseline at every setting
# tried, by 1.3-1.4 points at these.
# The recipe is the presets' (`mnist_bn`, `mnist_baseline`), written there once.
_RECIPE = presets.PRESETS["mnist_bn"].values
DEFAULT_LEARNING_RATE = _RECIPE["learning_rate"]
DEFAULT_INIT_STDDEV = _RECIPE["model_kwargs"]["init_stddev"]
NETS = ("baseline", "bn")
# "Trains faster": the first evaluated step at which the test accuracy reaches this.
MILESTONE_ACCURACY = 0.95
# run_figure1's result key -> file written into output_dir.
_OUTPUTS = {
    "figure": "figure1.png",
    "json": "figure1.json",
    "csv": "figure1.csv",
    "summary": "summary.md",
}


def _int(low, high=None):
    bound = f">= {low}" if high is None else f"in [{low}, {high}]"
    return (lambda v: _is_int(v) and low <= v and (high is None or v <= high), f"an int {bound}")


def _is_int(value):
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


_POSITIVE_NUMBER = (
    lambda v: (
        isinstance(v, int | float | np.integer | np.floating)
        and not isinstance(v, bool)
        and math.isfinite(v)
        and v > 0
    ),
    "a finite number > 0",
)
_BOOL = (lambda v: isinstance(v, bool | np.bool_), "a bool")


@dataclasses.dataclass(frozen=True)
class Options:
    """What `run_figure1` takes, declared like the trainer's settings (`config.settings`).

    `flag` names the trainer flag that sets an option under `--experiment=figure1`; the defaults
    are the `mnist_bn` preset's. `run_figure1`'s docstring says what each one means.
    """

    steps: int = setting(
        _RECIPE["train_steps"], "SGD steps per net", check=_int(1), flag="train_steps"
    )
    batch_size: int = setting(
        _RECIPE["batch_size"], "Examples per step", check=_int(2, 60000), flag="batch_size"
    )
    eval_every: int = setting(
        _RECIPE["eval_every"], "Steps between evaluations", check=_int(1), flag="eval_every"
    )
    learning_rate: float = setting(
        DEFAULT_LEARNING_RATE, "SGD learning rate", check=_POSITIVE_NUMBER, flag="learning_rate"
    )
    seed: int = setting(0, "Seed", check=_int(0, 2**31 - 1), flag="seed")
    binarize: bool = setting(_RECIPE["binarize"], "Binary inputs", check=_BOOL, flag="binarize")
    verbose: int = setting(
        1,
        "0, 1 or 2",
        check=(lambda v: not isinstance(v, bool) and v in (0, 1, 2), "0, 1 or 2"),
        flag="verbose",
    )
    init_stddev: float = setting(DEFAULT_INIT_STDDEV, "Init std", check=_POSITIVE_NUMBER)
    percentile_examples: int = setting(1000, "Fixed batch size", check=_int(2, 10000))
    # The hidden layers have 100 units.
    percentile_unit: int = setting(0, "The typical sigmoid", check=_int(0, 99))
    population_statistics: bool = setting(True, "Alg. 2 at the end", check=_BOOL)


_DEFAULTS = Options()


def run_figure1(
    output_dir,
    *,
    steps=_DEFAULTS.steps,
    batch_size=_DEFAULTS.batch_size,
    eval_every=_DEFAULTS.eval_every,
    learning_rate=_DEFAULTS.learning_rate,
    seed=_DEFAULTS.seed,
    binarize=_DEFAULTS.binarize,
    verbose=_DEFAULTS.verbose,
    init_stddev=_DEFAULTS.init_stddev,
    percentile_examples=_DEFAULTS.percentile_examples,
    percentile_unit=_DEFAULTS.percentile_unit,
    population_statistics=_DEFAULTS.population_statistics,
    runs_dir=None,
):
    """Reproduces the paper's Figure 1 and writes the figure, curves and a summary.

    Loss: softmax cross-entropy on the logits. Optimizer: SGD(learning_rate), no momentum, no
    decay. The module docstring says what is recorded and how.

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
        verbose: 0 silent; 1 a log line at every 10% of each net's training; 2 the trainer's
            line at every evaluation.
        init_stddev: float > 0, std of the Gaussian initialization of every weight matrix.
        percentile_examples: int in [2, 10000], size of the fixed batch (the first test images)
            over which the sigmoid-input percentiles are taken.
        percentile_unit: int, which unit of the last hidden layer is the "typical sigmoid".
        population_statistics: bool; at the end also evaluate the BN net with exact
            population statistics (Alg. 2, `keras_bn.recompute_population_statistics`).
        runs_dir: folder for the two nets' run folders (`baseline/`, `bn/`: checkpoints,
            metrics): an interrupted call made again with the same arguments resumes each net
            from its last checkpoint. None: a temporary folder, removed at the end.

    Returns:
        A dict with `"baseline_test_accuracy"`, `"bn_test_accuracy"` (final, moving averages),
        `"bn_test_accuracy_population"` (final, Alg. 2; None if not computed),
        `"wall_time_s"` (the whole call), `"train_time_s"` (per net), `"figure"`, `"json"`,
        `"csv"`, `"summary"` (paths of the outputs), and `"curves"` (the dict saved as JSON).

    Raises:
        ValueError: an argument is out of range or of the wrong type.
        FloatingPointError: a net's training loss is not finite.
    """
    start = time.perf_counter()
    arguments = {k: v for k, v in locals().items() if k not in ("output_dir", "start", "runs_dir")}
    settings = _validate(**arguments)
    output_dir = pathlib.Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"`output_dir` {str(output_dir)!r} exists and is not a folder.")
    if verbose:
        say(
            f"figure1: 2 nets x {steps} steps, batch {batch_size}, SGD lr {learning_rate}, "
            f"init N(0, {init_stddev}^2), eval every {eval_every} steps on the test images"
        )
    curves = {
        "steps": list(range(0, steps + 1, eval_every)),
        "percentiles": list(PERCENTILES),
        "config": settings,
        "environment": environment(),
    }
    # Without `runs_dir` the nets' run folders are scaffolding: only the figure's outputs stay.
    with contextlib.ExitStack() as stack:
        if runs_dir is None:
            runs_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="keras-bn-fig1-"))
        for name in NETS:
            curves[name] = _train_net(name, settings, pathlib.Path(runs_dir) / name)
    paths = _write_outputs(output_dir, curves, start)

    population = curves["bn"]["final_test_accuracy_population"]
    result = _result(curves, paths)
    return result


def finished_result(output_dir):
    """What `run_figure1` returned, read back from a folder holding its outputs; else None.

    Returns:
        The dict `run_figure1` returns, with `"complete": True`, or None if `figure1.json` is
        missing.
    """
    output_dir = pathlib.Path(output_dir)
    if not (output_dir / _OUTPUTS["json"]).is_file():
        return None
    curves = json.loads((output_dir / _OUTPUTS["json"]).read_text())
    return {
        **_result(curves, {k: str(output_dir / n) for k, n in _OUTPUTS.items()}),
        "complete": True,
    }


def _result(curves, paths):
    return {
        "baseline_test_accuracy": curves["baseline"]["final_test_accuracy"],
        "bn_test_accuracy": curves["bn"]["final_test_accuracy"],
        "bn_test_accuracy_population": curves["bn"]["final_test_accuracy_population"],
        "wall_time_s": curves["wall_time_s"],
        "train_time_s": {name: curves[name]["train_time_s"] for name in NETS},
        "curves": curves,
        **paths,
    }


# ------------------------------------------------------------------------------ arguments


def _validate(**kwargs):
    """Checks the arguments of `run_figure1` (a Python API: types too); returns them as JSON."""
    config, types = {}, typing.get_type_hints(Options)
    for field in dataclasses.fields(Options):
        value, (ok, what) = kwargs[field.name], field.metadata["check"]
        if not ok(value):
            raise ValueError(f"`{field.name}` must be {what}; received {value!r}.")
        config[field.name] = types[field.name](value)  # NumPy scalars become JSON's
    if config["steps"] % config["eval_every"]:
        fixed = max(1, config["steps"] // config["eval_every"]) * config["eval_every"]
        raise ValueError(
            f"`steps` ({config['steps']}) must be a multiple of `eval_every` "
            f"({config['eval_every']}); e.g. steps={fixed}."
        )
    return config


def percentiles(values):
    """The 15th, 50th and 85th percentiles (linear interpolation) of a 1-D array."""
    return [float(p) for p in np.percentile(np.asarray(values, np.float64), PERCENTILES)]


# ------------------------------------------------------------------------------- training


def sigmoid_input_fn(model, x_fixed, unit):
    """Returns a compiled function giving the input of one sigmoid of the last hidden layer.

    The values are those of unit `unit` of the last hidden layer's sigmoid over the batch
    `x_fixed`, in training mode (for the BN net: `gamma * x_hat + beta` with the batch
    statistics of `x_fixed`), computed with `stateless_call` so that no moving statistic moves.
    """
    import tensorflow as tf

    from keras_bn.models.mlp import preactivation_model

    preactivations = preactivation_model(model)

    @tf.function
    def sigmoid_input():
        outputs, _ = preactivations.stateless_call(
            [v.value for v in preactivations.trainable_variables],
            [v.value for v in preactivations.non_trainable_variables],
            x_fixed,
            training=True,
        )
        return outputs[-1][:, unit]

    return sigmoid_input


def net_config(name, settings, model_dir):
    """The `mnist_<name>` preset with the figure's settings: one training run per net."""
    from keras_bn.train.config import settings as config_lib

    s = settings
    return config_lib.resolve(
        f"mnist_{name}",
        {
            "model_dir": str(model_dir),
            "model_kwargs": {"init_stddev": s["init_stddev"]},
            "binarize": s["binarize"],
            "seed": s["seed"],
            "batch_size": s["batch_size"],
            "learning_rate": s["learning_rate"],
            "train_steps": s["steps"],
            "eval_every": s["eval_every"],
            "steps_per_loop": s["eval_every"],  # one compiled call per evaluation block
            "eval_batch_size": 10000,  # the whole test set at once
            "verbose": 2 if s["verbose"] == 2 else 0,
        },
    )


def _train_net(name, settings, model_dir):
    """Trains one net through the one training-run path (it resumes); returns its curves.

    The sigmoid-input percentiles join the run's metrics records (step 0 included), so a resumed
    run reads the whole curve back from its metrics.jsonl.
    """
    import keras_bn
    from keras_bn.train.engine import run as run_lib

    steps, eval_every = settings["steps"], settings["eval_every"]
    progress_every = max(1, steps // eval_every // 10) * eval_every
    state = {}

    def record_percentiles(step, metrics):
        values = percentiles(state["sigmoid_input"]().numpy())
        if settings["verbose"] == 1 and step and (step % progress_every == 0 or step == steps):
            rate = (step - state["start"]) / max(time.perf_counter() - state["started"], 1e-9)
            say(
                f"figure1 [{name:>8}] step {step}/{steps} test acc "
                f"{metrics['eval_accuracy']:.4f} sigmoid input p15/50/85 "
                + "/".join(f"{v:+.2f}" for v in values)
                + f" | {rate:.0f} steps/s"
            )
        return {f"sigmoid_input_p{p}": v for p, v in zip(PERCENTILES, values, strict=True)}

    def on_start(trainer):
        data = trainer.data
        x_fixed = data.preprocess_batch(data.arrays("eval")[0][: settings["percentile_examples"]])
        state.update(
            trainer=trainer,
            sigmoid_input=sigmoid_input_fn(trainer.model, x_fixed, settings["percentile_unit"]),
            start=trainer.current_step,
            started=time.perf_counter(),
        )
        if not any(r["step"] == 0 for r in trainer.run_dir.metrics()):
            trainer.run_dir.append_metrics(
                {"step": 0, **trainer.evaluate(), **record_percentiles(0, None)}
            )

    config = net_config(name, settings, model_dir)
    run_lib.train(config, list(config.to_dict()), on_evaluate=record_percentiles, on_start=on_start)
    trainer = state["trainer"]
    records = trainer.run_dir.metrics()
    steps_evaluated = [r["step"] for r in records]
    losses = [r.get("train_loss") for r in records]
    bad = next((i for i, v in enumerate(losses[1:], 1) if not math.isfinite(v)), None)
    if bad is not None:
        raise FloatingPointError(
            f"figure1: the {name} net's training loss is {losses[bad]} at step "
            f"{steps_evaluated[bad]}; lower `learning_rate` ({settings['learning_rate']})."
        )
    # Each interval's time (training and its evaluation) from its record: also right after
    # a resume.
    train_time = sum(
        (b["step"] - a["step"]) / b["steps_per_sec"]
        for a, b in zip(records, records[1:])
        if b.get("steps_per_sec")
    )
    accuracies = [r["eval_accuracy"] for r in records]
    best = int(np.argmax(accuracies))
    curves = {
        "test_accuracy": accuracies,
        "train_loss": losses,  # None at step 0: no training loss before the first step
        "sigmoid_input_percentiles": {
            f"p{p}": [r[f"sigmoid_input_p{p}"] for r in records] for p in PERCENTILES
        },
        "train_time_s": train_time,
        "steps_per_s": steps / train_time if train_time else 0.0,
        "final_test_accuracy": accuracies[-1],
        "best_test_accuracy": accuracies[best],
        "best_step": steps_evaluated[best],
        "first_step_at_milestone": first_step_at(steps_evaluated, accuracies, MILESTONE_ACCURACY),
    }
    if name == "bn":
        layers = trainer.model._flatten_layers()
        momenta = sorted({x.momentum for x in layers if isinstance(x, keras_bn.BatchNormalization)})
        curves["bn_momentum"] = momenta[0] if len(momenta) == 1 else momenta
        curves["final_test_accuracy_population"] = None
        if settings["population_statistics"]:
            # Alg. 2 over the last epoch's worth of the net's own training batches.
            data = trainer.data
            batches = min(steps, -(-data.spec.num_train_examples // settings["batch_size"]))
            keras_bn.recompute_population_statistics(
                trainer.model,
                data.train_dataset(start_step=steps - batches, num_steps=batches),
                steps=batches,
                verbose=0,
            )
            curves["final_test_accuracy_population"] = trainer.evaluate()["eval_accuracy"]
    return curves


# -------------------------------------------------------------------------------- outputs


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
    rows = []
    for name, label in (("baseline", "Baseline (no BN)"), ("bn", "BN")):
        r = curves[name]
        milestone = r["first_step_at_milestone"]
        milestone = "never" if milestone is None else milestone
        rows.append(
            f"| {label} | {r['final_test_accuracy']:.4f} | {r['best_test_accuracy']:.4f} "
            f"(step {r['best_step']}) | {milestone} | {r['train_time_s']:.1f} | "
            f"{r['steps_per_s']:.0f} |"
        )
    pop = curves["bn"].get("final_test_accuracy_population")
    pop_line = "not computed (`population_statistics=False`)" if pop is None else f"{pop:.4f}"
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
            f"shuffled epochs (the trainer's stream for seed {c['seed']}), the same batch "
            "order for both nets.",
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
            "Produced by `keras_bn.train.experiments.figure1.run_figure1` with "
            + ", ".join(f"{k}={v!r}" for k, v in c.items())
            + ".",
            "",
        ]
    )


def _write_outputs(output_dir, curves, start):
    """Writes every output at once (`run_dir.publish`); returns run_figure1's output paths."""
    from keras_bn.train.experiments.figure1_plot import plot_figure1

    def write_json(path):  # the wall time includes the figure and the CSV, written first
        curves["wall_time_s"] = time.perf_counter() - start
        path.write_text(json.dumps(curves, indent=1) + "\n")

    paths = publish(
        output_dir,
        {
            _OUTPUTS["figure"]: lambda path: plot_figure1(curves, path),
            _OUTPUTS["csv"]: lambda path: path.write_text(curves_csv(curves)),
            _OUTPUTS["json"]: write_json,
            _OUTPUTS["summary"]: lambda path: path.write_text(summary_markdown(curves)),
        },
    )
    return {key: paths[filename] for key, filename in _OUTPUTS.items()}
