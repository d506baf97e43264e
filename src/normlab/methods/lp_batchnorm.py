"""L1 and top-k (L-infinity) batch norm from "Norm matters" (Hoffer, Banner, Golan & Soudry 2018,
arXiv 1803.01814).

Per channel ``c``, over the ``n`` elements of the batch (and spatial) dims, with ``d = x - mu``::

    L1 BN:     scale = sqrt(pi / 2) * mean(|d|)
    top-k BN:  scale = C(n) * mean(topk_k(|d|)),  C(n) = 0.5 * (1 + sqrt(pi * ln 4)) / sqrt(2 * ln n)
    y = d / sqrt(scale**2 + eps) * gamma + beta

``k = 1`` is pure L-infinity batch norm; the paper's later code defaults to ``k = 10``. ``sqrt(pi/2)``
makes the L1 scale match the standard deviation for Gaussian inputs; the paper's ``C(n)`` does so
only roughly (about 1.4 sigma for n = 16384), and ``calibrated=True`` replaces it by the exact
``1 / E[mean of the top k of n iid |N(0, 1)|]``.

Differences from the reference code, on purpose: eps sits under a square root, ``sqrt(scale**2 +
eps)`` (the paper writes ``scale + eps``), so the layer is a batch norm whose variance is
``scale**2``; ``running_var`` stores the running average of ``scale**2`` (not the inverse scale) and
the running averages follow PyTorch's convention ``running = (1 - momentum) * running + momentum *
batch``. Hence in eval mode the layer is exactly ``F.batch_norm`` on its running statistics and
folds into a preceding conv with the standard formula ``w * gamma / sqrt(running_var + eps)``.

Training uses a custom autograd function with an analytic backward: with ``r = 1/sqrt(s**2 + eps)``,
``yhat = d * r`` and ``gh = g * gamma``, the input gradient is

    dx = r * (gh - mean(gh)) - s * r**2 * sum(gh * yhat) * ds/dx,
    L1:    ds/dx_m = c / n * (sign(d_m) - mean(sign(d)))
    top-k: ds/dx_m = C(n) / k * (sign(d_m) * [m in top k] - sum_{j in top k} sign(d_j) / n)

so the backward costs one reduction pass (PyTorch's own batch-norm reduction) and one output pass,
plus one sign pass for L1 or a k-sparse correction for top-k. On CPU the statistics are taken in
cache-sized chunks of the batch so that no full-size temporary is ever allocated.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ._common import (check_input, check_layer_args, init_running_stats, pick_by_dims, running_affine,
                      values_per_channel)
from .registry import register, register_norm_type

__all__ = ["L1BatchNorm1d", "L1BatchNorm2d", "TopKBatchNorm1d", "TopKBatchNorm2d", "lp_batch_norm",
           "paper_constant", "expected_topk_mean"]

L1_CONSTANT = math.sqrt(math.pi / 2)
_CHUNK_ELEMS = 1 << 17  # elements per CPU chunk (512 KiB of float32): stays in L2/L3 cache


def paper_constant(n: int) -> float:
    """The paper's top-k constant ``C(n) = 0.5 * (1 + sqrt(pi * ln 4)) / sqrt(2 * ln n)`` (Hoffer et al.
    2018): ``C(n) * max|d|`` estimates the standard deviation from ``n`` samples (roughly)."""
    if n < 2:
        raise ValueError(f"top-k batch norm needs at least 2 elements per channel, got n={n}")
    return 0.5 * (1 + math.sqrt(math.pi * math.log(4))) / math.sqrt(2 * math.log(n))


def expected_topk_mean(n: int, k: int) -> float:
    """``E[mean of the k largest of n iid |N(0, 1)|]``, computed by numerical integration.

    Uses ``E[sum of the top k] = n * int_0^inf x f(x) P(Binomial(n - 1, q(x)) <= k - 1) dx`` with the
    half-normal density ``f(x) = 2 phi(x)`` and tail ``q(x) = erfc(x / sqrt 2)``. ``1 /`` this value is
    the calibrated constant of top-k batch norm: it makes the scale of Gaussian input equal sigma.
    """
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if torch.compiler.is_compiling():  # a constant of the shapes: computed eagerly, never traced
        # (torch.compiler.disable imports torch._dynamo, about 1 s: only here, where it is loaded already)
        return torch.compiler.disable(_expected_topk_mean)(int(n), int(k))
    return _expected_topk_mean(int(n), int(k))


@functools.lru_cache(maxsize=256)
def _expected_topk_mean(n: int, k: int) -> float:
    x = torch.linspace(0.0, 12.0, 48001, dtype=torch.float64)
    q = torch.special.erfc(x / math.sqrt(2))
    cdf = 1 - q
    i = torch.arange(k, dtype=torch.float64)[:, None]
    log_binom = (math.lgamma(n) - torch.lgamma(i + 1) - torch.lgamma(n - i))
    terms = log_binom + torch.special.xlogy(i, q) + torch.special.xlogy(n - 1 - i, cdf)
    p_le = torch.exp(terms).sum(0).clamp(max=1.0)  # P(at most k-1 of the other n-1 exceed x)
    density = math.sqrt(2 / math.pi) * torch.exp(-0.5 * x * x)
    total = n * torch.trapezoid(x * density * p_le, x)
    return float(total) / k


def _canonical(x: Tensor) -> tuple[Tensor, bool]:
    """View ``x`` as (N, C, M) (``last=False``) or, for channels-last images, (N, M, C) (``last=True``)."""
    n, c = x.shape[:2]
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).reshape(n, -1, c), True
    return x.contiguous().view(n, c, -1), False


def _chunks(xv: Tensor) -> int:
    """Samples per chunk: the whole batch off CPU (no allocation cost there), cache-sized on CPU."""
    if xv.device.type != "cpu":
        return xv.shape[0]
    per = xv[0].numel()
    return max(1, _CHUNK_ELEMS // max(per, 1))


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _LpBatchNormFn(torch.autograd.Function):
    """Training-mode L1 (``k == 0``) or top-k batch norm with the analytic backward of the module doc."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, k: int,
                const: float):
        xv, last = _canonical(x)
        mdim = 1 if last else 2  # the within-sample (spatial) dim of the canonical view
        acc = _acc_dtype(x)
        n = xv.shape[0] * xv.shape[mdim]
        # Reduce the contiguous within-sample dim first, then the batch: faster than one (0, mdim) sum.
        mu = xv.sum(mdim, dtype=acc).sum(0) / n
        mu_b = (mu if last else mu[:, None]).to(x.dtype)
        step = _chunks(xv)
        topk_state = ()
        if k == 0:
            parts = [(xc - mu_b).abs_().sum(mdim, dtype=acc) for xc in xv.split(step)]
            scale = torch.cat(parts).sum(0) * (const / n)
        else:
            # Row maxima of |d| per (sample, channel); the global top k of a channel lie in the k rows
            # with the largest maxima, so only those rows are searched in full.
            rowmax = torch.cat([(xc - mu_b).abs_().amax(mdim) for xc in xv.split(step)])  # (N, C)
            rows = rowmax.topk(min(k, xv.shape[0]), dim=0).indices  # (kk, C)
            ch = torch.arange(mu.shape[0], device=x.device)
            sel = xv[rows, :, ch] if last else xv[rows, ch]  # (kk, C, M)
            dsel = (sel.to(acc) - mu[:, None]).permute(1, 0, 2).reshape(mu.shape[0], -1)  # (C, kk*M)
            vals, pos = dsel.abs().topk(k, dim=1)  # (C, k)
            m_count = sel.shape[2]
            sgn = torch.sign(dsel.gather(1, pos))
            samples = rows.t().gather(1, torch.div(pos, m_count, rounding_mode="floor"))
            topk_state = (samples, pos.remainder(m_count), sgn)
            scale = vals.mean(1) * const
        var = scale * scale
        pdt = weight.dtype if weight is not None else bias.dtype if bias is not None else acc
        if pdt in (torch.float16, torch.bfloat16):  # var = scale**2 overflows float16 beyond scale 256
            pdt = torch.float32
        w = None if weight is None else weight.to(pdt)
        b = None if bias is None else bias.to(pdt)
        y = torch.batch_norm(x, w, b, mu.to(pdt), var.to(pdt), False, 0.0, eps, False)
        rstd = torch.rsqrt(var + eps)
        ctx.save_for_backward(x, weight, mu, scale, rstd, *topk_state)
        ctx.k, ctx.const, ctx.n, ctx.eps, ctx.bias_dtype = k, const, n, eps, (
            None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(mu, var)
        return y, mu, var

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor, _gmu: Tensor | None, _gvar: Tensor | None):
        x, weight, mu, scale, rstd, *topk_state = ctx.saved_tensors
        xv, last = _canonical(x)
        g = g.contiguous(memory_format=torch.channels_last) if last else g.contiguous()
        _, sum_gy, sum_g = torch.ops.aten.native_batch_norm_backward(
            g, x, None, None, None, mu, rstd, True, ctx.eps, [False, True, True])
        grad_x = None
        if ctx.needs_input_grad[0]:
            n, k = ctx.n, ctx.k
            gamma = weight.to(rstd.dtype) if weight is not None else torch.ones_like(rstd)
            a = rstd * gamma  # dx = a * g + c0 - coef * ds/dx-part, see the module doc
            coef = scale * rstd * rstd * gamma * sum_gy * (ctx.const / (n if k == 0 else k))
            c0 = -a * sum_g / n
            grad_x = torch.empty_like(x, memory_format=torch.channels_last if last else torch.contiguous_format)
            dxv = grad_x.permute(0, 2, 3, 1).reshape(xv.shape) if last else grad_x.view(xv.shape)
            if k == 0:
                # Pass 1 writes sign(x - mu) into grad_x and sums it; pass 2 completes the affine part,
                # chunk by chunk so that each chunk is still in cache.
                mdim = 1 if last else 2
                view = (lambda t: t) if last else (lambda t: t[:, None])
                mu_b = view(mu).to(x.dtype)
                step = _chunks(xv)
                dx_chunks, x_chunks = dxv.split(step), xv.split(step)
                parts = [torch.sub(xc, mu_b, out=dc).sign_().sum(mdim, dtype=rstd.dtype)
                         for xc, dc in zip(x_chunks, dx_chunks)]
                c0 = c0 + coef * torch.cat(parts).sum(0) / n
                neg_c, a_b, c0_b = (view(t).to(x.dtype) for t in (-coef, a, c0))
                gv = g.permute(0, 2, 3, 1).reshape(xv.shape) if last else g.view(xv.shape)
                for dc, gc in zip(dx_chunks, gv.split(step)):
                    torch.addcmul(c0_b, dc, neg_c, out=dc).addcmul_(gc, a_b)
            else:
                samples, mpos, sgn = topk_state
                shape = (1, -1) + (1,) * (x.dim() - 2)
                c0 = c0 + coef * sgn.sum(1) / n
                torch.addcmul(c0.to(x.dtype).view(shape), g, a.to(x.dtype).view(shape), out=grad_x)
                ch = torch.arange(mu.shape[0], device=x.device)[:, None].expand_as(samples)
                index = (samples, mpos, ch) if last else (samples, ch, mpos)
                dxv.index_put_(index, (-coef[:, None] * sgn).to(x.dtype), accumulate=True)
        grad_w = sum_gy.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_b = sum_g.to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None, None


def lp_batch_norm(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                  weight: Tensor | None = None, bias: Tensor | None = None, training: bool = False,
                  momentum: float = 0.1, eps: float = 1e-5, k: int = 0, const: float | None = None) -> Tensor:
    """Functional L1 (``k == 0``) or top-k batch norm (Hoffer et al. 2018, arXiv 1803.01814).

    Training: ``y = (x - mu) / sqrt(s**2 + eps) * weight + bias`` with ``s`` the L1 or top-k scale of
    the batch (see the module doc) and, if given, ``running_mean`` / ``running_var`` updated in place as
    ``(1 - momentum) * running + momentum * (mu, s**2)``. Eval: ``F.batch_norm`` on the running
    statistics. ``const`` defaults to ``sqrt(pi/2)`` for L1 and the paper's ``C(n)`` for top-k.
    """
    if not isinstance(x, Tensor) or x.dim() < 2 or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor of shape (N, C, ...), got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be an int >= 0 (0: L1 batch norm, 1: L-infinity), got {k!r}")
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError("lp_batch_norm in eval mode needs running_mean and running_var")
        return torch.batch_norm(x, weight, bias, running_mean, running_var, False, 0.0, eps, False)
    n = values_per_channel(x)
    if k > n:
        raise ValueError(f"top-k batch norm with k={k} needs at least k values per channel, got {n} "
                         f"(input of shape {tuple(x.shape)}); use a smaller k or a larger batch")
    if const is None:
        const = L1_CONSTANT if k == 0 else paper_constant(n)
    y, mu, var = _LpBatchNormFn.apply(x, weight, bias, eps, k, const)
    if running_mean is not None and running_var is not None:
        with torch.no_grad():
            # In the statistics' precision, then rounded: var may overflow float16 where the average does not.
            running_mean.copy_(running_mean.to(mu.dtype).lerp_(mu, momentum))
            running_var.copy_(running_var.to(var.dtype).lerp_(var, momentum))
    return y


class _LpBatchNorm(nn.Module):
    """Shared body of the L1 and top-k batch-norm layers (buffers and parameters as in BatchNorm)."""

    _k = 0
    _dims: tuple[int, ...] = ()
    _kind = ""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        check_layer_args(num_features, eps)
        if momentum is not None and not (isinstance(momentum, (int, float)) and 0 <= momentum <= 1):
            raise ValueError(f"momentum must be in [0, 1] or None (cumulative average), got {momentum!r}")
        self.num_features = num_features
        self.eps = float(eps)
        self.momentum = momentum
        self.affine = affine
        init_running_stats(self, num_features, affine, device, dtype)

    def reset_running_stats(self) -> None:
        """Running mean 0, running ``scale**2`` 1, no batches tracked."""
        self.running_mean.zero_()
        self.running_var.fill_(1)
        self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Reset running statistics, ``weight`` to 1 and ``bias`` to 0."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def _check_input(self, x: Tensor) -> None:
        check_input(self, x, tuple(d + 2 for d in self._dims))

    def _constant(self, n: int) -> float:
        return L1_CONSTANT

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if not self.training:
            return torch.batch_norm(x, self.weight, self.bias, self.running_mean, self.running_var,
                                    False, 0.0, self.eps, False)
        n = values_per_channel(x)  # before any state changes: a caught error leaves the statistics alone
        const = self._constant(n)  # top-k: raises when k > n, also before the batch is counted
        self.num_batches_tracked.add_(1)
        momentum = self.momentum
        if momentum is None:  # cumulative moving average, as nn.BatchNorm
            momentum = 1.0 / float(self.num_batches_tracked)
        return lp_batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True,
                             momentum, self.eps, self._k, const)

    @torch.no_grad()
    def eval_affine(self) -> tuple[Tensor, Tensor]:
        """Eval-mode map as ``y = x * scale + shift``: ``scale = gamma / sqrt(running_var + eps)``,
        ``shift = beta - running_mean * scale`` (each of shape (C,))."""
        return running_affine(self.running_mean, self.running_var, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}"


class L1BatchNorm1d(_LpBatchNorm):
    """L1 batch norm for (N, C) or (N, C, L) input (Hoffer et al. 2018, arXiv 1803.01814).

    ``y = (x - mu) / sqrt(s**2 + eps) * gamma + beta`` with ``s = sqrt(pi/2) * mean|x - mu|`` per
    channel over the batch (and length) dims in training, running averages (PyTorch momentum
    convention; ``running_var`` holds ``s**2``) in eval. eps is under the square root.
    """

    _dims = (0, 1)
    spatial_dims = 1


class L1BatchNorm2d(L1BatchNorm1d):
    """L1 batch norm for (N, C, H, W) input (Hoffer et al. 2018, arXiv 1803.01814); see
    :class:`L1BatchNorm1d`. Channels-last input stays channels-last."""

    _dims = (2,)
    spatial_dims = 2


class TopKBatchNorm1d(_LpBatchNorm):
    """Top-k (k = 1: L-infinity) batch norm for (N, C) or (N, C, L) input (Hoffer et al. 2018,
    arXiv 1803.01814).

    ``y = (x - mu) / sqrt(s**2 + eps) * gamma + beta`` with ``s = C * mean(topk_k |x - mu|)`` over the
    ``n`` elements of each channel; ``C = C(n) = 0.5 * (1 + sqrt(pi * ln 4)) / sqrt(2 * ln n)`` (the
    paper's constant, default) or, with ``calibrated=True``, ``1 / E[mean of the top k of n |N(0,1)|]``
    so that ``s`` equals sigma for Gaussian input. Running averages as in batch norm, ``running_var``
    holding ``s**2``; eps is under the square root. ``k`` must not exceed ``n`` in training.
    """

    _dims = (0, 1)
    spatial_dims = 1

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, device=None, dtype=None, k: int = 10, calibrated: bool = False) -> None:
        super().__init__(num_features, eps, momentum, affine, device, dtype)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1 (k=1 is L-infinity batch norm), got {k!r}")
        self._k = k
        self.calibrated = bool(calibrated)

    @property
    def k(self) -> int:
        """How many of the largest deviations per channel are averaged."""
        return self._k

    def _constant(self, n: int) -> float:
        if self._k > n:
            raise ValueError(f"{type(self).__name__} with k={self._k} needs at least k values per channel, "
                             f"got {n}; use a smaller k or a larger batch")
        return 1.0 / expected_topk_mean(n, self._k) if self.calibrated else paper_constant(n)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", k={self._k}, calibrated={self.calibrated}"


class TopKBatchNorm2d(TopKBatchNorm1d):
    """Top-k batch norm for (N, C, H, W) input (Hoffer et al. 2018, arXiv 1803.01814); see
    :class:`TopKBatchNorm1d`."""

    _dims = (2,)
    spatial_dims = 2


for _cls in (L1BatchNorm1d, TopKBatchNorm1d):
    register_norm_type(_cls, 1)
for _cls in (L1BatchNorm2d, TopKBatchNorm2d):
    register_norm_type(_cls, 2)




def l1_batch_norm(num_features: int, dims: int | None = 2, eps: float = 1e-5, momentum: float = 0.1,
                  affine: bool = True) -> nn.Module:
    """``L1BatchNorm1d`` for dims 0/1, ``L1BatchNorm2d`` for dims 2."""
    return pick_by_dims("l1bn", L1BatchNorm1d, L1BatchNorm2d, dims)(num_features, eps, momentum, affine)


def topk_batch_norm(num_features: int, dims: int | None = 2, eps: float = 1e-5, momentum: float = 0.1,
                    affine: bool = True, k: int = 10, calibrated: bool = False) -> nn.Module:
    """``TopKBatchNorm1d`` for dims 0/1, ``TopKBatchNorm2d`` for dims 2 (default k = 10)."""
    cls = pick_by_dims("topkbn", TopKBatchNorm1d, TopKBatchNorm2d, dims)
    return cls(num_features, eps, momentum, affine, k=k, calibrated=calibrated)


def linf_batch_norm(num_features: int, dims: int | None = 2, eps: float = 1e-5, momentum: float = 0.1,
                    affine: bool = True, calibrated: bool = False) -> nn.Module:
    """Top-k batch norm with ``k = 1``: L-infinity batch norm."""
    cls = pick_by_dims("linfbn", TopKBatchNorm1d, TopKBatchNorm2d, dims)
    return cls(num_features, eps, momentum, affine, k=1, calibrated=calibrated)


register("l1bn", "L1 batch norm (Hoffer et al. 2018): scale = sqrt(pi/2) * mean|x - mu|",
         layer=l1_batch_norm)(None)
register("topkbn", "top-k batch norm (Hoffer et al. 2018): scale = C(n) * mean of the k largest |x - mu| "
         "(k=10)", layer=topk_batch_norm)(None)
register("linfbn", "L-infinity batch norm (Hoffer et al. 2018): scale = C(n) * max|x - mu|",
         layer=linf_batch_norm)(None)
