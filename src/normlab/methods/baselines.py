"""The baselines: no normalization and batch normalization (Ioffe & Szegedy 2015, arXiv 1502.03167).

BatchNorm: ``y = (x - mu_B) / sqrt(var_B + eps) * gamma + beta`` with batch statistics in training
and running statistics (PyTorch momentum convention) in evaluation. ``bn_shift`` is the variant of
the standardization-loss paper's MNIST baselines (Collins et al. 2019, appendix A.1): a learnable
shift ``beta`` only, no scale ("no scale parameter was necessary due to the use of the ReLU").
"""

from __future__ import annotations

from torch import nn

from ._common import check_layer_args
from .registry import Handle, register, strip_norms

_BN = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _bn_class(dims: int | None) -> type[nn.Module]:
    if dims not in _BN:
        raise ValueError(f"batch norm needs dims in {sorted(_BN)} (spatial dims of the input), got {dims}")
    return _BN[dims]


def batch_norm(num_features: int, dims: int | None = 2, eps: float = 1e-5, momentum: float | None = 0.1,
               affine: bool = True, scale: bool = True) -> nn.Module:
    """``BatchNorm{1,2,3}d(num_features)``; ``scale=False`` drops gamma and keeps the shift beta.

    The shift-only layer is a plain ``nn.BatchNorm*d`` whose ``weight`` is ``None`` (PyTorch treats a
    missing weight as 1), so every tool that understands batch norm, folding included, handles it.
    """
    if momentum is not None and not (isinstance(momentum, (int, float)) and 0 < momentum <= 1):
        raise ValueError(f"momentum must be in (0, 1] (the weight of the newest batch) or None for a "
                         f"cumulative average, got {momentum!r}")
    check_layer_args(num_features, eps)
    layer = _bn_class(dims)(num_features, eps=eps, momentum=momentum, affine=affine)
    if affine and not scale:
        del layer.weight
        layer.register_parameter("weight", None)
    return layer


def bn_shift(num_features: int, dims: int | None = 2, eps: float = 1e-5, momentum: float | None = 0.1) -> nn.Module:
    """Batch norm with a learnable shift and no scale (the std-loss paper's MNIST BN baseline)."""
    return batch_norm(num_features, dims, eps=eps, momentum=momentum, scale=False)


def identity(num_features: int, dims: int | None = 2) -> nn.Module:
    """No normalization: ``y = x``."""
    return nn.Identity()


register("bn", "batch norm (Ioffe & Szegedy 2015): batch statistics in training, running in eval",
         layer=batch_norm)(None)
register("bn_shift", "batch norm with a learnable shift only, as in the std-loss paper's MNIST baselines",
         layer=bn_shift)(None)


@register("none", "no normalization: every normalization layer becomes the identity", layer=identity)
def none(handle: Handle) -> None:
    """Strip every normalization layer, group/layer/instance norm too (:func:`strip_norms`; a model
    without any is already the baseline)."""
    handle.swapped.extend(strip_norms(handle.model))
