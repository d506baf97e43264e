"""Group norm and layer norm with batch-norm-style constructors (Wu & He 2018, arXiv 1803.08494;
Ba, Kiros & Hinton 2016, arXiv 1607.06450).

Per sample ``n`` and channel group ``g`` (``C / G`` consecutive channels), over the channels of
the group and every position::

    y = (x - mu_{n,g}) / sqrt(var_{n,g} + eps) * weight_c + bias_c

(biased variance, per-channel affine). Layer norm for images is group norm with a single group:
the statistics are over all of ``(C, H, W)`` of a sample, the choice of the group-norm paper and
of normalized CNNs generally (timm's ``LayerNorm2d``, ConvNeXt's, is a different layer: over ``C``
at each position). For ``(N, C)`` input layer norm is the usual ``nn.LayerNorm(C)``.

Groups that do not divide the channels: the largest divisor of ``num_features`` that is at most
``num_groups`` is used (:func:`check_groups`; 100 channels with 32 groups -> 25 groups, 16
channels with 32 groups -> 16 groups, i.e. instance norm). On ``(N, C)`` input a group needs at
least 2 features (one feature per group normalizes every value to 0). The 1-D layers take ``(N, C)``
and ``(N, C, L)`` alike, so built for ``dims`` 0 or 1 (as when replacing a ``BatchNorm1d``, which
takes either) they pick such a count (16 features -> 8 groups); a layer given ``(N, C)`` input split
into one-feature groups raises (:func:`check_group_input`). None of these layers uses batch
statistics, so they behave the same in training and eval and each sample is normalized alone.
"""

from __future__ import annotations

from torch import Tensor, nn

from ._common import check_input, check_layer_args, pick_by_dims
from .registry import register, register_norm_type

__all__ = ["GroupNorm1d", "GroupNorm2d", "LayerNorm1d", "LayerNorm2d", "check_groups"]


def check_groups(num_features: int, num_groups: int) -> int:
    """The group count used for ``num_features`` channels: ``num_groups`` if it divides them, else
    the largest divisor of ``num_features`` below it. Raises on non-positive arguments."""
    if isinstance(num_features, bool) or not (isinstance(num_features, int) and num_features > 0):
        raise ValueError(f"num_features must be a positive int, got {num_features!r}")
    if isinstance(num_groups, bool) or not (isinstance(num_groups, int) and num_groups > 0):
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    g = min(num_groups, num_features)
    while num_features % g:
        g -= 1
    return g


def check_group_input(module: nn.Module, x: Tensor, num_groups: int) -> None:
    """Raise for (N, C) input split into groups of one feature: each group is then a single value
    per sample, normalized to 0, and the layer outputs its bias whatever the input."""
    if x.dim() == 2 and x.shape[1] == num_groups:
        raise ValueError(
            f"{type(module).__name__}({x.shape[1]}) with {num_groups} groups on (N, C) input normalizes "
            "each feature on its own to 0: the output would be the bias alone. Pass num_groups with at "
            f"least 2 features per group (a divisor of {x.shape[1]} up to {x.shape[1] // 2}), or build it "
            "for dims 0 or 1 (models.mlp and swapped BatchNorm1d layers are), which picks such a count")


def _for_dims(num_features: int, num_groups: int, dims: int | None) -> int:
    # The 1-D layers (dims 0 or 1) may see (N, C) input: at least 2 features per group (see check_group_input).
    if dims in (0, 1) and isinstance(num_features, int) and not isinstance(num_features, bool) and num_features > 0:
        if num_features < 2:
            raise ValueError("group norm of a single feature on (N, C) input is undefined (one value per sample)")
        return min(num_groups, num_features // 2) if isinstance(num_groups, int) and num_groups > 0 else num_groups
    return num_groups


class GroupNorm2d(nn.GroupNorm):
    """Group norm for (N, C, H, W) input (Wu & He 2018, arXiv 1803.08494):
    ``y = (x - mu_{n,g}) / sqrt(var_{n,g} + eps) * weight_c + bias_c`` over the channels of each group
    and all positions of each sample.

    A ``nn.GroupNorm`` with a batch-norm-style constructor (``num_features`` first) and the
    ``num_features`` attribute; ``num_groups`` that does not divide ``num_features`` becomes its
    largest divisor below it (see :func:`check_groups`).
    """

    _ndims: tuple[int, ...] = (4,)
    spatial_dims = 2

    def __init__(self, num_features: int, num_groups: int = 32, eps: float = 1e-5, affine: bool = True,
                 device=None, dtype=None) -> None:
        check_layer_args(num_features, eps)
        super().__init__(check_groups(num_features, num_groups), num_features, eps, affine, device, dtype)
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        check_input(self, x, self._ndims)
        if self.num_groups > 1:
            check_group_input(self, x, self.num_groups)
        return super().forward(x)

    def extra_repr(self) -> str:
        return f"{self.num_features}, num_groups={self.num_groups}, eps={self.eps}, affine={self.affine}"


class GroupNorm1d(GroupNorm2d):
    """Group norm for (N, C) or (N, C, L) input; see :class:`GroupNorm2d`."""

    _ndims = (2, 3)
    spatial_dims = 1


class LayerNorm2d(GroupNorm2d):
    """Layer norm for (N, C, H, W) input (Ba et al. 2016, arXiv 1607.06450), as group norm with one
    group: ``y = (x - mu_n) / sqrt(var_n + eps) * weight_c + bias_c``, statistics over all of
    ``(C, H, W)`` of sample ``n``, per-channel affine. (Not timm's ``LayerNorm2d``, which normalizes
    over ``C`` at each position.)"""

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True, device=None, dtype=None) -> None:
        super().__init__(num_features, 1, eps, affine, device, dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}"


class LayerNorm1d(LayerNorm2d):
    """Layer norm for (N, C) input (over the C features, as ``nn.LayerNorm(C)``) or (N, C, L) input
    (over all of ``(C, L)``); see :class:`LayerNorm2d`."""

    _ndims = (2, 3)
    spatial_dims = 1


for _cls in (GroupNorm1d, LayerNorm1d):
    register_norm_type(_cls, 1)
for _cls in (GroupNorm2d, LayerNorm2d):
    register_norm_type(_cls, 2)




def group_norm(num_features: int, dims: int | None = 2, num_groups: int = 32, eps: float = 1e-5,
               affine: bool = True) -> nn.Module:
    """``GroupNorm1d`` for dims 0/1 (groups of >= 2 features), ``GroupNorm2d`` for dims 2."""
    return pick_by_dims("gn", GroupNorm1d, GroupNorm2d, dims)(num_features, _for_dims(num_features, num_groups, dims),
                                                              eps, affine)


def layer_norm(num_features: int, dims: int | None = 2, eps: float = 1e-5, affine: bool = True) -> nn.Module:
    """``LayerNorm1d`` for dims 0/1, ``LayerNorm2d`` for dims 2."""
    return pick_by_dims("ln", LayerNorm1d, LayerNorm2d, dims)(num_features, eps, affine)


register("gn", "group norm (Wu & He 2018): per sample over 32 channel groups (or the largest divisor of "
         "the channels below 32)", layer=group_norm)(None)
register("ln", "layer norm (Ba et al. 2016): per sample over all channels and positions (group norm "
         "with one group)", layer=layer_norm)(None)
