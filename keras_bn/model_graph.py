"""Walking and rebuilding a Keras model's layer graph (`fold_batch_norm`, `convert_model`, and
the population-statistics pass's search for BN layers)."""

import keras
from keras.src.models.functional import Functional  # The class has no public name.

__all__ = ["fresh_inputs", "is_graph_model", "sublayers"]


def is_graph_model(layer):
    """True for models whose layer graph can be rebuilt (Sequential, Functional)."""
    return isinstance(layer, (keras.Sequential, Functional))


def fresh_inputs(tensors):
    """New `keras.Input`s like `tensors` (a structure of a model's input tensors).

    They keep the names of the original input layers, so the rebuilt model takes the same dict
    keys (`keras.models.clone_model`, left to itself, would rename them).
    """
    return keras.tree.map_structure(
        lambda x: keras.Input(
            batch_shape=x.shape,
            dtype=x.dtype,
            sparse=x.sparse,
            name=x._keras_history.operation.name,
        ),
        tensors,
    )


def sublayers(layer):
    """Every layer inside `layer`, at any depth (not `layer` itself)."""
    # Keras has no public name for this walk (Model.layers is the same walk, one level deep).
    return list(layer._flatten_layers(include_self=False))
