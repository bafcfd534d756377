"""The paper's training setups as data: one `Preset` per named configuration.

A preset is a partial `keras_bn.train.config.settings.TrainConfig`: the values it names replace the
settings' defaults, and flags given explicitly on the command line replace both. Every value the
paper does not state (sections 4.1 and 4.2) is listed in the preset's `assumptions`, so
`--preset=bn_x30` prints exactly what was filled in and why.

Conventions:
    - `weight_decay` follows tf-slim: the model adds `weight_decay * sum(w**2) / 2` per kernel,
      i.e. Keras `L2(weight_decay / 2)`. 2e-4 is GoogLeNet's (BVLC solver) value; the paper's
      "reduce the L2 weight regularization by 5x" gives 4e-5, slim's default.
    - `lr_decay_rate` is applied every `lr_decay_epochs` epochs (staircase), counted in examples
      seen, so it means the same at any batch size.
    - `train_steps` for the ImageNet presets is the step count Figure 3 reports at batch 32.

Example:

>>> PRESETS["bn_x5"].values["learning_rate"]
0.0075
>>> sorted(PRESETS)[:3]
['bn_baseline', 'bn_x30', 'bn_x5']
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named configuration from the paper.

    Args:
        name: the `--preset` value.
        description: one line: which run of the paper this is.
        values: `TrainConfig` field -> value; `model_kwargs` is merged with the command line's.
        assumptions: every value the paper does not state, with its source.
    """

    name: str
    description: str
    values: Mapping[str, Any]
    assumptions: tuple[str, ...] = ()


def _frozen(**values: Any) -> Mapping[str, Any]:
    return types.MappingProxyType(values)


_MNIST_ASSUMPTIONS = (
    "optimizer: plain SGD (momentum 0), the same learning rate for the baseline and the BN net "
    "(paper: not stated)",
    "learning_rate 0.5: the Figure 1 experiment's default (paper: not stated)",
    "binary inputs: pixel/255 thresholded at 0.5 (paper: 'binary', threshold not stated)",
    "no learning-rate decay (paper: not stated)",
    "evaluation uses the moving population statistics; --population_stats=N recomputes them "
    "exactly (Alg. 2)",
)

_IMAGENET_COMMON = dict(
    dataset="tfds:imagenet2012",
    train_split="train",
    eval_split="validation",
    image_size=224,
    augment="inception",
    batch_size=32,
    eval_batch_size=100,
    eval_every=50_000,
    checkpoint_every=5_000,
    steps_per_loop=100,
    momentum=0.9,
    lr_decay_rate=0.96,
)

# The original Inception's recipe, which BN-Baseline keeps.
_BASELINE_RECIPE = dict(
    model_kwargs={"dropout_rate": 0.4, "use_lrn": True},
    learning_rate=0.0015,
    weight_decay=2e-4,
    lr_decay_epochs=8.0,
    distortion="full",
    shuffle_buffer=1_024,
)

# Section 4.2.1, "Accelerating BN networks" (BN-x5, BN-x30, BN-x5-Sigmoid): no dropout, no LRN,
# L2 / 5, decay 6x faster, more thorough shuffling, reduced distortion. Learning rates differ.
_ACCELERATED_RECIPE = dict(
    model_kwargs={"dropout_rate": 0.0, "use_lrn": False},
    weight_decay=4e-5,
    lr_decay_epochs=8.0 / 6.0,
    distortion="reduced",
    shuffle_buffer=16_384,
)

_IMAGENET_ASSUMPTIONS = (
    "momentum 0.9 (GoogLeNet's and Inception-v3's value; the BN paper only says 'SGD with "
    "momentum')",
    "synchronous SGD over the replicas of --strategy, global batch 32 (paper: asynchronous "
    "DistBelief, 32 per replica)",
    "augmentation: random crop of 8-100% of the area with aspect ratio 3/4-4/3, random flip "
    "(GoogLeNet); evaluation: central 87.5% crop, single 224x224 view",
    "train_steps: the step count Figure 3 reports at batch 32",
)

_BASELINE_ASSUMPTIONS = _IMAGENET_ASSUMPTIONS + (
    "weight_decay 2e-4, slim convention (GoogLeNet BVLC solver; paper: not stated)",
    "exponential decay x0.96 every 8 epochs (GoogLeNet; paper: 'decayed exponentially')",
    "dropout 40% and LRN, as the paper says of the original Inception",
    "photometric distortion 'full': brightness, saturation, hue and contrast in random order "
    "(slim's inception_preprocessing; Howard-style distortions, constants not stated)",
    "shuffle buffer 1,024 examples (the original, less thorough shuffling; paper: not stated)",
)

_ACCELERATED_ASSUMPTIONS = _IMAGENET_ASSUMPTIONS + (
    "section 4.2.1 changes: no dropout, no LRN, L2 reduced 5x to 4e-5 (slim convention), "
    "learning-rate decay 6x faster (x0.96 every 8/6 epochs), more thorough shuffling, reduced "
    "photometric distortion",
    "'more thorough shuffling': a 16,384-example shuffle buffer reshuffled every epoch "
    "(paper: within-shard shuffling, details not stated)",
    "reduced photometric distortion: brightness and saturation only (slim's fast mode; paper: "
    "'reduce', amount not stated)",
)

# Section 4.1 / Figure 1, shared by the baseline and the BN net (only BN differs).
_MNIST_COMMON = dict(
    model="mlp",
    dataset="mnist",
    binarize=True,
    batch_size=60,
    train_steps=50_000,
    eval_every=500,
    learning_rate=0.5,
    momentum=0.0,
    lr_decay_rate=1.0,
    lr_decay_epochs=0.0,
)

PRESETS: Mapping[str, Preset] = types.MappingProxyType(
    {
        preset.name: preset
        for preset in (
            Preset(
                "mnist_baseline",
                "Section 4.1 / Figure 1: 3x100 sigmoid MLP without BN on binary MNIST, "
                "batch 60, 50,000 steps.",
                _frozen(**_MNIST_COMMON, model_kwargs={"batch_norm": False, "init_stddev": 0.01}),
                _MNIST_ASSUMPTIONS,
            ),
            Preset(
                "mnist_bn",
                "Section 4.1 / Figure 1: the same MLP with BN before each sigmoid (Dense "
                "without bias -> BN -> sigmoid).",
                _frozen(**_MNIST_COMMON, model_kwargs={"batch_norm": True, "init_stddev": 0.01}),
                _MNIST_ASSUMPTIONS,
            ),
            Preset(
                "inception",
                "Section 4.2.2 'Inception': the baseline network without BN, learning rate "
                "0.0015 (31.0M steps to 72.2% in Figure 3).",
                _frozen(
                    **_IMAGENET_COMMON,
                    **_BASELINE_RECIPE,
                    model="inception",
                    train_steps=31_000_000,
                ),
                _BASELINE_ASSUMPTIONS,
            ),
            Preset(
                "bn_baseline",
                "Section 4.2.2 'BN-Baseline': Inception with BN before each nonlinearity, "
                "everything else unchanged (13.3M steps to 72.2%).",
                _frozen(
                    **_IMAGENET_COMMON,
                    **_BASELINE_RECIPE,
                    model="bn_inception",
                    train_steps=13_300_000,
                ),
                _BASELINE_ASSUMPTIONS
                + (
                    "BN-Baseline keeps dropout, LRN, L2 and the decay of Inception ('Same as "
                    "Inception with Batch Normalization'; the changes of 4.2.1 come with BN-x5)",
                ),
            ),
            Preset(
                "bn_x5",
                "Section 4.2.2 'BN-x5': BN-Baseline with the 4.2.1 changes and 5x the learning "
                "rate, 0.0075 (2.1M steps to 72.2%).",
                _frozen(
                    **_IMAGENET_COMMON,
                    **_ACCELERATED_RECIPE,
                    model="bn_inception",
                    learning_rate=0.0075,
                    train_steps=2_100_000,
                ),
                _ACCELERATED_ASSUMPTIONS,
            ),
            Preset(
                "bn_x30",
                "Section 4.2.2 'BN-x30': BN-x5 with 30x the learning rate, 0.045 (74.8% after "
                "about 6M steps).",
                _frozen(
                    **_IMAGENET_COMMON,
                    **_ACCELERATED_RECIPE,
                    model="bn_inception",
                    learning_rate=0.045,
                    train_steps=6_000_000,
                ),
                _ACCELERATED_ASSUMPTIONS
                + ("train_steps 6M: where BN-x30 reaches its maximum, 74.8% (section 4.2.3)",),
            ),
            Preset(
                "bn_x5_sigmoid",
                "Section 4.2.2 'BN-x5-Sigmoid': BN-x5 with sigmoid instead of ReLU (max 69.8%).",
                _frozen(
                    **_IMAGENET_COMMON,
                    **_ACCELERATED_RECIPE,
                    model="bn_inception_sigmoid",
                    learning_rate=0.0075,
                    train_steps=6_000_000,
                ),
                _ACCELERATED_ASSUMPTIONS
                + (
                    "train_steps 6M: the paper gives no step count (it never reaches 72.2%); "
                    "chosen as BN-x30's",
                ),
            ),
        )
    }
)


# Without --preset, a zoo model other than the MLP takes these settings from its paper recipe:
# the settings' own defaults are the MNIST MLP's (learning rate 0.5 makes an Inception net
# diverge within a few steps).
MODEL_RECIPES = {
    "inception": "inception",
    "bn_inception": "bn_x5",
    "bn_inception_sigmoid": "bn_x5_sigmoid",
}
RECIPE_FIELDS = ("learning_rate", "momentum", "weight_decay", "lr_decay_rate", "lr_decay_epochs")


def model_defaults(model: str | None) -> dict[str, Any]:
    """The optimization settings a model takes when no preset is given (see `MODEL_RECIPES`).

    >>> model_defaults("bn_inception")["learning_rate"], model_defaults("mlp")
    (0.0075, {})
    """
    if model not in MODEL_RECIPES:
        return {}
    recipe = PRESETS[MODEL_RECIPES[model]].values
    return {name: recipe[name] for name in RECIPE_FIELDS if name in recipe}


def names() -> list[str]:
    """Returns the preset names, sorted."""
    return sorted(PRESETS)


def get(name: str) -> Preset:
    """Returns the preset called `name`.

    Raises:
        ValueError: if there is no such preset (the message lists the valid names).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(names())}.")
    return PRESETS[name]
