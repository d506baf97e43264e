"""Weight standardization (Qiao et al. 2019): formula, gradients, the ws method and its combinations."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import normlab
from normlab import models
from normlab.methods.groupnorm import GroupNorm2d
from normlab.methods.ws import (WeightStandardization, WSConv2d, followed_by_norm, remove_weight_standardization,
                                standardize, weight_standardization)


def ref_ws(w: torch.Tensor, eps: float) -> torch.Tensor:
    # One filter at a time: biased variance, eps inside the square root.
    out = torch.empty_like(w)
    for o in range(w.shape[0]):
        f = w[o].double()
        mu = f.sum() / f.numel()
        var = ((f - mu) ** 2).sum() / f.numel()
        out[o] = ((f - mu) / (var + eps).sqrt()).to(w.dtype)
    return out


@pytest.mark.parametrize("shape", [(6, 3, 3, 3), (5, 4, 7), (3, 2, 2, 3, 3), (7, 11)])
@pytest.mark.parametrize("eps", [1e-6, 1e-2])
def test_standardize_matches_reference(shape, eps):
    w = torch.randn(shape) * 0.05 + 0.01
    torch.testing.assert_close(standardize(w, eps), ref_ws(w, eps), rtol=1e-5, atol=1e-6)


def test_filters_have_zero_mean_and_unit_variance():
    w = torch.randn(16, 8, 3, 3) * 3 + 2
    s = standardize(w, 1e-6).flatten(1)
    torch.testing.assert_close(s.mean(1), torch.zeros(16), atol=1e-5, rtol=0)
    torch.testing.assert_close(s.var(1, unbiased=False), torch.ones(16), atol=1e-4, rtol=0)


@pytest.mark.parametrize("layer,x", [
    (lambda: nn.Conv1d(3, 5, 3), torch.randn(2, 3, 9)),
    (lambda: nn.Conv2d(3, 5, 3, padding=1), torch.randn(2, 3, 8, 8)),
    (lambda: nn.Conv3d(2, 4, 3), torch.randn(2, 2, 5, 5, 5)),
    (lambda: nn.Linear(6, 4), torch.randn(3, 6)),
])
def test_parametrized_layer_uses_standardized_weight(layer, x):
    m = layer()
    raw = m.weight.detach().clone()
    ref = copy.deepcopy(m)
    weight_standardization(m, eps=1e-5)
    assert parametrize.is_parametrized(m, "weight")
    torch.testing.assert_close(m.parametrizations.weight.original, raw)
    with torch.no_grad():
        ref.weight.copy_(ref_ws(raw, 1e-5))
    torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-5)


def test_scale_invariance_of_raw_weight():
    m = nn.Conv2d(4, 6, 3)
    weight_standardization(m)
    x = torch.randn(2, 4, 7, 7)
    y = m(x)
    with torch.no_grad():
        m.parametrizations.weight.original.mul_(7.0)
    torch.testing.assert_close(m(x), y, rtol=1e-4, atol=1e-5)


def test_gradcheck_float64():
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: standardize(t, 1e-3), (w,))
    assert torch.autograd.gradgradcheck(lambda t: standardize(t, 1e-3), (w,))
    m = nn.Conv2d(3, 4, 3).double()
    weight_standardization(m, eps=1e-3)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: F.conv2d(a, standardize(b, 1e-3), m.bias), (x, w))


def test_gradient_reaches_raw_weight_and_is_orthogonal_to_it():
    # Scale invariance => the gradient w.r.t. the raw weight is orthogonal to each filter (small eps).
    m = nn.Conv2d(3, 4, 3)
    weight_standardization(m, eps=1e-12)
    m(torch.randn(2, 3, 6, 6)).pow(2).sum().backward()
    w = m.parametrizations.weight.original
    assert w.grad is not None and w.grad.abs().sum() > 0
    dots = (w.grad * w).flatten(1).sum(1)
    assert dots.abs().max() < 1e-4 * w.grad.norm() * w.norm()
    sums = w.grad.flatten(1).sum(1)  # ... and sums to zero per filter (mean invariance)
    assert sums.abs().max() < 1e-4 * w.grad.norm()


def test_remove_bakes_or_restores():
    m = nn.Conv2d(3, 4, 3)
    raw = m.weight.detach().clone()
    weight_standardization(m)
    x = torch.randn(2, 3, 5, 5)
    y = m(x)
    remove_weight_standardization(m, bake=True)
    assert not parametrize.is_parametrized(m) and type(m) is nn.Conv2d
    torch.testing.assert_close(m(x), y)
    m2 = nn.Conv2d(3, 4, 3)
    with torch.no_grad():
        m2.weight.copy_(raw)
    weight_standardization(m2)
    remove_weight_standardization(m2, bake=False)
    torch.testing.assert_close(m2.weight, raw)


class _Double(nn.Module):
    def forward(self, w):
        return 2 * w


def test_remove_keeps_other_parametrizations():
    m = nn.Conv2d(3, 4, 3)
    weight_standardization(m)
    parametrize.register_parametrization(m, "weight", _Double())
    x = torch.randn(1, 3, 5, 5)
    y = m(x)
    remove_weight_standardization(m, bake=True)  # WS is first: baked into the original
    assert [type(p) for p in m.parametrizations.weight] == [_Double]
    torch.testing.assert_close(m(x), y)


def test_remove_on_a_deep_copy_leaves_the_original_intact():
    m = WSConv2d(3, 4, 3)
    c = copy.deepcopy(m)
    remove_weight_standardization(c)
    x = torch.randn(1, 3, 5, 5)
    torch.testing.assert_close(m(x), c(x))  # m still parametrized and working
    assert parametrize.is_parametrized(m, "weight")


def test_wsconv2d_and_state_dict_round_trip():
    a, b = WSConv2d(3, 8, 3, padding=1), WSConv2d(3, 8, 3, padding=1)
    assert isinstance(a, nn.Conv2d)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(a(x), b(x))
    torch.testing.assert_close(a.weight, ref_ws(a.parametrizations.weight.original.detach(), 1e-6))


def test_bfloat16_forward_backward_finite():
    m = WSConv2d(4, 8, 3).to(torch.bfloat16)
    x = torch.randn(2, 4, 6, 6, dtype=torch.bfloat16, requires_grad=True)
    y = m(x)
    y.float().pow(2).sum().backward()
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert torch.isfinite(x.grad).all() and torch.isfinite(m.parametrizations.weight.original.grad).all()
    ref = ref_ws(m.parametrizations.weight.original.detach().float(), 1e-6)
    torch.testing.assert_close(m.weight.float(), ref, rtol=2e-2, atol=2e-2)


def test_apply_ws_gn_on_cnn_trains():
    model = models.cnn()
    handle = normlab.apply(model, "ws+gn")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3 and all(parametrize.is_parametrized(c, "weight") for c in convs)
    assert not parametrize.is_parametrized(model[-1])  # Linear left alone by default
    assert sum(isinstance(m, GroupNorm2d) for m in model.modules()) == 3
    assert handle.state["ws"] == ["0", "3", "6"]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    before = convs[0].parametrizations.weight.original.detach().clone()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    handle.before_step(); opt.step(); handle.after_step()
    assert not torch.equal(before, convs[0].parametrizations.weight.original)
    x_eval = torch.randn(2, 1, 28, 28)
    model.eval()
    out = model(x_eval)
    handle.remove()  # bakes: same function, plain convs
    assert not any(parametrize.is_parametrized(c) for c in model.modules())
    torch.testing.assert_close(model(x_eval), out)


def test_before_norm_only_and_linear_options():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 24 * 24, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    assert followed_by_norm(model) == {"0", "6"}
    h = normlab.apply(copy.deepcopy(model), "ws", before_norm_only=True)
    assert h.state["ws"] == ["0"]
    h = normlab.apply(copy.deepcopy(model), "ws", before_norm_only=True, linear=True)
    assert h.state["ws"] == ["0", "6"]
    h = normlab.apply(copy.deepcopy(model), "ws", linear=True)
    assert h.state["ws"] == ["0", "3", "6"]  # the head (last Linear) is left alone
    h = normlab.apply(copy.deepcopy(model), "ws", modules=["8"])
    assert h.state["ws"] == ["8"]
    h = normlab.apply(copy.deepcopy(model), "ws", modules=["3"])
    assert h.state["ws"] == ["3"]
    m = copy.deepcopy(model)
    h = normlab.apply(m, "ws", bake=False)
    raw = m[0].parametrizations.weight.original.detach().clone()
    h.remove()
    torch.testing.assert_close(m[0].weight, raw)


def test_compile_matches_eager():
    # aot_eager: inductor's C++ compilation takes ~30 s per model on this machine.
    torch._dynamo.reset()
    model = models.cnn(channels=(8, 8, 8))
    normlab.apply(model, "ws+gn")
    x = torch.randn(4, 1, 28, 28)
    compiled = torch.compile(model, backend="aot_eager")
    yc = compiled(x)
    yc.sum().backward()
    gc = model[0].parametrizations.weight.original.grad.clone()
    model.zero_grad()
    ye = model(x)
    ye.sum().backward()
    torch.testing.assert_close(yc, ye)
    torch.testing.assert_close(gc, model[0].parametrizations.weight.original.grad)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="eps"):
        weight_standardization(nn.Conv2d(2, 2, 3), eps=0)
    with pytest.raises(ValueError, match="eps"):
        WeightStandardization(eps=-1.0)
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        normlab.apply(models.cnn(), "ws", eps=float("inf"))
    with pytest.raises(TypeError, match="no tensor"):
        weight_standardization(nn.ReLU())
    with pytest.raises(ValueError, match="single element"):
        weight_standardization(nn.Conv2d(4, 4, 1, groups=4))
    with pytest.raises(ValueError, match="shape"):
        weight_standardization(nn.BatchNorm2d(3))
    m = WSConv2d(2, 2, 3)
    with pytest.raises(ValueError, match="already standardized"):
        weight_standardization(m)
    with pytest.raises(ValueError, match="no layer to standardize"):
        normlab.apply(nn.Sequential(nn.Linear(3, 3)), "ws")
    with pytest.raises(ValueError, match="no submodule"):
        normlab.apply(models.cnn(), "ws", modules=["nope"])
    with pytest.raises(ValueError, match="not parametrized"):
        remove_weight_standardization(nn.Conv2d(2, 2, 3))
    model = models.cnn()
    normlab.apply(model, "ws")
    with pytest.raises(ValueError, match="already standardized"):
        normlab.apply(model, "ws")
