"""The trainer's absl flags: one per `TrainConfig` setting, plus the flags that pick what to run.

Every setting's flag is derived from its declaration in `keras_bn.train.config.settings` (type,
help, choices) and defaults to None in absl: its effective default comes from `--preset` (else the
setting's default), and only flags the user actually typed (`FLAGS[name].present`) override
the preset.

Example:

>>> from absl import flags as absl_flags
>>> fv = absl_flags.FlagValues()
>>> define_flags(fv)
>>> _ = fv(["prog", "--preset=mnist_bn", "--train_steps=10", "--model_kwargs=init_stddev=0.1"])
>>> explicit_values(fv)
{'model_kwargs': {'init_stddev': 0.1}, 'train_steps': 10}
>>> fv["momentum"].help
'SGD momentum; 0 is plain SGD (default: from --preset, else 0.0)'
"""

from __future__ import annotations

import ast
import dataclasses
import textwrap
import types
import typing
from typing import Any

from absl import flags

from keras_bn.train.config import settings as config_lib
from keras_bn.train.experiments import table2
from keras_bn.train.experiments.registry import EXPERIMENTS

FLAGS = flags.FLAGS

# Options of --experiment=table2 that no training run has, declared with its other options.
TABLE2_FLAGS = ("inception_steps", "ensemble_size")
# Flags only an experiment takes (a training run refuses them).
EXPERIMENT_FLAGS = ("eval_crops", *TABLE2_FLAGS)
# Flags that are not settings: what to run and how to lay out the CPU, never saved with a run.
_CONTROL_FLAGS = ("experiment", "cpu_replicas", *EXPERIMENT_FLAGS)


class _KeywordsParser(flags.ListParser):
    """`a=1,b=x` -> `{'a': 1, 'b': 'x'}` (`parse_model_kwargs`); a bad item is a flag error."""

    def parse(self, argument):
        return (
            argument if isinstance(argument, dict) else parse_model_kwargs(super().parse(argument))
        )


_DEFINE = {
    str: flags.DEFINE_string,
    int: flags.DEFINE_integer,
    float: flags.DEFINE_float,
    bool: flags.DEFINE_bool,
    dict: lambda *args, **kwargs: flags.DEFINE(_KeywordsParser(), *args, **kwargs),
}


def _flag_type(hint: Any) -> type:
    """`int | None` -> int."""
    if isinstance(hint, types.UnionType):
        (hint,) = [t for t in typing.get_args(hint) if t is not type(None)]
    return hint


def _help(field) -> str:
    default = field.metadata["default_help"] or f"from --preset, else {field.default!r}"
    return f"{field.metadata['help']} (default: {default})"


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """Defines all trainer flags in `flag_values`."""
    flags.DEFINE_enum(
        "experiment",
        "none",
        ["none", *EXPERIMENTS],
        "A complete experiment instead of one training run. "
        + " ".join(f"'{name}': {entry.help}." for name, entry in EXPERIMENTS.items()),
        flag_values=flag_values,
    )
    flags.DEFINE_list(
        "eval_crops",
        None,
        "--experiment=evaluate|table2: crops per image, comma-separated (section 4.3: 1 "
        "central, 10 = 5 crops and their mirrors, 144 = GoogLeNet's 4 scales x 3 squares x 6 "
        "crops x 2; default: 1 for evaluate, 1,10,144 for table2).",
        flag_values=flag_values,
    )
    table2_options = {f.name: f for f in dataclasses.fields(table2.Options)}
    table2_hints = typing.get_type_hints(table2.Options)
    for name in TABLE2_FLAGS:
        field = table2_options[name]
        default = field.metadata["default_help"] or field.default
        text = f"--experiment=table2: {field.metadata['help']} (default: {default})"
        _DEFINE[_flag_type(table2_hints[name])](name, None, text, flag_values=flag_values)
    hints = typing.get_type_hints(config_lib.TrainConfig)
    for name, field in config_lib.settings().items():
        kind, choices = _flag_type(hints[name]), field.metadata["choices"]
        if choices is not None and kind is str:
            flags.DEFINE_enum(name, None, list(choices), _help(field), flag_values=flag_values)
        else:
            _DEFINE[kind](name, None, _help(field), flag_values=flag_values)
    flags.DEFINE_integer(
        "cpu_replicas",
        0,
        "Testing aid: split the CPU into this many logical devices before TensorFlow starts, "
        "so --strategy=mirrored can run on a CPU-only machine.",
        flag_values=flag_values,
    )


# The groups of --help, in this order; every flag is in exactly one (a test checks).
GROUPS = {
    "run": ("experiment", "preset", "model_dir", "seed", "verbose"),
    "model": ("model", "model_kwargs", "norm_layer", "weight_decay"),
    "data": (
        "dataset data_dir train_split eval_split binarize image_size num_classes augment "
        "distortion shuffle_buffer"
    ).split(),
    "optimization": (
        "batch_size train_steps learning_rate lr_decay_rate lr_decay_epochs momentum "
        "eval_batch_size eval_every eval_steps checkpoint_every steps_per_loop"
    ).split(),
    "after training": ("population_stats", "export_dir", "fold_bn"),
    "experiment": EXPERIMENT_FLAGS,
    "distribution and hardware": ("strategy tpu mixed_precision jit_compile cpu_replicas".split()),
}


def grouped_help(flag_values: flags.FlagValues = FLAGS, *, full: bool = False) -> str:
    """The trainer's flags by group, each as absl shows it (`--name: help`).

    `full` (`--helpfull`) adds absl's logging flags (`--verbosity`, `--log_dir`, ...), the only
    other flags the command line acts on.
    """
    groups = dict(GROUPS)
    if full:
        logging_flags = flag_values.get_flags_for_module("absl.logging")
        groups["logging (absl)"] = sorted({flag.name for flag in logging_flags})
    sections = []
    for group, names in groups.items():
        lines = [f"{group.capitalize()} flags:"]
        for name in names:
            flag = flag_values[name]
            prefix = "--[no]" if flag.boolean else "--"
            text = f"{prefix}{name}: {flag.help}"
            lines.append(textwrap.fill(text, 100, initial_indent="  ", subsequent_indent="      "))
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


_WORDS = {"true": True, "false": False, "none": None}


def parse_model_kwargs(items: list[str]) -> dict[str, Any]:
    """Parses `["key=value", ...]`; values are Python literals (or true/false), else strings.

    Raises:
        ValueError: for an item without '='.
    """
    result = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(
                f"--model_kwargs items must look like key=value, got {item!r} "
                "(e.g. --model_kwargs=depth_multiplier=0.25,dropout_rate=0)."
            )
        raw = raw.strip()
        try:  # `true`/`false` as a shell user types them, else Python literals
            value = _WORDS.get(raw.lower()) if raw.lower() in _WORDS else ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        result[key.strip()] = value
    return result


def explicit_values(flag_values: flags.FlagValues = FLAGS) -> dict[str, Any]:
    """Returns `TrainConfig` field -> value for the settings given explicitly (not `preset`)."""
    names = [n for n in config_lib.field_names() if n != "preset" and flag_values[n].present]
    return {name: flag_values[name].value for name in names}


def present(flag_values: flags.FlagValues = FLAGS) -> list[str]:
    """Returns the names of all flags given explicitly (settings, `preset` and control flags)."""
    names = list(explicit_values(flag_values))
    return names + [n for n in ("preset", *_CONTROL_FLAGS) if flag_values[n].present]
