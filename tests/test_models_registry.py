"""Tests for the zoo registry: keras_bn.models.get / names."""

import keras
import pytest

from keras_bn import models


def test_names():
    assert models.names() == ("bn_inception", "bn_inception_sigmoid", "inception", "mlp")


@pytest.mark.parametrize("name", ["bn_inception", "bn_inception_sigmoid", "inception"])
def test_get_builds_a_fresh_uncompiled_model(name):
    kwargs = dict(depth_multiplier=0.1, input_shape=(75, 75, 3), num_classes=5)
    a = models.get(name, **kwargs)
    b = models.get(name, **kwargs)
    assert isinstance(a, keras.Model) and a is not b
    assert a.name == name and a.output_shape == (None, 5)
    assert not a.compiled


def test_get_mlp():
    model = models.get("mlp", batch_norm=False, num_classes=3)
    assert model.output_shape == (None, 3) and model.name == "mlp"
    assert models.get("mlp").name == "mlp_bn"


@pytest.mark.parametrize("name", ["resnet50", "MLP", "", None])
def test_unknown_name_lists_known_names(name):
    with pytest.raises(ValueError, match="Unknown model name") as info:
        models.get(name)
    for known in models.names():
        assert known in str(info.value)


def test_unknown_keyword_is_an_error():
    with pytest.raises(TypeError, match="no_such_option"):
        models.get("mlp", no_such_option=1)
