"""The wheel: one import namespace (keras_bn, keras_bn.models, keras_bn.train), package data."""

import os
import site
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: build with the setuptools already installed (no network needed).
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), ROOT],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = out.glob("keras_bn-*.whl")
    return path


def test_wheel_holds_only_the_keras_bn_namespace_and_the_mnist_files(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"keras_bn", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}
    for module in (
        "keras_bn/models/__init__.py",
        "keras_bn/models/mlp.py",
        "keras_bn/models/inception.py",
        "keras_bn/train/__init__.py",
        "keras_bn/train/__main__.py",
        "keras_bn/train/cli/main.py",
        "keras_bn/train/engine/run.py",
        "keras_bn/train/experiments/figure1.py",
        "keras_bn/layer.py",
    ):
        assert module in names, module
    for data in (
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
        "SHA256SUMS",
        "README.md",
    ):
        assert f"keras_bn/train/data/mnist/{data}" in names, data
    entry_points = [n for n in names if n.endswith("entry_points.txt")]
    assert (
        entry_points and "keras-bn-train" in zipfile.ZipFile(wheel).read(entry_points[0]).decode()
    )


def test_wheel_installs_into_a_fresh_venv_and_imports(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    # The heavy dependencies (TensorFlow, Keras, ...) come from the site-packages of the
    # interpreter running the tests, listed AFTER the new venv's own (a .pth file), so the
    # project itself is imported from the wheel only. (`venv --system-site-packages` would see
    # the base interpreter's packages, not those of a venv the tests may run in.)
    site_packages = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    with open(os.path.join(site_packages, "_test_dependencies.pth"), "w") as f:
        f.write("\n".join(site.getsitepackages()) + "\n")
    proc = subprocess.run(
        [
            python,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-index",
            "--force-reinstall",
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    check = f"""
import importlib.util, os
import keras_bn, keras_bn.models, keras_bn.train
from keras_bn.train.data.mnist_files import load_mnist
for module in (keras_bn, keras_bn.models, keras_bn.train):
    assert module.__file__.startswith({str(venv)!r}), module.__file__
assert importlib.util.find_spec("models") is None, "top-level 'models' leaked"
assert importlib.util.find_spec("train") is None, "top-level 'train' leaked"
images, labels = load_mnist("test")  # package data, checked against SHA256SUMS
assert images.shape == (10000, 28, 28)
print("OK", sorted(keras_bn.models.names()))
"""
    proc = subprocess.run(
        [python, "-I", "-c", check],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(tmp_path),
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK" in proc.stdout and "mlp" in proc.stdout


# The layer library on a machine without TensorFlow: a fresh venv that installs the wheel with
# one backend's extra from the package registry (torch pinned to the CPU build, as in setup.cfg).
NO_TENSORFLOW = {
    "jax": ["jax==0.10.2"],
    "torch": ["torch==2.13.0"],
}
NO_TENSORFLOW_CHECK = """
import importlib.util, sys, time
start = time.perf_counter()
import keras, keras_bn, keras_bn.models
seconds = time.perf_counter() - start
import numpy as np
assert keras.backend.backend() == BACKEND, keras.backend.backend()
assert importlib.util.find_spec("tensorflow") is None, "TensorFlow is installed"
assert "tensorflow" not in sys.modules
keras_bn.BatchNormalization(renorm=True, momentum=None)(np.ones((4, 3), "float32"), training=True)
x = np.random.default_rng(0).normal(3.0, 2.0, (64, 5)).astype("float32")
layer = keras_bn.BatchNormalization(momentum=0.0)
model = keras.Sequential([keras.Input((5,)), layer, keras.layers.Dense(2)])
model.compile(keras.optimizers.SGD(0.01), "mse")
model.fit(x, np.zeros((64, 2)), batch_size=64, epochs=1, verbose=0, shuffle=False)
np.testing.assert_allclose(layer.moving_mean.numpy(), x.mean(0), rtol=1e-5)
np.testing.assert_allclose(layer.moving_variance.numpy(), x.var(0) * 64 / 63, rtol=1e-4)
net = keras_bn.models.get("mlp")
net.compile(keras.optimizers.SGD(0.5), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
net.fit(np.zeros((60, 784), "float32"), np.zeros(60, "int32"), batch_size=60, verbose=0)
import subprocess
trainer = subprocess.run([sys.executable, "-m", "keras_bn.train"], capture_output=True, text=True)
assert trainer.returncode == 2 and "pip install 'keras-bn[train]'" in trainer.stderr, trainer
print(f"OK import {seconds:.2f} s")
"""


@pytest.mark.slow
@pytest.mark.parametrize("backend", sorted(NO_TENSORFLOW))
def test_layer_and_zoo_work_without_tensorflow(wheel, tmp_path, backend):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    proc = subprocess.run(
        [python, "-m", "pip", "install", "-q", *NO_TENSORFLOW[backend], f"{wheel}[{backend}]"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    proc = subprocess.run(
        [python, "-I", "-c", f"BACKEND = {backend!r}\n" + NO_TENSORFLOW_CHECK],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(tmp_path),
        env={**os.environ, "KERAS_BACKEND": backend},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "OK import" in proc.stdout
    print(backend, proc.stdout.strip())
