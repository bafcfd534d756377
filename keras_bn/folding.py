"""Inference as a linear map: fold Batch Normalization into the preceding layer.

In inference, Batch Normalization is a fixed per-channel affine map (Section 3.1 of the paper):

    y = gamma * (x - mean) / sqrt(var + epsilon) + beta = scale * x + shift

When `x` is the output of a linear layer (a convolution or a dense layer with no activation),
`scale` and `shift` can be folded into that layer's kernel and bias, so the BN layer costs
nothing at inference time:

    W' = scale * W        (along the kernel's output-channel axis)
    b' = scale * b + shift = beta + gamma * (b - mean) / sqrt(var + epsilon)

`fold_batch_norm(model)` returns a new inference-only model in which every BN layer that can be
folded is folded, and every other BN layer becomes one `AffineChannel` multiply-add.
"""

import warnings

import keras
import numpy as np

from keras_bn.model_graph import fresh_inputs, is_graph_model, sublayers

__all__ = ["AffineChannel", "fold_batch_norm"]


@keras.saving.register_keras_serializable(package="keras_bn")
class AffineChannel(keras.layers.Layer):
    """Per-channel multiply-add: `outputs = inputs * scale + offset`.

    The inference form of a Batch Normalization layer that could not be folded into a
    preceding layer. `scale` and `offset` have one entry per channel, where the channels are
    the entries along `axis` (one axis or several, as in `BatchNormalization`). Math on
    float16/bfloat16 inputs is done in float32, as in Keras's `BatchNormalization`.

    Args:
        axis: Integer or list of integers, the channel axis or axes. Defaults to -1.
        scale_initializer: Initializer for `scale`. Defaults to `"ones"`.
        offset_initializer: Initializer for `offset`. Defaults to `"zeros"`.
        **kwargs: Base layer keyword arguments, e.g. `name` and `dtype`.

    Call arguments:
        inputs: Input tensor of any rank that has the axes in `axis`.

    Returns:
        A tensor of the same shape as `inputs`, in the layer's compute dtype.

    Example:

    >>> layer = AffineChannel(axis=-1)
    >>> y = layer(np.ones((2, 3), "float32"))
    >>> layer.set_weights([np.array([1.0, 2.0, 3.0]), np.array([0.0, 0.0, 1.0])])
    >>> keras.ops.convert_to_numpy(layer(np.ones((2, 3), "float32")))[0]
    array([1., 2., 4.], dtype=float32)
    """

    def __init__(self, axis=-1, scale_initializer="ones", offset_initializer="zeros", **kwargs):
        super().__init__(**kwargs)
        if isinstance(axis, (list, tuple)):
            if not axis or not all(isinstance(a, int) for a in axis):
                raise ValueError(
                    f"`axis` must be an int or a non-empty list of ints. Received: axis={axis}"
                )
            self.axis = list(axis)
        elif isinstance(axis, int):
            self.axis = axis
        else:
            raise ValueError(f"`axis` must be an int or a list of ints. Received: axis={axis}")
        self.scale_initializer = keras.initializers.get(scale_initializer)
        self.offset_initializer = keras.initializers.get(offset_initializer)
        self.supports_masking = True
        self._axes = None
        self._broadcast_shape = None

    def build(self, input_shape):
        rank = len(input_shape)
        self._axes = _normalize_axes(self.axis, rank, "axis")
        shape = tuple(input_shape[a] for a in self._axes)
        if any(d is None for d in shape):
            raise ValueError(
                f"The channel axes {self._axes} of the input must have a known size. "
                f"Received: input_shape={input_shape}"
            )
        self._broadcast_shape = [input_shape[i] if i in self._axes else 1 for i in range(rank)]
        # autocast=False: parameters stay float32 and the math happens in float32 (see call).
        self.scale = self.add_weight(
            shape=shape, name="scale", initializer=self.scale_initializer, autocast=False
        )
        self.offset = self.add_weight(
            shape=shape, name="offset", initializer=self.offset_initializer, autocast=False
        )

    def call(self, inputs):
        dtype = keras.backend.result_type(inputs.dtype, "float32")
        x = keras.ops.cast(inputs, dtype)
        scale = keras.ops.reshape(keras.ops.cast(self.scale, dtype), self._broadcast_shape)
        offset = keras.ops.reshape(keras.ops.cast(self.offset, dtype), self._broadcast_shape)
        return keras.ops.cast(x * scale + offset, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "axis": self.axis,
                "scale_initializer": keras.initializers.serialize(self.scale_initializer),
                "offset_initializer": keras.initializers.serialize(self.offset_initializer),
            }
        )
        return config


def fold_batch_norm(model):
    """Returns an inference-only copy of `model` with Batch Normalization folded away.

    Each BN layer (`keras_bn.BatchNormalization` or `keras.layers.BatchNormalization`) that
    directly follows a `Conv1D`/`Conv2D`/`Conv3D`, `DepthwiseConv1D`/`DepthwiseConv2D`,
    `SeparableConv1D`/`SeparableConv2D` (folded into the pointwise kernel) or `Dense` layer is
    folded into that layer's kernel and bias when

    - the producing layer has a linear activation (no activation in between),
    - its output has exactly one consumer, the BN layer (and is not a model output),
    - both layers are called exactly once in the model, and
    - the BN normalizes the producer's channel axis (one axis, channels_last or
      channels_first).

    A producer without bias gets one. Every other BN layer (after an activation, an input, a
    concatenation, a shared layer, with several axes, ...) becomes one `AffineChannel`
    multiply-add layer with the BN's name. The folding math is done in float64 and cast to the
    variables' dtype. All other layers are copied (same config and weights, new variables).

    Nested Sequential and Functional models are folded recursively: each sub-model is
    replaced by its folded copy. A BN whose producer lies on the other side of a sub-model
    boundary becomes an `AffineChannel`. Other custom layers are copied as they are; if they
    contain BN layers, those stay (with a warning).

    The original model is not modified. If it is compiled, the result is compiled with the same
    configuration (as `keras.models.clone_model` does). The result computes the same function as
    `model(x, training=False)` up to float rounding; it is meant for inference and export, not
    for training (it has no BN left, so it would train differently).

    Args:
        model: A built `keras.Sequential` or Functional `keras.Model`.

    Returns:
        A new model of the same kind (Sequential or Functional) with the same inputs and
        outputs, and no Batch Normalization layer left.

    Raises:
        ValueError: If `model` is not a Keras model, is a subclassed model, or is not built.

    Example:

    ```python
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(16, 3, use_bias=False)(inputs)
    x = keras_bn.BatchNormalization()(x)
    outputs = keras.layers.ReLU()(x)
    model = keras.Model(inputs, outputs)
    # ... train ...
    folded = keras_bn.fold_batch_norm(model)  # Conv2D (with bias) -> ReLU
    folded.export("/tmp/model")  # SavedModel for serving
    ```
    """
    if not isinstance(model, keras.Model):
        raise ValueError(
            "`model` must be a keras.Model (Sequential or Functional). "
            f"Received: model={model!r} of type {type(model).__name__}"
        )
    if not model.built:
        raise ValueError(
            f"`model` ({model.name}) is not built, so it has no weights to fold. Build it first, "
            "e.g. by giving it an `Input` or calling `model.build(input_shape)` or `model(x)`."
        )
    if isinstance(model, keras.Sequential):
        return _fold_sequential(model)
    if is_graph_model(model):
        return _fold_functional(model)
    raise ValueError(
        f"`model` ({model.name}) is a subclassed model of type {type(model).__name__}; "
        "fold_batch_norm needs a layer graph to rewrite. Pass a Sequential or Functional model "
        "(a subclassed model can be wrapped: keras.Model(inputs, my_model(inputs)) still hides "
        "its layers, so build its body functionally)."
    )


# --------------------------------------------------------------------------------------------
# Folding math (pure numpy)


def bn_scale_shift(bn):
    """The inference affine map of a BN layer as float64 `(scale, shift)` arrays.

    Args:
        bn: A built BN layer (`keras_bn.BatchNormalization` or `keras.layers.BatchNormalization`).

    Returns:
        `(scale, shift)` with the shape of the BN's `moving_mean`, such that
        `bn(x, training=False) == x * scale + shift` (broadcast along the BN's axes).
    """
    mean = _to_float64(bn.moving_mean)
    var = _to_float64(bn.moving_variance)
    gamma = _to_float64(bn.gamma) if bn.gamma is not None else np.ones_like(mean)
    beta = _to_float64(bn.beta) if bn.beta is not None else np.zeros_like(mean)
    scale = gamma / np.sqrt(var + float(bn.epsilon))
    return scale, beta - mean * scale


def fold_weights(producer, bn):
    """The folded weights of `producer` (a conv or dense layer) followed by `bn`.

    Args:
        producer: A built foldable layer (see `fold_batch_norm`).
        bn: The built BN layer that normalizes `producer`'s output channels.

    Returns:
        A dict from the producer's weight attribute names (`"kernel"`, `"bias"`, and for
        separable convs `"depthwise_kernel"`, `"pointwise_kernel"`) to float64 arrays. The bias
        is always present.
    """
    scale, shift = bn_scale_shift(bn)
    scale, shift = scale.reshape(-1), shift.reshape(-1)
    name = _output_kernel_name(producer)
    kernel = _to_float64(getattr(producer, name))
    if isinstance(producer, _DEPTHWISE):
        # Output channel c * depth_multiplier + m comes from kernel[..., c, m].
        kernel = kernel * scale.reshape(kernel.shape[-2:])
    else:
        kernel = kernel * scale  # The output-channel axis is last for all other kernels.
    bias = _to_float64(producer.bias) if producer.use_bias else np.zeros_like(scale)
    weights = {name: kernel, "bias": bias * scale + shift}
    if isinstance(producer, _SEPARABLE):
        weights["depthwise_kernel"] = _to_float64(producer.depthwise_kernel)
    return weights


# --------------------------------------------------------------------------------------------
# Which BN layers fold


_DEPTHWISE = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)
_SEPARABLE = (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)
_CONV = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D) + _DEPTHWISE + _SEPARABLE
_FOLDABLE = _CONV + (keras.layers.Dense,)
# keras_bn.BatchNormalization subclasses Keras's layer, so Keras's class finds both.
_BN_CLASS = keras.layers.BatchNormalization


def _is_bn(layer):
    return isinstance(layer, _BN_CLASS)


def _normalize_axes(axis, rank, arg_name):
    axes = list(axis) if isinstance(axis, (list, tuple)) else [axis]
    for a in axes:
        if not -rank <= a < rank:
            raise ValueError(f"`{arg_name}`={axis} is out of range for an input of rank {rank}.")
    return sorted({a % rank for a in axes})


def _channel_axis(producer, rank):
    if isinstance(producer, _CONV) and producer.data_format == "channels_first":
        return 1
    return rank - 1


def _output_kernel_name(producer):
    return "pointwise_kernel" if isinstance(producer, _SEPARABLE) else "kernel"


def _can_fold(producer, bn, rank):
    """Whether `bn`, applied to the rank-`rank` output of `producer`, folds into it."""
    if not isinstance(producer, _FOLDABLE) or not producer.built or not bn.built:
        return False
    if getattr(producer.activation, "__name__", None) != "linear":
        return False
    # LoRA and quantized kernels are not plain variables we could rescale.
    if getattr(producer, "lora_enabled", False) or getattr(producer, "quantization_mode", None):
        return False
    if _normalize_axes(bn.axis, rank, "axis") != [_channel_axis(producer, rank)]:
        return False
    channels = getattr(producer, _output_kernel_name(producer)).shape
    channels = channels[-1] * (channels[-2] if isinstance(producer, _DEPTHWISE) else 1)
    return int(np.prod(bn.moving_mean.shape)) == channels


# --------------------------------------------------------------------------------------------
# Layer conversion, shared by the Sequential and Functional rewrites


class _Converter:
    """Makes the new layer for each original layer and fills in its weights afterwards.

    New layers are unbuilt when created (they are built when the rewritten graph calls them),
    so weights are assigned in `assign_weights`, after the new model exists.
    """

    def __init__(self, folds):
        self.folds = folds  # id(producer) -> the BN folded into it.
        self.folded_bns = {id(bn) for bn in folds.values()}
        self.pending = []  # (original layer, new layer)

    def convert(self, layer):
        """The replacement of `layer`, or None if it disappears (a folded BN)."""
        if id(layer) in self.folded_bns:
            return None
        if is_graph_model(layer):
            return fold_batch_norm(layer)  # Comes with its weights.
        if _is_bn(layer):
            new = AffineChannel(axis=layer.axis, name=layer.name, dtype=layer.dtype_policy)
        elif id(layer) in self.folds:
            config = layer.get_config()
            config["use_bias"] = True
            new = layer.__class__.from_config(config)
        else:
            if any(_is_bn(sub) for sub in sublayers(layer)):
                warnings.warn(
                    f"fold_batch_norm: layer {layer.name!r} ({type(layer).__name__}) contains "
                    "BatchNormalization layers it cannot rewrite; they are copied unchanged.",
                    stacklevel=3,
                )
            new = layer.__class__.from_config(layer.get_config())
        self.pending.append((layer, new))
        return new

    def assign_weights(self):
        for layer, new in self.pending:
            if _is_bn(layer):
                scale, shift = bn_scale_shift(layer)
                _assign(new.scale, scale)
                _assign(new.offset, shift)
            elif id(layer) in self.folds:
                for name, value in fold_weights(layer, self.folds[id(layer)]).items():
                    _assign(getattr(new, name), value)
            else:
                new.set_weights(layer.get_weights())


def _to_float64(variable):
    return np.asarray(keras.ops.convert_to_numpy(variable), dtype=np.float64)


def _assign(variable, value):
    variable.assign(np.reshape(value, variable.shape).astype(variable.dtype))


# --------------------------------------------------------------------------------------------
# Graph rewrites


def _fold_sequential(model):
    layers = model.layers
    try:
        model_input = model.inputs[0]
    except (AttributeError, IndexError) as e:
        raise ValueError(
            f"`model` ({model.name}) is built but Keras could not trace its layers "
            "symbolically, so there is no graph to rewrite."
        ) from e
    folds = {}
    for producer, bn in zip(layers[:-1], layers[1:], strict=True):
        if (
            _is_bn(bn)
            and layers.count(producer) == 1
            and layers.count(bn) == 1
            and _can_fold(producer, bn, len(producer.output.shape))
        ):
            folds[id(producer)] = bn
    converter = _Converter(folds)
    new_layers = [new for new in map(converter.convert, layers) if new is not None]
    new_model = keras.Sequential([fresh_inputs(model_input)] + new_layers, name=model.name)
    if model.compiled:  # As keras.models.clone_model does for Functional models.
        new_model.compile_from_config(model.get_compile_config())
    converter.assign_weights()
    return new_model


def _graph_nodes(model):
    """The (non-input) nodes of a Functional model's graph."""
    return [
        node
        for nodes in model._nodes_by_depth.values()
        for node in nodes
        if node.operation is not None and not node.is_input
    ]


def _functional_folds(model):
    """Maps id(producer) -> BN for each foldable (producer, BN) pair of a Functional model."""
    nodes = _graph_nodes(model)
    calls = {}  # id(layer) -> number of nodes of the layer in this model.
    consumers = {}  # id(tensor) -> number of uses of the tensor in this model.
    for node in nodes:
        calls[id(node.operation)] = calls.get(id(node.operation), 0) + 1
        for tensor in node.input_tensors:
            consumers[id(tensor)] = consumers.get(id(tensor), 0) + 1
    for tensor in model.outputs:
        consumers[id(tensor)] = consumers.get(id(tensor), 0) + 1

    folds = {}
    for node in nodes:
        bn = node.operation
        if not _is_bn(bn) or calls[id(bn)] != 1 or len(node.input_tensors) != 1:
            continue
        x = node.input_tensors[0]
        producer = x._keras_history.operation
        if (
            producer is not None
            and calls.get(id(producer)) == 1
            and consumers[id(x)] == 1
            and _can_fold(producer, bn, len(x.shape))
        ):
            folds[id(producer)] = bn
    return folds


def _fold_functional(model):
    converter = _Converter(_functional_folds(model))
    skip = object()  # Stands for a folded BN: the graph passes its input through.

    def clone_function(layer):
        new = converter.convert(layer)
        return skip if new is None else new

    def call_function(layer, *args, **kwargs):
        if layer is skip or isinstance(layer, AffineChannel):
            # A (former) BN call: drop its `training`/`mask` arguments; masks propagate anyway.
            x = args[0] if args else kwargs["inputs"]
            return x if layer is skip else layer(x)
        return layer(*args, **kwargs)

    new_model = keras.models.clone_model(
        model,
        input_tensors=fresh_inputs(model.input),
        clone_function=clone_function,
        call_function=call_function,
    )
    converter.assign_weights()
    return new_model
