"""Running an experiment: one training run from a `TrainConfig`, or the paper's Figure 1.

`train` does what a training run needs around `Trainer.train`: it checks everything that can
fail before the model_dir is touched (strategy, batch split, data, model, writable outputs, the
checkpoint to resume from), claims the model_dir, trains, then recomputes population statistics,
exports and writes summary.json. `figure1` runs `experiments.figure1.run_figure1` in a run
directory of its own. Every failure is a `RunError` carrying the command line's exit status.

Example:

>>> from keras_bn.train.config import settings as config_lib
>>> try:
...     train(config_lib.resolve("mnist_bn", {}))
... except RunError as error:
...     print(error.status, error)
2 --model_dir is required (checkpoints, logs, metrics and config go there).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any

import keras

import keras_bn
from keras_bn.population import recompute_population_statistics
from keras_bn.train.config import presets
from keras_bn.train.config.settings import TrainConfig
from keras_bn.train.data import pipeline as data_lib
from keras_bn.train.engine import strategy as strategy_lib
from keras_bn.train.engine.trainer import Trainer, build_model
from keras_bn.train.evaluation import export as export_lib
from keras_bn.train.rundir import checkpoints
from keras_bn.train.rundir.folder import RunDir, atomic_write_json, check_writable, json_text

PROG = "keras-bn-train"

# --experiment=figure1 takes these flags (flag name -> run_figure1 argument).
FIGURE1_ARGUMENTS = {
    "train_steps": "steps",
    "batch_size": "batch_size",
    "eval_every": "eval_every",
    "learning_rate": "learning_rate",
    "seed": "seed",
    "binarize": "binarize",
    "verbose": "verbose",
}
# --experiment=table2 takes these flags (the fields of keras_bn.train.experiments.table2.Options).
TABLE2_ARGUMENTS = (
    "model_dir",
    "dataset",
    "data_dir",
    "train_steps",
    "eval_every",
    "eval_steps",
    "model_kwargs",
    "seed",
    "ensemble_size",
    "eval_crops",
    "verbose",
)


class RunError(Exception):
    """A run that could not start or finish; the message says why and what to do.

    Attributes:
        status: the command line's exit status: 2 the settings or outputs are wrong (nothing
            was trained), 1 training failed, 75 a multi-worker peer was lost, 130 interrupted.
    """

    def __init__(self, message: object, status: int = 2):
        super().__init__(str(message))
        self.status = status


def train(
    config: TrainConfig,
    explicit: Collection[str] = (),
    cpu_replicas: int = 0,
    on_evaluate: Callable[[int, dict], dict | None] | None = None,
) -> dict:
    """One training run: prepare, train, finish.

    Args:
        config: the resolved configuration (`keras_bn.train.config.settings.resolve`).
        explicit: the settings given explicitly (marked in the printed configuration and
            recorded in config.json).
        cpu_replicas: split the CPU into this many logical devices first (`--cpu_replicas`).
        on_evaluate: passed to `Trainer.train` (an experiment's hook after each evaluation).

    Returns:
        The run's summary, as written to summary.json.

    Raises:
        RunError: for anything that stops the run (see its `status`).
    """
    started = time.perf_counter()
    if not config.model_dir:
        raise RunError("--model_dir is required (checkpoints, logs, metrics and config go there).")
    previous_policy = keras.config.dtype_policy()
    try:
        try:
            run_dir, strategy, data, model, found = _prepare(config, cpu_replicas)
        except (ValueError, OSError) as error:
            raise RunError(error) from None
        chief = strategy_lib.is_chief(strategy)
        if chief:  # once per cluster; non-chief workers write nothing into the model_dir
            _print_config(config, explicit)
        claim = (
            run_dir.claim(config.identity(), _config_json(config, explicit))
            if chief
            else contextlib.nullcontext()
        )
        with claim:
            trainer = Trainer(config, strategy, data, run_dir, model=model, chief=chief)
            for line in found.describe():
                print(f"{PROG}: warning: {line}", file=sys.stderr, flush=True)
            if start := trainer.restore(found):
                run_dir.commit()
                print(f"Resuming {run_dir.path} from {found.path} (step {start}).", flush=True)
            try:
                record = trainer.train(
                    on_checkpoint=lambda step: run_dir.commit(), on_evaluate=on_evaluate
                )
                run_dir.commit()
                return _finish(config, trainer, data, run_dir, record, started)
            except KeyboardInterrupt:
                raise RunError(
                    f"interrupted at step {trainer.current_step}; run the same command again to "
                    "resume from the last checkpoint.",
                    status=130,
                ) from None
            except strategy_lib.PEER_FAILURES as error:
                if not strategy_lib.is_multi_worker(strategy):
                    raise
                message = strategy_lib.peer_failure_message(error, trainer.saved_step)
                raise RunError(message, status=75) from None
            except OSError as error:
                raise RunError(error, status=1) from None
    finally:
        keras.config.set_dtype_policy(previous_policy)


def _prepare(config: TrainConfig, cpu_replicas: int):
    """Checks everything that can be checked before the model_dir is touched.

    Returns:
        `(run_dir, strategy, data, model, found)`, `found` being the checkpoint to resume from;
        the model is built under the strategy's scope with the requested dtype policy (which
        stays set: the caller restores it).
    """
    strategy_lib.split_cpu(cpu_replicas)  # before anything initializes TensorFlow's devices
    run_dir = RunDir(config.model_dir)
    run_dir.check(config.identity())
    check_writable(config.model_dir, "--model_dir")
    if config.export_dir:
        check_writable(config.export_dir, "--export_dir")
    strategy = strategy_lib.make_strategy(config.strategy, config.tpu)
    strategy_lib.check_batch_size(config.batch_size, strategy, "--batch_size")
    if config.eval_batch_size:
        strategy_lib.check_batch_size(config.eval_batch_size, strategy, "--eval_batch_size")
    data = data_lib.make_data(config)
    keras.config.set_dtype_policy(strategy_lib.dtype_policy(config.mixed_precision))
    keras.utils.set_random_seed(config.seed)
    with strategy.scope():
        model = build_model(config, data.spec)
    layers = model._flatten_layers()
    if config.population_stats and not any(
        isinstance(layer, keras_bn.BatchNormalization) for layer in layers
    ):
        raise ValueError(
            f"--population_stats needs keras_bn.BatchNormalization layers; --model="
            f"{config.model} with these settings has none."
        )
    found = checkpoints.find_restorable(run_dir.checkpoint_dir)
    if found.path is None and found.skipped:
        raise ValueError(
            f"no checkpoint in {run_dir.checkpoint_dir} loads ("
            + "; ".join(found.describe())
            + "); move that folder away to start this run over."
        )
    # Before the model_dir is claimed, so that a refused run leaves its config.json as it was.
    checkpoints.check_not_past(found.step, config.train_steps, config.model_dir)
    return run_dir, strategy, data, model, found


def _print_config(config: TrainConfig, explicit: Collection[str]) -> None:
    if not config.verbose:
        return
    source = f"preset {config.preset}" if config.preset else "defaults"
    print(f"Configuration ({source}; * = given explicitly):")
    for key, value in sorted(config.to_dict().items()):
        print(f"  {'*' if key in explicit else ' '} {key} = {value!r}")
    if config.preset:
        print("Assumptions of this preset (the paper does not state these):")
        for line in presets.get(config.preset).assumptions:
            print(f"    - {line}")
    sys.stdout.flush()


def _config_json(config: TrainConfig, explicit: Collection[str]) -> str:
    data = config.to_dict()
    data["_meta"] = {
        "explicit_flags": sorted(explicit),
        "preset_assumptions": list(presets.get(config.preset).assumptions) if config.preset else [],
        "identity_fields": sorted(config.identity()),
    }
    return json_text(data)


def _finish(config: TrainConfig, trainer, data, run_dir: RunDir, record, started: float) -> dict:
    """Population statistics, export and summary.json after training."""
    summary = {
        "model": config.model,
        "dataset": config.dataset,
        "preset": config.preset,
        "steps": trainer.current_step,
        "final": record,
        "train_seconds": trainer.train_seconds,
        "replicas": trainer.strategy.num_replicas_in_sync,
        "model_dir": str(run_dir.path),
        "checkpoint": trainer.manager.latest_checkpoint,
        "tensorboard": str(run_dir.tensorboard_dir),
        "metrics": str(run_dir.metrics_path),
    }
    if config.population_stats:
        if config.verbose:
            print(
                f"Recomputing population statistics over {config.population_stats} training "
                "batches (Alg. 2).",
                flush=True,
            )
        with trainer.strategy.scope():
            recompute_population_statistics(
                trainer.model,
                data.stats_dataset(config.population_stats),
                steps=config.population_stats,
                verbose=1 if config.verbose == 1 else 0,
            )
        summary["population_stats"] = {"batches": config.population_stats, **trainer.evaluate()}
    if config.export_dir:
        model = export_lib.serving_model(trainer.model, config.fold_bn)
        if config.fold_bn:
            x, _ = next(iter(data.eval_dataset()))
            summary["fold_max_abs_difference"] = export_lib.max_abs_difference(
                trainer.model, model, x
            )
        # Non-chief workers take part (collectives) but write into a throwaway folder.
        export_dir = config.export_dir if trainer.chief else tempfile.mkdtemp(prefix="export-")
        summary["export_dir"] = export_lib.export_saved_model(model, data, export_dir)
        summary["export_folded"] = config.fold_bn
    summary["wall_seconds"] = time.perf_counter() - started
    if trainer.chief:
        atomic_write_json(run_dir.summary_path, summary)
    return summary


def figure1(model_dir: str | None, given: Mapping[str, Any]) -> dict:
    """`--experiment=figure1`: the paper's Figure 1, written into `model_dir`.

    Args:
        model_dir: the folder for figure1.png, the curves and the summary.
        given: flag name -> value for every flag given explicitly; the ones in
            `FIGURE1_ARGUMENTS` are passed to `run_figure1`, any other (but `--model_dir` and
            `--experiment`) is refused.

    Returns:
        What `keras_bn.train.experiments.figure1.run_figure1` returns.

    Raises:
        RunError: for a flag figure1 does not use, a folder holding another run, a failing
            experiment (nothing is left in `model_dir`) or Ctrl-C (status 130).
    """
    _check_flags("figure1", given, FIGURE1_ARGUMENTS)
    if not model_dir:
        raise RunError(
            "--model_dir is required (the folder for figure1.png, the curves and the summary)."
        )
    kwargs = {FIGURE1_ARGUMENTS[n]: value for n, value in given.items() if n in FIGURE1_ARGUMENTS}
    try:
        from keras_bn.train.experiments.figure1 import run_figure1
    except ImportError as error:
        raise RunError(f"--experiment=figure1 is not available ({error}).") from None
    identity = {"experiment": "figure1", "figure1_arguments": kwargs}
    config_json = json_text({**identity, "model_dir": model_dir})
    try:
        check_writable(model_dir, "--model_dir")
    except OSError as error:
        raise RunError(error) from None
    run_dir = RunDir(model_dir)
    interrupted = (
        "interrupted; --experiment=figure1 keeps no checkpoints (it writes its outputs only at "
        "the end), so running the same command again starts over."
    )
    with _as_run_errors(interrupted), run_dir.claim(identity, config_json):
        result = run_figure1(model_dir, **kwargs)
        run_dir.commit()
    return result


def table2(given: Mapping[str, Any]) -> dict:
    """`--experiment=table2`: the paper's Figure 2, Table 2 and section 4.3, in `--model_dir`.

    Args:
        given: flag name -> value for every flag given explicitly; the ones in
            `TABLE2_ARGUMENTS` set `keras_bn.train.experiments.table2.Options`, any other (but
            `--experiment`) is refused.

    Returns:
        What `keras_bn.train.experiments.table2.run_table2` returns.

    Raises:
        RunError: for a flag table2 does not use, a folder holding another experiment, a
            failing run, or Ctrl-C (status 130; the same command resumes).
    """
    from keras_bn.train.experiments import table2 as table2_lib

    _check_flags("table2", given, TABLE2_ARGUMENTS)
    if not given.get("model_dir"):
        raise RunError("--model_dir is required (the folder for the six nets and the outputs).")
    values = {n: v for n, v in given.items() if n in TABLE2_ARGUMENTS}
    if "eval_crops" in values:
        values["eval_crops"] = _crop_counts(values["eval_crops"])
    options = table2_lib.Options(**values)
    identity = {"experiment": "table2", **dataclasses.asdict(options)}
    # What may differ on resume: the output, how much is printed, the final crop evaluation.
    del identity["verbose"], identity["model_dir"], identity["eval_crops"]
    try:
        options.check()
        check_writable(options.model_dir, "--model_dir")
        run_dir = RunDir(options.model_dir)
        claim = run_dir.claim(identity, json_text(identity))
    except (ValueError, OSError) as error:
        raise RunError(error) from None
    interrupted = (
        "interrupted; run the same command again to resume (each net from its last checkpoint)."
    )
    with _as_run_errors(interrupted), claim:
        try:
            return table2_lib.run_table2(options)
        finally:  # keep the folder once any net has a checkpoint to resume from
            if any(p.is_dir() for p in run_dir.path.glob("*/checkpoints")):
                run_dir.commit()


def evaluate(given: Mapping[str, Any]) -> dict:
    """`--experiment=evaluate`: trained runs on 1, 10 or 144 crops, alone and as an ensemble.

    `--model_dir` names one run or several, comma-separated (an ensemble); `--eval_crops` the
    crop counts (default 1). Nothing is written.

    Raises:
        RunError: for a flag it does not use, or a folder that holds no trained run.
    """
    from keras_bn.train.evaluation.runs import evaluate_runs

    _check_flags("evaluate", given, ("model_dir", "eval_crops", "verbose"))
    model_dirs = [d for d in str(given.get("model_dir") or "").split(",") if d]
    if not model_dirs:
        raise RunError("--model_dir is required: one trained run, or several separated by commas.")
    try:
        crops = _crop_counts(given.get("eval_crops") or ["1"])
        return evaluate_runs(model_dirs, crops, verbose=given.get("verbose", 1))
    except ValueError as error:
        raise RunError(error) from None


@contextlib.contextmanager
def _as_run_errors(interrupted: str):
    """An experiment's failures as `RunError`s: settings 2, I/O 1, Ctrl-C 130 (`interrupted`)."""
    try:
        yield
    except ValueError as error:
        raise RunError(error) from None
    except OSError as error:
        raise RunError(error, status=1) from None
    except KeyboardInterrupt:
        raise RunError(interrupted, status=130) from None


def _crop_counts(values: Collection[str]) -> tuple[int, ...]:
    """`--eval_crops` as ints, each one of `keras_bn.train.evaluation.crops.NUM_CROPS`."""
    from keras_bn.train.evaluation.crops import NUM_CROPS

    if not values or any(v.strip() not in {str(n) for n in NUM_CROPS} for v in values):
        raise RunError(f"--eval_crops takes 1, 10 or 144 (comma-separated), got {list(values)}.")
    return tuple(int(v) for v in values)


def _check_flags(name: str, given: Mapping[str, Any], accepted: Collection[str]) -> None:
    """Refuses the flags an experiment does not use (one line naming them and the others)."""
    accepted = [n for n in accepted if n != "model_dir"]
    unused = [n for n in given if n not in (*accepted, "model_dir", "experiment")]
    if unused:
        raise RunError(
            f"--experiment={name} does not use {', '.join('--' + n for n in unused)}; it takes "
            f"--model_dir and {', '.join('--' + n for n in accepted)}."
        )
