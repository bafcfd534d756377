"""The real MNIST files shipped as package data (IDX, gzip), read without any network.

The four files in ``keras_bn/train/data/mnist/`` are the original LeCun/Cortes/Burges IDX files
(CC BY-SA 3.0, see the README beside them). ``SHA256SUMS`` holds the sha256 of each
*uncompressed* file; every read is checked against it, so a corrupted install fails loudly.

Example:

>>> images, labels = load_mnist("test")
>>> images.shape, images.dtype, labels.shape
((10000, 28, 28), dtype('uint8'), (10000,))
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import pathlib

import numpy as np

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IMAGE_MAGIC, _LABEL_MAGIC = 2051, 2049


def mnist_dir() -> pathlib.Path:
    """Returns the folder that holds the packaged MNIST files."""
    return pathlib.Path(str(importlib.resources.files("keras_bn.train.data") / "mnist"))


def expected_sha256(directory: pathlib.Path | None = None) -> dict[str, str]:
    """Reads ``SHA256SUMS``: IDX file name -> sha256 of its uncompressed bytes."""
    directory = directory or mnist_dir()
    sums = {}
    for line in (directory / "SHA256SUMS").read_text().splitlines():
        if line.strip():
            digest, name = line.split()[:2]
            sums[name] = digest
    return sums


def _read_idx(path: pathlib.Path, magic: int, expected: str) -> np.ndarray:
    raw = gzip.open(path).read()
    if hashlib.sha256(raw).hexdigest() != expected:
        raise OSError(
            f"{path} does not match its sha256 in SHA256SUMS: the packaged MNIST is corrupt; "
            "reinstall keras-bn."
        )
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise OSError(f"{path}: IDX magic {found}, expected {magic}.")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_mnist(split: str, directory: str | pathlib.Path | None = None):
    """Loads one MNIST split from the IDX files, checking their hashes.

    Args:
        split: ``"train"`` (60,000 examples) or ``"test"`` (10,000 examples).
        directory: folder holding the four ``*.gz`` files and ``SHA256SUMS``;
            defaults to the copy shipped inside the package.

    Returns:
        ``(images, labels)``: uint8 array ``(N, 28, 28)`` of pixels 0..255 and
        int64 array ``(N,)`` of digits 0..9.
    """
    if split not in _FILES:
        raise ValueError(f"split must be one of {sorted(_FILES)}, got {split!r}.")
    directory = pathlib.Path(directory) if directory else mnist_dir()
    sums = expected_sha256(directory)
    image_name, label_name = _FILES[split]
    images = _read_idx(directory / f"{image_name}.gz", _IMAGE_MAGIC, sums[image_name])
    labels = _read_idx(directory / f"{label_name}.gz", _LABEL_MAGIC, sums[label_name])
    if len(images) != len(labels):
        raise OSError(f"MNIST {split}: {len(images)} images but {len(labels)} labels.")
    return images, labels.astype(np.int64)
