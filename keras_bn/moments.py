"""Batch moments for Batch Normalization, written once with ``keras.ops``.

Every way the layer takes statistics goes through one view of the batch, :class:`Groups`: the
batch axis split into groups that are each normalized with their own statistics.

- plain Alg. 1: one group (the whole batch the call sees);
- a JAX data-parallel batch, which the call sees whole: one group per device slice
  (``[devices, batch / devices, ...]``, contiguous, as the batch is sharded), so each device
  normalizes its own examples, as a TensorFlow replica or a torch rank does;
- ghost batches (tf-keras's ``virtual_batch_size``): inside each device slice, ghost batch ``j``
  holds examples ``j, j + M/v, j + 2M/v, ...`` of the slice's ``M`` examples, as tf-keras groups
  them.

Statistics come back as :class:`Moments` in the keepdims layout of the split view (size 1 on
the reduction axes) so they broadcast against it. Counts come from shapes or the mask, never
from a tensor of ones.

Merging groups exactly. Each replica (or device slice) reduces its own values to
``(n_r, mean_r, M2_r)`` per channel with a two-pass formula; :func:`merge_rows` combines rows
with Chan et al.'s parallel formula ``mean = sum n_r mean_r / N``,
``M2 = sum M2_r + sum n_r (mean_r - mean)^2``. Nothing subtracts large raw sums, so the result
keeps float32 precision for data far from zero, where ``E[x^2] - E[x]^2`` (Keras 3, PyTorch's
SyncBatchNorm) loses it; replicas are weighted by their real counts, so uneven and empty ones
give the global result. How rows travel between replicas is each backend's business
(``keras_bn.backends``).
"""

from __future__ import annotations

from typing import NamedTuple

from keras import ops


class Moments(NamedTuple):
    """Statistics of a batch (or of each group), broadcastable against the input's view.

    Attributes:
        count: number of values behind each statistic (float; broadcastable to ``mean``).
        mean: the batch mean.
        variance: the *biased* batch variance (ddof=0), as Alg. 1 of the paper uses.
    """

    count: object
    mean: object
    variance: object


class Estimate(NamedTuple):
    """What the moving statistics move toward, per channel.

    Attributes:
        mean, variance: the batch's mean and its population variance (``n/(n-1)``-corrected
            when the layer is unbiased).
        mean_ok, variance_ok: boolean masks of the channels whose mean (at least one finite
            value) and variance (finite, and more than one value when corrected) are usable;
            the others keep their moving values.
        count: the values behind each channel's estimate (what Alg. 2 weighs batches by).
    """

    mean: object
    variance: object
    mean_ok: object
    variance_ok: object
    count: object


def feature_layout(feature_axes: list[int], rank: int) -> str | None:
    """ "NHWC" when the sorted feature axes are a contiguous block at the end, "NCHW" when they
    are a contiguous block right after the batch axis, else None (no fused path)."""
    if feature_axes != list(range(feature_axes[0], feature_axes[-1] + 1)):
        return None
    if feature_axes[-1] == rank - 1:
        return "NHWC"
    if feature_axes[0] == 1:
        return "NCHW"
    return None


def reduction_axes(rank: int, feature_axes: list[int]) -> list[int]:
    """The axes statistics are taken over: every axis but the feature (channel) axes."""
    return [a for a in range(rank) if a not in feature_axes]


def values_per_statistic(x, axes, dtype="float32"):
    """Number of values each channel's statistic is taken over, from the shape of ``x``."""
    n = 1
    for a in axes:
        n = n * x.shape[a] if x.shape[a] is not None else n * ops.shape(x)[a]
    return ops.cast(n, dtype)


def broadcast_mask(mask, x, feature_axes: list[int]):
    """Boolean mask broadcast to the shape of ``x``.

    ``mask`` either has the rank of ``x`` (broadcastable to it), or one axis fewer: Keras's
    convention (what ``Masking`` and ``Embedding`` produce), ``inputs.shape[:-1]`` expanded on
    the LAST axis whatever the feature axis is. With several feature axes, a mask that lacks
    exactly those axes is also accepted (expanded on each of them).
    """
    rank = len(x.shape)
    mask = ops.cast(mask, "bool")
    mask_rank = len(mask.shape)
    if mask_rank == rank - 1:
        mask = ops.expand_dims(mask, -1)
    elif len(feature_axes) > 1 and mask_rank == rank - len(feature_axes):
        for a in sorted(feature_axes):
            mask = ops.expand_dims(mask, a)
    elif mask_rank != rank:
        raise ValueError(
            f"mask must have the rank of the inputs ({rank}) or one less (Keras's convention: "
            f"inputs.shape[:-1]); got mask of shape {tuple(mask.shape)} for inputs of shape "
            f"{tuple(x.shape)}."
        )
    for m, d in zip(mask.shape, x.shape):
        if m is not None and d is not None and m not in (1, d):
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not broadcast to the inputs' shape "
                f"{tuple(x.shape)} (a mask of rank(inputs) - 1 must be inputs.shape[:-1], as "
                "in Keras)."
            )
    return ops.broadcast_to(mask, ops.shape(x))


class Groups:
    """The batch axis of the inputs split into groups with statistics of their own.

    The view is ``[slices, (ghost,) rest, ...]``: ``slices`` contiguous blocks of the batch
    (device slices of a JAX data-parallel batch), then, with ghost batches, each block of ``M``
    examples as ``[virtual_batch_size, M / virtual_batch_size]`` with statistics over the first
    of the two (tf-keras's strided grouping). Statistics are taken over the ghost axis (or the
    block's examples) and the non-feature axes. With one slice the slices axis is left out:
    ghost batches alone are ``[ghost, rest, ...]`` (with a leading unit axis, XLA:CPU computed
    a dense input's ghost sums about 70x slower: 140 against 2 ms on (4096, 1024)).

    Args:
        slices: number of contiguous blocks of the batch (devices).
        ghost_size: ``virtual_batch_size`` or None.
    """

    def __init__(self, slices: int = 1, ghost_size: int | None = None, dynamic_check=None):
        self.slices = slices
        self.ghost_size = ghost_size
        # A backend's ghost split that checks a batch size known only when the step runs
        # (TensorFlow's ``split_ghost_batches``).
        self.dynamic_check = dynamic_check

    @property
    def trivial(self) -> bool:
        return self.slices == 1 and self.ghost_size is None

    @property
    def _sliced(self) -> bool:
        """Whether the view has the slices axis (not for one slice with ghost batches)."""
        return not self.trivial and (self.slices > 1 or self.ghost_size is None)

    def check(self, batch):
        """Raises a ValueError naming both sizes when the batch does not split evenly."""
        if batch is None:
            return
        if batch % self.slices:
            raise ValueError(
                f"a batch of {batch} examples does not split evenly over {self.slices} devices."
            )
        if self.ghost_size is not None and (batch // self.slices) % self.ghost_size:
            per = "" if self.slices == 1 else f" on each of {self.slices} devices"
            raise ValueError(
                f"virtual_batch_size={self.ghost_size} must divide the batch size in training; "
                f"got a batch of {batch // self.slices} examples{per}. Use a batch size that "
                f"is a multiple of {self.ghost_size * self.slices}."
            )

    def split(self, x):
        """``x`` of shape ``[N, ...]`` in the view ``[slices, (ghost_size,) N', ...]``."""
        if self.trivial:
            return x
        self.check(x.shape[0])
        if x.shape[0] is None and self.dynamic_check is not None and self.slices == 1:
            return self.dynamic_check(x, self.ghost_size)
        rest = list(x.shape[1:]) if None not in x.shape[1:] else list(ops.shape(x)[1:])
        lead = [self.slices] if self._sliced else []
        lead += [self.ghost_size] if self.ghost_size is not None else []
        return ops.reshape(x, lead + [-1] + rest)

    def merge(self, y, like):
        """Undoes :meth:`split`: ``y`` back in the shape of ``like``."""
        if self.trivial:
            return y
        shape = list(like.shape) if None not in like.shape else ops.shape(like)
        return ops.reshape(y, shape)

    @property
    def lead(self) -> int:
        """Axes the view puts before the input's own axes (minus the batch axis)."""
        return int(self._sliced) + (self.ghost_size is not None)

    def axes(self, axes: list[int]) -> list[int]:
        """Statistics axes in the view, from the input's reduction ``axes`` (which hold 0)."""
        if self.trivial:
            return axes
        if self.ghost_size is not None:
            ghost = int(self._sliced)
            return [ghost] + [a + ghost + 1 for a in axes if a != 0]
        return [a + 1 for a in axes]

    def shape(self, shape: list) -> list:
        """A keepdims shape of the input, in the view."""
        return [1] * self.lead + list(shape)

    def group_axes(self):
        """Axes of the statistics' layout that index groups (device slice, ghost batch)."""
        if self.trivial:
            return []
        if self.ghost_size is None:
            return [0]
        return [0, 2] if self._sliced else [1]


def local_moments(x, axes, mask=None) -> Moments:
    """Count, mean and biased variance of ``x`` over ``axes`` (differentiable, keepdims).

    Args:
        x: float tensor.
        axes: reduction axes.
        mask: optional boolean tensor of ``x``'s shape (see :func:`broadcast_mask`);
            masked-out entries are excluded from the statistics and from the count.

    An empty batch (or group) gives ``count == 0``, mean 0 and variance 0, with finite
    gradients; callers must not use them as population statistics.
    """
    count, mean, m2 = rows(x, axes, mask)
    return Moments(count, mean, m2 / ops.maximum(count, 1.0))


def rows(x, axes, mask=None):
    """``(count, mean, M2)`` over ``axes`` (keepdims), two-pass, safe for empty inputs.

    ``count`` has the shape of ``mean``. Differentiable; masked entries may hold any value,
    even inf/nan (``where``, not a product, keeps them out).
    """
    if mask is None:
        count = values_per_statistic(x, axes, x.dtype)
        safe = ops.maximum(count, 1.0)
        mean = ops.sum(x, axis=axes, keepdims=True) / safe
        m2 = ops.sum(ops.square(x - mean), axis=axes, keepdims=True)
        return ops.broadcast_to(count, ops.shape(mean)), mean, m2
    count = ops.sum(ops.cast(mask, x.dtype), axis=axes, keepdims=True)
    safe = ops.maximum(count, 1.0)
    mean = ops.sum(ops.where(mask, x, 0.0), axis=axes, keepdims=True) / safe
    m2 = ops.sum(ops.square(ops.where(mask, x - mean, 0.0)), axis=axes, keepdims=True)
    return count, mean, m2


def merge_rows(counts, means, m2s, axis=0) -> Moments:
    """Chan et al.'s exact merge of per-replica ``(count, mean, M2)`` along ``axis``.

    Returns the merged :class:`Moments` (biased variance; an empty global batch gives count 0,
    mean 0 and variance 0), keeping ``axis`` with size 1.
    """
    n = ops.sum(counts, axis=axis, keepdims=True)
    safe = ops.maximum(n, 1.0)
    mean = ops.sum(counts * means, axis=axis, keepdims=True) / safe
    spread = ops.sum(counts * ops.square(means - mean), axis=axis, keepdims=True)
    return Moments(n, mean, (ops.sum(m2s, axis=axis, keepdims=True) + spread) / safe)


def pack_row(count, mean, m2, index, replicas: int):
    """``[R, 3, ...]`` zeros holding one replica's ``(count, mean, M2)`` in row ``index``:
    summed over replicas (one all-reduce), every replica has every row."""
    packed = ops.stack([count, mean, m2])
    slot = ops.cast(ops.equal(ops.arange(replicas), index), packed.dtype)
    slot = ops.reshape(slot, [replicas] + [1] * len(packed.shape))
    return slot * packed[None]


def merge_packed_rows(gathered) -> Moments:
    """:func:`merge_rows` of ``[R, 3, ...]`` rows (see :func:`pack_row`), without the R axis."""
    merged = merge_rows(gathered[:, 0], gathered[:, 1], gathered[:, 2], axis=0)
    return Moments(*(v[0] for v in merged))


def estimate(moments: Moments, unbiased: bool) -> Estimate:
    """The population estimate of one batch: mean, population variance, and which channels
    may move (see :class:`Estimate`). A channel with one value has a mean; its corrected
    variance ``n/(n-1) * 0`` is undefined, so with ``unbiased`` only its mean moves."""
    count, mean, variance = moments
    count = ops.broadcast_to(count, ops.shape(mean))
    mean_ok = (count >= 1.0) & ops.isfinite(mean)
    variance_ok = mean_ok & ops.isfinite(variance)
    if unbiased:
        variance_ok = variance_ok & (count > 1.0)
        variance = variance * count / ops.maximum(count - 1.0, 1.0)
    return Estimate(mean, variance, mean_ok, variance_ok, count)


def estimate_sums(estimates: Estimate, axes=()):
    """``[5, ...]`` sums over the groups on ``axes`` (ghost batches, devices) from which
    :func:`estimate_from_sums` gives their average; added over replicas first, the average
    over every replica's groups. Each group counts where it is usable: a ghost batch whose
    values are all masked adds nothing."""
    mean_ok = ops.cast(estimates.mean_ok, estimates.mean.dtype)
    var_ok = ops.cast(estimates.variance_ok, estimates.mean.dtype)
    sums = ops.stack(
        [
            ops.where(estimates.mean_ok, estimates.mean, 0.0),
            ops.where(estimates.variance_ok, estimates.variance, 0.0),
            mean_ok,
            var_ok,
            ops.where(estimates.mean_ok, estimates.count, 0.0),
        ]
    )
    return ops.sum(sums, axis=[a + 1 for a in axes], keepdims=True) if axes else sums


def estimate_from_sums(sums) -> Estimate:
    """The averaged :class:`Estimate` from :func:`estimate_sums`; ``count`` is the values
    behind the usable groups' means."""
    mean, variance, groups_m, groups_v, count = (sums[i] for i in range(5))
    return Estimate(
        mean / ops.maximum(groups_m, 1.0),
        variance / ops.maximum(groups_v, 1.0),
        groups_m > 0,
        groups_v > 0,
        count,
    )
