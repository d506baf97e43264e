"""Batch-channel normalization and estimated batch norm (Qiao, Wang, Liu, Shen & Yuille 2019,
arXiv 1903.10520, "Micro-batch training with batch-channel normalization and weight
standardization").

* Batch-channel norm (:class:`BatchChannelNorm2d`): batch norm, then group norm over channel groups::

      u = (x - mu_c) / sqrt(var_c + eps) * bn_weight_c + bn_bias_c        (per channel c)
      y = (u - mu_{n,g}) / sqrt(var_{n,g} + eps) * weight_c + bias_c      (per sample n, group g)

  ``mu_c, var_c`` are the batch statistics in training and the running estimates in eval (or, with
  ``estimate=True``, the running estimates in both); ``mu_{n,g}, var_{n,g}`` are taken over the
  channels of group ``g`` and all positions of sample ``n``. The group-norm affine is per channel
  (as in ``nn.GroupNorm``), which contains the released code's per-group affine as a special case.
* Estimated batch norm (:class:`EstimatedBatchNorm2d`, ``estimate=True``): for micro-batches the
  batch statistics are too noisy, so the layer normalizes with its running estimates in training
  too, ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias``, after updating them
  with the batch (no gradient flows through the estimates; the gradient w.r.t. ``x`` is that of a
  per-channel affine map)::

      running_mean <- (1 - m) * running_mean + m * mean_B(x)
      running_var  <- (1 - m) * running_var  + m * mean_B((x - running_mean)^2)

  with ``m = momentum`` (PyTorch's convention; ``momentum=None`` is the cumulative average
  ``m = 1 / num_batches_tracked``, whose first step copies the first batch's statistics). The
  variance is taken around a running mean, not the batch mean, as the authors do: with a batch of
  one or two images the spread of the means between batches is part of the variance the layer must
  divide by. Differences from the released code, on purpose: (1) its moving speed is a buffer that
  starts at 0 and is never set, so its estimates never move; here they move with ``momentum`` from
  the first step, and ``num_batches_tracked`` counts the updates; (2) it centres the variance on
  the running mean *before* this batch's update, here on the updated one, so that the first step
  with ``momentum=None`` copies the batch's variance instead of adding the square of the distance
  between the batch mean and the initial 0.

In eval mode every sample's output depends on that sample alone. Estimated batch norm is a
per-channel affine map in eval (and in training) and defines ``eval_affine()`` for folding;
batch-channel norm does not (its group part is not per-channel affine).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .groupnorm import _for_dims, check_group_input, check_groups
from ._common import (check_input, check_layer_args, init_running_stats, pick_by_dims, running_affine,
                      values_per_channel)
from .registry import register, register_norm_type

__all__ = ["EstimatedBatchNorm1d", "EstimatedBatchNorm2d", "BatchChannelNorm1d", "BatchChannelNorm2d"]

def _check_args(num_features: int, eps: float, momentum: float | None) -> None:
    check_layer_args(num_features, eps)
    if momentum is not None and not (isinstance(momentum, (int, float)) and 0 < momentum <= 1):
        raise ValueError(f"momentum must be in (0, 1] (the weight of the newest batch) or None for a "
                         f"cumulative average, got {momentum!r}; 0 would freeze the estimates")


class _RunningStats(nn.Module):
    # Running mean/var buffers, the per-channel BN affine and the input check, shared by both layers.
    _ndims: tuple[int, ...] = (4,)
    spatial_dims: int = 2

    def _init_stats(self, num_features: int, eps: float, momentum: float | None, affine: bool,
                    device, dtype, prefix: str) -> None:
        _check_args(num_features, eps, momentum)
        self.num_features = num_features
        self.eps = float(eps)
        self.momentum = None if momentum is None else float(momentum)
        self.affine = affine
        init_running_stats(self, num_features, affine, device, dtype, prefix)

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, no batch tracked."""
        self.running_mean.zero_()
        self.running_var.fill_(1)
        self.num_batches_tracked.zero_()

    def _check_input(self, x: Tensor) -> None:
        check_input(self, x, self._ndims)

    def _momentum(self) -> float:
        self.num_batches_tracked.add_(1)
        return 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum

    @torch.no_grad()
    def _update_estimates(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # Estimated-BN update: mean first, then the second moment around the updated running mean.
        # Returns the new estimates as fresh tensors (the graph keeps those, so later in-place
        # updates of the buffers, e.g. a second call of the layer, cannot invalidate a backward).
        m = self._momentum()
        # batch mean and biased variance per channel, by the batch-norm statistics kernel (on CPU
        # about 2.5x faster than torch.var_mean over (0, 2, 3))
        mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
        new_mean = torch.lerp(self.running_mean, mean.to(self.running_mean.dtype), m)
        second = var + (mean - new_mean.to(var.dtype)) ** 2
        new_var = torch.lerp(self.running_var, second.to(self.running_var.dtype), m)
        self.running_mean.copy_(new_mean)
        self.running_var.copy_(new_var)
        return new_mean, new_var

    def _estimates(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._update_estimates(x) if self.training else (self.running_mean, self.running_var)


class EstimatedBatchNorm2d(_RunningStats):
    """Estimated batch norm for (N, C, H, W) input (Qiao et al. 2019, arXiv 1903.10520).

    ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias`` in training *and* eval; in
    training the estimates are first updated with the batch (see the module docstring:
    ``running_mean <- lerp(running_mean, mean_B(x), m)``, ``running_var <- lerp(running_var,
    mean_B((x - running_mean)^2), m)``, ``m = momentum``). Gradients flow to ``x``, ``weight`` and
    ``bias`` through the per-channel affine map; the estimates are constants for autograd.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        self._init_stats(num_features, eps, momentum, affine, device, dtype, "")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        mean, var = self._estimates(x)
        return F.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.eps)

    def eval_affine(self) -> tuple[Tensor, Tensor]:
        """Folding protocol: ``(scale, shift)`` with ``y = x * scale + shift``, ``scale = weight /
        sqrt(running_var + eps)``, ``shift = bias - running_mean * scale``."""
        return running_affine(self.running_mean, self.running_var, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}"


class EstimatedBatchNorm1d(EstimatedBatchNorm2d):
    """Estimated batch norm for (N, C) or (N, C, L) input; see :class:`EstimatedBatchNorm2d`."""

    _ndims = (2, 3)
    spatial_dims = 1


class BatchChannelNorm2d(_RunningStats):
    """Batch-channel normalization for (N, C, H, W) input (Qiao et al. 2019, arXiv 1903.10520).

    Batch norm (per-channel affine ``bn_weight``, ``bn_bias``; running statistics), then group norm
    over ``num_groups`` channel groups per sample (per-channel affine ``weight``, ``bias``)::

        u = (x - mu_c) / sqrt(var_c + eps) * bn_weight_c + bn_bias_c
        y = (u - mu_{n,g}) / sqrt(var_{n,g} + eps) * weight_c + bias_c

    ``estimate=False``: ``mu_c, var_c`` are the batch statistics in training (running estimates
    updated as in ``nn.BatchNorm2d``) and the running estimates in eval. ``estimate=True``: the
    estimated batch norm of :class:`EstimatedBatchNorm2d` (running estimates in training too, for
    micro-batches). ``num_groups`` must divide ``num_features``; when it does not, the largest
    divisor of ``num_features`` not above it is used (100 channels, 32 groups -> 25 groups).
    """

    def __init__(self, num_features: int, num_groups: int = 32, eps: float = 1e-5, momentum: float | None = 0.1,
                 estimate: bool = False, affine: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        self._init_stats(num_features, eps, momentum, affine, device, dtype, "bn_")
        self.num_groups = check_groups(num_features, num_groups)
        self.estimate = bool(estimate)
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if self.estimate:
            mean, var = self._estimates(x)
            u = F.batch_norm(x, mean, var, self.bn_weight, self.bn_bias, False, 0.0, self.eps)
        else:
            if self.training:
                values_per_channel(x)  # raises for one value, before _momentum() counts the batch
            momentum = self._momentum() if self.training else 0.0
            u = F.batch_norm(x, self.running_mean, self.running_var, self.bn_weight, self.bn_bias, self.training,
                             momentum, self.eps)
        check_group_input(self, x, self.num_groups)
        return F.group_norm(u, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, num_groups={self.num_groups}, eps={self.eps}, momentum={self.momentum}, "
                f"estimate={self.estimate}, affine={self.affine}")


class BatchChannelNorm1d(BatchChannelNorm2d):
    """Batch-channel normalization for (N, C) or (N, C, L) input; see :class:`BatchChannelNorm2d`
    (the group statistics of a sample are over the channels of the group and all positions)."""

    _ndims = (2, 3)
    spatial_dims = 1


register_norm_type(EstimatedBatchNorm1d, 1)
register_norm_type(EstimatedBatchNorm2d, 2)
register_norm_type(BatchChannelNorm1d, 1)
register_norm_type(BatchChannelNorm2d, 2)




def batch_channel_norm(num_features: int, dims: int | None = 2, num_groups: int = 32, eps: float = 1e-5,
                       momentum: float | None = 0.1, estimate: bool = False, affine: bool = True) -> nn.Module:
    """``BatchChannelNorm1d`` for dims 0/1 (groups of >= 2 features), ``BatchChannelNorm2d`` for dims 2."""
    cls = pick_by_dims("bcn", BatchChannelNorm1d, BatchChannelNorm2d, dims)
    return cls(num_features, _for_dims(num_features, num_groups, dims), eps, momentum, estimate, affine)


def estimated_batch_norm(num_features: int, dims: int | None = 2, eps: float = 1e-5, momentum: float | None = 0.1,
                         affine: bool = True) -> nn.Module:
    """``EstimatedBatchNorm1d`` for dims 0/1, ``EstimatedBatchNorm2d`` for dims 2."""
    return pick_by_dims("estbn", EstimatedBatchNorm1d, EstimatedBatchNorm2d, dims)(num_features, eps, momentum, affine)


register("bcn", "batch-channel norm (Qiao et al. 2019): batch norm, then group norm over channel groups "
         "(32, or the largest divisor of the channels below it)", layer=batch_channel_norm)(None)
register("estbn", "estimated batch norm (Qiao et al. 2019): normalizes with running estimates in training "
         "too, for micro-batches; folds like batch norm", layer=estimated_batch_norm)(None)
