"""Trainer input pipelines: packaged MNIST, TFDS (mocked, never downloading), synthetic."""

import hashlib

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from keras_bn.train.config import settings as config_lib
from keras_bn.train.data import pipeline as data_lib
from keras_bn.train.data import preprocessing
from keras_bn.train.data.mnist_files import expected_sha256, load_mnist

# The canonical MNIST files (uncompressed IDX), independent of the SHA256SUMS we ship.
CANONICAL_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}


def make(dataset="mnist", **overrides):
    return data_lib.make_data(config_lib.resolve(None, {"dataset": dataset, **overrides}))


def batches(ds, n):
    return [tuple(t.numpy() for t in batch) for batch in ds.take(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)


# Packaged MNIST ---------------------------------------------------------------------------


def test_packaged_mnist_matches_the_canonical_hashes():
    assert expected_sha256() == CANONICAL_SHA256
    images, labels = load_mnist("test")
    header = (2051).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (10000, 28, 28))
    digest = hashlib.sha256(header + images.tobytes()).hexdigest()
    assert digest == CANONICAL_SHA256["t10k-images-idx3-ubyte"]
    assert np.bincount(labels).tolist()[:3] == [980, 1135, 1032]


def test_mnist_pipeline_shapes_binarization_and_epoch_permutation():
    data = make(binarize=True, batch_size=500, train_steps=240)
    assert data.spec.input_shape == (784,) and data.spec.num_classes == 10
    assert data.spec.num_train_examples == 60000 and data.spec.raw_shape == (28, 28)
    train = batches(data.train_dataset(), 120)  # exactly one epoch
    x, y = train[0]
    assert x.shape == (500, 784) and x.dtype == np.float32 and y.dtype == np.int32
    assert set(np.unique(x)) <= {0.0, 1.0}
    # One epoch visits every example once: the label histogram equals the split's.
    epoch_labels = np.concatenate([y for _, y in train])
    np.testing.assert_array_equal(np.bincount(epoch_labels), np.bincount(load_mnist("train")[1]))
    # The next epoch is a different order.
    second = batches(data.train_dataset(start_step=120), 1)[0]
    assert not np.array_equal(second[1], train[0][1])
    eval_x, eval_y = next(iter(data.eval_dataset()))
    assert eval_x.shape == (500, 784)


def test_mnist_stream_resumes_at_any_step_with_the_same_batches():
    data = make(batch_size=70, train_steps=2000)
    reference = batches(data.train_dataset(), 12)
    assert_same_batches(batches(data.train_dataset(start_step=5), 7), reference[5:])
    # Across an epoch boundary (60000 / 70 is not whole).
    boundary = 60000 // 70
    around = batches(data.train_dataset(start_step=boundary - 1), 3)
    assert_same_batches(batches(data.train_dataset(start_step=boundary), 2), around[1:])
    # A different seed is a different order.
    other = make(batch_size=70, train_steps=2000, seed=1)
    assert not np.array_equal(batches(other.train_dataset(), 1)[0][1], reference[0][1])


def test_in_memory_indices_are_the_tf_data_stream_of_shuffled_epochs():
    # The trainer's in-memory path gathers `train_indices` rows from `arrays("train")`; they
    # must be the very batches of `train_dataset`, for any start step and across epochs.
    data = make(batch_size=70, train_steps=2000, binarize=True)
    assert data.in_memory
    images, labels = data.arrays("train")
    boundary = 60000 // 70  # 60000 is not a multiple of 70: a batch straddles two epochs
    for start in (0, 5, boundary - 1):
        indices = data.train_indices(start, 3)
        assert indices.shape == (3, 70) and indices.dtype == np.int64
        expected = batches(data.train_dataset(start_step=start), 3)
        gathered = [
            (data.preprocess_batch(tf.gather(images, i)).numpy(), tf.gather(labels, i).numpy())
            for i in indices
        ]
        assert_same_batches(gathered, expected)
    epoch = data.train_indices(0, 2000, batch_size=60).reshape(-1)  # two epochs of 60,000
    assert sorted(epoch[:60000]) == list(range(60000)) == sorted(epoch[60000:])
    assert not np.array_equal(epoch[:60000], epoch[60000:])
    np.testing.assert_array_equal(data.train_indices(3, 2), make(batch_size=70).train_indices(3, 2))
    assert not np.array_equal(
        data.train_indices(0, 1), make(batch_size=70, seed=1).train_indices(0, 1)
    )
    assert not make(augment="inception").in_memory and not make("synthetic").in_memory


def test_mnist_for_a_convolutional_model_is_resized_and_scaled():
    data = make(model="bn_inception", batch_size=4, train_steps=2)
    assert data.spec.input_shape == (75, 75, 1)
    x, _ = batches(data.train_dataset(), 1)[0]
    assert x.shape == (4, 75, 75, 1)
    assert x.min() >= -1.0 and x.max() <= 1.0 and x.min() < 0 < x.max()


# TFDS ---------------------------------------------------------------------------------------


def test_tfds_mnist_mocked_shapes_and_exact_resume(tmp_path):
    with tfds.testing.mock_data(num_examples=20):
        data = make("tfds:mnist", data_dir=str(tmp_path), batch_size=6, train_steps=10)
        assert data.spec.input_shape == (784,) and data.spec.num_classes == 10
        assert data.spec.num_train_examples == 20
        reference = batches(data.train_dataset(), 10)  # three epochs of 20
        assert reference[0][0].shape == (6, 784)
        for start in (1, 3, 7):  # inside an epoch, at an epoch boundary (3*6=18), later
            assert_same_batches(
                batches(data.train_dataset(start_step=start), 2), reference[start : start + 2]
            )
        eval_x, eval_y = next(iter(data.eval_dataset()))
        assert eval_x.shape[1:] == (784,) and eval_y.dtype == np.int32


def test_tfds_imagenet_mocked_gets_inception_augmentation(tmp_path):
    with tfds.testing.mock_data(num_examples=8):
        data = make(
            "tfds:imagenet2012",
            model="bn_inception",
            data_dir=str(tmp_path),
            image_size=80,
            batch_size=4,
            train_steps=2,
            distortion="full",
        )
        assert data.spec.input_shape == (80, 80, 3) and data.spec.num_classes == 1000
        assert data.spec.raw_shape == (None, None, 3)
        first, again = batches(data.train_dataset(), 2), batches(data.train_dataset(), 2)
        assert_same_batches(first, again)  # stateless augmentation: reproducible
        x, y = first[0]
        assert x.shape == (4, 80, 80, 3) and -1.0 <= x.min() and x.max() <= 1.0
        assert y.max() < 1000
        eval_x, _ = next(iter(data.eval_dataset()))
        assert eval_x.shape == (4, 80, 80, 3)


def test_tfds_dataset_not_prepared_fails_fast_without_network(tmp_path):
    with pytest.raises(data_lib.DatasetUnavailableError) as info:
        make("tfds:mnist", data_dir=str(tmp_path / "empty"))
    message = str(info.value)
    assert "not available offline" in message and "tfds build mnist" in message
    assert f"not prepared in {tmp_path / 'empty'}" in message
    assert "\n" not in message and "download=True" not in message  # TFDS's advice does not apply
    assert "AssertionError" not in message  # how TFDS says "not prepared": no news to a user
    with pytest.raises(data_lib.DatasetUnavailableError, match="not found") as info:
        make("tfds:no_such_dataset_xyz", data_dir=str(tmp_path))
    assert "\n" not in str(info.value)


# Synthetic ------------------------------------------------------------------------------


def test_synthetic_data_has_the_model_input_shape():
    flat = make("synthetic", batch_size=8, train_steps=3)
    assert flat.spec.input_shape == (784,)
    (x, y), (x2, _) = batches(flat.train_dataset(), 2)
    assert x.shape == (8, 784) and y.shape == (8,)
    np.testing.assert_array_equal(x, x2)  # one batch, repeated: measures the model only
    conv = make("synthetic", model="bn_inception", image_size=96, num_classes=5, batch_size=2)
    x, y = batches(conv.train_dataset(), 1)[0]
    assert x.shape == (2, 96, 96, 3) and y.max() < 5
    assert len(batches(conv.eval_dataset(), 10)) == 2


# Preprocessing --------------------------------------------------------------------------


def test_flat_inputs_binarize_at_one_half():
    images = np.array([[[0, 127, 128, 255]]], np.uint8)
    np.testing.assert_array_equal(preprocessing.flat_inputs(images, True), [[0, 0, 1, 1]])
    np.testing.assert_allclose(
        preprocessing.flat_inputs(images, False), [[0, 127 / 255, 128 / 255, 1]], rtol=1e-6
    )


def test_inception_crops_depend_on_the_seed_only():
    image = tf.cast(tf.reshape(tf.range(60 * 40 * 3) % 256, (60, 40, 3)), tf.uint8)
    a = preprocessing.inception_train_image(image, tf.constant([1, 2]), 32, "full")
    b = preprocessing.inception_train_image(image, tf.constant([1, 2]), 32, "full")
    c = preprocessing.inception_train_image(image, tf.constant([1, 3]), 32, "full")
    assert a.shape == (32, 32, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    grey = preprocessing.inception_train_image(image[..., :1], tf.constant([1, 2]), 32, "full")
    assert grey.shape == (32, 32, 1)


def test_eval_view_is_a_central_crop():
    image = np.zeros((80, 80, 3), np.uint8)
    image[:5] = 255  # a bright border row that the 87.5% central crop removes
    cropped = preprocessing.eval_image(image, 70, central_crop=True)
    resized = preprocessing.eval_image(image, 70, central_crop=False)
    assert float(tf.reduce_max(cropped)) == -1.0
    assert float(tf.reduce_max(resized)) == 1.0
