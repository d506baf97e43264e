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

__all__ = ["channel_moments", "standardization_kl", "layer_kls"]

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


def _broadcast_shape(z: Tensor, dims: tuple[int, ...] | None) -> list[int]:
    # Shape of a per-statistic tensor that broadcasts against z (1 on the reduced dims).
    reduced = (0, *range(2, z.dim())) if dims is None else dims
    return [1 if d in reduced else size for d, size in enumerate(z.shape)]


class _KL(torch.autograd.Function):
    """Per-layer standardization KL of several tensors at once, with an analytic backward.

    With ``r_c = 1 / (var_c + eps)`` and ``n`` elements per statistic,
    ``d kl_c / d z = ((1 - r_c) * z + mu_c * r_c) / n``: the whole backward of a layer is one
    fused ``a_c + b_c * z`` over ``z`` (``a``, ``b`` prepared in the forward pass), with no autograd
    graph through the moments. The small per-channel maths of all layers is done once on their
    concatenated statistics: on a small network those tiny ops, not the big tensors, dominate.

    Returns the per-layer reduced values (``"sum"``/``"mean"``, shape (L,)) or the concatenated
    per-statistic values (``"none"``).
    """

    @staticmethod
    def forward(ctx, eps: float, dims: tuple[int, ...] | None, reduction: str, *zs: Tensor) -> Tensor:  # type: ignore[override]
        moments = [channel_moments(z, dims) for z in zs]
        sizes = [m.numel() for m, _ in moments]
        if len(zs) == 1:
            mean, var = moments[0][0].reshape(-1), moments[0][1].reshape(-1)
        else:
            mean = torch.cat([m.reshape(-1) for m, _ in moments])
            var = torch.cat([v.reshape(-1) for _, v in moments])
        veps = var + eps
        kl = (torch.addcmul(var, mean, mean) - torch.log(veps)).sub_(1.0).mul_(0.5)
        per_layer = [1.0 / (z.numel() // c) / (c if reduction == "mean" else 1) for z, c in zip(zs, sizes)]
        if len(zs) == 1:
            scale: Tensor | float = per_layer[0]
        else:
            scale = torch.repeat_interleave(torch.tensor(per_layer, dtype=var.dtype), torch.tensor(sizes))
        r = veps.reciprocal_()
        b = torch.rsub(r, 1.0).mul_(scale)
        a = (mean * r).mul_(scale)
        ctx.save_for_backward(a, b, *zs)
        ctx.sizes, ctx.dims, ctx.vector = sizes, dims, reduction == "none"
        if reduction == "none":
            return kl
        sums = kl.sum().view(1) if len(zs) == 1 else torch.stack([part.sum() for part in kl.split(sizes)])
        if reduction == "mean":
            sums = sums / torch.tensor(sizes, dtype=sums.dtype)
        return sums

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        a, b, *zs = ctx.saved_tensors
        if not ctx.vector:
            grad = grad if len(zs) == 1 else torch.repeat_interleave(grad, torch.tensor(ctx.sizes))
        a, b = a * grad, b * grad
        grads = []
        for z, a_l, b_l in zip(zs, a.split(ctx.sizes), b.split(ctx.sizes)):
            shape = _broadcast_shape(z, ctx.dims)
            a_l, b_l = a_l.view(shape), b_l.view(shape)
            g = torch.addcmul(a_l, b_l, z) if z.dtype == a_l.dtype else torch.addcmul(a_l, b_l, z.to(a_l.dtype)).to(z.dtype)
            grads.append(g)
        return (None, None, None, *grads)


def layer_kls(zs: Sequence[Tensor], eps: float = 1e-5, reduction: str = "sum") -> Tensor:
    """``standardization_kl`` of each tensor of ``zs`` (channel = dim 1), as one vector of shape (L,).

    Equal to ``torch.stack([standardization_kl(z, eps=eps, reduction=reduction) for z in zs])``
    (``reduction`` is "sum" or "mean" per tensor) but computed in one autograd node, which is what
    :class:`normlab.StandardizationLoss` uses at every training step.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean' per layer, got {reduction!r}")
    if not zs:
        raise ValueError("zs is empty: nothing to compute the loss of")
    return _KL.apply(float(eps), None, reduction, *zs)


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
    out = _KL.apply(float(eps), dims, reduction, z)
    if reduction == "none":
        reduced = (0, *range(2, z.dim())) if dims is None else dims
        return out.view([size for d, size in enumerate(z.shape) if d not in reduced])
    return out.view(())
