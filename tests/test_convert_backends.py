"""convert_model both ways, and .keras files between backends, on TensorFlow, JAX and PyTorch.

Each backend runs in its own interpreter (KERAS_BACKEND is read when Keras is imported).
"""

import json

import numpy as np
import pytest
from conftest import run_python

BACKENDS = ["tensorflow", "jax", "torch"]
# ROUNDING: in inference our layer computes (x - mean) * m + beta, Keras's layer on JAX and
# TensorFlow x * m + (beta - mean * m) (on torch the same as ours). For one layer the two are an
# ulp of the output apart (measured: 1.9e-6 on outputs up to 27, each 1.3-1.6e-6 from float64),
# so the way back is checked to 1e-6 of the output scale (1e-6 absolute for outputs up to 1).

# Shared by the scripts: random statistics and parameters for every BN layer (no training
# step: that would need a backend's autodiff), and the largest output difference.
HELPERS = """
import json, warnings
import numpy as np
import keras
import keras_bn

L = keras.layers
keras.utils.set_random_seed(0)  # the initial weights too: the same net on every run

def randomize_bns(model, seed=0):
    rng = np.random.default_rng(seed)
    for bn in model._flatten_layers():
        if not isinstance(bn, L.BatchNormalization):
            continue
        for var, low, high in [(bn.moving_mean, -1.0, 1.0), (bn.moving_variance, 0.3, 3.0),
                               (bn.gamma, 0.5, 2.0), (bn.beta, -1.0, 1.0)]:
            if var is not None:
                var.assign(rng.uniform(low, high, var.shape).astype(var.dtype))

def infer(model, x):
    return keras.ops.convert_to_numpy(model(x, training=False))

def diff(a, b, x):
    return float(np.abs(infer(a, x) - infer(b, x)).max())

def scale(model, x):
    return float(np.abs(infer(model, x)).max())

def bn_types(model):
    return sorted({type(layer).__module__ for layer in model._flatten_layers()
                   if isinstance(layer, L.BatchNormalization)})

def user_warnings(caught):
    return [str(w.message) for w in caught if w.category is UserWarning]
"""

APPLICATION = (
    HELPERS
    + """
model = keras.applications.MobileNetV2(
    input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=10, classifier_activation=None)
randomize_bns(model)
rng = np.random.default_rng(1)
x = rng.normal(size=(4, 32, 32, 3)).astype("float32")
y = rng.integers(0, 10, 4)
bns = sum(isinstance(layer, L.BatchNormalization) for layer in model._flatten_layers())

converted = keras_bn.convert_model(model)
result = dict(bns=bns, to_ours=diff(model, converted, x), ours_types=bn_types(converted))
ours = [layer for layer in converted._flatten_layers()
        if isinstance(layer, keras_bn.BatchNormalization)]
result["synchronized"] = sorted({bn.synchronized for bn in ours})
before = [keras.ops.convert_to_numpy(bn.moving_mean) for bn in ours]
converted.compile(keras.optimizers.SGD(0.01),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
history = converted.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
result["loss"] = history.history["loss"][-1]
result["moved"] = sum(not np.allclose(keras.ops.convert_to_numpy(bn.moving_mean), m)
                      for bn, m in zip(ours, before))

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    back = keras_bn.convert_model(converted, to="keras")
result.update(back=diff(converted, back, x), scale=scale(back, x), back_types=bn_types(back),
              warnings=user_warnings(caught))
print(json.dumps(result))
"""
)


@pytest.mark.parametrize("backend", BACKENDS)
def test_applications_net_converts_trains_and_converts_back(backend):
    out = run_python(APPLICATION, env={"KERAS_BACKEND": backend}, timeout=900)
    r = json.loads(out.strip().splitlines()[-1])
    print(backend, {k: v for k, v in r.items() if k != "warnings"})
    assert r["bns"] > 40
    assert r["ours_types"] == ["keras_bn.layer"] and r["synchronized"] == [False]
    assert r["to_ours"] <= 1e-5
    assert np.isfinite(r["loss"]) and r["moved"] == r["bns"]  # fit trained every BN layer
    assert r["back_types"] == ["keras.src.layers.normalization.batch_normalization"]
    assert r["back"] <= 1e-6 * max(1.0, r["scale"])  # see ROUNDING
    (message,) = r["warnings"]  # one warning, naming what Keras's layer cannot carry
    assert "- unbiased_variance=True (Keras's layer moves the moving variance toward" in message
    assert f"all {r['bns']} converted layers" in message


SETTINGS_BACK = (
    HELPERS
    + """
inputs = keras.Input((6, 6, 3))
h = L.Conv2D(4, 3, use_bias=False)(inputs)
h = keras_bn.BatchNormalization(momentum=None, name="counted")(h)
h = keras_bn.BatchNormalization(axis=[3], virtual_batch_size=2, unbiased_variance=False,
                                fused=False, moving_mean_constraint="non_neg",
                                name="ghost")(h)
h = keras_bn.BatchNormalization(renorm=True, synchronized=True, unbiased_variance=False,
                                name="renorm")(L.Flatten()(h))
model = keras.Model(inputs, keras_bn.BatchNormalization(unbiased_variance=False,
                                                        name="plain")(h))
randomize_bns(model)
x = np.random.default_rng(2).normal(size=(4, 6, 6, 3)).astype("float32")
model(x, training=True)  # a count of 1 for "counted", renorm's statistics move
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    back = keras_bn.convert_model(model, to="keras")
layers = {layer.name: layer for layer in back.layers}
result = dict(
    diff=diff(model, back, x), scale=scale(back, x), types=bn_types(back),
    warnings=user_warnings(caught),
    weights={name: [w.name for w in layers[name].weights]
             for name in ("counted", "ghost", "renorm", "plain")},
    momentum=layers["counted"].momentum, axis=layers["ghost"].axis,
    synchronized=layers["renorm"].synchronized,
    config_keys=sorted(layers["ghost"].get_config()),
)
print(json.dumps(result))
"""
)


@pytest.mark.parametrize("backend", BACKENDS)
def test_way_back_names_every_setting_keras_cannot_carry_in_one_warning(backend):
    out = run_python(SETTINGS_BACK, env={"KERAS_BACKEND": backend})
    r = json.loads(out.strip().splitlines()[-1])
    print(backend, r)
    assert r["types"] == ["keras.src.layers.normalization.batch_normalization"]
    assert r["diff"] <= 1e-6 * max(1.0, r["scale"])  # see ROUNDING
    assert r["weights"]["counted"] == ["gamma", "beta", "moving_mean", "moving_variance"]
    assert r["weights"]["renorm"][-3:] == ["moving_stddev", "renorm_mean", "renorm_stddev"]
    assert r["momentum"] == 0.99 and r["axis"] == 3
    assert r["synchronized"] is (backend == "tensorflow")  # Keras refuses True elsewhere
    assert "virtual_batch_size" not in r["config_keys"]
    (message,) = r["warnings"]
    lines = message.splitlines()[1:]
    expected = {
        "- momentum=None": "'counted'",
        "- unbiased_variance=True": "'counted'",
        "- virtual_batch_size": "'ghost'",
        "- moving_mean_constraint": "'ghost'",
        "- fused": "'ghost'",
    }
    if backend == "torch":
        expected["- synchronized=True"] = "'renorm'"
    assert len(lines) == len(expected), lines
    for start, names in expected.items():
        (line,) = [line for line in lines if line.startswith(start)]
        assert line.endswith(f": {names}"), line


def test_way_back_refuses_several_axes_and_bad_targets():
    out = run_python(
        HELPERS
        + """
model = keras.Sequential([keras.Input((3, 4)), keras_bn.BatchNormalization(axis=[1, 2],
                                                                           name="two")])
for kwargs in [dict(to="keras"), dict(to="tf_keras"), dict(to="keras", fused=True)]:
    try:
        keras_bn.convert_model(model, **kwargs)
    except ValueError as e:
        print(str(e).splitlines()[0])
""",
        env={"KERAS_BACKEND": "jax"},
    )
    lines = out.strip().splitlines()[-3:]
    assert "layer 'two' normalizes several axes (axis=[1, 2])" in lines[0]
    assert "`to` must be 'keras_bn'" in lines[1] and "to='tf_keras'" in lines[1]
    assert (
        "'fused' is not an argument" in lines[2] and "keras.layers.BatchNormalization" in (lines[2])
    )


# --------------------------------------------------------------------------------------------
# JAX under a distribution: Keras's layer is global there, so the converted one is too

JAX_DISTRIBUTED = (
    HELPERS
    + """
keras.distribution.set_distribution(keras.distribution.DataParallel())
model = keras.Sequential([keras.Input((3,)), L.Dense(4), L.BatchNormalization(name="bn")])
rng = np.random.default_rng(0)
# Device 0's half around 0, device 1's around 3: global and per-device statistics differ.
x = np.concatenate([rng.normal(0, 1, (4, 3)), rng.normal(3, 2, (4, 3))]).astype("float32")
train = lambda m: keras.ops.convert_to_numpy(m(x, training=True))
reference = train(model)
default = keras_bn.convert_model(model)
per_device = keras_bn.convert_model(model, synchronized=False)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    back = keras_bn.convert_model(per_device, to="keras")
result = dict(
    devices=len(keras.distribution.list_devices()),
    default=default.layers[1].synchronized, per_device=per_device.layers[1].synchronized,
    default_diff=float(np.abs(train(default) - reference).max()),
    per_device_diff=float(np.abs(train(per_device) - reference).max()),
    # Converting ours again keeps its own setting.
    again=keras_bn.convert_model(per_device).layers[1].synchronized,
    back_diff=float(np.abs(train(back) - reference).max()),
    warnings=user_warnings(caught),
)
keras.distribution.set_distribution(None)
result["without_distribution"] = keras_bn.convert_model(model).layers[1].synchronized
print(json.dumps(result))
"""
)


def test_jax_distribution_keeps_keras_global_statistics_by_default():
    out = run_python(
        JAX_DISTRIBUTED,
        env={"KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
    )
    r = json.loads(out.strip().splitlines()[-1])
    print(r)
    assert r["devices"] == 2
    assert r["default"] is True and r["default_diff"] <= 1e-5  # as Keras's layer: global
    assert r["per_device"] is False and r["per_device_diff"] > 0.1  # asked for: per device
    assert r["again"] is False and r["without_distribution"] is False
    assert r["back_diff"] <= 1e-5  # Keras's layer again: global
    (message,) = r["warnings"]
    assert "- synchronized=False under the current keras.distribution" in message


# --------------------------------------------------------------------------------------------
# A .keras file saved on TensorFlow, loaded on JAX and torch

SAVE = (
    HELPERS
    + """
inputs = keras.Input((6, 6, 3))
h = L.Conv2D(4, 3, use_bias=False)(inputs)
h = keras_bn.BatchNormalization(momentum=None, name="counted")(h)
h = keras_bn.BatchNormalization(renorm=True, name="renorm")(h)
h = L.Flatten()(h)
h = L.Dense(5)(h)
outputs = keras_bn.BatchNormalization(axis=[1], name="dense_bn")(h)
model = keras.Model(inputs, outputs)
randomize_bns(model)
x = np.random.default_rng(3).normal(size=(4, 6, 6, 3)).astype("float32")
for _ in range(2):
    model(x, training=True)
model.save(PATH + "/model.keras")
np.savez(PATH + "/expected.npz", x=x, y=infer(model, x),
         **{w.path.replace("/", "__"): keras.ops.convert_to_numpy(w) for w in model.weights})
print(json.dumps(dict(weights=len(model.weights))))
"""
)

LOAD = """
import json
import numpy as np
import keras
import keras_bn  # registers keras_bn>BatchNormalization: load_model needs it
saved = np.load(PATH + "/expected.npz")
model = keras.models.load_model(PATH + "/model.keras")
y = keras.ops.convert_to_numpy(model(saved["x"], training=False))
weights = {w.path.replace("/", "__"): keras.ops.convert_to_numpy(w) for w in model.weights}
print(json.dumps(dict(
    diff=float(np.abs(y - saved["y"]).max()),
    types=sorted({type(layer).__name__ for layer in model.layers}),
    same_weights=sorted(weights) == sorted(k for k in saved if k not in ("x", "y"))
    and all(np.array_equal(weights[k], saved[k]) for k in weights),
    counts=keras.ops.convert_to_numpy(model.get_layer("counted").moving_count).tolist(),
)))
"""


@pytest.fixture(scope="module")
def saved_on_tensorflow(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("keras_file"))
    run_python(f"PATH = {path!r}\n" + SAVE, env={"KERAS_BACKEND": "tensorflow"})
    return path


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_keras_file_saved_on_tensorflow_loads_with_the_same_outputs(saved_on_tensorflow, backend):
    out = run_python(f"PATH = {saved_on_tensorflow!r}\n" + LOAD, env={"KERAS_BACKEND": backend})
    r = json.loads(out.strip().splitlines()[-1])
    print(backend, r)
    assert r["same_weights"], r
    assert r["diff"] <= 1e-5, r  # the same weights; each backend's convolution rounds its own way
    assert r["counts"] == [2.0] * 4  # moving_count came along


def test_keras_file_needs_keras_bn_imported_and_the_way_back_does_not(tmp_path):
    """Without `import keras_bn`, load_model cannot find our class; after convert_model(...,
    to="keras") the file loads with Keras alone."""
    path = str(tmp_path)
    run_python(
        f"PATH = {path!r}\n"
        + HELPERS
        + """
model = keras.Sequential([keras.Input((3,)), L.Dense(4),
                          keras_bn.BatchNormalization(unbiased_variance=False)])
randomize_bns(model)
model.save(PATH + "/ours.keras")
back = keras_bn.convert_model(model, to="keras")
back.save(PATH + "/keras.keras")
x = np.random.default_rng(4).normal(size=(2, 3)).astype("float32")
np.savez(PATH + "/io.npz", x=x, y=infer(model, x))
""",
        env={"KERAS_BACKEND": "torch"},
    )
    out = run_python(
        f"PATH = {path!r}\n"
        + """
import sys
import numpy as np
import keras
io = np.load(PATH + "/io.npz")
try:
    keras.models.load_model(PATH + "/ours.keras")
except Exception as e:
    located = "Could not locate class 'BatchNormalization'" in str(e)
    print("ours: could not locate our class:", located)
model = keras.models.load_model(PATH + "/keras.keras")
y = keras.ops.convert_to_numpy(model(io["x"], training=False))
print("keras_bn imported:", "keras_bn" in sys.modules)
print("diff:", float(np.abs(y - io["y"]).max()))
""",
        env={"KERAS_BACKEND": "jax"},
    )
    assert "ours: could not locate our class: True" in out
    assert "keras_bn imported: False" in out
    assert float(out.split("diff:")[1]) <= 1e-6
