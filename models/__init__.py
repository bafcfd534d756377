"""The model zoo (keras_bn.models): the paper's networks, built by name.

>>> from keras_bn import models
>>> models.names()
('bn_inception', 'bn_inception_sigmoid', 'inception', 'mlp')
>>> model = models.get("mlp", batch_norm=False)

Every builder returns an uncompiled `keras.Model` giving LOGITS (no softmax) and takes
`norm_layer` (default `keras_bn.BatchNormalization`; pass `keras.layers.BatchNormalization` for
the same net with Keras's layer), `num_classes` and `input_shape`: the keyword arguments of
`ModelOptions`, which each model's options dataclass extends (`mlp.MlpOptions`,
`inception.InceptionOptions`); `inspect.signature` of a builder lists them with its defaults.

- `mlp`: the MNIST net of section 4.1 (`keras_bn.models.mlp.mlp`); `batch_norm=False` gives
  the baseline.
- `bn_inception`: the paper's Figure 5 network (`keras_bn.models.inception.bn_inception`).
- `bn_inception_sigmoid`: the same with sigmoid (BN-x5-Sigmoid).
- `inception`: the baseline "Inception" without BN, with LRN and 40% dropout.
"""

from keras_bn.models import inception, mlp
from keras_bn.models._common import ModelOptions
from keras_bn.models.lrn import LocalResponseNormalization

_BUILDERS = {
    "mlp": mlp.mlp,
    "inception": inception.inception,
    "bn_inception": inception.bn_inception,
    "bn_inception_sigmoid": inception.bn_inception_sigmoid,
}


def names():
    """Returns the registered model names, sorted."""
    return tuple(sorted(_BUILDERS))


def get(name, **kwargs):
    """Builds a fresh model of the zoo by name.

    Args:
        name: one of `names()`.
        **kwargs: keyword arguments of that model's builder.

    Returns:
        An uncompiled `keras.Model` giving logits.

    Raises:
        ValueError: if `name` is not registered.
    """
    try:
        builder = _BUILDERS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"Unknown model name {name!r}; known models: {', '.join(names())}."
        ) from None
    return builder(**kwargs)


__all__ = ["LocalResponseNormalization", "ModelOptions", "get", "inception", "mlp", "names"]
