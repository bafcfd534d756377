"""The trainer end to end, in this process: tiny runs of each model family, export, bad flags."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from conftest import cli_error

from keras_bn.train.cli.main import cli
from keras_bn.train.config import settings as config_lib
from keras_bn.train.data import pipeline as data_lib
from keras_bn.train.data.mnist_files import load_mnist
from keras_bn.train.engine import model as model_lib
from keras_bn.train.engine import trainer as trainer_lib

MLP_ARGS = [
    "--preset=mnist_bn",
    "--train_steps=60",
    "--eval_every=30",
    "--steps_per_loop=10",
    "--eval_batch_size=2000",
    "--verbose=0",
]

# Loads a SavedModel in a fresh interpreter, predicts, then runs `saved_model_cli show`.
LOAD_AND_SHOW = textwrap.dedent(
    """
    import sys
    import numpy as np
    import tensorflow as tf
    from tensorflow.python.tools import saved_model_cli

    export_dir, images, out = sys.argv[1:]
    served = tf.saved_model.load(export_dir)
    outputs = served.signatures["serve"](images=tf.constant(np.load(images)))
    np.save(out, outputs["logits"].numpy())
    sys.argv = ["saved_model_cli", "show", "--dir", export_dir, "--all"]
    saved_model_cli.main()
    """
)


def tensorboard_tags(folder):
    tags = set()
    for name in os.listdir(folder):
        for event in tf.compat.v1.train.summary_iterator(os.path.join(folder, name)):
            tags.update(value.tag for value in event.summary.value)
    return tags


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory):
    """One short MNIST run with a BN-folded export, shared by the tests below."""
    root = tmp_path_factory.mktemp("mlp")
    model_dir, export_dir = root / "run", root / "export"
    summary = cli(
        [*MLP_ARGS, f"--model_dir={model_dir}", f"--export_dir={export_dir}", "--fold_bn"]
    )
    return model_dir, export_dir, summary


def test_mlp_run_writes_checkpoints_metrics_config_and_logs(mlp_run):
    model_dir, export_dir, summary = mlp_run
    config = json.loads((model_dir / "config.json").read_text())
    assert config["preset"] == "mnist_bn" and config["train_steps"] == 60
    assert config["_meta"]["explicit_flags"] == sorted(
        [
            "train_steps",
            "eval_every",
            "steps_per_loop",
            "eval_batch_size",
            "verbose",
            "model_dir",
            "export_dir",
            "fold_bn",
        ]
    )
    records = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [30, 60]
    for r in records:
        assert 0.0 <= r["eval_accuracy"] <= 1.0 and np.isfinite(r["eval_loss"])
        assert r["learning_rate"] == 0.5
    assert records[-1]["train_accuracy"] > 0.3  # learning (chance is 0.1)
    assert sorted(p.name for p in (model_dir / "checkpoints").glob("*.index")) == [
        "ckpt-30.index",
        "ckpt-60.index",
    ]
    assert {"loss", "accuracy", "learning_rate", "steps_per_sec"} <= tensorboard_tags(
        model_dir / "tensorboard" / "train"
    )
    assert {"loss", "accuracy"} <= tensorboard_tags(model_dir / "tensorboard" / "eval")
    on_disk = json.loads((model_dir / "summary.json").read_text())
    assert on_disk["steps"] == summary["steps"] == 60
    assert on_disk["final"]["eval_accuracy"] == records[-1]["eval_accuracy"]
    assert on_disk["export_dir"] == str(export_dir) and on_disk["export_folded"] is True
    assert on_disk["fold_max_abs_difference"] < 1e-4
    assert not [p for p in model_dir.rglob("*") if p.name.endswith(".tmp")]


def test_exported_savedmodel_serves_raw_images_in_a_new_process(mlp_run, tmp_path):
    model_dir, export_dir, _ = mlp_run
    # The trained model (with BN, not folded), rebuilt from its last checkpoint here.
    config = config_lib.resolve("mnist_bn", {"model_dir": str(model_dir)})
    data = data_lib.make_data(config)
    model = model_lib.build_model(config, data.spec)
    tf.train.Checkpoint(model_variables=list(model.variables)).restore(
        tf.train.latest_checkpoint(str(model_dir / "checkpoints"))
    ).expect_partial()
    images = load_mnist("test")[0][:64]
    expected = model(data.preprocess_batch(images), training=False).numpy()

    np.save(tmp_path / "images.npy", images)
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            LOAD_AND_SHOW,
            str(export_dir),
            str(tmp_path / "images.npy"),
            str(tmp_path / "logits.npy"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "signature_def['serve']" in result.stdout
    assert "dtype: DT_UINT8" in result.stdout and "shape: (-1, 28, 28)" in result.stdout
    served = np.load(tmp_path / "logits.npy")
    np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-4)
    assert (served.argmax(-1) == expected.argmax(-1)).all()


def test_rerun_with_the_same_flags_resumes_and_other_flags_are_refused(mlp_run, capsys):
    model_dir, _, summary = mlp_run
    metrics = (model_dir / "metrics.jsonl").read_text()
    capsys.readouterr()
    again = cli([*MLP_ARGS, f"--model_dir={model_dir}"])  # finished: nothing to train
    assert again["final"] == summary["final"]
    assert "already complete, nothing trained" in capsys.readouterr().out
    assert (model_dir / "metrics.jsonl").read_text() == metrics
    capsys.readouterr()
    line = cli_error(capsys, [*MLP_ARGS, "--learning_rate=0.1", f"--model_dir={model_dir}"])
    assert "different flags" in line and "learning_rate: 0.5 != 0.1" in line
    line = cli_error(capsys, [*MLP_ARGS, "--train_steps=30", f"--model_dir={model_dir}"])
    assert "already trained to step 60" in line
    assert (model_dir / "metrics.jsonl").read_text() == metrics


def test_an_export_of_another_run_is_refused(mlp_run, tmp_path, capsys):
    _, export_dir, _ = mlp_run
    before = (export_dir / "saved_model.pb").stat().st_mtime_ns
    line = cli_error(
        capsys, [*MLP_ARGS, f"--model_dir={tmp_path}/other", f"--export_dir={export_dir}"]
    )
    assert f"--export_dir={export_dir} already holds something that is not this run's" in line
    assert (export_dir / "saved_model.pb").stat().st_mtime_ns == before
    assert not (tmp_path / "other").exists()


def test_bn_inception_on_mocked_imagenet_exports_a_raw_image_signature(tmp_path):
    model_dir, export_dir = tmp_path / "run", tmp_path / "export"
    with tfds.testing.mock_data(num_examples=8):
        summary = cli(
            [
                "--preset=bn_x5",
                f"--data_dir={tmp_path / 'tfds'}",
                # The pipeline and the export are the point here, not the net's depth.
                "--model_kwargs=depth_multiplier=0.1,final_endpoint=Mixed_3b",
                "--image_size=75",
                "--batch_size=4",
                "--eval_batch_size=8",
                "--train_steps=2",
                "--eval_every=2",
                f"--export_dir={export_dir}",
                f"--model_dir={model_dir}",
                "--verbose=0",
            ]
        )
    assert summary["model"] == "bn_inception" and summary["steps"] == 2
    assert np.isfinite(summary["final"]["eval_loss"])
    assert "eval_top5_accuracy" in summary["final"]
    assert (model_dir / "checkpoints" / "ckpt-2.index").exists()
    assert [json.loads(line)["step"] for line in (model_dir / "metrics.jsonl").open()] == [2]
    served = tf.saved_model.load(str(export_dir)).signatures["serve"]
    raw = np.random.default_rng(0).integers(0, 256, (2, 90, 120, 3), dtype=np.uint8)
    outputs = served(images=tf.constant(raw))  # raw images of any size: crop/resize inside
    assert outputs["probabilities"].shape == (2, 1000)
    np.testing.assert_allclose(outputs["probabilities"].numpy().sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("precision, jit", [("bfloat16", True), ("float16", False)])
def test_mixed_precision_xla_and_population_stats(tmp_path, precision, jit):
    import keras

    summary = cli(
        [
            "--preset=mnist_bn",
            "--train_steps=20",
            "--eval_every=20",
            "--eval_steps=2",
            "--eval_batch_size=1000",
            f"--mixed_precision={precision}",
            "--jit_compile" if jit else "--nojit_compile",
            "--population_stats=3",
            f"--model_dir={tmp_path}",
            "--verbose=0",
        ]
    )
    assert np.isfinite(summary["final"]["train_loss"])
    assert summary["final"]["train_accuracy"] > 0.2
    # Exact statistics (Alg. 2) beat 20 steps of moving averages that started at (0, 1).
    assert summary["population_stats"]["batches"] == 3
    assert summary["population_stats"]["eval_accuracy"] > summary["final"]["eval_accuracy"]
    assert keras.config.dtype_policy().name == "float32"  # restored after the run


@pytest.mark.parametrize(
    "argv, reason",
    [
        (["--model=resnet50"], "unknown --model='resnet50'"),
        (["--preset=bn_x100"], "flag --preset=bn_x100"),
        (["--dataset=tfds:mnist", "--data_dir={tmp}/no_tfds"], "not available offline"),
        (["--dataset=cifar"], "--dataset must be"),
        (["--batch_size=0"], "--batch_size must be positive"),
        (["--model_kwargs=depth_multiplier=0.5"], "--model=mlp takes no argument"),
        (["--preset=mnist_bn", "--model_kwargs=batch_norm=Treu"], "takes True or False"),
        (
            ["--model=bn_inception", "--dataset=synthetic", "--model_kwargs=depth_multipler=0.5"],
            "did you mean depth_multiplier?",
        ),
        (["--population_stats=5", "--preset=mnist_baseline"], "--population_stats needs"),
        (["extra_positional"], "unexpected positional"),
    ],
)
def test_bad_flags_exit_2_with_one_line_and_no_model_dir(tmp_path, capsys, argv, reason):
    model_dir = tmp_path / "never" / "run"
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert reason in cli_error(capsys, [*argv, f"--model_dir={model_dir}", "--verbose=0"])
    assert not (tmp_path / "never").exists()


def test_learning_rate_decays_in_epochs_six_times_faster_for_bn_x30():
    def lr_at(preset, step):
        config = config_lib.resolve(preset, {})
        variable = tf.Variable(step, dtype=tf.int64)
        return float(trainer_lib.learning_rate_fn(config, 1_281_167, variable)())

    steps_per_8_epochs = 8 * 1_281_167 / 32
    assert lr_at("inception", 0) == pytest.approx(0.0015)
    assert lr_at("inception", int(steps_per_8_epochs) - 1) == pytest.approx(0.0015)
    assert lr_at("inception", int(steps_per_8_epochs) + 1) == pytest.approx(0.0015 * 0.96)
    assert lr_at("bn_x30", int(steps_per_8_epochs) + 1) == pytest.approx(0.045 * 0.96**6)
    assert lr_at("mnist_bn", 10**6) == pytest.approx(0.5)  # no decay


def test_progress_into_a_file_is_clean_lines_with_the_run_eta(tmp_path, capsys):
    cli([*MLP_ARGS, "--verbose=1", f"--model_dir={tmp_path}/run"])
    out = capsys.readouterr().out  # captured: not a terminal
    assert not any(c in out for c in "\x08\x1b\r"), repr(out[-500:])
    assert "step 30 - train_loss" in out and "run ETA" in out


def test_evaluate_works_on_an_mlp_run(mlp_run, capsys):
    model_dir, _, summary = mlp_run
    result = cli(["--experiment=evaluate", f"--model_dir={model_dir}"])
    assert result["images"] == 10_000
    accuracy = result["accuracy"]["1"]["models"][0]
    assert accuracy == pytest.approx(summary["final"]["eval_accuracy"], abs=1e-3)
    line = cli_error(
        capsys, ["--experiment=evaluate", f"--model_dir={model_dir}", "--eval_crops=10"]
    )
    assert "mlp takes whole images as flat vectors" in line
