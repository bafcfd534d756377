"""`python -m keras_bn.train`: the trainer's command line (`keras_bn.train.cli.main`).

The trainer runs on TensorFlow (tf.distribute, tf.data, TFDS, absl, matplotlib), which the layer
library does not need: where they are missing, one line says how to install them.
"""

import importlib.util
import sys

TRAINER_PACKAGES = ("tensorflow", "tensorflow_datasets", "absl", "matplotlib")


def run():
    """The console script `keras-bn-train`."""
    missing = [name for name in TRAINER_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        sys.stderr.write(
            f"keras-bn-train: the trainer needs {', '.join(missing)}, which are not installed: "
            "pip install 'keras-bn[train]'\n"
        )
        sys.exit(2)
    from keras_bn.train.cli.main import run as main

    main()


if __name__ == "__main__":
    run()
