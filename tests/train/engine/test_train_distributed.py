"""--strategy=mirrored over two logical CPUs, in a subprocess that splits the CPU first."""

import json
import os
import subprocess
import sys

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


def trainer(*argv):
    return subprocess.run(
        [sys.executable, "-m", "keras_bn.train", *argv],
        capture_output=True,
        text=True,
        timeout=400,
        env=ENV,
    )


def test_mirrored_run_on_two_logical_cpus(tmp_path):
    model_dir, export_dir = tmp_path / "run", tmp_path / "export"
    result = trainer(
        "--preset=mnist_bn",
        "--strategy=mirrored",
        "--cpu_replicas=2",
        "--train_steps=20",
        "--eval_every=10",
        "--eval_batch_size=1000",
        "--eval_steps=2",
        "--population_stats=2",
        f"--export_dir={export_dir}",
        f"--model_dir={model_dir}",
        "--verbose=2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "20 steps on 2 replicas" in result.stdout
    summary = json.loads((model_dir / "summary.json").read_text())
    assert summary["replicas"] == 2 and summary["steps"] == 20
    assert summary["final"]["train_accuracy"] > 0.2
    assert summary["population_stats"]["batches"] == 2
    assert (model_dir / "checkpoints" / "ckpt-20.index").exists()
    assert (export_dir / "saved_model.pb").exists()
    steps = [json.loads(line)["step"] for line in (model_dir / "metrics.jsonl").open()]
    assert steps == [10, 20]


def test_batch_size_not_divisible_by_the_replicas_fails_before_the_model_dir(tmp_path):
    model_dir = tmp_path / "run"
    result = trainer(
        "--preset=mnist_bn",
        "--strategy=mirrored",
        "--cpu_replicas=2",
        "--batch_size=61",
        f"--model_dir={model_dir}",
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1] == (
        "keras-bn-train: error: --batch_size=61 is not divisible by the 2 replicas of the "
        "strategy; use a multiple of 2."
    ), result.stderr[-2000:]
    assert sum(line.startswith("keras-bn-train:") for line in lines) == 1
    assert "Traceback" not in result.stderr
    assert not model_dir.exists()
