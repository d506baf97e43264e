"""Group norm and layer norm with batch-norm-style constructors: formulas, group rule, registry."""

import copy

import pytest
import torch
from torch import nn

import normlab
from normlab import models
from normlab.methods.groupnorm import GroupNorm1d, GroupNorm2d, LayerNorm1d, LayerNorm2d, check_groups
from normlab.methods.registry import norm_layer


def ref_gn(x, groups, w, b, eps):
    out = torch.empty_like(x)
    c = x.shape[1]
    size = c // groups
    shape = (-1,) + (1,) * (x.dim() - 2)
    for n in range(x.shape[0]):
        for g in range(groups):
            part = x[n, g * size:(g + 1) * size].double()
            mu = part.mean()
            var = ((part - mu) ** 2).mean()
            y = (part - mu) / torch.sqrt(var + eps)
            out[n, g * size:(g + 1) * size] = (y * w[g * size:(g + 1) * size].double().view(shape)
                                               + b[g * size:(g + 1) * size].double().view(shape)).to(x.dtype)
    return out


def randomize(layer):
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p))
    return layer


@pytest.mark.parametrize("cls,shape,groups", [(GroupNorm2d, (3, 12, 4, 5), 4), (GroupNorm1d, (3, 12), 3),
                                              (GroupNorm1d, (3, 12, 7), 6), (LayerNorm2d, (3, 12, 4, 4), 1),
                                              (LayerNorm1d, (5, 12), 1)])
def test_matches_reference(cls, shape, groups):
    layer = randomize(cls(12, groups, eps=1e-3) if "Group" in cls.__name__ else cls(12, eps=1e-3))
    assert layer.num_features == 12 and layer.num_groups == groups
    x = torch.randn(shape) * 3 + 1
    torch.testing.assert_close(layer(x), ref_gn(x, groups, layer.weight, layer.bias, 1e-3), rtol=1e-5, atol=1e-5)


def test_layernorm_1d_is_nn_layernorm_and_2d_is_over_chw():
    ln = randomize(LayerNorm1d(10))
    ref = nn.LayerNorm(10)
    ref.load_state_dict(ln.state_dict())
    x = torch.randn(4, 10)
    torch.testing.assert_close(ln(x), ref(x))
    x = torch.randn(2, 6, 3, 3)
    y = LayerNorm2d(6)(x)
    torch.testing.assert_close(y.mean((1, 2, 3)), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var((1, 2, 3), unbiased=False), torch.ones(2), atol=1e-3, rtol=0)


def test_group_rule():
    assert check_groups(64, 32) == 32
    assert check_groups(100, 32) == 25
    assert check_groups(16, 32) == 16
    assert check_groups(7, 4) == 1
    assert check_groups(48, 32) == 24
    assert GroupNorm2d(100).num_groups == 25
    with pytest.raises(ValueError, match="num_groups"):
        check_groups(8, 0)
    with pytest.raises(ValueError, match="num_features"):
        GroupNorm2d(0)


def test_gradcheck_float64():
    for layer, shape in ((GroupNorm2d(6, 3), (2, 6, 3, 3)), (LayerNorm1d(5), (3, 5))):
        layer = randomize(layer.double())
        names = [n for n, _ in layer.named_parameters()]
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
        assert torch.autograd.gradcheck(
            lambda a, *ps: torch.func.functional_call(layer, dict(zip(names, ps)), (a,)), (x, *params))


def test_train_equals_eval_and_samples_are_independent():
    layer = randomize(GroupNorm2d(8, 4))
    x = torch.randn(4, 8, 3, 3)
    y_train = layer(x)
    layer.eval()
    torch.testing.assert_close(layer(x), y_train)
    torch.testing.assert_close(layer(x[:1]), layer(torch.cat([x[:1], 100 * torch.randn(3, 8, 3, 3)]))[:1])
    assert not any(True for _ in layer.buffers())


def test_state_dict_round_trip_and_nn_groupnorm_compatibility():
    a, b = randomize(GroupNorm2d(8, 4)), GroupNorm2d(8, 4)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(a(x), b(x))
    ref = nn.GroupNorm(4, 8)
    ref.load_state_dict(a.state_dict())
    torch.testing.assert_close(a(x), ref(x))
    assert isinstance(a, nn.GroupNorm)


def test_bfloat16_forward_backward_finite():
    for layer in (GroupNorm2d(16, 4), LayerNorm2d(16)):
        layer = layer.to(torch.bfloat16)
        x = (torch.randn(2, 16, 4, 4) * 5).to(torch.bfloat16).requires_grad_()
        y = layer(x)
        y.float().pow(2).sum().backward()
        assert y.dtype == torch.bfloat16 and torch.isfinite(y).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("spec", ["gn", "ln"])
def test_compile_matches_eager(spec):
    # aot_eager: inductor's C++ compilation takes ~30 s per model on this machine.
    torch._dynamo.reset()
    model = models.cnn(channels=(8, 8, 8))
    normlab.apply(model, spec)
    x = torch.randn(4, 1, 28, 28)
    yc = torch.compile(model, backend="aot_eager")(x)
    yc.sum().backward()
    gc = model[0].weight.grad.clone()
    model.zero_grad()
    ye = model(x)
    ye.sum().backward()
    torch.testing.assert_close(yc, ye)
    torch.testing.assert_close(gc, model[0].weight.grad)


def test_registry():
    model = models.cnn()
    h = normlab.apply(model, "gn", num_groups=4)
    assert h.swapped == ["1", "4", "7"] and [model[i].num_groups for i in (1, 4, 7)] == [4, 4, 4]
    assert all(type(model[i]) is GroupNorm2d for i in (1, 4, 7))
    normlab.apply(model, "ln")  # registered types are found and swapped again
    assert all(type(model[i]) is LayerNorm2d for i in (1, 4, 7))
    normlab.apply(model, "bn")
    assert all(type(model[i]) is nn.BatchNorm2d for i in (1, 4, 7))
    mlp = models.mlp(norm="ln")
    assert isinstance(mlp[2], LayerNorm1d)
    mlp(torch.randn(2, 1, 28, 28)).sum().backward()
    assert isinstance(norm_layer("gn", 100, 0), GroupNorm1d)
    h = normlab.apply(copy.deepcopy(model), "none")
    assert h.swapped == ["1", "4", "7"]


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        GroupNorm2d(8, 4)(torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"\(N, C\) or \(N, C, L\)"):
        LayerNorm1d(8)(torch.randn(2, 8, 2, 2))
    with pytest.raises(ValueError, match="got 6 channels"):
        GroupNorm2d(8, 4)(torch.randn(2, 6, 2, 2))
    with pytest.raises(ValueError, match="dims"):
        norm_layer("gn", 8, 3)
    with pytest.raises(TypeError, match="unknown option"):
        normlab.apply(models.cnn(), "ln", num_groups=2)
