"""Ensemble evaluation (paper section 4.3): the mean of several models' class probabilities.

The paper's ensemble "is based on the arithmetic averaging of class probabilities predicted by
the constituent networks", each evaluated on the same multi-crop views (`crops`).
Every view's probabilities are averaged over the models, then over the views of an image:
with equal view counts that is the mean over all (model, view) pairs, the same as averaging each
model over the views first. So an ensemble is evaluated as one model (`mean_probability_fn`) by
the crops module's own functions; the views are cut once per batch and shared by the models.

Example:

>>> inputs = keras.Input((14, 14, 1))
>>> flat = keras.layers.Flatten()(inputs)
>>> members = [keras.Model(inputs, keras.layers.Dense(3)(flat)) for _ in range(2)]
>>> images = np.random.default_rng(0).integers(0, 256, (4, 16, 20), np.uint8)
>>> accuracy = ensemble_accuracy(members, [(images, [0, 1, 2, 0])], crop_size=14, num_crops=10)
>>> 0.0 <= accuracy <= 1.0
True
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import tensorflow as tf

from keras_bn.train.data import preprocessing
from keras_bn.train.evaluation import crops


def mean_probability_fn(
    probabilities: Sequence[Callable[[tf.Tensor], tf.Tensor]],
) -> Callable[[tf.Tensor], tf.Tensor]:
    """The ensemble as one model: the mean of its members' class probabilities on each input.

    Args:
        probabilities: one `crops.probability_fn` per model.

    Raises:
        ValueError: if there is no model, or (when called) the models disagree on the number
            of classes.
    """
    if not probabilities:
        raise ValueError("An ensemble needs at least one model; received none.")

    def mean(x):
        outputs = [fn(x) for fn in probabilities]
        classes = sorted({str(p.shape[-1]) for p in outputs})
        if len(classes) != 1:
            raise ValueError(
                f"The ensemble's models predict different numbers of classes ({classes}); every "
                "member must have the same output layer."
            )
        return tf.reduce_mean(tf.stack(outputs, axis=0), axis=0)

    return mean


def ensemble_probabilities(
    probabilities: Sequence[Callable[[tf.Tensor], tf.Tensor]],
    images,
    crop_size: int,
    num_crops: int,
    preprocess: Callable[[tf.Tensor], tf.Tensor] = preprocessing.scale_to_unit_range,
    predict_batch_size: int = 256,
) -> tf.Tensor:
    """Class probabilities of each image: the mean over models of their multi-crop means.

    Args:
        probabilities: one `crops.probability_fn` per model.
        images: a batch, as `crops.crop_views` takes it.
        crop_size: side of the models' square input (the same for every model).
        num_crops: 1, 10 or 144.
        preprocess: see `crops.average_over_views`.
        predict_batch_size: see `crops.average_over_views`.

    Returns:
        float32 `(B, classes)`.

    Raises:
        ValueError: if there is no model, or the models disagree on the number of classes.

    Example:

    >>> a = crops.probability_fn(lambda x: tf.constant([[0.9, 0.1]]), from_logits=False)
    >>> b = crops.probability_fn(lambda x: tf.constant([[0.2, 0.8]]), from_logits=False)
    >>> np.round(ensemble_probabilities([a, b], np.zeros((1, 8, 8)), 7, 1).numpy(), 2)
    array([[0.55, 0.45]], dtype=float32)
    """
    return crops.average_over_views(
        mean_probability_fn(probabilities),
        crops.crop_views(images, crop_size, num_crops),
        preprocess,
        predict_batch_size,
    )


def ensemble_accuracy(
    models: Sequence,
    batches: Iterable,
    crop_size: int,
    num_crops: int,
    *,
    from_logits: bool = True,
    **options,
) -> float:
    """Top-1 accuracy of the ensemble of `models` on `num_crops` views per image.

    The ensemble is one model to `crops.crop_accuracy` (`mean_probability_fn`), so a
    one-model ensemble gives exactly `crops.crop_accuracy` of that model.

    Args:
        models: the members; each as `crops.probability_fn` takes it.
        batches, crop_size, num_crops: as for `crops.crop_accuracy`.
        from_logits: the models output logits (the zoo's do).
        **options: `preprocess`, `predict_batch_size`, `progress` of `crops.crop_accuracy`.

    Reference:
        Ioffe & Szegedy, 2015, section 4.3 (6 networks, 144 crops, 4.9% top-5 error).

    Example: see the module docstring.
    """
    mean = mean_probability_fn([crops.probability_fn(model, from_logits) for model in models])
    return crops.crop_accuracy(mean, batches, crop_size, num_crops, from_logits=False, **options)
