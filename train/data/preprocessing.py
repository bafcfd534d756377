"""Image preprocessing: pixels to model inputs, and Inception-style augmentation.

All randomness is stateless and keyed by `(seed, element index)`, so the n-th training example
is the same tensor whether the run is fresh or resumed, whatever the tf.data parallelism.

Model inputs:
    - flat models (the MLP): pixels / 255 flattened to a vector, optionally binarized at 0.5;
    - convolutional models: pixels scaled to [-1, 1] (tf-slim's Inception convention), resized to
      `image_size` x `image_size`.

Example:

>>> import numpy as np
>>> flat = flat_inputs(np.full((2, 28, 28), 200, np.uint8), binarize=True)
>>> flat.shape, float(flat[0, 0])
(TensorShape([2, 784]), 1.0)
"""

from __future__ import annotations

import functools

import tensorflow as tf

# GoogLeNet's random-size crop (Szegedy et al. 2014; slim's inception_preprocessing).
CROP_AREA = (0.08, 1.0)
CROP_ASPECT = (3.0 / 4.0, 4.0 / 3.0)
EVAL_CENTRAL_FRACTION = 0.875


def flat_inputs(images: tf.Tensor, binarize: bool) -> tf.Tensor:
    """Maps a batch of uint8 images `(N, ...)` to float32 vectors `(N, prod(...))` in [0, 1].

    With `binarize`, pixels are thresholded: pixel / 255 > 0.5 gives 1, else 0.
    """
    x = tf.cast(images, tf.float32) / 255.0
    x = tf.reshape(x, [tf.shape(x)[0], -1])
    if binarize:
        x = tf.cast(x > 0.5, tf.float32)
    return x


def _with_channels(image: tf.Tensor, batched: bool) -> tf.Tensor:
    """Adds a channel axis to grayscale images stored without one (MNIST's (28, 28))."""
    if image.shape.rank == (3 if batched else 2):
        return image[..., tf.newaxis]
    return image


def scale_to_unit_range(image: tf.Tensor) -> tf.Tensor:
    """Maps float pixels in [0, 1] to [-1, 1]."""
    return (image - 0.5) * 2.0


def eval_image(
    image: tf.Tensor, image_size: int, central_crop: bool, batched: bool = False
) -> tf.Tensor:
    """Evaluation view of one image `(H, W[, C])` or a batch `(N, H, W[, C])`.

    Args:
        image: uint8 pixels.
        image_size: output side.
        central_crop: crop the central 87.5% first (Inception evaluation), else resize only.
        batched: whether `image` is a batch.

    Returns:
        float32 `(..., image_size, image_size, C)` in [-1, 1].
    """
    image = _with_channels(tf.convert_to_tensor(image), batched)
    image = tf.image.convert_image_dtype(image, tf.float32)
    if central_crop:
        image = tf.image.central_crop(image, EVAL_CENTRAL_FRACTION)
    image = tf.image.resize(image, [image_size, image_size], antialias=True)
    return scale_to_unit_range(tf.clip_by_value(image, 0.0, 1.0))


def _distort_color(image: tf.Tensor, seed: tf.Tensor, distortion: str) -> tf.Tensor:
    """Photometric distortion in a random order (slim's distort_color), on [0, 1] floats."""
    if distortion == "none":
        return image
    seeds = tf.random.experimental.stateless_split(seed, num=5)

    def brightness(x):
        return tf.image.stateless_random_brightness(x, 32.0 / 255.0, seeds[0])

    def saturation(x):
        return tf.image.stateless_random_saturation(x, 0.5, 1.5, seeds[1])

    def hue(x):
        return tf.image.stateless_random_hue(x, 0.2, seeds[2])

    def contrast(x):
        return tf.image.stateless_random_contrast(x, 0.5, 1.5, seeds[3])

    if image.shape[-1] != 3:  # saturation and hue need RGB
        orders = [[brightness, contrast], [contrast, brightness]]
    elif distortion == "reduced":
        orders = [[brightness, saturation], [saturation, brightness]]
    else:
        orders = [
            [brightness, saturation, hue, contrast],
            [saturation, brightness, contrast, hue],
            [contrast, hue, brightness, saturation],
            [hue, saturation, contrast, brightness],
        ]

    def branch(ops):
        return lambda: functools.reduce(lambda x, op: op(x), ops, image)

    which = tf.random.stateless_uniform([], seeds[4], 0, len(orders), dtype=tf.int32)
    image = tf.switch_case(which, [branch(ops) for ops in orders])
    return tf.clip_by_value(image, 0.0, 1.0)


def inception_train_image(
    image: tf.Tensor, seed: tf.Tensor, image_size: int, distortion: str
) -> tf.Tensor:
    """Inception-style training view of one uint8 image `(H, W[, C])`.

    Random crop covering 8-100% of the area with aspect ratio 3/4-4/3, resize to `image_size`,
    random horizontal flip, photometric distortion (`full`, `reduced` or `none`), scale to
    [-1, 1].

    Args:
        image: uint8 pixels of one image.
        seed: int32/int64 tensor of shape [2]; the same seed gives the same view.
        image_size: output side.
        distortion: `full`, `reduced` or `none`.
    """
    image = _with_channels(tf.convert_to_tensor(image), batched=False)
    crop_seed, flip_seed, color_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, num=3)
    )
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image),
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=crop_seed,
        min_object_covered=0.1,
        aspect_ratio_range=CROP_ASPECT,
        area_range=CROP_AREA,
        max_attempts=100,
        use_image_if_no_bounding_boxes=True,
    )
    image = tf.slice(image, begin, size)
    image = tf.image.convert_image_dtype(image, tf.float32)
    image = tf.image.resize(image, [image_size, image_size])
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    image = _distort_color(image, color_seed, distortion)
    return scale_to_unit_range(tf.clip_by_value(image, 0.0, 1.0))
