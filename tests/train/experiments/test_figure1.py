"""Tests of the Figure 1 experiment (keras_bn.train.experiments.figure1): a short real run, its
outputs, determinism, the percentile recording and argument checking."""

import csv
import json
import math
import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from conftest import kill_when  # noqa: E402

from keras_bn.train.experiments import figure1, results  # noqa: E402

STEPS, EVAL_EVERY, EXAMPLES = 300, 100, 200
SHORT = dict(steps=STEPS, eval_every=EVAL_EVERY, percentile_examples=EXAMPLES, verbose=0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two short runs with the same arguments (for determinism), in two folders."""
    first = tmp_path_factory.mktemp("figure1_a") / "out"
    second = tmp_path_factory.mktemp("figure1_b") / "out"
    return (
        (first, figure1.run_figure1(first, seed=3, **SHORT)),
        (second, figure1.run_figure1(second, seed=3, **SHORT)),
    )


@pytest.fixture(scope="module")
def run(runs):
    return runs[0]


def test_writes_every_output_and_nothing_else(run):
    out, result = run
    assert sorted(os.listdir(out)) == ["figure1.csv", "figure1.json", "figure1.png", "summary.md"]
    png = (out / "figure1.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    assert result["figure"] == str(out / "figure1.png")
    for key, name in (("json", "figure1.json"), ("csv", "figure1.csv"), ("summary", "summary.md")):
        assert result[key] == str(out / name)


def test_json_curves_have_expected_keys_and_lengths(run):
    out, result = run
    curves = json.loads((out / "figure1.json").read_text())
    evals = STEPS // EVAL_EVERY + 1
    assert curves["steps"] == [0, 100, 200, 300]
    assert curves["percentiles"] == [15, 50, 85]
    assert curves["config"]["steps"] == STEPS
    assert curves["config"]["batch_size"] == 60
    assert curves["config"]["percentile_examples"] == EXAMPLES
    for name in ("baseline", "bn"):
        net = curves[name]
        assert len(net["test_accuracy"]) == evals
        assert all(0.0 <= a <= 1.0 for a in net["test_accuracy"])
        assert net["train_loss"][0] is None
        assert len(net["train_loss"]) == evals
        assert all(math.isfinite(v) and v > 0 for v in net["train_loss"][1:])
        p = net["sigmoid_input_percentiles"]
        assert sorted(p) == ["p15", "p50", "p85"]
        p15, p50, p85 = (np.asarray(p[k]) for k in ("p15", "p50", "p85"))
        assert len(p15) == len(p50) == len(p85) == evals
        assert np.all(p15 <= p50) and np.all(p50 <= p85)
        assert net["final_test_accuracy"] == net["test_accuracy"][-1]
    assert result["baseline_test_accuracy"] == curves["baseline"]["final_test_accuracy"]
    assert result["bn_test_accuracy"] == curves["bn"]["final_test_accuracy"]
    assert result["wall_time_s"] > 0
    assert set(result["train_time_s"]) == {"baseline", "bn"}


def test_csv_matches_json(run):
    out, _ = run
    curves = json.loads((out / "figure1.json").read_text())
    with open(out / "figure1.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == curves["steps"]
    assert rows[0]["bn_train_loss"] == ""
    for name in ("baseline", "bn"):
        np.testing.assert_array_equal(
            [float(r[f"{name}_test_accuracy"]) for r in rows], curves[name]["test_accuracy"]
        )
        np.testing.assert_array_equal(
            [float(r[f"{name}_sigmoid_input_p50"]) for r in rows],
            curves[name]["sigmoid_input_percentiles"]["p50"],
        )


def test_summary_reports_both_accuracies(run):
    out, result = run
    text = (out / "summary.md").read_text()
    assert f"{result['baseline_test_accuracy']:.4f}" in text
    assert f"{result['bn_test_accuracy']:.4f}" in text
    assert f"learning rate {figure1.DEFAULT_LEARNING_RATE} " in text


def test_bn_net_learns_faster(run):
    # The paper's claim, visible after a few hundred steps: with the small init the baseline's
    # sigmoids barely move while the BN net is already far above chance.
    _, result = run
    assert result["bn_test_accuracy"] > 0.8
    assert result["bn_test_accuracy"] > result["baseline_test_accuracy"] + 0.3


def test_bn_percentiles_are_centred_at_init(run):
    # At step 0 gamma = 1 and beta = 0, so the BN net's sigmoid input in training mode is the
    # fixed batch standardized with its own statistics: centred on 0 (the spread is below 1
    # because the tiny initial weights give variances comparable to epsilon).
    out, _ = run
    p = json.loads((out / "figure1.json").read_text())["bn"]["sigmoid_input_percentiles"]
    assert abs(p["p50"][0]) < 0.3
    assert p["p15"][0] < 0 < p["p85"][0]


def test_same_seed_gives_identical_curves(runs):
    (_, a), (_, b) = runs
    for name in ("baseline", "bn"):
        for key in ("test_accuracy", "train_loss", "sigmoid_input_percentiles"):
            assert a["curves"][name][key] == b["curves"][name][key], (name, key)


def test_sigmoid_input_uses_batch_statistics_without_moving_them():
    import keras
    import tensorflow as tf

    from keras_bn import models

    model = models.get("mlp", batch_norm=True, init_stddev=0.01, seed=0)
    rng = np.random.default_rng(0)
    x = tf.constant((rng.random((64, 784)) > 0.5).astype(np.float32))
    sigmoid_input = figure1.sigmoid_input_fn(model, x, 5)
    bn = model.get_layer("hidden3_bn")
    before = [np.array(v) for v in (bn.moving_mean, bn.moving_variance)]
    values = sigmoid_input().numpy()
    after = [np.array(v) for v in (bn.moving_mean, bn.moving_variance)]
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])
    assert values.shape == (64,)
    # N_BN^tr: the unit's Dense output standardized with the fixed batch's own biased
    # statistics, then gamma * x_hat + beta.
    dense = keras.Model(model.inputs, model.get_layer("hidden3_dense").output)
    d = np.asarray(dense(x, training=True), np.float64)[:, 5]
    gamma, beta = np.asarray(bn.gamma)[5], np.asarray(bn.beta)[5]
    expected = gamma * (d - d.mean()) / np.sqrt(d.var() + bn.epsilon) + beta
    np.testing.assert_allclose(values, expected, rtol=1e-4, atol=1e-5)


def test_failed_write_leaves_previous_outputs_untouched(run, tmp_path, monkeypatch):
    out, result = run
    target = tmp_path / "target"
    target.mkdir()
    (target / "figure1.csv").write_text("old")

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    from keras_bn.train.experiments import figure1_plot

    monkeypatch.setattr(figure1_plot, "plot_figure1", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        figure1._write_outputs(target, json.loads((out / "figure1.json").read_text()), 0.0)
    assert os.listdir(target) == ["figure1.csv"]
    assert (target / "figure1.csv").read_text() == "old"


def test_first_step_at_threshold():
    assert results.first_step_at([0, 500, 1000, 1500], [0.1, 0.5, 0.96, 0.97], 0.95) == 1000
    assert results.first_step_at([0, 100], [0.1, 0.95], 0.95) == 100
    assert results.first_step_at([0, 500], [0.1, 0.5], 0.95) is None


def test_percentiles_are_ordered():
    assert figure1.percentiles(np.arange(101)) == [15.0, 50.0, 85.0]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(steps=1000, eval_every=300), "multiple of `eval_every`"),
        (dict(steps=0), "`steps`"),
        (dict(steps=True), "`steps`"),
        (dict(steps=100.0, eval_every=100), "`steps`"),
        (dict(eval_every=0), "`eval_every`"),
        (dict(batch_size=1), "`batch_size`"),
        (dict(learning_rate=0.0), "`learning_rate`"),
        (dict(learning_rate=float("nan")), "`learning_rate`"),
        (dict(learning_rate="0.1"), "`learning_rate`"),
        (dict(seed=-1), "`seed`"),
        (dict(binarize="yes"), "`binarize`"),
        (dict(verbose=3), "`verbose`"),
        (dict(init_stddev=-0.1), "`init_stddev`"),
        (dict(percentile_examples=1), "`percentile_examples`"),
        (dict(percentile_unit=100), "`percentile_unit`"),
    ],
)
def test_invalid_arguments_raise_before_any_work(tmp_path, kwargs, match):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        figure1.run_figure1(out, **kwargs)
    assert not out.exists()


def test_output_dir_that_is_a_file_is_rejected(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(ValueError, match="`output_dir`"):
        figure1.run_figure1(path, steps=100, eval_every=100)


def _figure1_command(model_dir):
    return [
        sys.executable,
        "-m",
        "keras_bn.train",
        "--experiment=figure1",
        "--train_steps=2000",
        "--eval_every=100",
        "--seed=3",
        "--verbose=0",
        f"--model_dir={model_dir}",
    ]


def _curves(model_dir):
    curves = json.loads((model_dir / "figure1.json").read_text())
    timing = ("train_time_s", "steps_per_s")
    return {n: {k: v for k, v in curves[n].items() if k not in timing} for n in figure1.NETS}


def test_killed_figure1_resumes_to_the_uninterrupted_curves(tmp_path):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    done = subprocess.run(_figure1_command(reference), capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]

    # Killed in the middle of the second net, the first one finished.
    kill_when(
        _figure1_command(killed),
        lambda: bool(list((killed / "bn" / "checkpoints").glob("ckpt-*.index"))),
        env=env,
    )
    assert not (killed / "figure1.json").exists()

    resumed = subprocess.run(_figure1_command(killed), capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming" in resumed.stdout
    assert _curves(killed) == _curves(reference)

    again = subprocess.run(_figure1_command(killed), capture_output=True, text=True, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already complete" in again.stdout


def test_every_panel_shows_its_curves_whole():
    # A baseline that starts at chance and percentiles that drift: each main panel's limits
    # hold every point of its curves (panel (a)'s inset zooms on purpose).
    from keras_bn.train.experiments.figure1_plot import draw_figure1

    steps = list(range(0, 10_001, 500))
    rising = [min(0.97, 0.1 + 0.9 * s / 4000) for s in steps]
    drift = {f"p{q}": [q / 10 - 9 - s / 1000 for s in steps] for q in (15, 50, 85)}
    steady = {f"p{q}": [q / 50 - 1 for _ in steps] for q in (15, 50, 85)}
    curves = {
        "steps": steps,
        "baseline": {"test_accuracy": rising, "sigmoid_input_percentiles": drift},
        "bn": {
            "test_accuracy": [0.9] + [0.98] * (len(steps) - 1),
            "sigmoid_input_percentiles": steady,
        },
    }
    panels = draw_figure1(curves).axes
    assert len(panels) == 3
    for ax in panels:
        (x_low, x_high), (y_low, y_high) = ax.get_xlim(), ax.get_ylim()
        for line in ax.get_lines():
            x, y = np.asarray(line.get_xdata()), np.asarray(line.get_ydata())
            assert x.min() >= x_low and x.max() <= x_high, ax.get_title()
            assert y.min() >= y_low and y.max() <= y_high, (ax.get_title(), y.min(), y_low)
