"""What the zoo builders share (private): their common options, and how a builder is made.

Each model family declares its keyword arguments once, as the fields of an options dataclass
(its type, default, check and documentation in one place); `builder` turns a function of those
options into the public builder, whose `inspect.signature` lists the real keyword arguments (the
trainer's `--model_kwargs` is checked against it), with a preset's own defaults.
"""

import dataclasses
import difflib
import functools
import inspect
from collections.abc import Callable

import keras


def default_norm_layer():
    """Returns the zoo's default normalization layer class: `keras_bn.BatchNormalization`."""
    # Imported lazily so that importing the zoo never fails half-way while keras_bn loads.
    import keras_bn

    return keras_bn.BatchNormalization


def resolve_norm_layer(norm_layer):
    """Returns `norm_layer`, or the default layer class when it is None.

    Args:
        norm_layer: None, or a callable taking Keras BatchNormalization keyword arguments
            (`axis`, `momentum`, `epsilon`, `center`, `scale`, `name`) and returning a layer.

    Returns:
        The callable to build normalization layers with.
    """
    if norm_layer is None:
        return default_norm_layer()
    if not callable(norm_layer):
        raise ValueError(
            f"`norm_layer` must be a layer class or a callable returning a layer, such as "
            f"keras.layers.BatchNormalization; received {norm_layer!r}."
        )
    return norm_layer


class SeedStream:
    """Hands out distinct, reproducible integer seeds for the layers of one model.

    With `seed=None` every call returns None, so initializers draw from Keras's global RNG.

    Args:
        seed: None or an int.
    """

    def __init__(self, seed):
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"`seed` must be None or an int; received {seed!r}.")
        self._seed = seed
        self._count = 0

    def __call__(self):
        if self._seed is None:
            return None
        self._count += 1
        # Keep the sum a positive 31-bit int (TF's stateless seeds are int32).
        return (self._seed * 1000003 + self._count) % (2**31 - 1)


def logits_dtype():
    """Returns "float32" under a mixed-precision policy (stable loss), else None (the policy's)."""
    policy = keras.config.dtype_policy()
    if policy.compute_dtype != policy.variable_dtype:
        return "float32"
    return None


def check_activation(activation):
    """Validates an activation name and returns it unchanged."""
    if not isinstance(activation, str):
        raise ValueError(
            f"`activation` must be a string such as 'relu' or 'sigmoid'; received {activation!r}."
        )
    try:
        keras.activations.get(activation)
    except ValueError as error:
        raise ValueError(
            f"Unknown `activation` {activation!r}; use 'relu' (the paper's nets) or 'sigmoid' "
            f"(BN-x5-Sigmoid)."
        ) from error
    return activation


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelOptions:
    """The keyword arguments every zoo builder takes; each model's options add their own.

    Attributes:
        batch_norm: bool, build the net with a normalization layer before every hidden
            nonlinearity (True) or without (False).
        norm_layer: layer class or callable taking Keras BatchNormalization keyword arguments
            (`axis, momentum, epsilon, center, scale, name`); None means
            `keras_bn.BatchNormalization`. Pass `keras.layers.BatchNormalization` to build the
            same net with Keras's layer. Unused when `batch_norm=False`.
        num_classes: int, number of logits.
        input_shape: shape of one example, channels last.
        seed: None or int; an int makes the initial weights reproducible.
        bn_momentum: passed to the norm layer as `momentum`.
        bn_epsilon: passed to the norm layer as `epsilon`.
        name: model name; None gives the builder's default.
    """

    batch_norm: bool = True
    norm_layer: Callable[..., keras.layers.Layer] | None = None
    num_classes: int = 10
    input_shape: tuple[int | None, ...] = ()
    seed: int | None = None
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3
    name: str | None = None

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type is bool and not isinstance(value, bool):
                raise ValueError(f"`{field.name}` must be True or False; received {value!r}.")
        if isinstance(self.num_classes, bool) or int(self.num_classes) < 1:
            raise ValueError(
                f"`num_classes` must be a positive int; received {self.num_classes!r}."
            )
        if self.batch_norm:
            resolve_norm_layer(self.norm_layer)

    def normalize(self, x, name, scale=True):
        """`norm_layer(...)(x)` with these options (named `name`), or `x` without BN."""
        if not self.batch_norm:
            return x
        return resolve_norm_layer(self.norm_layer)(
            axis=-1,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            center=True,
            scale=scale,
            name=name,
        )(x)


def builder(options_type, *, fixed=None, **defaults):
    """Decorates `build(options) -> keras.Model` into the public `build(**options)`.

    Args:
        options_type: the `ModelOptions` dataclass whose fields are the keyword arguments.
        fixed: field -> value this builder always uses; not one of its arguments.
        **defaults: field -> this builder's own default, in place of the dataclass's.

    Returns:
        A decorator. The builder it makes has the signature of the fields (keyword-only, `name`
        last) and raises TypeError for an unknown argument, naming the closest known one.
    """
    fixed = dict(fixed or {})
    fields = [f for f in dataclasses.fields(options_type) if f.name not in fixed]
    fields.sort(key=lambda f: f.name == "name")
    signature = inspect.Signature(
        [
            inspect.Parameter(
                f.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=defaults.get(f.name, f.default),
                annotation=f.type,
            )
            for f in fields
        ],
        return_annotation=keras.Model,
    )

    def decorate(build):
        @functools.wraps(build)
        def public_builder(**kwargs):
            for key in kwargs:
                if key not in signature.parameters:
                    close = difflib.get_close_matches(key, signature.parameters, n=1)
                    hint = f"; did you mean {close[0]!r}?" if close else "."
                    raise TypeError(
                        f"{build.__name__}() got an unexpected keyword argument {key!r}{hint}"
                    )
            bound = signature.bind(**kwargs)
            bound.apply_defaults()
            return build(options_type(**bound.arguments, **fixed))

        public_builder.__signature__ = signature
        return public_builder

    return decorate
