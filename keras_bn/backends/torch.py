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

import math

import torch
import torch.distributed as dist

from keras_bn import moments as moments_lib

FUSED_PATHS = (
    "PyTorch fuses feature axes that form one contiguous block, last or right after the batch "
    "axis, without ghost batches"
)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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
    """Whether the native kernel can run for these axes (``layer.fused``)."""
    layout = moments_lib.feature_layout(feature_axes, rank)
    return layout is not None and virtual_batch_size is None


def fused_plan(layer, inputs, mask, replicas, slices):
    """PyTorch's native batch-norm kernel (``torch.native_batch_norm``, forward and backward
    in one pass each) where it computes the layer's transform: no mask, no renorm (whose r
    and d would need a statistics pass of their own: 8x the plain path's time on small
    inputs), local statistics (a rank's own; the moving statistics are still exchanged),
    float32 statistics, more than one value per channel."""
    if (
        not layer.fused
        or layer.renorm
        or mask is not None
        or (replicas is not None and layer.synchronized)
        or layer._statistics_dtype != "float32"
        or inputs.dtype not in _DTYPES
        or inputs.numel() <= math.prod(layer._param_shape)  # n <= 1: n/(n-1) undefined
    ):
        return None
    return lambda: _native_training(layer, inputs)


def _native_training(layer, inputs):
    """``(outputs, moments, group axes)`` from the native kernel, on the input viewed as
    ``[A, C]`` (features last) or ``[N, C, B]`` (features after the batch axis)."""
    channels = math.prod(layer._param_shape)
    x = inputs.float()  # float32 math for half inputs, as on every path
    if layer._fused_layout == "NHWC":
        view = x.reshape(-1, channels)
    else:
        view = x.reshape(x.shape[0], channels, -1)
    ones = torch.ones(channels, device=x.device)
    gamma = layer.gamma.value.reshape(channels) if layer.scale else ones
    beta = layer.beta.value.reshape(channels) if layer.center else torch.zeros_like(ones)
    # With momentum 1 the kernel writes the batch's mean and n/(n-1)-corrected variance into
    # the running buffers, from its own sums (1 / sqrt(var + epsilon), its third output, would
    # lose digits when var << epsilon).
    mean = torch.zeros(channels, device=x.device)
    corrected = torch.ones(channels, device=x.device)
    y, _, _ = torch.native_batch_norm(view, gamma, beta, mean, corrected, True, 1.0, layer.epsilon)
    n = view.numel() // channels
    variance = corrected * ((n - 1) / n)
    count = torch.tensor(float(n), device=x.device)
    return y.reshape(inputs.shape), moments_lib.Moments(count, mean, variance), []


def compiled(function):
    return function


def has_float64() -> bool:
    return True
