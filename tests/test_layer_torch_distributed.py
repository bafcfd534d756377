"""The layer under ``torch.distributed`` (gloo, 2 processes on 127.0.0.1), against NumPy.

Each rank trains on its own, uneven batch with a mask. ``synchronized=True`` must give the
global batch's outputs and input gradients (one exchange forward, one backward); in both modes
the moving statistics must be identical on both ranks and equal the global count-weighted
update (Keras's variables are torch Parameters, not buffers: DDP would not keep them in step).
"""

import json
import os
import subprocess
import sys

import bn_oracle
import numpy as np
import pytest
from conftest import TESTS_DIR, free_port

WORKER = r"""
import json, os, sys
import numpy as np, torch, torch.distributed as dist, keras, keras_bn

dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + os.environ["PORT"],
                        rank=int(os.environ["RANK"]), world_size=2)
data = np.load(os.environ["DATA"])
rank = dist.get_rank()
x = data[f"x{rank}"]
mask = data[f"m{rank}"]
dy = data[f"dy{rank}"]
calls = []
real = dist.all_reduce
def counting(*args, **kwargs):
    calls.append(1)
    return real(*args, **kwargs)
dist.all_reduce = counting
out = {}
for sync in (False, True):
    layer = keras_bn.BatchNormalization(momentum=0.0, synchronized=sync, center=False, scale=False)
    layer.build(x.shape)
    xt = torch.tensor(x, requires_grad=True)
    calls.clear()
    y = layer(xt, training=True, mask=torch.tensor(mask))
    forward = len(calls)
    (y * torch.tensor(dy)).sum().backward()
    out[str(sync)] = dict(
        y=y.detach().numpy().tolist(), dx=xt.grad.numpy().tolist(),
        mean=layer.moving_mean.numpy().tolist(), var=layer.moving_variance.numpy().tolist(),
        exchanges=[forward, len(calls) - forward])
print("RESULTS" + json.dumps(out))
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    rng = np.random.default_rng(0)
    sizes = (5, 9)  # uneven batches, different data on each rank
    data = {}
    for r, n in enumerate(sizes):
        data[f"x{r}"] = rng.normal(4.0 * r, 1.0 + r, (n, 6, 3)).astype(np.float32)
        data[f"m{r}"] = rng.random((n, 6)) < (0.8 if r else 0.5)
        data[f"dy{r}"] = rng.normal(size=(n, 6, 3)).astype(np.float32)
    path = str(tmp_path_factory.mktemp("ranks") / "data.npz")
    np.savez(path, **data)
    env = dict(os.environ, KERAS_BACKEND="torch", PORT=str(free_port()), DATA=path)
    env["PYTHONPATH"] = TESTS_DIR + os.pathsep + env.get("PYTHONPATH", "")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER],
            env=dict(env, RANK=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    outs = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-4000:]
        line = [line for line in stdout.splitlines() if line.startswith("RESULTS")][-1]
        outs.append(json.loads(line[len("RESULTS") :]))
    return data, outs


def test_synchronized_outputs_and_gradients_are_the_global_batch(ranks):
    data, outs = ranks
    x = np.concatenate([data["x0"], data["x1"]])
    full = np.broadcast_to(np.concatenate([data["m0"], data["m1"]])[..., None], x.shape)
    dy = np.concatenate([data["dy0"], data["dy1"]])
    one = np.ones((1, 1, 3))
    ref_y = bn_oracle.forward(x, (0, 1), one, 0 * one, 1e-3, full)
    ref_dx = bn_oracle.backward(x, dy, (0, 1), one, 1e-3, full)[0]
    y = np.concatenate([np.array(o["True"]["y"]) for o in outs])
    dx = np.concatenate([np.array(o["True"]["dx"]) for o in outs])
    np.testing.assert_allclose(y, ref_y, atol=1e-4)
    np.testing.assert_allclose(dx, ref_dx, atol=1e-4)
    for o in outs:
        assert o["True"]["exchanges"] == [1, 1]


def test_local_mode_normalizes_each_rank_alone(ranks):
    data, outs = ranks
    one = np.ones((1, 1, 3))
    for r, o in enumerate(outs):
        x, full = data[f"x{r}"], np.broadcast_to(data[f"m{r}"][..., None], data[f"x{r}"].shape)
        ref = bn_oracle.forward(x, (0, 1), one, 0 * one, 1e-3, full)
        np.testing.assert_allclose(np.array(o["False"]["y"]), ref, atol=1e-4)
        assert o["False"]["exchanges"] == [1, 0]  # the moving statistics' one exchange


@pytest.mark.parametrize("sync", ["False", "True"])
def test_moving_statistics_are_global_and_identical_on_every_rank(ranks, sync):
    data, outs = ranks
    x = np.concatenate([data["x0"], data["x1"]])
    full = np.broadcast_to(np.concatenate([data["m0"], data["m1"]])[..., None], x.shape)
    mean, var = bn_oracle.moving_after([x], (0, 1), 0.0, mask=full)
    assert outs[0][sync]["mean"] == outs[1][sync]["mean"]
    assert outs[0][sync]["var"] == outs[1][sync]["var"]
    np.testing.assert_allclose(outs[0][sync]["mean"], mean.reshape(-1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(outs[0][sync]["var"], var.reshape(-1), rtol=1e-5)
