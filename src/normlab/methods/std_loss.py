"""Standardization loss (Collins, Ballé & Shlens 2019, arXiv 1903.00925).

An auxiliary loss that pushes every pre-activation channel toward N(0, 1) during training, in place
of batch norm, and vanishes at test time (the inference graph has no normalization at all):

    L = task_loss + weight * sum_layers sum_channels 0.5 * (mu_c**2 + var_c - log(var_c + eps) - 1)

with ``mu_c`` and the biased ``var_c`` taken over the batch (and spatial) dims of the channel.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from ..functional import layer_kls
from ._common import LAYERS, resolve_modules
from .registry import Handle, register, register_norm_type, swap_norms

__all__ = ["StandardizationLoss", "ChannelAffine"]


def default_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every ``Conv*d`` and ``Linear`` of ``model`` except the last ``Linear`` (the classifier head)."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, LAYERS)]
    linears = [i for i, (_, m) in enumerate(found) if isinstance(m, nn.Linear)]
    if linears:
        del found[linears[-1]]
    return found


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

    The hooks keep a reference to each tensor, and the moments are taken when the loss is asked
    for. If something overwrites a recorded tensor in place before that (``nn.ReLU(inplace=True)``
    right after a probed conv, ``out += identity``), its pre-activation values are gone: the call
    raises ``RuntimeError`` rather than return the statistics of the overwritten values. Pass
    ``copy=True`` to hand the rest of the model a copy of each probed output instead (one extra
    copy of each probed tensor per step).

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
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not (isinstance(weight, (int, float)) and weight >= 0 and weight == weight):
            raise ValueError(f"weight must be a finite number >= 0, got {weight!r}")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean' (per layer), got {reduction!r}")
        if record not in ("output", "input"):
            raise ValueError(f"record must be 'output' or 'input', got {record!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.weight = float(weight)
        self.eps = float(eps)
        self.reduction = reduction
        self.record = record
        self.copy = bool(copy)
        self.modules = self._resolve(model, modules)
        self._pending: list[tuple[str, Tensor, int]] = []
        self._last: tuple[tuple[str, ...], Tensor] = ((), torch.zeros(0))
        self._hooks = [m.register_forward_hook(self._hook(name)) for name, m in self.modules]

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

    def _hook(self, name: str):
        use_input = self.record == "input"

        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
            if module.training and torch.is_grad_enabled():
                z = args[0] if use_input else output
                self._pending.append((name, z, z._version))
                if self.copy:
                    return output.clone()
            return None

        return hook

    def __call__(self) -> Tensor:
        """``weight * sum`` of the KL terms recorded since the last call (a 0 tensor if none).

        The moments are taken here, all layers in one autograd node (see
        :func:`normlab.functional.layer_kls`); the hooks only keep a reference to each tensor.
        """
        pending, self._pending = self._pending, []
        if not pending:
            return torch.zeros(())
        for name, z, version in pending:
            if z._version != version:
                raise RuntimeError(
                    f"the {self.record} of module '{name}' was modified in place after the standardization "
                    "loss recorded it (e.g. by nn.ReLU(inplace=True) or `out += identity`), so its "
                    "pre-activation statistics are gone; make that operation out of place, or pass "
                    "copy=True (normlab.apply(model, 'std_loss', copy=True) / StandardizationLoss(..., copy=True))")
        per_layer = layer_kls([z for _, z, _ in pending], eps=self.eps, reduction=self.reduction)
        self._last = (tuple(name for name, _, _ in pending), per_layer.detach())
        total = per_layer.sum()
        return total * self.weight if self.weight != 1.0 else total

    def terms(self) -> dict[str, float]:
        """Per-module KL values (before ``weight``) of the last loss returned, for logging."""
        names, values = self._last
        out: dict[str, float] = {}
        for name, value in zip(names, values.tolist()):
            out[name] = out.get(name, 0.0) + value
        return out

    def remove(self) -> None:
        """Detach every hook: the model is left exactly as it was."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._pending = []

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
    """Identity at the place of a removed normalization layer; the standardization loss hooks it."""


@register("std_loss", "standardization loss (Collins et al. 2019): KL of each pre-activation channel to N(0,1), "
          "added to the task loss in training, nothing at test time", kind="norm")
def _apply(handle: Handle, weight: float = 1.0, eps: float = 1e-5, reduction: str = "sum",
           affine: bool = False, modules: Sequence[nn.Module | str] | None = None,
           copy: bool | None = None) -> None:
    """Replace each normalization layer by a probe (identity, or a per-channel affine with
    ``affine=True``) and add the loss on the probes' inputs; a model without normalization layers
    is probed at every Conv/Linear output but the head (or at ``modules``).

    ``copy`` (see :class:`StandardizationLoss`): by default on when ``affine`` is off and the model
    has a module with ``inplace=True`` (e.g. ``nn.ReLU(inplace=True)``, as in torchvision's
    ResNets), which would otherwise overwrite the pre-activations that batch norm used to copy."""
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
            loss = StandardizationLoss(model, weight, modules, eps, reduction, record="input", copy=copy)
        elif affine:
            raise ValueError("std_loss: affine=True puts a scale and shift where the normalization "
                             "layers were, but the model has none; build it with norm='bn' placeholders")
        else:
            loss = StandardizationLoss(model, weight, None, eps, reduction, copy=copy)
    else:
        loss = StandardizationLoss(model, weight, modules, eps, reduction, copy=copy)
    handle.losses.append(loss)
    handle.removers.append(loss.remove)
    handle.state["std_loss"] = loss
