"""Ensemble evaluation: the arithmetic mean of the members' multi-crop class probabilities."""

import crop_oracle
import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_bn.train.evaluation import crops, runs

CROP = 14


def small_convnet(seed):
    inputs = keras.Input((CROP, CROP, 1))
    x = keras.layers.Conv2D(
        4, 3, activation="relu", kernel_initializer=keras.initializers.HeNormal(seed)
    )(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(
        inputs, keras.layers.Dense(5, kernel_initializer=keras.initializers.GlorotNormal(seed))(x)
    )


def constant_logits(logits):
    """A 'model' that gives every input the same logits."""
    logits = tf.constant([logits], tf.float32)
    return lambda x: tf.tile(logits, [tf.shape(x)[0], 1])


def ensemble_accuracy(models, batches, num_crops, **kwargs):
    """The trainer's path: each member over the views, the ensemble, then top-1."""
    per_model = [runs.view_probabilities(m, CROP, batches, num_crops, **kwargs) for m in models]
    return runs.top1(runs.ensemble([p for p, _ in per_model]), per_model[0][1])


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 16, 21), np.uint8)
    labels = rng.integers(0, 5, 6)
    return [(images[:4], labels[:4]), (images[4:], labels[4:])]


@pytest.mark.parametrize("num_crops", [1, 10, 144])
def test_one_model_ensemble_equals_the_model(data, num_crops):
    model = small_convnet(1)
    alone, labels = runs.view_probabilities(model, CROP, data, num_crops)
    np.testing.assert_array_equal(runs.ensemble([alone]), alone)
    assert ensemble_accuracy([model], data, num_crops) == runs.top1(alone, labels)
    assert ensemble_accuracy([model], data, num_crops) == crop_oracle.accuracy(
        [model], data, CROP, num_crops
    )


def test_members_are_averaged_over_their_views_then_over_models(data):
    models = [small_convnet(seed) for seed in (1, 2, 3)]
    images, labels = data[0]
    expected = np.mean([crop_oracle.view_probabilities(m, images, CROP, 10) for m in models], 0)
    got = runs.ensemble([runs.view_probabilities(m, CROP, [data[0]], 10)[0] for m in models])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    accuracy = ensemble_accuracy(models, [(images, labels)], 10)
    assert accuracy == np.mean(expected.argmax(-1) == labels)


def test_probabilities_are_averaged_not_logits(data):
    # Mean logits favour class 0 (3.3 vs 2); mean probabilities favour class 1 (0.63 vs 0.37).
    members = [
        constant_logits([10.0, 0.0]),
        constant_logits([0.0, 3.0]),
        constant_logits([0.0, 3.0]),
    ]
    images = data[0][0]
    ones = np.ones(len(images), np.int64)
    assert ensemble_accuracy(members, [(images, ones)], 1) == 1.0
    probs = runs.ensemble(
        [runs.view_probabilities(m, CROP, [(images, ones)], 1)[0] for m in members]
    )
    np.testing.assert_allclose(probs[0], [0.3650, 0.6350], atol=1e-4)


def test_probability_outputs_are_not_softmaxed_again(data):
    member = crops.probability_fn(constant_logits([0.2, 0.5, 0.3]), from_logits=False)
    probs = crops.average_over_views(member, crops.crop_views(data[0][0], CROP, 10))
    np.testing.assert_allclose(probs, np.tile([[0.2, 0.5, 0.3]], (4, 1)), rtol=1e-6)


def test_progress_counts_images(data):
    seen = []
    ensemble_accuracy([constant_logits([1.0, 0.0])], data, 1, progress=seen.append)
    assert seen == [4, 6]


def test_bad_ensembles_say_what_is_wrong(data):
    with pytest.raises(ValueError, match="at least one model"):
        runs.ensemble([])
    members = [constant_logits([1.0, 0.0]), constant_logits([1.0, 0.0, 0.0])]
    with pytest.raises(ValueError, match="different numbers of classes"):
        ensemble_accuracy(members, data, 1)
    with pytest.raises(ValueError, match="no image"):
        ensemble_accuracy([constant_logits([1.0, 0.0])], [], 1)
