"""Multi-crop evaluation (paper section 4.3): 1, 10 or 144 views per image, softmax averaged.

The paper's best single-network and ensemble results average the class probabilities of 144
crops per image, "following GoogLeNet" (Szegedy et al. 2014). Three schemes, for a model that
takes `crop_size` x `crop_size` inputs:

- **1 crop**: the image is resized (aspect kept) so that its shorter side is
  `scaled_side(crop_size, 256)` (256 for a 224 crop), then the central `crop_size` square is
  taken. For a square image that is the region of the trainer's central 87.5% view.
- **10 crops**: the paper does not define them; we use the standard ones (Krizhevsky et al.
  2012): on the same resized image, the 4 corner crops and the centre crop, each with its
  mirror image.
- **144 crops**: GoogLeNet's scheme. The image is resized to 4 scales (shorter side 256, 288,
  320, 352 for a 224 crop); at each scale 3 squares of the shorter side are taken (left, centre,
  right for a landscape image; top, centre, bottom for a portrait one; a square image gives the
  same square three times); from each square 6 crops: the 4 corners and the centre at
  `crop_size`, and the whole square resized to `crop_size`; each crop also mirrored:
  4 * 3 * 6 * 2 = 144.

Scale rule: every side is given for a 224 crop and scaled with the crop, `scaled_side(crop, s) =
round(crop * s / 224)`, so small models (the 75-pixel miniature) see the same relative views as
the paper's. Centre offsets round down. Resizing is bilinear with antialiasing (as the
trainer's evaluation view); a view that needs no resize is copied exactly.

View order: scale, then square, then crop (top-left, top-right, bottom-left, bottom-right,
centre, whole square), and views come in pairs: view `2i + 1` is view `2i` mirrored
left-right.

Example:

>>> import numpy as np
>>> len(views(height=96, width=128, crop_size=75, num_crops=144))
144
>>> crop_views(np.zeros((2, 80, 100, 3), np.uint8), crop_size=75, num_crops=10).shape
TensorShape([2, 10, 75, 75, 3])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import keras
import tensorflow as tf

from keras_bn.train.data import preprocessing

NUM_CROPS = (1, 10, 144)
# GoogLeNet's sides for a 224 crop: 256 for 1 and 10 crops; the 4 scales of the 144-crop scheme.
REFERENCE_CROP = 224
SINGLE_SCALE_SIDE = 256
MULTI_SCALE_SIDES = (256, 288, 320, 352)


@dataclasses.dataclass(frozen=True)
class View:
    """One view of an image: resize, take a square box, resize it to the crop size, mirror.

    Args:
        resized: `(height, width)` the whole image is resized to first (aspect kept).
        top: row of the box in the resized image.
        left: column of the box in the resized image.
        size: side of the box; resized to the crop size when it differs.
        mirrored: whether the crop is flipped left-right.
    """

    resized: tuple[int, int]
    top: int
    left: int
    size: int
    mirrored: bool


def scaled_side(crop_size: int, side_at_224: int) -> int:
    """The shorter side for a `crop_size` crop that `side_at_224` is for a 224 crop.

    Example:

    >>> scaled_side(224, 288), scaled_side(75, 256), scaled_side(28, 352)
    (288, 86, 44)
    """
    return int(round(crop_size * side_at_224 / REFERENCE_CROP))


def _resized_shape(height: int, width: int, side: int) -> tuple[int, int]:
    """Shape with the shorter side `side` and the aspect ratio of `(height, width)` kept."""
    shorter = min(height, width)
    return (
        side if height == shorter else int(round(height * side / shorter)),
        side if width == shorter else int(round(width * side / shorter)),
    )


def _five_boxes(top: int, left: int, height: int, width: int, crop: int):
    """(top, left) of the 4 corner crops and the centre crop of a region."""
    bottom, right = top + height - crop, left + width - crop
    centre = (top + (height - crop) // 2, left + (width - crop) // 2)
    return [(top, left), (top, right), (bottom, left), (bottom, right), centre]


def _with_mirrors(unmirrored):
    return tuple(
        dataclasses.replace(view, mirrored=mirrored)
        for view in unmirrored
        for mirrored in (False, True)
    )


def views(height: int, width: int, crop_size: int, num_crops: int) -> tuple[View, ...]:
    """The `num_crops` views of a `height` x `width` image, in the order the module describes.

    Args:
        height: image height in pixels.
        width: image width in pixels.
        crop_size: side of the model's square input.
        num_crops: 1, 10 or 144.

    Returns:
        A tuple of `num_crops` `View`s.

    Raises:
        ValueError: for another `num_crops`, or a non-positive size.

    Example:

    >>> views(16, 20, crop_size=14, num_crops=1)
    (View(resized=(16, 20), top=1, left=3, size=14, mirrored=False),)
    """
    if num_crops not in NUM_CROPS:
        raise ValueError(
            f"`num_crops` must be one of {', '.join(map(str, NUM_CROPS))}; received {num_crops!r}."
        )
    for label, value in (("height", height), ("width", width), ("crop_size", crop_size)):
        if int(value) < 1:
            raise ValueError(f"`{label}` must be a positive int; received {value!r}.")
    if num_crops in (1, 10):
        shape = _resized_shape(height, width, scaled_side(crop_size, SINGLE_SCALE_SIDE))
        boxes = _five_boxes(0, 0, *shape, crop_size)
        if num_crops == 1:
            return (View(shape, *boxes[-1], crop_size, False),)
        return _with_mirrors(View(shape, top, left, crop_size, False) for top, left in boxes)
    unmirrored = []
    for side_at_224 in MULTI_SCALE_SIDES:
        side = scaled_side(crop_size, side_at_224)
        shape = _resized_shape(height, width, side)
        along = (shape[1] - side) if shape[1] >= shape[0] else (shape[0] - side)
        for offset in (0, along // 2, along):
            top, left = (0, offset) if shape[1] >= shape[0] else (offset, 0)
            for box in _five_boxes(top, left, side, side, crop_size):
                unmirrored.append(View(shape, *box, crop_size, False))
            unmirrored.append(View(shape, top, left, side, False))
    return _with_mirrors(unmirrored)


def crop_views(images, crop_size: int, num_crops: int) -> tf.Tensor:
    """Every view of a batch of images, as one tensor.

    Memory is `B * num_crops * crop_size**2 * C` floats: evaluate in batches small enough for
    that (144 crops of 32 grayscale images at 75x75 take 104 MB).

    Args:
        images: `(B, H, W, C)` or grayscale `(B, H, W)`, of a static height and width (eager
            tensors and NumPy arrays have one). Integer pixels are mapped to [0, 1] floats
            (`tf.image.convert_image_dtype`); float pixels keep their values.
        crop_size: side of the model's square input.
        num_crops: 1, 10 or 144.

    Returns:
        float32 `(B, num_crops, crop_size, crop_size, C)`, views in the order of `views`.

    Raises:
        ValueError: for images of another rank or without a static height and width, or
            an invalid `num_crops`.

    Example:

    >>> image = np.arange(16 * 20, dtype=np.float32).reshape(1, 16, 20)
    >>> out = crop_views(image, crop_size=14, num_crops=10)
    >>> out.shape  # 5 crops and their mirrors
    TensorShape([1, 10, 14, 14, 1])
    >>> [float(out[0, k, 0, 0, 0]) for k in (0, 2, 4)]  # top-left pixel: x + 20 * y
    [0.0, 6.0, 40.0]
    """
    images = tf.convert_to_tensor(images)
    if images.shape.rank == 3:
        images = images[..., tf.newaxis]
    if images.shape.rank != 4 or images.shape[1] is None or images.shape[2] is None:
        raise ValueError(
            "`images` must be a batch (B, H, W, C) or (B, H, W) with a static height and "
            f"width; received shape {images.shape}."
        )
    images = tf.image.convert_image_dtype(images, tf.float32)
    height, width = images.shape[1], images.shape[2]
    resized = {}
    out = []
    for view in views(height, width, crop_size, num_crops):
        if view.resized not in resized:
            resized[view.resized] = (
                images
                if view.resized == (height, width)
                else tf.image.resize(images, view.resized, antialias=True)
            )
        x = resized[view.resized][
            :, view.top : view.top + view.size, view.left : view.left + view.size, :
        ]
        if view.size != crop_size:
            x = tf.image.resize(x, [crop_size, crop_size], antialias=True)
        out.append(tf.reverse(x, axis=[2]) if view.mirrored else x)
    return tf.stack(out, axis=1)


def probability_fn(model, from_logits: bool = True) -> Callable[[tf.Tensor], tf.Tensor]:
    """Wraps a model as a compiled function from model inputs to float32 class probabilities.

    Args:
        model: a `keras.Model` (called with `training=False`) or any TensorFlow-traceable
            callable from a batch of inputs to `(batch, classes)` outputs.
        from_logits: the outputs are logits (the zoo's models), so a softmax is applied.
            False: they are probabilities already.

    Example:

    >>> fn = probability_fn(lambda x: tf.reduce_mean(x, axis=[1, 2]))
    >>> np.round(fn(tf.ones([1, 4, 4, 2])).numpy(), 2)
    array([[0.5, 0.5]], dtype=float32)
    """

    def call(x):
        outputs = model(x, training=False) if isinstance(model, keras.Model) else model(x)
        outputs = tf.cast(outputs, tf.float32)
        return tf.nn.softmax(outputs) if from_logits else outputs

    return tf.function(call, reduce_retracing=True)


def average_over_views(
    probabilities: Callable[[tf.Tensor], tf.Tensor],
    image_views: tf.Tensor,
    preprocess: Callable[[tf.Tensor], tf.Tensor] = preprocessing.scale_to_unit_range,
    predict_batch_size: int = 256,
) -> tf.Tensor:
    """Class probabilities of each image: the arithmetic mean over its views.

    Args:
        probabilities: from `probability_fn`.
        image_views: `(B, K, h, w, C)` from `crop_views`.
        preprocess: maps the views' [0, 1] pixels to model inputs (default: [-1, 1], the
            trainer's convention).
        predict_batch_size: most views per model call (bounds the activations' memory).

    Returns:
        float32 `(B, classes)`.

    Example:

    >>> fn = probability_fn(lambda x: tf.reduce_mean(x, axis=[1, 2]))
    >>> image_views = tf.stack([tf.zeros([1, 2, 2, 2]), tf.ones([1, 2, 2, 2])], axis=1)
    >>> np.round(average_over_views(fn, image_views, preprocess=lambda x: x).numpy(), 2)
    array([[0.5, 0.5]], dtype=float32)
    """
    if int(predict_batch_size) < 1:
        raise ValueError(
            f"`predict_batch_size` must be a positive int; received {predict_batch_size!r}."
        )
    shape = tf.shape(image_views)
    flat = tf.reshape(image_views, tf.concat([[-1], shape[2:]], axis=0))
    outputs = [
        probabilities(preprocess(flat[start : start + predict_batch_size]))
        for start in range(0, int(flat.shape[0]), int(predict_batch_size))
    ]
    per_view = tf.reshape(tf.concat(outputs, axis=0), [shape[0], shape[1], -1])
    return tf.reduce_mean(per_view, axis=1)
