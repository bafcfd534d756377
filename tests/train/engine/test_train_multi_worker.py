"""--strategy=multi_worker: two worker processes on 127.0.0.1, a worker killed, and the resume.

Every run here uses the same flags, so the uninterrupted two-worker run is the reference for
both the single-process mirrored run (same global batches over the same 2 replicas) and the run
whose worker is killed with SIGKILL after its first checkpoint and restarted.
"""

import collections
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import free_port

pytestmark = pytest.mark.slow

ARGS = [
    "--preset=mnist_bn",
    "--train_steps=120",
    "--eval_every=40",
    "--steps_per_loop=5",
    "--eval_batch_size=1000",
    "--eval_steps=2",
    "--verbose=0",
]
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
PEER_FAILURE_STATUS = 75


def worker_command(model_dir):
    return [
        sys.executable,
        "-m",
        "keras_bn.train",
        *ARGS,
        "--strategy=multi_worker",
        f"--model_dir={model_dir}",
    ]


class Cluster:
    """Two `keras-bn-train --strategy=multi_worker` processes, as a user would start them."""

    def __init__(self, model_dir, ports, logs):
        self.model_dir, self.ports, self.logs = model_dir, ports, logs

    def start(self):
        workers = [f"127.0.0.1:{port}" for port in self.ports]
        self.processes, self.outputs = [], []
        for index in range(2):
            tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
            out = (self.logs / f"worker{index}-{time.monotonic_ns()}.out").open("w+")
            err = (self.logs / f"worker{index}-{time.monotonic_ns()}.err").open("w+")
            self.outputs.append((out, err))
            self.processes.append(
                subprocess.Popen(
                    worker_command(self.model_dir),
                    env={**ENV, "TF_CONFIG": json.dumps(tf_config)},
                    stdout=out,
                    stderr=err,
                )
            )
        return self

    def wait(self, index, timeout=300):
        try:
            status = self.processes[index].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        out, err = self.outputs[index]
        out.seek(0), err.seek(0)
        return status, out.read(), err.read()

    def kill(self):
        for process in self.processes:
            process.kill()
            process.wait()


def run_to_completion(model_dir, logs):
    cluster = Cluster(model_dir, [free_port(), free_port()], logs).start()
    try:
        results = [cluster.wait(0), cluster.wait(1)]
    finally:
        cluster.kill()
    for status, out, err in results:
        assert status == 0, err[-3000:]
        assert "done: mlp on mnist: 120 steps on 2 replicas" in out
    return results


def evals(model_dir):
    lines = (model_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["eval_accuracy"], r["eval_loss"]) for r in map(json.loads, lines)]


def files(model_dir):
    """Relative paths in `model_dir`, TensorBoard event files counted per folder."""
    names = []
    for path in model_dir.rglob("*"):
        if path.is_file():
            relative = path.relative_to(model_dir)
            names.append(
                str(relative.parent / "events")
                if relative.name.startswith("events.")
                else str(relative)
            )
    return collections.Counter(names)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi_worker")
    run_to_completion(root / "run", root)
    return root / "run"


def test_two_workers_match_the_mirrored_run_and_only_the_chief_writes(uninterrupted, tmp_path):
    mirrored = tmp_path / "mirrored"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "keras_bn.train",
            *ARGS,
            "--strategy=mirrored",
            "--cpu_replicas=2",
            f"--model_dir={mirrored}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    worker_summary = json.loads((uninterrupted / "summary.json").read_text())
    mirrored_summary = json.loads((mirrored / "summary.json").read_text())
    assert worker_summary["replicas"] == mirrored_summary["replicas"] == 2
    assert (
        abs(worker_summary["final"]["eval_accuracy"] - mirrored_summary["final"]["eval_accuracy"])
        <= 0.002
    ), (worker_summary["final"], mirrored_summary["final"])
    assert [s for s, *_ in evals(uninterrupted)] == [40, 80, 120]
    np.testing.assert_allclose(evals(uninterrupted), evals(mirrored), rtol=1e-4, atol=2e-3)
    # The non-chief wrote nothing: the shared model_dir holds exactly what a single process
    # writes (a second writer would add a second events file per folder, or other files).
    assert files(uninterrupted) == files(mirrored)
    assert files(uninterrupted)["tensorboard/train/events"] == 1


def test_killed_worker_survivor_stops_and_restart_resumes_to_the_same_metrics(
    uninterrupted, tmp_path
):
    model_dir = tmp_path / "run"
    ports = [free_port(), free_port()]
    cluster = Cluster(model_dir, ports, tmp_path).start()
    state_file = model_dir / "checkpoints" / "checkpoint"
    deadline = time.monotonic() + 300
    try:
        while not state_file.exists():
            assert all(p.poll() is None for p in cluster.processes), "a worker exited early"
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.01)
        cluster.processes[1].send_signal(signal.SIGKILL)
        status, _, err = cluster.wait(0, timeout=120)  # a hang guard, not a timing assertion
    finally:
        cluster.kill()
    assert status == PEER_FAILURE_STATUS, err[-3000:]
    assert "Traceback" not in err
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith("keras-bn-train: error: the cluster lost a worker"), last_line
    assert "Start every worker again with the same command to resume" in last_line

    checkpoints = sorted(p.name for p in (model_dir / "checkpoints").glob("ckpt-*.index"))
    assert checkpoints and "ckpt-120.index" not in checkpoints, "the kill came too late"
    before = {r["step"]: r for r in map(json.loads, (model_dir / "metrics.jsonl").open())}

    # The same commands again: both workers resume from the chief's last checkpoint.
    results = run_to_completion(model_dir, tmp_path)
    assert "Traceback" not in results[0][2]
    after = {r["step"]: r for r in map(json.loads, (model_dir / "metrics.jsonl").open())}
    assert sorted(after) == [40, 80, 120]
    kept_step = max(int(c.removeprefix("ckpt-").removesuffix(".index")) for c in checkpoints)
    assert 40 in before and kept_step >= 40
    for step, record in before.items():
        if step <= kept_step:  # evaluated before the kill and covered by a checkpoint: kept
            assert after[step]["wall_time"] == record["wall_time"]
    np.testing.assert_allclose(evals(model_dir), evals(uninterrupted), rtol=1e-6)
    summary = json.loads((model_dir / "summary.json").read_text())
    assert summary["steps"] == 120 and summary["checkpoint"].endswith("ckpt-120")


def test_a_port_that_cannot_be_bound_is_one_line_naming_the_address(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        workers = [address, f"127.0.0.1:{free_port()}"]
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": 0}}
        proc = subprocess.run(
            worker_command(tmp_path / "run"),
            env={**ENV, "TF_CONFIG": json.dumps(tf_config)},
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("keras-bn-train: error: ") and address in line
    assert not (tmp_path / "run").exists()
