"""A trainer process killed with SIGKILL resumes and ends with the uninterrupted run's weights."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import tensorflow as tf
from conftest import kill_when

from keras_bn.train.cli.main import cli

ARGS = [
    "--preset=mnist_bn",
    "--train_steps=600",
    "--eval_every=200",
    "--checkpoint_every=20",
    "--steps_per_loop=5",
    "--eval_steps=1",
    "--eval_batch_size=1000",
    "--verbose=0",
]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


def trainer_command(model_dir):
    return [sys.executable, "-m", "keras_bn.train", *ARGS, f"--model_dir={model_dir}"]


def checkpoint_values(model_dir):
    path = tf.train.latest_checkpoint(str(model_dir / "checkpoints"))
    reader = tf.train.load_checkpoint(path)
    names = [
        name
        for name, _ in tf.train.list_variables(path)
        if "OBJECT_GRAPH" not in name and "save_counter" not in name
    ]
    return path, {name: reader.get_tensor(name) for name in names}


def test_sigkilled_run_resumes_to_the_same_final_weights(tmp_path):
    reference = tmp_path / "reference"
    cli([*ARGS, f"--model_dir={reference}"])

    killed = tmp_path / "killed"
    status = kill_when(
        trainer_command(killed), (killed / "checkpoints" / "checkpoint").exists, env=ENV
    )
    assert status == -signal.SIGKILL
    killed_at = int(tf.train.latest_checkpoint(str(killed / "checkpoints")).rsplit("-", 1)[1])
    assert 0 < killed_at < 600, "the kill came too late to test a resume"

    resumed = subprocess.run(
        trainer_command(killed), capture_output=True, text=True, timeout=300, env=ENV
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "done: mlp on mnist: 600 steps" in resumed.stdout

    ref_path, ref = checkpoint_values(reference)
    got_path, got = checkpoint_values(killed)
    assert ref_path.endswith("ckpt-600") and got_path.endswith("ckpt-600")
    assert sorted(ref) == sorted(got) and len(ref) > 10
    for name, value in ref.items():
        np.testing.assert_allclose(got[name], value, rtol=0, atol=1e-6, err_msg=name)

    def evals(model_dir):
        lines = (model_dir / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["eval_accuracy"], r["eval_loss"]) for r in map(json.loads, lines)]

    assert [s for s, *_ in evals(killed)] == [200, 400, 600]
    np.testing.assert_allclose(evals(killed), evals(reference), rtol=1e-6)
