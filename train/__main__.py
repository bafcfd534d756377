"""`python -m keras_bn.train` / `keras-bn-train`: train a zoo model, or run a paper experiment.

Examples::

    keras-bn-train --experiment=figure1 --model_dir=runs/figure1      # the paper's Figure 1
    keras-bn-train --preset=mnist_bn --model_dir=runs/mnist_bn --population_stats=100 \\
        --export_dir=runs/mnist_bn/export
    keras-bn-train --preset=bn_x30 --data_dir=~/tensorflow_datasets --model_dir=runs/bn_x30
    keras-bn-train --model=bn_inception --dataset=synthetic --train_steps=100 \\
        --model_kwargs=depth_multiplier=0.25 --image_size=96 --model_dir=/tmp/throughput

Everything is checked before the model_dir is created: a bad flag, an unknown model or preset,
a dataset that is not available offline, a batch size the replicas cannot share, or a model_dir
holding a different run, or an output folder that cannot be written, ends the program with
status 2 and one line on stderr. Restarting a killed run with the same flags resumes it from its
newest checkpoint that loads. Ctrl-C exits with status 130; under --strategy=multi_worker, a
worker whose cluster lost a peer exits with status 75 (start every worker again to resume).
TensorFlow's C++ log lines are not shown unless --verbose=2 or KERAS_BN_TF_LOGS=1.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from typing import NoReturn

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from absl import (
    app,  # noqa: E402
    logging,  # noqa: E402
)
from absl import flags as absl_flags  # noqa: E402

from keras_bn.train import config as config_lib  # noqa: E402
from keras_bn.train import flags as train_flags  # noqa: E402
from keras_bn.train import (
    presets,  # noqa: E402
    quiet,  # noqa: E402
)
from keras_bn.train.run_dir import RunDir, atomic_write_json, check_writable  # noqa: E402

PROG = "keras-bn-train"
FLAGS = absl_flags.FLAGS
train_flags.define_flags(FLAGS)

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


def fail(message: object, status: int = 2) -> NoReturn:
    """Exits with `status` after printing `message` as ONE line on stderr."""
    text = " ".join(str(message).split())
    print(f"{PROG}: error: {text}", file=sys.stderr, flush=True)
    sys.exit(status)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flags parser that reports errors in one line (absl prints two)."""
    try:
        rest = FLAGS(argv)
    except absl_flags.Error as error:
        fail(error)
    if len(rest) > 1:
        fail(f"unexpected positional arguments {rest[1:]}; every option is a --flag.")
    return rest


def _log(config_or_verbose, *lines: str) -> None:
    verbose = getattr(config_or_verbose, "verbose", config_or_verbose)
    if verbose:
        print(*lines, sep="\n", flush=True)


def _print_config(config: config_lib.TrainConfig, explicit: list[str]) -> None:
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


def _config_json(config: config_lib.TrainConfig, explicit: list[str]) -> str:
    data = config.to_dict()
    data["_meta"] = {
        "explicit_flags": sorted(explicit),
        "preset_assumptions": list(presets.get(config.preset).assumptions) if config.preset else [],
        "identity_fields": sorted(config.identity()),
    }
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def run_figure1_experiment() -> dict:
    """`--experiment=figure1`: the paper's Figure 1 into --model_dir."""
    given = train_flags.present(FLAGS)
    unused = [
        n for n in given if n not in FIGURE1_ARGUMENTS and n not in ("model_dir", "experiment")
    ]
    if unused:
        fail(
            f"--experiment=figure1 does not use {', '.join('--' + n for n in unused)}; it takes "
            f"--model_dir and {', '.join('--' + n for n in FIGURE1_ARGUMENTS)}."
        )
    if not FLAGS.model_dir:
        fail("--model_dir is required (the folder for figure1.png, the curves and the summary).")
    kwargs = {FIGURE1_ARGUMENTS[n]: FLAGS[n].value for n in given if n in FIGURE1_ARGUMENTS}
    try:
        from keras_bn.train.figure1 import run_figure1
    except ImportError as error:
        fail(f"--experiment=figure1 is not available ({error}).")
    identity = {"experiment": "figure1", "figure1_arguments": kwargs}
    try:
        check_writable(FLAGS.model_dir, "--model_dir")
    except OSError as error:
        fail(error)
    run_dir = RunDir(FLAGS.model_dir)
    started = time.perf_counter()
    try:
        with run_dir.claim(
            identity,
            json.dumps({**identity, "model_dir": FLAGS.model_dir}, indent=2, sort_keys=True) + "\n",
        ):
            result = run_figure1(FLAGS.model_dir, **kwargs)
            run_dir.commit()
    except ValueError as error:
        fail(error)
    except KeyboardInterrupt:
        fail(
            "interrupted; --experiment=figure1 keeps no checkpoints (it writes its outputs only "
            "at the end), so running the same command again starts over.",
            status=130,
        )
    seconds = time.perf_counter() - started
    parts = [
        f"baseline test accuracy {result['baseline_test_accuracy']:.4f}",
        f"BN test accuracy {result['bn_test_accuracy']:.4f}",
    ]
    if result.get("bn_test_accuracy_population") is not None:
        parts.append(f"BN with population stats {result['bn_test_accuracy_population']:.4f}")
    print(
        f"{PROG}: figure1 done in {seconds:.1f} s: "
        + ", ".join(parts)
        + f"; outputs in {FLAGS.model_dir} ({result.get('figure')})",
        flush=True,
    )
    return result


def _has_keras_bn_layers(model) -> bool:
    import keras_bn

    return any(isinstance(layer, keras_bn.BatchNormalization) for layer in model._flatten_layers())


def _prepare(config: config_lib.TrainConfig):
    """Checks everything that can be checked before the model_dir is touched.

    Returns:
        `(run_dir, strategy, data, model, found)`, `found` being the checkpoint to resume from
        (`checkpoints.find_restorable`); the model is built under the strategy's scope with
        the requested dtype policy (which stays set: the caller restores it).
    """
    import keras

    from keras_bn.train import checkpoints
    from keras_bn.train import data as data_lib
    from keras_bn.train import strategy as strategy_lib
    from keras_bn.train import trainer as trainer_lib

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
        model = trainer_lib.build_model(config, data.spec)
    if config.population_stats and not _has_keras_bn_layers(model):
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
    if found.step is not None and found.step > config.train_steps:
        raise ValueError(
            f"--model_dir={config.model_dir} is already trained to step {found.step} > "
            f"--train_steps={config.train_steps}; pass --train_steps>={found.step}."
        )
    return run_dir, strategy, data, model, found


def train_from_flags() -> dict:
    """One training run as the flags say; returns the summary (also in summary.json)."""
    started = time.perf_counter()
    explicit = train_flags.explicit_values(FLAGS)
    if not FLAGS.model_dir:
        fail("--model_dir is required (checkpoints, logs, metrics and config go there).")
    try:
        config = config_lib.resolve(FLAGS.preset, explicit)
    except ValueError as error:
        fail(error)

    from keras_bn.train import strategy as strategy_lib

    try:
        strategy_lib.split_cpu(FLAGS.cpu_replicas)
    except ValueError as error:
        fail(error)
    import keras

    from keras_bn.train.trainer import Trainer

    previous_policy = keras.config.dtype_policy()
    try:
        try:
            run_dir, strategy, data, model, found = _prepare(config)
        except (ValueError, OSError) as error:
            fail(error)
        chief = strategy_lib.is_chief(strategy)
        if chief:  # once per cluster
            _print_config(config, list(explicit))
        claim = (
            run_dir.claim(config.identity(), _config_json(config, list(explicit)))
            if chief
            else contextlib.nullcontext()
        )
        with claim:
            trainer = Trainer(config, strategy, data, run_dir, model=model, chief=chief)
            for line in found.describe():
                print(f"{PROG}: warning: {line}", file=sys.stderr, flush=True)
            start = trainer.restore(found)
            if start:
                run_dir.commit()
                print(f"Resuming {run_dir.path} from {found.path} (step {start}).", flush=True)
            try:
                record = trainer.train(on_checkpoint=lambda step: run_dir.commit())
                run_dir.commit()
                summary = _finish(config, trainer, data, run_dir, record, started)
            except KeyboardInterrupt:
                fail(
                    f"interrupted at step {trainer.current_step}; run the same command again to "
                    "resume from the last checkpoint.",
                    status=130,
                )
            except strategy_lib.PEER_FAILURES as error:
                if not strategy_lib.is_multi_worker(strategy):
                    raise
                fail(strategy_lib.peer_failure_message(error, trainer.saved_step), status=75)
            except OSError as error:
                fail(error, status=1)
    finally:
        keras.config.set_dtype_policy(previous_policy)
    _print_summary(config, summary)
    return summary


def _finish(config, trainer, data, run_dir, record, started) -> dict:
    """Population statistics, export and summary.json after training."""
    from keras_bn.train import export as export_lib

    summary = {
        "model": config.model,
        "dataset": config.dataset,
        "preset": config.preset,
        "steps": trainer.current_step,
        "final": record,
        "train_seconds": getattr(trainer, "train_seconds", 0.0),
        "replicas": trainer.strategy.num_replicas_in_sync,
        "model_dir": str(run_dir.path),
        "checkpoint": trainer.manager.latest_checkpoint,
        "tensorboard": str(run_dir.tensorboard_dir),
        "metrics": str(run_dir.metrics_path),
    }
    if config.population_stats:
        from keras_bn.population import recompute_population_statistics

        _log(
            config,
            f"Recomputing population statistics over {config.population_stats} "
            "training batches (Alg. 2).",
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


def _print_summary(config, summary: dict) -> None:
    final = summary["final"]
    parts = [
        f"{config.model} on {config.dataset}: {summary['steps']} steps"
        + (f" on {summary['replicas']} replicas" if summary["replicas"] > 1 else ""),
        f"wall time {summary['wall_seconds']:.1f} s",
    ]
    for key in ("eval_loss", "eval_accuracy", "eval_top5_accuracy"):
        if final.get(key) is not None:
            parts.append(f"{key} {final[key]:.4f}")
    if "population_stats" in summary:
        stats = summary["population_stats"]
        parts.append(
            f"with population stats ({stats['batches']} batches) eval_accuracy "
            f"{stats['eval_accuracy']:.4f}"
        )
    outputs = f"outputs in {summary['model_dir']}"
    if "export_dir" in summary:
        outputs += f", SavedModel in {summary['export_dir']}"
    print(f"{PROG}: done: " + " - ".join(parts) + f" - {outputs}", flush=True)


def _quiet_logs() -> None:
    """INFO logs of TensorFlow's savers would bury the progress bar; --verbosity restores them."""
    import logging as python_logging
    import warnings

    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
        python_logging.getLogger("tensorflow").setLevel(python_logging.WARNING)
    # tf.distribute reads a dataset's options in graph mode under MultiWorkerMirroredStrategy;
    # TensorFlow's notice about that concerns its own code, not the run.
    warnings.filterwarnings("ignore", message="To make it possible to preserve tf.data options")


def _dispatch() -> dict:
    if FLAGS.experiment == "figure1":
        return run_figure1_experiment()
    return train_from_flags()


def main(argv: list[str]) -> None:
    del argv  # checked by parse_flags
    _quiet_logs()
    _dispatch()


def cli(argv: list[str]) -> dict:
    """Runs the trainer in this process with command-line `argv` (without the program name).

    For tests and notebooks; flags are reset first. Errors exit through `SystemExit` as on the
    command line. Unlike the command line it leaves the caller's logging as it is (log levels,
    warning filters, `sys.stderr` and TensorFlow's C++ logs).

    Returns:
        The run's summary (as in summary.json) or, for `--experiment=figure1`, the dict
        `run_figure1` returns.
    """
    # Re-parsing resets absl's own --verbosity flag, i.e. the caller's absl log level.
    verbosity = logging.get_verbosity()
    FLAGS.unparse_flags()
    parse_flags([PROG, *argv])
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(verbosity)
    return _dispatch()


def run() -> None:
    """Console-script entry point (`keras-bn-train`)."""
    if not quiet.wanted(sys.argv[1:]):
        quiet.silence_native_stderr()
    # absl's --help prints the docstring of `__main__` and the key flags of the module named
    # sys.argv[0]: this module under `python -m keras_bn.train`, the generated wrapper (which
    # has neither) under the console script. Both entry points come through here.
    main_module = sys.modules["__main__"]
    if main_module.__doc__ is None:
        main_module.__doc__ = __doc__
    for flag in FLAGS.get_key_flags_for_module(train_flags):
        FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
