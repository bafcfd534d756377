"""Crop geometry of the 1/10/144-crop evaluation, on images whose pixels hold their coordinates.

Channel 0 of a test image is the row, channel 1 the column and channel 2 the image's index in
the batch, so every pixel of a view says where it came from. Where a view is enlarged, bilinear
interpolation of these linear ramps is exact away from the borders, so the tests compare the
source coordinates there to 0.002 pixels. Antialiased shrinking (the whole square resized to
the crop) samples a triangle kernel at uneven offsets and is off by up to 0.07 pixels on a
ramp, so those views are compared to 0.1 pixels: any misplaced box is off by at least one.
"""

import numpy as np
import pytest
import tensorflow as tf

from keras_bn.train.evaluation import crops

CROP = 28  # the 144-crop sides become 32, 36, 40, 44: whole numbers, easy to check by hand.
CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right", "centre")


def coordinate_images(height, width, batch=2):
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    image = np.stack([rows, cols, np.zeros_like(rows)], axis=-1).astype(np.float32)
    images = np.repeat(image[np.newaxis], batch, axis=0)
    images[..., 2] = np.arange(batch)[:, np.newaxis, np.newaxis]
    return images


def box_origin(corner, top, left, height, width, crop):
    """Hand-written positions of the five crops in a height x width region at (top, left)."""
    far_y, far_x = height - crop, width - crop
    return {
        "top-left": (top, left),
        "top-right": (top, left + far_x),
        "bottom-left": (top + far_y, left),
        "bottom-right": (top + far_y, left + far_x),
        "centre": (top + far_y // 2, left + far_x // 2),
    }[corner]


def source_coordinates(resized, image_shape, top, left, size, crop):
    """Source row and column of every pixel of a crop: (crop,) arrays, and an 'interior' mask.

    A crop pixel i sits at `top + (i + 0.5) * size / crop - 0.5` in the resized image (just
    `top + i` when size == crop), which sits at `(y + 0.5) * H / h - 0.5` in the source.
    """
    out = []
    for origin, new, old in ((top, resized[0], image_shape[0]), (left, resized[1], image_shape[1])):
        i = np.arange(crop)
        in_resized = origin + (i + 0.5) * size / crop - 0.5
        src = (in_resized + 0.5) * old / new - 0.5
        # Away from the resized image's border (clamping) and the box's (antialias support).
        ok = (in_resized >= 1) & (in_resized <= new - 2)
        if size != crop:
            ok &= (i >= 2) & (i <= crop - 3)
        out.append((src, ok))
    return out


def assert_view_from(view, image_shape, resized, top, left, size, mirrored, exact=False):
    view = np.asarray(view)
    if mirrored:
        view = view[:, ::-1]
    (rows, row_ok), (cols, col_ok) = source_coordinates(
        resized, image_shape, top, left, size, view.shape[0]
    )
    if exact:
        np.testing.assert_array_equal(view[..., 0], np.broadcast_to(rows[:, None], view.shape[:2]))
        np.testing.assert_array_equal(view[..., 1], np.broadcast_to(cols[None, :], view.shape[:2]))
        return
    mask = row_ok[:, None] & col_ok[None, :]
    assert mask.sum() > 0.4 * mask.size
    atol = 2e-3 if size == view.shape[0] else 0.1
    for channel, expected in ((0, rows[:, None]), (1, cols[None, :])):
        expected = np.broadcast_to(expected, mask.shape)
        np.testing.assert_allclose(view[..., channel][mask], expected[mask], atol=atol)


@pytest.mark.parametrize("num_crops", [1, 10, 144])
@pytest.mark.parametrize("shape", [(32, 48), (48, 32), (32, 32), (9, 13)])
def test_count_shape_dtype(num_crops, shape):
    images = coordinate_images(*shape, batch=3)
    out = crops.crop_views(images, CROP, num_crops)
    assert out.shape == (3, num_crops, CROP, CROP, 3)
    assert out.dtype == tf.float32
    assert len(crops.views(*shape, CROP, num_crops)) == num_crops
    # Every view of image b comes from image b.
    batch_index = np.broadcast_to(np.arange(3.0)[:, None, None, None], out.shape[:4])
    np.testing.assert_allclose(out[..., 2], batch_index, atol=1e-5)


def test_one_crop_is_the_centre_of_the_image_resized_to_256_over_224():
    # Shorter side 32 = 28 * 256 / 224: no resize, so the crop is copied exactly.
    out = crops.crop_views(coordinate_images(32, 48), CROP, 1)
    assert_view_from(out[0, 0], (32, 48), (32, 48), 2, 10, CROP, False, exact=True)
    # A smaller image is first enlarged to that shorter side, aspect ratio kept.
    out = crops.crop_views(coordinate_images(16, 24), CROP, 1)
    assert_view_from(out[0, 0], (16, 24), (32, 48), 2, 10, CROP, False)


@pytest.mark.parametrize("shape", [(32, 48), (48, 32)])
def test_ten_crops_are_the_four_corners_and_centre_with_mirrors(shape):
    out = crops.crop_views(coordinate_images(*shape), CROP, 10)[0]
    for k, corner in enumerate(CORNERS):
        top, left = box_origin(corner, 0, 0, *shape, CROP)
        for mirrored in (False, True):
            view = out[2 * k + int(mirrored)]
            assert_view_from(view, shape, shape, top, left, CROP, mirrored, exact=True)


def test_mirrors_come_in_pairs():
    for num_crops in (10, 144):
        out = crops.crop_views(coordinate_images(37, 53, batch=1), CROP, num_crops)[0].numpy()
        np.testing.assert_array_equal(out[1::2], out[0::2, :, ::-1])
        # ... and a mirror is never its own original (the images are not symmetric).
        assert not np.array_equal(out[0], out[1])


# The 144-crop scheme on a 32 x 48 landscape image with a 28 crop, written out by hand:
# scale -> (shorter side, resized longer side, offsets of the 3 squares along the longer side).
LANDSCAPE_SCALES = (
    (32, 48, (0, 8, 16)),
    (36, 54, (0, 9, 18)),
    (40, 60, (0, 10, 20)),
    (44, 66, (0, 11, 22)),
)


@pytest.mark.parametrize("portrait", [False, True], ids=["landscape", "portrait"])
def test_144_crops_scales_squares_and_six_crops(portrait):
    shape = (48, 32) if portrait else (32, 48)
    out = crops.crop_views(coordinate_images(*shape, batch=1), CROP, 144)[0]
    k = 0
    for scale, (side, longer, offsets) in enumerate(LANDSCAPE_SCALES):
        resized = (longer, side) if portrait else (side, longer)
        for offset in offsets:  # left/centre/right, or top/centre/bottom for portrait
            sq_top, sq_left = (offset, 0) if portrait else (0, offset)
            boxes = [box_origin(c, sq_top, sq_left, side, side, CROP) + (CROP,) for c in CORNERS]
            boxes.append((sq_top, sq_left, side))  # the whole square, resized to the crop
            for top, left, size in boxes:
                for mirrored in (False, True):
                    exact = scale == 0 and size == CROP  # the first scale is the image itself
                    assert_view_from(out[k], shape, resized, top, left, size, mirrored, exact)
                    k += 1
    assert k == 144


def test_square_image_gives_three_identical_squares():
    out = crops.crop_views(coordinate_images(40, 40, batch=1), CROP, 144)[0].numpy()
    per_square = out.reshape(4, 3, 12, CROP, CROP, 3)
    np.testing.assert_array_equal(per_square[:, 0], per_square[:, 1])
    np.testing.assert_array_equal(per_square[:, 0], per_square[:, 2])


def test_sides_scale_with_the_crop_and_are_googlenets_at_224():
    assert [crops.scaled_side(224, s) for s in crops.MULTI_SCALE_SIDES] == [256, 288, 320, 352]
    assert [crops.scaled_side(CROP, s) for s in crops.MULTI_SCALE_SIDES] == [32, 36, 40, 44]
    views = crops.views(256, 341, 224, 144)
    assert sorted({v.resized for v in views}) == [(256, 341), (288, 384), (320, 426), (352, 469)]
    assert {v.size for v in views} == {224, 256, 288, 320, 352}


def test_uint8_pixels_map_to_unit_range_and_grayscale_gets_a_channel():
    images = np.full((2, 32, 32), 255, np.uint8)
    out = crops.crop_views(images, CROP, 10)
    assert out.shape == (2, 10, CROP, CROP, 1)
    np.testing.assert_allclose(out, 1.0)


@pytest.mark.parametrize(
    "images, num_crops, message",
    [
        (np.zeros((2, 32, 32, 3)), 5, "must be one of 1, 10, 144"),
        (np.zeros((32, 32)), 10, "must be a batch"),
        (np.zeros((1, 2, 32, 32, 3)), 10, "must be a batch"),
    ],
)
def test_bad_arguments_say_what_is_wrong(images, num_crops, message):
    with pytest.raises(ValueError, match=message):
        crops.crop_views(images, CROP, num_crops)


def test_predict_batch_size_does_not_change_the_result():
    images = coordinate_images(32, 48, batch=3) / 48.0

    def linear(x):  # per-view class scores from the mean of each channel
        return tf.reduce_mean(x, axis=[1, 2]) * tf.constant([1.0, -2.0, 3.0])

    fn = crops.probability_fn(linear)
    image_views = crops.crop_views(images, CROP, 144)
    whole = crops.average_over_views(fn, image_views, predict_batch_size=1000)
    chunked = crops.average_over_views(fn, image_views, predict_batch_size=7)
    np.testing.assert_allclose(chunked, whole, rtol=1e-6)
    # The oracle: softmax of every view separately, then the arithmetic mean per image.
    x = (image_views.numpy() - 0.5) * 2.0
    scores = x.mean(axis=(2, 3)) * np.array([1.0, -2.0, 3.0])
    probs = np.exp(scores) / np.exp(scores).sum(-1, keepdims=True)
    np.testing.assert_allclose(whole, probs.mean(axis=1), rtol=1e-5)
