"""Input: the packaged MNIST, prepared TFDS datasets and synthetic data, through tf.data."""
