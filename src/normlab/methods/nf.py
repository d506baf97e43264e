"""Normalizer-free networks: scaled weight standardization and adaptive gradient clipping (Brock, De
& Smith 2021, arXiv 2101.08692; Brock, De, Smith & Simonyan 2021, NFNets, arXiv 2102.06171).

* Scaled weight standardization (:class:`ScaledWeightStandardization`), per output filter ``o``
  with ``fan_in = in * prod(kernel)``::

      W_hat[o] = gain[o] * gamma * (W[o] - mean(W[o])) / sqrt(var(W[o]) * fan_in + eps)

  biased variance, ``eps`` inside the square root (default 1e-4, the value the authors clamp
  ``var * fan_in`` with; it is small against ``var * fan_in``, which is about 1/3 under PyTorch's
  default init and 1 under He init). ``gain`` is learnable, initialised to 1. ``gamma`` is the
  constant of the nonlinearity whose output the layer reads, ``1 / std(f(z))`` for
  ``z ~ N(0, 1)`` (ReLU: ``sqrt(2 / (1 - 1/pi))``), see :func:`nonlinearity_gamma`: a zero-mean
  filter with ``||W_hat[o]||^2 = gamma^2`` then maps unit-variance pre-activations to
  unit-variance pre-activations (signal propagation without normalization).
* Adaptive gradient clipping (:class:`AdaptiveGradientClipping`), per unit ``i`` (output row of a
  weight; a 0/1-d tensor such as a bias or a gain is one unit)::

      g_i <- g_i * clip * max(||W_i||, eps) / ||g_i||   if ||g_i|| / max(||W_i||, eps) > clip

  (``clip`` default 0.01, ``eps`` 1e-3), applied after ``backward()`` and before the optimizer
  step, to every parameter except those of the classifier head, which is chosen *by module* (the
  last ``Linear`` in definition order, or the modules the user names), never by parameter
  position.

The ``nf`` method makes a normalizer-free network of a model: every normalization layer becomes the
identity, every Conv*d and Linear but the head gets scaled WS, and AGC is added as a step hook
(``clip=0`` leaves it out). It is registered with kind ``"norm"`` because it replaces the
normalization layers, so it cannot be combined with another normalization method (``nf+bn`` is
rejected by the registry); ``nf+ws`` is rejected here (a weight cannot be standardized twice) and
``nf+agc`` too (AGC would be applied twice). The rest of the NFNet recipe (residual-branch scaling
``alpha``/``beta``, skip-init, dropout, the modified ResNet stem) is architecture, not a layer
transform, and is left to the model.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .registry import Handle, register, strip_norms
from ._common import CONVS as _CONVS
from ._common import check_number, remove_one_parametrization, resolve_modules
from .ws import _LOW, _centred, _check_weight, _leaves

__all__ = ["ScaledWeightStandardization", "scaled_weight_standardization",
           "remove_scaled_weight_standardization", "nonlinearity_gamma", "AdaptiveGradientClipping",
           "adaptive_clip_grad_", "unitwise_norm", "default_head"]

_NONLINEARITIES: dict[str, Callable[[Tensor], Tensor]] = {
    "identity": lambda z: z,
    "linear": lambda z: z,
    "relu": torch.relu,
    "gelu": torch.nn.functional.gelu,
    "silu": torch.nn.functional.silu,
    "swish": torch.nn.functional.silu,
    "elu": torch.nn.functional.elu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "softplus": torch.nn.functional.softplus,
    "leaky_relu": torch.nn.functional.leaky_relu,
}


def nonlinearity_gamma(nonlinearity: str | Callable[[Tensor], Tensor]) -> float:
    """``gamma = 1 / sqrt(Var[f(z)])`` for ``z ~ N(0, 1)``: the constant that restores unit variance
    after the nonlinearity ``f`` (Brock et al. 2021, arXiv 2101.08692, section 4.2).

    ``f`` is a name (``relu``, ``gelu``, ``silu``/``swish``, ``elu``, ``tanh``, ``sigmoid``,
    ``softplus``, ``leaky_relu``, ``identity``) or a callable on tensors. The variance is computed by
    numerical integration in float64 (ReLU: exactly ``sqrt(2 / (1 - 1/pi)) = 1.7129``).
    """
    if isinstance(nonlinearity, str):
        key = nonlinearity.lower()
        if key not in _NONLINEARITIES:
            raise ValueError(f"unknown nonlinearity {nonlinearity!r}; known: {sorted(_NONLINEARITIES)}, "
                             "or pass a callable or a number")
        return _gamma_of(key)
    if callable(nonlinearity):
        return _gamma_from(nonlinearity)
    raise TypeError(f"nonlinearity must be a name or a callable, got {type(nonlinearity).__name__}")


@functools.lru_cache(maxsize=None)
def _gamma_of(key: str) -> float:
    return _gamma_from(_NONLINEARITIES[key])


def _gamma_from(f: Callable[[Tensor], Tensor]) -> float:
    z = torch.linspace(-12.0, 12.0, 240001, dtype=torch.float64)
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    fz = f(z)
    mean = torch.trapezoid(fz * pdf, z)
    var = torch.trapezoid((fz - mean) ** 2 * pdf, z)
    if not var > 0:
        raise ValueError("the nonlinearity has zero variance on N(0, 1); gamma is undefined")
    return float(var.rsqrt())


def _gamma_value(gamma: float | str | Callable) -> float:
    if isinstance(gamma, (int, float)) and not isinstance(gamma, bool):
        if not (gamma > 0 and math.isfinite(gamma)):
            raise ValueError(f"gamma must be a finite number > 0 or a nonlinearity name, got {gamma!r}")
        return float(gamma)
    return nonlinearity_gamma(gamma)


class ScaledWeightStandardization(nn.Module):
    """Parametrization ``W -> gain[o] * gamma * (W[o] - mean(W[o])) / sqrt(var(W[o]) * fan_in + eps)``
    per output filter ``o`` (biased variance; Brock et al. 2021, arXiv 2101.08692 / 2102.06171).

    ``gain`` is a learnable parameter of shape ``(out,)`` initialised to 1 (it lives in this module,
    so ``model.parameters()`` includes it: build the optimizer after registering), ``gamma`` a fixed
    number (see :func:`nonlinearity_gamma`).
    """

    def __init__(self, out_features: int, gamma: float = 1.0, eps: float = 1e-4, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = check_number(eps, "eps", positive=True, why="added to var * fan_in")
        self.gamma = _gamma_value(gamma)
        self.gain = nn.Parameter(torch.ones(out_features, device=device, dtype=dtype))

    def forward(self, weight: Tensor) -> Tensor:
        d, var = _centred(weight)
        scale = torch.rsqrt(var * d.shape[1] + self.eps) * self.gain.to(d.dtype).unsqueeze(1)
        if self.gamma != 1.0:
            scale = scale * self.gamma
        return (d * scale).view(weight.shape).to(weight.dtype)

    def extra_repr(self) -> str:
        return f"{self.gain.numel()}, gamma={self.gamma:.6g}, eps={self.eps}"


def scaled_weight_standardization(module: nn.Module, gamma: float | str = 1.0, eps: float = 1e-4,
                                  name: str = "weight") -> nn.Module:
    """Put :class:`ScaledWeightStandardization` on ``module.<name>`` (a Conv*d or Linear weight);
    returns ``module``. ``W_hat[o] = gain[o] * gamma * (W[o] - mean) / sqrt(var * fan_in + eps)``
    (Brock et al. 2021, arXiv 2101.08692)."""
    w = _check_weight(module, name, "scaled_weight_standardization")
    p = ScaledWeightStandardization(w.shape[0], gamma, eps, device=w.device, dtype=w.dtype)
    parametrize.register_parametrization(module, name, p)
    return module


def remove_scaled_weight_standardization(module: nn.Module, bake: bool = True, name: str = "weight") -> nn.Module:
    """Take scaled WS off ``module.<name>``: ``bake=True`` keeps ``W_hat`` (gain included) as the
    plain weight, ``bake=False`` restores the raw weight (the gain is dropped)."""
    remove_one_parametrization(module, name, ScaledWeightStandardization, bake, "remove_scaled_weight_standardization")
    return module


# --- adaptive gradient clipping --------------------------------------------------------------------

def unitwise_norm(x: Tensor) -> Tensor:
    """L2 norm per unit: over every dim but the first for tensors of 2+ dims (one value per output
    row, kept as ``(out, 1, ...)``), over the whole tensor for 0/1-d tensors (biases, gains).
    Computed in float32 at least."""
    dtype = torch.float32 if x.dtype in _LOW else None
    if x.dim() <= 1:
        return torch.linalg.vector_norm(x, dtype=dtype)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.dim())), keepdim=True, dtype=dtype)


def adaptive_clip_grad_(parameters: Iterable[Tensor] | Tensor, clip: float = 0.01, eps: float = 1e-3) -> None:
    """Adaptive gradient clipping in place (Brock et al. 2021, NFNets, arXiv 2102.06171, section 4.1).

    Per unit ``i`` (see :func:`unitwise_norm`): ``g_i <- g_i * clip * max(||W_i||, eps) / ||g_i||``
    where ``||g_i|| / max(||W_i||, eps) > clip``; other units are left untouched. Parameters without
    a gradient are skipped. Choose the parameters yourself (leave out the classifier head), or use
    :class:`AdaptiveGradientClipping`, which does it by module.
    """
    check_number(clip, "clip", positive=True)
    check_number(eps, "eps", positive=False, why="the lower bound on the weight norm")
    _clip_grads([parameters] if isinstance(parameters, Tensor) else parameters, clip, eps)


@torch.no_grad()
def _clip_grads(parameters: Iterable[Tensor], clip: float, eps: float) -> None:
    # adaptive_clip_grad_ without the argument checks (AdaptiveGradientClipping checks them once).
    for p in parameters:
        g = p.grad
        if g is None:
            continue
        if g.is_sparse:
            raise ValueError("adaptive_clip_grad_: sparse gradients are not supported")
        max_norm = unitwise_norm(p).clamp_min(eps) * clip
        g_norm = unitwise_norm(g)
        factor = torch.where(g_norm > max_norm, max_norm / g_norm.clamp_min(1e-6), 1.0)
        g.mul_(factor.to(g.dtype))


def default_head(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The classifier head by default: the last ``nn.Linear`` of ``model`` in definition order
    (none if the model has no Linear)."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1:]


def _resolve_head(model: nn.Module, head: Sequence[nn.Module | str] | nn.Module | str | None,
                  what: str) -> list[tuple[str, nn.Module]]:
    if head is None:
        return default_head(model)
    return resolve_modules(model, head, what)


class AdaptiveGradientClipping:
    """Adaptive gradient clipping of every parameter of ``model`` except the head's (Brock et al.
    2021, NFNets, arXiv 2102.06171): ``g_i <- g_i * clip * max(||W_i||, eps) / ||g_i||`` per unit
    where ``||g_i|| / max(||W_i||, eps) > clip``.

    Args:
        model: the model; its parameters are collected now (create it after any parametrization).
        clip: the threshold ``lambda`` (NFNets: 0.01 at batch 4096, larger for smaller batches).
        eps: lower bound on the weight norm (lets zero-initialised parameters move).
        head: the modules whose parameters are *not* clipped, as modules or qualified names; default
            the last ``nn.Linear`` in definition order. ``head=[]`` clips everything.

    Call the object (or :meth:`clip_`) between ``backward()`` and ``optimizer.step()``.
    """

    def __init__(self, model: nn.Module, clip: float = 0.01, eps: float = 1e-3,
                 head: Sequence[nn.Module | str] | nn.Module | str | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.clip = check_number(clip, "clip", positive=True)
        self.eps = check_number(eps, "eps", positive=False, why="the lower bound on the weight norm")
        heads = _resolve_head(model, head, "agc: head")
        self.head = [n for n, _ in heads]
        skip = {id(p) for _, m in heads for p in m.parameters()}
        self.named_params = [(n, p) for n, p in model.named_parameters() if id(p) not in skip]
        self.params = [p for _, p in self.named_params]

    def clip_(self) -> None:
        """Clip the current gradients in place."""
        _clip_grads(self.params, self.clip, self.eps)

    __call__ = clip_

    def __repr__(self) -> str:
        return (f"AdaptiveGradientClipping(clip={self.clip}, eps={self.eps}, head={self.head}, "
                f"params={len(self.params)})")


# --- registered methods ----------------------------------------------------------------------------

@register("agc", "adaptive gradient clipping (Brock et al. 2021, NFNets): clip each unit's gradient to "
          "clip * max(||W||, eps), the classifier head excluded", kind="step")
def _apply_agc(handle: Handle, clip: float = 0.01, eps: float = 1e-3,
               head: Sequence[nn.Module | str] | nn.Module | str | None = None) -> None:
    """Add AGC as a ``pre_step`` hook (after ``backward()``, before ``optimizer.step()``)."""
    nf = handle.state.get("nf")
    if isinstance(nf, dict) and nf.get("agc") is not None:
        raise ValueError("agc: the nf method already applies adaptive gradient clipping; use 'nf' alone "
                         "(its clip/agc_eps/head options), or 'nf+agc' with nf's clip=0")
    agc = AdaptiveGradientClipping(handle.model, clip, eps, head)
    handle.pre_step.append(agc)
    handle.state["agc"] = agc


@register("nf", "normalizer-free (Brock et al. 2021): no normalization layers, scaled weight "
          "standardization with a learnable gain, adaptive gradient clipping", kind="norm")
def _apply_nf(handle: Handle, gamma: float | str = 1.0, eps: float = 1e-4, clip: float = 0.01,
              agc_eps: float = 1e-3, head: Sequence[nn.Module | str] | nn.Module | str | None = None,
              linear: bool = True, bake: bool = True) -> None:
    """Replace every normalization layer by the identity, put scaled WS on every Conv*d (and
    Linear, ``linear=True``) except the head, and add AGC (``clip=0`` leaves it out).

    ``gamma`` (a number or a nonlinearity name, see :func:`nonlinearity_gamma`) applies to every
    standardized layer but the first in definition order, whose input is the data rather than an
    activation. ``head`` (modules or names; default the last Linear) is neither standardized nor
    clipped. ``handle.remove()`` takes AGC off and bakes the weights (``bake=True``) or restores
    the raw ones; the identity layers stay. Build the optimizer after applying (the gains are new
    parameters).
    """
    model = handle.model
    # Every option is checked before the model is touched: a bad one leaves it as it was.
    check_number(clip, "nf: clip", positive=False, why="0 turns AGC off")
    check_number(eps, "nf: eps", positive=True, why="added to var * fan_in in the weight standardization")
    check_number(agc_eps, "nf: agc_eps", positive=False, why="AGC's lower bound on the weight norm")
    g = _gamma_value(gamma)
    heads = _resolve_head(model, head, "nf: head")
    head_ids = {id(sub) for _, m in heads for sub in m.modules()}
    kinds = _CONVS + ((nn.Linear,) if linear else ())
    targets = [(n, m) for n, m in _leaves(model) if isinstance(m, kinds) and id(m) not in head_ids]
    if not targets:
        hint = ("pass linear=True to standardize Linear layers too" if not linear else
                "head (default: the last Linear) names every such layer; pass head=[...] with the classifier only")
        raise ValueError("nf: found no Conv*d" + (" or Linear" if linear else "") + f" layer besides the head to standardize; {hint}")
    for name, m in targets:
        _check_weight(m, "weight", f"nf: {name}", leave_out="list it in head=[...]: head layers are neither standardized nor clipped")
    handle.swapped.extend(strip_norms(model))
    for i, (_, m) in enumerate(targets):
        scaled_weight_standardization(m, g if i > 0 else 1.0, eps)
    agc = AdaptiveGradientClipping(model, clip, agc_eps, [m for _, m in heads]) if clip > 0 else None
    if agc is not None:
        handle.pre_step.append(agc)
    handle.state["nf"] = {"standardized": [n for n, _ in targets], "head": [n for n, _ in heads], "agc": agc}

    def remove() -> None:
        for _, m in targets:
            if parametrize.is_parametrized(m, "weight") and any(
                    isinstance(p, ScaledWeightStandardization) for p in m.parametrizations["weight"]):
                remove_scaled_weight_standardization(m, bake=bake)

    handle.removers.append(remove)
