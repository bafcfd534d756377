"""SavedModel export with a `serve` signature that takes raw images.

The exported function holds the evaluation preprocessing (flatten / scale / binarize for the MLP;
central crop, resize and scaling to [-1, 1] for convolutional models), so a client sends the
dataset's own uint8 pixels and gets logits, probabilities and the predicted class back.

Example (after training):

```python
export_saved_model(model, data, "/tmp/export")
served = tf.saved_model.load("/tmp/export")
served.signatures["serve"](images=tf.zeros([1, 28, 28], tf.uint8))["classes"]
```

`saved_model_cli show --dir /tmp/export --all` lists the signature.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import keras
import numpy as np
import tensorflow as tf

from keras_bn.train.data.pipeline import Data


def serving_model(model: keras.Model, fold_bn: bool) -> keras.Model:
    """Returns the model to export: `model` itself or its BN-folded copy."""
    if not fold_bn:
        return model
    from keras_bn.folding import fold_batch_norm

    return fold_batch_norm(model)


def export_saved_model(model: keras.Model, data: Data, export_dir: str | os.PathLike) -> str:
    """Writes `model` with raw-image preprocessing as a SavedModel, atomically.

    The `serve` signature takes `images`: uint8 of shape `(batch,) + data.spec.raw_shape`, and
    returns `logits` (float32), `probabilities` (softmax) and `classes` (int64 argmax).
    An existing `export_dir` is replaced only once the new export is complete.

    Args:
        model: the trained model (inference mode is used).
        data: the data pipelines; their evaluation preprocessing goes into the signature.
        export_dir: output folder.

    Returns:
        The export folder.
    """
    export_dir = pathlib.Path(export_dir)
    export_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = export_dir.with_name(f".{export_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)

    archive = keras.export.ExportArchive()
    archive.track(model)
    signature = tf.TensorSpec((None, *data.spec.raw_shape), tf.uint8, name="images")

    def serve(images):
        logits = tf.cast(model(data.preprocess_batch(images), training=False), tf.float32)
        return {
            "logits": logits,
            "probabilities": tf.nn.softmax(logits),
            "classes": tf.argmax(logits, axis=-1),
        }

    archive.add_endpoint("serve", serve, input_signature=[signature])
    archive.write_out(str(tmp), verbose=False)
    old = export_dir.with_name(f".{export_dir.name}.old-{os.getpid()}")
    if export_dir.exists():
        os.replace(export_dir, old)
    os.replace(tmp, export_dir)
    shutil.rmtree(old, ignore_errors=True)
    return str(export_dir)


def check_not_anothers(export_dir: str | os.PathLike, summary_path: pathlib.Path) -> None:
    """Refuses an `export_dir` holding something but this run's own export (`--model_dir`'s rule).

    Args:
        export_dir: the `--export_dir`.
        summary_path: the run's summary.json, which names its export once it is written.

    Raises:
        ValueError: if the folder is not empty and the run's summary names another export.
    """
    path = pathlib.Path(export_dir)
    if not path.is_dir() or not any(path.iterdir()):
        return
    ours = None
    if summary_path.is_file():
        ours = json.loads(summary_path.read_text()).get("export_dir")
    if ours is None or pathlib.Path(ours).resolve() != path.resolve():
        raise ValueError(
            f"--export_dir={export_dir} already holds something that is not this run's export; "
            "choose a new or empty folder, or move that one away."
        )


def max_abs_difference(a: keras.Model, b: keras.Model, x: tf.Tensor) -> float:
    """Largest absolute difference of two models' inference outputs on `x` (a fold check)."""
    ya = np.asarray(a(x, training=False), np.float64)
    yb = np.asarray(b(x, training=False), np.float64)
    return float(np.max(np.abs(ya - yb)))
