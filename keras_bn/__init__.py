"""keras-bn: Batch Normalization (Ioffe & Szegedy, 2015) for Keras 3 on every backend.

Public API:

- :class:`BatchNormalization`: the layer (Alg. 1 in training, population statistics in
  inference, exact n/(n-1), cross-replica moments with ``synchronized=True``).
- :func:`recompute_population_statistics` and the :class:`PopulationStatistics` callback:
  Alg. 2, exact population statistics after training.
- :func:`convert_model`: a copy of an existing model (a ``keras.applications`` net, a saved
  model) in which every ``keras.layers.BatchNormalization`` is ours, weights kept.
- :func:`fold_batch_norm`: an equivalent inference model with BN folded into the preceding
  Conv/Dense kernels (any other BN becomes an :class:`AffineChannel` multiply-add).
"""

import importlib

from keras_bn import _native_stderr

# Before TensorFlow loads: its C++ start-up lines stay off the terminal of keras-bn's own command
# line (and only there).
_native_stderr.hide_tensorflow_startup_lines()

__version__ = "0.1.0"

# Public name -> the module that defines it.
_PUBLIC = {
    "convert_model": "keras_bn.convert",
    "AffineChannel": "keras_bn.folding",
    "fold_batch_norm": "keras_bn.folding",
    "BatchNormalization": "keras_bn.layer",
    "PopulationStatistics": "keras_bn.population",
    "recompute_population_statistics": "keras_bn.population",
}

__all__ = sorted([*_PUBLIC, "__version__"])


def __getattr__(name):
    """Loads a public name on first use (PEP 562): the trainer's command line defers Keras."""
    if name not in _PUBLIC:
        raise AttributeError(f"module 'keras_bn' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted({*globals(), *_PUBLIC})


# `import keras_bn` loads the library at once, as any import would: importing keras_bn.layer
# registers the layer with Keras, so `keras.models.load_model("x.keras")` works right after it.
# The trainer's command line (`keras-bn-train`, `python -m keras_bn.train`) is the one exception:
# `--help` needs no Keras, whose import (TensorFlow's) takes seconds, and a run loads the layer
# through the zoo anyway.
if not _native_stderr.is_trainer_command_line():
    for _name in _PUBLIC:
        __getattr__(_name)
    del _name
