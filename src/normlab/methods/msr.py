"""Mean shift rejection (Ruff, Beck & Bach 2019, arXiv 1911.13173).

Training without normalization and without minibatch statistics by keeping every conv kernel on
the channel-wise *zero-mean isocline*: each kernel slice ``W[o, i]`` has zero spatial mean, so a
spatially constant (common-mode) input shift cannot propagate through the layer.

* Init (:func:`msr_init`): ``W[o, i] <- W[o, i] - mean_s(W[o, i])``, then ``W[o] <- W[o] / ||W[o]||``
  (zero-mean slices, unit L2 magnitude per output filter).
* Every step (:class:`MeanShiftRejection`), one of

  - ``mode="project"`` (default, holds under *any* optimizer): ``g <- g - mean_s(g)`` before the
    step and ``W <- W - mean_s(W)`` after it. The weight projection is what keeps the constraint
    exact under optimizers that rescale per element (Adam, RMSProp) or add weight decay;
  - ``mode="amplify"``: the authors' gradient transform ``g <- g * (1 + m) - mean_s(g) * m``. It
    keeps the mean part of ``g`` and amplifies the zero-mean part by ``1 + m``, so the mean part
    is suppressed *relatively* (by ``1 / (1 + m)``), not removed: the weights drift off the
    isocline slowly, and faster under Adam;
  - ``mode="both"``: the authors' transform before the step and the projection after it.

* Optional noise injection (``noise > 0``), the authors' stand-in for batch norm's minibatch noise:
  ``g <- g + noise * rms_s(g) * (u - mean_s(u))`` with ``u ~ U(-1, 1)`` per element and ``rms_s``
  the root mean square of the raw gradient over the slice; the noise is re-centred, so it never
  moves a slice's gradient mean. It is added before the mode's transform.

``mean_s`` is the mean over the spatial dims of each slice ``W[o, i]``. A kernel without spatial
extent (1x1) has a single element per slice; as the authors do, the mean is then taken over the
input channels instead (``W[o, :]``). A slice that still has a single element (a depthwise 1x1
conv) cannot be zero-mean without vanishing and is left alone.

Which layers: every ``Conv1d/2d/3d`` (the authors constrain conv kernels). ``Linear`` layers are
left alone by default: they have no spatial extent, and forcing every row of a classifier head to
sum to zero would discard the mean of its input features. ``linear=True`` treats each ``Linear``
as a 1x1 conv (mean over input features) for all-MLP models. A weight under a
``torch.nn.utils.parametrize`` parametrization is constrained through its ``original`` tensor
(the one the optimizer updates); for the parametrizations of normlab (weight standardization,
bounded weight norm) a zero-mean original gives a zero-mean weight.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._common import CONVS as _CONVS
from ._common import LAYERS, check_number, resolve_modules
from .registry import Handle, register

__all__ = ["MeanShiftRejection", "msr_init", "slice_dims"]

MODES = ("project", "amplify", "both")


def slice_dims(weight: Tensor) -> tuple[int, ...] | None:
    """The dims of ``weight`` (shape ``(out, in, *kernel)``) over which a kernel slice's mean is taken.

    The spatial dims when the kernel has more than one element, else the input-channel dim (1x1
    kernels, ``Linear``), else ``None`` (a single element per output channel: no constraint).
    """
    if weight.dim() < 2:
        raise ValueError(f"weight must have shape (out, in, *kernel), got {tuple(weight.shape)}")
    spatial = tuple(range(2, weight.dim()))
    if weight[0, 0].numel() > 1:
        return spatial
    if weight.shape[1] > 1:
        return (1, *spatial)
    return None


def _weight(module: nn.Module) -> Tensor:
    # The tensor the optimizer updates: the parametrization's original if there is one.
    if parametrize.is_parametrized(module, "weight"):
        plist = module.parametrizations["weight"]
        if not hasattr(plist, "original"):
            raise ValueError(f"msr: the weight parametrization of {type(module).__name__} splits the weight "
                             "into several tensors (right_inverse returns a tuple); it cannot be constrained")
        return plist.original
    return module.weight


def _targets(model: nn.Module, linear: bool, modules: Sequence[nn.Module | str] | None) -> list[tuple[str, nn.Module]]:
    kinds = _CONVS + ((nn.Linear,) if linear else ())
    if modules is None:
        out = [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]
    else:
        out = resolve_modules(model, modules, "modules")
        for _, m in out:
            if not isinstance(m, LAYERS):
                raise ValueError(f"modules: every entry must be a Conv*d or Linear of the model, got {type(m).__name__}")
    # A weight tied between layers is constrained once (amplifying it twice would square the gain).
    unique: dict[int, tuple[str, nn.Module]] = {}
    for name, m in out:
        unique.setdefault(id(_weight(m)), (name, m))
    return list(unique.values())


@torch.no_grad()
def msr_init(model: nn.Module, *, linear: bool = False,
             modules: Sequence[nn.Module | str] | None = None) -> list[str]:
    """Zero-mean, unit-magnitude init of every conv kernel (Ruff, Beck & Bach 2019, arXiv 1911.13173).

    ``W[o, i] <- W[o, i] - mean_s(W[o, i])`` (mean over the slice dims of :func:`slice_dims`), then
    ``W[o] <- W[o] / ||W[o]||_2``. Works in place on the current weights (their random directions
    are kept) and returns the names of the initialized modules. ``linear`` and ``modules`` select
    layers as in :class:`MeanShiftRejection`; kernels with a single element per output channel
    (depthwise 1x1) are skipped.
    """
    done = []
    for name, module in _targets(model, linear, modules):
        w = _weight(module)
        dims = slice_dims(w)
        if dims is None:  # one element per output channel (depthwise 1x1): left alone
            continue
        w.sub_(w.mean(dims, keepdim=True))
        norm = w.flatten(1).norm(dim=1).clamp_min(1e-12)
        w.div_(norm.view(-1, *([1] * (w.dim() - 1))))
        done.append(name)
    return done


class MeanShiftRejection:
    """Keeps conv kernels zero-mean during training (Ruff, Beck & Bach 2019, arXiv 1911.13173).

    Call :meth:`before_step` between ``backward()`` and ``optimizer.step()`` and :meth:`after_step`
    right after it (or :meth:`attach` the object to the optimizer once). See the module docstring
    for the formulas of each ``mode`` and of ``noise``.

    Args:
        model: the model; its weights are not changed here (see :func:`msr_init`).
        mode: ``"project"`` (exact under any optimizer), ``"amplify"`` (the authors' gradient
            transform ``g * (1 + m) - mean(g) * m``) or ``"both"``.
        m: the amplification of ``"amplify"``/``"both"`` (the authors use about 10).
        noise: scale of the injected gradient noise relative to each slice's RMS gradient (0: off).
        linear: also constrain ``Linear`` weights (mean over input features).
        modules: the Conv/Linear modules (or qualified names) to constrain; default every conv.

    Example::

        msr_init(model)
        msr = MeanShiftRejection(model)
        loss.backward(); msr.before_step(); opt.step(); msr.after_step()
    """

    def __init__(self, model: nn.Module, mode: str = "project", m: float = 10.0, noise: float = 0.0,
                 linear: bool = False, modules: Sequence[nn.Module | str] | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.m = check_number(m, "m", positive=False, why="the gradient amplification")
        self.noise = check_number(noise, "noise", positive=False, why="0 turns it off")
        self.modules = _targets(model, linear, modules)
        if not self.modules:
            kinds = "Conv*d or Linear (linear=True)" if linear else "Conv*d (or pass linear=True for an MLP)"
            raise ValueError(f"msr: the model has no {kinds} layer to constrain")
        self._hooks: list = []

    def _slices(self):
        for _, module in self.modules:
            w = _weight(module)
            dims = slice_dims(w)
            if dims is not None:
                yield w, dims

    @torch.no_grad()
    def before_step(self) -> None:
        """Transform the gradients: noise (if any), then centre (``project``) or amplify."""
        for w, dims in self._slices():
            g = w.grad
            if g is None:
                continue
            if self.noise > 0:
                rms = g.square().mean(dims, keepdim=True).sqrt()
                u = torch.rand_like(g).mul_(2).sub_(1)
                g.add_((u - u.mean(dims, keepdim=True)).mul_(rms * self.noise))
            mean = g.mean(dims, keepdim=True)
            if self.mode == "project":
                g.sub_(mean)
            else:
                g.mul_(1 + self.m).sub_(mean * self.m)

    @torch.no_grad()
    def after_step(self) -> None:
        """Project the weights back onto the zero-mean isocline (modes ``project`` and ``both``)."""
        if self.mode != "amplify":
            self.project()

    @torch.no_grad()
    def project(self) -> None:
        """``W <- W - mean_s(W)`` for every constrained kernel slice."""
        for w, dims in self._slices():
            w.sub_(w.mean(dims, keepdim=True))

    def attach(self, optimizer: torch.optim.Optimizer) -> MeanShiftRejection:
        """Run :meth:`before_step`/:meth:`after_step` as ``optimizer``'s step pre/post hooks.

        Then ``optimizer.step()`` alone is enough; do not also call the two methods by hand.
        :meth:`remove` detaches the hooks.
        """
        self._hooks.append(optimizer.register_step_pre_hook(lambda *_: self.before_step()))
        self._hooks.append(optimizer.register_step_post_hook(lambda *_: self.after_step()))
        return self

    def remove(self) -> None:
        """Detach the optimizer hooks added by :meth:`attach` (if any)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def max_abs_mean(self) -> float:
        """The largest ``|mean_s(W)|`` over all constrained slices (0 on the isocline), for checks."""
        with torch.no_grad():
            return max((float(w.mean(dims).abs().max()) for w, dims in self._slices()), default=0.0)

    def __repr__(self) -> str:
        return f"MeanShiftRejection(mode={self.mode!r}, m={self.m}, noise={self.noise}, modules={len(self.modules)})"


@register("msr", "mean shift rejection (Ruff et al. 2019): zero-mean unit-magnitude conv kernels, kept "
          "zero-mean every step (weight projection by default), optional gradient noise", kind="step",
          writes_weights=True)
def _apply(handle: Handle, mode: str = "project", m: float = 10.0, noise: float = 0.0, init: bool = True,
           linear: bool = False) -> None:
    """Zero-mean init (``init=True``) and the per-step constraint as the handle's step hooks."""
    msr = MeanShiftRejection(handle.model, mode, m, noise, linear)
    if init:
        msr_init(handle.model, linear=linear)
    handle.pre_step.append(msr.before_step)
    handle.post_step.append(msr.after_step)
    handle.state["msr"] = msr
