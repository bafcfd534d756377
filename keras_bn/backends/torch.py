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
from keras.src.backend.common.stateless_scope import in_stateless_scope

from keras_bn import moments as moments_lib
from keras_bn import transform

FUSED_PATHS = (
    "PyTorch fuses feature axes that form one contiguous block, last or right after the batch "
    "axis (ghost batches: last)"
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
    return layout is not None and (virtual_batch_size is None or layout == "NHWC")


def fused_plan(layer, inputs, mask, replicas, slices, averages):
    """PyTorch's native batch-norm kernel (``torch.native_batch_norm``, forward and backward
    in one pass each) where it computes the layer's transform: no mask, local statistics (a
    rank's own; the moving statistics are still exchanged), float32 statistics, more than one
    value per channel. Renorm runs it with gamma and beta corrected by r and d (which carry no
    gradient), from one statistics pass of their own. Where the kernel's own running
    average is the layer's update (:func:`_kernel_updates_moving_statistics`), it moves the
    moving statistics too, and the plan returns no moments. A mask or ghost batches (features
    last, no renorm) run :class:`_ClosedFormNormalization`, the transform with a closed-form
    backward."""
    if (
        not layer.fused
        or (replicas is not None and layer.synchronized)
        or layer._statistics_dtype != "float32"
        or inputs.dtype not in _DTYPES
    ):
        return None
    if mask is not None or layer.virtual_batch_size is not None:
        if layer.renorm or layer._fused_layout != "NHWC":
            return None
        return lambda: _closed_form_training(layer, inputs, mask)
    if inputs.numel() <= math.prod(layer._param_shape):  # n <= 1: n/(n-1) undefined
        return None
    if _kernel_updates_moving_statistics(layer):
        return lambda: _native_training_in_place(layer, inputs)
    return lambda: _native_training(layer, inputs, averages)


def _kernel_updates_moving_statistics(layer) -> bool:
    """Whether the kernel's running average is exactly the layer's moving-statistics update.

    It computes ``(1 - m) * running + m * batch`` with the batch's ``n/(n-1)``-corrected
    variance, ``m = 1 - momentum``: the layer's ``old + (1 - momentum) * (batch - old)`` to
    float rounding, for a fixed momentum and the unbiased variance; without other ranks
    (whose batches the update must include), Alg. 2's observer, moving-statistics
    constraints, or a stateless call (whose variables must not change in place)."""
    return (
        layer.momentum is not None
        and not layer.renorm  # renorm moves averages of its own too
        and layer.unbiased_variance
        and layer._statistics_observer is None
        and layer.moving_mean.constraint is None
        and layer.moving_variance.constraint is None
        and not in_stateless_scope()
        and replica_group() is None
    )


def _kernel_input(layer, inputs):
    """The input as the kernel's ``[A, C]`` (features last) or ``[N, C, B]`` (features after
    the batch axis), float32 (half inputs are computed in float32, as on every path), and
    gamma and beta as vectors (None when disabled: the kernel then skips them)."""
    channels = math.prod(layer._param_shape)
    x = inputs if inputs.dtype == torch.float32 else inputs.float()
    if layer._fused_layout == "NHWC":
        view = x.reshape(-1, channels)
    else:
        view = x.reshape(x.shape[0], channels, -1)
    # Each skipped no-op (a cast, a reshape and its backward) saves an eager dispatch.
    return view, _vector(layer.gamma, layer.scale), _vector(layer.beta, layer.center)


def _vector(variable, enabled):
    if not enabled:
        return None
    value = variable.value
    return value if value.dim() == 1 else value.reshape(-1)


def _native_training(layer, inputs, averages):
    """``(outputs, moments, group axes)`` from the native kernel."""
    view, gamma, beta = _kernel_input(layer, inputs)
    channels = view.shape[1]
    # With momentum 1 the kernel writes the batch's mean and n/(n-1)-corrected variance into
    # the running buffers, from its own sums (1 / sqrt(var + epsilon), its third output, would
    # lose digits when var << epsilon).
    mean = torch.zeros(channels, device=view.device)
    corrected = torch.ones(channels, device=view.device)
    if layer.renorm:
        gamma, beta = _renorm_corrected(layer, view, gamma, beta, averages)
    y, _, _ = torch.native_batch_norm(view, gamma, beta, mean, corrected, True, 1.0, layer.epsilon)
    n = view.numel() // channels
    variance = corrected * ((n - 1) / n)
    count = torch.tensor(float(n), device=view.device)
    return y.reshape(inputs.shape), moments_lib.Moments(count, mean, variance), []


def _renorm_corrected(layer, view, gamma, beta, averages):
    """Batch Renormalization's ``(gamma * r, beta + gamma * d)`` for the kernel: ``r`` and ``d``
    from the batch's biased moments (one pass; they carry no gradient, so the kernel's
    backward through the corrected parameters is renorm's)."""
    channels = view.shape[1]
    with torch.no_grad():
        # ATen's batch-norm statistics (mean, biased variance): one pass, in the kernel's own
        # layout; torch.var_mean over dim 0 of [A, C] took over 10x as long.
        mean, variance = torch.batch_norm_update_stats(view, None, None, 0.0)
    correction = transform.renorm_correction(
        mean, variance, layer.epsilon, layer._renorm_state([channels], averages)
    )
    ones = torch.ones(channels, device=view.device)
    gamma = ones if gamma is None else gamma
    beta = torch.zeros_like(ones) if beta is None else beta
    return transform.corrected_params(gamma, beta, correction)


def _native_training_in_place(layer, inputs):
    """``(outputs, None, None)``: the native kernel normalizes and moves copies of the moving
    statistics (its running buffers, which its backward keeps: the variables themselves must
    not change under it), written back where finite: a channel whose new value is not finite
    (a non-finite batch statistic) keeps its old value, as the layer's update keeps it."""
    view, gamma, beta = _kernel_input(layer, inputs)
    # Flat views: the kernel takes length-C buffers, the variables have the features' shape.
    variables = (layer.moving_mean.value.view(-1), layer.moving_variance.value.view(-1))
    running = [value.clone() for value in variables]
    y, _, _ = torch.native_batch_norm(
        view, gamma, beta, *running, True, 1.0 - layer.momentum, layer.epsilon
    )
    with torch.no_grad():
        for variable, new in zip(variables, running):
            variable.copy_(torch.where(torch.isfinite(new), new, variable))
    return y.reshape(inputs.shape), None, None


class _ClosedFormNormalization(torch.autograd.Function):
    """Alg. 1 over ``dims`` of ``x`` (channels last), optionally over the entries a mask keeps,
    with a closed-form backward: masked inputs and ghost batches.

    Statistics are taken per group (the dims not reduced, the channels last), keepdims. Every
    entry is normalized with its group's statistics of the kept entries, so for
    ``g = dy * gamma`` and ``x_hat = (x - mean) / sqrt(var + eps)``::

        dx = (g - kept / n * (sum(g) + x_hat * sum(g * x_hat))) / sqrt(var + eps)

    with the sums over every entry of a group (the outputs of masked entries depend on the
    statistics too) and ``n`` the group's count of kept entries; gamma's and beta's gradients
    add up over the groups. ``where`` keeps masked values out of the statistics even when they
    are inf or nan, as on the plain path; an empty group gets mean 0 and variance 0. A masked
    step by autodiff of the plain path took about 4.6x the unmasked kernel's time on a CPU."""

    @staticmethod
    def forward(ctx, x, mask, gamma, beta, epsilon, dims):
        groups = [1 if d in dims else size for d, size in enumerate(x.shape)]
        if mask is None:
            count = x.new_full(groups, float(math.prod([x.shape[d] for d in dims])))
            kept = x
        else:
            count = torch.sum(mask, dims, keepdim=True, dtype=x.dtype).expand(groups)
            kept = torch.where(mask, x, 0.0)
        safe = torch.clamp(count, min=1.0)
        mean = torch.sum(kept, dims, keepdim=True) / safe
        centered = x - mean
        kept = centered if mask is None else torch.where(mask, centered, 0.0)
        # The sum of squares without writing them: a norm reads its input once.
        variance = torch.linalg.vector_norm(kept, dim=dims, keepdim=True) ** 2 / safe
        inverse = torch.rsqrt(variance + epsilon)
        scale = inverse if gamma is None else inverse * gamma
        y = centered * scale if beta is None else torch.addcmul(beta, centered, scale)
        ctx.save_for_backward(centered, mask, safe, inverse, gamma)
        ctx.has_beta, ctx.dims = beta is not None, dims
        ctx.mark_non_differentiable(count, mean, variance)
        return y, count, mean, variance

    @staticmethod
    def backward(ctx, dy, *_):
        centered, mask, safe, inverse, gamma = ctx.saved_tensors
        dims = ctx.dims
        sum_dy = torch.sum(dy, dims, keepdim=True)
        sum_dy_x_hat = torch.sum(dy * centered, dims, keepdim=True) * inverse
        scale = inverse if gamma is None else inverse * gamma
        # dx = scale * dy - kept * (scale / n) * (sum(dy) + x_hat * sum(dy * x_hat)), the
        # group's factors folded into small tensors: three full-size elementwise ops.
        per_entry = scale / safe
        correction = torch.addcmul(per_entry * sum_dy, centered, per_entry * sum_dy_x_hat * inverse)
        if mask is not None:
            correction = torch.where(mask, correction, 0.0)
        dx = correction.neg_().addcmul_(dy, scale)
        # Parameters are shared by every group: their gradients add up.
        channel_axes = tuple(range(dy.dim() - 1))
        dgamma = None if gamma is None else torch.sum(sum_dy_x_hat, channel_axes)
        dbeta = torch.sum(sum_dy, channel_axes) if ctx.has_beta else None
        return dx, None, dgamma, dbeta, None, None


def _closed_form_training(layer, inputs, mask):
    """``(outputs, moments, group axes)`` of :class:`_ClosedFormNormalization` (features last):
    the batch as ``[A, C]``, or ghost batches in the plain path's view
    (:class:`keras_bn.moments.Groups`)."""
    channels = math.prod(layer._param_shape)
    x = inputs if inputs.dtype == torch.float32 else inputs.float()
    gamma, beta = _vector(layer.gamma, layer.scale), _vector(layer.beta, layer.center)
    if layer.virtual_batch_size is None:
        view, flags = x.reshape(-1, channels), None
        if mask is not None:
            # Keras's mask (inputs.shape[:-1]) arrives broadcast over the channels: per row.
            flags = mask[..., :1] if mask.stride(-1) == 0 else mask
            flags = flags.reshape(view.shape[0], -1)
        y, count, mean, variance = _ClosedFormNormalization.apply(
            view, flags, gamma, beta, layer.epsilon, (0,)
        )
        return y.reshape(inputs.shape), moments_lib.Moments(count[0], mean[0], variance[0]), []
    groups = moments_lib.Groups(1, layer.virtual_batch_size)
    lead = tuple(x.shape[: x.dim() - len(layer._feature_axes)])
    view = groups.split(x.reshape(*lead, channels))
    flags = None if mask is None else groups.split(mask.reshape(*lead, channels))
    dims = tuple(groups.axes(list(range(len(lead)))))
    y, count, mean, variance = _ClosedFormNormalization.apply(
        view, flags, gamma, beta, layer.epsilon, dims
    )
    moments = moments_lib.Moments(count, mean, variance)
    return y.reshape(inputs.shape), moments, groups.group_axes()


def settled_renorm_state(state):
    """Renorm's averages as read for this batch, tensors of their own under ``torch.compile``
    too: Inductor would otherwise recompute the copies in the backward from the variables,
    which the moving-statistics update has overwritten in place by then ("modified by an
    inplace operation"). A graph break makes them outputs of a graph of their own."""
    if torch.compiler.is_compiling():
        torch._dynamo.graph_break()
    return state


def compiled(function):
    return function


def has_float64() -> bool:
    return True
