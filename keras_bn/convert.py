"""Swap every Batch Normalization layer of an existing model for ours, or back for Keras's.

Keras has no counterpart of PyTorch's `SyncBatchNorm.convert_sync_batchnorm`: `convert_model`
rebuilds a Sequential or Functional model (nested ones included: Functional graphs with
`keras.models.clone_model`, Sequential ones from their list of layers), replacing each
`keras.layers.BatchNormalization` by `keras_bn.BatchNormalization` with the same configuration
and weights (`to="keras_bn"`), or each BN layer by `keras.layers.BatchNormalization`
(`to="keras"`, for a model that must load where keras-bn is not installed), and copying every
other layer with its weights.
"""

import inspect
import warnings

import keras
import numpy as np

from keras_bn.layer import BatchNormalization
from keras_bn.model_graph import fresh_inputs, is_graph_model, sublayers

__all__ = ["convert_model"]

# Ours is a subclass of Keras's layer, so this one class covers both: every BN layer of the
# model is rebuilt as the target class, whichever of the two it is.
_BN_CLASS = keras.layers.BatchNormalization
_TARGETS = ("keras_bn", "keras")
# Keras's moving average when ours has momentum=None (a cumulative average): Keras's default.
_KERAS_MOMENTUM = 0.99


def convert_model(model, to="keras_bn", **overrides):
    """Returns a copy of `model` whose Batch Normalization layers are `keras_bn`'s (or Keras's).

    With `to="keras_bn"` (the default), every `keras.layers.BatchNormalization` (subclasses
    included) in `model`, in nested Sequential and Functional models too, becomes a
    `keras_bn.BatchNormalization` with the same configuration (name, axis, momentum, epsilon,
    center/scale, initializers, regularizers, constraints, `trainable`, dtype policy,
    `synchronized`) updated by `overrides`, and the same weights, matched by name (`gamma`,
    `beta`, `moving_mean`, `moving_variance`, renorm's). A `keras_bn.BatchNormalization` already
    in the model is rebuilt the same way, so every BN layer of the result has the overrides.
    Every other layer is copied with `from_config(get_config())` and its weights; layers shared
    in `model` stay shared. The result computes the same function as `model` in inference
    (training differs where our layer does: see its docstring).

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

    JAX under a `keras.distribution` (e.g. `DataParallel`): the layer's `call` sees the global
    batch there, so Keras's layer normalizes with the statistics of the GLOBAL batch, and ours
    with `synchronized=False` with each device's slice. So that the converted model computes
    what the original did, when `convert_model` runs on the JAX backend while a distribution
    with a batch axis is set (`keras.distribution.distribution()` is not None), each converted
    Keras layer gets `synchronized=True` (global statistics), unless you pass `synchronized`
    yourself: `convert_model(model, synchronized=False)` asks for per-device statistics (what a
    `tf.distribute` replica or a `torch.distributed` rank computes with Keras's layer). Set the
    distribution before converting. Layers that are already ours keep their `synchronized`. On
    TensorFlow and PyTorch Keras's layer with `synchronized=False` normalizes each replica's
    (rank's) own batch, as ours does, so `synchronized` is kept as the original has it.

    With `to="keras"`, the way back, every BN layer (ours, and Keras's with the overrides)
    becomes a `keras.layers.BatchNormalization` with the same inference outputs, so the model
    can be saved and loaded without keras-bn. Our settings that Keras's layer cannot carry are
    dropped, and ONE `UserWarning` names them with the layers that had them (training differs
    there; inference does not):

    - `momentum=None`: Keras needs a number; the layers get 0.99 (Keras's default; pass
      `momentum=...` to choose), and `moving_count` is dropped.
    - `unbiased_variance=True`: Keras's layer moves the moving variance toward the biased batch
      variance (no n/(n-1)).
    - `virtual_batch_size` (ghost batches), `moving_mean_constraint`,
      `moving_variance_constraint`, and `fused` (speed only) have no counterpart.
    - `synchronized=True` on PyTorch (Keras's layer refuses it off TensorFlow; its statistics
      are each rank's own). On JAX Keras's layer is global under a distribution anyway, so
      `synchronized=True` is carried by Keras's behaviour, and it is `synchronized=False` under
      a distribution set at conversion that changes (per-device becomes global statistics).

    Our guard against degenerate batches (0 or 1 values, non-finite statistics) is not a
    setting and is lost too. A layer with several axes (`axis=[1, 2]`) cannot become Keras's
    layer, which normalizes one axis: ValueError (an `axis` list of one entry becomes an int).

    `model` is not modified. The result is not compiled, even if `model` is (unlike
    `clone_model`): compile it yourself (under your strategy's scope when you distribute);
    no optimizer state is carried. It is a `keras.Sequential` for a Sequential `model` and a
    plain Functional `keras.Model` otherwise, with the same name, input names and outputs.

    To train the result under a `tf.distribute` strategy, call `convert_model` inside
    `strategy.scope()`, so that the new variables are created by the strategy.

    A `.keras` file that holds our layer names it by its registered name
    (`keras_bn>BatchNormalization`): `import keras_bn` before `keras.models.load_model`.

    Args:
        model: A `keras.Sequential` or Functional `keras.Model` (built or not).
        to: `"keras_bn"` (default): every BN layer becomes `keras_bn.BatchNormalization`.
            `"keras"`: every BN layer becomes `keras.layers.BatchNormalization`.
        **overrides: Arguments of the target class given to every BN layer, e.g.
            `synchronized=True`, `momentum=None`, `unbiased_variance=False`, `fused=False` for
            ours; `momentum=0.9` for Keras's. `name` is per layer and cannot be overridden.

    Returns:
        A new model of the same kind with new variables.

    Raises:
        ValueError: If `model` is not a Sequential or Functional model (a subclassed model's
            layers are made by its Python code, so there is no graph to rebuild); if a layer
            that is neither a model nor a BN layer contains BN layers (a custom block: it
            cannot be rebuilt); if `to` is not one of the two names; if an override is not an
            argument of the target class; or if a BN layer's configuration with the overrides
            is not valid for the target, or would drop one of its weights.

    Example:

    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
    ...                           keras.layers.BatchNormalization(epsilon=1e-5)])
    >>> bn = convert_model(model, synchronized=True).layers[1]
    >>> type(bn).__module__, bn.epsilon, bn.synchronized
    ('keras_bn.layer', 1e-05, True)
    >>> ours = convert_model(model, unbiased_variance=False)  # Keras's update rule
    >>> back = convert_model(ours, to="keras").layers[1]  # nothing to drop: no warning
    >>> type(back) is keras.layers.BatchNormalization, back.epsilon
    (True, 1e-05)

    A `keras.applications` net trained with synchronized statistics:

    ```python
    strategy = tf.distribute.MirroredStrategy()
    with strategy.scope():
        base = keras.applications.ResNet50(weights="imagenet")
        model = keras_bn.convert_model(base, synchronized=True)
        model.compile(keras.optimizers.SGD(0.01, momentum=0.9), "sparse_categorical_crossentropy")
    model.fit(dataset, epochs=10)
    shipped = keras_bn.convert_model(model, to="keras")  # loads without keras-bn
    ```

    Reference:
        - [Ioffe and Szegedy, 2015](https://arxiv.org/abs/1502.03167).
    """
    if not isinstance(model, keras.Model):
        raise ValueError(
            "`model` must be a keras.Model (Sequential or Functional). "
            f"Received: {model!r} of type {type(model).__name__}"
        )
    if to not in _TARGETS:
        raise ValueError(
            f"convert_model: `to` must be 'keras_bn' (every BN layer becomes "
            f"keras_bn.BatchNormalization) or 'keras' (keras.layers.BatchNormalization). "
            f"Received: to={to!r}"
        )
    if not is_graph_model(model):
        raise ValueError(_cannot_rebuild(model, "is a subclassed model", to))
    target = _ToKerasBN(overrides) if to == "keras_bn" else _ToKeras(overrides)
    converter = _Converter(target)
    new_model = converter.clone(model)
    converter.copy_weights()
    target.warn()
    return new_model


def _check_overrides(overrides, cls, class_name):
    parameters = inspect.signature(cls.__init__).parameters
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
            f"that can be given to every {class_name} layer "
            f"(`name` is per layer). Accepted: {', '.join(sorted(accepted))}."
        )


def _cannot_rebuild(layer, what, to="keras_bn"):
    fix = (
        "Use keras_bn.BatchNormalization where that code creates its BatchNormalization layers"
        if to == "keras_bn"
        else "Use keras.layers.BatchNormalization where that code creates its BN layers"
    )
    return (
        f"convert_model cannot rebuild {layer.name!r} ({type(layer).__name__}): it {what}, so "
        f"its layers are created by its Python code and there is no layer graph to rebuild. "
        f"{fix}, or build the network as a Sequential or Functional model."
    )


def _global_batch_distribution():
    """True on JAX while a `keras.distribution` with a batch axis is set: there a layer's
    `call` sees the global batch (Keras's layer normalizes with global statistics)."""
    if keras.backend.backend() != "jax":
        return False
    distribution = keras.distribution.distribution()
    return distribution is not None and getattr(distribution, "batch_dim_name", None) is not None


class _ToKerasBN:
    """`to="keras_bn"`: every BN layer becomes ours."""

    to = "keras_bn"
    class_name = "keras_bn.BatchNormalization"

    def __init__(self, overrides):
        _check_overrides(overrides, BatchNormalization, self.class_name)
        self.overrides = overrides
        # Keras's layer is global there; ours with synchronized=False would be per device.
        self.keep_global = "synchronized" not in overrides and _global_batch_distribution()

    def config(self, layer):
        config = layer.get_config()
        if self.keep_global and not isinstance(layer, BatchNormalization):
            config["synchronized"] = True
        config.update(self.overrides)
        return config

    def new_layer(self, layer):
        return _from_config(BatchNormalization, self.config(layer), layer, self)

    def warn(self):
        pass


class _ToKeras:
    """`to="keras"`: every BN layer becomes Keras's; what it cannot carry is noted."""

    to = "keras"
    class_name = "keras.layers.BatchNormalization"

    def __init__(self, overrides):
        _check_overrides(overrides, keras.layers.BatchNormalization, self.class_name)
        self.overrides = overrides
        self.notes = {}  # what is lost -> names of the layers that lose it, in order
        self.converted = 0

    def _note(self, what, layer):
        self.notes.setdefault(what, []).append(layer.name)

    def config(self, layer):
        config = layer.get_config()
        ours = {key: config.pop(key, None) for key in _OURS_ONLY}
        config.update(self.overrides)
        if isinstance(config["axis"], (list, tuple)):
            if len(config["axis"]) != 1:
                raise ValueError(
                    f"convert_model(to='keras'): layer {layer.name!r} normalizes several axes "
                    f"(axis={config['axis']}), and keras.layers.BatchNormalization normalizes "
                    "one: it has no place for parameters of that shape. Keep keras_bn for this "
                    "model, or fold it for inference (keras_bn.fold_batch_norm)."
                )
            config["axis"] = int(config["axis"][0])
        if config["momentum"] is None:
            config["momentum"] = _KERAS_MOMENTUM
            self._note(
                f"momentum=None (a cumulative average; Keras's layer gets momentum="
                f"{_KERAS_MOMENTUM} and no moving_count: pass momentum=... to choose)",
                layer,
            )
        if ours["unbiased_variance"]:
            self._note(
                "unbiased_variance=True (Keras's layer moves the moving variance toward the "
                "biased batch variance, with no n/(n-1))",
                layer,
            )
        if ours["virtual_batch_size"] is not None:
            self._note(
                "virtual_batch_size (ghost batches; Keras's layer normalizes the whole batch)",
                layer,
            )
        for key in ("moving_mean_constraint", "moving_variance_constraint"):
            if ours[key] is not None:
                self._note(f"{key} (Keras's layer constrains no moving statistic)", layer)
        if ours["fused"] is not None:
            self._note("fused (Keras's layer has no such option; it only changes speed)", layer)
        self._synchronized(config, layer)
        return config

    def _synchronized(self, config, layer):
        backend = keras.backend.backend()
        if backend == "tensorflow" or "synchronized" in self.overrides:
            return  # Carried (Keras refuses an explicit synchronized=True off TensorFlow).
        if config["synchronized"]:
            config["synchronized"] = False  # Keras's layer refuses True off TensorFlow.
            if backend != "jax":  # On JAX Keras's layer is global where it matters.
                self._note(
                    f"synchronized=True (on the {backend} backend Keras's layer has no "
                    "cross-replica statistics: each process normalizes its own batch)",
                    layer,
                )
        elif _global_batch_distribution() and isinstance(layer, BatchNormalization):
            self._note(
                "synchronized=False under the current keras.distribution (Keras's layer "
                "normalizes with the global batch's statistics, not each device's)",
                layer,
            )

    def new_layer(self, layer):
        self.converted += 1
        return _from_config(keras.layers.BatchNormalization, self.config(layer), layer, self)

    def warn(self):
        if not self.notes:
            return
        lines = [
            f"- {what}: {_layer_names(names, self.converted)}" for what, names in self.notes.items()
        ]
        warnings.warn(
            "convert_model(to='keras'): keras.layers.BatchNormalization cannot carry these "
            "settings, so they are dropped (inference outputs are the same; training "
            "differs):\n" + "\n".join(lines),
            UserWarning,
            stacklevel=3,
        )


# Config keys of ours that Keras's layer does not take.
_OURS_ONLY = (
    "unbiased_variance",
    "fused",
    "virtual_batch_size",
    "moving_mean_constraint",
    "moving_variance_constraint",
)


def _layer_names(names, total):
    if len(names) == total and total > 3:
        return f"all {total} converted layers"
    shown = ", ".join(map(repr, names[:5]))
    return shown if len(names) <= 5 else f"{shown} and {len(names) - 5} more"


def _from_config(cls, config, layer, target):
    try:
        return cls.from_config(config)
    except (TypeError, ValueError) as e:
        reason = e.__context__ or e  # from_config re-raises with the whole config dumped.
        raise ValueError(
            f"convert_model: layer {layer.name!r} ({type(layer).__name__}) cannot become a "
            f"{target.class_name} with overrides {target.overrides}: {reason}"
        ) from e


class _Converter:
    """Makes the new layer for each original layer and copies the weights afterwards.

    New layers are unbuilt when created (the rebuilt graph builds them when it calls them), so
    weights are copied in `copy_weights`, once the whole new model exists.
    """

    def __init__(self, target):
        self.target = target
        self.clones = {}  # id(original layer) -> its clone: a shared layer stays shared.
        self.pending = []  # (original layer, clone) whose weights are still to be copied.

    def clone(self, layer):
        if id(layer) not in self.clones:
            self.clones[id(layer)] = self._new_layer(layer)
        return self.clones[id(layer)]

    def _new_layer(self, layer):
        if is_graph_model(layer):
            return self._rebuild(layer)
        if isinstance(layer, _BN_CLASS):
            new = self.target.new_layer(layer)
        elif any(isinstance(sub, _BN_CLASS) for sub in sublayers(layer)):
            raise ValueError(
                _cannot_rebuild(layer, "is a custom layer or model with BN inside", self.target.to)
            )
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

    def copy_weights(self):
        for layer, new in self.pending:
            if not layer.built:  # A layer of an unbuilt Sequential: nothing to copy yet.
                continue
            if isinstance(layer, _BN_CLASS):
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
            value = np.asarray(source[name].numpy())  # (convert_to_numpy warns on TF)
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
