"""Stateless maths of normlab.

The standardization loss of Collins, Ballé & Shlens, "Accelerating Training of Deep Neural Networks
with a Standardization Loss" (arXiv 1903.00925): for each channel ``c`` of a pre-activation ``z``
with batch mean ``mu_c`` and biased batch variance ``var_c``,

    KL(N(mu_c, var_c) || N(0, 1)) = 0.5 * (mu_c**2 + var_c - log(var_c + eps) - 1).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .methods._common import check_number

__all__ = ["channel_moments", "standardization_kl", "layer_kls", "patch_moments", "PatchMoments"]

_REDUCTIONS = ("sum", "mean", "none")
_FLOAT32_64 = (torch.float32, torch.float64)


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
    if not all(isinstance(d, int) and -z.dim() <= d < z.dim() for d in dims):
        raise IndexError(f"dim must name dims of z, in [-{z.dim()}, {z.dim()}) for shape {tuple(z.shape)}; got {dim}")
    dims = tuple(sorted(d % z.dim() for d in dims))
    if len(set(dims)) != len(dims):
        raise ValueError(f"dim has repeated entries: {dim}")
    return dims


def channel_moments(z: Tensor, dim: int | Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
    """Mean and biased variance of ``z`` over ``dim``, computed in at least float32.

    With ``dim=None`` the channel is dim 1 and the statistics run over every other dim, as in batch
    norm: ``N`` for (N, C), ``N, L`` for (N, C, L), ``N, H, W`` for (N, C, H, W), and so on. This
    case uses the batch-norm statistics kernel (``torch.batch_norm_update_stats``), which is ~20x
    faster than ``torch.var_mean`` over (0, 2, 3) on a CPU and as stable as batch norm itself; that
    kernel has no derivative, so where ``z`` needs a gradient ``torch.var_mean`` is used instead.

    Raises ``ValueError`` when the variance is undefined (a single element per statistic).
    """
    if dim is None and z.dtype in _FLOAT32_64 and z.dim() >= 2 and z.numel() > z.shape[1] \
            and not (z.requires_grad and torch.is_grad_enabled()):  # the common case, first: no more checks
        return torch.batch_norm_update_stats(z, None, None, 0.0)
    dims = _reduced_dims(z, dim)
    n = 1
    for d in dims:
        n *= z.shape[d]
    if n < 2:
        raise ValueError(
            f"the variance over dims {dims} of a tensor of shape {tuple(z.shape)} is undefined "
            "(one element per channel): use a batch of at least 2 samples, or reduce over more dims"
        )
    if z.dtype not in _FLOAT32_64:
        z = z.float()
    if dim is None and not (z.requires_grad and torch.is_grad_enabled()):
        return torch.batch_norm_update_stats(z, None, None, 0.0)
    var, mean = torch.var_mean(z, dim=dims, correction=0)
    return (mean.flatten(), var.flatten()) if dim is None else (mean, var)


def _broadcast_shape(z: Tensor, dims: tuple[int, ...] | None) -> list[int]:
    # Shape of a per-statistic tensor that broadcasts against z (1 on the reduced dims).
    reduced = (0, *range(2, z.dim())) if dims is None else dims
    return [1 if d in reduced else size for d, size in enumerate(z.shape)]


class PatchMoments(NamedTuple):
    """Mean and covariance of the input patches of a convolution, with its weight and bias.

    A convolution is linear in its input patches ``x_p``: ``z_p = W x_p + b``. So the moments of
    every output channel ``c`` follow exactly from the patches' mean ``m`` and biased covariance
    ``S``: ``mu_c = w_c . m + b_c`` and ``var_c = w_c^T S w_c`` (``w_c``: row ``c`` of the weight as
    a (C_out, K) matrix, ``K = C_in * prod(kernel_size)``). :func:`layer_kls` accepts it in place of
    the output ``z``; the gradient then goes to ``weight`` and ``bias`` through K x K matrices and
    never touches the output. Build it with :func:`patch_moments`.
    """

    weight: Tensor
    bias: Tensor | None
    mean: Tensor
    cov: Tensor
    count: int


def _ntuple(value: int | Sequence[int], n: int, name: str, least: int = 0) -> tuple[int, ...]:
    out = (value,) * n if isinstance(value, int) else tuple(value)
    if len(out) != n or not all(isinstance(v, int) and v >= least for v in out):
        raise ValueError(f"{name} must be an int >= {least} or a tuple of {n} of them, got {value!r}")
    return out


def _shifted_patches(x: Tensor, kernel: tuple[int, ...], stride: tuple[int, ...], padding: tuple[int, ...],
                     dilation: tuple[int, ...], shift: Tensor) -> tuple[Tensor, int]:
    # The (K, N, P) patches of x (K = C_in * prod(kernel) entries, P output positions) in one strided
    # copy, every entry (the zero padding too) minus its input channel's shift, (C_in,) or per
    # example (N, C_in); and P.
    d = x.dim() - 2
    xs = x.detach().transpose(0, 1)  # (C_in, N, *spatial): the patch index (C_in, *kernel) leads
    shift_b = (shift.view(-1, 1) if shift.dim() == 1 else shift.t()).reshape(xs.shape[0], -1, *(1,) * d)
    xs = F.pad(xs, [p for p in reversed(padding) for _ in (0, 1)]).sub_(shift_b) if any(padding) else xs - shift_b
    out = [(size - dil * (k - 1) - 1) // st + 1 for size, k, st, dil in zip(xs.shape[2:], kernel, stride, dilation)]
    if min(out) < 1:
        raise ValueError(f"kernel {kernel} (dilation {dilation}) is larger than the padded input {tuple(xs.shape[2:])}")
    st = xs.stride()
    view = xs.as_strided(
        (xs.shape[0], *kernel, xs.shape[1], *out),
        (st[0], *(st[2 + i] * dilation[i] for i in range(d)), st[1], *(st[2 + i] * stride[i] for i in range(d))),
        xs.storage_offset())
    positions = math.prod(out)
    return view.reshape(-1, xs.shape[1], positions), positions


def patch_moments(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: int | Sequence[int] = 1,
                  padding: int | Sequence[int] = 0, dilation: int | Sequence[int] = 1) -> PatchMoments:
    """:class:`PatchMoments` of ``conv(x, weight, bias, stride, padding, dilation)`` (zero padding,
    one group, 1 to 3 spatial dims), for the standardization loss of a first layer.

    Computes ``m = mean_p x_p`` and ``S = mean_p (x_p - m)(x_p - m)^T`` over the ``N * prod(out)``
    patches of ``x`` (without gradient: ``x`` is data), from one strided copy of the patches and one
    K x K matrix product; ``x`` must be float32 or float64, ``m`` and ``S`` are float64. Each example
    ``i`` is shifted by its own channel means ``s_i``, so the product sums only the spread within
    examples, ``y_ip = x_ip - s_i``; the spread between them is added in float64:
    ``N P S = sum y y^T + sum_i (Y_i d_i^T + d_i Y_i^T + P d_i d_i^T)`` with ``Y_i = sum_p y_ip`` and
    ``d_i = s_i - m`` (no cancellation when examples differ in level far more than within, e.g.
    against a zero-sum kernel). Raises ``ValueError`` when there is a single patch (the variance is
    undefined). On the paper's MNIST CNN (patches of K = 9 values, 32 output channels) this is much
    less memory traffic than the statistics and gradient of the (N, 32, 14, 14) output it replaces.
    """
    d = x.dim() - 2
    if d not in (1, 2, 3) or weight.dim() != d + 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"patch_moments needs x of shape (N, C_in, *spatial) with 1-3 spatial dims and a weight "
                         f"of shape (C_out, C_in, *kernel); got x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"patch_moments needs a float32 or float64 x, got {x.dtype}")
    stride, dilation = _ntuple(stride, d, "stride", 1), _ntuple(dilation, d, "dilation", 1)
    padding = _ntuple(padding, d, "padding")
    kernel = tuple(weight.shape[2:])
    with torch.no_grad():
        shift = x.detach().mean(tuple(range(2, x.dim())))  # s_i: (N, C_in)
        patches, positions = _shifted_patches(x, kernel, stride, padding, dilation, shift)  # (K, N, P)
        count = x.shape[0] * positions
        if count < 2:
            raise ValueError(f"the output variance of a conv on input {tuple(x.shape)} is undefined (one output "
                             "position per channel): use a batch of at least 2 samples")
        k = len(patches)
        sums = patches.sum(2).T.double()  # Y_i: (N, K)
        flat = patches.reshape(k, count)
        gram = torch.mm(flat, flat.T).double()
        s = shift.double().repeat_interleave(math.prod(kernel), dim=1)  # (N, K)
        mean = sums.sum(0).add_(s.sum(0), alpha=positions).div_(count)
        dev = s - mean
        cross = torch.mm(sums.T, dev)
        cov = torch.addmm(gram.add_(cross).add_(cross.T), dev.T, dev, alpha=positions).div_(count)
    return PatchMoments(weight, bias, mean, cov, count)


def _load_fused() -> ctypes.CDLL | None:
    # The compiled loops of _fused.c (built by `pip install` where a C compiler is found), or None:
    # then, or with NORMLAB_PURE_TORCH=1 set, _KL runs the same maths as torch operations instead of _FusedKL.
    if os.environ.get("NORMLAB_PURE_TORCH", "") not in ("", "0"):
        return None
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = Path(__file__).with_name("_fused" + suffix)
        if path.is_file():
            try:
                lib = ctypes.CDLL(str(path))
            except OSError:
                return None
            p, i64, f64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
            for name, restype, args in (
                    ("nl_table_moments", i32, (p, i64, p, i64, i64, p, f64, p, p)),
                    ("nl_z_kl", f64, (p, i64, i64, i64, f64, f64, p, p, p)),
                    ("nl_patch_kl", f64, (p, p, p, p, i64, i64, f64, f64, p, p, p, p)),
                    ("nl_patch_grad", None, (f64, p, p, p, p, i64, i64, p, p)),
                    ("nl_z_grad", i32, (p, p, i64, i64, i64, p, p, f64))):
                fn = getattr(lib, name)
                fn.restype, fn.argtypes = restype, args
            return lib
    return None


_fused = _load_fused()


def _z_layout(z: Tensor) -> tuple[int, int] | None:
    # (outer, inner) of a float32 CPU z seen as contiguous (outer, C, inner), or None (another layout).
    if z.dtype != torch.float32 or not z.is_cpu or z.dim() < 2:
        return None
    c = z.shape[1]
    if z.is_contiguous():
        return z.shape[0], z.numel() // max(1, z.shape[0] * c)
    if (z.dim() == 4 and z.is_contiguous(memory_format=torch.channels_last)) or \
            (z.dim() == 5 and z.is_contiguous(memory_format=torch.channels_last_3d)):
        return z.numel() // max(1, c), 1
    return None


def _fusable(layers: Sequence[Tensor | PatchMoments]) -> tuple[tuple, list[Tensor | None]] | None:
    # How _FusedKL runs these layers, (plan, inputs), or None where it cannot: it takes float32 CPU
    # tensors z in a layout of _z_layout, and float32 contiguous weight and bias with float64 contiguous
    # CPU patch moments of matching shapes. inputs: each z, each patch layer's weight and bias (the
    # tensors that get a gradient); plan: (C, W, steps) with C channels in all, W float64s of the patch
    # layers' w cov, and per layer (index of its first input, channels, offset of its channels among
    # the C) and then (outer, inner) of a z, or (K, offset of its w cov, weight shape, has a bias, m,
    # cov) of patch moments.
    steps: list[tuple] = []
    inputs: list[Tensor | None] = []
    channels, width = 0, 0
    for layer in layers:
        if isinstance(layer, PatchMoments):
            weight, bias, m, cov, _ = layer
            if weight.dtype != torch.float32 or not weight.is_cpu or not weight.is_contiguous() \
                    or (bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous())) \
                    or m.dtype != torch.float64 or cov.dtype != torch.float64 or not m.is_contiguous() \
                    or not cov.is_contiguous() or not m.is_cpu or not cov.is_cpu or m.dim() != 1:
                return None
            size, k = weight.shape[0], m.shape[0]
            if cov.shape != (k, k) or weight.numel() != size * k or (bias is not None and bias.shape != (size,)):
                return None
            steps.append((len(inputs), size, channels, k, width, weight.shape, bias is not None, m, cov))
            inputs += [weight, bias]
            width += size * k
        else:
            shape = _z_layout(layer) if isinstance(layer, Tensor) else None
            if shape is None:
                return None
            size = layer.shape[1]
            steps.append((len(inputs), size, channels, *shape))
            inputs.append(layer)
        channels += size
    return (channels, width, steps), inputs


class _Constants(NamedTuple):
    # seg (L, C): row l sums layer l's channels, weighted 1/C_l for "mean"
    seg_t: Tensor  # seg.T, contiguous: d loss / d kl_c from the per-layer gradient
    half_seg: Tensor  # 0.5 * seg
    offset: Tensor  # (L,): 0.5 * seg.sum(1), so that layer l's value is half_seg @ raw - offset
    inv_count: Tensor  # (C,): 1 / (elements per statistic) of each channel's layer
    chan_w: Tensor  # (C,): seg.sum(0), d total / d kl_c
    half_w: Tensor  # (C,): 0.5 * chan_w, so that the total is half_w . raw - total_offset
    total_offset: float  # 0.5 * seg.sum()
    unit: bool  # chan_w is all ones ("sum"): d total / d kl_c is the incoming gradient itself


@functools.lru_cache(maxsize=64)
def _constants(sizes: tuple[int, ...], counts: tuple[int, ...], mean: bool, device: torch.device,
               dtype: torch.dtype) -> _Constants:
    seg = torch.zeros(len(sizes), sum(sizes), dtype=torch.float64)
    inv_count = torch.empty(sum(sizes), dtype=torch.float64)
    start = 0
    for layer, (size, count) in enumerate(zip(sizes, counts)):
        seg[layer, start:start + size] = 1.0 / size if mean else 1.0
        inv_count[start:start + size] = 1.0 / count
        start += size
    out = (seg.T.contiguous(), 0.5 * seg, 0.5 * seg.sum(1), inv_count, seg.sum(0), 0.5 * seg.sum(0))
    return _Constants(*(t.to(device=device, dtype=dtype) for t in out), 0.5 * seg.sum().item(),
                      not mean or all(size == 1 for size in sizes))


def _first_derivative_only() -> None:
    # In a backward with create_graph=True a graph of the analytic backward would be wrong, not absent.
    if torch.is_grad_enabled():
        raise RuntimeError("the standardization loss has no second derivative: a backward with "
                           "create_graph=True through it (a gradient penalty, a Hessian-vector product) is "
                           "not supported")


class _KL(torch.autograd.Function):
    """Per-layer standardization KL of several layers at once, with an analytic backward.

    Each layer is a pre-activation ``z`` or the :class:`PatchMoments` of a convolution. With
    ``r_c = 1 / (var_c + eps)``, ``d kl_c / d mu_c = mu_c`` and ``d kl_c / d var_c = (1 - r_c) / 2``,
    so for ``z`` with ``n`` elements per statistic ``d kl_c / d z = (mu_c + (1 - r_c) (z - mu_c)) / n``
    ``= lerp(z, mu_c, r_c) / n``: the whole backward of a layer is one ``lerp`` and one scaling over
    ``z``, with no autograd graph through the moments (and no second derivative:
    ``create_graph=True`` through it raises). For patch moments it is
    ``d/dw_c = mu_c m + (1 - r_c) S w_c`` and ``d/db_c = mu_c``. The small per-channel maths of all
    layers is done once on their concatenated statistics: on a small network those tiny ops, not
    the big tensors, dominate, so this code counts them.

    ``layout`` holds, per layer, None for a tensor ``z`` (one input) or the patch count for patch
    moments (four inputs: weight, bias, mean, cov). Returns the per-layer reduced values
    (``"sum"``/``"mean"``, shape (L,)) or the concatenated per-statistic values (``"none"``); given
    a list ``sink`` (``"sum"``/``"mean"`` only), the sum over layers instead, 0-dim, with the
    per-statistic ``raw = 2 * kl + 1`` (no gradient) appended to ``sink``, from which
    :func:`_layer_values` gives the per-layer values when they are asked for (the standardization
    loss's step needs only the total).

    :class:`_FusedKL` is the same maths with a ``sink`` in C loops, which the standardization loss
    runs where it can.
    """

    @staticmethod
    def forward(ctx, eps: float, dims: tuple[int, ...] | None, reduction: str, sink: list | None,  # type: ignore[override]
                layout: tuple[int | None, ...], *inputs: Tensor | None) -> Tensor:
        means, variances, counts, saved, params, i = [], [], [], [], [], 0
        for count in layout:
            if count is None:
                z = inputs[i]
                mean, var = channel_moments(z, dims)
                if dims is not None:
                    mean, var = mean.reshape(-1), var.reshape(-1)
                counts.append(z.numel() // mean.numel())
                saved.append(z)
                i += 1
            else:
                weight, bias, m, cov = inputs[i:i + 4]
                w = weight.reshape(weight.shape[0], -1)
                if w.dtype != cov.dtype:
                    w = w.to(cov.dtype)
                mean = torch.mv(w, m) if bias is None else torch.addmv(bias.to(cov.dtype), w, m)
                wcov = torch.mm(w, cov)
                var = torch.linalg.vecdot(wcov, w).clamp_(min=0.0)  # w_c^T S w_c
                if weight.dtype in _FLOAT32_64 and weight.dtype != var.dtype:
                    mean, var = mean.to(weight.dtype), var.to(weight.dtype)  # computed in float64
                counts.append(count)
                saved += [wcov, m]
                params.append((weight.shape, weight.dtype, None if bias is None else bias.dtype))
                i += 4
            means.append(mean)
            variances.append(var)
        sizes = tuple(m.numel() for m in means)
        mean = torch.cat(means) if len(means) > 1 else means[0]
        var = torch.cat(variances) if len(variances) > 1 else variances[0]
        veps = var + eps
        raw = torch.addcmul(var, mean, mean).sub_(torch.log(veps))  # 2 * kl + 1
        consts = _constants(sizes, tuple(counts), reduction == "mean", mean.device, mean.dtype)
        ctx.save_for_backward(mean, veps, *saved)
        ctx.layout, ctx.sizes, ctx.dims, ctx.none = layout, sizes, dims, reduction == "none"
        ctx.consts, ctx.params, ctx.total = consts, params, sink is not None
        if reduction == "none":
            return raw.sub_(1.0).mul_(0.5)
        if sink is not None:
            sink.append(raw)
            return torch.dot(raw, consts.half_w).sub_(consts.total_offset)
        return torch.addmv(consts.offset, consts.half_seg, raw, beta=-1.0)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        _first_derivative_only()
        mean, veps, *saved = ctx.saved_tensors
        consts, layers, sizes = ctx.consts, ctx.layout, ctx.sizes
        # c = d loss / d kl_c: the incoming gradient itself (0-dim, broadcast) for the total of "sum"
        if ctx.none:
            c = grad
        elif ctx.total:
            c = grad if consts.unit else grad * consts.chan_w
        else:
            c = torch.mv(consts.seg_t, grad)
        r = veps.reciprocal()

        def per_layer(v: Tensor) -> tuple[Tensor, ...]:  # one split per vector, not a slice per layer
            return v.split_with_sizes(sizes) if len(sizes) > 1 else (v,)

        if None in layers:  # tensors: lerp(z, mu, r) * c / n
            means, rs, scales = per_layer(mean), per_layer(r), per_layer(c * consts.inv_count)
        if layers.count(None) < len(layers):  # patch moments: d/dw = c mu m^T + c (1 - r) S w, d/db = c mu
            cmean, cslope = per_layer(mean * c), per_layer(torch.addcmul(c, r, c, value=-1.0))
        grads: list[Tensor | None] = []
        s, w = 0, 0
        for layer, count in enumerate(layers):
            if count is None:
                # z + r (mu - z) = mu + (1 - r) (z - mu), centred by lerp: (1 - r) z + r mu would cancel
                # catastrophically for a nearly constant channel far from 0 (r large).
                z = saved[s]
                shape = _broadcast_shape(z, ctx.dims)
                zf = z if z.dtype == mean.dtype else z.to(mean.dtype)
                g = torch.lerp(zf, means[layer].view(shape), rs[layer].view(shape)).mul_(scales[layer].view(shape))
                grads.append(g if g.dtype == z.dtype else g.to(z.dtype))
                s += 1
            else:
                wcov, m = saved[s], saved[s + 1]
                shape, dtype, bias_dtype = ctx.params[w]
                db = cmean[layer]
                dw = torch.addcmul(torch.outer(db, m), cslope[layer].unsqueeze(1), wcov).view(shape)
                grads += [dw if dw.dtype == dtype else dw.to(dtype),
                          None if bias_dtype is None else db if db.dtype == bias_dtype else db.to(bias_dtype),
                          None, None]
                s += 2
                w += 1
        return (None, None, None, None, None, *grads)


class _FusedKL(torch.autograd.Function):
    """:class:`_KL`'s total with a ``sink`` (the standardization loss's step) in the C loops of
    ``_fused.c``: one loop per layer and pass (a patch layer's moments and KL, a z's moments and KL;
    the gradients), the per-channel values in float64. It runs on the CPU for float32 ``z``
    (contiguous or channels_last) and float64 patch moments (see :func:`_fusable`), where the loops
    were compiled at install and ``NORMLAB_PURE_TORCH=1`` is not set; elsewhere ``_KL`` runs the
    same maths as torch operations. The gradients are those of ``_KL``, with ``z - mu_c`` taken
    against the float64 mean.
    """

    @staticmethod
    def forward(ctx, eps: float, mean: bool, sink: list, plan: tuple, *inputs: Tensor | None) -> Tensor:  # type: ignore[override]
        # one float64 buffer: mu, var + eps and raw of the C channels, then each patch layer's w cov
        channels, width, steps = plan
        buf = torch.empty(3 * channels + width, dtype=torch.float64)
        base, total, saved = buf.data_ptr(), 0.0, []
        for i, size, off, *shape in steps:
            at = (base + 8 * off, base + 8 * (channels + off), base + 8 * (2 * channels + off))
            cw = 1.0 / size if mean else 1.0
            if len(shape) == 2:
                z = inputs[i]
                total += _fused.nl_z_kl(z.data_ptr(), shape[0], size, shape[1], eps, cw, *at)
                saved.append(z)
            else:
                k, woff, _, _, m, cov = shape
                weight, bias = inputs[i:i + 2]
                total += _fused.nl_patch_kl(weight.data_ptr(), None if bias is None else bias.data_ptr(), m.data_ptr(),
                                            cov.data_ptr(), size, k, eps, cw, *at, base + 8 * (3 * channels + woff))
        ctx.save_for_backward(buf, *saved)
        ctx.plan, ctx.mean = plan, mean
        sink.append(buf[2 * channels:3 * channels])
        return torch.tensor(total, dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        _first_derivative_only()
        buf, *zs = ctx.saved_tensors
        channels, _, steps = ctx.plan
        g, base, grads, zs = float(grad), buf.data_ptr(), [], iter(zs)
        for i, size, off, *shape in steps:
            gcw = g / size if ctx.mean else g
            at = (base + 8 * off, base + 8 * (channels + off))
            if len(shape) == 2:
                z, out = next(zs), None
                if ctx.needs_input_grad[4 + i]:
                    out = torch.empty_like(z)
                    if _fused.nl_z_grad(z.data_ptr(), out.data_ptr(), shape[0], size, shape[1], *at,
                                        gcw / (shape[0] * shape[1])):
                        raise MemoryError("the standardization loss's backward could not allocate 4 floats per channel")
                grads.append(out)
            else:
                k, woff, wshape, has_bias, m, _ = shape
                dw = torch.empty(wshape, dtype=torch.float32)
                db = torch.empty(size, dtype=torch.float32) if has_bias else None
                _fused.nl_patch_grad(gcw, *at, base + 8 * (3 * channels + woff), m.data_ptr(), size, k, dw.data_ptr(),
                                     None if db is None else db.data_ptr())
                grads += [dw, db]
        return (None, None, None, None, *grads)


def _flatten(layers: Sequence[Tensor | PatchMoments]) -> tuple[tuple[int | None, ...], list[Tensor | None]]:
    layout: list[int | None] = []
    inputs: list[Tensor | None] = []
    for layer in layers:
        if isinstance(layer, PatchMoments):
            layout.append(layer.count)
            inputs += [layer.weight, layer.bias, layer.mean, layer.cov]
        elif isinstance(layer, Tensor):
            layout.append(None)
            inputs.append(layer)
        else:
            raise TypeError(f"each layer must be a Tensor or a PatchMoments, got {type(layer).__name__}")
    return tuple(layout), inputs


def layer_kls(zs: Sequence[Tensor | PatchMoments], eps: float = 1e-5, reduction: str = "sum") -> Tensor:
    """``standardization_kl`` of each layer of ``zs`` (channel = dim 1), as one vector of shape (L,).

    Each item is a pre-activation tensor ``z`` or the :class:`PatchMoments` of a convolution whose
    input needs no gradient (see :func:`patch_moments`), which stand for its output exactly. Equal to
    ``torch.stack([standardization_kl(z, eps=eps, reduction=reduction) for z in zs])``
    (``reduction`` is "sum" or "mean" per layer) but computed in one autograd node, which is what
    :class:`normlab.StandardizationLoss` uses at every training step.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean' per layer, got {reduction!r}")
    if not zs:
        raise ValueError("zs is empty: nothing to compute the loss of")
    check_number(eps, "eps", positive=True, why="it keeps log(var + eps) finite for constant channels")
    layout, inputs = _flatten(zs)
    return _KL.apply(float(eps), None, reduction, None, layout, *inputs)


def _kl_total(layers: Sequence[Tensor | PatchMoments], eps: float, reduction: str) -> tuple[Tensor, Tensor]:
    # layer_kls(layers, eps, reduction).sum() without the per-layer vector, and the per-statistic
    # raw = 2 * kl + 1 (no gradient) for _layer_values; eps and reduction already checked.
    sink: list[Tensor] = []
    fused = _fusable(layers) if _fused is not None else None
    if fused is not None:
        return _FusedKL.apply(eps, reduction == "mean", sink, fused[0], *fused[1]), sink[0]
    layout, inputs = _flatten(layers)
    return _KL.apply(eps, None, reduction, sink, layout, *inputs), sink[0]


def _layer_values(raw: Tensor, sizes: Sequence[int], reduction: str) -> list[float]:
    # Per-layer values of layer_kls from _kl_total's raw: 0.5 * (sum or mean of raw - 1) per layer.
    return [0.5 * ((part.sum() if reduction == "sum" else part.mean()).item() - (len(part) if reduction == "sum" else 1))
            for part in raw.double().split(list(sizes))]


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
    check_number(eps, "eps", positive=True, why="it keeps log(var + eps) finite for constant channels")
    dims = None if dim is None else _reduced_dims(z, dim)
    out = _KL.apply(float(eps), dims, reduction, None, (None,), z)
    if reduction == "none":
        reduced = (0, *range(2, z.dim())) if dims is None else dims
        return out.view([size for d, size in enumerate(z.shape) if d not in reduced])
    return out.view(())
