"""The Batch Normalization layer (Ioffe & Szegedy, 2015) for Keras 3, on every backend.

Written once with ``keras.ops``; ``keras_bn.backends`` holds what differs per backend (how
per-replica statistics travel, and the fast paths).
"""

from __future__ import annotations

import warnings

import keras
from keras import constraints, initializers, ops, regularizers

from keras_bn import backends, moving_average, transform
from keras_bn import moments as moments_lib

# cuDNN's fused kernel (TensorFlow's FusedBatchNormV3) refuses epsilon below 1e-5.
KERNEL_MIN_EPSILON = 1.001e-5


@keras.saving.register_keras_serializable(package="keras_bn")
class BatchNormalization(keras.layers.BatchNormalization):
    """Batch Normalization, exactly as the paper defines it.

    In training (``training=True``) the layer normalizes with the statistics of the current
    batch (Alg. 1: biased variance), then scales by ``gamma`` and shifts by ``beta``. In
    inference it applies the affine map given by the population statistics
    ``moving_mean`` / ``moving_variance``. Statistics are taken over every axis but ``axis``
    (the paper's conv rule: a batch of ``m`` images of ``p x q`` gives ``m*p*q`` values per
    feature map).

    It runs on every Keras backend (TensorFlow, JAX, PyTorch) with the same meaning of every
    argument, and is a subclass of ``keras.layers.BatchNormalization``, so
    ``isinstance(layer, keras.layers.BatchNormalization)`` holds (loops that freeze every BN
    find it); ``keras.layers.BatchNormalization``'s own code is not used.

    Differences from ``keras.layers.BatchNormalization`` (all measured by the tests):

    - The moving variance receives the *unbiased* estimate ``n/(n-1) * var`` where ``n`` is the
      number of values behind the statistic (batch x spatial positions, unmasked entries only,
      summed over replicas when ``synchronized``), as the paper's Alg. 2 does.
      ``unbiased_variance=False`` gives Keras's behaviour.
    - ``momentum=None`` gives a cumulative average over every batch seen.
    - A batch with no value for a channel, or with non-finite statistics (an fp16 overflow
      step), leaves that channel's moving statistics unchanged. With one value (a dense layer
      trained with batch size 1) the moving mean moves; the variance moves toward 0 with
      ``unbiased_variance=False`` (as Keras and tf-keras) and keeps its value with the default
      (``n/(n-1)`` is undefined for n = 1). With ``momentum=None`` such a channel keeps both,
      so one count of batches weighs them.
    - ``synchronized=True`` computes moments over the global batch with one exchange forward
      and one backward, merged stably and weighted by each replica's real count.
    - Moving statistics stay identical on every replica or device, and equal the global
      batch's update, in both modes.
    - ``axis`` may be a list of axes. A fast training transform runs on every backend (see
      ``fused``): on TensorFlow whenever the feature axes are a contiguous block first or last,
      for any rank, locally, across replicas, with renorm and (feature axes last) ghost
      batches or masks.

    Data parallelism, backend by backend (the same meaning of ``synchronized`` everywhere):

    - TensorFlow, any ``tf.distribute`` strategy (Mirrored, MultiWorkerMirrored, TPU): the
      call sees one replica's batch; ``synchronized=True`` exchanges per-replica rows (one
      all-reduce forward, one backward; in-graph sums under MirroredStrategy).
    - JAX, ``keras.distribution.DataParallel`` or a ``ModelParallel`` mesh with a batch axis:
      the call sees the GLOBAL batch, sharded over the devices. ``synchronized=False``
      normalizes each device's slice with its own statistics (a view, no collective); the
      moving statistics take one collective. ``synchronized=True`` normalizes with the global
      batch, with one collective forward and one backward (Keras's own layer is always global
      there, with five). Ghost batches split inside each device's slice, as a TensorFlow
      replica groups its own batch.
    - PyTorch, ``torch.distributed`` initialized (a process per device, as DDP runs): the
      call sees one rank's batch; ``synchronized=True`` exchanges rows through one
      differentiable all-reduce forward and one backward. The moving statistics receive the
      global update on every rank (Keras's variables are torch Parameters, not buffers, so
      DDP's ``broadcast_buffers`` would not keep them in step). Reducing the parameters'
      gradients stays the training loop's (or DDP's) job.

    Also from tf-keras: ``virtual_batch_size`` (ghost batch normalization). Batch
    Renormalization (``renorm``) has Keras 3.15's weights, weight order and config keys, so a
    Keras layer's config and weights load into this one (with ``unbiased_variance=False`` it
    gives the same outputs).

    Args:
        axis: Integer or list of integers, the feature axis/axes (``-1`` for channels_last,
            ``1`` for channels_first). Parameters have the shape of these axes.
        momentum: Weight of the old value in the moving averages, in ``[0, 1)``
            (``moving = momentum * moving + (1 - momentum) * batch``), or ``None`` for a
            cumulative average over all training batches seen. Defaults to ``0.99``.
        epsilon: Small float > 0 added to the variance. Defaults to ``1e-3``.
        center: If True, add the learned offset ``beta``.
        scale: If True, multiply by the learned ``gamma``. Can be False when the next layer
            is linear or ReLU (the next layer can absorb the scale).
        beta_initializer: Initializer for ``beta``.
        gamma_initializer: Initializer for ``gamma``.
        moving_mean_initializer: Initializer for the moving mean.
        moving_variance_initializer: Initializer for the moving variance.
        beta_regularizer: Optional regularizer for ``beta``.
        gamma_regularizer: Optional regularizer for ``gamma``.
        beta_constraint: Optional constraint for ``beta``.
        gamma_constraint: Optional constraint for ``gamma``.
        moving_mean_constraint: Optional constraint applied to the moving mean after each
            update.
        moving_variance_constraint: Optional constraint applied to the moving variance after
            each update.
        renorm: If True, Batch Renormalization (Ioffe, 2017): in training the normalized
            values become ``x_hat * r + d`` with ``r = clip(sigma_B / sigma)`` and
            ``d = clip((mu_B - mu) / sigma)``, where ``sigma_B = sqrt(batch variance +
            epsilon)`` and ``mu``, ``sigma`` are the ``renorm_mean`` / ``renorm_stddev`` moving
            averages (``sigma`` floored at ``sqrt(epsilon)``). ``r`` and ``d`` carry no gradient.
            Adds the weights ``moving_stddev``, ``renorm_mean``, ``renorm_stddev`` (Keras's names
            and order). ``moving_stddev`` moves toward ``sqrt(population variance + epsilon)``
            (``n/(n-1)``-corrected when ``unbiased_variance``) and
            ``moving_variance = max(moving_stddev**2 - epsilon, 0)``; inference is unchanged.
            With ``synchronized=True``, ``r`` and ``d`` come from the global batch.
        renorm_clipping: Dict with optional keys ``"rmin"``, ``"rmax"``, ``"dmax"`` (defaults
            ``0``, ``inf``, ``inf``): ``r`` is clipped to ``[rmin, rmax]``, ``d`` to
            ``[-dmax, dmax]``. Only used with ``renorm=True``.
        renorm_momentum: Weight of the old value of ``renorm_mean`` / ``renorm_stddev``, in
            ``[0, 1)``. Defaults to ``0.99``. Only used with ``renorm=True``; ``momentum`` (or
            ``None``) still drives the inference statistics.
        synchronized: If True, batch statistics are computed over the global batch of every
            replica or device (see "Data parallelism" above). With no distribution (or in a
            TensorFlow cross-replica context) the layer behaves as the local one.
        unbiased_variance: If True (default, as the paper), the moving variance is updated with
            ``n/(n-1)`` times the batch variance.
        fused: How the training transform is computed. On TensorFlow, when the feature axes
            are a contiguous block first or last and there is no mask: ``None`` (default) the
            fastest fused path (FusedBatchNormV3 where TensorFlow runs oneDNN or on a GPU, an
            XLA formulation elsewhere and always inside an XLA-compiled step, where XLA would
            lower the kernel with ``E[x^2] - E[x]^2``); ``True`` FusedBatchNormV3 outside XLA
            (needs ``epsilon >= 1.001e-5``); ``False`` plain ops. Across replicas and for ghost
            batches the fused path is the XLA formulation, and for masked inputs with the
            feature axes last (local statistics, not renorm) an XLA-compiled transform with a
            closed-form backward. On JAX the fast path is the
            transform with a closed-form backward (a ``jax.custom_vjp``; any axes, masks,
            renorm and ghost batches); on PyTorch it is the native batch-norm kernel (feature
            axes first or last, no mask, local statistics, renorm too) and, for masked inputs
            and ghost batches with the feature axes last (not renorm), the transform with a
            closed-form backward (a ``torch.autograd.Function``). ``fused=True`` where no fast path
            can run is a ValueError at build. After build, ``layer.fused`` says whether the
            training transform runs fused, as tf-keras reports it. All paths give the same
            results to float rounding.
        virtual_batch_size: Optional positive int: ghost batch normalization (Hoffer et al.,
            2017). In training each ghost batch of ``virtual_batch_size`` examples is
            normalized with its own statistics, grouped as tf-keras groups them: a batch of
            ``N`` examples is viewed as ``[virtual_batch_size, N / virtual_batch_size, ...]``,
            so ghost batch ``j`` holds examples ``j, j + N/v, j + 2N/v, ...``. The moving
            statistics move toward the average of the ghost batches' means and variances
            (each variance ``n/(n-1)``-corrected on the ghost batch's own count when
            ``unbiased_variance``; a ghost batch whose values are all masked adds nothing),
            once per step, as tf-keras does. The batch size must be a
            multiple of it in training (ValueError naming both; an InvalidArgumentError for a
            batch size known only at run time); inference uses the moving statistics for a
            batch of any size. It cannot be combined with ``synchronized=True`` (ghost batches
            are subsets of one replica's batch: each replica normalizes its own ghost batches,
            and the moving statistics still agree across replicas) nor with ``renorm=True``.
            Feature axes may not include axis 0.
        **kwargs: Base layer keyword arguments (``name``, ``dtype``, ...).

    Call arguments:
        inputs: Input tensor of any rank. Integer and boolean inputs are cast to float32, as
            Keras casts them.
        training: Python boolean or None. True normalizes with batch statistics and updates
            the moving statistics; False uses the moving statistics.
        mask: Optional boolean tensor broadcastable to ``inputs``, or of rank
            ``rank(inputs) - 1``: then, as in Keras (what ``Masking`` and ``Embedding``
            produce), it is ``inputs.shape[:-1]`` and is expanded on the last axis, whatever
            ``axis`` is. Masked-out entries are excluded from the statistics and from ``n``;
            every entry is normalized.

    Setting ``layer.trainable = False`` freezes the layer *and* runs it in inference mode,
    as in Keras (useful for fine-tuning); it does not update the moving statistics.

    Mixed precision: parameters and statistics are float32; float16/bfloat16 inputs are
    normalized with float32 math and the output has the layer's compute dtype. A float64
    layer keeps float64 statistics, except on JAX without ``jax_enable_x64`` (JAX has no
    float64 arrays then): it warns at build and computes in float32.

    A ``.keras`` file holding this layer loads after ``import keras_bn`` (which registers the
    class), on any backend.

    Example:

    >>> import numpy as np, keras, keras_bn
    >>> layer = keras_bn.BatchNormalization()
    >>> x = np.random.default_rng(0).normal(3.0, 2.0, (60, 100)).astype("float32")
    >>> y = layer(x, training=True)
    >>> bool(abs(float(keras.ops.mean(y))) < 1e-5)
    True

    Loading weights written by ``keras.layers.BatchNormalization`` into a layer with
    ``momentum=None`` (which has one more variable, ``moving_count``, always last): the loaded
    statistics count as one batch seen (``moving_count = 1``); see ``load_own_variables``.

    Reference:
        - [Ioffe and Szegedy, 2015](https://arxiv.org/abs/1502.03167).
        - [Ioffe, 2017: Batch Renormalization](https://arxiv.org/abs/1702.03275).
        - [Hoffer et al., 2017: ghost batch normalization](https://arxiv.org/abs/1705.08741).
    """

    def __init__(
        self,
        axis=-1,
        momentum=0.99,
        epsilon=1e-3,
        center=True,
        scale=True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        moving_mean_initializer="zeros",
        moving_variance_initializer="ones",
        beta_regularizer=None,
        gamma_regularizer=None,
        beta_constraint=None,
        gamma_constraint=None,
        moving_mean_constraint=None,
        moving_variance_constraint=None,
        renorm=False,
        renorm_clipping=None,
        renorm_momentum=0.99,
        synchronized=False,
        unbiased_variance=True,
        fused=None,
        virtual_batch_size=None,
        **kwargs,
    ):
        # Keras's BatchNormalization.__init__ is skipped on purpose: it casts axis to an int and
        # checks arguments its own way. Ours is a subclass for isinstance checks only.
        keras.layers.Layer.__init__(self, **kwargs)
        self.axis = _validate_axis(axis)
        if momentum is not None:
            momentum = _number("momentum", momentum)
            if not 0.0 <= momentum < 1.0:
                raise ValueError(
                    f"momentum must be in [0, 1) (the weight of the old value), or None for a "
                    f"cumulative average; got momentum={momentum}."
                )
        self.momentum = momentum
        epsilon = _number("epsilon", epsilon)
        if not epsilon > 0.0:
            raise ValueError(f"epsilon must be > 0; got epsilon={epsilon}.")
        self.epsilon = epsilon
        self.center = bool(center)
        self.scale = bool(scale)
        self.beta_initializer = initializers.get(beta_initializer)
        self.gamma_initializer = initializers.get(gamma_initializer)
        self.moving_mean_initializer = initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = initializers.get(moving_variance_initializer)
        self.beta_regularizer = regularizers.get(beta_regularizer)
        self.gamma_regularizer = regularizers.get(gamma_regularizer)
        self.beta_constraint = constraints.get(beta_constraint)
        self.gamma_constraint = constraints.get(gamma_constraint)
        self.moving_mean_constraint = constraints.get(moving_mean_constraint)
        self.moving_variance_constraint = constraints.get(moving_variance_constraint)
        self.synchronized = bool(synchronized)
        self.unbiased_variance = bool(unbiased_variance)
        if fused not in (None, True, False):
            raise ValueError(f"fused must be None, True or False; got fused={fused!r}.")
        if fused is True and epsilon < KERNEL_MIN_EPSILON:
            raise ValueError(
                f"fused=True uses FusedBatchNormV3, which needs epsilon >= "
                f"{KERNEL_MIN_EPSILON}; got epsilon={epsilon}. Use fused=None."
            )
        self._fused_option = fused
        # As tf-keras reports it: after build, whether the training transform runs fused.
        self.fused = fused
        self.renorm = bool(renorm)
        self.renorm_clipping, self._clipping = _validate_renorm_clipping(
            self.renorm, renorm_clipping
        )
        self.renorm_momentum = _number("renorm_momentum", renorm_momentum)
        if self.renorm and not 0.0 <= self.renorm_momentum < 1.0:
            raise ValueError(
                f"renorm_momentum must be in [0, 1) (the weight of the old value of renorm_mean "
                f"and renorm_stddev); got renorm_momentum={renorm_momentum}."
            )
        self.virtual_batch_size = _validate_virtual_batch_size(
            virtual_batch_size, self.synchronized, self.renorm
        )
        self.supports_masking = True

        self.gamma = None
        self.beta = None
        self.moving_mean = None
        self.moving_variance = None
        self.moving_stddev = None
        self.renorm_mean = None
        self.renorm_stddev = None
        self.moving_count = None
        # Set by keras_bn.population while it measures population statistics (Alg. 2): called
        # with (mean, biased variance, count) of each batch the layer normalized with (each
        # device slice of a JAX batch) instead of updating the moving statistics. Read when
        # the call is traced.
        self._statistics_observer = None
        self._feature_axes = None
        self._build_rank = None

    # ----------------------------------------------------------------------------- building

    def build(self, input_shape):
        rank = len(input_shape)
        self._feature_axes = _normalize_axes(self.axis, rank)
        if self.virtual_batch_size is not None and 0 in self._feature_axes:
            raise ValueError(
                f"virtual_batch_size splits the batch axis 0 into ghost batches, so axis 0 "
                f"cannot be a feature axis; got axis={self.axis}."
            )
        self._build_rank = rank
        param_shape = []
        for a in self._feature_axes:
            if input_shape[a] is None:
                raise ValueError(
                    f"axis={self.axis}: the feature axis {a} of the input shape {input_shape} "
                    "must be known when the layer is built."
                )
            param_shape.append(int(input_shape[a]))
        self._param_shape = tuple(param_shape)
        self._reduction_axes = moments_lib.reduction_axes(rank, self._feature_axes)
        self._broadcast_shape = [
            input_shape[a] if a in self._feature_axes else 1 for a in range(rank)
        ]
        self._fused_layout = moments_lib.feature_layout(self._feature_axes, rank)
        self.fused = self._check_fused(rank)
        if self.variable_dtype == "float64" and self._statistics_dtype != "float64":
            warnings.warn(
                f"Layer {self.name!r} has dtype float64, but JAX runs without float64 "
                "(jax_enable_x64 is off): its statistics and math are float32. Set "
                "JAX_ENABLE_X64=1 (or jax.config.update('jax_enable_x64', True)) before "
                "creating the model for float64.",
                stacklevel=2,
            )

        if self.scale:
            self.gamma = self.add_weight(
                shape=self._param_shape,
                name="gamma",
                initializer=self.gamma_initializer,
                regularizer=self.gamma_regularizer,
                constraint=self.gamma_constraint,
                trainable=True,
                autocast=False,
            )
        if self.center:
            self.beta = self.add_weight(
                shape=self._param_shape,
                name="beta",
                initializer=self.beta_initializer,
                regularizer=self.beta_regularizer,
                constraint=self.beta_constraint,
                trainable=True,
                autocast=False,
            )
        self.moving_mean = self._add_statistic(
            "moving_mean", self.moving_mean_initializer, self.moving_mean_constraint
        )
        self.moving_variance = self._add_statistic(
            "moving_variance", self.moving_variance_initializer, self.moving_variance_constraint
        )
        if self.renorm:
            # Keras 3's weights, in its order: the inference stddev, and the renorm averages
            # (mu, sigma of the renorm paper) used in training. Stddevs start at the square
            # root of the moving variance initializer.
            def stddev_initializer(shape, dtype=None):
                return ops.sqrt(_clone(self.moving_variance_initializer)(shape, dtype=dtype))

            self.moving_stddev = self._add_statistic("moving_stddev", stddev_initializer, None)
            self.renorm_mean = self._add_statistic(
                "renorm_mean", _clone(self.moving_mean_initializer), None
            )
            self.renorm_stddev = self._add_statistic("renorm_stddev", stddev_initializer, None)
        if self.momentum is None:
            # Last, so the first variables are Keras's (see load_own_variables).
            self.moving_count = self._add_statistic("moving_count", initializers.Zeros(), None)

    def _check_fused(self, rank):
        """Whether the (unmasked) training transform runs fused on this backend; a ValueError
        for ``fused=True`` where no fused path can run."""
        backend = backends.current()
        fusable = backend.fusable(self._feature_axes, rank, self.virtual_batch_size)
        if self._fused_option is True and not fusable:
            raise ValueError(
                f"fused=True, but no fused training transform runs for axis={self.axis} on "
                f"inputs of rank {rank} with the {keras.backend.backend()} backend "
                f"({backend.FUSED_PATHS}). Use fused=None (the fastest path that applies)."
            )
        return bool(fusable and self._fused_option is not False)

    def _add_statistic(self, name, initializer, constraint):
        # Under tf.distribute, statistics are synchronized ON_READ: each replica writes its own
        # copy with no collective. The layer feeds every replica the same (global) update, so
        # the copies stay identical and the mean read in a cross-replica context equals each.
        # (add_weight takes no `synchronization`; a tracked keras.Variable is what it makes.)
        with keras.name_scope(self.name, caller=self):
            variable = keras.Variable(
                initializer=initializer,
                shape=self._param_shape,
                dtype=self._statistics_dtype,
                trainable=False,
                autocast=False,
                synchronization="on_read",
                aggregation="mean",
                name=name,
            )
        variable.constraint = constraint
        self._track_variable(variable)
        return variable

    @property
    def _statistics_dtype(self):
        """float64 for a float64 layer where the backend has float64, else float32."""
        if self.variable_dtype != "float64" or not backends.current().has_float64():
            return "float32"
        return "float64"

    def compute_output_shape(self, input_shape):
        _normalize_axes(self.axis, len(input_shape))
        return input_shape

    def compute_mask(self, inputs, mask=None):
        return mask

    # ------------------------------------------------------------------------------ calling

    def call(self, inputs, training=None, mask=None):
        inputs = self._checked_inputs(inputs)
        if mask is not None:
            # Checked in inference too: a wrong mask is a bug wherever it is passed.
            mask = moments_lib.broadcast_mask(mask, inputs, self._feature_axes)
        if training and self.trainable:
            averages = self._renorm_averages()
            outputs, batch = self._normalize_with_batch_statistics(inputs, mask, averages)
            if batch is not None:  # None: the fused kernel moved the moving statistics itself
                self._record_batch_statistics(*batch, averages)
        else:
            outputs = self._normalize_with_moving_statistics(inputs)
        return ops.cast(outputs, self._output_dtype)

    @property
    def _output_dtype(self):
        # A float64 layer on JAX without float64 gives float32, as its statistics (see build).
        if self.compute_dtype == "float64" and self._statistics_dtype != "float64":
            return "float32"
        return self.compute_dtype

    def _checked_inputs(self, inputs):
        """The inputs, checked against the built shape; integers and booleans are cast to
        float as Keras casts them (``result_type(dtype, "float32")``, i.e. float32)."""
        inputs = ops.convert_to_tensor(inputs)
        dtype = keras.backend.standardize_dtype(inputs.dtype)
        if "float" not in dtype:
            inputs = ops.cast(inputs, keras.backend.result_type(dtype, "float32"))
        rank = len(inputs.shape)
        if rank != self._build_rank:
            raise ValueError(
                f"Layer {self.name!r} was built for inputs of rank {self._build_rank} "
                f"(axis={self.axis}) but was called on inputs of rank {rank} "
                f"(shape {tuple(inputs.shape)}). Use a separate layer for each input rank."
            )
        got = tuple(inputs.shape[a] for a in self._feature_axes)
        if any(g is not None and g != p for g, p in zip(got, self._param_shape)):
            raise ValueError(
                f"Layer {self.name!r} was built for {self._param_shape} features on axis "
                f"{self.axis} but was called on inputs with {got} (shape "
                f"{tuple(inputs.shape)}). Use a separate layer for each feature size."
            )
        return inputs

    def _params(self, dtype, shape):
        """gamma and beta in the layout ``shape`` (ones / zeros when disabled)."""
        gamma = ops.reshape(ops.cast(self.gamma, dtype), shape) if self.scale else 1.0
        beta = ops.reshape(ops.cast(self.beta, dtype), shape) if self.center else 0.0
        return gamma, beta

    def _statistic(self, variable, shape):
        return ops.reshape(_read(variable), shape)

    def _renorm_averages(self):
        """``(renorm_mean, renorm_stddev)`` read once for a training call, or None.

        The outputs (:meth:`_renorm_state`) and the moving-statistics update both use this one
        read, so the update depends on it by data. On TensorFlow a read of its own was ordered
        before the update's AssignVariableOp only by a control edge, which Grappler's dependency
        optimizer drops: under load about one fused renorm step in three normalized with the
        averages its own update had just written. Passed along, not kept on the layer: the
        replicas of a MirroredStrategy step call one layer from several threads at once.
        """
        if not self.renorm:
            return None
        return _read(self.renorm_mean), _read(self.renorm_stddev)

    def _renorm_state(self, shape, averages):
        """Batch Renormalization's state for this batch from the call's ``averages``
        (:meth:`_renorm_averages`) in ``shape``, or None."""
        if averages is None:
            return None
        mean, stddev = averages
        state = transform.Renorm(
            ops.reshape(mean, shape), ops.reshape(stddev, shape), self._clipping
        )
        # The backward keeps these values while the update overwrites the variables.
        settled = getattr(backends.current(), "settled_renorm_state", None)
        return state if settled is None else settled(state)

    def _normalize_with_moving_statistics(self, inputs):
        x = ops.cast(inputs, self._statistics_dtype)
        shape = self._broadcast_shape
        gamma, beta = self._params(x.dtype, shape)
        multiplier, offset = transform.inference_affine(
            self._statistic(self.moving_mean, shape),
            self._statistic(self.moving_variance, shape),
            gamma,
            beta,
            ops.cast(self.epsilon, x.dtype),
        )
        return x * multiplier + offset

    def _normalize_with_batch_statistics(self, inputs, mask, averages):
        """Alg. 1 (with renorm's correction when ``renorm``). Returns the outputs and
        ``(target, moments)``: what the moving statistics move toward (the global batch's
        per-channel Moments, wherever the statistics were taken; the ghost batches' averaged
        Estimate) and the moments the batch was normalized with (for Alg. 2); None for both
        where the fused kernel moved the moving statistics itself."""
        backend = backends.current()
        replicas = backend.replica_group()
        synced = replicas if self.synchronized else None
        # A JAX data-parallel call sees the global batch: per-device statistics are a view.
        slices = 1 if self.synchronized else backend.device_slices()
        plan = backend.fused_plan(self, inputs, mask, synced, slices, averages)
        if plan is not None:
            outputs, moments, group_axes = plan()
            if moments is None:  # the kernel updated the moving statistics in place
                return outputs, None
        else:
            outputs, moments, group_axes = self._training_transform(
                inputs, mask, synced, slices, backend, averages
            )
        return outputs, self._population_target(moments, group_axes, replicas, synced, backend)

    def _training_transform(self, inputs, mask, replicas, slices, backend, averages):
        """The training transform with plain ``keras.ops`` (differentiated by autodiff): for
        masks, ghost batches, float64, and feature axes the fused paths do not handle.
        Returns ``(outputs, moments, group axes of the moments)``."""
        x = ops.cast(inputs, self._statistics_dtype)
        groups = moments_lib.Groups(
            slices, self.virtual_batch_size, getattr(backend, "split_ghost_batches", None)
        )
        xs = groups.split(x)
        masks = None if mask is None else groups.split(mask)
        axes, shape = groups.axes(self._reduction_axes), groups.shape(self._broadcast_shape)
        if replicas is not None:
            batch = backend.synced_moments(xs, axes, masks, replicas)
        else:
            batch = moments_lib.local_moments(xs, axes, masks)
        epsilon = ops.cast(self.epsilon, x.dtype)
        multiplier, offset, _ = transform.training_scale_and_offset(
            batch.mean,
            batch.variance,
            *self._params(x.dtype, shape),
            epsilon,
            self._renorm_state(shape, averages),
        )
        outputs = groups.merge(transform.apply(xs, batch.mean, multiplier, offset), x)
        return outputs, batch, groups.group_axes()

    def _population_target(self, moments, group_axes, replicas, synced, backend):
        """``(target, observed)`` in the parameter shape from the moments the batch was
        normalized with (see :meth:`_normalize_with_batch_statistics`)."""
        moments = moments_lib.Moments(*(ops.stop_gradient(v) for v in moments))
        count = ops.broadcast_to(moments.count, ops.shape(moments.mean))
        moments = moments_lib.Moments(count, moments.mean, moments.variance)
        observed = self._observed(moments, group_axes)
        if self._statistics_observer is not None:
            return None, observed  # Alg. 2 measures: no exchange for moving statistics
        if self.virtual_batch_size is not None:
            # Each ghost batch's own estimate (n/(n-1) on its own count), then their average:
            # over this replica's ghost batches, or every replica's.
            target = moments_lib.estimate(moments, self.unbiased_variance)
            sums = moments_lib.estimate_sums(target, group_axes)
            if replicas is not None and synced is None:
                sums = replicas.sum(sums)
            target = moments_lib.estimate_from_sums(sums)
            target = moments_lib.Estimate(*(self._per_channel(v) for v in target))
            return target, observed
        if group_axes:
            # Device slices of a JAX batch: their exact (Chan) merge, on every device.
            gathered = backend.replicated(
                ops.stack([moments.count, moments.mean, moments.variance * moments.count])
            )
            moments = moments_lib.merge_rows(*(gathered[i] for i in range(3)), axis=group_axes)
        elif replicas is not None and synced is None:
            # Local normalization, but every replica's moving statistics receive the same
            # global-batch update, so the replicas' copies never drift apart.
            row = moments_lib.pack_row(
                moments.count,
                moments.mean,
                moments.variance * moments.count,
                replicas.index,
                replicas.count,
            )
            moments = moments_lib.merge_packed_rows(replicas.sum(row))
        # The estimate is taken inside the compiled update (one launch on TensorFlow).
        return moments_lib.Moments(*(self._per_channel(v) for v in moments)), observed

    def _observed(self, moments, group_axes):
        """The batches Alg. 2 sees, as per-channel :class:`Moments`: the batch; each device
        slice of a JAX batch; the average over ghost batches (as the moving statistics)."""
        if not group_axes:
            return [moments_lib.Moments(*(self._per_channel(v) for v in moments))]
        if self.virtual_batch_size is not None:
            averaged = (ops.mean(v, axis=group_axes, keepdims=True) for v in moments)
            return [moments_lib.Moments(*(self._per_channel(v) for v in averaged))]
        return [
            moments_lib.Moments(*(self._per_channel(v[d]) for v in moments))
            for d in range(moments.mean.shape[0])
        ]

    def _per_channel(self, value):
        """A statistic in the parameter shape (from a keepdims or merged layout)."""
        return ops.reshape(value, self._param_shape)

    # ------------------------------------------------------------------- moving statistics

    def _record_batch_statistics(self, target, moments, averages):
        if self._statistics_observer is not None:
            # Alg. 2 wants the batches the layer actually normalized with.
            for batch in moments:
                self._statistics_observer(batch.mean, batch.variance, batch.count)
            return
        self._update_moving_statistics(target, averages)

    def _update_moving_statistics(self, batch, averages):
        """Moves the population estimates toward this batch (its per-channel ``Moments``, or
        the ghost batches' averaged ``Estimate``), channel by channel.

        Channels whose batch gave no value or non-finite statistics keep their values; with
        ``unbiased_variance`` a channel with one value moves its mean only (``n/(n-1)`` is
        undefined for its variance). With ``momentum=None`` a channel moves only when both
        are usable, so one count of batches weighs both.
        """
        cumulative = self.momentum is None
        if cumulative:
            seen = _read(self.moving_count)
            weight = 1.0 / (seen + 1.0)
        else:
            weight = 1.0 - self.momentum
        old_mean = _read(self.moving_mean)
        old_variance = _read(self.moving_variance)
        update = _compiled_update(backends.current(), self.renorm)
        flags = (self.unbiased_variance, cumulative)
        if self.renorm:
            renorm_mean, renorm_stddev = averages  # the values the outputs used
            moved = update(
                old_mean,
                _read(self.moving_stddev),
                old_variance,
                renorm_mean,
                renorm_stddev,
                batch,
                weight,
                1.0 - self.renorm_momentum,
                self.epsilon,
                *flags,
            )
            new_mean, new_stddev, new_variance, new_renorm_mean, new_renorm_stddev = moved[:5]
            mean_ok, variance_ok = moved[5:]
            self.moving_stddev.assign(new_stddev)
            self.renorm_mean.assign(new_renorm_mean)
            self.renorm_stddev.assign(new_renorm_stddev)
        else:
            new_mean, new_variance, mean_ok, variance_ok = update(
                old_mean, old_variance, batch, weight, *flags
            )
        if cumulative:
            self.moving_count.assign(ops.where(variance_ok, seen + 1.0, seen))
        for variable, old, new, usable in (
            (self.moving_mean, old_mean, new_mean, mean_ok),
            (self.moving_variance, old_variance, new_variance, variance_ok),
        ):
            if variable.constraint is not None:
                new = ops.where(usable, variable.constraint(new), old)
            variable.assign(new)

    # ------------------------------------------------------------- weights from Keras's layer

    def load_own_variables(self, store):
        """Loads weights saved by this layer, or by ``keras.layers.BatchNormalization``.

        Keras's layer has no ``moving_count``: loaded into a layer with ``momentum=None`` its
        moving statistics count as ONE batch seen (``moving_count = 1``), so the cumulative
        average continues from them and the next training batch gets weight 1/2. Assign
        ``layer.moving_count`` to weigh them as more batches.
        """
        if self.moving_count is not None and len(store.keys()) == len(self.variables) - 1:
            for i, variable in enumerate(self._keras_variables()):
                variable.assign(store[str(i)])
            self.moving_count.assign(ops.ones(self._param_shape))
            return
        super().load_own_variables(store)

    def set_weights(self, weights):
        """As ``keras.layers.Layer.set_weights``; also takes the weights of Keras's layer
        (without ``moving_count``, which then starts at 1: see :meth:`load_own_variables`)."""
        if self.moving_count is not None and len(weights) == len(self.weights) - 1:
            weights = list(weights) + [ops.ones(self._param_shape)]
        super().set_weights(weights)

    def _keras_variables(self):
        """The variables in saving order, without ``moving_count`` (always last)."""
        variables = list(self._trainable_variables) + list(self._non_trainable_variables)
        return [v for v in variables if v is not self.moving_count]

    # ------------------------------------------------------------------------ serialization

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "axis": self.axis,
                "momentum": self.momentum,
                "epsilon": self.epsilon,
                "center": self.center,
                "scale": self.scale,
                "beta_initializer": initializers.serialize(self.beta_initializer),
                "gamma_initializer": initializers.serialize(self.gamma_initializer),
                "moving_mean_initializer": initializers.serialize(self.moving_mean_initializer),
                "moving_variance_initializer": initializers.serialize(
                    self.moving_variance_initializer
                ),
                "beta_regularizer": regularizers.serialize(self.beta_regularizer),
                "gamma_regularizer": regularizers.serialize(self.gamma_regularizer),
                "beta_constraint": constraints.serialize(self.beta_constraint),
                "gamma_constraint": constraints.serialize(self.gamma_constraint),
                "moving_mean_constraint": constraints.serialize(self.moving_mean_constraint),
                "moving_variance_constraint": constraints.serialize(
                    self.moving_variance_constraint
                ),
                "renorm": self.renorm,
                "renorm_clipping": self.renorm_clipping,
                "renorm_momentum": self.renorm_momentum,
                "synchronized": self.synchronized,
                "unbiased_variance": self.unbiased_variance,
                "fused": self._fused_option,
                "virtual_batch_size": self.virtual_batch_size,
            }
        )
        return config


def _number(name, value):
    """``value`` as a float, or a ValueError naming the argument."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number; got {name}={value!r}.")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number; got {name}={value!r}.") from None


def _validate_renorm_clipping(renorm, clipping):
    """``(config value, (rmin, rmax, dmax))`` with Keras's checks and messages, and the
    defaults (0, inf, inf) taken into account: an empty range is refused."""
    if not renorm:
        return clipping, (0.0, float("inf"), float("inf"))
    if clipping is not None and not isinstance(clipping, dict):
        raise ValueError(
            f"renorm_clipping must be a dict with keys 'rmin', 'rmax', 'dmax' or None; got "
            f"renorm_clipping={clipping!r}."
        )
    clipping = dict(clipping or {})
    keys = ["rmax", "rmin", "dmax"]
    if set(clipping) - set(keys):
        raise ValueError(
            f"Received invalid keys for `renorm_clipping` argument: {clipping}. "
            f"Supported values: {keys}."
        )
    given = {k: _number(f"renorm_clipping[{k!r}]", v) for k, v in clipping.items()}
    rmin = given.get("rmin", 0.0)
    rmax = given.get("rmax", float("inf"))
    dmax = given.get("dmax", float("inf"))
    if rmax < rmin:
        raise ValueError(
            f"rmax should be greater than rmin in the `renorm_clipping` argument. "
            f"Received: rmax={rmax}, rmin={rmin}"
            + ("" if "rmin" in given else " (the default rmin)")
            + "."
        )
    if dmax < 0:
        raise ValueError(
            f"dmax should be non-negative in the `renorm_clipping` argument. Received: dmax={dmax}."
        )
    return clipping, (rmin, rmax, dmax)


def _validate_virtual_batch_size(size, synchronized, renorm):
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(
            f"virtual_batch_size must be a positive integer (the examples in each ghost batch) "
            f"or None; got virtual_batch_size={size!r}."
        )
    if synchronized:
        raise ValueError(
            "virtual_batch_size cannot be combined with synchronized=True: ghost batches are "
            "subsets of one replica's batch, so there is nothing to synchronize. Use "
            "synchronized=False (the moving statistics still agree across replicas)."
        )
    if renorm:
        raise ValueError(
            "virtual_batch_size cannot be combined with renorm=True in keras_bn (tf-keras "
            "corrects every ghost batch with the averaged statistics, which is not Batch "
            "Renormalization's Alg. 1). Use one of them."
        )
    return size


def _read(variable):
    """A variable's current value as a tensor (``.value``: JAX's traced state inside ``fit``;
    the copy makes TensorFlow read it instead of capturing the variable)."""
    return ops.copy(variable.value)


_COMPILED_UPDATES = {}


def _compiled_update(backend, renorm):
    """The moving-average update, compiled by the backend where that pays (TensorFlow); a
    dict look-up after the first call (``torch.compile`` traces it; ``functools.cache``
    would make Dynamo warn)."""
    key = (backend.__name__, renorm)
    update = _COMPILED_UPDATES.get(key)
    if update is None:
        function = (
            moving_average.renorm_moved_toward_batch
            if renorm
            else moving_average.moved_toward_batch
        )
        update = _COMPILED_UPDATES[key] = backend.compiled(function)
    return update


def _clone(initializer):
    """A fresh copy of ``initializer`` (a seeded one would otherwise repeat its values).

    From its config, not through ``keras.saving``, whose serialization imports TensorFlow
    wherever it is installed, whatever the backend."""
    if hasattr(initializer, "get_config"):
        return type(initializer).from_config(initializer.get_config())
    return initializer


def _validate_axis(axis):
    """int, or a non-empty list of distinct ints (kept as given, for get_config)."""
    if isinstance(axis, bool):
        raise ValueError(f"axis must be an int or a list of ints; got axis={axis!r}.")
    if isinstance(axis, int):
        return axis
    if (
        isinstance(axis, (list, tuple))
        and axis
        and all(isinstance(a, int) and not isinstance(a, bool) for a in axis)
    ):
        axis = [int(a) for a in axis]
        if len(set(axis)) != len(axis):
            raise ValueError(f"axis contains duplicates: axis={axis}.")
        return axis
    raise ValueError(f"axis must be an int or a non-empty list of ints; got axis={axis!r}.")


def _normalize_axes(axis, rank):
    """Feature axes as sorted non-negative ints, checked against the input rank."""
    axes = [axis] if isinstance(axis, int) else list(axis)
    normalized = []
    for a in axes:
        if not -rank <= a < rank:
            raise ValueError(
                f"axis={axis} is out of range for inputs of rank {rank} "
                f"(valid: {-rank}..{rank - 1})."
            )
        normalized.append(a % rank)
    if len(set(normalized)) != len(normalized):
        raise ValueError(
            f"axis={axis} names the same axis twice for inputs of rank {rank} "
            f"(normalized: {normalized})."
        )
    if len(normalized) == rank:
        raise ValueError(
            f"axis={axis} leaves no axis to take statistics over for inputs of rank {rank}."
        )
    return sorted(normalized)
