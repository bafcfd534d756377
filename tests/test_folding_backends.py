"""fold_batch_norm on TensorFlow, JAX and PyTorch (each backend in its own interpreter)."""

import json

import pytest
from conftest import run_python

FOLD = """
import json
import numpy as np
import keras
import keras_bn

L = keras.layers
rng = np.random.default_rng(0)

def randomize_bns(model):
    for bn in model._flatten_layers():
        if isinstance(bn, L.BatchNormalization):
            for var, low, high in [(bn.moving_mean, -1.0, 1.0), (bn.moving_variance, 0.3, 3.0),
                                   (bn.gamma, 0.5, 2.0), (bn.beta, -1.0, 1.0)]:
                if var is not None:
                    var.assign(rng.uniform(low, high, var.shape).astype(var.dtype))

def conv_model(bn_cls):
    inputs = keras.Input((7, 7, 3))
    x = L.Conv2D(4, 3, use_bias=False)(inputs)
    x = bn_cls(momentum=0.5)(x)  # folds into the convolution
    x = L.ReLU()(x)
    x = bn_cls(momentum=0.5)(x)  # after an activation: an AffineChannel
    x = L.DepthwiseConv2D(3, depth_multiplier=2)(x)
    x = bn_cls(momentum=0.5)(x)  # folds into the depthwise kernel
    return keras.Model(inputs, x)

def dense_model(bn_cls):
    return keras.Sequential([keras.Input((6,)), L.Dense(5), bn_cls(momentum=0.5),
                             L.Activation("tanh"), L.Dense(3, use_bias=False), bn_cls()])

BN_CLASSES = [("keras", L.BatchNormalization), ("keras_bn", keras_bn.BatchNormalization)]
results = {}
for kind, build, shape in [("conv", conv_model, (7, 7, 3)), ("dense", dense_model, (6,))]:
    for bn_name, bn_cls in BN_CLASSES:
        model = build(bn_cls)
        randomize_bns(model)
        x = rng.normal(size=(8, *shape)).astype("float32")
        model(x, training=True)  # the moving statistics move (momentum 0.5)
        folded = keras_bn.fold_batch_norm(model)
        ref = keras.ops.convert_to_numpy(model(x, training=False))
        out = keras.ops.convert_to_numpy(folded(x))
        layers = [type(layer).__name__ for layer in folded._flatten_layers(include_self=False)]
        results[f"{kind}-{bn_name}"] = dict(
            diff=float(np.abs(out - ref).max()), scale=float(np.abs(ref).max()),
            bns=sum(isinstance(layer, L.BatchNormalization)
                    for layer in folded._flatten_layers()),
            affine=layers.count("AffineChannel"))
print(json.dumps(results))
"""


@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
def test_fold_batch_norm_gives_equivalent_outputs(backend):
    out = run_python(FOLD, env={"KERAS_BACKEND": backend})
    results = json.loads(out.strip().splitlines()[-1])
    print(backend, results)
    assert sorted(results) == ["conv-keras", "conv-keras_bn", "dense-keras", "dense-keras_bn"]
    for name, r in results.items():
        assert r["bns"] == 0, (name, r)
        assert r["affine"] == (1 if name.startswith("conv") else 0), (name, r)
        # As tests/test_folding.py: 1e-5 relative to the output scale.
        assert r["diff"] <= 1e-5 * r["scale"], (name, r)
