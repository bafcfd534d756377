"""keras-bn: Batch Normalization (Ioffe & Szegedy, 2015) for Keras 3 on TensorFlow."""

from keras_bn.layer import BatchNormalization

__version__ = "0.1.0"

__all__ = [
    "BatchNormalization",
    "__version__",
]
