"""Swap every Batch Normalization layer of an existing model for `keras_bn.BatchNormalization`.

Keras has no counterpart of PyTorch's `SyncBatchNorm.convert_sync_batchnorm`: `convert_model`
rebuilds a Sequential or Functional model (nested ones included: Functional graphs with
`keras.models.clone_model`, Sequential ones from their list of layers), replacing each
`keras.layers.BatchNormalization` by ours with the same configuration and weights, and copying
every other layer with its weights.
"""

import inspect

import keras
import numpy as np

from keras_bn.layer import BatchNormalization
from keras_bn.model_graph import fresh_inputs, is_graph_model, sublayers

__all__ = ["convert_model"]

_BN_CLASSES = (keras.layers.BatchNormalization, BatchNormalization)


def convert_model(model, **overrides):
    """Returns a copy of `model` whose Batch Normalization layers are `keras_bn`'s.

    Every `keras.layers.BatchNormalization` (subclasses included) in `model`, in nested
    Sequential and Functional models too, becomes a `keras_bn.BatchNormalization` with the same
    configuration (name, axis, momentum, epsilon, center/scale, initializers, regularizers,
    constraints, `trainable`, dtype policy, `synchronized`) updated by `overrides`, and the
    same weights, matched by name (`gamma`, `beta`, `moving_mean`, `moving_variance`). A
    `keras_bn.BatchNormalization` already in the model is rebuilt the same way, so every BN layer
    of the result has the overrides. Every other layer is copied with `from_config(get_config())`
    and its weights; layers shared in `model` stay shared. The result computes the same function
    as `model` in inference (training differs where our layer does: see its docstring).

    Weights:

    - Keras's config has no `unbiased_variance`, so a converted Keras layer takes ours (True,
      the paper's n/(n-1)); pass `unbiased_variance=False` for Keras's moving-variance update.
    - With `momentum=None` (a cumulative average) the layer also has `moving_count`, the
      number of batches averaged so far. Keras's layer does not count batches; as when Keras's
      weights are loaded into our layer, its statistics count as ONE batch seen
      (`moving_count = 1`), so the average runs over them and every batch after. (To weigh them
      as k batches, assign k to `moving_count`; 0 lets the first training batch replace them.)
      A `keras_bn` layer that already had `moving_count` keeps it if the result still has
      `momentum=None`; with a momentum the count is not needed and is dropped.
    - A weight the converted layer has but the original had not (e.g. `beta` after
      `center=True`) keeps its initializer's value. Overrides that would drop a weight of the
      original (e.g. `scale=False` on a layer with `gamma`) raise an error instead.

    `model` is not modified. The result is not compiled, even if `model` is (unlike
    `clone_model`): compile it yourself (under your strategy's scope when you distribute);
    no optimizer state is carried. It is a `keras.Sequential` for a Sequential `model` and a
    plain Functional `keras.Model` otherwise, with the same name, input names and outputs.

    To train the result under a `tf.distribute` strategy, call `convert_model` inside
    `strategy.scope()`, so that the new variables are created by the strategy.

    Args:
        model: A `keras.Sequential` or Functional `keras.Model` (built or not).
        **overrides: Arguments of `keras_bn.BatchNormalization` given to every BN layer, e.g.
            `synchronized=True`, `momentum=None`, `unbiased_variance=False`, `fused=False`.
            `name` is per layer and cannot be overridden.

    Returns:
        A new model of the same kind with new variables.

    Raises:
        ValueError: If `model` is not a Sequential or Functional model (a subclassed model's
            layers are made by its Python code, so there is no graph to rebuild); if a layer
            that is neither a model nor a BN layer contains BN layers (a custom block: it
            cannot be rebuilt); if an override is not an argument of
            `keras_bn.BatchNormalization`; or if a BN layer's configuration with the overrides
            is not valid for ours, or would drop one of its weights.

    Example:

    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
    ...                           keras.layers.BatchNormalization(epsilon=1e-5)])
    >>> bn = convert_model(model, synchronized=True).layers[1]
    >>> type(bn).__module__, bn.epsilon, bn.synchronized
    ('keras_bn.layer', 1e-05, True)

    A `keras.applications` net trained with synchronized statistics:

    ```python
    strategy = tf.distribute.MirroredStrategy()
    with strategy.scope():
        base = keras.applications.ResNet50(weights="imagenet")
        model = keras_bn.convert_model(base, synchronized=True)
        model.compile(keras.optimizers.SGD(0.01, momentum=0.9), "sparse_categorical_crossentropy")
    model.fit(dataset, epochs=10)
    ```

    Reference:
        - [Ioffe and Szegedy, 2015](https://arxiv.org/abs/1502.03167).
    """
    if not isinstance(model, keras.Model):
        raise ValueError(
            "`model` must be a keras.Model (Sequential or Functional). "
            f"Received: {model!r} of type {type(model).__name__}"
        )
    if not is_graph_model(model):
        raise ValueError(_cannot_rebuild(model, "is a subclassed model"))
    _check_overrides(overrides)
    converter = _Converter(overrides)
    new_model = converter.clone(model)
    converter.copy_weights()
    return new_model


def _check_overrides(overrides):
    parameters = inspect.signature(BatchNormalization.__init__).parameters
    accepted = {
        name
        for name, parameter in parameters.items()
        if name != "self" and parameter.kind is not parameter.VAR_KEYWORD
    } | {"dtype", "trainable"}  # The base layer's keyword arguments that make sense for all.
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        raise ValueError(
            f"convert_model: {', '.join(map(repr, unknown))} "
            f"{'is not an argument' if len(unknown) == 1 else 'are not arguments'} "
            "that can be given to every keras_bn.BatchNormalization layer "
            f"(`name` is per layer). Accepted: {', '.join(sorted(accepted))}."
        )


def _cannot_rebuild(layer, what):
    return (
        f"convert_model cannot rebuild {layer.name!r} ({type(layer).__name__}): it {what}, so "
        "its layers are created by its Python code and there is no layer graph to rebuild. "
        "Use keras_bn.BatchNormalization where that code creates its BatchNormalization "
        "layers, or build the network as a Sequential or Functional model."
    )


class _Converter:
    """Makes the new layer for each original layer and copies the weights afterwards.

    New layers are unbuilt when created (the rebuilt graph builds them when it calls them), so
    weights are copied in `copy_weights`, once the whole new model exists.
    """

    def __init__(self, overrides):
        self.overrides = overrides
        self.clones = {}  # id(original layer) -> its clone: a shared layer stays shared.
        self.pending = []  # (original layer, clone) whose weights are still to be copied.

    def clone(self, layer):
        if id(layer) not in self.clones:
            self.clones[id(layer)] = self._new_layer(layer)
        return self.clones[id(layer)]

    def _new_layer(self, layer):
        if is_graph_model(layer):
            return self._rebuild(layer)
        if isinstance(layer, _BN_CLASSES):
            new = self._batch_normalization(layer)
        elif any(isinstance(sub, _BN_CLASSES) for sub in sublayers(layer)):
            raise ValueError(_cannot_rebuild(layer, "is a custom layer or model with BN inside"))
        else:
            new = layer.__class__.from_config(layer.get_config())
        self.pending.append((layer, new))
        return new

    def _rebuild(self, model):
        if isinstance(model, keras.Sequential):
            try:
                inputs = [fresh_inputs(model.inputs[0])]
            except AttributeError:  # Not built yet: neither is the copy.
                inputs = []
            layers = [self.clone(layer) for layer in model.layers]
            return keras.Sequential(inputs + layers, name=model.name, trainable=model.trainable)
        # clone_model compiles its result when the model is compiled, which fails for losses
        # that are plain Python functions; a new Functional over the same graph is not compiled.
        uncompiled = keras.Model(model.input, model.output, name=model.name)
        new = keras.models.clone_model(
            uncompiled, input_tensors=fresh_inputs(model.input), clone_function=self.clone
        )
        if not model.trainable:
            new.trainable = False
        return new

    def _batch_normalization(self, layer):
        config = layer.get_config()
        config.update(self.overrides)
        try:
            return BatchNormalization.from_config(config)
        except (TypeError, ValueError) as e:
            reason = e.__context__ or e  # from_config re-raises with the whole config dumped.
            raise ValueError(
                f"convert_model: layer {layer.name!r} ({type(layer).__name__}) cannot become a "
                f"keras_bn.BatchNormalization with overrides {self.overrides}: {reason}"
            ) from e

    def copy_weights(self):
        for layer, new in self.pending:
            if not layer.built:  # A layer of an unbuilt Sequential: nothing to copy yet.
                continue
            if isinstance(layer, _BN_CLASSES):
                _copy_weights_by_name(layer, new)
            else:
                new.set_weights(layer.get_weights())


def _copy_weights_by_name(layer, new):
    """Copies a BN layer's weights into its converted `new` layer, matching them by name."""
    source = {variable.name: variable for variable in layer.weights}
    target = {variable.name: variable for variable in new.weights}
    # A count is only needed by momentum=None (see convert_model's docstring).
    dropped = sorted(set(source) - set(target) - {"moving_count"})
    if dropped:
        raise ValueError(
            f"convert_model: layer {layer.name!r} has weights {dropped} that its converted "
            f"layer (config {_short_config(new)}) has no place for; they would be lost. Check "
            "the overrides (e.g. scale=False removes gamma, center=False removes beta)."
        )
    for name, variable in target.items():
        if name in source:
            value = keras.ops.convert_to_numpy(source[name])
            if tuple(value.shape) != tuple(variable.shape):
                raise ValueError(
                    f"convert_model: layer {layer.name!r}: weight {name!r} has shape "
                    f"{tuple(value.shape)} but the converted layer's has "
                    f"{tuple(variable.shape)} (check an `axis` override)."
                )
            variable.assign(value.astype(variable.dtype))
        elif name == "moving_count":
            # Keras's statistics count as one batch, the rule of BatchNormalization's loading.
            variable.assign(np.ones(variable.shape, variable.dtype))
        # Any other new weight keeps its initializer's value.


def _short_config(layer):
    return {key: getattr(layer, key) for key in ("axis", "center", "scale", "momentum")}
