"""`--experiment=table2`: the miniature's scaling, the table, the outputs, end to end, resumed."""

import csv
import io
import json
import re

import crop_oracle
import pytest
from conftest import cli_error

from keras_bn.train.cli.main import cli
from keras_bn.train.config import presets
from keras_bn.train.evaluation.runs import evaluate_runs, restore_run
from keras_bn.train.experiments import registry, results, table2
from keras_bn.train.rundir.folder import RunDir, json_text

# The tiny experiment: every net a few steps, BN-x30 alone in the ensemble (the ensemble of
# several runs is checked on two of the nets below), 1 crop. Each net is cut after its first
# Inception module (the zoo's `final_endpoint`): building and compiling the full 70-layer graphs
# is most of a short run's time, and this test is about the experiment, not the nets' depth
# (docs/table2_summary.md shows the full nets trained; tests/test_models_inception.py trains
# each for a few steps).
TINY = [
    "--experiment=table2",
    "--inception_steps=40",
    "--eval_every=20",
    "--eval_steps=1",
    "--ensemble_size=1",
    "--eval_crops=1",
    "--model_kwargs=depth_multiplier=0.1,final_endpoint=Mixed_3b",
    "--verbose=1",
]


def configs(**options):
    options = table2.Options(model_dir="runs/t2", **options)
    return {run.folder: table2.net_config(options, run) for run in table2.runs(options)}


def test_miniature_scales_every_step_count_by_one_factor():
    c = configs()
    k = 5_000 / 31e6
    assert [c[n].train_steps for n in ("inception", "inception_sigmoid")] == [5000, 5000]
    assert c["bn_baseline"].train_steps == round(13.3e6 * k)
    # BN-x5 trains as long as BN-x30 (6M steps, times k): Figure 2 follows it past 2.1M.
    for name in ("bn_x5", "bn_x30", "bn_x5_sigmoid", "bn_x30_seed1", "bn_x30_seed2"):
        assert c[name].train_steps == round(6e6 * k)
    # The decay interval: 8 ImageNet epochs of batch-32 steps, times k, in MNIST epochs.
    assert c["inception"].lr_decay_epochs == pytest.approx(8 * 1_281_167 * k / 60_000)
    assert c["bn_x5"].lr_decay_epochs == pytest.approx(c["inception"].lr_decay_epochs / 6)


def test_each_net_keeps_its_presets_recipe():
    c = configs()
    for folder, config in c.items():
        preset = presets.get(config.preset).values
        for key in ("learning_rate", "weight_decay", "momentum", "batch_size", "model"):
            assert getattr(config, key) == preset[key], (folder, key)
        for key, value in preset["model_kwargs"].items():
            assert config.model_kwargs[key] == value
        assert config.model_kwargs["depth_multiplier"] == 0.25
        assert (config.dataset, config.image_size, config.augment) == ("mnist", 75, "none")
    assert c["inception_sigmoid"].model_kwargs["activation"] == "sigmoid"
    assert c["inception_sigmoid"].preset == "inception"
    assert [c[n].seed for n in ("bn_x30", "bn_x30_seed1", "bn_x30_seed2")] == [0, 1, 2]
    rates = [c[n].learning_rate / c["inception"].learning_rate for n in ("bn_x5", "bn_x30")]
    assert rates == pytest.approx([5, 30])


def test_paper_size_runs_the_presets_unchanged():
    c = configs(dataset="tfds:imagenet2012", data_dir="/data/tfds")
    for folder in ("inception", "bn_baseline", "bn_x30", "bn_x5_sigmoid"):
        preset = presets.get(c[folder].preset).values
        for key in ("train_steps", "lr_decay_epochs", "eval_every", "image_size", "augment"):
            assert getattr(c[folder], key) == preset[key], (folder, key)
        assert c[folder].data_dir == "/data/tfds"
    assert c["bn_x5"].train_steps == 6_000_000


@pytest.mark.parametrize(
    "options, message",
    [
        ({"dataset": "synthetic"}, "mnist (the miniature) or tfds:imagenet2012"),
        ({"ensemble_size": 0}, "--ensemble_size must be >= 1"),
        ({"inception_steps": 0}, "--inception_steps must be positive"),
    ],
)
def test_options_that_cannot_run_are_refused(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        table2.Options(model_dir="x", **options).check()


def curves(best_steps):
    """Synthetic curves: each net climbs linearly to 0.9 at its step in `best_steps`."""
    steps = list(range(100, 1100, 100))
    return {
        name: {
            "steps": steps,
            "accuracy": [min(0.9, 0.9 * s / best) if best else 0.1 for s in steps],
            "train_loss": [1.0] * len(steps),
            "learning_rate": [0.1] * len(steps),
        }
        for name, best in best_steps.items()
    }


def test_table_counts_steps_to_inceptions_best():
    best = dict(
        inception=1000,
        bn_baseline=500,
        bn_x5=200,
        bn_x30=300,
        bn_x5_sigmoid=None,
        inception_sigmoid=None,
    )
    rows = table2.table(curves(best), k=1e-4)
    assert rows["inception"]["steps_to_inception_best"] == 1000
    assert rows["inception"]["evaluations_to_best"] == 10
    assert rows["bn_x5"]["steps_to_inception_best"] == 200
    assert rows["bn_x5"]["best_step"] == 200
    assert rows["bn_x5_sigmoid"]["steps_to_inception_best"] is None
    assert rows["bn_baseline"]["paper_steps_to_inception_best_scaled"] == 1330


def test_first_step_at():
    assert results.first_step_at([1, 2, 3], [0.1, 0.5, 0.5], 0.5) == 2
    assert results.first_step_at([1, 2], [0.1, 0.2], 0.5) is None


# End to end ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny experiment, run once through the command line."""
    model_dir = tmp_path_factory.mktemp("table2") / "run"
    result = cli([*TINY, f"--model_dir={model_dir}"])
    return model_dir, result


@pytest.mark.slow
def test_tiny_experiment_writes_every_output(tiny, capsys):
    model_dir, result = tiny
    folders = [run.folder for run in table2.runs(table2.Options("x", ensemble_size=1))]
    for name in ("figure2.png", "summary.md", "table2.csv", "table2.json", "config.json"):
        assert (model_dir / name).is_file(), name
    assert (model_dir / "figure2.png").read_bytes().startswith(b"\x89PNG")
    for folder in folders:  # each net is an ordinary, resumable training run
        assert (model_dir / folder / "checkpoints").is_dir()
        assert json.loads((model_dir / folder / "summary.json").read_text())["steps"] > 0
    saved = json.loads((model_dir / "table2.json").read_text())
    assert sorted(saved["curves"]) == sorted(folders)
    inception = saved["curves"]["inception"]
    assert inception["steps"] == [20, 40]
    assert all(0.0 <= a <= 1.0 for c in saved["curves"].values() for a in c["accuracy"])
    rows = list(csv.DictReader(io.StringIO((model_dir / "table2.csv").read_text())))
    assert len(rows) == sum(len(c["steps"]) for c in saved["curves"].values())
    summary = (model_dir / "summary.md").read_text()
    for net in table2.NETS:
        assert f"| {net.label} |" in summary
    assert set(saved["crops"]["accuracy"]) == {"1"}
    assert saved["crops"]["model_dirs"] == [str(model_dir / "bn_x30")]
    assert result["table"] == saved["table"]


@pytest.mark.slow
def test_evaluate_command_matches_the_crop_and_ensemble_library(tiny, capsys):
    """evaluate_runs reads single models and the ensemble off one pass; the oracle recomputes."""
    model_dir, _ = tiny
    members = [str(model_dir / "bn_x30"), str(model_dir / "bn_x5")]  # same inputs and classes
    got = cli(["--experiment=evaluate", f"--model_dir={','.join(members)}", "--eval_crops=10"])
    out = capsys.readouterr().out
    assert "top-1 accuracy on 100 images" in out and "ensemble" in out
    trainers = [restore_run(d) for d in members]
    batches = list(trainers[0].data.raw_eval_batches())
    size = trainers[0].data.spec.input_shape[0]
    models = [crop_oracle.accuracy([t.model], batches, size, 10) for t in trainers]
    assert got["accuracy"]["10"]["models"] == pytest.approx(models, abs=1e-9)
    both = crop_oracle.accuracy([t.model for t in trainers], batches, size, 10)
    assert got["accuracy"]["10"]["ensemble"] == pytest.approx(both, abs=1e-9)


def test_a_one_model_ensemble_is_that_model(tiny):
    model_dir, _ = tiny
    one = evaluate_runs([str(model_dir / "bn_x30")], (1,), max_images=40, verbose=0)
    assert one["images"] == 40
    assert one["accuracy"]["1"]["ensemble"] == one["accuracy"]["1"]["models"][0]


@pytest.mark.slow
def test_rerun_resumes_without_training_again(tiny, capsys):
    model_dir, _ = tiny
    before = {p: p.read_bytes() for p in model_dir.glob("*/metrics.jsonl")}
    (model_dir / "summary.md").unlink()
    cli([*TINY, f"--model_dir={model_dir}", "--eval_crops=1", "--verbose=0"])
    assert (model_dir / "summary.md").is_file()
    assert {p: p.read_bytes() for p in model_dir.glob("*/metrics.jsonl")} == before
    assert capsys.readouterr().out.count("is already complete") == len(before)


def test_other_flags_and_a_different_experiment_are_refused(tmp_path, capsys):
    assert "--experiment=table2 does not use --batch_size" in cli_error(
        capsys, ["--experiment=table2", f"--model_dir={tmp_path}/a", "--batch_size=8"]
    )
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text(json.dumps({"experiment": "figure1"}))
    assert "holds a run with different flags" in cli_error(
        capsys, ["--experiment=table2", f"--model_dir={tmp_path}/b"]
    )


@pytest.mark.parametrize("experiment", ["table2", "evaluate"])
def test_eval_crops_is_checked_once_for_every_experiment(experiment, tmp_path, capsys):
    # One check, before anything runs: the same line for both experiments, and no folder made
    # (evaluate would otherwise first fail on the missing run).
    line = cli_error(
        capsys, [f"--experiment={experiment}", f"--model_dir={tmp_path}/a", "--eval_crops=1,7"]
    )
    assert line.endswith("--eval_crops takes 1, 10 or 144 (comma-separated), got ['1', '7'].")
    assert not (tmp_path / "a").exists()


def test_train_steps_is_refused_with_the_option_table2_uses(tmp_path, capsys):
    # --train_steps is one run's step count everywhere; table2 scales its nets from Inception's.
    line = cli_error(
        capsys, ["--experiment=table2", f"--model_dir={tmp_path}/a", "--train_steps=40"]
    )
    assert "--inception_steps" in line and "not --train_steps" in line
    assert not (tmp_path / "a").exists()


def test_a_folder_from_before_inception_steps_resumes_under_the_new_name(tmp_path):
    # Folders started when table2's option was still called train_steps keep resuming.
    run_dir = RunDir(tmp_path / "t2")
    run_dir.path.mkdir()
    old = {"experiment": "table2", "train_steps": 40, "ensemble_size": 1}
    run_dir.config_path.write_text(json_text(old))
    registry._rename_table2_steps(run_dir)
    saved = json.loads(run_dir.config_path.read_text())
    assert saved == {"experiment": "table2", "inception_steps": 40, "ensemble_size": 1}
    assert run_dir.check(saved) == saved


def test_inception_steps_sets_the_time_factor():
    c = configs(inception_steps=31_000)  # k = 1/1000
    assert c["inception"].train_steps == 31_000 and c["bn_x30"].train_steps == 6_000


def test_evaluate_refuses_a_folder_without_a_run(tmp_path, capsys):
    assert "holds no config.json" in cli_error(
        capsys, ["--experiment=evaluate", f"--model_dir={tmp_path}"]
    )


def test_experiment_flags_are_refused_by_a_training_run(tmp_path, capsys):
    for flag in ("--eval_crops=144", "--inception_steps=40", "--ensemble_size=2"):
        assert f"{flag.split('=')[0]} belong(s) to --experiment=evaluate|table2" in cli_error(
            capsys, ["--preset=mnist_bn", f"--model_dir={tmp_path}/a", flag]
        )
    assert not (tmp_path / "a").exists()
