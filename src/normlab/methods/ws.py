"""Weight standardization (Qiao, Wang, Liu, Shen & Yuille 2019, arXiv 1903.10520).

Every output filter of a conv (or row of a linear layer) is standardized before use::

    W_hat[o] = (W[o] - mean(W[o])) / sqrt(var(W[o]) + eps)

with the mean and variance over ``(in, *kernel)``. Choices, on purpose (public versions disagree,
see METHODS.md section 4):

* ``var`` is the *biased* (maximum-likelihood) variance, as in batch norm; each filter of ``W_hat``
  then has exactly unit mean square ``mean(W_hat[o]**2) = var / (var + eps)``.
* ``eps`` sits *inside* the square root, so the divisor is never below ``sqrt(eps)``; an eps
  added to the standard deviation outside the root is what produced NaNs for users of one
  public version. The default ``eps = 1e-6`` is small against the variance of PyTorch's default
  conv init (``1 / (3 * fan_in)``, about 7e-5 for a 512-channel 3x3 conv): ``1e-5`` would shrink
  such filters by 7%.

It is a :mod:`torch.nn.utils.parametrize` parametrization, so it applies to any
``Conv1d/2d/3d`` or ``Linear`` without new layer classes; the optimizer updates the raw weight
``module.parametrizations.weight.original``. The statistics of a half-precision weight are taken in
float32. The authors use it together with group norm or batch-channel norm and advise
standardizing only convs that are followed by a normalization layer (``before_norm_only=True`` of
the ``ws`` method).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._common import CONVS as _CONVS
from ._common import LAYERS, check_number, remove_one_parametrization, resolve_modules, weight_of
from .registry import Handle, norm_types, register

__all__ = ["WeightStandardization", "weight_standardization", "remove_weight_standardization",
           "WSConv2d", "standardize", "is_standardized"]

_LOW = (torch.float16, torch.bfloat16)


def _centred(weight: Tensor) -> tuple[Tensor, Tensor]:
    # ``(W - mean, biased var)`` per output row, as (out, fan_in) and (out, 1) tensors in float32 at
    # least. Two passes (numerically stable); torch.var_mean is about 20x slower on CPU for weights.
    w = weight.float() if weight.dtype in _LOW else weight
    v = w.reshape(w.shape[0], -1)
    d = v - v.mean(1, keepdim=True)
    return d, torch.linalg.vecdot(d, d).unsqueeze(1) / v.shape[1]


def standardize(weight: Tensor, eps: float = 1e-6) -> Tensor:
    """``(W[o] - mean(W[o])) / sqrt(var(W[o]) + eps)`` per output row ``o`` (biased variance, over
    every dim but the first); Qiao et al. 2019, arXiv 1903.10520. Half-precision weights are
    standardized in float32 and returned in their own dtype."""
    d, var = _centred(weight)
    return (d * torch.rsqrt(var + eps)).view(weight.shape).to(weight.dtype)


def _check_weight(module: nn.Module, name: str, what: str, leave_out: str = "modules=[...]") -> Tensor:
    w = weight_of(module, name, what)
    if w[0].numel() < 2:
        raise ValueError(f"{what}: each output filter of {type(module).__name__}.{name} "
                         f"{tuple(w.shape)} has a single element, which standardizes to 0; leave this "
                         f"layer out ({leave_out})")
    if is_standardized(module, name):
        raise ValueError(f"{what}: {type(module).__name__}.{name} is already standardized "
                         "(weight standardization or NF scaled WS); apply one of them once")
    return w


class WeightStandardization(nn.Module):
    """Parametrization ``W -> (W - mean(W[o])) / sqrt(var(W[o]) + eps)`` per output filter ``o``
    (biased variance, eps inside the root; Qiao et al. 2019, arXiv 1903.10520).

    Register it with :func:`weight_standardization` (or ``parametrize.register_parametrization``).
    """

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = check_number(eps, "eps", positive=True, why="it is added to the variance")

    def forward(self, weight: Tensor) -> Tensor:
        return standardize(weight, self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


def is_standardized(module: nn.Module, name: str = "weight") -> bool:
    """Whether ``module.<name>`` carries weight standardization or NF scaled weight standardization."""
    if not parametrize.is_parametrized(module, name):
        return False
    from .nf import ScaledWeightStandardization

    return any(isinstance(p, (WeightStandardization, ScaledWeightStandardization))
               for p in module.parametrizations[name])


def weight_standardization(module: nn.Module, eps: float = 1e-6, name: str = "weight") -> nn.Module:
    """Standardize ``module.<name>`` (a Conv*d or Linear weight) on every access; returns ``module``.

    ``W_hat[o] = (W[o] - mean(W[o])) / sqrt(var(W[o]) + eps)`` over ``(in, *kernel)``, biased
    variance (Qiao et al. 2019, arXiv 1903.10520). Undo with :func:`remove_weight_standardization`.
    """
    _check_weight(module, name, "weight_standardization")
    parametrize.register_parametrization(module, name, WeightStandardization(eps))
    return module


def remove_weight_standardization(module: nn.Module, bake: bool = True, name: str = "weight") -> nn.Module:
    """Take weight standardization off ``module.<name>``; returns ``module``.

    ``bake=True`` (default) keeps the standardized weight as the new plain weight, so the module
    computes the same function; ``bake=False`` restores the raw weight. Other parametrizations of
    the same tensor stay.
    """
    remove_one_parametrization(module, name, WeightStandardization, bake, "remove_weight_standardization")
    return module


class WSConv2d(nn.Conv2d):
    """``nn.Conv2d`` with weight standardization registered at construction (Qiao et al. 2019,
    arXiv 1903.10520): the conv uses ``(W[o] - mean(W[o])) / sqrt(var(W[o]) + eps)``.

    Takes ``nn.Conv2d``'s arguments plus ``eps``; it is a plain ``Conv2d`` with a parametrization,
    so ``remove_weight_standardization`` turns it back into one.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] | str = 0,
                 dilation: int | tuple[int, int] = 1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 device=None, dtype=None, eps: float = 1e-6) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        weight_standardization(self, eps)


# --- selecting layers (shared with nf) -------------------------------------------------------------

_EXTRA_NORMS = (nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm)


def _leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    # Modules in definition order that do work of their own (parametrization internals skipped).
    out = []
    for name, m in model.named_modules():
        if "parametrizations" in name.split("."):
            continue
        kids = [c for n, c in m.named_children() if n != "parametrizations"]
        if not kids or isinstance(m, LAYERS + norm_types() + _EXTRA_NORMS):
            out.append((name, m))
    return out


def followed_by_norm(model: nn.Module) -> set[str]:
    """Names of the Conv/Linear layers whose next module, in definition order, is a normalization
    layer (batch/group/layer/instance norm or any registered normalization type).

    Definition order is execution order in ``nn.Sequential`` and in the usual ``conv1, bn1,
    conv2, bn2`` blocks; layers applied through the functional API are invisible to it.
    """
    norms = norm_types() + _EXTRA_NORMS
    leaves = _leaves(model)
    out = set()
    for (name, m), (_, nxt) in zip(leaves, leaves[1:]):
        if isinstance(m, LAYERS) and isinstance(nxt, norms):
            out.add(name)
    return out


@register("ws", "weight standardization (Qiao et al. 2019): each conv filter standardized to zero mean, "
          "unit variance on every use; pair it with gn or bcn", kind="weight")
def _apply(handle: Handle, eps: float = 1e-6, before_norm_only: bool = False, linear: bool = False,
           modules: Sequence[nn.Module | str] | None = None, bake: bool = True) -> None:
    """Standardize every Conv*d of the model (also every Linear but the last, the classifier head,
    with ``linear=True``; only those followed by a normalization layer with
    ``before_norm_only=True``, the authors' advice; or exactly ``modules``). ``handle.remove()`` bakes the standardized weights into plain ones
    (``bake=True``) or restores the raw weights (``bake=False``)."""
    model = handle.model
    if modules is not None:
        targets = resolve_modules(model, modules, "ws: modules")
    else:
        kinds = _CONVS + ((nn.Linear,) if linear else ())
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        head = linears[-1] if linears else None  # the classifier head is never standardized by default
        targets = [(n, m) for n, m in _leaves(model) if isinstance(m, kinds) and m is not head]
        if before_norm_only:
            keep = followed_by_norm(model)
            targets = [(n, m) for n, m in targets if n in keep]
    if not targets:
        raise ValueError("ws: found no layer to standardize (Conv*d" + (", Linear" if linear else "")
                         + (" followed by a normalization layer" if before_norm_only else "")
                         + "); pass modules=[...] or linear=True")
    for _, m in targets:
        _check_weight(m, "weight", "ws")
    for _, m in targets:
        weight_standardization(m, eps)
    handle.state["ws"] = [n for n, _ in targets]

    def remove() -> None:
        for _, m in targets:
            if is_standardized(m):
                remove_weight_standardization(m, bake=bake)

    handle.removers.append(remove)
