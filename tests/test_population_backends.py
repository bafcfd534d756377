"""Alg. 2 (keras_bn.population) on JAX and PyTorch, against a NumPy oracle.

Every case runs in a subprocess with KERAS_BACKEND set (one process per backend and setup): plain
eager runs with `import tensorflow` failing (the backends must never need it), JAX
`keras.distribution.DataParallel` on 4 host devices, and `torch.distributed` with 2 gloo ranks on
127.0.0.1 with uneven batches. The oracle helpers below import no backend; the subprocesses import
this module for them.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import TESTS_DIR, free_port, run_python

# ------------------------------------------------------------------- oracle (used in subprocesses)


def as_np(value):
    import keras

    return np.asarray(keras.ops.convert_to_numpy(getattr(value, "value", value)), np.float64)


def bn_train(h, layer, axes, slices=1):
    """Alg. 1 on each of ``slices`` contiguous slices of the batch ``h`` (one replica's or
    device's batch each): (output, [(n, mean, biased var, values as [-1, C]) per slice])."""
    gamma = as_np(layer.gamma) if layer.scale else 1.0
    beta = as_np(layer.beta) if layer.center else 0.0
    outputs, stats = [], []
    for part in np.split(h, slices):
        mean, var = part.mean(axis=axes), part.var(axis=axes)
        outputs.append(gamma * (part - mean) / np.sqrt(var + layer.epsilon) + beta)
        stats.append((part.size // mean.size, mean, var, part.reshape(-1, mean.size)))
    return np.concatenate(outputs), stats


def dense(h, layer):
    return h @ as_np(layer.kernel) + as_np(layer.bias)


def paper_estimate(stats, unbiased=True):
    """Alg. 2 on per-batch (n, mean, var): count-weighted; batches of n <= 1 skipped."""
    stats = [s for s in stats if s[0] > 1]
    n = np.array([s[0] for s in stats], np.float64)[:, None]
    mean = (n * np.stack([s[1] for s in stats])).sum(0) / n.sum()
    var = (n * np.stack([s[2] for s in stats])).sum(0) / ((n - 1).sum() if unbiased else n.sum())
    return mean, var


def pooled_estimate(stats, unbiased=True):
    """Mean and variance of every value of every batch."""
    values = np.concatenate([s[3] for s in stats])
    return values.mean(0), values.var(0, ddof=1 if unbiased else 0)


ESTIMATE = {"paper": paper_estimate, "pooled": pooled_estimate}


def two_bn_model(seed=0, first=None, second=None, dtype=None):
    """Dense(6) -> BN -> relu -> Dense(4) -> BN, every weight drawn from a NumPy generator (so
    every process, rank and backend builds the same model)."""
    import keras

    from keras_bn import BatchNormalization

    rng = np.random.default_rng(seed)
    d1, d2 = keras.layers.Dense(6, dtype=dtype), keras.layers.Dense(4, dtype=dtype)
    bn1 = BatchNormalization(dtype=dtype, **(first or {}))
    bn2 = BatchNormalization(dtype=dtype, **(second or {}))
    inputs = keras.Input((5,), dtype=dtype)
    model = keras.Model(inputs, bn2(d2(keras.layers.ReLU(dtype=dtype)(bn1(d1(inputs))))))
    for layer in (d1, d2):
        layer.kernel.assign(rng.normal(0.0, 0.5, layer.kernel.shape))
        layer.bias.assign(rng.normal(size=layer.bias.shape))
    for bn in (bn1, bn2):
        bn.gamma.assign(rng.uniform(0.5, 2.0, bn.gamma.shape))
        bn.beta.assign(rng.normal(size=bn.beta.shape))
    return model, (d1, bn1, d2, bn2)


def float64_model():
    """BN -> BN with dtype float64 (no matmul), random gammas and betas."""
    import keras

    from keras_bn import BatchNormalization

    rng = np.random.default_rng(9)
    layers = [BatchNormalization(dtype="float64"), BatchNormalization(dtype="float64")]
    model = keras.Sequential([keras.Input((5,), dtype="float64"), *layers])
    for bn in layers:
        bn.gamma.assign(rng.uniform(0.5, 2.0, bn.gamma.shape))
        bn.beta.assign(rng.normal(size=bn.beta.shape))
    return model, layers


def float64_errors(layers, batches):
    """The float64 model's errors against the paper estimator's oracle, per layer."""
    first, second = [], []
    for x in batches:
        y, s1 = bn_train(np.asarray(x, np.float64), layers[0], 0)
        first += s1
        second += bn_train(y, layers[1], 0)[1]
    return [error(layers[0], paper_estimate(first)), error(layers[1], paper_estimate(second))]


def two_bn_oracle(layers, batches, slices=(1, 1)):
    """Per-batch statistics of both BN layers ([bn1's], [bn2's]); ``slices`` per layer: how many
    separately normalized slices each batch has for it (1: the whole batch)."""
    d1, bn1, d2, bn2 = layers
    first, second = [], []
    for x in batches:
        y1, s1 = bn_train(dense(np.asarray(x, np.float64), d1), bn1, 0, slices[0])
        _, s2 = bn_train(dense(np.maximum(y1, 0.0), d2), bn2, 0, slices[1])
        first += s1
        second += s2
    return first, second


def data(n, seed=1, dim=5):
    return np.random.default_rng(seed).normal(2.0, 3.0, (n, dim)).astype(np.float32)


def error(layer, expected):
    """Max relative error of the layer's (moving_mean, moving_variance) against ``expected``."""
    got = (as_np(layer.moving_mean), as_np(layer.moving_variance))
    return max(float(np.max(np.abs(g - e) / (np.abs(e) + 1e-6))) for g, e in zip(got, expected))


def block_tensorflow():
    """Makes every later ``import tensorflow`` in this process fail (an ImportError), as if it
    were not installed; ``unblock_tensorflow`` undoes it."""
    assert "tensorflow" not in sys.modules, "tensorflow was imported already"
    sys.modules["tensorflow"] = None


def unblock_tensorflow():
    del sys.modules["tensorflow"]


def report_of(out):
    line = next(line for line in out.splitlines() if line.startswith("REPORT "))
    return json.loads(line[len("REPORT ") :])


# ------------------------------------------------------------------------- one device, eager

EAGER_SCRIPT = """
import sys, warnings
import numpy as np
import keras
import keras_bn
from keras_bn import BatchNormalization
import test_population_backends as t
report = {"tf_after_import": "tensorflow" in sys.modules}
t.block_tensorflow()

# Both estimators, unequal batches (one of a single value), (x, y) elements.
model, layers = t.two_bn_model(seed=0)
x = t.data(41, seed=1)
batches = [x[:16], x[16:32], x[32:33], x[33:]]
for estimator in ("paper", "pooled"):
    result = keras_bn.recompute_population_statistics(
        model, [(b, np.zeros(len(b))) for b in batches], estimator=estimator, verbose=0)
    first, second = t.two_bn_oracle(layers, batches)
    report[estimator] = [t.error(layers[1], t.ESTIMATE[estimator](first)),
                         t.error(layers[3], t.ESTIMATE[estimator](second))]
    entry = result[layers[1].path]
    report[estimator + "_count"] = [float(entry["count"][0]), float(entry["batches"][0])]

# unbiased_variance=False, a generator with steps, running out of data.
model, layers = t.two_bn_model(seed=2, first={"unbiased_variance": False},
                               second={"unbiased_variance": False})
x = t.data(40, seed=3)
keras_bn.recompute_population_statistics(
    model, (x[i:i + 10] for i in range(0, 40, 10)), steps=3, estimator="pooled", verbose=0)
first, second = t.two_bn_oracle(layers, [x[:10], x[10:20], x[20:30]])
report["biased_steps"] = [t.error(layers[1], t.pooled_estimate(first, unbiased=False)),
                          t.error(layers[3], t.pooled_estimate(second, unbiased=False))]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    keras_bn.recompute_population_statistics(model, [x[:10], x[10:]], steps=5, verbose=0)
report["ran_out"] = [str(w.message) for w in caught if w.category is UserWarning]

# A conv net: statistics per feature map over batch x positions.
rng = np.random.default_rng(4)
conv = keras.layers.Conv2D(3, 3)
bn = BatchNormalization()
model = keras.Sequential([keras.Input((6, 6, 2)), conv, bn])
conv.kernel.assign(rng.normal(size=conv.kernel.shape))
xc = rng.normal(1.0, 2.0, (10, 6, 6, 2)).astype(np.float32)
result = keras_bn.recompute_population_statistics(model, [xc[:4], xc[4:]], verbose=0)
stats = []
for b in (xc[:4], xc[4:]):
    h = t.as_np(conv(b))
    stats += t.bn_train(h, bn, (0, 1, 2))[1]
report["conv"] = t.error(bn, t.paper_estimate(stats))
report["conv_count"] = float(result[bn.path]["count"][0])

# Renorm: moving_stddev follows the population variance; the r, d state is kept.
keras_bn_renorm = BatchNormalization(renorm=True)
dense = keras.layers.Dense(4)
model = keras.Sequential([keras.Input((5,)), dense, keras_bn_renorm])
dense.kernel.assign(rng.normal(size=dense.kernel.shape))
xr = t.data(32, seed=5)
model(xr[:8], training=True)  # the renorm state moves away from its initial values
renorm_state = [t.as_np(keras_bn_renorm.renorm_mean), t.as_np(keras_bn_renorm.renorm_stddev)]
keras_bn.recompute_population_statistics(model, [xr[:16], xr[16:]], verbose=0)
stats = []
for b in (xr[:16], xr[16:]):
    stats += t.bn_train(t.dense(b.astype(np.float64), dense), keras_bn_renorm, 0)[1]
report["renorm"] = t.error(keras_bn_renorm, t.paper_estimate(stats))
report["renorm_stddev"] = float(np.max(np.abs(
    np.square(t.as_np(keras_bn_renorm.moving_stddev)) - keras_bn_renorm.epsilon
    - t.as_np(keras_bn_renorm.moving_variance))))
report["renorm_state_kept"] = bool(
    np.array_equal(t.as_np(keras_bn_renorm.renorm_mean), renorm_state[0])
    and np.array_equal(t.as_np(keras_bn_renorm.renorm_stddev), renorm_state[1]))

# The callback with model.fit: at the end of training, and before each validation.
class Counting(keras_bn.PopulationStatistics):
    calls = 0
    def recompute(self):
        Counting.calls += 1
        return super().recompute()

model, layers = t.two_bn_model(seed=6, first={"momentum": 0.5}, second={"momentum": 0.5})
model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
x = t.data(32, seed=7)
y = np.ones((32, 4), np.float32)
calibration = [x[i:i + 8] for i in range(0, 32, 8)]
callback = Counting(calibration, estimator="pooled")
model.fit(x, y, batch_size=8, epochs=1, verbose=0, validation_data=(x, y), callbacks=[callback])
first, second = t.two_bn_oracle(layers, calibration)  # with the trained weights
report["callback"] = [t.error(layers[1], t.pooled_estimate(first)),
                      t.error(layers[3], t.pooled_estimate(second))]
report["callback_calls"] = Counting.calls
Counting.calls = 0
callback = Counting(calibration, recompute_before_evaluation=True)
model.fit(x, y, batch_size=8, epochs=2, verbose=0, validation_data=(x, y), callbacks=[callback])
report["callback_eval_calls"] = Counting.calls
first, second = t.two_bn_oracle(layers, calibration)
report["callback_eval"] = [t.error(layers[1], t.paper_estimate(first)),
                           t.error(layers[3], t.paper_estimate(second))]
report["callback_weights_moved"] = bool(model.history.history["loss"][0]
                                        != model.history.history["loss"][-1])

# Errors.
errors = {}
for name, call in {
    "single array": lambda: keras_bn.recompute_population_statistics(model, x, verbose=0),
    "no batches": lambda: keras_bn.recompute_population_statistics(model, [], verbose=0),
    "iterable": lambda: keras_bn.recompute_population_statistics(model, 3, verbose=0),
}.items():
    try:
        call()
        errors[name] = "no error"
    except ValueError as e:
        errors[name] = str(e)
report["errors"] = errors
report["observers_restored"] = all(
    layer._statistics_observer is None for layer in (layers[1], layers[3]))

# float64 layers: accumulation in float64 NumPy; written in the variables' dtype.
# (BN -> BN only: Keras's torch matmul is not float64-exact.)
x64 = t.data(30, seed=8).astype(np.float64) * 1e3 + 1e4
model, layers = t.float64_model()
keras_bn.recompute_population_statistics(model, [x64[:12], x64[12:]], verbose=0)
report["float64_dtype"] = str(keras.ops.convert_to_numpy(layers[0].moving_mean.value).dtype)
report["float64"] = t.float64_errors(layers, [x64[:12], x64[12:]])

# A tf.data.Dataset when TensorFlow happens to be installed: read as NumPy.
report["tf_before_tf_data"] = sys.modules.get("tensorflow") is not None
t.unblock_tensorflow()
import tensorflow as tf
model, layers = t.two_bn_model(seed=10)
x = t.data(50, seed=11)
dataset = tf.data.Dataset.from_tensor_slices((x, np.zeros(50))).batch(16)
result = keras_bn.recompute_population_statistics(model, dataset, estimator="pooled", verbose=0)
first, second = t.two_bn_oracle(layers, [x[i:i + 16] for i in range(0, 50, 16)])
report["tf_data"] = [t.error(layers[1], t.pooled_estimate(first)),
                     t.error(layers[3], t.pooled_estimate(second))]
report["tf_data_batches"] = float(result[layers[1].path]["batches"][0])
print("REPORT " + json.dumps(report))
"""

BACKENDS = ["jax", "torch"]


@pytest.fixture(scope="module", params=BACKENDS)
def eager(request):
    out = run_python(
        "import json\n" + EAGER_SCRIPT,
        env={"KERAS_BACKEND": request.param, "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": ""},
        timeout=300,
    )
    return request.param, report_of(out)


TOL = 1e-5


def test_backend_never_imports_tensorflow(eager):
    _, report = eager
    assert report["tf_after_import"] is False
    # Every case but the tf.data one ran with `import tensorflow` failing.
    assert report["tf_before_tf_data"] is False


@pytest.mark.parametrize("estimator", ["paper", "pooled"])
def test_estimators_match_oracle(eager, estimator):
    backend, report = eager
    assert max(report[estimator]) < TOL, (backend, report[estimator])
    # paper skips the single-value batch; pooled counts it.
    expected = [40.0, 3.0] if estimator == "paper" else [41.0, 4.0]
    assert report[estimator + "_count"] == expected


def test_biased_variance_steps_and_running_out(eager):
    _, report = eager
    assert max(report["biased_steps"]) < TOL
    assert report["ran_out"] == [
        "`dataset` ran out of data after 2 of 5 steps; the population statistics use those 2 "
        "batches."
    ]


def test_conv_counts_every_position(eager):
    _, report = eager
    assert report["conv"] < TOL
    assert report["conv_count"] == 10 * 4 * 4


def test_renorm(eager):
    _, report = eager
    assert report["renorm"] < TOL
    assert report["renorm_stddev"] < 1e-5
    assert report["renorm_state_kept"]


def test_callback_with_fit(eager):
    backend, report = eager
    assert report["callback_calls"] == 1
    assert max(report["callback"]) < TOL, (backend, report["callback"])
    assert report["callback_eval_calls"] == 2  # before each validation; the end reuses it
    assert max(report["callback_eval"]) < TOL
    assert report["callback_weights_moved"]


def test_errors(eager):
    _, report = eager
    assert "single array" in report["errors"]["single array"]
    assert "no batches" in report["errors"]["no batches"]
    assert "iterable" in report["errors"]["iterable"]
    assert report["observers_restored"]


def test_float64_layers(eager):
    backend, report = eager
    if backend == "jax":
        # Without jax_enable_x64 JAX makes float64 arrays float32: the layer's batch statistics
        # are float32 math, accumulated in float64 and rounded to float32 when written.
        assert report["float64_dtype"] == "float32"
        assert max(report["float64"]) < 1e-5
    else:
        assert report["float64_dtype"] == "float64"
        assert max(report["float64"]) < 1e-12


def test_tf_data_dataset_read_as_numpy(eager):
    _, report = eager
    assert max(report["tf_data"]) < TOL
    assert report["tf_data_batches"] == 4


JAX_X64_SCRIPT = """
import json
import jax
import numpy as np
import keras_bn
import test_population_backends as t
assert jax.config.jax_enable_x64
x64 = t.data(30, seed=8).astype(np.float64) * 1e3 + 1e4
model, layers = t.float64_model()
keras_bn.recompute_population_statistics(model, [x64[:12], x64[12:]], verbose=0)
print("REPORT " + json.dumps({
    "dtype": str(np.asarray(layers[0].moving_mean.value).dtype),
    "errors": t.float64_errors(layers, [x64[:12], x64[12:]])}))
"""


def test_jax_float64_with_x64():
    report = report_of(
        run_python(
            JAX_X64_SCRIPT,
            env={"KERAS_BACKEND": "jax", "JAX_ENABLE_X64": "1", "JAX_PLATFORMS": "cpu"},
        )
    )
    assert report["dtype"] == "float64"
    assert max(report["errors"]) < 1e-12


# ------------------------------------------------------------------ JAX DataParallel, 4 devices

JAX_DATA_PARALLEL_SCRIPT = """
import json
import jax
import numpy as np
import keras
keras.distribution.set_distribution(
    keras.distribution.DataParallel(devices=keras.distribution.list_devices()))
import keras_bn
import test_population_backends as t
assert len(jax.devices()) == 4
report = {}
# bn1 synchronized (global statistics), bn2 local: each device normalizes its own slice.
model, layers = t.two_bn_model(seed=3, first={"synchronized": True})
rng = np.random.default_rng(4)
# Different data on every device: each device slice (2 examples) has its own offset and scale.
batches = [np.concatenate([rng.normal(rng.normal(0, 3), rng.uniform(0.5, 2), (2, 5))
                           for _ in range(4)]).astype(np.float32) for _ in range(3)]
for estimator in ("paper", "pooled"):
    result = keras_bn.recompute_population_statistics(
        model, batches, estimator=estimator, verbose=0)
    first, second = t.two_bn_oracle(layers, batches, slices=(1, 4))
    report[estimator] = [t.error(layers[1], t.ESTIMATE[estimator](first)),
                         t.error(layers[3], t.ESTIMATE[estimator](second))]
    report[estimator + "_counts"] = [
        [float(result[b.path]["count"][0]), float(result[b.path]["batches"][0])]
        for b in (layers[1], layers[3])]
    # Each global batch as one batch for bn2 would be a different answer for "paper" (the
    # within-batch spread), the same for "pooled" (the same values).
    first, second = t.two_bn_oracle(layers, batches, slices=(1, 1))
    report[estimator + "_whole_batch_oracle"] = t.error(layers[3], t.ESTIMATE[estimator](second))

try:
    keras_bn.recompute_population_statistics(model, [batches[0][:6]], verbose=0)
    report["indivisible"] = "no error"
except ValueError as e:
    report["indivisible"] = str(e)

# The callback with model.fit under DataParallel.
model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
x = np.concatenate(batches)
callback = keras_bn.PopulationStatistics(batches)
model.fit(x, np.ones((24, 4), np.float32), batch_size=8, epochs=1, verbose=0, callbacks=[callback])
first, second = t.two_bn_oracle(layers, batches, slices=(1, 4))
report["callback"] = [t.error(layers[1], t.paper_estimate(first)),
                      t.error(layers[3], t.paper_estimate(second))]
print("REPORT " + json.dumps(report))
"""


def test_jax_data_parallel_each_device_slice_is_a_batch():
    report = report_of(
        run_python(
            JAX_DATA_PARALLEL_SCRIPT,
            env={
                "KERAS_BACKEND": "jax",
                "JAX_PLATFORMS": "cpu",
                "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
            },
        )
    )
    for estimator in ("paper", "pooled"):
        assert max(report[estimator]) < TOL, (estimator, report[estimator])
        # bn1: 3 global batches of 8; bn2: 12 device slices of 2.
        assert report[estimator + "_counts"] == [[24.0, 3.0], [24.0, 12.0]]
    assert report["paper_whole_batch_oracle"] > 1e-2
    assert report["pooled_whole_batch_oracle"] < TOL
    assert "divisible by 4" in report["indivisible"]
    assert max(report["callback"]) < TOL, report["callback"]


# ---------------------------------------------------------------- torch.distributed, 2 ranks

TORCH_RANK_SCRIPT = """
import json, os, warnings
import numpy as np
import torch.distributed as dist
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank={rank}, world_size=2)
import keras
import keras_bn
import test_population_backends as t
rank = dist.get_rank()
# Uneven batches: rank 0 has 3 batches of 5, 7, 4 examples; rank 1 has 2 of 3 and 9.
sizes = {{0: [5, 7, 4], 1: [3, 9]}}
rng = np.random.default_rng(0)
data = {{r: [rng.normal(rng.normal(0, 3), rng.uniform(0.5, 2), (n, 5)).astype(np.float32)
            for n in sizes[r]] for r in (0, 1)}}
mine = [(x, np.zeros(len(x))) for x in data[rank]]
# bn1 synchronized (the global batch), bn2 local (each rank's own batch).
report = {{}}
for estimator in ("paper", "pooled"):
    model, layers = t.two_bn_model(seed=1, first={{"synchronized": True}})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = keras_bn.recompute_population_statistics(
            model, mine, estimator=estimator, verbose=0)
    d1, bn1, d2, bn2 = layers
    first, second = [], []
    for step in range(2):  # both ranks stop when rank 1 runs out
        parts = [data[r][step].astype(np.float64) for r in (0, 1)]
        y1, s1 = t.bn_train(t.dense(np.concatenate(parts), d1), bn1, 0)
        first += s1
        bounds = np.cumsum([0, len(parts[0])])
        for r in (0, 1):
            h = np.maximum(y1[bounds[r]:bounds[r] + len(parts[r])], 0.0)
            second += t.bn_train(t.dense(h, d2), bn2, 0)[1]
    report[estimator] = {{
        "errors": [t.error(bn1, t.ESTIMATE[estimator](first)),
                   t.error(bn2, t.ESTIMATE[estimator](second))],
        "counts": [[float(result[b.path]["count"][0]), float(result[b.path]["batches"][0])]
                   for b in (bn1, bn2)],
        "written": [t.as_np(v).tolist() for b in (bn1, bn2)
                    for v in (b.moving_mean, b.moving_variance)],
        "warnings": [str(w.message) for w in caught if w.category is UserWarning],
    }}
# Both ranks leave together: a rank that tears gloo down while the other still talks to it
# can abort the other (seen once as exit -6).
dist.barrier()
dist.destroy_process_group()
print("REPORT " + json.dumps(report))
"""


def test_torch_distributed_two_ranks_uneven_batches():
    port = free_port()
    env = dict(os.environ)
    env.update(KERAS_BACKEND="torch", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = TESTS_DIR + os.pathsep + env.get("PYTHONPATH", "")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                textwrap.dedent(TORCH_RANK_SCRIPT.format(port=port, rank=rank)),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for rank in (0, 1)
    ]
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=240)
            if proc.returncode != 0:
                pytest.fail(f"rank failed (exit {proc.returncode}):\n{out[-3000:]}\n{err[-6000:]}")
            outputs.append(report_of(out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for estimator in ("paper", "pooled"):
        ranks = [report[estimator] for report in outputs]
        for rank in ranks:
            assert max(rank["errors"]) < TOL, (estimator, rank["errors"])
            # bn1: the global batches (8 + 16 values) counted once; bn2: 4 rank batches.
            assert rank["counts"] == [[24.0, 2.0], [24.0, 4.0]], estimator
        assert ranks[0]["written"] == ranks[1]["written"]  # every rank writes the same
        assert ranks[0]["warnings"] == [
            "torch.distributed rank 0 stopped after 2 steps with data left: another rank ran "
            "out (every rank runs the same number of steps); the population statistics use "
            "those 2 steps."
        ]
        assert ranks[1]["warnings"] == []
