"""The layer under ``keras.distribution.DataParallel`` on 4 JAX host devices, against NumPy.

JAX's ``call`` sees the global batch, sharded over the devices. ``synchronized=False`` must
normalize each device's slice with its own statistics (as a TensorFlow replica or a torch rank
does), ``synchronized=True`` with the global batch's; in both modes the moving statistics move
toward the global batch's count-weighted statistics. Collectives are counted in the compiled
HLO of the layer's forward and of its input gradient (which recomputes the forward). Each test
runs in a subprocess: ``XLA_FLAGS`` must be set before JAX starts.
"""

import json

import pytest
from conftest import run_python

SCRIPT = r"""
import json, os, re
import numpy as np, jax, jax.numpy as jnp, keras, keras_bn, bn_oracle

D = 4
distribution = keras.distribution.DataParallel(devices=keras.distribution.list_devices())
keras.distribution.set_distribution(distribution)
sharded = jax.sharding.NamedSharding(
    distribution.device_mesh.backend_mesh, jax.sharding.PartitionSpec("batch"))
COLLECTIVE = re.compile(r"\b(all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)"
                        r"(-start)?\(")
rng = np.random.default_rng(0)
results = {}

def run(layer, x, dy, mask):
    layer.build(x.shape)
    trainable = [v.value for v in layer.trainable_variables]
    others = [v.value for v in layer.non_trainable_variables]
    x, dy = jax.device_put(x, sharded), jax.device_put(dy, sharded)
    mask = None if mask is None else jax.device_put(mask, sharded)
    def forward(x):
        return layer.stateless_call(trainable, others, x, training=True, mask=mask)
    def input_grad(x, dy):
        return jax.grad(lambda x: jnp.sum(forward(x)[0] * dy))(x)
    (y, state) = jax.jit(forward)(x)
    dx = jax.jit(input_grad)(x, dy)
    counts = [len(COLLECTIVE.findall(jax.jit(f).lower(*a).compile().as_text()))
              for f, a in ((forward, (x,)), (input_grad, (x, dy)))]
    return np.asarray(y), np.asarray(dx), [np.asarray(s) for s in state], counts

for shape, masked in (((16, 3), False), ((8, 5, 3), True), ((8, 2, 2, 3), False)):
    # Different data on every device: each slice has its own scale and offset.
    per = shape[0] // D
    x = np.concatenate([rng.normal(3.0 * d, 1.0 + d, (per,) + shape[1:]) for d in range(D)])
    x = x.astype("float32")
    dy = rng.normal(size=shape).astype("float32")
    mask = None
    full = None
    if masked:  # uneven counts per device
        mask = rng.random(shape[:-1]) < np.repeat([0.9, 0.6, 0.3, 0.8], per)[:, None]
        full = np.broadcast_to(mask[..., None], shape)
    red = tuple(range(len(shape) - 1))
    gamma = np.ones([1] * (len(shape) - 1) + [3])
    for sync in (False, True):
        layer = keras_bn.BatchNormalization(momentum=0.0, synchronized=sync)
        y, dx, state, counts = run(layer, x, dy, mask)
        if sync:
            ref_y = bn_oracle.forward(x, red, gamma, 0 * gamma, 1e-3, full)
            ref_dx = bn_oracle.backward(x, dy, red, gamma, 1e-3, full)[0]
        else:
            ref_y, ref_dx = np.zeros_like(x, np.float64), np.zeros_like(x, np.float64)
            for d in range(D):
                s = slice(d * per, (d + 1) * per)
                m = None if full is None else full[s]
                ref_y[s] = bn_oracle.forward(x[s], red, gamma, 0 * gamma, 1e-3, m)
                ref_dx[s] = bn_oracle.backward(x[s], dy[s], red, gamma, 1e-3, m)[0]
        mean, var = bn_oracle.moving_after([x], red, 0.0, mask=full)
        results[f"{shape}-sync={sync}"] = dict(
            y=float(np.abs(y - ref_y).max()),
            dx=float(np.abs(dx - ref_dx).max()),
            mean=float(np.abs(state[0] - mean.reshape(-1)).max()),
            var=float(np.abs(state[1] - var.reshape(-1)).max() / var.max()),
            collectives=counts,
        )

# Ghost batches split inside each device's slice, as each TF replica groups its own batch.
x = rng.normal(size=(16, 2)).astype("float32") * np.arange(1, 17)[:, None]
layer = keras_bn.BatchNormalization(virtual_batch_size=2, center=False, scale=False,
                                    momentum=0.0)
y, _, state, _ = run(layer, x, np.zeros_like(x), None)
ref = np.zeros_like(x, np.float64)
ghosts = []
for d in range(D):
    block = x[4 * d: 4 * d + 4]
    for j in range(2):  # ghost batch j of the slice: examples j, j + 2
        g = block[j::2]
        ghosts.append(g)
        ref[4 * d: 4 * d + 4][j::2] = (g - g.mean(0)) / np.sqrt(g.var(0) + 1e-3)
results["ghost"] = float(np.abs(y - ref).max())
# The moving statistics: the average over every device's ghost batches of each one's estimate.
results["ghost_moving"] = float(max(
    np.abs(state[0] - np.mean([g.mean(0) for g in ghosts], 0)).max(),
    np.abs(state[1] - np.mean([g.var(0, ddof=1) for g in ghosts], 0)).max()))

# model.fit: moving statistics replicated on every device, equal to the global update.
x = np.concatenate([rng.normal(2.0 * d, 1.0 + d, (8, 3)) for d in range(D)]).astype("float32")
fits = {}
for sync in (False, True):
    layer = keras_bn.BatchNormalization(momentum=0.0, synchronized=sync)
    model = keras.Sequential([keras.Input((3,)), layer])
    model.compile(keras.optimizers.SGD(0.0), "mse")
    model.fit(x, np.zeros_like(x), batch_size=32, epochs=1, verbose=0, shuffle=False)
    fits[str(sync)] = dict(
        replicated=bool(layer.moving_variance.value.sharding.is_fully_replicated),
        mean=float(np.abs(layer.moving_mean.numpy() - x.mean(0)).max()),
        var=float(np.abs(layer.moving_variance.numpy() - x.var(0) * 32 / 31).max()),
    )
# model.fit with a mask (Masking: all-zero time steps), uneven masked counts per device.
x = np.concatenate([rng.normal(2.0 * d, 1.0 + d, (8, 5, 3)) for d in range(D)]).astype("float32")
keep = rng.random((32, 5)) < np.repeat([0.9, 0.3, 0.6, 1.0], 8)[:, None]
x = np.where(keep[..., None], x, 0.0).astype("float32")
for sync in (False, True):
    layer = keras_bn.BatchNormalization(momentum=0.0, synchronized=sync)
    model = keras.Sequential([keras.Input((5, 3)), keras.layers.Masking(0.0), layer])
    model.compile(keras.optimizers.SGD(0.0), "mse")
    model.fit(x, np.zeros_like(x), batch_size=32, epochs=1, verbose=0, shuffle=False)
    values = x[keep]
    fits[f"masked-{sync}"] = dict(
        replicated=bool(layer.moving_variance.value.sharding.is_fully_replicated),
        mean=float(np.abs(layer.moving_mean.numpy() - values.mean(0)).max()),
        var=float(np.abs(layer.moving_variance.numpy() - values.var(0, ddof=1)).max()),
    )
results["fit"] = fits

# A ModelParallel mesh with a batch axis of 2 (and a model axis of 2): two slices.
mesh = keras.distribution.DeviceMesh((2, 2), ("batch", "model"), keras.distribution.list_devices())
keras.distribution.set_distribution(keras.distribution.ModelParallel(
    layout_map=keras.distribution.LayoutMap(mesh), batch_dim_name="batch"))
x = np.concatenate([rng.normal(5.0 * d, 1.0 + d, (4, 3)) for d in range(2)]).astype("float32")
layer = keras_bn.BatchNormalization(center=False, scale=False)
y = np.asarray(layer(x, training=True))
ref = np.concatenate([(s - s.mean(0)) / np.sqrt(s.var(0) + 1e-3) for s in (x[:4], x[4:])])
results["model_parallel"] = float(np.abs(y - ref).max())
print("RESULTS" + json.dumps(results))
"""


@pytest.fixture(scope="module")
def results():
    out = run_python(
        SCRIPT,
        env={"KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
        timeout=600,
    )
    line = [line for line in out.splitlines() if line.startswith("RESULTS")][-1]
    return json.loads(line[len("RESULTS") :])


def test_local_and_synchronized_statistics_match_numpy(results):
    assert sum("sync=" in case for case in results) == 6
    for case, r in results.items():
        if "sync=" not in case:
            continue
        assert r["y"] < 1e-4 and r["dx"] < 1e-4, (case, r)
        # The moving statistics move toward the GLOBAL (count-weighted, masked) batch.
        assert r["mean"] < 1e-4 and r["var"] < 1e-5, (case, r)


def test_collectives_per_layer(results):
    for case, r in results.items():
        if "sync=" not in case:
            continue
        forward, input_grad = r["collectives"]
        if "sync=True" in case:
            # One collective forward; the input gradient recomputes it and adds one backward.
            assert (forward, input_grad) == (1, 2), (case, r)
        else:
            # One collective (the moving statistics' rows); none in the gradient.
            assert (forward, input_grad) == (1, 0), (case, r)


def test_ghost_batches_split_inside_each_device_slice(results):
    assert results["ghost"] < 1e-4
    assert results["ghost_moving"] < 1e-3


def test_model_parallel_mesh_normalizes_each_slice_of_its_batch_axis(results):
    assert results["model_parallel"] < 1e-4


def test_fit_keeps_moving_statistics_replicated_and_global(results):
    assert len(results["fit"]) == 4
    for sync, r in results["fit"].items():
        assert r["replicated"], sync
        assert r["mean"] < 1e-4 and r["var"] < 1e-3, (sync, r)
