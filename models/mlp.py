"""The paper's MNIST network (section 4.1, Figure 1), with and without Batch Normalization."""

import dataclasses

import keras

from keras_bn.models import _common

DEFAULT_INIT_STDDEV = 0.01


@dataclasses.dataclass(frozen=True, kw_only=True)
class MlpOptions(_common.ModelOptions):
    """The keyword arguments of `mlp`: those of every zoo builder (`ModelOptions`) and these.

    Attributes:
        input_shape: shape of one example, `(784,)` for flat MNIST.
        hidden_units: sequence of hidden layer widths, one sigmoid layer each.
        init_stddev: float > 0, standard deviation of the Gaussian weight initialization.
    """

    num_classes: int = 10
    input_shape: tuple[int | None, ...] = (784,)
    hidden_units: tuple[int, ...] = (100, 100, 100)
    init_stddev: float = DEFAULT_INIT_STDDEV

    def __post_init__(self):
        super().__post_init__()
        if not self.init_stddev > 0:
            raise ValueError(f"`init_stddev` must be > 0; received {self.init_stddev!r}.")
        hidden_units = tuple(self.hidden_units)
        if not hidden_units or any(int(units) < 1 for units in hidden_units):
            raise ValueError(
                f"`hidden_units` must be a non-empty sequence of positive ints; received "
                f"{hidden_units!r}."
            )


@_common.builder(MlpOptions)
def mlp(options):
    """Builds the MNIST net of the paper's section 4.1: 784 -> 3 x (100, sigmoid) -> 10 logits.

    With `batch_norm=True` every hidden layer is `Dense(use_bias=False) -> norm_layer() ->
    Activation("sigmoid")`: BN sits right before the nonlinearity and takes over the bias
    (paper section 3.2). With `batch_norm=False` it is the baseline, `Dense(use_bias=True) ->
    Activation("sigmoid")`. The output layer is `Dense(num_classes)` with a bias and no BN.

    The model returns LOGITS (no softmax): train it with
    `keras.losses.SparseCategoricalCrossentropy(from_logits=True)`, the paper's cross-entropy.

    Layers are named `hidden{i}_dense`, `hidden{i}_bn` (BN net only), `hidden{i}_sigmoid` for
    i = 1, 2, 3, and `logits`. The input of the sigmoid of hidden layer i (Figure 1(b, c)) is
    `model.get_layer(f"hidden{i}_sigmoid").input`; `preactivation_model` builds the sub-model.

    Where the paper is silent (section 4.1 gives neither the init scale nor the optimizer), this
    builder chooses:

    - Initialization: every weight matrix (output layer included) drawn from N(0, 0.01^2)
      (`init_stddev`; 0.01 is our reading of section 4.1's "small random Gaussian values").
      Biases and beta start at 0, gamma at 1. The BN net does not depend on this scale; the
      baseline does: its sigmoid inputs start tiny (std ~0.1 in layer 1 for binary MNIST,
      ~0.05 above) and its gradients small, so it starts slowly and catches up later.
    - BN: momentum 0.99 and epsilon 1e-3 (Keras's defaults), gamma and beta learned.
    - Input: 784 floats; binarizing or scaling the images is the data pipeline's job.

    Keyword arguments: the fields of `MlpOptions`; the name defaults to "mlp_bn" or "mlp".

    Returns:
        An uncompiled `keras.Model` mapping `(batch,) + input_shape` to `(batch, num_classes)`
        logits.

    Reference:
        Ioffe & Szegedy, 2015, section 4.1 and Figure 1.

    Example:

    >>> import keras
    >>> from keras_bn import models
    >>> model = models.get("mlp", batch_norm=True, norm_layer=keras.layers.BatchNormalization)
    >>> model.output_shape
    (None, 10)
    """
    seeds = _common.SeedStream(options.seed)

    def init():
        return keras.initializers.RandomNormal(stddev=options.init_stddev, seed=seeds())

    inputs = keras.Input(shape=tuple(options.input_shape), name="inputs")
    x = inputs
    for i, units in enumerate(options.hidden_units, start=1):
        x = keras.layers.Dense(
            int(units),
            use_bias=not options.batch_norm,
            kernel_initializer=init(),
            name=f"hidden{i}_dense",
        )(x)
        x = options.normalize(x, f"hidden{i}_bn")
        x = keras.layers.Activation("sigmoid", name=f"hidden{i}_sigmoid")(x)
    outputs = keras.layers.Dense(
        int(options.num_classes),
        kernel_initializer=init(),
        dtype=_common.logits_dtype(),
        name="logits",
    )(x)
    name = options.name
    if name is None:
        name = "mlp_bn" if options.batch_norm else "mlp"
    return keras.Model(inputs, outputs, name=name)


def preactivation_model(model):
    """Returns a model from `model.inputs` to the input of every hidden sigmoid, in order.

    The tensors are `model.get_layer(f"hidden{i}_sigmoid").input` for i = 1, 2, ...; the new
    model shares the weights of `model`. Called with `training=True` on a BN net it gives the
    training network's view N_BN^tr of Figure 1(c) (batch statistics, `gamma * x_hat + beta`);
    with `training=False` the inference view (population statistics). For the baseline it gives
    `W u + b`. Mind that calling any BN layer with `training=True` also moves its moving
    statistics (Keras's layer and keras_bn's alike), exactly as calling `model` would.

    Args:
        model: a model built by `mlp` (or any model with layers named `hidden{i}_sigmoid`).

    Returns:
        A `keras.Model` whose output is a list of one `(batch, units)` tensor per hidden layer.

    Example:

    >>> import keras
    >>> from keras_bn.models import mlp
    >>> net = mlp.mlp(norm_layer=keras.layers.BatchNormalization)
    >>> len(mlp.preactivation_model(net).outputs)
    3
    """
    outputs = []
    i = 1
    while True:
        try:
            layer = model.get_layer(f"hidden{i}_sigmoid")
        except ValueError:
            break
        outputs.append(layer.input)
        i += 1
    if not outputs:
        raise ValueError(
            f"`model` {model.name!r} has no layer named 'hidden1_sigmoid'; build it with "
            f"keras_bn.models.get('mlp', ...)."
        )
    return keras.Model(model.input, outputs, name=f"{model.name}_preactivations")
