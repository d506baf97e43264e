"""Standardization loss (Collins, Ballé & Shlens 2019, arXiv 1903.00925).

An auxiliary loss that pushes every pre-activation channel toward N(0, 1) during training, in place
of batch norm, and vanishes at test time (the inference graph has no normalization at all):

    L = task_loss + weight * sum_layers sum_channels 0.5 * (mu_c**2 + var_c - log(var_c + eps) - 1)

with ``mu_c`` and the biased ``var_c`` taken over the batch (and spatial) dims of the channel.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .. import functional as _functional
from ..functional import PatchMoments, _kl_total, _layer_values, _shifted_patches, patch_moments
from ._common import CONVS, LAYERS, check_number, resolve_modules
from .registry import Handle, register, register_norm_type, swap_norms

__all__ = ["StandardizationLoss", "ChannelAffine"]


def default_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every ``Conv*d`` and ``Linear`` of ``model`` except the last ``Linear`` (the classifier head),
    in registration order (``model.named_modules()``): a head registered before the body is not
    found; pass ``modules`` for such a model."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, LAYERS)]
    linears = [i for i, (_, m) in enumerate(found) if isinstance(m, nn.Linear)]
    if linears:
        del found[linears[-1]]
    return found


def _patch_conv(module: nn.Module, patch: bool | None) -> bool:
    """Whether the standardization loss may take ``module``'s output moments from its input patches
    (:func:`normlab.functional.patch_moments`): a plain zero-padded, one-group ``Conv*d`` with a
    parameter weight; with ``patch=None`` only where the patches are short (``K <= 2 * C_out``,
    ``K = C_in * prod(kernel_size)``), so that their K x K covariance costs less than the output's
    statistics and gradient."""
    if patch is False or type(module) not in CONVS or module.groups != 1 or module.padding_mode != "zeros":
        return False
    if isinstance(module.padding, str) and module.padding != "valid":
        return False
    if parametrize.is_parametrized(module) or not isinstance(module.weight, nn.Parameter):
        return False
    return patch is True or module.in_channels * math.prod(module.kernel_size) <= 2 * module.out_channels


def _takes_patches(weight: Tensor, x: object) -> bool:
    # Whether the moments of a patch conv with this weight can come from its input x: x is data (needs
    # no gradient), a batch of at least one, and the conv runs in x's own float32/64 precision (not
    # under autocast).
    return isinstance(x, Tensor) and not x.requires_grad and x.dtype == weight.dtype \
        and x.dtype in (torch.float32, torch.float64) and x.dim() == weight.dim() and x.shape[0] > 0 \
        and not torch.is_autocast_enabled(x.device.type)


# torch's global module hooks (nn.modules.module.register_module_forward_*_hook), which run on every
# module and may change a first conv's input or output.
_global_hooks = tuple(getattr(torch.nn.modules.module, n, {}) for n in (
    "_global_forward_pre_hooks", "_global_forward_hooks", "_global_forward_hooks_always_called"))


def _geometry(module: nn.Module, weight: Tensor) -> tuple[tuple[int, ...], ...]:
    # (kernel, stride, padding, dilation) of a conv with this weight, with padding="valid" as zeros.
    kernel = tuple(weight.shape[2:])
    padding = (0,) * len(kernel) if isinstance(module.padding, str) else tuple(module.padding)
    return kernel, tuple(module.stride), padding, tuple(module.dilation)


_TABLE_BYTES = 256 << 20  # the largest per-example table kept (the MNIST CNN's: 60000 x 90 doubles, 43 MB)
_MAX_BUILDS = 2  # tables one StandardizationLoss may build before batch() stops using them
# (id(data), geometry) -> (weakref to data, data's version, (table, c, P) or None if over the size cap)
_tables: dict[tuple, tuple[weakref.ref, int, tuple[Tensor, Tensor, int] | None]] = {}


def _build_table(data: Tensor, geometry: tuple[tuple[int, ...], ...]) -> tuple[Tensor, Tensor, int] | None:
    # Per-example patch moments of a conv over the whole of `data`, kept in _tables while `data`
    # lives, around c, the mean patch of the whole of `data`: rows (N, K + K*K) float64 of
    # mean_i - c and Q_i = sum_p (x_ip - c)(x_ip - c)^T over example i's P patches; c; and P.
    # Q_i = M2_i + P (mean_i - c)(mean_i - c)^T with the centred M2_i = sum_p (x_ip - mean_i)(...)^T,
    # both from the residuals r_ip = x_ip - a_i around the data-precision mean a_i (no cancellation):
    # mean_i = a_i + sum_p r_ip / P in float64, M2_i = sum_p r_ip r_ip^T - (sum_p r_ip)(sum_p r_ip)^T / P.
    # None over _TABLE_BYTES.
    k = data.shape[1] * math.prod(geometry[0])
    found = None
    if len(data) and len(data) * (k + k * k) * 8 <= _TABLE_BYTES:
        table = torch.empty(len(data), k + k * k, dtype=torch.float64, device=data.device)
        zero = torch.zeros(data.shape[1], dtype=data.dtype, device=data.device)
        step = max(1, (1 << 21) // max(1, data[0].numel()))
        with torch.no_grad():
            for start in range(0, len(data), step):
                patches, positions = _shifted_patches(data[start:start + step].detach(), *geometry, zero)
                approx = patches.mean(2, keepdim=True)  # (K, n, 1)
                r = (patches - approx).transpose(0, 1)  # (n, K, P)
                rsum = r.sum(2)
                table[start:start + step, :k] = approx.squeeze(2).T + rsum.double() / positions
                table[start:start + step, k:] = torch.baddbmm(torch.bmm(r, r.transpose(1, 2)), rsum.unsqueeze(2),
                                                              rsum.unsqueeze(1), alpha=-1 / positions).flatten(1)
            center = table[:, :k].mean(0)
            for start in range(0, len(data), step):
                d = table[start:start + step, :k].sub_(center)
                table[start:start + step, k:].view(-1, k, k).baddbmm_(d.unsqueeze(2), d.unsqueeze(1), alpha=positions)
        found = (table, center, positions)
    key = (id(data), geometry)
    _tables[key] = (weakref.ref(data, lambda _, key=key: _tables.pop(key, None)), data._version, found)
    return found


# -1 outside a backward pass (a private torch function, present since 2.0; without it, assume outside)
_graph_task_id = getattr(torch._C, "_current_graph_task_id", lambda: -1)


def _recording() -> bool:
    # Gradients on, and not inside a backward pass: activation checkpointing runs a segment's forward
    # again during backward, and those outputs must not be recorded as the next step's.
    return torch.is_grad_enabled() and _graph_task_id() == -1


def _row_numbers(index: object, data: Tensor) -> Tensor:
    # index as a 1-D int64 tensor on data's device of row numbers in [0, n) of data's n rows (numbers
    # in [-n, 0) count from the end), or a clear error.
    index, n = torch.as_tensor(index, device=data.device), len(data)
    if index.dim() != 1 or index.is_floating_point() or index.is_complex() or index.dtype in (torch.bool, torch.uint8):
        raise ValueError(f"index must be a 1-D tensor of integer row numbers, got {index.dtype} of shape "
                         f"{tuple(index.shape)} (bool and uint8 index a tensor as masks); for a mask pass "
                         "mask.nonzero().squeeze(1)")
    index = index.long()  # unsigned numpy indices have no min/max in torch
    lo, hi = (int(v) for v in torch.aminmax(index)) if len(index) else (0, -1)
    if not (-n <= lo and hi < n):
        raise IndexError(f"index has row numbers outside [-{n}, {n}) for data of {n} rows")
    return index.remainder(n) if lo < 0 else index


class StandardizationLoss:
    """Records pre-activation statistics of a model and returns the standardization loss.

    Computes ``weight * sum over modules of standardization_kl(z_module)``, where ``z_module`` is
    the output of each chosen module (or its input, with ``record="input"``) in the last forward
    pass; see :func:`normlab.functional.standardization_kl` for the per-channel KL
    ``0.5 * (mu**2 + var - log(var + eps) - 1)`` (Collins et al. 2019, arXiv 1903.00925).

    It attaches forward hooks to an unmodified model. Statistics are recorded only for modules in
    training mode with gradients enabled: in eval mode or under ``torch.no_grad()`` nothing is
    recorded and nothing is computed. Calling the object returns the loss of everything recorded
    since the previous call and starts afresh, so a step never adds a stale term twice.

    A ``Linear`` on (N, ..., F) input (a sequence) counts its last dim as the channels, with
    statistics over every other dim. Under activation checkpointing, the recomputation of a segment
    during backward is not recorded (with ``use_reentrant=True`` the first forward runs without
    gradients, so a checkpointed segment then gets no loss at all: use ``use_reentrant=False``). If a
    forward pass fails half-way and the batch is skipped, call :meth:`clear`, or the next call adds
    the layers it recorded.

    The hooks keep a reference to each tensor, and the moments are taken when the loss is asked
    for. If something overwrites a recorded tensor in place before that (``nn.ReLU(inplace=True)``
    right after a probed conv, ``out += identity``), its pre-activation values are gone: the call
    raises ``RuntimeError`` rather than return the statistics of the overwritten values. Pass
    ``copy=True`` to hand the rest of the model a copy of each probed output instead (one extra
    copy of each probed tensor per step).

    A first convolution (its input is data and needs no gradient) whose patches are short
    (``C_in * prod(kernel_size) <= 2 * C_out``) is not recorded at all: its output's moments follow
    exactly from the mean and covariance of its input patches (see
    :func:`normlab.functional.patch_moments`), and the loss's gradient goes straight to its weight
    and bias. On the paper's MNIST CNN this skips every pass over the largest activation, the
    first layer's (N, 32, 14, 14) output. ``patch_moments=True`` forces this for any plain
    (zero-padded, one-group) first conv, ``False`` turns it off. A
    minibatch taken through :meth:`batch` (as :func:`normlab.engine.train` does) makes it cheaper
    still: its patch moments are summed from a per-example table of the dataset.

    Args:
        model: any ``nn.Module``; it is not modified.
        weight: multiplier of the summed KL terms (the paper: 1.0 on MNIST, 1e-6 on ResNet-50).
        modules: modules or qualified names to probe; default every ``Conv*d`` and ``Linear``
            except the last ``Linear`` (the classifier head).
        eps: added to the variance inside the log.
        reduction: per layer, ``"sum"`` (default) or ``"mean"`` over channels.
        record: ``"output"`` (default) or ``"input"`` of each module.
        copy: replace each probed module's output by a copy in training mode, so that in-place
            operations after it cannot touch the recorded tensor.
        patch_moments: for a convolution whose input needs no gradient, take its moments from the
            input patches: None (default) where the patches are short (``C_in * prod(kernel_size)
            <= 2 * C_out``), True wherever possible (zero padding, one group), False never. The
            loss and its gradients are the same either way, up to float rounding.

    Example::

        with StandardizationLoss(model, weight=1.0) as std:
            loss = F.cross_entropy(model(x), y) + std()
            loss.backward()
    """

    def __init__(
        self,
        model: nn.Module,
        weight: float = 1.0,
        modules: Sequence[nn.Module | str] | None = None,
        eps: float = 1e-5,
        reduction: str = "sum",
        record: str = "output",
        copy: bool = False,
        patch_moments: bool | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.weight = check_number(weight, "weight", positive=False)
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean' (per layer), got {reduction!r}")
        if record not in ("output", "input"):
            raise ValueError(f"record must be 'output' or 'input', got {record!r}")
        self.eps = check_number(eps, "eps", positive=True)
        self.reduction = reduction
        self.record = record
        self.copy = bool(copy)
        if patch_moments not in (None, True, False):
            raise ValueError(f"patch_moments must be None, True or False, got {patch_moments!r}")
        self.patch_moments = patch_moments
        self.modules = self._resolve(model, modules)
        self._pending: list[tuple[str, Tensor | PatchMoments, int]] = []
        self._early: dict[int, PatchMoments] = {}  # first convs' patch moments, by id(module)
        self._produced: dict[int, tuple[PatchMoments, Tensor]] = {}  # the same, by id(output)
        self._last: tuple[tuple[str, ...], tuple[int, ...], Tensor] = ((), (), torch.zeros(0))  # see terms()
        # see batch(): (x, x._version, data, data._version, index, index._version)
        self._rows: tuple[Tensor, int, Tensor, int, Tensor, int] | None = None
        self._builds = 0  # per-example tables this loss has built (see batch())
        # A probe's tensor may be the output of a first conv (its own output with record="output",
        # any conv's with record="input"). The patch moments are taken in a pre-hook, before the
        # conv runs: its input is still in cache then, and the conv's output has not yet pushed it
        # out (in place of a forward hook: ~1.0 -> ~0.6 ms per step on the MNIST CNN). The
        # conv's forward hook, which runs before the probes' hooks, files them under its output.
        firsts = [m for _, m in self.modules] if record == "output" else list(model.modules())
        self._hooks = []
        for m in firsts:
            if _patch_conv(m, patch_moments):
                self._hooks += [m.register_forward_pre_hook(self._take), m.register_forward_hook(self._produce)]
        # A probe that stands where a normalization layer was reports its input itself: a module with
        # hooks takes torch's slower call path.
        self._reporting: list[_Probe] = []
        for name, m in self.modules:
            if type(m) is _Probe and record == "input" and m.report is None:
                m.report = self._hook(name, m)
                self._reporting.append(m)
            else:
                self._hooks.append(m.register_forward_hook(self._hook(name, m)))
        # The hooks act on these modules only: a copy.deepcopy of the model copies the hooks too, and
        # a copy's forward must not report into this loss. A first conv with hooks of others (which
        # may change its input or output) records its output instead of taking patch moments.
        self._ids = {id(m) for m in firsts}
        self._own = {h.id for h in self._hooks}

    @staticmethod
    def _resolve(model: nn.Module, modules: Iterable[nn.Module | str] | None) -> list[tuple[str, nn.Module]]:
        if modules is None:
            found = default_modules(model)
            if not found:
                raise ValueError("model has no Conv*d or Linear layer besides the classifier head to "
                                 "probe; pass modules=[...] explicitly")
            return found
        out = [(name or "<root>", m) for name, m in resolve_modules(model, modules, "modules")]
        if not out:
            raise ValueError("modules is empty: nothing to probe")
        return out

    def _take(self, module: nn.Module, args: tuple) -> None:
        if module.training and args and id(module) in self._ids and _recording() and self._alone(module):
            weight, x = module.weight, args[0]
            if _takes_patches(weight, x):
                geometry, bias = _geometry(module, weight), module.bias
                moments = self._from_table(weight, bias, x, geometry)
                if moments is None:
                    moments = patch_moments(x, weight, bias, *geometry[1:])
                self._early[id(module)] = moments

    def _from_table(self, weight: Tensor, bias: Tensor | None, x: Tensor,
                    geometry: tuple[tuple[int, ...], ...]) -> PatchMoments | None:
        # The batch's patch moments from the per-example table, when x is batch()'s result, unchanged
        # (and the data and index it came from too): with the sums over the batch B of the table's rows,
        # D = sum_i (mean_i - c) and Q = sum_i Q_i: m = c + D / |B| and S = Q / (|B| P) - D D^T / |B|^2
        # (D / |B| is small: c is the mean of the whole data).
        rows = self._rows
        if rows is None or x is not rows[0] or x._version != rows[1] or rows[2]._version != rows[3] \
                or rows[4]._version != rows[5]:
            return None
        data, index = rows[2], rows[4]
        hit = _tables.get((id(data), geometry))
        if hit is not None and hit[0]() is data and hit[1] == data._version:
            found = hit[2]
        elif self._builds < _MAX_BUILDS:
            self._builds += 1
            found = _build_table(data, geometry)
        else:
            self._builds = max(self._builds, _MAX_BUILDS + 1)  # refused: batch() warns, once
            return None
        n = index.shape[0]
        if found is None or n * found[2] < 2:
            return None
        table, center, positions = found
        k = center.shape[0]
        fused = _functional._fused
        if fused is not None and table.is_cpu:  # the same sums in one C loop
            mean, cov = torch.empty(k, dtype=torch.float64), torch.empty(k, k, dtype=torch.float64)
            index = index if index.is_contiguous() else index.contiguous()
            if fused.nl_table_moments(table.data_ptr(), table.shape[0], index.data_ptr(), n, k, center.data_ptr(),
                                       float(positions), mean.data_ptr(), cov.data_ptr()):
                raise IndexError(f"index has row numbers outside [0, {table.shape[0]})")
            return PatchMoments(weight, bias, mean, cov, n * positions)
        dev, scatter = table.index_select(0, index).sum(0).split_with_sizes((k, k * k))
        cov = torch.addr(scatter.view(k, k), dev, dev, beta=1 / (n * positions), alpha=-1 / (n * n))
        return PatchMoments(weight, bias, torch.add(center, dev, alpha=1 / n), cov, n * positions)

    def _alone(self, module: nn.Module) -> bool:
        # No hook but this loss's on the module, and no global module hook.
        return self._own.issuperset(module._forward_pre_hooks) and self._own.issuperset(module._forward_hooks) \
            and not any(_global_hooks)

    def _produce(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        moments = self._early.pop(id(module), None) if self._early else None
        if moments is not None:
            self._produced[id(output)] = (moments, output)

    def _hook(self, name: str, target: nn.Module):
        use_input = self.record == "input"
        target_id = id(target)

        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
            if module.training and _recording() and id(module) == target_id:
                if use_input and not args:
                    raise TypeError(f"record='input': module '{name}' was called with keyword arguments only; "
                                    "call it with its input as the first positional argument, or record='output'")
                z = args[0] if use_input else output
                if not isinstance(z, Tensor):
                    raise TypeError(f"the standardization loss records a tensor per probed module, but module "
                                    f"'{name}' {'got' if use_input else 'returned'} a {type(z).__name__}; leave "
                                    "it out of modules=[...] (probe the layers inside it instead)")
                moments, out = self._produced.pop(id(z), (None, None)) if self._produced else (None, None)
                if out is not z:
                    moments = None
                if moments is not None:
                    self._pending.append((name, moments, moments.weight._version))
                    return None
                if isinstance(module, CONVS) and z.dim() == module.weight.dim() - 1:
                    raise ValueError(f"the standardization loss needs batched input: module '{name}' got an "
                                     f"unbatched {tuple(z.shape)} tensor; add a batch dim (x.unsqueeze(0) for one sample "
                                     "is a batch of one, whose variance over positions is used)")
                # A Linear acts on the last dim: on (N, ..., F) its features are the channels, and the
                # statistics run over every other dim (a sequence's N and T); a view shares z's version.
                zc = z.flatten(0, -2) if isinstance(module, nn.Linear) and z.dim() > 2 else z
                self._pending.append((name, zc, zc._version))
                if self.copy:
                    return output.clone()
            return None

        return hook

    def clear(self) -> None:
        """Discard what was recorded since the last call, e.g. after a forward pass that raised
        (a batch skipped after an out-of-memory error): otherwise the next call adds it in."""
        self._pending = []
        self._rows = None
        self._early.clear()
        self._produced.clear()

    def batch(self, data: Tensor, index: Tensor | Sequence[int]) -> Tensor:
        """``data[index]`` (rows ``index`` of ``data``; negative numbers count from the end), the
        input of the next forward pass, e.g.
        ``loss = F.cross_entropy(model(std.batch(train_x, idx)), train_y[idx]) + std()``.

        The values are those of ``data[index]``; what differs is the cost of the loss. When this very
        tensor reaches a first convolution that takes its moments from its input patches (see
        ``patch_moments`` above) unchanged, those moments are summed from per-example ones of
        ``data``: with ``c`` the mean patch of all of ``data`` and, over the ``P`` patches ``x_ip``
        of example ``i``, ``D_i = sum_p x_ip / P - c`` and ``Q_i = sum_p (x_ip - c)(x_ip - c)^T``,
        the batch ``B`` has ``d = sum_i D_i / |B|``, mean ``m = c + d`` and covariance
        ``S = sum_i Q_i / (|B| P) - d d^T``, all in float64 (``Q_i`` from the centred per-example
        scatter, ``Q_i = M2_i + P D_i D_i^T``; the subtraction costs about ``1e-16 * |d|**2``, and
        ``d`` is small, ``c`` being the data's own mean). That is a gather and sum of ``K + K**2``
        numbers per example (``K``: patch length; 90 on the paper's MNIST CNN) instead of a pass
        over the batch's patches.

        The table is built in one pass over ``data`` the first time (about 0.9 s and 43 MB for
        MNIST's 60000 images) and kept, for every ``StandardizationLoss``, as long as ``data`` lives with
        the same version; none is kept above 256 MiB. So pass the same dataset tensor every step:
        after building tables for two different or changed ``data`` tensors, a loss warns and builds
        no more. Anything else takes the usual path: another tensor (``batch``'s result converted,
        e.g. ``.to(device)``, or ``.contiguous(memory_format=torch.channels_last)`` on multi-channel
        data: convert ``data`` once instead), this one (or ``index``) changed in place before the
        forward pass, and everything after the next call of the loss. Changes to ``data`` that bypass
        torch's version counter (writes through a numpy array that shares its memory) are not seen.
        """
        if not isinstance(data, Tensor):
            raise TypeError(f"data must be a tensor of examples (N, ...), got {type(data).__name__}")
        if data.dim() < 2:
            raise ValueError(f"data must be a tensor of examples (N, ...) with at least 2 dims, got shape "
                             f"{tuple(data.shape)}")
        # An int64 index of CPU data goes straight to index_select, which checks the bounds itself;
        # another index type, or a CUDA gather (which does not raise on a bad index), is checked first.
        if not (data.device.type == "cpu" and isinstance(index, Tensor) and index.dtype == torch.int64
                and index.dim() == 1 and index.device.type == "cpu"):
            index = _row_numbers(index, data)
        try:
            x = data.index_select(0, index)
        except IndexError:  # out of range, or negative: say which, or count from the end
            index = _row_numbers(index, data)
            x = data.index_select(0, index)
        if self._builds == _MAX_BUILDS + 1:
            self._builds += 1
            warnings.warn(
                f"StandardizationLoss.batch built {_MAX_BUILDS} per-example tables, one for each new or changed "
                "data tensor (a slice, a copy, data changed in place): it builds no more and takes each batch's "
                "own patches. Pass the same unchanged dataset tensor to batch() every step (slice the index, "
                "not the data), or index the data yourself", stacklevel=2)
        self._rows = (x, x._version, data, data._version, index, index._version)
        return x

    def __call__(self) -> Tensor:
        """``weight * sum`` of the KL terms recorded since the last call (a 0 tensor if none).

        The moments are taken here, all layers in one autograd node (as
        :func:`normlab.functional.layer_kls` does, summed over the layers); the hooks only keep a
        reference to each tensor (or the patch moments of a first convolution).
        """
        pending = self._pending
        self.clear()
        if not pending:
            self._last = ((), (), torch.zeros(0))
            return torch.zeros(())
        names, sizes, layers = [], [], []
        for name, z, version in pending:
            if isinstance(z, PatchMoments):
                if z.weight._version != version:
                    raise RuntimeError(
                        f"the weight of module '{name}' was modified in place (an optimizer step?) between the "
                        "forward pass and the standardization loss call; call the loss right after the forward")
                sizes.append(z.weight.shape[0])
            elif z.dim() < 2 or z.numel() <= z.shape[1]:  # at most one value per channel: no variance
                raise ValueError(f"module '{name}' gave {tuple(z.shape)}: at most one value per channel, whose "
                                 "variance is undefined; the standardization loss needs a batch of at least 2 samples")
            elif z._version != version:
                raise RuntimeError(
                    f"the {self.record} of module '{name}' was modified in place after the standardization "
                    "loss recorded it (e.g. by nn.ReLU(inplace=True) or `out += identity`), so its "
                    "pre-activation statistics are gone; make that operation out of place, or pass "
                    "copy=True (normlab.apply(model, 'std_loss', copy=True) / StandardizationLoss(..., copy=True))")
            else:
                sizes.append(z.shape[1])
            names.append(name)
            layers.append(z)
        total, raw = _kl_total(layers, self.eps, self.reduction)
        self._last = (names, sizes, raw)
        return total * self.weight if self.weight != 1.0 else total

    def terms(self) -> dict[str, float]:
        """Per-module KL values (before ``weight``) of the last loss returned, for logging."""
        names, sizes, raw = self._last
        out: dict[str, float] = {}
        for name, value in zip(names, _layer_values(raw, sizes, self.reduction)):
            out[name] = out.get(name, 0.0) + value
        return out

    def remove(self) -> None:
        """Detach every hook: the model is left exactly as it was."""
        for h in self._hooks:
            h.remove()
        for m in self._reporting:
            m.report = None
        self._hooks, self._reporting = [], []
        self.clear()

    def __enter__(self) -> StandardizationLoss:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        names = ", ".join(n for n, _ in self.modules)
        return f"StandardizationLoss(weight={self.weight}, eps={self.eps}, reduction={self.reduction!r}, modules=[{names}])"


class ChannelAffine(nn.Module):
    """Per-channel scale and shift ``y = x * weight_c + bias_c`` (channel = dim 1).

    The optional learnable affine after a standardization-loss probe (Collins et al. 2019 used it
    for PointNet); it folds into the preceding conv/linear for inference.
    """

    def __init__(self, num_features: int, spatial_dims: int | None = 2, device=None, dtype=None) -> None:
        super().__init__()
        self.num_features = num_features
        self.spatial_dims = spatial_dims
        self.weight = nn.Parameter(torch.ones(num_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return torch.addcmul(self.bias.view(shape), x, self.weight.view(shape))

    def eval_affine(self) -> tuple[Tensor, Tensor]:
        """Folding protocol: ``(scale, shift) = (weight, bias)``."""
        return self.weight, self.bias

    def extra_repr(self) -> str:
        return f"{self.num_features}"


register_norm_type(ChannelAffine)


class _Probe(nn.Identity):
    """Identity at the place of a removed normalization layer, whose input the standardization loss
    records: ``report(self, (x,), x)``, called as a forward hook would be (its result, if not None,
    replaces the output), without the slower call path of a module with hooks."""

    def __init__(self) -> None:
        super().__init__()
        self.report: Callable[[nn.Module, tuple, Tensor], Tensor | None] | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.report is not None:
            out = self.report(self, (x,), x)
            if out is not None:
                return out
        return x


@register("std_loss", "standardization loss (Collins et al. 2019): KL of each pre-activation channel to N(0,1), "
          "added to the task loss in training, nothing at test time", kind="norm")
def _apply(handle: Handle, weight: float = 1.0, eps: float = 1e-5, reduction: str = "sum",
           affine: bool = False, modules: Sequence[nn.Module | str] | None = None,
           copy: bool | None = None, patch_moments: bool | None = None) -> None:
    """Replace each normalization layer by a probe (identity, or a per-channel affine with
    ``affine=True``) and add the loss on the probes' inputs; a model without normalization layers
    is probed at every Conv/Linear output but the head (or at ``modules``).

    ``copy`` (see :class:`StandardizationLoss`): by default on when ``affine`` is off and the model
    has a module with ``inplace=True`` (e.g. ``nn.ReLU(inplace=True)``, as in torchvision's
    ResNets), which would otherwise overwrite the pre-activations that batch norm used to copy.
    ``patch_moments``: see :class:`StandardizationLoss`."""
    model = handle.model
    if copy is None:
        copy = not affine and any(getattr(m, "inplace", False) is True for m in model.modules())
    if modules is None:
        def factory(nf: int, dims: int | None) -> nn.Module:
            return ChannelAffine(nf, dims) if affine else _Probe()

        swapped = swap_norms(model, factory)
        handle.swapped.extend(swapped)
        if swapped:
            modules = swapped
            loss = StandardizationLoss(model, weight, modules, eps, reduction, record="input", copy=copy,
                                       patch_moments=patch_moments)
        elif affine:
            raise ValueError("std_loss: affine=True puts a scale and shift where the normalization "
                             "layers were, but the model has none; build it with norm='bn' placeholders")
        else:
            loss = StandardizationLoss(model, weight, None, eps, reduction, copy=copy, patch_moments=patch_moments)
    else:
        loss = StandardizationLoss(model, weight, modules, eps, reduction, copy=copy, patch_moments=patch_moments)
    handle.losses.append(loss)
    handle.removers.append(loss.remove)
    handle.state["std_loss"] = loss
