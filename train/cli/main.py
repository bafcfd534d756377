"""`python -m keras_bn.train` / `keras-bn-train`: train a zoo model, or run a paper experiment.

Examples::

    keras-bn-train --experiment=figure1 --model_dir=runs/figure1      # the paper's Figure 1
    keras-bn-train --experiment=table2 --model_dir=runs/table2        # Figure 2 / Table 2, mini
    keras-bn-train --experiment=evaluate --model_dir=runs/a,runs/b --eval_crops=1,144
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
TensorFlow's C++ log lines are not shown unless KERAS_BN_TF_LOGS=1.
"""

from __future__ import annotations

import sys
import time
from typing import NoReturn

from absl import app, logging
from absl import flags as absl_flags

from keras_bn.train.cli import flags as train_flags
from keras_bn.train.cli import quiet
from keras_bn.train.config import settings as config_lib
from keras_bn.train.experiments import registry
from keras_bn.train.messages import PROG, RunError, error, say, usage

FLAGS = absl_flags.FLAGS
train_flags.define_flags(FLAGS)


def fail(message: object, status: int = 2) -> NoReturn:
    """Exits with `status` after printing `message` as ONE line on stderr."""
    error(message)
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


def _dispatch() -> dict:
    """Runs what the flags ask for and reports it; every failure ends in `fail`."""
    started = time.perf_counter()
    try:
        given = {name: FLAGS[name].value for name in train_flags.present(FLAGS)}
        if FLAGS.experiment in registry.EXPERIMENTS:
            entry = registry.EXPERIMENTS[FLAGS.experiment]
            result = entry.run(given)
            say(entry.report(result, given, time.perf_counter() - started))
        else:
            experiment_only = [n for n in train_flags.EXPERIMENT_FLAGS if n in given]
            if experiment_only:
                fail(
                    f"{', '.join('--' + n for n in experiment_only)} belong(s) to "
                    "--experiment=evaluate|table2; a training run does not use them."
                )
            explicit = train_flags.explicit_values(FLAGS)
            try:
                config = config_lib.resolve(FLAGS.preset, explicit)
            except ValueError as error:  # a setting out of range
                fail(error)
            from keras_bn.train.engine import run as run_lib  # TensorFlow: not for --help

            result = run_lib.train(config, list(explicit), FLAGS.cpu_replicas)
            _report_training(result)
    except RunError as error:
        fail(error, error.status)
    except KeyboardInterrupt:  # before training started
        fail("interrupted before training started.", status=130)
    return result


def _report_training(summary: dict) -> None:
    final = summary["final"]
    parts = [
        f"{summary['model']} on {summary['dataset']}: {summary['steps']} steps"
        + (f" on {summary['replicas']} replicas" if summary["replicas"] > 1 else ""),
        "already complete, nothing trained"
        if summary.get("complete")
        else f"wall time {summary['wall_seconds']:.1f} s",
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
    say(f"{PROG}: done: " + " - ".join(parts) + f" - {outputs}")


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


_HELP = ("--help", "-h", "-?", "--helpshort")


def run() -> None:
    """Console-script entry point (`keras-bn-train`)."""
    args = sys.argv[1:]
    if not args:  # nothing to do: say how to use it, as for a wrong flag
        usage(__doc__)
        fail("no flags given; see the examples above, or --help for every flag.")
    # Help is ours, before absl sees the flags: grouped, exit status 0 (absl's is 1), and only
    # the trainer's flags (absl's --helpfull adds those of every module TensorFlow imports).
    if "--helpfull" in args:
        say(__doc__ + "\n" + train_flags.grouped_help(FLAGS, full=True))
        sys.exit(0)
    if any(arg in _HELP for arg in args):
        say(__doc__ + "\n" + train_flags.grouped_help(FLAGS))
        sys.exit(0)
    if not quiet.wanted():
        quiet.silence_native_stderr()
    # absl's --help prints the docstring of `__main__` and the key flags of the module named
    # sys.argv[0]: keras_bn/train/__main__.py or the generated console-script wrapper. Both
    # entry points come through here and show this module's usage.
    sys.modules["__main__"].__doc__ = __doc__
    for flag in FLAGS.get_key_flags_for_module(train_flags):
        FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
