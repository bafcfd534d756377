"""`--experiment=figure1` wiring: explicit flags reach `run_figure1`, others are refused."""

import inspect
import json

import pytest
from conftest import cli_error

from keras_bn.train.cli import main as main_module
from keras_bn.train.cli.main import cli
from keras_bn.train.experiments import figure1
from keras_bn.train.experiments.registry import FIGURE1_ARGUMENTS


@pytest.fixture
def calls(monkeypatch):
    """Replaces the (minutes-long) experiment by a recorder; the real one has its own tests."""
    recorded = []

    def fake_run_figure1(output_dir, **kwargs):
        recorded.append((output_dir, kwargs))
        return {
            "baseline_test_accuracy": 0.9,
            "bn_test_accuracy": 0.95,
            "bn_test_accuracy_population": None,
            "figure": f"{output_dir}/figure1.png",
        }

    monkeypatch.setattr(figure1, "run_figure1", fake_run_figure1)
    return recorded


def test_every_passed_flag_is_a_run_figure1_argument():
    parameters = inspect.signature(figure1.run_figure1).parameters
    for argument in FIGURE1_ARGUMENTS.values():
        assert (
            argument in parameters and parameters[argument].kind is inspect.Parameter.KEYWORD_ONLY
        )


def test_only_explicit_flags_are_passed_through(tmp_path, calls, capsys):
    result = cli(["--experiment=figure1", f"--model_dir={tmp_path}/fig"])
    assert result["bn_test_accuracy"] == 0.95
    assert "baseline test accuracy 0.9000, BN test accuracy 0.9500" in capsys.readouterr().out
    cli(
        [
            "--experiment=figure1",
            f"--model_dir={tmp_path}/fig2",
            "--train_steps=1000",
            "--learning_rate=0.1",
            "--nobinarize",
            "--seed=4",
            "--batch_size=30",
            "--eval_every=100",
            "--verbose=0",
        ]
    )
    assert calls[0] == (f"{tmp_path}/fig", {"runs_dir": f"{tmp_path}/fig"})
    assert calls[1] == (
        f"{tmp_path}/fig2",
        {
            "steps": 1000,
            "learning_rate": 0.1,
            "binarize": False,
            "seed": 4,
            "batch_size": 30,
            "eval_every": 100,
            "verbose": 0,
            "runs_dir": f"{tmp_path}/fig2",
        },
    )
    saved = json.loads((tmp_path / "fig2" / "config.json").read_text())
    assert saved["experiment"] == "figure1" and saved["figure1_arguments"]["steps"] == 1000


def test_flags_figure1_does_not_use_and_mixed_runs_are_refused(tmp_path, calls, capsys):
    assert "does not use --model" in cli_error(
        capsys, ["--experiment=figure1", f"--model_dir={tmp_path}/a", "--model=bn_inception"]
    )
    assert "--model_dir is required" in cli_error(capsys, ["--experiment=figure1"])

    cli(["--experiment=figure1", f"--model_dir={tmp_path}/b", "--train_steps=500"])
    assert "different flags" in cli_error(
        capsys, ["--experiment=figure1", f"--model_dir={tmp_path}/b", "--train_steps=1000"]
    )
    # A figure1 folder is not a training run's, and says so in a few words.
    line = cli_error(capsys, ["--preset=mnist_bn", f"--model_dir={tmp_path}/b", "--train_steps=1"])
    assert "different flags: it is an --experiment=figure1 folder" in line and "!=" not in line
    assert len(calls) == 1 and not (tmp_path / "a").exists()


def test_failing_experiment_leaves_no_directory(tmp_path, monkeypatch, capsys):
    def bad(output_dir, **kwargs):
        raise ValueError("`steps` must be a multiple of `eval_every`")

    monkeypatch.setattr(figure1, "run_figure1", bad)
    assert "multiple of" in cli_error(
        capsys, ["--experiment=figure1", f"--model_dir={tmp_path}/c", "--train_steps=7"]
    )
    assert not (tmp_path / "c").exists()
    assert main_module.PROG == "keras-bn-train"
