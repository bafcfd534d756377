"""The experiments' registry: every experiment declares its options as the run's settings are."""

import dataclasses

from absl import flags as absl_flags

from keras_bn.train.cli import flags as train_flags
from keras_bn.train.experiments import figure1, registry, table2

OPTIONS = {
    "figure1": figure1.Options,
    "table2": table2.Options,
    "evaluate": registry.EvaluateOptions,
}


def test_every_experiment_is_registered_with_declared_options():
    assert set(registry.EXPERIMENTS) == set(OPTIONS)
    for name, options in OPTIONS.items():
        for field in dataclasses.fields(options):
            if field.name == "model_dir" and not field.metadata:  # required, no default
                continue
            assert field.metadata["help"], (name, field.name)


def test_every_option_an_experiment_takes_is_a_trainer_flag():
    fv = absl_flags.FlagValues()
    train_flags.define_flags(fv)
    taken = set(registry.FIGURE1_ARGUMENTS) | set(registry.TABLE2_ARGUMENTS)
    taken |= {f.name for f in dataclasses.fields(registry.EvaluateOptions)}
    assert taken <= set(fv), sorted(taken - set(fv))
