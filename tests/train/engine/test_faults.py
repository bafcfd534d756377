"""Faults a long run meets, and what the trainer keeps through each.

Damaged checkpoints (garbage or missing state file, truncated data file or index, a checkpoint
that does not read back after saving), output folders that cannot be written, bad flags, Ctrl-C
in `--experiment=figure1`, file permissions and TensorFlow's C++ logs on the command line.
The cluster faults (a worker killed) are in test_train_multi_worker.py.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import tensorflow as tf
from conftest import cli_error

from keras_bn.train.cli.main import cli
from keras_bn.train.rundir import checkpoints

ARGS = [
    "--preset=mnist_bn",
    "--eval_every=20",
    "--steps_per_loop=5",
    "--eval_steps=1",
    "--eval_batch_size=1000",
    "--verbose=0",
]
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
ENV.pop("KERAS_BN_TF_LOGS", None)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run trained to step 40: checkpoints ckpt-20 and ckpt-40, evaluations at 20 and 40."""
    model_dir = tmp_path_factory.mktemp("faults") / "run"
    cli([*ARGS, "--train_steps=40", f"--model_dir={model_dir}"])
    return model_dir


@pytest.fixture
def run(trained, tmp_path):
    """A fresh copy of the trained run, to damage."""
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def records(model_dir):
    return {r["step"]: r for r in map(json.loads, (model_dir / "metrics.jsonl").open())}


def resume(model_dir, capsys, steps=60):
    before = records(model_dir)
    summary = cli([*ARGS, f"--train_steps={steps}", f"--model_dir={model_dir}"])
    out, err = capsys.readouterr()
    assert summary["steps"] == steps
    return before, out, err


def assert_kept(model_dir, before, resumed_from):
    """Records up to the resume step are kept as they were; later ones are trained again to the
    very same values (training is deterministic), so nothing of the run was lost."""
    after = records(model_dir)
    assert sorted(after) == [20, 40, 60]
    for step, record in before.items():
        if step <= resumed_from:
            assert after[step] == record
        else:
            np.testing.assert_allclose(
                [after[step]["eval_loss"], after[step]["eval_accuracy"]],
                [record["eval_loss"], record["eval_accuracy"]],
                rtol=1e-6,
            )
    present = sorted(p.name for p in (model_dir / "checkpoints").glob("ckpt-*.index"))
    assert present == ["ckpt-20.index", "ckpt-40.index", "ckpt-60.index"]
    # The state file is valid again and the manager knows every checkpoint.
    state = tf.train.get_checkpoint_state(str(model_dir / "checkpoints"))
    assert state.model_checkpoint_path.endswith("ckpt-60")
    assert [p.rsplit("/", 1)[1] for p in state.all_model_checkpoint_paths] == [
        "ckpt-20",
        "ckpt-40",
        "ckpt-60",
    ]


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_garbage_state_file_resumes_from_the_newest_checkpoint(run, capsys):
    (run / "checkpoints" / "checkpoint").write_text("this is not a checkpoint state\x00\xff")
    before, out, err = resume(run, capsys)
    assert f"Resuming {run} from {run / 'checkpoints' / 'ckpt-40'} (step 40)." in out
    assert "skipped" not in err
    assert_kept(run, before, resumed_from=40)


def test_missing_state_file_resumes_from_the_newest_checkpoint(run, capsys):
    (run / "checkpoints" / "checkpoint").unlink()
    before, out, _ = resume(run, capsys)
    assert f"from {run / 'checkpoints' / 'ckpt-40'} (step 40)." in out
    assert_kept(run, before, resumed_from=40)


@pytest.mark.parametrize("damaged", ["ckpt-40.data-00000-of-00001", "ckpt-40.index"])
def test_truncated_newest_checkpoint_resumes_from_the_one_before(run, capsys, damaged):
    truncate(run / "checkpoints" / damaged)
    before, out, err = resume(run, capsys)
    assert f"from {run / 'checkpoints' / 'ckpt-20'} (step 20)." in out
    warnings = [line for line in err.splitlines() if "skipped checkpoint" in line]
    assert len(warnings) == 1 and "ckpt-40: it does not load" in warnings[0], err
    assert_kept(run, before, resumed_from=20)


def test_no_loadable_checkpoint_is_an_error_that_deletes_nothing(run, capsys):
    for name in ("ckpt-20.index", "ckpt-40.index"):
        truncate(run / "checkpoints" / name)
    files = sorted(p.name for p in run.rglob("*"))
    line = cli_error(capsys, [*ARGS, "--train_steps=60", f"--model_dir={run}"])
    assert line.startswith("keras-bn-train: error: no checkpoint in")
    assert "skipped checkpoint ckpt-40" in line and "skipped checkpoint ckpt-20" in line
    assert sorted(p.name for p in run.rglob("*")) == files  # never restarted from step 0


def test_checkpoint_that_does_not_read_back_stops_the_run_and_keeps_the_older_ones(
    run, capsys, monkeypatch
):
    real = checkpoints.unreadable_reason
    monkeypatch.setattr(
        checkpoints,
        "unreadable_reason",
        lambda prefix: "disk full (simulated)" if prefix.endswith("ckpt-60") else real(prefix),
    )
    line = cli_error(capsys, [*ARGS, "--train_steps=80", f"--model_dir={run}"], status=1)
    assert line.startswith("keras-bn-train: error: the checkpoint just written")
    assert "disk full (simulated)" in line
    for name in ("ckpt-20", "ckpt-40"):
        assert real(str(run / "checkpoints" / name)) is None


def test_output_files_get_the_usual_permissions(trained):
    umask = os.umask(0o022)
    os.umask(umask)
    for name in ("config.json", "metrics.jsonl", "summary.json"):
        assert (trained / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_unwritable_model_dir_fails_before_training(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    line = cli_error(capsys, [*ARGS, "--train_steps=20", f"--model_dir={blocker}/run"])
    assert f"--model_dir={blocker}/run cannot be created: {blocker} is not a directory" in line


def test_unwritable_export_dir_fails_before_training(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    model_dir = tmp_path / "run"
    line = cli_error(
        capsys,
        [
            *ARGS,
            "--train_steps=20",
            f"--model_dir={model_dir}",
            f"--export_dir={blocker}/export",
        ],
    )
    assert f"--export_dir={blocker}/export cannot be created" in line
    assert not model_dir.exists()  # no step was trained, nothing was written


def test_garbage_model_kwargs_is_a_one_line_flag_error(tmp_path, capsys):
    line = cli_error(capsys, [*ARGS, "--model_kwargs=garbage", f"--model_dir={tmp_path}/r"])
    assert "--model_kwargs items must look like key=value, got 'garbage'" in line


def test_figure1_ctrl_c_is_one_line_and_exit_130(tmp_path):
    model_dir = tmp_path / "figure1"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "keras_bn.train",
            "--experiment=figure1",
            "--train_steps=100000",
            "--eval_every=200",  # Ctrl-C is seen between compiled chunks of this many steps
            f"--model_dir={model_dir}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        # As a terminal's foreground job: a shell starts background jobs (`pytest ... &`, as
        # some CI runners do) with SIGINT ignored, the child inherits that, and Python then
        # never turns SIGINT into KeyboardInterrupt.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 120
        # Into the training of the first net, once its first checkpoint is surely complete.
        while len(list((model_dir / "baseline" / "checkpoints").glob("ckpt-*.index"))) < 2:
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    ours = [line for line in err.splitlines() if line.startswith("keras-bn-train:")]
    assert ours == [err.strip().splitlines()[-1]]
    assert "run the same command again to resume from the checkpoint of step" in ours[0]
    assert list((model_dir / "baseline" / "checkpoints").glob("ckpt-*.index"))
    # TensorFlow's C++ log lines from after startup (e.g. cuInit's CUDA error) are not shown.
    assert "cuInit" not in err


@pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")), reason="cuInit works on GPUs")
def test_tensorflow_logs_only_when_asked(tmp_path):
    command = [
        sys.executable,
        "-m",
        "keras_bn.train",
        "--preset=mnist_bn",
        "--strategy=mirrored",
        "--cpu_replicas=2",
        "--batch_size=61",  # fails right after TensorFlow has started
        f"--model_dir={tmp_path}/run",
    ]
    quiet = subprocess.run(command, capture_output=True, text=True, timeout=120, env=ENV)
    asked = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=120,
        env={**ENV, "KERAS_BN_TF_LOGS": "1"},
    )
    verbose = subprocess.run(
        [*command, "--verbose=2"], capture_output=True, text=True, timeout=120, env=ENV
    )
    assert quiet.returncode == asked.returncode == verbose.returncode == 2
    assert "cuInit" not in quiet.stderr and "cuInit" not in verbose.stderr
    assert "cuInit" in asked.stderr
    # Nothing of TensorFlow's start-up either (printed while `import keras_bn` loads it).
    assert len(quiet.stderr.strip().splitlines()) == 1, quiet.stderr
    # TensorFlow's own start-up lines too (which ones depends on the CPU: oneDNN's notice is
    # printed on some x86 CPUs only).
    assert len(asked.stderr.strip().splitlines()) > 2, asked.stderr
    for result in (quiet, asked):
        assert result.stderr.strip().splitlines()[-1].startswith("keras-bn-train: error: --batch")


def test_python_api_leaves_the_users_logging_alone(tmp_path):
    import logging

    from absl import logging as absl_logging

    tf_logger = logging.getLogger("tensorflow")
    saved = tf_logger.level, absl_logging.get_verbosity()
    tf_logger.setLevel(logging.DEBUG)
    absl_logging.set_verbosity(absl_logging.DEBUG)
    filters, stderr, fd2 = list(warnings.filters), sys.stderr, os.fstat(2)
    try:
        cli([*ARGS, "--train_steps=20", f"--model_dir={tmp_path}/run"])
        assert tf_logger.level == logging.DEBUG
        assert absl_logging.get_verbosity() == absl_logging.DEBUG
        assert warnings.filters == filters
        assert sys.stderr is stderr
        assert (os.fstat(2).st_dev, os.fstat(2).st_ino) == (fd2.st_dev, fd2.st_ino)
    finally:
        tf_logger.setLevel(saved[0])
        absl_logging.set_verbosity(saved[1])


def test_ctrl_c_before_the_first_checkpoint_does_not_promise_a_resume():
    from keras_bn.train.engine import run as run_lib

    assert run_lib._interrupted(7, None).endswith("before the first checkpoint; nothing was kept.")
    assert "resume from the checkpoint of step 20" in run_lib._interrupted(30, 20)
