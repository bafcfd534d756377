"""Exact population statistics (Alg. 2): keras_bn.population against a NumPy oracle.

The oracle runs the same batches through a float64 NumPy copy of the model in training mode
(Alg. 1 in every BN layer, so the second layer sees the first layer's training-mode output, the
paper's N_BN^tr) and applies the estimators' formulas to the per-batch statistics.
"""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from conftest import run_python  # noqa: E402

from keras_bn import population  # noqa: E402
from keras_bn.layer import BatchNormalization  # noqa: E402
from keras_bn.population import (  # noqa: E402
    PopulationStatistics,
    recompute_population_statistics,
)

RTOL = 2e-5
ATOL = 1e-6


# ------------------------------------------------------------------------------ NumPy oracle


def bn_train(h, layer, axes):
    """Alg. 1 on ``h``: returns (output, (n, mean, biased var, values as [-1, C]))."""
    mean = h.mean(axis=axes)
    var = h.var(axis=axes)
    n = h.size // mean.size
    gamma = np.asarray(layer.gamma, np.float64) if layer.scale else 1.0
    beta = np.asarray(layer.beta, np.float64) if layer.center else 0.0
    y = gamma * (h - mean) / np.sqrt(var + layer.epsilon) + beta
    return y, (n, mean, var, h.reshape(-1, mean.size))


def dense(h, layer):
    return h @ np.asarray(layer.kernel, np.float64) + np.asarray(layer.bias, np.float64)


def paper_estimate(stats, unbiased=True):
    """Alg. 2 on per-batch (n, mean, var): count-weighted means; batches of n <= 1 skipped."""
    stats = [s for s in stats if s[0] > 1]
    n = np.array([s[0] for s in stats], np.float64)[:, None]
    means = np.stack([s[1] for s in stats])
    variances = np.stack([s[2] for s in stats])
    mean = (n * means).sum(0) / n.sum()
    var = (n * variances).sum(0) / ((n - 1).sum() if unbiased else n.sum())
    return mean, var


def pooled_estimate(stats, unbiased=True):
    """Mean and variance of all values of all batches, concatenated."""
    values = np.concatenate([s[3] for s in stats])
    return values.mean(0), values.var(0, ddof=1 if unbiased else 0)


def two_bn_model(seed=0, **bn_kwargs):
    """Dense -> BN -> relu -> Dense -> BN with random weights, gammas and betas."""
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    d1, d2 = keras.layers.Dense(6), keras.layers.Dense(4)
    bn1, bn2 = BatchNormalization(**bn_kwargs), BatchNormalization(**bn_kwargs)
    inputs = keras.Input((5,))
    outputs = bn2(d2(keras.layers.ReLU()(bn1(d1(inputs)))))
    model = keras.Model(inputs, outputs)
    for layer in (d1, d2):
        layer.bias.assign(rng.normal(size=layer.bias.shape))
    for bn in (bn1, bn2):
        bn.gamma.assign(rng.uniform(0.5, 2.0, bn.gamma.shape))
        bn.beta.assign(rng.normal(size=bn.beta.shape))
    return model, (d1, bn1, d2, bn2)


def two_bn_oracle(layers, batches):
    """Per-batch statistics of both BN layers: ([stats of bn1], [stats of bn2])."""
    d1, bn1, d2, bn2 = layers
    first, second = [], []
    for x in batches:
        y1, s1 = bn_train(dense(np.asarray(x, np.float64), d1), bn1, 0)
        _, s2 = bn_train(dense(np.maximum(y1, 0.0), d2), bn2, 0)
        first.append(s1)
        second.append(s2)
    return first, second


def data(n, seed=1, dim=5):
    return np.random.default_rng(seed).normal(2.0, 3.0, (n, dim)).astype(np.float32)


def stats_of(layer):
    return np.asarray(layer.moving_mean), np.asarray(layer.moving_variance)


def assert_stats(layer, expected):
    mean, var = stats_of(layer)
    np.testing.assert_allclose(mean, expected[0], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(var, expected[1], rtol=RTOL, atol=ATOL)


ESTIMATE = {"paper": paper_estimate, "pooled": pooled_estimate}


# ------------------------------------------------------------------------------ estimators


@pytest.mark.parametrize("estimator", ["paper", "pooled"])
def test_two_bn_layers_match_oracle_on_tf_data(estimator):
    model, layers = two_bn_model()
    x = data(50)
    y = np.zeros((50, 1), np.float32)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)  # 16, 16, 16, 2
    result = recompute_population_statistics(model, dataset, estimator=estimator, verbose=0)

    batches = [x[i : i + 16] for i in range(0, 50, 16)]
    first, second = two_bn_oracle(layers, batches)
    assert_stats(layers[1], ESTIMATE[estimator](first))
    assert_stats(layers[3], ESTIMATE[estimator](second))
    entry = result[layers[1].path]
    np.testing.assert_array_equal(entry["count"], np.full(6, 50.0))
    np.testing.assert_array_equal(entry["batches"], np.full(6, 4.0))
    np.testing.assert_array_equal(entry["mean"], stats_of(layers[1])[0])


def test_unequal_numpy_batches_weighted_by_count():
    model, layers = two_bn_model(seed=2)
    x = data(21, seed=3)
    sizes = [3, 11, 1, 6]  # the batch of one value has no within-batch variance
    bounds = np.cumsum([0] + sizes)
    batches = [x[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    first, second = two_bn_oracle(layers, batches)

    result = recompute_population_statistics(model, batches, verbose=0)
    assert_stats(layers[1], paper_estimate(first))
    assert_stats(layers[3], paper_estimate(second))
    entry = result[layers[1].path]
    np.testing.assert_array_equal(entry["count"], np.full(6, 20.0))  # 1-value batch skipped
    np.testing.assert_array_equal(entry["batches"], np.full(6, 3.0))
    # Not the unweighted mean of the batch means, nor the mean of unweighted batch variances.
    used = [s for s in first if s[0] > 1]
    unweighted = np.mean([s[1] for s in used], axis=0)
    assert not np.allclose(stats_of(layers[1])[0], unweighted, rtol=1e-3)

    # Pooled: every value, the single-value batch included; elements as (x, y) tuples.
    result = recompute_population_statistics(
        model, [(b, np.zeros(len(b))) for b in batches], estimator="pooled", verbose=0
    )
    assert_stats(layers[1], pooled_estimate(first))
    assert_stats(layers[3], pooled_estimate(second))
    np.testing.assert_array_equal(result[layers[1].path]["count"], np.full(6, 21.0))
    np.testing.assert_array_equal(result[layers[1].path]["batches"], np.full(6, 4.0))


def test_batch_split_changes_paper_estimator_as_formula_says_and_pooled_not_at_all():
    model, layers = two_bn_model(seed=4)
    x = data(60, seed=5)
    written = {}
    for batch_size in (10, 30):
        dataset = tf.data.Dataset.from_tensor_slices(x).batch(batch_size)
        batches = [x[i : i + batch_size] for i in range(0, 60, batch_size)]
        first, _ = two_bn_oracle(layers, batches)
        for estimator in ("paper", "pooled"):
            recompute_population_statistics(model, dataset, estimator=estimator, verbose=0)
            written[estimator, batch_size] = stats_of(layers[1])
            expected = ESTIMATE[estimator](first)
            np.testing.assert_allclose(written[estimator, batch_size][1], expected[1], rtol=RTOL)
        # Equal batch sizes: the paper's m/(m-1) * E_B[var_B].
        m = batch_size
        paper_var = m / (m - 1) * np.mean([s[2] for s in first], axis=0)
        np.testing.assert_allclose(written["paper", m][1], paper_var, rtol=RTOL)

    for i in (0, 1):  # pooled mean and variance: unchanged by the split
        np.testing.assert_allclose(written["pooled", 10][i], written["pooled", 30][i], rtol=1e-6)
    # paper: same mean, a different variance (within-batch spread depends on the batches)
    np.testing.assert_allclose(written["paper", 10][0], written["paper", 30][0], rtol=1e-6)
    assert not np.allclose(written["paper", 10][1], written["paper", 30][1], rtol=1e-3)


@pytest.mark.parametrize("estimator", ["paper", "pooled"])
def test_biased_variance_when_layer_is_not_unbiased(estimator):
    model, layers = two_bn_model(seed=6, unbiased_variance=False)
    x = data(40, seed=7)
    batches = [x[:8], x[8:30], x[30:]]
    first, second = two_bn_oracle(layers, batches)
    recompute_population_statistics(model, batches, estimator=estimator, verbose=0)
    assert_stats(layers[1], ESTIMATE[estimator](first, unbiased=False))
    assert_stats(layers[3], ESTIMATE[estimator](second, unbiased=False))


def test_conv_input_uses_every_spatial_position():
    keras.utils.set_random_seed(8)
    conv = keras.layers.Conv2D(3, 3, padding="valid")
    bn = BatchNormalization()
    model = keras.Sequential([keras.Input((6, 6, 2)), conv, bn])
    x = np.random.default_rng(9).normal(1.0, 2.0, (10, 6, 6, 2)).astype(np.float32)
    batches = [x[:4], x[4:]]
    result = recompute_population_statistics(model, batches, verbose=0)

    stats = []
    for b in batches:
        h = np.asarray(conv(b), np.float64)  # the conv's output is the BN input
        stats.append(bn_train(h, bn, (0, 1, 2))[1])
    assert [s[0] for s in stats] == [4 * 16, 6 * 16]  # n = m * p * q
    assert_stats(bn, paper_estimate(stats))
    np.testing.assert_array_equal(result[bn.path]["count"], np.full(3, 160.0))


def test_nested_model():
    keras.utils.set_random_seed(10)
    inner_dense, inner_bn = keras.layers.Dense(4), BatchNormalization(gamma_initializer="ones")
    inner = keras.Sequential([keras.Input((5,)), inner_dense, inner_bn], name="inner")
    outer_dense, outer_bn = keras.layers.Dense(3), BatchNormalization()
    inputs = keras.Input((5,))
    model = keras.Model(inputs, outer_bn(outer_dense(keras.layers.ReLU()(inner(inputs)))))
    inner_bn.beta.assign([0.5, -1.0, 2.0, 0.0])
    x = data(30, seed=11)
    batches = [x[:12], x[12:]]
    first, second = two_bn_oracle((inner_dense, inner_bn, outer_dense, outer_bn), batches)

    result = recompute_population_statistics(model, batches, estimator="pooled", verbose=0)
    assert_stats(inner_bn, pooled_estimate(first))
    assert_stats(outer_bn, pooled_estimate(second))
    assert set(result) == {inner_bn.path, outer_bn.path}


def test_renorm_layer_moving_stddev_follows_the_population_variance():
    model, (_, bn1, _, bn2) = two_bn_model(seed=21, renorm=True)
    x = data(32, seed=22)
    model(x[:8], training=True)  # the renorm state moves away from its initial values
    renorm_state = [(np.array(b.renorm_mean), np.array(b.renorm_stddev)) for b in (bn1, bn2)]
    recompute_population_statistics(model, [x[:16], x[16:]], verbose=0)
    for bn, (renorm_mean, renorm_stddev) in zip((bn1, bn2), renorm_state, strict=True):
        # Training derives moving_variance from moving_stddev: the two must agree.
        np.testing.assert_allclose(
            np.square(np.array(bn.moving_stddev)) - bn.epsilon,
            np.array(bn.moving_variance),
            rtol=1e-5,
        )
        np.testing.assert_array_equal(np.array(bn.renorm_mean), renorm_mean)
        np.testing.assert_array_equal(np.array(bn.renorm_stddev), renorm_stddev)


# ------------------------------------------------------------------------------ side effects


def test_weights_optimizer_and_keras_bn_untouched():
    keras.utils.set_random_seed(12)
    ours = BatchNormalization()
    theirs = keras.layers.BatchNormalization()
    model = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(6), ours, keras.layers.Dense(4), theirs]
    )
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    x = data(32, seed=13)
    model.fit(x, np.ones((32, 4)), batch_size=8, epochs=1, verbose=0)  # optimizer has state
    tracked = model.trainable_variables + model.optimizer.variables
    tracked += [theirs.moving_mean, theirs.moving_variance]
    before = [np.array(v) for v in tracked]

    with pytest.warns(UserWarning, match="keras.layers.BatchNormalization"):
        recompute_population_statistics(model, [x[:16], x[16:]], verbose=0)
    for variable, value in zip(tracked, before, strict=True):
        np.testing.assert_array_equal(np.asarray(variable), value, err_msg=variable.path)
    assert not np.allclose(stats_of(ours)[1], 1.0)  # ours was recomputed


def test_layer_state_restored_when_dataset_fails_midway():
    model, (_, bn1, _, bn2) = two_bn_model(seed=14, momentum=0.9)
    frozen = BatchNormalization(momentum=None)
    model = keras.Sequential([model, frozen])
    frozen.trainable = False

    def sentinel(mean, variance, count):  # a user's observer: must come back untouched
        raise AssertionError("replaced during the recompute")

    bn2._statistics_observer = sentinel
    x = data(24, seed=15)

    def failing():
        yield x[:8]
        yield x[8:16]
        raise RuntimeError("disk on fire")

    layers = (bn1, bn2, frozen)
    before = [stats_of(layer) for layer in layers]
    with pytest.warns(UserWarning, match="trainable=False"):
        with pytest.raises(RuntimeError, match="disk on fire"):
            recompute_population_statistics(model, failing(), verbose=0)
    for layer, (mean, var) in zip(layers, before, strict=True):
        np.testing.assert_array_equal(stats_of(layer)[0], mean)  # the hook updates nothing
        np.testing.assert_array_equal(stats_of(layer)[1], var)
    assert bn1._statistics_observer is None and bn2._statistics_observer is sentinel
    assert frozen._statistics_observer is None
    assert (bn1.momentum, bn2.momentum, frozen.momentum) == (0.9, 0.9, None)
    assert (bn1.trainable, bn2.trainable, frozen.trainable) == (True, True, False)

    # The same model works afterwards; the frozen layer keeps its statistics.
    bn2._statistics_observer = None
    with pytest.warns(UserWarning, match="trainable=False"):
        result = recompute_population_statistics(model, [x[:8], x[8:]], steps=2, verbose=0)
    assert set(result) == {bn1.path, bn2.path}
    np.testing.assert_array_equal(stats_of(frozen)[1], before[2][1])


def test_steps_limit_and_running_out_of_data():
    model, layers = two_bn_model(seed=16)
    x = data(40, seed=17)
    dataset = tf.data.Dataset.from_tensor_slices(x).batch(10).repeat()
    result = recompute_population_statistics(model, dataset, steps=2, verbose=0)
    assert_stats(layers[1], paper_estimate(two_bn_oracle(layers, [x[:10], x[10:20]])[0]))
    assert result[layers[1].path]["batches"][0] == 2

    with pytest.warns(UserWarning, match="ran out of data after 4 of 7 steps"):
        recompute_population_statistics(
            model, iter([x[i : i + 10] for i in range(0, 40, 10)]), steps=7, verbose=0
        )
    assert_stats(layers[1], paper_estimate(two_bn_oracle(layers, np.split(x, 4))[0]))


def test_errors():
    model, _ = two_bn_model(seed=18)
    x = data(8)
    with pytest.raises(ValueError, match="estimator"):
        recompute_population_statistics(model, [x], estimator="ema")
    with pytest.raises(ValueError, match="steps"):
        recompute_population_statistics(model, [x], steps=0)
    with pytest.raises(ValueError, match="infinite"):
        recompute_population_statistics(model, tf.data.Dataset.from_tensors(x).repeat())
    with pytest.raises(ValueError, match="no batches"):
        recompute_population_statistics(model, [], verbose=0)
    with pytest.raises(ValueError, match="single array"):
        recompute_population_statistics(model, x)
    with pytest.raises(ValueError, match="iterable"):
        recompute_population_statistics(model, 3)

    plain = keras.Sequential([keras.Input((5,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="no keras_bn.BatchNormalization"):
        recompute_population_statistics(plain, [x])
    keras_only = keras.Sequential([keras.Input((5,)), keras.layers.BatchNormalization()])
    with pytest.raises(ValueError, match="no keras_bn.BatchNormalization"):
        recompute_population_statistics(keras_only, [x])
    unbuilt = keras.Sequential([keras.layers.Dense(2), BatchNormalization()])
    with pytest.raises(ValueError, match="not built"):
        recompute_population_statistics(unbuilt, [x])
    frozen = keras.Sequential([keras.Input((5,)), BatchNormalization()])
    frozen.trainable = False
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="trainable=True"):
        recompute_population_statistics(frozen, [x])
    with pytest.raises(ValueError, match="estimator"):
        PopulationStatistics([x], estimator="Paper")


# ------------------------------------------------------------------------------ callback


def test_callback_recomputes_at_train_end_and_before_evaluation(monkeypatch):
    calls = []
    real = population.recompute_population_statistics

    def counting(*args, **kwargs):
        calls.append(kwargs["estimator"])
        return real(*args, **kwargs)

    monkeypatch.setattr(population, "recompute_population_statistics", counting)
    model, layers = two_bn_model(seed=19, momentum=0.5)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    x = data(32, seed=20)
    y = np.ones((32, 4), np.float32)
    calibration = tf.data.Dataset.from_tensor_slices(x).batch(8)

    callback = PopulationStatistics(calibration, estimator="pooled")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, validation_data=(x, y), callbacks=[callback])
    assert calls == ["pooled"]  # once, at the end (not before validation without the flag)
    first, second = two_bn_oracle(layers, np.split(x, 4))  # with the trained weights
    assert_stats(layers[1], pooled_estimate(first))
    assert_stats(layers[3], pooled_estimate(second))
    assert set(callback.last_result) == {layers[1].path, layers[3].path}

    calls.clear()
    callback = PopulationStatistics(calibration, recompute_before_evaluation=True)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, validation_data=(x, y), callbacks=[callback])
    # before each epoch's validation; the end of training reuses the last one (same weights)
    assert calls == ["paper", "paper"]
    assert_stats(layers[1], paper_estimate(two_bn_oracle(layers, np.split(x, 4))[0]))

    calls.clear()
    layers[1].moving_variance.assign(np.full(6, 123.0))
    model.evaluate(x, y, verbose=0, callbacks=[callback])
    assert calls == ["paper"]
    assert_stats(layers[1], paper_estimate(two_bn_oracle(layers, np.split(x, 4))[0]))


# ------------------------------------------------------------------------------ distributed

MIRRORED_SCRIPT = """
import json, os, time
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import numpy as np
import keras
import test_population as t
from keras_bn.layer import BatchNormalization
from keras_bn.population import recompute_population_statistics

strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    keras.utils.set_random_seed(0)
    d1, d2 = keras.layers.Dense(6), keras.layers.Dense(4)
    bn1, bn2 = BatchNormalization(synchronized=True), BatchNormalization()
    inputs = keras.Input((5,))
    model = keras.Model(inputs, bn2(d2(keras.layers.ReLU()(bn1(d1(inputs))))))
    rng = np.random.default_rng(1)
    for bn in (bn1, bn2):
        bn.gamma.assign(rng.uniform(0.5, 2.0, bn.gamma.shape))
        bn.beta.assign(rng.normal(size=bn.beta.shape))
x = t.data(48, seed=2)
y = np.zeros((48, 1), np.float32)
global_batches = [x[i : i + 12] for i in range(0, 48, 12)]

def oracle(estimator):
    # bn1 is synchronized: statistics of the global batch. bn2 is local: each replica's half
    # (tf.distribute gives replica r the r-th contiguous half of every global batch).
    first, second = [], []
    for g in global_batches:
        y1, s1 = t.bn_train(t.dense(g.astype(np.float64), d1), bn1, 0)
        first.append(s1)
        for r in np.split(np.maximum(y1, 0.0), 2):
            second.append(t.bn_train(t.dense(r, d2), bn2, 0)[1])
    return t.ESTIMATE[estimator](first), t.ESTIMATE[estimator](second)

cases = {
    "paper, tf.data": ("paper", tf.data.Dataset.from_tensor_slices((x, y)).batch(12)),
    "pooled, numpy batches": ("pooled", global_batches),
    "paper, distributed (x, y)": ("paper", strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((x, y)).batch(12))),
}
report = {}
for case, (estimator, source) in cases.items():
    result = recompute_population_statistics(model, source, estimator=estimator, verbose=0)
    expected = oracle(estimator)
    errors = {}
    for name, layer, exp in (("bn1", bn1, expected[0]), ("bn2", bn2, expected[1])):
        got = [np.asarray(layer.moving_mean), np.asarray(layer.moving_variance)]
        errors[name] = [float(np.max(np.abs(g - e) / (np.abs(e) + 1e-6)))
                        for g, e in zip(got, exp)]
        errors[name + "_count"] = float(result[layer.path]["count"][0])
    report[case] = errors
print("REPORT " + json.dumps(report))
"""


@pytest.fixture(scope="module")
def mirrored_report():
    """Runs MIRRORED_SCRIPT once (2 logical CPUs need a fresh interpreter)."""
    out = run_python(MIRRORED_SCRIPT)
    line = next(line for line in out.splitlines() if line.startswith("REPORT "))
    report = json.loads(line[len("REPORT ") :])
    assert len(report) == 3
    return report


def test_mirrored_synchronized_layer_matches_global_oracle(mirrored_report):
    for case, errors in mirrored_report.items():
        # Every replica reports the same global statistics; they count once, not R times.
        assert errors["bn1_count"] == 48, case
        assert max(errors["bn1"]) < 1e-4, (case, errors)


def test_mirrored_local_layer_uses_each_replica_batch(mirrored_report):
    for case, errors in mirrored_report.items():
        assert errors["bn2_count"] == 48, case  # every replica's local half, once
        assert max(errors["bn2"]) < 1e-4, (case, errors)
