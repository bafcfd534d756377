"""The PyTorch backend: ``torch.distributed`` ranks exchange per-replica statistics.

With ``torch.distributed`` initialized (a process per device, as DDP runs), the layer's
``call`` sees one rank's batch. :func:`replica_group` names the ranks; their one exchange is
an all-reduce of a packed tensor (the rows of :mod:`keras_bn.moments`). The moving statistics
always receive the global batch's update, so they stay identical on every rank: Keras's
variables are ``torch.nn.Parameter`` objects, not buffers, so DDP's ``broadcast_buffers`` would
not keep them in step. Reducing the parameters' gradients stays the training loop's (or DDP's)
job.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from keras_bn import moments as moments_lib

FUSED_PATHS = "PyTorch has no fused training transform in keras_bn yet"


class Replicas:
    """The ranks of the default ``torch.distributed`` process group."""

    def __init__(self):
        self.count = dist.get_world_size()
        self.index = dist.get_rank()

    def sum(self, value):
        """The sum of ``value`` over ranks, as one all-reduce (no gradient)."""
        value = value.detach().clone().contiguous()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value


def replica_group() -> Replicas | None:
    """The ranks when ``torch.distributed`` is initialized with more than one, else None."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return None
    return Replicas()


def device_slices() -> int:
    """A rank's call sees its own batch: one slice."""
    return 1


class _SyncedMoments(torch.autograd.Function):
    """Global moments: one all-reduce of the packed rows forward, one of the two upstream
    gradients backward; ``dmean/dx = 1/N`` and ``dvar/dx = 2 (x - mean) / N`` locally."""

    @staticmethod
    def forward(ctx, x, mask, axes, replicas):
        count, mean, m2 = moments_lib.rows(x, axes, mask)
        row = moments_lib.pack_row(count, mean, m2, replicas.index, replicas.count)
        merged = moments_lib.merge_packed_rows(replicas.sum(row))
        ctx.save_for_backward(x, merged.count, merged.mean)
        ctx.mask, ctx.replicas = mask, replicas
        return merged.count, merged.mean, merged.variance

    @staticmethod
    def backward(ctx, d_count, d_mean, d_variance):
        x, count, mean = ctx.saved_tensors
        summed = ctx.replicas.sum(torch.stack([d_mean, d_variance]))
        dx = (summed[0] + 2.0 * summed[1] * (x - mean)) / torch.clamp(count, min=1.0)
        if ctx.mask is not None:
            dx = torch.where(ctx.mask, dx, torch.zeros_like(dx))
        return dx, None, None, None


def synced_moments(x, axes, mask, replicas: Replicas):
    """The global batch's :class:`keras_bn.moments.Moments`, differentiable in ``x``."""
    count, mean, variance = _SyncedMoments.apply(x, mask, tuple(axes), replicas)
    return moments_lib.Moments(count, mean, variance)


def fusable(feature_axes, rank, virtual_batch_size) -> bool:
    return False


def fused_plan(layer, inputs, mask, replicas, slices):
    return None


def compiled(function):
    return function


def has_float64() -> bool:
    return True
