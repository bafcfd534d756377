"""BN-Inception (the paper's Figure 5) and the baseline "Inception" of section 4.2.

The network is read top to bottom from the paper's Figure 5 table, with tf-slim's names
(`inception_v2.py`, which cites the paper) for every end point. The paper's own module names map
to slim's as in `PAPER_NAMES` (inception_3a is Mixed_3b, ..., inception_5b is Mixed_5c).

Widths. The printed table (Figure 5) is inconsistent: in 4c and 4d the branches sum to
608 channels while the table prints 576. By default we follow tf-slim, which uses a pool
projection of 96 there, giving 576 channels after every 14x14 module and 1024 after 4e.
`paper_widths=True` keeps the printed 128s (608 channels after 4c/4d and 1056 after 4e, as the
MXNet, Caffe and PyTorch ports do).

Parameter counts (1000 classes unless stated, measured; every bn_inception row equals arithmetic
over the Figure 5 table's widths; tests/test_models_inception.py asserts all but the two
`paper_widths` rows that combine it with another option or the baseline):

| model / options                                      | trainable  | non-trainable |
|------------------------------------------------------|------------|---------------|
| bn_inception (slim widths, gamma and beta)           | 11,188,288 | 19,904        |
| bn_inception, `separable_stem=False`                 | 11,194,984 | 19,904        |
| bn_inception, `paper_widths=True`                    | 11,278,528 | 20,032        |
| bn_inception, `paper_widths=True, separable_stem=False` | 11,285,224 | 20,032     |
| bn_inception, `bn_scale=False, num_classes=1001` (= slim) | 11,179,361 | 19,904   |
| inception (baseline: conv biases, no BN)             | 11,178,336 | 0             |
| inception, `paper_widths=True`                       | 11,268,512 | 0             |

The paper's "13.6M parameters" (appendix) is not reproduced by any reading of its table, nor by
adding GoogLeNet's auxiliary heads (about 3.2M each).
"""

import dataclasses

import keras

from keras_bn.models import _common
from keras_bn.models.lrn import LocalResponseNormalization

MIN_INPUT_SIZE = 75

END_POINTS = (
    "Conv2d_1a_7x7",
    "MaxPool_2a_3x3",
    "Conv2d_2b_1x1",
    "Conv2d_2c_3x3",
    "MaxPool_3a_3x3",
    "Mixed_3b",
    "Mixed_3c",
    "Mixed_4a",
    "Mixed_4b",
    "Mixed_4c",
    "Mixed_4d",
    "Mixed_4e",
    "Mixed_5a",
    "Mixed_5b",
    "Mixed_5c",
)

# The paper's (Figure 5) module names for slim's end points.
PAPER_NAMES = {
    "Mixed_3b": "inception_3a",
    "Mixed_3c": "inception_3b",
    "Mixed_4a": "inception_3c",
    "Mixed_4b": "inception_4a",
    "Mixed_4c": "inception_4b",
    "Mixed_4d": "inception_4c",
    "Mixed_4e": "inception_4d",
    "Mixed_5a": "inception_4e",
    "Mixed_5b": "inception_5a",
    "Mixed_5c": "inception_5b",
}

# Inception modules: (#1x1, #3x3 reduce, #3x3, double #3x3 reduce, double #3x3, pool, pool proj).
# Stride-2 modules: (#3x3 reduce, #3x3 stride 2, double #3x3 reduce, double #3x3 (2nd stride 2)),
# plus a 3x3/2 max pool passed through. The two 96s marked below are 128 in the printed table.
_MODULES = (
    ("Mixed_3b", "inception", (64, 64, 64, 64, 96, "avg", 32)),
    ("Mixed_3c", "inception", (64, 64, 96, 64, 96, "avg", 64)),
    ("Mixed_4a", "reduction", (128, 160, 64, 96)),
    ("Mixed_4b", "inception", (224, 64, 96, 96, 128, "avg", 128)),
    ("Mixed_4c", "inception", (192, 96, 128, 96, 128, "avg", 128)),
    ("Mixed_4d", "inception", (160, 128, 160, 128, 160, "avg", 96)),  # paper: 128
    ("Mixed_4e", "inception", (96, 128, 192, 160, 192, "avg", 96)),  # paper: 128
    ("Mixed_5a", "reduction", (128, 192, 192, 256)),
    ("Mixed_5b", "inception", (352, 192, 320, 160, 224, "avg", 128)),
    ("Mixed_5c", "inception", (352, 192, 320, 192, 224, "max", 128)),
)
_PAPER_POOL_PROJ = {"Mixed_4d": 128, "Mixed_4e": 128}

# End-point shapes for a 224x224 input at depth_multiplier 1 (slim widths), asserted in tests.
END_POINT_SHAPES_224 = {
    "Conv2d_1a_7x7": (112, 112, 64),
    "MaxPool_2a_3x3": (56, 56, 64),
    "Conv2d_2b_1x1": (56, 56, 64),
    "Conv2d_2c_3x3": (56, 56, 192),
    "MaxPool_3a_3x3": (28, 28, 192),
    "Mixed_3b": (28, 28, 256),
    "Mixed_3c": (28, 28, 320),
    "Mixed_4a": (14, 14, 576),
    "Mixed_4b": (14, 14, 576),
    "Mixed_4c": (14, 14, 576),
    "Mixed_4d": (14, 14, 576),
    "Mixed_4e": (14, 14, 576),
    "Mixed_5a": (7, 7, 1024),
    "Mixed_5b": (7, 7, 1024),
    "Mixed_5c": (7, 7, 1024),
}


def _check_input_shape(input_shape):
    try:
        input_shape = tuple(input_shape)
    except TypeError:
        input_shape = None
    if input_shape is None or len(input_shape) != 3:
        raise ValueError(
            f"`input_shape` must be (height, width, channels), channels last; received "
            f"{input_shape!r}."
        )
    height, width, channels = input_shape
    for label, size in (("height", height), ("width", width)):
        if size is not None and int(size) < MIN_INPUT_SIZE:
            raise ValueError(
                f"`input_shape` {label} must be >= {MIN_INPUT_SIZE} (or None); received "
                f"input_shape={input_shape!r}. Resize the images to at least "
                f"{MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}."
            )
    if channels is None or int(channels) < 1:
        raise ValueError(
            f"`input_shape` needs a known channel count (last entry); received {input_shape!r}."
        )
    return input_shape


@dataclasses.dataclass(frozen=True, kw_only=True)
class InceptionOptions(_common.ModelOptions):
    """The keyword arguments of the Inception builders: those of `ModelOptions` and these.

    The defaults are `bn_inception`'s; `inception` and `bn_inception_sigmoid` change a few.

    Attributes:
        batch_norm: bool. True: every conv is `Conv2D(use_bias=False) -> norm_layer ->
            activation` (BN-Inception). False: `Conv2D(use_bias=True) -> activation` (Inception).
        input_shape: `(height, width, channels)`, channels last; height and width >= 75 or
            None. The head pools globally, so any size from 75 up works.
        depth_multiplier: float > 0; every conv width d becomes
            `max(int(d * depth_multiplier), min_depth)` (tf-slim's rule).
        min_depth: int >= 1, the smallest width `depth_multiplier` may give.
        activation: "relu" (the paper) or "sigmoid" (BN-x5-Sigmoid).
        weight_decay: float >= 0, L2 weight decay in tf-slim's convention s (loss += s/2 *
            sum(w^2)), applied as `keras.regularizers.L2(s / 2)` to every conv kernel and the
            logits kernel; never to biases or BN parameters. 0 disables it.
        paper_widths: False: tf-slim's consistent widths (576/1024 channels). True: the
            printed table's pool projections of 128 in 4c and 4d (608/1056 channels).
        dropout_rate: float in [0, 1), dropout before the logits (0 adds no layer).
        use_lrn: bool, local response normalization after MaxPool_2a_3x3 and after
            Conv2d_2c_3x3, as in GoogLeNet (layers `MaxPool_2a_3x3_lrn`, `Conv2d_2c_3x3_lrn`).
        separable_stem: True: the paper's separable 7x7/2 stem with inner depth multiplier 8
            (slim: `min(depth(64) // 3, 8)`). False: a full 7x7/2 convolution.
        bn_scale: passed as `scale` (learn gamma). slim uses False before ReLU; the sigmoid
            variant needs gamma.
        final_endpoint: the last end point built (`END_POINTS`, tf-slim's argument); the
            head pools and classifies its output. The default builds the whole network;
            an earlier one gives a shallower net (for a quick run, or a feature extractor).
    """

    num_classes: int = 1000
    input_shape: tuple[int | None, ...] = (224, 224, 3)
    depth_multiplier: float = 1.0
    min_depth: int = 16
    activation: str = "relu"
    weight_decay: float = 4e-5
    paper_widths: bool = False
    dropout_rate: float = 0.0
    use_lrn: bool = False
    separable_stem: bool = True
    bn_scale: bool = True
    final_endpoint: str = "Mixed_5c"

    def __post_init__(self):
        super().__post_init__()
        _check_input_shape(self.input_shape)
        if not 0 <= self.dropout_rate < 1:
            raise ValueError(f"`dropout_rate` must be in [0, 1); received {self.dropout_rate!r}.")
        if self.final_endpoint not in END_POINTS:
            raise ValueError(
                f"`final_endpoint` must be one of {', '.join(END_POINTS)}; received "
                f"{self.final_endpoint!r}."
            )
        if not self.depth_multiplier > 0:
            raise ValueError(
                f"`depth_multiplier` must be > 0 (widths become max(int(d * depth_multiplier), "
                f"min_depth)); received {self.depth_multiplier!r}."
            )
        min_depth = self.min_depth
        if isinstance(min_depth, bool) or not isinstance(min_depth, int) or min_depth < 1:
            raise ValueError(f"`min_depth` must be an int >= 1; received {min_depth!r}.")
        if self.weight_decay is None or self.weight_decay < 0:
            raise ValueError(
                f"`weight_decay` must be >= 0 (slim convention, 0 disables it); received "
                f"{self.weight_decay!r}."
            )
        _common.check_activation(self.activation)


class _Builder:
    """Builds the conv units of one network from its options (private)."""

    def __init__(self, options):
        self.options = options
        self.batch_norm = options.batch_norm
        self.seeds = _common.SeedStream(options.seed)

    def depth(self, d):
        """tf-slim's width rule."""
        return max(int(d * self.options.depth_multiplier), self.options.min_depth)

    def regularizer(self):
        # slim's l2_regularizer(s) adds s * sum(w^2) / 2; Keras's L2(l) adds l * sum(w^2).
        if self.options.weight_decay == 0:
            return None
        return keras.regularizers.L2(self.options.weight_decay / 2)

    def initializer(self, stddev=None):
        """slim's per-layer truncated normal (BN nets), else its arg-scope default (He, fan-in).

        slim's fixed stddevs suit its BN net, which undoes any scale. Without BN they shrink the
        signal layer after layer (at small depth multipliers fan-ins are small), so the baseline
        uses He everywhere; the paper does not give the initialization.
        """
        if stddev is None or not self.batch_norm:
            return keras.initializers.HeNormal(seed=self.seeds())
        return keras.initializers.TruncatedNormal(stddev=stddev, seed=self.seeds())

    def normalize_and_activate(self, x, name):
        x = self.options.normalize(x, f"{name}_bn", scale=self.options.bn_scale)
        return keras.layers.Activation(self.options.activation, name=name)(x)

    def conv(self, x, filters, kernel_size, name, strides=1, stddev=None):
        """Conv2D (no bias before BN) -> BN -> activation; the activation layer carries `name`."""
        x = keras.layers.Conv2D(
            self.depth(filters),
            kernel_size,
            strides=strides,
            padding="same",
            use_bias=not self.batch_norm,
            kernel_initializer=self.initializer(stddev),
            kernel_regularizer=self.regularizer(),
            name=f"{name}_conv",
        )(x)
        return self.normalize_and_activate(x, name)

    def stem(self, x, separable):
        """Conv2d_1a_7x7: separable 7x7/2 with an inner depth multiplier of (at most) 8."""
        name = "Conv2d_1a_7x7"
        stddev = 1.0  # slim's; the baseline gets He (see `initializer`)
        if not separable:
            return self.conv(x, 64, 7, name, strides=2, stddev=stddev)
        filters = self.depth(64)
        x = keras.layers.SeparableConv2D(
            filters,
            7,
            strides=2,
            padding="same",
            # slim: in_channels * inner multiplier <= out channels (8 for 64 filters, RGB).
            depth_multiplier=min(filters // 3, 8),
            use_bias=not self.batch_norm,
            depthwise_initializer=self.initializer(stddev),
            pointwise_initializer=self.initializer(stddev),
            depthwise_regularizer=self.regularizer(),
            pointwise_regularizer=self.regularizer(),
            name=f"{name}_conv",
        )(x)
        return self.normalize_and_activate(x, name)

    def inception_module(self, x, name, widths):
        n1x1, n3x3_reduce, n3x3, nd3x3_reduce, nd3x3, pool, pool_proj = widths
        prefix = f"{name}_Branch"
        branch_0 = self.conv(x, n1x1, 1, f"{prefix}_0_Conv2d_0a_1x1")
        branch_1 = self.conv(x, n3x3_reduce, 1, f"{prefix}_1_Conv2d_0a_1x1", stddev=0.09)
        branch_1 = self.conv(branch_1, n3x3, 3, f"{prefix}_1_Conv2d_0b_3x3")
        branch_2 = self.conv(x, nd3x3_reduce, 1, f"{prefix}_2_Conv2d_0a_1x1", stddev=0.09)
        branch_2 = self.conv(branch_2, nd3x3, 3, f"{prefix}_2_Conv2d_0b_3x3")
        branch_2 = self.conv(branch_2, nd3x3, 3, f"{prefix}_2_Conv2d_0c_3x3")
        if pool == "avg":
            pool_layer = keras.layers.AveragePooling2D(
                3, strides=1, padding="same", name=f"{prefix}_3_AvgPool_0a_3x3"
            )
        else:
            pool_layer = keras.layers.MaxPooling2D(
                3, strides=1, padding="same", name=f"{prefix}_3_MaxPool_0a_3x3"
            )
        branch_3 = self.conv(pool_layer(x), pool_proj, 1, f"{prefix}_3_Conv2d_0b_1x1", stddev=0.1)
        return keras.layers.Concatenate(axis=-1, name=name)(
            [branch_0, branch_1, branch_2, branch_3]
        )

    def reduction_module(self, x, name, widths):
        n3x3_reduce, n3x3, nd3x3_reduce, nd3x3 = widths
        prefix = f"{name}_Branch"
        branch_0 = self.conv(x, n3x3_reduce, 1, f"{prefix}_0_Conv2d_0a_1x1", stddev=0.09)
        branch_0 = self.conv(branch_0, n3x3, 3, f"{prefix}_0_Conv2d_1a_3x3", strides=2)
        branch_1 = self.conv(x, nd3x3_reduce, 1, f"{prefix}_1_Conv2d_0a_1x1", stddev=0.09)
        branch_1 = self.conv(branch_1, nd3x3, 3, f"{prefix}_1_Conv2d_0b_3x3")
        branch_1 = self.conv(branch_1, nd3x3, 3, f"{prefix}_1_Conv2d_1a_3x3", strides=2)
        branch_2 = keras.layers.MaxPooling2D(
            3, strides=2, padding="same", name=f"{prefix}_2_MaxPool_1a_3x3"
        )(x)
        return keras.layers.Concatenate(axis=-1, name=name)([branch_0, branch_1, branch_2])


def _build(options):
    b = _Builder(options)
    inputs = keras.Input(shape=tuple(options.input_shape), name="images")
    x = next(  # the generator builds the layers up to the end point, and no further
        x for end_point, x in _end_points(b, inputs) if end_point == options.final_endpoint
    )

    x = keras.layers.GlobalAveragePooling2D(name="AvgPool_1a")(x)
    if options.dropout_rate > 0:
        x = keras.layers.Dropout(options.dropout_rate, seed=b.seeds(), name="Dropout_1b")(x)
    outputs = keras.layers.Dense(
        int(options.num_classes),
        kernel_initializer=b.initializer(),
        kernel_regularizer=b.regularizer(),
        dtype=_common.logits_dtype(),
        name="Logits",
    )(x)
    name = options.name
    if name is None:
        name = "bn_inception" if options.batch_norm else "inception"
    return keras.Model(inputs, outputs, name=name)


@_common.builder(InceptionOptions)
def build_inception(options):
    """Builds the Figure 5 network, batch-normalized or not; see `bn_inception` and `inception`.

    Keyword arguments: the fields of `InceptionOptions`; the name defaults to "bn_inception"
    or "inception".

    Returns:
        An uncompiled `keras.Model` from images to `(batch, num_classes)` logits (no softmax).
    """
    return _build(options)


def _end_points(b, x):
    """Yields `(end point, tensor)` top to bottom, building each layer only when asked for."""
    use_lrn, paper_widths = b.options.use_lrn, b.options.paper_widths
    x = b.stem(x, b.options.separable_stem)
    yield "Conv2d_1a_7x7", x
    x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="MaxPool_2a_3x3")(x)
    if use_lrn:
        x = LocalResponseNormalization(name="MaxPool_2a_3x3_lrn")(x)
    yield "MaxPool_2a_3x3", x
    x = b.conv(x, 64, 1, "Conv2d_2b_1x1", stddev=0.1)
    yield "Conv2d_2b_1x1", x
    x = b.conv(x, 192, 3, "Conv2d_2c_3x3")
    if use_lrn:
        x = LocalResponseNormalization(name="Conv2d_2c_3x3_lrn")(x)
    yield "Conv2d_2c_3x3", x
    x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="MaxPool_3a_3x3")(x)
    yield "MaxPool_3a_3x3", x
    for module_name, kind, widths in _MODULES:
        if kind == "reduction":
            x = b.reduction_module(x, module_name, widths)
        else:
            if paper_widths and module_name in _PAPER_POOL_PROJ:
                widths = widths[:-1] + (_PAPER_POOL_PROJ[module_name],)
            x = b.inception_module(x, module_name, widths)
        yield module_name, x


@_common.builder(InceptionOptions, fixed={"batch_norm": True}, name="bn_inception")
def bn_inception(options):
    """Builds BN-Inception, the network of the paper's Figure 5, returning logits.

    Read top to bottom like the table: separable 7x7/2 stem (depth multiplier 8), 3x3/2 max
    pool, 1x1 (64) and 3x3 (192) convs, 3x3/2 max pool, modules 3a, 3b, 3c (stride 2: no 1x1
    branch, max-pool pass-through), 4a-4d, 4e (stride 2), 5a, 5b (max pooling in its pool
    branch), global average pooling, then a Dense layer giving LOGITS (no softmax; use
    `from_logits=True`). BN sits right before every nonlinearity and the convs have no bias
    (paper section 3.2). End points carry tf-slim's names (`END_POINTS`; the activation layer
    of a conv unit and the Concatenate of a module), with shapes `END_POINT_SHAPES_224` for a
    224x224 input: 28x28x256, 28x28x320, 14x14x576 (x5), 7x7x1024 (x3).

    Where the paper is silent we follow tf-slim: padding "same" everywhere, widths with
    pool projection 96 in 4c/4d (`paper_widths=True` for the printed 128), per-layer truncated
    normal initializers (1.0 for the stem, 0.09 for 1x1 reductions feeding a 3x3, 0.1 for
    Conv2d_2b_1x1 and pool projections, He elsewhere), L2 decay on kernels only. We keep
    gamma (`bn_scale=True`, slim drops it) so the same net serves the sigmoid variant, use
    Keras's BN defaults (momentum 0.99, epsilon 1e-3; slim uses momentum 0.9997) and pool
    globally so any input from 75x75 up works (for 224 it equals the paper's 7x7 avg pool). No
    auxiliary heads (Figure 5 shows none). The default `weight_decay=4e-5` is slim's, which is
    the BN-x5/x30 value (section 4.2.1: "reduce the L2 weight regularization by 5") if the
    baseline used GoogLeNet's 2e-4, which the paper does not state.

    For BN-Baseline (the paper's Inception with BN added), keep the baseline's switches:
    `bn_inception(dropout_rate=0.4, use_lrn=True, weight_decay=2e-4)`.

    Keyword arguments: the fields of `InceptionOptions` but `batch_norm`.

    Returns:
        An uncompiled `keras.Model`.

    Reference:
        Ioffe & Szegedy, 2015, section 4.2 and Figure 5; tf-slim `nets/inception_v2.py`.

    Example:

    >>> from keras_bn import models
    >>> model = models.get("bn_inception", depth_multiplier=0.25, input_shape=(96, 96, 3),
    ...                    num_classes=10)
    >>> model.output_shape
    (None, 10)
    """
    return _build(options)


@_common.builder(
    InceptionOptions,
    fixed={"batch_norm": True},
    activation="sigmoid",
    name="bn_inception_sigmoid",
)
def bn_inception_sigmoid(options):
    """Builds BN-x5-Sigmoid's network: `bn_inception` with sigmoid instead of ReLU.

    gamma is kept (`bn_scale=True`): "normalizing the inputs of a sigmoid would constrain them
    to the linear regime of the nonlinearity" (paper section 3); gamma and beta undo that.

    Keyword arguments: those of `bn_inception`, with `activation="sigmoid"` and the name
    "bn_inception_sigmoid" by default.

    Returns:
        An uncompiled `keras.Model` giving logits.
    """
    return _build(options)


@_common.builder(
    InceptionOptions,
    fixed={"batch_norm": False},
    weight_decay=2e-4,
    dropout_rate=0.4,
    use_lrn=True,
    name="inception",
)
def inception(options):
    """Builds the paper's baseline "Inception": the Figure 5 topology without BN, returning logits.

    Convs have biases and no normalization; local response normalization follows the stem's
    first max pool and the 3x3 conv (as in GoogLeNet; `use_lrn`), and 40% dropout precedes the
    logits (`dropout_rate`, section 4.2.3: "vs. 40% for the original Inception"). The output is
    LOGITS (no softmax). Everything else is as in `bn_inception`, except the initialization:
    every kernel is drawn from Keras's He (fan-in) initializer, because slim's fixed per-layer
    stddevs (N(0, 1) for the stem, 0.09 and 0.1 for 1x1 convs) rely on BN to undo their scale
    and shrink the signal without it.

    The paper gives neither the baseline's weight decay nor its LRN constants: we default to
    GoogLeNet's (BVLC) L2 2e-4 in slim's convention (so Keras L2(1e-4)) and LRN size 5,
    alpha 1e-4, beta 0.75 (`LocalResponseNormalization`). Auxiliary classifiers are not stated
    and not built. Parameters: 11,178,336 (slim widths, 1000 classes; conv biases replace
    BN's beta and gamma), 11,268,512 with `paper_widths=True`.

    Keyword arguments: the fields of `InceptionOptions` but `batch_norm`. `norm_layer`,
    `bn_momentum`, `bn_epsilon` and `bn_scale` are accepted so that every zoo builder takes the
    same arguments, and unused: the baseline has no normalization layer.

    Returns:
        An uncompiled `keras.Model`.

    Reference:
        Ioffe & Szegedy, 2015, section 4.2; Szegedy et al., 2014 (GoogLeNet).
    """
    return _build(options)
