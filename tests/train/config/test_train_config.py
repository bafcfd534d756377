"""Settings, presets and configuration resolution (no training here)."""

import json

import pytest

from keras_bn.train.config import presets
from keras_bn.train.config import settings as config_lib

# Presets -----------------------------------------------------------------------------------


def test_every_preset_resolves_and_names_a_zoo_model():
    from keras_bn import models

    for name in presets.names():
        config = config_lib.resolve(name, {"model_dir": "/tmp/x"})
        assert config.model in models.names(), name
        assert config.preset == name
        assert presets.get(name).assumptions, f"{name} must document its assumptions"


def test_imagenet_presets_follow_section_4_2():
    table = {
        name: config_lib.resolve(name, {})
        for name in ("inception", "bn_baseline", "bn_x5", "bn_x30", "bn_x5_sigmoid")
    }
    lr = {name: c.learning_rate for name, c in table.items()}
    assert lr == {
        "inception": 0.0015,
        "bn_baseline": 0.0015,
        "bn_x5": 0.0075,
        "bn_x30": 0.045,
        "bn_x5_sigmoid": 0.0075,
    }
    assert table["inception"].model == "inception"
    assert table["bn_x5_sigmoid"].model == "bn_inception_sigmoid"
    for c in table.values():
        assert c.batch_size == 32 and c.momentum == 0.9
        assert c.dataset == "tfds:imagenet2012" and c.augment == "inception"
    # The baselines keep dropout, LRN, L2 2e-4, decay every 8 epochs, full distortion.
    for name in ("inception", "bn_baseline"):
        c = table[name]
        assert c.model_kwargs == {"dropout_rate": 0.4, "use_lrn": True}
        assert (c.weight_decay, c.lr_decay_epochs, c.lr_decay_rate) == (2e-4, 8.0, 0.96)
        assert c.distortion == "full"
    # Section 4.2.1: no dropout, no LRN, L2 / 5, decay 6x faster, more shuffling, fewer
    # distortions.
    for name in ("bn_x5", "bn_x30", "bn_x5_sigmoid"):
        c = table[name]
        assert c.model_kwargs == {"dropout_rate": 0.0, "use_lrn": False}
        assert c.weight_decay == pytest.approx(2e-4 / 5)
        assert c.lr_decay_epochs == pytest.approx(8.0 / 6.0)
        assert c.distortion == "reduced"
        assert c.shuffle_buffer > table["inception"].shuffle_buffer


def test_mnist_presets_match_section_4_1_and_the_figure1_experiment():
    from keras_bn.train.experiments import figure1

    base, bn = config_lib.resolve("mnist_baseline", {}), config_lib.resolve("mnist_bn", {})
    for c in (base, bn):
        assert (c.model, c.dataset, c.binarize) == ("mlp", "mnist", True)
        assert (c.batch_size, c.train_steps, c.eval_every) == (60, 50_000, 500)
        assert c.momentum == 0.0
        assert c.learning_rate == figure1.DEFAULT_LEARNING_RATE
    assert base.model_kwargs == {"batch_norm": False, "init_stddev": figure1.DEFAULT_INIT_STDDEV}
    assert bn.model_kwargs == {"batch_norm": True, "init_stddev": figure1.DEFAULT_INIT_STDDEV}


def test_explicit_values_override_the_preset_and_model_kwargs_merge():
    config = config_lib.resolve(
        "bn_x30",
        {"learning_rate": 0.01, "model_kwargs": {"depth_multiplier": 0.5, "use_lrn": True}},
    )
    assert config.learning_rate == 0.01
    assert config.model_kwargs == {"dropout_rate": 0.0, "use_lrn": True, "depth_multiplier": 0.5}
    assert config_lib.resolve("bn_x30", {}).model_kwargs["use_lrn"] is False  # preset unchanged


def test_defaults_without_a_preset():
    config = config_lib.resolve(None, {})
    assert (config.model, config.dataset, config.preset) == ("mlp", "mnist", None)


@pytest.mark.parametrize(
    "field, value, flag",
    [
        ("batch_size", 0, "--batch_size"),
        ("learning_rate", -1.0, "--learning_rate"),
        ("momentum", 1.0, "--momentum"),
        ("lr_decay_rate", 1.5, "--lr_decay_rate"),
        ("dataset", "imagenet", "--dataset"),
        ("dataset", "tfds:", "tfds:<name>"),
        ("strategy", "horovod", "--strategy"),
        ("fold_bn", True, "--fold_bn needs --export_dir"),
    ],
)
def test_bad_values_name_their_flag(field, value, flag):
    with pytest.raises(ValueError, match=flag):
        config_lib.resolve(None, {field: value})


def test_identity_ignores_fields_that_do_not_change_the_trajectory():
    a = config_lib.resolve("mnist_bn", {"train_steps": 10, "verbose": 0, "export_dir": "/e"})
    b = config_lib.resolve("mnist_bn", {"train_steps": 99, "eval_every": 7})
    c = config_lib.resolve("mnist_bn", {"learning_rate": 0.1})
    assert a.identity() == b.identity()
    assert a.identity() != c.identity()
    assert "train_steps" not in a.identity() and "learning_rate" in a.identity()
    assert json.loads(a.to_json())["model_kwargs"] == {"batch_norm": True, "init_stddev": 0.01}


@pytest.mark.parametrize(
    "preset, explicit, in_memory, expected",
    [
        ("mnist_bn", {}, None, True),  # default (auto): XLA for the in-memory path ...
        ("mnist_bn", {}, False, False),  # ... and none for tf.data
        ("mnist_bn", {"jit_compile": False}, None, False),  # honoured by the in-memory loop
        (None, {}, None, True),
        (None, {"jit_compile": True}, False, True),
    ],
)
def test_jit_compile_is_what_the_trainer_compiles_with(
    tmp_path, preset, explicit, in_memory, expected
):
    import tensorflow as tf

    from keras_bn.train.data.pipeline import make_data
    from keras_bn.train.engine.trainer import Trainer
    from keras_bn.train.rundir.folder import RunDir

    config = config_lib.resolve(preset, {"model_dir": str(tmp_path), **explicit})
    trainer = Trainer(
        config,
        tf.distribute.get_strategy(),
        make_data(config),
        RunDir(tmp_path),
        in_memory=in_memory,
    )
    assert trainer.jit_compile is expected
    if trainer.in_memory:
        assert trainer._make_train_fn()._jit_compile is expected


def test_a_model_without_preset_takes_its_recipes_optimization_settings():
    config = config_lib.resolve(None, {"model": "bn_inception"})
    assert (config.learning_rate, config.momentum, config.weight_decay) == (0.0075, 0.9, 4e-5)
    assert (
        config_lib.resolve(None, {"model": "bn_inception", "learning_rate": 0.1}).learning_rate
        == 0.1
    )
    assert config_lib.resolve(None, {}).learning_rate == 0.5  # the MLP keeps the settings' own
