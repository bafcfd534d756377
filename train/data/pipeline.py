"""tf.data input pipelines: the packaged MNIST, any prepared TFDS dataset, synthetic data.

The training stream is a pure function of `(seed, step)`: epoch `e` visits the examples in an
order drawn from `(seed, e)` and augmentation of the k-th example of the stream uses the
stateless seed `(seed, k)`. A run resumed at step s therefore sees exactly the batches an
uninterrupted run sees from step s, without saving any iterator state.

The sources are the `--dataset` setting's (its help lists them). Decisions: the packaged MNIST is
held in memory and fully permuted every epoch (the trainer's fast in-memory path gathers from it);
a TFDS dataset is never downloaded (the trainer runs offline: one line says how to prepare it) and
is shuffled with a seeded buffer of encoded images (decoded after shuffling, so the buffer stays
small); synthetic data is one random batch repeated, so a throughput run measures the model, not
the input.

Example:

>>> from keras_bn.train.config.settings import resolve
>>> data = make_data(resolve("mnist_bn", {}))
>>> x, y = next(iter(data.train_dataset(start_step=0)))
>>> x.shape, y.shape
(TensorShape([60, 784]), TensorShape([60]))
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os

import numpy as np
import tensorflow as tf
from absl import logging as absl_logging

from keras_bn.train.config.settings import TrainConfig
from keras_bn.train.data import preprocessing

# Models fed flattened pixel vectors; every other zoo model takes images.
FLAT_MODELS = ("mlp",)
MIN_IMAGE_SIZE = 75  # the Inception builders accept inputs of at least 75 x 75
SYNTHETIC_TRAIN_EXAMPLES = {True: 60_000, False: 1_281_167}  # flat: MNIST, images: ImageNet


class DatasetUnavailableError(ValueError):
    """The requested dataset cannot be read offline."""


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """What the model and the exporter need to know about the data.

    Attributes:
        name: the `--dataset` value.
        raw_shape: shape of one raw image as stored (`(28, 28)` for MNIST, `(None, None, 3)`
            for ImageNet); the exported `serve` signature takes a batch of these.
        input_shape: shape of one model input (`(784,)` or `(S, S, C)`).
        num_classes: number of labels.
        num_train_examples: size of the training split (one epoch).
        num_eval_examples: size of the evaluation split, or None when unknown.
        flat: whether the model takes flattened vectors.
    """

    name: str
    raw_shape: tuple
    input_shape: tuple
    num_classes: int
    num_train_examples: int
    num_eval_examples: int | None
    flat: bool


class Data:
    """Training, evaluation and statistics pipelines for one `TrainConfig`.

    Build with `make_data(config)`, which validates that the data can be read.
    """

    def __init__(self, config: TrainConfig, spec: DataSpec, source: _Source):
        self.config = config
        self.spec = spec
        self._source = source
        self._augment = _resolve_augment(config)
        self._orders: dict[int, np.ndarray] = {}  # epoch -> order, for train_indices

    # Public pipelines -----------------------------------------------------------------------

    @property
    def in_memory(self) -> bool:
        """Whether training batches can be gathered from tensors held in memory.

        True for the packaged MNIST without augmentation: `arrays` and `train_indices`
        then give the very batches `train_dataset` gives, without tf.data.
        """
        return self._source.in_memory and self._augment == "none"

    def arrays(self, split: str) -> tuple[tf.Tensor, tf.Tensor]:
        """Raw `(images, labels)` of `split` ("train" or "eval") as tensors (in-memory data)."""
        return self._source.arrays(split)

    def train_indices(
        self, start_step: int, num_steps: int, batch_size: int | None = None
    ) -> np.ndarray:
        """Training example indices `(num_steps, batch_size)` of steps `start_step` onwards.

        Row k indexes `arrays("train")` for the batch of step `start_step + k`: the same stream
        as `train_dataset(start_step)` (one permutation per epoch, a pure function of seed and
        epoch), for in-memory data.

        Args:
            start_step: the first step.
            num_steps: number of rows.
            batch_size: the global batch size (default `config.batch_size`).

        Returns:
            int64 array `(num_steps, batch_size)`.

        Example:

        >>> from keras_bn.train.config.settings import resolve
        >>> make_data(resolve("mnist_bn", {})).train_indices(start_step=999, num_steps=2).shape
        (2, 60)
        """
        batch_size = batch_size or self.config.batch_size
        n = int(self._source.arrays("train")[1].shape[0])
        begin = start_step * batch_size
        end = begin + num_steps * batch_size
        orders = [self._epoch_order(n, e) for e in range(begin // n, (end - 1) // n + 1)]
        first = (begin // n) * n
        stream = np.concatenate(orders) if len(orders) > 1 else orders[0]
        return stream[begin - first : end - first].reshape(num_steps, batch_size)

    def _epoch_order(self, n: int, epoch: int) -> np.ndarray:
        # Cached: consecutive blocks of steps mostly share an epoch, and an order costs a sort.
        if epoch not in self._orders:
            if len(self._orders) > 2:
                self._orders.clear()
            self._orders[epoch] = epoch_order(n, self.config.seed, epoch).numpy()
        return self._orders[epoch]

    def train_dataset(
        self, start_step: int = 0, num_steps: int | None = None, batch_size: int | None = None
    ) -> tf.data.Dataset:
        """Global training batches `(x, y)` for steps `start_step` to `start_step + num_steps`.

        Args:
            start_step: the first step to produce (the data position of a resumed run).
            num_steps: number of batches (default: up to `config.train_steps`).
            batch_size: the global batch size (default `config.batch_size`).
        """
        batch_size = batch_size or self.config.batch_size
        if num_steps is None:
            num_steps = self.config.train_steps - start_step
        if num_steps <= 0:
            raise ValueError(f"num_steps must be positive, got {num_steps}.")
        position = start_step * batch_size
        if isinstance(self._source, _Synthetic):
            return self._source.train(batch_size, self.preprocess_batch).take(num_steps)
        if self.in_memory:
            # Fast path: permute indices, gather whole batches, preprocess vectorized.
            images, labels = self._source.arrays("train")
            indices = _index_stream(len(labels), self.config.seed, position)
            ds = indices.batch(batch_size, drop_remainder=True).take(num_steps)
            ds = ds.map(
                lambda i: (self.preprocess_batch(tf.gather(images, i)), tf.gather(labels, i)),
                num_parallel_calls=tf.data.AUTOTUNE,
            )
        else:
            count = num_steps * batch_size
            ds = self._source.train_examples(self.config, position, count)
            ds = (
                ds.take(count)
                .enumerate(start=position)
                .map(
                    lambda k, example: self._train_example(k, *example),
                    num_parallel_calls=tf.data.AUTOTUNE,
                )
            )
            ds = ds.batch(batch_size, drop_remainder=True)
        return _finish(ds)

    def eval_dataset(
        self, batch_size: int | None = None, drop_remainder: bool = False
    ) -> tf.data.Dataset:
        """Evaluation batches `(x, y)` over the evaluation split.

        Args:
            batch_size: the global batch size (default `eval_batch_size`, else `batch_size`).
            drop_remainder: drop a last, smaller batch (TPUs need static shapes); by default
                it is kept, so every example is evaluated.
        """
        batch_size = batch_size or self.config.evaluation_batch_size
        ds = self._source.eval_examples(batch_size, self.preprocess_batch, self._eval_example)
        if drop_remainder:
            ds = ds.unbatch().batch(batch_size, drop_remainder=True)
        if self.config.eval_steps:
            ds = ds.take(self.config.eval_steps)
        return _finish(ds)

    def raw_eval_batches(self, max_images: int | None = None):
        """The evaluation images as raw pixels with their labels, in evaluation order.

        For views the model's preprocessing does not make (`keras_bn.train.evaluation.runs`'s
        crops). Batches of `eval_batch_size` images; one image per batch where image sizes
        differ (TFDS). `max_images` (default: the images `eval_dataset` gives) in all.
        """
        limits = [n for n in (self.config.eval_limit, max_images) if n is not None]
        return self._source.raw_eval(self.config.evaluation_batch_size, min(limits, default=None))

    def stats_dataset(self, steps: int) -> tf.data.Dataset:
        """`steps` fresh training batches (after the last training step), for Alg. 2."""
        return self.train_dataset(start_step=self.config.train_steps, num_steps=steps)

    # Preprocessing ------------------------------------------------------------------------

    def preprocess_batch(self, images: tf.Tensor) -> tf.Tensor:
        """Evaluation preprocessing of a batch of raw images (used inside the export too)."""
        if self.spec.flat:
            return preprocessing.flat_inputs(images, self.config.binarize)
        return preprocessing.eval_image(
            images, self.spec.input_shape[0], self._augment == "inception", batched=True
        )

    def _eval_example(self, image: tf.Tensor, label: tf.Tensor):
        return self.preprocess_batch(image[tf.newaxis])[0], tf.cast(label, tf.int32)

    def _train_example(self, index: tf.Tensor, image: tf.Tensor, label: tf.Tensor):
        if self._augment != "inception":
            return self._eval_example(image, label)
        seed = tf.stack([tf.cast(self.config.seed, tf.int64), tf.cast(index, tf.int64)])
        x = preprocessing.inception_train_image(
            image, seed, self.spec.input_shape[0], self.config.distortion
        )
        return x, tf.cast(label, tf.int32)


def _finish(ds: tf.data.Dataset) -> tf.data.Dataset:
    options = tf.data.Options()
    options.deterministic = True
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def _epoch_int_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % (2**31 - 1)


def epoch_order(n: int, seed: int, epoch) -> tf.Tensor:
    """The order in which epoch `epoch` visits the examples: a permutation of range(n), int64."""
    key = tf.stack([tf.cast(seed, tf.int64), tf.cast(epoch, tf.int64)])
    return tf.cast(tf.argsort(tf.random.stateless_uniform([n], key)), tf.int64)


def _index_stream(n: int, seed: int, position: int) -> tf.data.Dataset:
    """Example indices of an endless stream: a fresh permutation of range(n) per epoch."""
    first_epoch, offset = divmod(position, n)

    def epoch(e):
        return tf.data.Dataset.from_tensor_slices(epoch_order(n, seed, e))

    return tf.data.Dataset.range(first_epoch, 2**62).flat_map(epoch).skip(offset)


def _resolve_augment(config: TrainConfig) -> str:
    if config.augment != "auto":
        return config.augment
    name = config.dataset.removeprefix("tfds:")
    imagenet_like = name.startswith("imagenet") and config.model not in FLAT_MODELS
    return "inception" if imagenet_like else "none"


# Sources ------------------------------------------------------------------------------------


class _Source:
    in_memory = False

    def train_examples(self, config: TrainConfig, position: int, count: int) -> tf.data.Dataset:
        """Per-example `(image, label)` for stream positions `position` to `position + count`."""
        raise NotImplementedError

    def eval_examples(self, batch_size: int, preprocess_batch, eval_example) -> tf.data.Dataset:
        raise NotImplementedError

    def raw_eval(self, batch_size: int, limit: int | None):
        raise ValueError(f"{type(self).__name__[1:]} data has no raw images to crop.")


class _InMemory(_Source):
    """Arrays held in memory (the packaged MNIST)."""

    in_memory = True

    def __init__(self, splits: dict[str, tuple[np.ndarray, np.ndarray]]):
        self._splits = splits
        self._tensors: dict[str, tuple[tf.Tensor, tf.Tensor]] = {}

    def arrays(self, split: str) -> tuple[tf.Tensor, tf.Tensor]:
        if split not in self._tensors:
            images, labels = self._splits[split]
            self._tensors[split] = (tf.constant(images), tf.constant(labels, tf.int32))
        return self._tensors[split]

    def raw_eval(self, batch_size, limit):
        images, labels = self.arrays("eval")
        count = len(labels) if limit is None else min(limit, len(labels))
        for start in range(0, count, batch_size):
            end = min(start + batch_size, count)
            yield images[start:end], labels[start:end]

    def train_examples(self, config, position, count):
        images, labels = self.arrays("train")
        indices = _index_stream(int(labels.shape[0]), config.seed, position)
        return indices.map(lambda i: (tf.gather(images, i), tf.gather(labels, i)))

    def eval_examples(self, batch_size, preprocess_batch, eval_example):
        images, labels = self.arrays("eval")
        ds = tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch_size)
        return ds.map(lambda x, y: (preprocess_batch(x), y), num_parallel_calls=tf.data.AUTOTUNE)


class _Tfds(_Source):
    """A prepared TFDS dataset, read with `download=False`; images decoded after shuffling."""

    def __init__(self, builder, train, evaluation, image_feature):
        self._builder = builder
        self._train = train
        self._eval = evaluation
        self._image_feature = image_feature

    def _decode(self, image, label):
        return self._image_feature.decode_example(image), label

    def train_examples(self, config, position, count):
        base = self._train
        n = _cardinality(base, self._builder, config.train_split)
        first_epoch, offset = divmod(position, n)
        last_epoch = (position + count - 1) // n
        # One seeded shuffle per epoch, chained in Python: Dataset.shuffle takes no tensor seed
        # (under a global seed of 0), so the epochs cannot come from a flat_map over epoch ids.
        epochs = [
            base.shuffle(
                config.shuffle_buffer,
                seed=_epoch_int_seed(config.seed, e),
                reshuffle_each_iteration=False,
            )
            for e in range(first_epoch, last_epoch + 1)
        ]
        ds = functools.reduce(tf.data.Dataset.concatenate, epochs).skip(offset)
        return ds.map(self._decode, num_parallel_calls=tf.data.AUTOTUNE)

    def raw_eval(self, batch_size, limit):
        ds = self._eval.take(-1 if limit is None else limit).map(self._decode)
        shape = self._image_feature.shape
        return iter(ds.batch(batch_size if None not in shape[:2] else 1))

    def eval_examples(self, batch_size, preprocess_batch, eval_example):
        ds = self._eval.map(self._decode, num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.map(eval_example, num_parallel_calls=tf.data.AUTOTUNE)
        return ds.batch(batch_size)


class _Synthetic(_Source):
    """One random batch of uint8 images, repeated: measures the model, not the input."""

    def __init__(self, raw_shape, num_classes, seed, eval_batches):
        self._raw_shape = raw_shape
        self._num_classes = num_classes
        self._seed = seed
        self._eval_batches = eval_batches

    def _batch(self, batch_size, preprocess_batch, salt):
        rng = np.random.default_rng([self._seed, salt])
        images = rng.integers(0, 256, (batch_size, *self._raw_shape), dtype=np.uint8)
        labels = rng.integers(0, self._num_classes, (batch_size,), dtype=np.int32)
        return preprocess_batch(images), tf.constant(labels)

    def train(self, batch_size, preprocess_batch):
        return _finish(
            tf.data.Dataset.from_tensors(self._batch(batch_size, preprocess_batch, 0)).repeat()
        )

    def eval_examples(self, batch_size, preprocess_batch, eval_example):
        batches = [
            self._batch(batch_size, preprocess_batch, 1 + i) for i in range(self._eval_batches)
        ]
        xs, ys = zip(*batches, strict=True)
        return tf.data.Dataset.from_tensor_slices((tf.stack(xs), tf.stack(ys)))


def _cardinality(ds: tf.data.Dataset, builder, split: str) -> int:
    n = int(ds.cardinality())
    if n < 0:
        n = builder.info.splits[split].num_examples
    if n <= 0:
        raise DatasetUnavailableError(f"split {split!r} of {builder.name} is empty.")
    return n


# Construction -----------------------------------------------------------------------------


def _spec(config: TrainConfig, name: str, raw_shape: tuple, **counts) -> DataSpec:
    """The `DataSpec` of images stored as `raw_shape`; `counts` are its class and example counts."""
    flat = config.model in FLAT_MODELS
    input_shape = _input_shape(config, raw_shape, flat)
    return DataSpec(name, raw_shape, input_shape, flat=flat, **counts)


def _input_shape(config: TrainConfig, raw_shape: tuple, flat: bool) -> tuple:
    """The model input shape for images stored as `raw_shape`."""
    if flat:
        if any(d is None for d in raw_shape):
            raise ValueError(
                f"--model={config.model} takes flat vectors but {config.dataset} has images of "
                f"varying size {raw_shape}; use a convolutional model."
            )
        return (math.prod(raw_shape),)
    channels = raw_shape[2] if len(raw_shape) == 3 else 1
    size = config.image_size
    if size is None:
        native = raw_shape[0]
        size = 224 if native is None or _resolve_augment(config) == "inception" else native
        size = max(size, MIN_IMAGE_SIZE)
    return (size, size, channels)


def _load_mnist(config: TrainConfig) -> tuple[DataSpec, _Source]:
    from keras_bn.train.data.mnist_files import load_mnist

    train = load_mnist("train")
    evaluation = load_mnist(config.eval_split or "test")
    spec = _spec(
        config,
        "mnist",
        tuple(train[0].shape[1:]),
        num_classes=config.num_classes or 10,
        num_train_examples=len(train[1]),
        num_eval_examples=len(evaluation[1]),
    )
    return spec, _InMemory({"train": train, "eval": evaluation})


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


@contextlib.contextmanager
def _absl_warnings_off():
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(verbosity)


def _load_tfds(config: TrainConfig) -> tuple[DataSpec, _Source]:
    import tensorflow_datasets as tfds

    name = config.dataset.removeprefix("tfds:")
    how_to = (
        f"prepare it first, e.g. `tfds build {name} --data_dir=DIR` (ImageNet needs its "
        "tarballs in DIR/downloads/manual), then pass --data_dir=DIR"
    )
    try:
        with _absl_warnings_off():  # TFDS warns about a missing folder before it fails
            builder = tfds.builder(name, data_dir=config.data_dir)
    except Exception as error:  # DatasetNotFoundError and friends: one line, no listing
        raise DatasetUnavailableError(
            f"--dataset={config.dataset}: {_first_line(error)}"
        ) from error
    keys = builder.info.supervised_keys
    if not keys or len(keys) != 2:
        raise DatasetUnavailableError(
            f"--dataset={config.dataset} has no (image, label) supervised keys."
        )
    image_key, label_key = keys
    image_feature = builder.info.features[image_key]
    label_feature = builder.info.features[label_key]
    known_splits = set(builder.info.splits.keys())
    eval_split = config.eval_split or (
        "validation" if "validation" in known_splits or name.startswith("imagenet") else "test"
    )

    def load(split, shuffle_files):
        return tfds.load(
            name,
            split=split,
            data_dir=config.data_dir,
            download=False,
            as_supervised=True,
            shuffle_files=shuffle_files,
            decoders={image_key: tfds.decode.SkipDecoding()},
            read_config=tfds.ReadConfig(
                shuffle_seed=config.seed, shuffle_reshuffle_each_iteration=False
            ),
        )

    try:
        with _absl_warnings_off():
            train = load(config.train_split, True)
            evaluation = load(eval_split, False)
    except Exception as error:  # tfds raises AssertionError when the data is not there
        # Not TFDS's own advice: it says to pass download=True, which this trainer never does.
        where = config.data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
        # The usual cause is TFDS's AssertionError (not prepared); name any other.
        cause = "" if isinstance(error, AssertionError) else f" ({type(error).__name__})"
        raise DatasetUnavailableError(
            f"--dataset={config.dataset} is not available offline: it is not prepared in "
            f"{where}{cause}; {how_to}."
        ) from error
    num_classes = config.num_classes or getattr(label_feature, "num_classes", None)
    if not num_classes:
        raise DatasetUnavailableError(
            f"--dataset={config.dataset}: the label has no class count; pass --num_classes."
        )
    n_eval = int(evaluation.cardinality())
    spec = _spec(
        config,
        config.dataset,
        tuple(image_feature.shape),
        num_classes=int(num_classes),
        num_train_examples=_cardinality(train, builder, config.train_split),
        num_eval_examples=n_eval if n_eval >= 0 else None,
    )
    return spec, _Tfds(builder, train, evaluation, image_feature)


def _load_synthetic(config: TrainConfig) -> tuple[DataSpec, _Source]:
    flat = config.model in FLAT_MODELS
    raw_shape = (28, 28) if flat else (config.image_size or 224,) * 2 + (3,)
    num_classes = config.num_classes or 10
    eval_batches = config.eval_steps or 2
    spec = _spec(
        config,
        "synthetic",
        raw_shape,
        num_classes=num_classes,
        num_train_examples=SYNTHETIC_TRAIN_EXAMPLES[flat],
        num_eval_examples=eval_batches * config.evaluation_batch_size,
    )
    return spec, _Synthetic(raw_shape, num_classes, config.seed, eval_batches)


def make_data(config: TrainConfig) -> Data:
    """Opens the dataset of `config` and returns its pipelines.

    Raises:
        DatasetUnavailableError: if the dataset cannot be read offline (the message says how to
            provide it).
        ValueError: if the dataset does not fit the model (e.g. varying image sizes for the MLP).
    """
    if config.dataset.startswith("tfds:"):
        load = _load_tfds
    else:
        load = {"mnist": _load_mnist, "synthetic": _load_synthetic}.get(config.dataset)
    if load is None:
        raise ValueError(
            f"--dataset must be mnist, synthetic or tfds:<name>, got {config.dataset!r}."
        )
    return Data(config, *load(config))
