"""Small helpers shared by the zoo builders (private)."""

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
