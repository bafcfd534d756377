"""Figure 2 and Table 2 of the paper (sections 4.2-4.3): the six ImageNet nets, scaled in time.

The experiment is a plan on top of the trainer: which nets (each its preset's recipe), which
seeds, and one factor `k = inception_steps / 31M` that multiplies every step count and decay
interval, so the ratios between the nets stay the paper's. Each net is an ordinary training run
(`keras_bn.train.engine.run.train`) in a folder of its own, so an interrupted experiment resumes
net by net and every folder can be evaluated or resumed alone. docs/table2_summary.md says why
each choice of the miniature was made.

Example (the size the tests run; the defaults take 45 min on 2 cores)::

    from keras_bn.train.experiments.table2 import Options, run_table2

    options = Options("/tmp/t2", inception_steps=40, ensemble_size=1, eval_crops=(1,))
    print(run_table2(options)["table"]["bn_x30"]["steps_to_inception_best"])
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
import os
import pathlib
import time
from typing import Any

from keras_bn.train.config import presets
from keras_bn.train.config import settings as config_lib
from keras_bn.train.config.settings import POSITIVE, setting
from keras_bn.train.experiments.results import environment, first_step_at
from keras_bn.train.messages import say
from keras_bn.train.rundir.folder import RunDir, json_text, publish

IMAGENET_TRAIN_EXAMPLES = 1_281_167
MNIST_TRAIN_EXAMPLES = 60_000
PAPER_INCEPTION_STEPS = presets.get("inception").values["train_steps"]  # 31M


@dataclasses.dataclass(frozen=True)
class Net:
    """One net of Figure 2: its folder name, the paper's label, preset and model changes."""

    key: str
    label: str
    preset: str
    model_kwargs: dict = dataclasses.field(default_factory=dict)
    # Figure 3 ("Table 2"): steps to reach 72.2% (None: never) and the maximum accuracy.
    paper_steps: float | None = None
    paper_max: float | None = None


NETS = (
    Net("inception", "Inception", "inception", {}, 31.0e6, 0.722),
    Net("bn_baseline", "BN-Baseline", "bn_baseline", {}, 13.3e6, 0.727),
    Net("bn_x5", "BN-x5", "bn_x5", {}, 2.1e6, 0.730),
    Net("bn_x30", "BN-x30", "bn_x30", {}, 2.7e6, 0.748),
    Net("bn_x5_sigmoid", "BN-x5-Sigmoid", "bn_x5_sigmoid", {}, None, 0.698),
    Net(
        "inception_sigmoid",
        "Inception-Sigmoid",
        "inception",
        {"activation": "sigmoid"},
        None,
        0.001,
    ),
)
ENSEMBLE_NET = "bn_x30"  # section 4.3: the ensemble's members are BN-x30 variants

# The miniature's settings, the same for every net (docs/table2_summary.md: why).
MINIATURE = dict(
    dataset="mnist",
    eval_split="test",
    image_size=75,
    augment="none",
    eval_batch_size=100,
    eval_steps=20,
    eval_every=100,
    steps_per_loop=100,
    jit_compile=False,
)
MINIATURE_MODEL_KWARGS = {"depth_multiplier": 0.25}
MINIATURE_INCEPTION_STEPS = 5_000
MINIATURE_CROP_IMAGES = 500
# Every net trains at least BN-x30's 6M steps (times k): the bn_x5 preset stops at 2.1M, where
# the paper's net reaches 72.2%, but Figure 2 follows it further (its maximum, 73.0%, comes later).
MIN_PAPER_STEPS = 6_000_000


@dataclasses.dataclass(frozen=True)
class Options:
    """What `--experiment=table2` takes: flag = field name; each field's help says what it means.

    Only `inception_steps` and `ensemble_size` are this experiment's own flags; the others mean
    what they mean for a training run, applied to every net.
    """

    model_dir: str
    dataset: str = setting(
        "mnist",
        "The miniature or the paper's size",
        check=(
            lambda v: v == "mnist" or v.startswith("tfds:imagenet"),
            "mnist (the miniature) or tfds:imagenet2012 (the paper's size) for --experiment=table2",
        ),
    )
    data_dir: str | None = setting(None, "TFDS data directory")
    inception_steps: int | None = setting(
        None,
        "Inception's training steps; every net's step count and learning-rate decay interval "
        "scale with them (k = inception_steps / 31M)",
        default_help="5,000 in the miniature, the paper's 31M at full size",
        check=POSITIVE,
    )
    eval_every: int | None = setting(
        None,
        "Steps between evaluations",
        default_help="100 in the miniature, else the preset's",
        check=POSITIVE,
    )
    eval_steps: int | None = setting(
        None, "Evaluation batches", default_help="20 of 100 images in the miniature", check=POSITIVE
    )
    model_kwargs: dict = setting({}, "Added to every net's builder arguments")
    seed: int = setting(0, "The first seed; the ensemble's other members take the next ones")
    ensemble_size: int = setting(
        3,
        "BN-x30 runs (seeds --seed, --seed+1, ...) in the section 4.3 ensemble; the first is "
        "Figure 2's",
        check=(lambda v: v >= 1, ">= 1"),
    )
    eval_crops: tuple[int, ...] = setting((1, 10, 144), "Crop counts of the final evaluation")
    verbose: int = setting(1, "0 silent, 1 about ten lines per net and an ETA, 2 every evaluation")

    @property
    def miniature(self) -> bool:
        return self.dataset == "mnist"

    @property
    def inception_step_count(self) -> int:
        """`inception_steps`, or its default for the scale."""
        if self.inception_steps is not None:
            return self.inception_steps
        return MINIATURE_INCEPTION_STEPS if self.miniature else PAPER_INCEPTION_STEPS

    @property
    def time_factor(self) -> float:
        """k: the miniature's steps per step of the paper."""
        return self.inception_step_count / PAPER_INCEPTION_STEPS

    def check(self) -> None:
        """Raises ValueError for settings the experiment cannot run (their declarations)."""
        config_lib.check_fields(self)


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of the experiment: a net with a seed, in `model_dir/<folder>`."""

    net: Net
    seed: int
    folder: str


def runs(options: Options) -> list[Run]:
    """The six nets, then the extra seeds of the ensemble's net, in training order."""
    ensemble_net = next(n for n in NETS if n.key == ENSEMBLE_NET)
    extra = range(options.seed + 1, options.seed + options.ensemble_size)
    return [Run(net, options.seed, net.key) for net in NETS] + [
        Run(ensemble_net, s, f"{ENSEMBLE_NET}_seed{s}") for s in extra
    ]


def net_config(options: Options, run: Run) -> config_lib.TrainConfig:
    """The run's configuration: its preset, with every step count scaled by `k`.

    The learning rate decays every `lr_decay_epochs` epochs; the paper's interval (8 ImageNet
    epochs, 8/6 for the accelerated nets) is kept in steps, times `k`, and converted to epochs of
    the dataset trained on.
    """
    preset = presets.get(run.net.preset).values
    k = options.time_factor
    train_examples = MNIST_TRAIN_EXAMPLES if options.miniature else IMAGENET_TRAIN_EXAMPLES
    values: dict[str, Any] = dict(MINIATURE) if options.miniature else {}
    values.update(
        model_dir=str(pathlib.Path(options.model_dir) / run.folder),
        dataset=options.dataset,
        data_dir=options.data_dir,
        model_kwargs={
            **(MINIATURE_MODEL_KWARGS if options.miniature else {}),
            **run.net.model_kwargs,
            **options.model_kwargs,
        },
        train_steps=max(1, round(max(preset["train_steps"], MIN_PAPER_STEPS) * k)),
        lr_decay_epochs=preset["lr_decay_epochs"] * IMAGENET_TRAIN_EXAMPLES * k / train_examples,
        seed=run.seed,
        verbose=0,
    )
    for name in ("eval_every", "eval_steps"):
        if getattr(options, name) is not None:
            values[name] = getattr(options, name)
    if options.miniature:
        values["checkpoint_every"] = 5 * values["eval_every"]
    return config_lib.resolve(run.net.preset, values)


class _Progress:
    """Prints each net's progress and an ETA for the training still to do."""

    def __init__(self, configs: list[config_lib.TrainConfig], verbose: int):
        self.total = sum(c.train_steps for c in configs)
        self.verbose = verbose
        self.started = time.perf_counter()
        self.done_before = 0  # steps of the runs before the current one
        self.resumed = 0  # steps trained before this process started (not in the ETA's rate)

    def hook(self, index: int, runs_count: int, run: Run, config, start_step: int):
        """The `on_evaluate` hook of one run, which resumes at `start_step`."""
        every = max(1, math.ceil(config.train_steps / config.eval_every / 10)) * config.eval_every
        self.resumed += start_step
        best = 0.0

        def on_evaluate(step, metrics):
            nonlocal best
            best = max(best, metrics["eval_accuracy"])
            last = step == config.train_steps
            if self.verbose == 2 or (self.verbose and (step % every == 0 or last)):
                done = self.done_before + step
                trained = done - self.resumed
                eta = ""
                if trained:
                    seconds = (time.perf_counter() - self.started) / trained
                    eta = f", ETA {_duration(seconds * (self.total - done))} of training"
                say(
                    f"table2 [{index}/{runs_count} {run.folder}] step {step}/{config.train_steps}"
                    f" accuracy {metrics['eval_accuracy']:.4f} (best {best:.4f}) | all nets "
                    f"{done / self.total:.0%}{eta}"
                )
            return {}

        return on_evaluate

    def finish_run(self, config) -> None:
        self.done_before += config.train_steps


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


def curve(model_dir: str | os.PathLike) -> dict[str, list]:
    """A trained run's evaluation curve from its metrics.jsonl."""
    records = [r for r in RunDir(model_dir).metrics() if "eval_accuracy" in r]
    return {
        "steps": [r["step"] for r in records],
        "accuracy": [r["eval_accuracy"] for r in records],
        "train_loss": [r.get("train_loss") for r in records],
        "learning_rate": [r.get("learning_rate") for r in records],
    }


def table(curves: dict[str, dict], k: float) -> dict[str, dict]:
    """Table 2: for each net, steps to reach Inception's best accuracy and its own best."""
    reference = curves["inception"]
    target = max(reference["accuracy"])
    rows = {}
    for net in NETS:
        c = curves[net.key]
        best = max(range(len(c["accuracy"])), key=c["accuracy"].__getitem__)
        steps = first_step_at(c["steps"], c["accuracy"], target)
        rows[net.key] = {
            "label": net.label,
            "steps_to_inception_best": steps,
            "best_accuracy": c["accuracy"][best],
            "best_step": c["steps"][best],
            "evaluations_to_best": best + 1,
            "paper_steps_to_inception_best_scaled": (
                None if net.paper_steps is None else round(net.paper_steps * k)
            ),
            "paper_max_accuracy": net.paper_max,
        }
    return rows


def run_table2(options: Options) -> dict[str, Any]:
    """Trains the six nets and the ensemble's extra members, evaluates, writes the outputs.

    Returns:
        The dict saved as table2.json, with the paths of the outputs under `"outputs"`.

    Raises:
        ValueError: for settings the experiment or a preset cannot run.
        OSError: if an output cannot be written.
    """
    options.check()
    # Each net compiles its own functions: TensorFlow's notice about retracing says nothing here.
    retracing = _DropMessages("triggered tf.function retracing")
    tf_logger = logging.getLogger("tensorflow")
    tf_logger.addFilter(retracing)
    try:
        return _run(options)
    finally:
        tf_logger.removeFilter(retracing)


def _run(options: Options) -> dict[str, Any]:
    # TensorFlow loads here, not with the module: `--help` reads `Options` without it.
    from keras_bn.train.engine import run as experiment
    from keras_bn.train.evaluation import runs as evaluation

    started = time.perf_counter()
    plan = runs(options)
    configs = [net_config(options, run) for run in plan]
    pairs = list(zip(plan, configs, strict=True))
    if options.verbose:
        say(
            f"table2: {len(plan)} runs in {options.model_dir}; "
            f"{'miniature: mnist 75x75' if options.miniature else 'the paper size'}, k = "
            f"{options.time_factor:.3g} (Inception {options.inception_step_count} steps); "
            + ", ".join(f"{r.folder} {c.train_steps}" for r, c in pairs)
            + " steps"
        )
    progress = _Progress(configs, options.verbose)
    for index, (run, config) in enumerate(pairs, 1):
        start = _trained_steps(config)
        on_evaluate = progress.hook(index, len(plan), run, config, start)
        experiment.train(config, on_evaluate=on_evaluate)
        progress.finish_run(config)

    curves = {run.folder: curve(config.model_dir) for run, config in pairs}
    result: dict[str, Any] = {
        "options": dataclasses.asdict(options),
        "time_factor": options.time_factor,
        "configs": {r.folder: c.to_dict() for r, c in pairs},
        "curves": curves,
        "table": table(curves, options.time_factor),
        "environment": environment(),
    }
    members = [c.model_dir for r, c in pairs if r.net.key == ENSEMBLE_NET]
    if options.verbose:
        say(f"table2: evaluating {ENSEMBLE_NET} on {options.eval_crops} crops.")
    result["crops"] = evaluation.evaluate_runs(
        members,
        options.eval_crops,
        MINIATURE_CROP_IMAGES if options.miniature else None,
        verbose=options.verbose,
    )
    result["wall_seconds"] = time.perf_counter() - started
    result["outputs"] = _write_outputs(pathlib.Path(options.model_dir), result)
    return result


class _DropMessages(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def _trained_steps(config) -> int:
    """The step a run's metrics have reached (0 for a new run): where its training resumes."""
    metrics = RunDir(config.model_dir).metrics() if os.path.isdir(config.model_dir) else []
    return max((r["step"] for r in metrics), default=0)


# Outputs -------------------------------------------------------------------------------------


def curves_csv(curves: dict[str, dict]) -> str:
    """One row per (net, evaluation): folder, step, accuracy, train loss, learning rate."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["net", "step", "accuracy", "train_loss", "learning_rate"])
    for name, c in curves.items():
        for row in zip(c["steps"], c["accuracy"], c["train_loss"], c["learning_rate"], strict=True):
            writer.writerow([name, *row])
    return out.getvalue()


def summary_markdown(result: dict[str, Any]) -> str:
    """summary.md: Table 2, the crop and ensemble evaluation, and the settings."""
    rows, k = result["table"], result["time_factor"]
    target = rows["inception"]["best_accuracy"]

    def steps(value):
        return "never" if value is None else f"{value:,}"

    inception_steps = rows["inception"]["steps_to_inception_best"]
    lines = [
        "# Table 2 (Figures 2 and 3 of the paper), " + _scale_label(result),
        "",
        f"Single-crop accuracy on the evaluation images, every {_eval_every(result)} steps. "
        f"Inception's best is {target:.4f}, at step {rows['inception']['best_step']:,} (its "
        f"evaluation {rows['inception']['evaluations_to_best']}). Paper columns: Figure 3's "
        f"steps times k = {k:.4g}, and its top-1 on ImageNet.",
        "",
        "| Net | Steps to Inception's best | Fewer steps than Inception | Best accuracy (step) "
        "| Paper: steps x k | Paper: max accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for net in NETS:
        r = rows[net.key]
        n = r["steps_to_inception_best"]
        ratio = "" if n is None or not inception_steps else f"{inception_steps / n:.1f}x"
        lines.append(
            f"| {net.label} | {steps(n)} | {ratio} | {r['best_accuracy']:.4f} "
            f"({r['best_step']:,}) | {steps(r['paper_steps_to_inception_best_scaled'])} | "
            f"{r['paper_max_accuracy']:.1%} |"
        )
    crops_result = result["crops"]
    members = len(crops_result["model_dirs"])
    lines += [
        "",
        f"## Section 4.3: {ENSEMBLE_NET} on 1, 10 and 144 crops, and an ensemble of {members}",
        "",
        f"Top-1 accuracy on the first {crops_result['images']:,} evaluation images; the "
        f"ensemble averages the class probabilities of {members} {ENSEMBLE_NET} runs (seeds "
        f"{', '.join(str(c['seed']) for c in _member_configs(result))}).",
        "",
        "| Crops | "
        + " | ".join(f"seed {c['seed']}" for c in _member_configs(result))
        + " | Ensemble |",
        "|---|" + "---|" * (members + 1),
    ]
    for n, accuracy in crops_result["accuracy"].items():
        lines.append(
            f"| {n} | "
            + " | ".join(f"{a:.4f}" for a in accuracy["models"])
            + f" | {accuracy['ensemble']:.4f} |"
        )
    env = result["environment"]
    lines += [
        "",
        f"Wall time {_duration(result['wall_seconds'])} on {env['cpu_count']} CPUs "
        f"({env['machine']}), TensorFlow {env['tensorflow']}, Keras {env['keras']}.",
        "",
        "## Settings",
        "",
        "Each net is its preset (`--preset=<preset>`) with these values changed:",
        "",
    ]
    for folder, config in result["configs"].items():
        preset = config_lib.resolve(config["preset"], {}).to_dict()
        changed = {
            key: value
            for key, value in config.items()
            if key not in ("model_dir", "verbose") and preset[key] != value
        }
        lines.append(
            f"- `{folder}`: `--preset={config['preset']}`, "
            + ", ".join(
                f"`{key}={value:.4g}`" if isinstance(value, float) else f"`{key}={value!r}`"
                for key, value in sorted(changed.items())
            )
        )
    lines.append("")
    return "\n".join(lines)


def _scale_label(result) -> str:
    options = result["options"]
    if options["dataset"] == "mnist":
        return f"in miniature (MNIST 75x75, k = {result['time_factor']:.4g})"
    return f"at the paper's size ({options['dataset']})"


def _eval_every(result) -> int:
    return result["configs"]["inception"]["eval_every"]


def _member_configs(result) -> list[dict]:
    return [
        c for c in result["configs"].values() if c["model_dir"] in result["crops"]["model_dirs"]
    ]


def _write_outputs(model_dir: pathlib.Path, result: dict[str, Any]) -> dict[str, str]:
    from keras_bn.train.experiments.table2_plot import plot_figure2

    writers = {
        "figure2.png": lambda path: plot_figure2(result, path),
        "summary.md": lambda path: path.write_text(summary_markdown(result)),
        "table2.csv": lambda path: path.write_text(curves_csv(result["curves"])),
        # The JSON lists every output's final path, its own included.
        "table2.json": lambda path: path.write_text(
            json_text({**result, "outputs": {name: str(model_dir / name) for name in writers}})
        ),
    }
    return publish(model_dir, writers)
