"""The resolved training configuration: defaults <- preset <- flags given explicitly.

`TrainConfig` is plain data (no TensorFlow): it is printed at start, saved as `config.json` in the
model_dir, and compared field by field when a run is resumed (`identity()`).

Example:

>>> config = resolve("mnist_bn", {"train_steps": 100})
>>> config.model, config.model_kwargs, config.train_steps, config.batch_size
('mlp', {'batch_norm': True, 'init_stddev': 0.01}, 100, 60)
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from keras_bn.train import presets

STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker", "tpu")
MIXED_PRECISION = ("none", "float16", "bfloat16")
AUGMENT = ("auto", "inception", "none")
DISTORTION = ("full", "reduced", "none")
NORM_LAYERS = ("default", "keras_bn", "keras")

# Fields that do not change the training trajectory: a run may be resumed with other values.
# (`train_steps` may grow: the data order and the schedule do not depend on it.)
RESUMABLE_FIELDS = frozenset(
    {
        "train_steps",
        "eval_every",
        "eval_steps",
        "eval_batch_size",
        "checkpoint_every",
        "steps_per_loop",
        "population_stats",
        "export_dir",
        "fold_bn",
        "verbose",
        "model_dir",
        "data_dir",
        "tpu",
    }
)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run. Field meanings are the flags' help texts."""

    model_dir: str
    preset: str | None
    model: str
    model_kwargs: dict
    norm_layer: str
    dataset: str
    data_dir: str | None
    train_split: str
    eval_split: str | None
    binarize: bool
    image_size: int | None
    num_classes: int | None
    augment: str
    distortion: str
    shuffle_buffer: int
    batch_size: int
    eval_batch_size: int | None
    train_steps: int
    eval_every: int
    eval_steps: int | None
    checkpoint_every: int | None
    steps_per_loop: int
    learning_rate: float
    lr_decay_rate: float
    lr_decay_epochs: float
    momentum: float
    weight_decay: float | None
    seed: int
    strategy: str
    tpu: str
    mixed_precision: str
    jit_compile: bool
    population_stats: int
    export_dir: str | None
    fold_bn: bool
    verbose: int

    def to_dict(self) -> dict[str, Any]:
        """Returns the configuration as JSON-compatible data."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """Returns the configuration as indented, key-sorted JSON."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def identity(self) -> dict[str, Any]:
        """Returns the fields that must match for a model_dir to be resumed."""
        return {k: v for k, v in self.to_dict().items() if k not in RESUMABLE_FIELDS}

    @property
    def checkpoint_interval(self) -> int:
        """Steps between checkpoints (defaults to `eval_every`)."""
        return self.checkpoint_every or self.eval_every


def field_names() -> list[str]:
    """Returns the names of the `TrainConfig` fields."""
    return [f.name for f in dataclasses.fields(TrainConfig)]


def resolve(preset: str | None, explicit: Mapping[str, Any]) -> TrainConfig:
    """Builds the configuration: `presets.BASE`, then `preset`, then `explicit` values.

    Args:
        preset: a name from `presets.names()`, or None for the defaults alone.
        explicit: field -> value for the flags the user gave. `model_kwargs` is merged into the
            preset's (explicit keys win); every other value replaces the preset's.

    Returns:
        A validated `TrainConfig`.

    Raises:
        ValueError: for an unknown preset or field, or a value out of range (the message names
            the flag and says how to fix it).
    """
    values = dict(presets.BASE)
    values["model_dir"] = ""
    values["preset"] = preset
    if preset is not None:
        values.update(presets.get(preset).values)
    values["model_kwargs"] = dict(values["model_kwargs"])
    unknown = set(explicit) - set(field_names())
    if unknown:
        raise ValueError(f"unknown configuration field(s) {sorted(unknown)}.")
    for key, value in explicit.items():
        if key == "model_kwargs":
            values["model_kwargs"].update(value)
        else:
            values[key] = value
    config = TrainConfig(**values)
    validate(config)
    return config


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def validate(config: TrainConfig) -> None:
    """Checks the values that need no TensorFlow (ranges and choices).

    Raises:
        ValueError: naming the offending flag and the accepted values.
    """
    c = config
    _require(c.batch_size > 0, f"--batch_size must be positive, got {c.batch_size}.")
    _require(c.train_steps >= 0, f"--train_steps must be >= 0, got {c.train_steps}.")
    _require(c.eval_every > 0, f"--eval_every must be positive, got {c.eval_every}.")
    _require(
        c.eval_steps is None or c.eval_steps > 0,
        f"--eval_steps must be positive (or omitted for the whole split), got {c.eval_steps}.",
    )
    _require(
        c.eval_batch_size is None or c.eval_batch_size > 0,
        f"--eval_batch_size must be positive, got {c.eval_batch_size}.",
    )
    _require(
        c.checkpoint_every is None or c.checkpoint_every > 0,
        f"--checkpoint_every must be positive, got {c.checkpoint_every}.",
    )
    _require(c.steps_per_loop > 0, f"--steps_per_loop must be positive, got {c.steps_per_loop}.")
    _require(c.learning_rate > 0, f"--learning_rate must be positive, got {c.learning_rate}.")
    _require(0 < c.lr_decay_rate <= 1, f"--lr_decay_rate must be in (0, 1], got {c.lr_decay_rate}.")
    _require(
        c.lr_decay_epochs >= 0,
        f"--lr_decay_epochs must be >= 0 (0 turns decay off), got {c.lr_decay_epochs}.",
    )
    _require(0 <= c.momentum < 1, f"--momentum must be in [0, 1), got {c.momentum}.")
    _require(
        c.weight_decay is None or c.weight_decay >= 0,
        f"--weight_decay must be >= 0, got {c.weight_decay}.",
    )
    _require(c.shuffle_buffer > 0, f"--shuffle_buffer must be positive, got {c.shuffle_buffer}.")
    _require(
        c.image_size is None or c.image_size > 0,
        f"--image_size must be positive, got {c.image_size}.",
    )
    _require(
        c.num_classes is None or c.num_classes > 1,
        f"--num_classes must be at least 2, got {c.num_classes}.",
    )
    _require(
        c.population_stats >= 0,
        f"--population_stats must be >= 0 (0: keep the moving averages), got {c.population_stats}.",
    )
    _require(c.verbose in (0, 1, 2), f"--verbose must be 0, 1 or 2, got {c.verbose}.")
    for name, value, choices in (
        ("strategy", c.strategy, STRATEGIES),
        ("mixed_precision", c.mixed_precision, MIXED_PRECISION),
        ("augment", c.augment, AUGMENT),
        ("distortion", c.distortion, DISTORTION),
        ("norm_layer", c.norm_layer, NORM_LAYERS),
    ):
        _require(value in choices, f"--{name} must be one of {'|'.join(choices)}, got {value!r}.")
    _require(
        c.dataset in ("mnist", "synthetic") or c.dataset.startswith("tfds:"),
        f"--dataset must be mnist, synthetic or tfds:<name>, got {c.dataset!r}.",
    )
    _require(c.dataset != "tfds:", "--dataset=tfds:<name> needs a dataset name after 'tfds:'.")
    _require(
        c.fold_bn is False or c.export_dir is not None,
        "--fold_bn needs --export_dir (it selects what is exported).",
    )
