"""Every docstring example (`>>>`) of the package runs and prints what it shows."""

import doctest
import importlib
import pkgutil

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_bn
import keras_bn.models
import keras_bn.train


def _modules():
    names = []
    for package in (keras_bn, keras_bn.models, keras_bn.train):
        names.append(package.__name__)
        # Sub-packages too: the trainer's rooms are packages of their own.
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            # The entry points define the absl flags when imported; their examples are
            # command lines.
            if info.name.rsplit(".", 1)[-1] != "__main__" and not info.name.endswith("cli.main"):
                names.append(info.name)
    return names


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(
        module,
        extraglobs={"np": np, "keras": keras, "tf": tf},
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
    )
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
