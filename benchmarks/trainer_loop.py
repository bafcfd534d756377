"""The trainer's in-memory path against its tf.data path: the same run, the same batches.

Trains the `mnist_bn` preset (the paper's MNIST BN net, batch 60, `steps_per_loop` 50) for
`--steps` steps with `Trainer(in_memory=False)` (a distributed tf.data pipeline and
`strategy.run` per step, the trainer's only path before issue 14) and with the in-memory path
(batches gathered from in-memory tensors inside one XLA loop per block of steps), alternately,
`--rounds` times, each from scratch in a fresh folder and a fresh process (two trainers in one
process slow each other down). Prints steps/s over the whole `Trainer.train` call (compilation
and evaluations included) and the ratio in-memory / tf.data.

    python benchmarks/trainer_loop.py                 # ~3 minutes on 2 CPU cores
    python benchmarks/trainer_loop.py --steps=50000 --rounds=1

Target: ratio >= 2.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from keras_bn.train.config import settings as config_lib  # noqa: E402
from keras_bn.train.data import pipeline as data_lib  # noqa: E402
from keras_bn.train.engine.trainer import Trainer  # noqa: E402
from keras_bn.train.rundir.folder import RunDir  # noqa: E402


def steps_per_second(steps: int, in_memory: bool) -> float:
    config = config_lib.resolve("mnist_bn", {"train_steps": steps, "verbose": 0})
    data = data_lib.make_data(config)
    with tempfile.TemporaryDirectory() as folder:
        trainer = Trainer(
            config, tf.distribute.get_strategy(), data, RunDir(folder), in_memory=in_memory
        )
        trainer.train()
    return steps / trainer.train_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--one", choices=["memory", "tf.data"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # a child process: one run, its steps/s on stdout
        print(steps_per_second(args.steps, in_memory=args.one == "memory"))
        return

    def run(path):
        command = [sys.executable, __file__, f"--steps={args.steps}", f"--one={path}"]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        return float(out.split()[-1])

    print(
        f"mnist_bn, {args.steps} steps per run, TensorFlow {tf.__version__}, {os.cpu_count()} CPUs"
    )
    print("round   tf.data steps/s   in-memory steps/s   ratio")
    for round_ in range(1, args.rounds + 1):
        slow, fast = run("tf.data"), run("memory")
        print(f"{round_:>5} {slow:>17.0f} {fast:>19.0f} {fast / slow:>7.2f}", flush=True)


if __name__ == "__main__":
    main()
