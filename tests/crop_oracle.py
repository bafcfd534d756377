"""An independent multi-crop and ensemble oracle: every view through the model one at a time,
softmax and means in NumPy (the trainer's path batches the views and averages in TensorFlow)."""

import numpy as np

from keras_bn.train.evaluation import crops


def view_probabilities(model, images, crop_size, num_crops):
    """Each image's softmax probabilities, averaged over its views: `(B, classes)`."""
    image_views = crops.crop_views(images, crop_size, num_crops).numpy()
    logits = np.stack(
        [np.asarray(model(v * 2.0 - 1.0)) for v in image_views.transpose(1, 0, 2, 3, 4)], 1
    ).astype(np.float64)
    probabilities = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return probabilities.mean(axis=1)


def accuracy(models, batches, crop_size, num_crops):
    """Top-1 accuracy of the ensemble of `models` (one model: that model) over `batches`."""
    correct = total = 0
    for images, labels in batches:
        mean = np.mean([view_probabilities(m, images, crop_size, num_crops) for m in models], 0)
        correct += int(np.sum(mean.argmax(-1) == np.reshape(labels, [-1])))
        total += len(mean)
    return correct / total
