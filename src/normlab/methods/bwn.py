"""Bounded weight normalization from "Norm matters" (Hoffer, Banner, Golan & Soudry 2018, arXiv 1803.01814).

Every output channel ``o`` of a conv (or row of a linear layer) is used as

    w[o] = rho * v[o] / ||v[o]||_p,   p in {2, 1, inf}

where ``v`` is the trained parameter and ``rho`` is a constant fixed when the parametrization is
registered: the mean over output channels of the initial norms ``||v[o]||_p``. Unlike weight
normalization (Salimans & Kingma 2016) there is no learnable magnitude. A layer followed by a
normalization layer is invariant to the scale of its weight, so fixing the norm loses nothing and
makes weight decay unnecessary (the effective learning rate no longer drifts with the weight norm).

It is a :mod:`torch.nn.utils.parametrize` parametrization, so it works on any ``Conv1d/2d/3d`` or
``Linear``; the optimizer updates ``module.parametrizations.weight.original`` and ``rho`` is a
buffer (``...parametrizations.weight.0.rho``), so a state dict round-trips. Norms of half-precision
weights are taken in float32; a filter of norm 0 is divided by ``1e-12`` instead (as
``F.normalize``) and stays 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._common import LAYERS, remove_one_parametrization, resolve_modules, weight_of
from .registry import Handle, register

__all__ = ["BoundedWeightNorm", "bounded_weight_norm", "remove_bounded_weight_norm"]

_LOW = (torch.float16, torch.bfloat16)
_NORM_FLOOR = 1e-12


def _check_p(p: float | int | str, what: str) -> float:
    value = float("inf") if isinstance(p, str) and p.lower() in ("inf", "infinity") else p
    if isinstance(value, bool) or value not in (1, 2, math.inf):
        raise ValueError(f"{what}: p must be 1, 2 or inf (float('inf') or 'inf'), got {p!r}")
    return float(value)


def _channel_norms(v: Tensor, p: float) -> Tensor:
    # ||v[o]||_p per output channel, in float32 for half-precision weights, shape (out,).
    w = v.float() if v.dtype in _LOW else v
    return torch.linalg.vector_norm(w.reshape(w.shape[0], -1), ord=p, dim=1)


class BoundedWeightNorm(nn.Module):
    """Parametrization ``v -> rho * v[o] / ||v[o]||_p`` per output channel ``o`` (Hoffer et al. 2018,
    arXiv 1803.01814), ``rho`` a fixed buffer. Register it with :func:`bounded_weight_norm`, which sets
    ``rho`` to the mean initial norm."""

    def __init__(self, rho: float | Tensor, p: float | int | str = 2) -> None:
        super().__init__()
        self.p = _check_p(p, "BoundedWeightNorm")
        rho = torch.as_tensor(rho).detach().clone()
        rho = rho.to(torch.float64 if rho.dtype == torch.float64 else torch.float32)
        if rho.dim() != 0 or not bool(torch.isfinite(rho)) or float(rho) <= 0:
            raise ValueError(f"BoundedWeightNorm: rho must be a finite scalar > 0, got {rho!r}")
        self.register_buffer("rho", rho)

    def forward(self, v: Tensor) -> Tensor:
        norms = _channel_norms(v, self.p).clamp_min(_NORM_FLOOR)
        factor = (self.rho / norms).to(v.dtype)
        return v * factor.view((-1,) + (1,) * (v.dim() - 1))

    def extra_repr(self) -> str:
        return f"rho={float(self.rho):.6g}, p={self.p:g}"


def _find(module: nn.Module, name: str) -> int | None:
    if not parametrize.is_parametrized(module, name):
        return None
    for i, prm in enumerate(module.parametrizations[name]):
        if isinstance(prm, BoundedWeightNorm):
            return i
    return None


def _check_weight(module: nn.Module, name: str, what: str) -> Tensor:
    w = weight_of(module, name, what)
    if _find(module, name) is not None:
        raise ValueError(f"{what}: {type(module).__name__}.{name} already carries bounded weight norm; "
                         "apply it once")
    return w


def bounded_weight_norm(module: nn.Module, name: str = "weight", p: float | int | str = 2) -> nn.Module:
    """Register bounded weight normalization on ``module.<name>``; returns ``module``.

    ``w[o] = rho * v[o] / ||v[o]||_p`` for each output channel ``o``, ``rho`` = the mean of the
    current ``||v[o]||_p`` over output channels, fixed from now on (Hoffer et al. 2018, arXiv
    1803.01814). The function the module computes changes only by the spread of the filter norms.
    Undo with :func:`remove_bounded_weight_norm`.
    """
    p = _check_p(p, "bounded_weight_norm")
    w = _check_weight(module, name, "bounded_weight_norm")
    with torch.no_grad():
        rho = _channel_norms(w.detach(), p).mean()
    if not rho > 0:
        raise ValueError(f"bounded_weight_norm: {type(module).__name__}.{name} is all zeros, so its mean "
                         "norm rho is 0; initialize the weight first")
    parametrize.register_parametrization(module, name, BoundedWeightNorm(rho.to(w.device), p))
    return module


def remove_bounded_weight_norm(module: nn.Module, name: str = "weight", bake: bool = True) -> nn.Module:
    """Take bounded weight normalization off ``module.<name>``; returns ``module``.

    ``bake=True`` (default) keeps ``rho * v / ||v||_p`` as the new plain weight, so the module computes
    the same function; ``bake=False`` restores the raw ``v``. Other parametrizations stay.
    """
    remove_one_parametrization(module, name, BoundedWeightNorm, bake, "remove_bounded_weight_norm")
    return module


def default_targets(model: nn.Module, head: bool = False) -> list[tuple[str, nn.Module]]:
    """Every ``Conv*d`` and ``Linear`` of ``model``, without the last ``Linear`` (the classifier head)
    unless ``head=True``."""
    found = [(n, m) for n, m in model.named_modules()
             if isinstance(m, LAYERS) and "parametrizations" not in n.split(".")]
    linears = [i for i, (_, m) in enumerate(found) if isinstance(m, nn.Linear)]
    if linears and not head:
        del found[linears[-1]]
    return found


@register("bwn", "bounded weight norm (Hoffer et al. 2018): each filter kept at the fixed norm rho "
          "(mean initial norm), no learnable magnitude; pair it with a normalization layer", kind="weight")
def _apply(handle: Handle, p: float | int | str = 2, head: bool = False,
           modules: Sequence[nn.Module | str] | None = None, bake: bool = True) -> None:
    """Bound every Conv*d and Linear except the classifier head (``head=True`` includes it; or exactly
    ``modules``, given as modules or qualified names) with ``w = rho * v / ||v||_p``.
    ``handle.remove()`` bakes the bounded weights into plain ones (``bake=True``) or restores ``v``."""
    p = _check_p(p, "bwn")
    model = handle.model
    if modules is None:
        targets = default_targets(model, head)
    else:
        targets = resolve_modules(model, modules, "bwn: modules")
    if not targets:
        raise ValueError("bwn: found no Conv*d or Linear layer besides the classifier head; pass head=True "
                         "or modules=[...]")
    for _, m in targets:
        _check_weight(m, "weight", "bwn")
    for _, m in targets:
        bounded_weight_norm(m, p=p)
    handle.state["bwn"] = [n for n, _ in targets]

    def remove() -> None:
        for _, m in targets:
            if _find(m, "weight") is not None:
                remove_bounded_weight_norm(m, bake=bake)

    handle.removers.append(remove)
