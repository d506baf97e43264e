"""Stateless maths of normlab.

The standardization loss of Collins, Ballé & Shlens, "Accelerating Training of Deep Neural Networks
with a Standardization Loss" (arXiv 1903.00925): for each channel ``c`` of a pre-activation ``z``
with batch mean ``mu_c`` and biased batch variance ``var_c``,

    KL(N(mu_c, var_c) || N(0, 1)) = 0.5 * (mu_c**2 + var_c - log(var_c + eps) - 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["channel_moments", "standardization_kl"]

_REDUCTIONS = ("sum", "mean", "none")


def _reduced_dims(z: Tensor, dim: int | Sequence[int] | None) -> tuple[int, ...]:
    if z.dim() < 2:
        raise ValueError(
            f"z must have a batch and a channel dim (N, C, ...), got shape {tuple(z.shape)}; "
            "for a single vector use z.unsqueeze(0) only if it really is one sample of C channels"
        )
    if dim is None:
        return (0, *range(2, z.dim()))
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    if not dims:
        raise ValueError("dim must name at least one dimension to reduce over, or be None")
    dims = tuple(sorted(d % z.dim() for d in dims))
    if len(set(dims)) != len(dims):
        raise ValueError(f"dim has repeated entries: {dim}")
    return dims


def channel_moments(z: Tensor, dim: int | Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
    """Mean and biased variance of ``z`` over ``dim``, computed in at least float32.

    With ``dim=None`` the channel is dim 1 and the statistics run over every other dim, as in batch
    norm: ``N`` for (N, C), ``N, L`` for (N, C, L), ``N, H, W`` for (N, C, H, W), and so on. This
    case uses the batch-norm statistics kernel (``torch.batch_norm_update_stats``), which is ~20x
    faster than ``torch.var_mean`` over (0, 2, 3) on a CPU and as stable as batch norm itself.

    Raises ``ValueError`` when the variance is undefined (a single element per statistic).
    """
    dims = _reduced_dims(z, dim)
    n = 1
    for d in dims:
        n *= z.shape[d]
    if n < 2:
        raise ValueError(
            f"the variance over dims {dims} of a tensor of shape {tuple(z.shape)} is undefined "
            "(one element per channel): use a batch of at least 2 samples, or reduce over more dims"
        )
    if z.dtype not in (torch.float32, torch.float64):
        z = z.float()
    if dim is None:
        mean, var = torch.batch_norm_update_stats(z, None, None, 0.0)
        return mean, var
    var, mean = torch.var_mean(z, dim=dims, correction=0)
    return mean, var


class _ChannelKL(torch.autograd.Function):
    """Per-channel KL with an analytic backward.

    d kl_c / d z = (mu_c + (1 - 1/(var_c + eps)) * (z - mu_c)) / n, so the whole backward is one
    fused ``a_c + b_c * z`` over ``z``: no autograd graph through the moments.
    """

    @staticmethod
    def forward(ctx, z: Tensor, eps: float, dims: tuple[int, ...] | None) -> Tensor:  # type: ignore[override]
        mean, var = channel_moments(z, dims)
        kl = 0.5 * (mean * mean + var - torch.log(var + eps) - 1.0)
        ctx.save_for_backward(z, mean, var)
        ctx.eps, ctx.dims = eps, dims
        return kl

    @staticmethod
    def backward(ctx, grad_kl: Tensor):  # type: ignore[override]
        z, mean, var = ctx.saved_tensors
        dims = _reduced_dims(z, ctx.dims)
        n = 1
        for d in dims:
            n *= z.shape[d]
        b = grad_kl * (1.0 - 1.0 / (var + ctx.eps)) / n
        a = grad_kl * mean / n - b * mean
        shape = [1] * z.dim()
        for d in range(z.dim()):
            if d not in dims:
                shape[d] = z.shape[d]
        a, b = a.view(shape), b.view(shape)
        if z.dtype == a.dtype:
            grad_z = torch.addcmul(a, b, z)
        else:
            grad_z = torch.addcmul(a, b, z.to(a.dtype)).to(z.dtype)
        return grad_z, None, None


def standardization_kl(
    z: Tensor,
    dim: int | Sequence[int] | None = None,
    eps: float = 1e-5,
    reduction: str = "sum",
) -> Tensor:
    """Standardization loss of one pre-activation tensor (Collins et al. 2019, arXiv 1903.00925).

    Computes, per channel ``c`` (dim 1, statistics over every other dim when ``dim`` is None),

        kl_c = 0.5 * (mu_c**2 + var_c - log(var_c + eps) - 1),

    the KL divergence ``KL(N(mu_c, var_c) || N(0, 1))`` with the biased batch variance, then reduces
    it: ``"sum"`` (default, the KL of the diagonal Gaussian), ``"mean"`` over channels, or ``"none"``
    for the per-channel vector. Statistics and the result are in float32 at least (float64 stays
    float64); gradients flow back to ``z`` in its own dtype. A zero-variance channel gives a finite
    value (``log(eps)``) and finite gradients.

    Args:
        z: pre-activation of shape (N, C, ...).
        dim: dims to reduce over; None means all but dim 1.
        eps: added to the variance inside the log; must be > 0.
        reduction: "sum", "mean" or "none".
    """
    if not isinstance(z, Tensor):
        raise TypeError(f"z must be a torch.Tensor, got {type(z).__name__}")
    if not z.is_floating_point():
        raise TypeError(f"z must be a floating-point tensor, got dtype {z.dtype}; cast it with z.float()")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0 (it keeps log(var + eps) finite for constant channels), got {eps}")
    dims = None if dim is None else _reduced_dims(z, dim)
    kl = _ChannelKL.apply(z, float(eps), dims)
    if reduction == "sum":
        return kl.sum()
    if reduction == "mean":
        return kl.mean()
    return kl
