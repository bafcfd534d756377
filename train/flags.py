"""The trainer's absl flags, and turning the ones given explicitly into configuration values.

Every configuration flag defaults to None in absl: its effective default comes from `--preset`
(else `presets.BASE`), and only flags the user actually typed (`FLAGS[name].present`) override
the preset. Nothing here imports TensorFlow, so flag errors are reported before it loads.

Example:

>>> from absl import flags as absl_flags
>>> fv = absl_flags.FlagValues()
>>> define_flags(fv)
>>> _ = fv(["prog", "--preset=mnist_bn", "--train_steps=10", "--model_kwargs=init_stddev=0.1"])
>>> explicit_values(fv)
{'model_kwargs': {'init_stddev': 0.1}, 'train_steps': 10}
"""

from __future__ import annotations

import ast
from typing import Any

from absl import flags

from keras_bn.train import config as config_lib
from keras_bn.train import presets

FLAGS = flags.FLAGS

EXPERIMENTS = ("none", "figure1")

# Flags that are not TrainConfig fields.
_CONTROL_FLAGS = ("experiment", "preset", "cpu_replicas")


def _default(name: str) -> str:
    value = presets.BASE[name] if name in presets.BASE else None
    return f" (default: from --preset, else {value!r})"


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """Defines all trainer flags in `flag_values`."""
    fv = dict(flag_values=flag_values)

    # What to run.
    flags.DEFINE_enum(
        "experiment",
        "none",
        list(EXPERIMENTS),
        "A complete experiment instead of one training run. 'figure1': the paper's Figure 1 "
        "(MNIST baseline vs BN, 3 panels) written into --model_dir.",
        **fv,
    )
    flags.DEFINE_enum(
        "preset",
        None,
        presets.names(),
        "A configuration from the paper; flags given explicitly override it. "
        + "; ".join(f"{p.name}: {p.description}" for p in presets.PRESETS.values()),
        **fv,
    )
    flags.DEFINE_string(
        "model_dir",
        None,
        "Run directory: checkpoints, TensorBoard logs, metrics.jsonl, config.json, summary.json. "
        "Restarting with the same flags resumes; a directory holding another run is refused.",
        **fv,
    )

    # Model.
    flags.DEFINE_string(
        "model", None, "Zoo model name (keras_bn.models.names())" + _default("model"), **fv
    )
    flags.DEFINE_list(
        "model_kwargs",
        None,
        "Extra builder arguments as key=value pairs (Python literals), merged into the preset's, "
        "e.g. depth_multiplier=0.25,dropout_rate=0.",
        **fv,
    )
    flags.register_validator("model_kwargs", _check_model_kwargs, **fv)
    flags.DEFINE_enum(
        "norm_layer",
        None,
        list(config_lib.NORM_LAYERS),
        "BN layer class: keras_bn (this package), keras (keras.layers.BatchNormalization, for "
        "side-by-side runs), default (the zoo's choice)" + _default("norm_layer"),
        **fv,
    )

    # Data.
    flags.DEFINE_string(
        "dataset",
        None,
        "mnist (the real MNIST files shipped in the package, no network), tfds:<name> (an "
        "already-prepared TFDS dataset; never downloads), or synthetic (random data of the "
        "model's input shape, for throughput)" + _default("dataset"),
        **fv,
    )
    flags.DEFINE_string("data_dir", None, "TFDS data directory (default: TFDS's own).", **fv)
    flags.DEFINE_string("train_split", None, "Training split" + _default("train_split"), **fv)
    flags.DEFINE_string(
        "eval_split",
        None,
        "Evaluation split (default: test for mnist, else validation if the dataset has it, "
        "else test).",
        **fv,
    )
    flags.DEFINE_bool(
        "binarize",
        None,
        "Threshold pixels at 0.5 (the paper's binary MNIST)" + _default("binarize"),
        **fv,
    )
    flags.DEFINE_integer(
        "image_size",
        None,
        "Side of the square images fed to convolutional models (default: 224 for ImageNet-style "
        "data, else the dataset's own size, at least 75).",
        **fv,
    )
    flags.DEFINE_integer(
        "num_classes", None, "Number of classes (default: the dataset's; 10 for synthetic).", **fv
    )
    flags.DEFINE_enum(
        "augment",
        None,
        list(config_lib.AUGMENT),
        "Training augmentation: inception (random-size crop 8-100% area, aspect 3/4-4/3, flip, "
        "photometric distortion), none, or auto (inception for imagenet*)" + _default("augment"),
        **fv,
    )
    flags.DEFINE_enum(
        "distortion",
        None,
        list(config_lib.DISTORTION),
        "Photometric distortion in inception augmentation: full (brightness, saturation, hue, "
        "contrast), reduced (brightness, saturation), none" + _default("distortion"),
        **fv,
    )
    flags.DEFINE_integer(
        "shuffle_buffer",
        None,
        "Shuffle buffer for TFDS data, reshuffled every epoch (in-memory data is fully "
        "permuted)" + _default("shuffle_buffer"),
        **fv,
    )

    # Optimization.
    flags.DEFINE_integer(
        "batch_size",
        None,
        "Global batch size, split over the replicas" + _default("batch_size"),
        **fv,
    )
    flags.DEFINE_integer(
        "eval_batch_size", None, "Global evaluation batch size (default: --batch_size).", **fv
    )
    flags.DEFINE_integer("train_steps", None, "Training steps" + _default("train_steps"), **fv)
    flags.DEFINE_integer(
        "eval_every", None, "Evaluate every this many steps" + _default("eval_every"), **fv
    )
    flags.DEFINE_integer("eval_steps", None, "Evaluation batches (default: the whole split).", **fv)
    flags.DEFINE_integer(
        "checkpoint_every", None, "Checkpoint every this many steps (default: --eval_every).", **fv
    )
    flags.DEFINE_integer(
        "steps_per_loop",
        None,
        "Training steps per compiled call (speed only; results do not depend on it)"
        + _default("steps_per_loop"),
        **fv,
    )
    flags.DEFINE_float(
        "learning_rate", None, "Initial learning rate" + _default("learning_rate"), **fv
    )
    flags.DEFINE_float(
        "lr_decay_rate",
        None,
        "Multiply the learning rate by this every --lr_decay_epochs epochs (staircase)"
        + _default("lr_decay_rate"),
        **fv,
    )
    flags.DEFINE_float(
        "lr_decay_epochs",
        None,
        "Epochs between learning-rate decays; 0 turns decay off" + _default("lr_decay_epochs"),
        **fv,
    )
    flags.DEFINE_float(
        "momentum", None, "SGD momentum; 0 is plain SGD" + _default("momentum"), **fv
    )
    flags.DEFINE_float(
        "weight_decay",
        None,
        "L2 weight decay, tf-slim convention (adds wd*sum(w^2)/2), passed to the model builder"
        + _default("weight_decay"),
        **fv,
    )
    flags.DEFINE_integer(
        "seed",
        None,
        "Seed for initialization, data order and augmentation" + _default("seed"),
        **fv,
    )

    # Hardware.
    flags.DEFINE_enum(
        "strategy",
        None,
        list(config_lib.STRATEGIES),
        "tf.distribute strategy: auto (mirrored over all GPUs if several, else the default), "
        "one_device, mirrored, multi_worker (TF_CONFIG), tpu" + _default("strategy"),
        **fv,
    )
    flags.DEFINE_string("tpu", None, "TPU name or address for --strategy=tpu.", **fv)
    flags.DEFINE_enum(
        "mixed_precision",
        None,
        list(config_lib.MIXED_PRECISION),
        "Compute dtype: none (float32), float16 (with loss scaling), bfloat16"
        + _default("mixed_precision"),
        **fv,
    )
    flags.DEFINE_bool(
        "jit_compile", None, "Compile the training step with XLA" + _default("jit_compile"), **fv
    )
    flags.DEFINE_integer(
        "cpu_replicas",
        0,
        "Testing aid: split the CPU into this many logical devices before TensorFlow starts, "
        "so --strategy=mirrored can run on a CPU-only machine.",
        **fv,
    )

    # After training.
    flags.DEFINE_integer(
        "population_stats",
        None,
        "Recompute exact population statistics (Alg. 2) over this many training batches before "
        "the final evaluation and export; 0 keeps the moving averages"
        + _default("population_stats"),
        **fv,
    )
    flags.DEFINE_string(
        "export_dir",
        None,
        "Write a SavedModel whose 'serve' signature takes raw uint8 images (preprocessing inside).",
        **fv,
    )
    flags.DEFINE_bool(
        "fold_bn",
        None,
        "Export the model with BN folded into the preceding layers (keras_bn.fold_batch_norm)"
        + _default("fold_bn"),
        **fv,
    )
    flags.DEFINE_integer(
        "verbose",
        None,
        "0: summary only, 1: progress bar, 2: one line per evaluation" + _default("verbose"),
        **fv,
    )


def _check_model_kwargs(items: list[str] | None) -> bool:
    """absl validator: a malformed --model_kwargs is a flag error (one line, status 2)."""
    try:
        parse_model_kwargs(items or [])
    except ValueError as error:
        raise flags.ValidationError(str(error)) from error
    return True


def parse_model_kwargs(items: list[str]) -> dict[str, Any]:
    """Parses `["key=value", ...]`; values are Python literals, else strings.

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
        try:
            value = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            value = raw.strip()
        result[key.strip()] = value
    return result


def explicit_values(flag_values: flags.FlagValues = FLAGS) -> dict[str, Any]:
    """Returns `TrainConfig` field -> value for the configuration flags given explicitly."""
    explicit = {}
    for name in config_lib.field_names():
        if name in ("preset",) or name not in flag_values:
            continue
        flag = flag_values[name]
        if flag.present:
            value = flag.value
            if name == "model_kwargs":
                value = parse_model_kwargs(value or [])
            explicit[name] = value
    return explicit


def present(flag_values: flags.FlagValues = FLAGS) -> list[str]:
    """Returns the names of all flags given explicitly (configuration and control flags)."""
    names = list(explicit_values(flag_values))
    return names + [n for n in _CONTROL_FLAGS if flag_values[n].present]
