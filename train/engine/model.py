"""Building the zoo model a run names, with its `--model_kwargs` checked first.

A typo in `--model_kwargs` would otherwise surface as a builder's TypeError, and a value that
is not a Python literal (`batch_norm=Treu`) would reach the builder as a string.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping
from typing import Any

import keras

from keras_bn.train.config.settings import TrainConfig


def builder_parameters(model: str) -> dict[str, inspect.Parameter]:
    """The keyword arguments the builder of `model` takes (through `**kwargs` too).

    A builder that forwards `**kwargs` takes every argument of the zoo's other builders.
    """
    from keras_bn import models

    builders = getattr(models, "_BUILDERS", {})
    parameters = dict(inspect.signature(builders[model]).parameters)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        for other in builders.values():
            for name, p in inspect.signature(other).parameters.items():
                parameters.setdefault(name, p)
    return {
        n: p
        for n, p in parameters.items()
        if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    }


def check_model_kwargs(model: str, model_kwargs: Mapping[str, Any]) -> None:
    """Refuses a keyword the builder does not take, or a value of another type than its default.

    Raises:
        ValueError: naming the argument, with "did you mean" for a near miss.
    """
    try:
        parameters = builder_parameters(model)
    except (KeyError, TypeError, ValueError):  # no signature to check against
        return
    for key, value in model_kwargs.items():
        if key not in parameters:
            close = difflib.get_close_matches(key, parameters, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ValueError(f"--model_kwargs: --model={model} takes no argument {key!r}{hint}")
        default = parameters[key].default
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ValueError(
                f"--model_kwargs: {key} takes True or False, got {value!r} (--model={model})."
            )
        numeric = isinstance(default, int | float) and not isinstance(default, bool)
        if numeric and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ValueError(
                f"--model_kwargs: {key} takes a number, got {value!r} (--model={model})."
            )


def build_model(config: TrainConfig, spec) -> keras.Model:
    """Builds `config.model` from the zoo for the data described by `spec`.

    Raises:
        ValueError: for an unknown model name or arguments its builder does not take.
    """
    from keras_bn import models

    if config.model not in models.names():
        raise ValueError(
            f"unknown --model={config.model!r}; choose one of {', '.join(models.names())}."
        )
    kwargs: dict[str, Any] = {
        "num_classes": spec.num_classes,
        "input_shape": tuple(spec.input_shape),
        "seed": config.seed,
    }
    kwargs.update(config.model_kwargs)
    if config.weight_decay is not None:
        kwargs["weight_decay"] = config.weight_decay
    if config.norm_layer == "keras":
        kwargs["norm_layer"] = keras.layers.BatchNormalization
    elif config.norm_layer == "keras_bn":
        import keras_bn

        kwargs["norm_layer"] = keras_bn.BatchNormalization
    check_model_kwargs(config.model, config.model_kwargs)
    try:
        return models.get(config.model, **kwargs)
    except TypeError as error:
        raise ValueError(
            f"--model={config.model} does not accept these arguments ({error}); "
            "check --model_kwargs and --weight_decay."
        ) from error
