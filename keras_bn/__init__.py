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

from keras_bn import _native_stderr

# Before TensorFlow loads: its C++ start-up lines stay off the terminal of keras-bn's own command
# line (and only there).
_native_stderr.hide_tensorflow_startup_lines()

from keras_bn.convert import convert_model  # noqa: E402
from keras_bn.folding import AffineChannel, fold_batch_norm  # noqa: E402
from keras_bn.layer import BatchNormalization  # noqa: E402
from keras_bn.population import PopulationStatistics, recompute_population_statistics  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "AffineChannel",
    "BatchNormalization",
    "PopulationStatistics",
    "__version__",
    "convert_model",
    "fold_batch_norm",
    "recompute_population_statistics",
]
