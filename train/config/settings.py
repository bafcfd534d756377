"""Every training setting, written once: its field, default, help, choices and checks.

`TrainConfig` is plain data (no TensorFlow). Each field is a `setting(...)`: the absl flags
(`keras_bn.train.cli.flags`), the defaults that presets override, the range checks of `validate`
and the fields a resumed run may change (`RESUMABLE_FIELDS`) are all read from these
declarations, so adding a setting is one edit here. The resolved configuration is printed at
start, saved as `config.json` in the model_dir and compared field by field on resume
(`identity()`).

Example:

>>> config = resolve("mnist_bn", {"train_steps": 100})
>>> config.model, config.model_kwargs, config.train_steps, config.batch_size
('mlp', {'batch_norm': True, 'init_stddev': 0.01}, 100, 60)
>>> settings()["momentum"].metadata["help"]
'SGD momentum; 0 is plain SGD'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from keras_bn.train.config import presets
from keras_bn.train.rundir.folder import json_text

# A range check: (predicate on a value that is not None, what the value must be).
Check = tuple[Callable[[Any], bool], str]
POSITIVE: Check = (lambda v: v > 0, "positive")
NON_NEGATIVE: Check = (lambda v: v >= 0, ">= 0")


def setting(
    default: Any,
    help: str,
    *,
    default_help: str | None = None,
    choices: Sequence[Any] | None = None,
    check: Check | None = None,
    resumable: bool = False,
    flag: str | None = None,
) -> Any:
    """Declares one `TrainConfig` field; everything about a setting is said here.

    Args:
        default: the value used when neither the preset nor the command line gives one.
        help: the flag's help text.
        default_help: says what the default means when the value alone does not (e.g. None
            for "the whole split"); else the help shows the value itself.
        choices: the accepted values (an enum flag for strings).
        check: a range check, applied to values other than None.
        resumable: whether a resumed run may change it (it does not change the trajectory).
        flag: for an experiment's option, the trainer flag that sets it (e.g. `train_steps`).

    Example:

    >>> field = setting(5, "Steps", check=POSITIVE)
    >>> field.default, field.metadata["resumable"]
    (5, False)
    """
    metadata = dict(
        help=help,
        default_help=default_help,
        choices=choices,
        check=check,
        resumable=resumable,
        flag=flag,
    )
    if isinstance(default, dict):  # a fresh copy for every config
        return dataclasses.field(default_factory=lambda: dict(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _preset_help() -> str:
    return "A configuration from the paper; flags given explicitly override it. " + " ".join(
        f"{p.name}: {p.description}" for p in presets.PRESETS.values()
    )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run. Field meanings are the flags' help texts."""

    model_dir: str = setting(
        "",
        "Run directory: checkpoints, TensorBoard logs, metrics.jsonl, config.json, "
        "summary.json. Restarting with the same flags resumes; a directory holding another run "
        "is refused.",
        default_help="none, required",
        resumable=True,
    )
    preset: str | None = setting(
        None, _preset_help(), default_help="none: each flag's own default", choices=presets.names()
    )

    # Model.
    model: str = setting("mlp", "Zoo model name (keras_bn.models.names())")
    model_kwargs: dict = setting(
        {},
        "Extra builder arguments as key=value pairs (Python literals), merged into the preset's, "
        "e.g. depth_multiplier=0.25,dropout_rate=0.",
        default_help="the preset's",
    )
    norm_layer: str = setting(
        "default",
        "BN layer class: keras_bn (this package), keras (keras.layers.BatchNormalization, for "
        "side-by-side runs), default (the zoo's choice)",
        choices=("default", "keras_bn", "keras"),
    )

    # Data.
    dataset: str = setting(
        "mnist",
        "mnist (the real MNIST files shipped in the package, no network), tfds:<name> (an "
        "already-prepared TFDS dataset; never downloads), or synthetic (random data of the "
        "model's input shape, for throughput)",
        check=(
            lambda v: v in ("mnist", "synthetic") or (v.startswith("tfds:") and v != "tfds:"),
            "mnist, synthetic or tfds:<name> (a dataset name after 'tfds:')",
        ),
    )
    data_dir: str | None = setting(
        None, "TFDS data directory", default_help="TFDS's own", resumable=True
    )
    train_split: str = setting("train", "Training split")
    eval_split: str | None = setting(
        None,
        "Evaluation split",
        default_help="test for mnist, else validation if the dataset has it, else test",
    )
    binarize: bool = setting(False, "Threshold pixels at 0.5 (the paper's binary MNIST)")
    image_size: int | None = setting(
        None,
        "Side of the square images fed to convolutional models",
        default_help="224 for ImageNet-style data, else the dataset's own size, at least 75",
        check=POSITIVE,
    )
    num_classes: int | None = setting(
        None,
        "Number of classes",
        default_help="the dataset's; 10 for synthetic",
        check=(lambda v: v > 1, "at least 2"),
    )
    augment: str = setting(
        "auto",
        "Training augmentation: inception (random-size crop 8-100% area, aspect 3/4-4/3, flip, "
        "photometric distortion), none, or auto (inception for imagenet*)",
        choices=("auto", "inception", "none"),
    )
    distortion: str = setting(
        "reduced",
        "Photometric distortion in inception augmentation: full (brightness, saturation, hue, "
        "contrast), reduced (brightness, saturation), none",
        choices=("full", "reduced", "none"),
    )
    shuffle_buffer: int = setting(
        10_000,
        "Shuffle buffer for TFDS data, reshuffled every epoch (in-memory data is fully permuted)",
        check=POSITIVE,
    )

    # Optimization. `train_steps` may grow on resume: the data order and the schedule do not
    # depend on it.
    batch_size: int = setting(60, "Global batch size, split over the replicas", check=POSITIVE)
    eval_batch_size: int | None = setting(
        None,
        "Global evaluation batch size",
        default_help="--batch_size",
        check=POSITIVE,
        resumable=True,
    )
    train_steps: int = setting(50_000, "Training steps", check=NON_NEGATIVE, resumable=True)
    eval_every: int = setting(500, "Evaluate every this many steps", check=POSITIVE, resumable=True)
    eval_steps: int | None = setting(
        None,
        "Evaluation batches",
        default_help="the whole split",
        check=POSITIVE,
        resumable=True,
    )
    checkpoint_every: int | None = setting(
        None,
        "Checkpoint every this many steps",
        default_help="--eval_every",
        check=POSITIVE,
        resumable=True,
    )
    steps_per_loop: int = setting(
        50,
        "Training steps per compiled call (speed only; results do not depend on it)",
        check=POSITIVE,
        resumable=True,
    )
    learning_rate: float = setting(0.5, "Initial learning rate", check=POSITIVE)
    lr_decay_rate: float = setting(
        1.0,
        "Multiply the learning rate by this every --lr_decay_epochs epochs (staircase)",
        check=(lambda v: 0 < v <= 1, "in (0, 1]"),
    )
    lr_decay_epochs: float = setting(
        0.0, "Epochs between learning-rate decays; 0 turns decay off", check=NON_NEGATIVE
    )
    momentum: float = setting(
        0.0, "SGD momentum; 0 is plain SGD", check=(lambda v: 0 <= v < 1, "in [0, 1)")
    )
    weight_decay: float | None = setting(
        None,
        "L2 weight decay, tf-slim convention (adds wd*sum(w^2)/2), passed to the model builder",
        default_help="the model's",
        check=NON_NEGATIVE,
    )
    seed: int = setting(0, "Seed for initialization, data order and augmentation")

    # Hardware.
    strategy: str = setting(
        "auto",
        "tf.distribute strategy: auto (mirrored over all GPUs if several, else the default), "
        "one_device, mirrored, multi_worker (TF_CONFIG), tpu",
        choices=("auto", "one_device", "mirrored", "multi_worker", "tpu"),
    )
    tpu: str = setting(
        "",
        "TPU name or address for --strategy=tpu",
        default_help="the local TPU",
        resumable=True,
    )
    mixed_precision: str = setting(
        "none",
        "Compute dtype: none (float32), float16 (with loss scaling), bfloat16",
        choices=("none", "float16", "bfloat16"),
    )
    jit_compile: bool | None = setting(
        None,
        "Compile training and evaluation with XLA",
        default_help="auto: on for the in-memory path (MNIST without replicas: the gather, the "
        "step and the loop fused, several times faster), off for tf.data input",
    )

    # After training.
    population_stats: int = setting(
        0,
        "Recompute exact population statistics (Alg. 2) over this many training batches before "
        "the final evaluation and export; 0 keeps the moving averages",
        check=NON_NEGATIVE,
        resumable=True,
    )
    export_dir: str | None = setting(
        None,
        "Write a SavedModel whose 'serve' signature takes raw uint8 images (preprocessing inside)",
        default_help="none, no export",
        resumable=True,
    )
    fold_bn: bool = setting(
        False,
        "Export the model with BN folded into the preceding layers (keras_bn.fold_batch_norm)",
        resumable=True,
    )
    verbose: int = setting(
        1,
        "0: the final line only; 1: a progress bar on a terminal, else a line per evaluation; "
        "2: a line per evaluation (TensorFlow's C++ logs: KERAS_BN_TF_LOGS=1)",
        check=(lambda v: v in (0, 1, 2), "0, 1 or 2"),
        resumable=True,
    )

    def to_dict(self) -> dict[str, Any]:
        """Returns the configuration as JSON-compatible data."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """Returns the configuration as indented, key-sorted JSON."""
        return json_text(self.to_dict())

    def identity(self) -> dict[str, Any]:
        """Returns the fields that must match for a model_dir to be resumed."""
        return {k: v for k, v in self.to_dict().items() if k not in RESUMABLE_FIELDS}

    @property
    def checkpoint_interval(self) -> int:
        """Steps between checkpoints (defaults to `eval_every`)."""
        return self.checkpoint_every or self.eval_every

    @property
    def evaluation_batch_size(self) -> int:
        """The global evaluation batch size (defaults to `batch_size`)."""
        return self.eval_batch_size or self.batch_size

    @property
    def eval_limit(self) -> int | None:
        """How many evaluation examples `eval_steps` batches hold (None: the whole split)."""
        return self.eval_steps * self.evaluation_batch_size if self.eval_steps else None


def settings() -> dict[str, dataclasses.Field]:
    """Returns field name -> its declaration (`.default`, `.metadata`), in declaration order."""
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def field_names() -> list[str]:
    """Returns the names of the `TrainConfig` fields."""
    return list(settings())


# Fields that do not change the training trajectory: a run may be resumed with other values.
RESUMABLE_FIELDS = frozenset(n for n, f in settings().items() if f.metadata["resumable"])


def resolve(preset: str | None, explicit: Mapping[str, Any]) -> TrainConfig:
    """Builds the configuration: the settings' defaults, then `preset`, then `explicit` values.

    Args:
        preset: a name from `presets.names()`, or None for the defaults alone (and, for an
            Inception model, its recipe's optimization settings: `presets.model_defaults`).
        explicit: field -> value for the flags the user gave. `model_kwargs` is merged into the
            preset's (explicit keys win); every other value replaces the preset's.

    Returns:
        A validated `TrainConfig`.

    Raises:
        ValueError: for an unknown preset or field, or a value out of range (the message names
            the flag and says how to fix it).
    """
    if preset is not None:
        values = dict(presets.get(preset).values)
    else:
        values = presets.model_defaults(explicit.get("model"))
    unknown = set(explicit) - set(field_names())
    if unknown:
        raise ValueError(f"unknown configuration field(s) {sorted(unknown)}.")
    model_kwargs = {**values.get("model_kwargs", {}), **explicit.get("model_kwargs", {})}
    values.update(explicit, preset=preset, model_kwargs=model_kwargs)
    config = TrainConfig(**values)
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    """Checks every setting's choices and range, and the settings that depend on each other.

    Raises:
        ValueError: naming the offending flag and the accepted values.
    """
    check_fields(config)
    if config.fold_bn and config.export_dir is None:
        raise ValueError("--fold_bn needs --export_dir (it selects what is exported).")


def check_fields(values: Any) -> None:
    """Checks the choices and range of every `setting` field of a dataclass instance.

    The trainer's `TrainConfig` and an experiment's options (e.g. table2's) are checked by
    this one loop, from their declarations.

    Raises:
        ValueError: naming the offending flag and the accepted values.
    """
    for field in dataclasses.fields(values):
        value, meta = getattr(values, field.name), field.metadata
        if value is None or not meta:  # "not given": the default_help says what happens
            continue
        name = field.name
        if meta["choices"] is not None and value not in meta["choices"]:
            raise ValueError(f"--{name} must be one of {'|'.join(meta['choices'])}, got {value!r}.")
        if meta["check"] is not None and not meta["check"][0](value):
            raise ValueError(f"--{name} must be {meta['check'][1]}, got {value!r}.")
