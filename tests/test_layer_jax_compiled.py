"""JAX's closed-form training transform under ``jax.jit`` and eagerly, against the plain path.

The closed form (``keras_bn.backends.jax``) is a jitted ``jax.custom_vjp``: an eager step runs
it as compiled programs, an outer ``jax.jit`` inlines it. Both must give the plain path's
outputs, gradients and moving statistics (``fused=False``: ``keras.ops`` under autodiff) to
float rounding, with renorm, a mask, float16 inputs and a masked-out time step. The optimized
HLO of a jitted step must write one full-size tensor (the input gradient): the statistics'
``x - mean`` is recomputed inside every reduction rather than stored and read back. Each test
module runs one JAX process (the main run may use another backend).
"""

import json

import pytest
from conftest import run_python

SCRIPT = r"""
import json, re
import numpy as np, jax, jax.numpy as jnp, keras, keras_bn

rng = np.random.default_rng(0)
results = {}

def step(layer, x, dy, mask, jit):
    trainable = [v.value for v in layer.trainable_variables]
    others = [v.value for v in layer.non_trainable_variables]
    def loss(trainable, x):
        y, state = layer.stateless_call(trainable, others, x, training=True, mask=mask)
        return jnp.sum(y.astype("float32") * dy), (y, state)
    grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    grads = jax.jit(grads) if jit else grads
    (_, (y, state)), (d_params, dx) = grads(trainable, x)
    return [np.asarray(v, np.float64) for v in (y, dx, *d_params, *state)]

CASES = {
    "nhwc": ((8, 5, 5, 6), {}, False, "float32"),
    "dense_renorm": ((32, 6), {"renorm": True, "renorm_clipping": {"rmax": 1.2, "dmax": 0.3}},
                     False, "float32"),
    "sequence_mask": ((6, 7, 4), {}, True, "float32"),
    "float16": ((8, 3, 3, 4), {"momentum": None}, False, "float16"),
}
for name, (shape, kwargs, masked, dtype) in CASES.items():
    x = rng.normal(3.0, 2.0, shape).astype(dtype)
    dy = rng.normal(size=shape).astype("float32")
    mask = None
    if masked:
        mask = rng.random(shape[:-1]) < 0.7
        mask[:, :] = mask[:, :] & (np.arange(shape[1]) != 2)  # a time step with no value
        mask = jnp.asarray(mask)
    runs = {}
    for fused in (None, False):
        for jit in (False, True):
            layer = keras_bn.BatchNormalization(
                fused=fused,
                gamma_initializer=keras.initializers.RandomUniform(0.5, 1.5, seed=1),
                beta_initializer=keras.initializers.RandomUniform(-1, 1, seed=2), **kwargs)
            layer.build(shape)
            if "renorm" in kwargs:  # r and d away from 1 and 0
                layer.renorm_stddev.assign(jnp.full(layer.renorm_stddev.shape, 0.8))
            runs[(fused, jit)] = step(layer, jnp.asarray(x), dy, mask, jit)
    plain = runs[(False, False)]
    errors = {}
    for (fused, jit), values in runs.items():
        errors[f"fused={fused},jit={jit}"] = max(
            float(np.abs(a - b).max() / max(1.0, np.abs(b).max())) for a, b in zip(values, plain))
    results[name] = errors

# The optimized HLO of a jitted step: full-size tensors written (fusion outputs).
shape = (16, 8, 8, 32)
x = jnp.asarray(rng.normal(1.0, 2.0, shape).astype("float32"))
dy = jnp.asarray(rng.normal(size=shape).astype("float32"))
full = re.compile(r"= f32\[16,8,8,32\]\{[0-9,]*\} (fusion|copy|transpose)\(")
writes = {}
for fused in (None, False):
    layer = keras_bn.BatchNormalization(fused=fused)
    layer.build(shape)
    trainable = [v.value for v in layer.trainable_variables]
    others = [v.value for v in layer.non_trainable_variables]
    def loss(trainable, x):  # the step of a training loop: the new state, not the outputs
        y, state = layer.stateless_call(trainable, others, x, training=True)
        return jnp.sum(y * dy), state
    grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    text = grads.lower(trainable, x).compile().as_text()
    entry = text[text.index("ENTRY"):]
    writes[str(fused)] = len(full.findall(entry))
results["full_size_writes"] = writes
print("RESULTS" + json.dumps(results))
"""


@pytest.fixture(scope="module")
def results():
    out = run_python(SCRIPT, env={"KERAS_BACKEND": "jax"}, timeout=600)
    line = [line for line in out.splitlines() if line.startswith("RESULTS")][-1]
    return json.loads(line[len("RESULTS") :])


@pytest.mark.parametrize("case", ["nhwc", "dense_renorm", "sequence_mask", "float16"])
def test_eager_and_jitted_closed_form_equal_the_plain_path(results, case):
    errors = results[case]
    assert len(errors) == 4
    for run, error in errors.items():
        # Outputs, input and parameter gradients, moving statistics (relative to their scale).
        assert error < 2e-5, (case, run, errors)


def test_a_jitted_step_writes_only_the_input_gradient(results):
    # XLA:CPU fuses x - mean into each reduction and the gradient's pass (the plain path,
    # under autodiff, stores x - mean, x_hat and the broadcast scale besides).
    writes = results["full_size_writes"]
    assert writes["None"] == 1, writes
    assert writes["False"] > writes["None"], writes
