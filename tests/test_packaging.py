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
