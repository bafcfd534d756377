"""The one training-run path: every run, and every net of an experiment, goes through `train`.

Why one path: checking, claiming the model_dir, resuming and finishing are where runs get lost,
so they are written once. `train` checks everything that can fail before the model_dir is
touched (strategy, batch split, data, model and its --model_kwargs, writable outputs, an export
of another run, the checkpoint to resume from), returns a finished run's summary without
training again, claims the model_dir, trains, then recomputes population statistics, exports
and writes summary.json. An experiment hooks in with `on_start` and `on_evaluate`. Every
failure is a `RunError` carrying the command line's exit status.

Example:

>>> from keras_bn.train.config import settings as config_lib
>>> from keras_bn.train.messages import RunError
>>> try:
...     train(config_lib.resolve("mnist_bn", {}))
... except RunError as error:
...     print(error.status, error)
2 --model_dir is required (checkpoints, logs, metrics and config go there).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from collections.abc import Callable, Collection

import keras

import keras_bn
from keras_bn.population import recompute_population_statistics
from keras_bn.train.config import presets
from keras_bn.train.config.settings import TrainConfig
from keras_bn.train.data import pipeline as data_lib
from keras_bn.train.engine import export as export_lib
from keras_bn.train.engine import strategy as strategy_lib
from keras_bn.train.engine.model import build_model
from keras_bn.train.engine.trainer import Trainer
from keras_bn.train.messages import RunError, say, warn
from keras_bn.train.rundir import checkpoints
from keras_bn.train.rundir.folder import RunDir, atomic_write_json, check_writable, json_text


def train(
    config: TrainConfig,
    explicit: Collection[str] = (),
    cpu_replicas: int = 0,
    on_evaluate: Callable[[int, dict], dict | None] | None = None,
    on_start: Callable[[Trainer], None] | None = None,
) -> dict:
    """One training run: prepare, train, finish.

    Args:
        config: the resolved configuration (`keras_bn.train.config.settings.resolve`).
        explicit: the settings given explicitly (marked in the printed configuration and
            recorded in config.json).
        cpu_replicas: split the CPU into this many logical devices first (`--cpu_replicas`).
        on_evaluate: passed to `Trainer.train` (an experiment's hook after each evaluation).
        on_start: called with the `Trainer` once it is restored, before training: how an
            experiment prepares what it records (e.g. a record of step 0) in a resumable run.

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
        # An experiment's `on_start` needs the trainer, even that of a finished run.
        if on_start is None and (summary := _finished(config, run_dir, found)) is not None:
            return summary
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
                warn(line)
            if start := trainer.restore(found):
                run_dir.commit()
                say(f"Resuming {run_dir.path} from {found.path} (step {start}).")
            try:
                if on_start is not None:
                    on_start(trainer)
                record = trainer.train(
                    on_checkpoint=lambda step: run_dir.commit(), on_evaluate=on_evaluate
                )
                run_dir.commit()
                return _finish(config, trainer, data, run_dir, record, started)
            except KeyboardInterrupt:
                message = _interrupted(trainer.current_step, trainer.saved_step)
                raise RunError(message, status=130) from None
            except strategy_lib.PEER_FAILURES as error:
                if not strategy_lib.is_multi_worker(strategy):
                    raise
                message = strategy_lib.peer_failure_message(error, trainer.saved_step)
                raise RunError(message, status=75) from None
            except OSError as error:
                raise RunError(error, status=1) from None
    finally:
        keras.config.set_dtype_policy(previous_policy)


def _finished(config: TrainConfig, run_dir: RunDir, found) -> dict | None:
    """The saved summary of a finished run, marked complete; None if there is work to do.

    Work is left when the run has not reached `train_steps`, or when this command asks for an
    output the summary lacks (another export, other population statistics).
    """
    if found.step != config.train_steps or not run_dir.summary_path.is_file():
        return None
    summary = json.loads(run_dir.summary_path.read_text())
    exported = (summary.get("export_dir"), summary.get("export_folded"))
    if config.export_dir and exported != (config.export_dir, config.fold_bn):
        return None
    if config.population_stats and (
        summary.get("population_stats", {}).get("batches") != config.population_stats
    ):
        return None
    say(f"{run_dir.path} is already complete (step {found.step}): nothing to train.")
    return {**summary, "complete": True}


def _interrupted(step: int, saved_step: int | None) -> str:
    if saved_step is None:  # the model_dir is removed again (`RunDir.claim`)
        return f"interrupted at step {step}, before the first checkpoint; nothing was kept."
    return (
        f"interrupted at step {step}; run the same command again to resume from the checkpoint "
        f"of step {saved_step}."
    )


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
        export_lib.check_not_anothers(config.export_dir, run_dir.summary_path)
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
    lines = [f"Configuration ({source}; * = given explicitly):"]
    for key, value in sorted(config.to_dict().items()):
        lines.append(f"  {'*' if key in explicit else ' '} {key} = {value!r}")
    if config.preset:
        lines.append("Assumptions of this preset (the paper does not state these):")
        lines += [f"    - {line}" for line in presets.get(config.preset).assumptions]
    say("\n".join(lines))


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
            say(
                f"Recomputing population statistics over {config.population_stats} training "
                "batches (Alg. 2)."
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
