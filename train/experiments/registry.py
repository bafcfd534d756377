"""The experiments `--experiment` names, registered in one place (`EXPERIMENTS`).

Each entry checks the flags it was given, claims its folder, runs (its nets through
`keras_bn.train.engine.run.train`, so each resumes after a kill) and returns the result its
`report` prints. A later experiment is one more function here and one more entry.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Collection, Mapping
from typing import Any

from keras_bn.train.config.settings import setting
from keras_bn.train.experiments import figure1 as figure1_lib
from keras_bn.train.experiments import table2 as table2_lib
from keras_bn.train.messages import PROG, RunError
from keras_bn.train.rundir.folder import RunDir, atomic_write_text, check_writable, json_text

# --experiment=figure1 takes these flags (flag name -> run_figure1 argument), as its options
# declare them.
FIGURE1_ARGUMENTS = {
    f.metadata["flag"]: f.name
    for f in dataclasses.fields(figure1_lib.Options)
    if f.metadata["flag"]
}
# --experiment=table2 takes these flags: the fields of its options.
TABLE2_ARGUMENTS = tuple(f.name for f in dataclasses.fields(table2_lib.Options))


def figure1(given: Mapping[str, Any]) -> dict:
    """`--experiment=figure1`: the paper's Figure 1, written into `model_dir`.

    Args:
        given: flag name -> value for every flag given explicitly (`--model_dir`: the folder
            for figure1.png, the curves and the summary); the ones in
            `FIGURE1_ARGUMENTS` are passed to `run_figure1`, any other (but `--model_dir` and
            `--experiment`) is refused.

    Returns:
        What `keras_bn.train.experiments.figure1.run_figure1` returns.

    Raises:
        RunError: for a flag figure1 does not use, a folder holding another run, a failing
            experiment (nothing is left in `model_dir`) or Ctrl-C (status 130).
    """
    _check_flags("figure1", given, FIGURE1_ARGUMENTS)
    model_dir = given.get("model_dir")
    if not model_dir:
        raise RunError(
            "--model_dir is required (the folder for figure1.png, the curves and the summary)."
        )
    kwargs = {FIGURE1_ARGUMENTS[n]: value for n, value in given.items() if n in FIGURE1_ARGUMENTS}
    # What may differ on resume: how much is printed.
    identity = {
        "experiment": "figure1",
        "figure1_arguments": {k: v for k, v in kwargs.items() if k != "verbose"},
    }
    config_json = json_text({**identity, "model_dir": model_dir})
    try:
        check_writable(model_dir, "--model_dir")
        run_dir = RunDir(model_dir)
        claim = run_dir.claim(identity, config_json)
    except (ValueError, OSError) as error:
        raise RunError(error) from None
    interrupted = (
        "interrupted; run the same command again to resume (each net from its last checkpoint)."
    )
    with _as_run_errors(interrupted), claim:
        if (done := figure1_lib.finished_result(model_dir)) is not None:
            run_dir.commit()
            return done
        try:
            return figure1_lib.run_figure1(model_dir, runs_dir=model_dir, **kwargs)
        finally:  # keep the folder once any net has a checkpoint to resume from
            if any(p.is_dir() for p in run_dir.path.glob("*/checkpoints")):
                run_dir.commit()


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
    if "train_steps" in given:  # a flag means one thing everywhere: one run's steps
        raise RunError(
            "--experiment=table2 trains several nets, each for its own number of steps: set "
            "Inception's with --inception_steps (the others scale with it), not --train_steps."
        )
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
        _rename_table2_steps(run_dir)
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


def _rename_table2_steps(run_dir: RunDir) -> None:
    """Lets a table2 folder started before `--inception_steps` existed resume: its config.json
    names the same option `train_steps` (it always meant Inception's step count there)."""
    if not run_dir.config_path.exists():
        return
    saved = json.loads(run_dir.config_path.read_text())
    if saved.get("experiment") == "table2" and "train_steps" in saved:
        saved["inception_steps"] = saved.pop("train_steps")
        atomic_write_text(run_dir.config_path, json_text(saved))


@dataclasses.dataclass(frozen=True)
class EvaluateOptions:
    """What `--experiment=evaluate` takes (flag = field name), declared as a run's settings."""

    model_dir: str = setting("", "One trained run, or several separated by commas (an ensemble)")
    eval_crops: tuple[int, ...] = setting((1,), "Crop counts per image")
    verbose: int = setting(1, "0 silent, else one line per (model, crop count)")


def evaluate(given: Mapping[str, Any]) -> dict:
    """`--experiment=evaluate`: trained runs on 1, 10 or 144 crops, alone and as an ensemble.

    Nothing is written.

    Raises:
        RunError: for a flag it does not use, or a folder that holds no trained run.
    """
    from keras_bn.train.evaluation.runs import evaluate_runs

    _check_flags("evaluate", given, [f.name for f in dataclasses.fields(EvaluateOptions)])
    values = {n: v for n, v in given.items() if n != "experiment"}
    if values.get("eval_crops"):  # an empty --eval_crops= means the default, as it always did
        values["eval_crops"] = _crop_counts(values["eval_crops"])
    else:
        values.pop("eval_crops", None)
    options = EvaluateOptions(**values)
    model_dirs = [d for d in options.model_dir.split(",") if d]
    if not model_dirs:
        raise RunError("--model_dir is required: one trained run, or several separated by commas.")
    try:
        return evaluate_runs(model_dirs, options.eval_crops, verbose=options.verbose)
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


def _report_figure1(result: dict, given: Mapping[str, Any], seconds: float) -> str:
    parts = [
        f"baseline test accuracy {result['baseline_test_accuracy']:.4f}",
        f"BN test accuracy {result['bn_test_accuracy']:.4f}",
    ]
    if result.get("bn_test_accuracy_population") is not None:
        parts.append(f"BN with population stats {result['bn_test_accuracy_population']:.4f}")
    done = "is already complete" if result.get("complete") else f"done in {seconds:.1f} s"
    return (
        f"{PROG}: figure1 {done}: {', '.join(parts)}; outputs in "
        f"{given.get('model_dir')} ({result.get('figure')})"
    )


def _report_table2(result: dict, given: Mapping[str, Any], seconds: float) -> str:
    table = result["table"]
    parts = [
        f"{row['label']} best {row['best_accuracy']:.4f}"
        + (
            f", Inception's best at step {row['steps_to_inception_best']}"
            if row["steps_to_inception_best"] is not None
            else ", never at Inception's best"
        )
        for row in table.values()
    ]
    return (
        f"{PROG}: table2 done in {result['wall_seconds'] / 60:.1f} min: "
        + "; ".join(parts)
        + f" - outputs in {given.get('model_dir')} ({result['outputs']['figure2.png']}, "
        f"{result['outputs']['summary.md']})"
    )


def _report_crops(result: dict, given: Mapping[str, Any], seconds: float) -> str:
    parts = [
        f"{n} crop(s) "
        + "/".join(f"{a:.4f}" for a in accuracy["models"])
        + (f", ensemble {accuracy['ensemble']:.4f}" if len(accuracy["models"]) > 1 else "")
        for n, accuracy in result["accuracy"].items()
    ]
    return (
        f"{PROG}: top-1 accuracy on {result['images']} images of "
        f"{','.join(result['model_dirs'])}: " + "; ".join(parts)
    )


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One `--experiment`: its help, how it runs from the given flags, and its report line."""

    help: str
    run: Callable[[Mapping[str, Any]], dict]
    report: Callable[[dict, Mapping[str, Any], float], str]


EXPERIMENTS = {
    "figure1": Experiment(
        "the paper's Figure 1 (MNIST baseline vs BN, 3 panels) written into --model_dir",
        figure1,
        _report_figure1,
    ),
    "table2": Experiment(
        "the six ImageNet nets of section 4.2 (Figure 2, Table 2) and the crop/ensemble "
        "evaluation of section 4.3, in miniature on MNIST unless --dataset=tfds:imagenet2012",
        table2,
        _report_table2,
    ),
    "evaluate": Experiment(
        "the trained run(s) of --model_dir (comma-separated: an ensemble) on --eval_crops crops",
        evaluate,
        _report_crops,
    ),
}
