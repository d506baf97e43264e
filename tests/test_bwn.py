"""Bounded weight normalization (Hoffer et al. 2018): formula, fixed rho, gradients, state dicts,
removal, the registered ``bwn`` method, dtypes, torch.compile and error messages."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import normlab
from normlab.methods.bwn import BoundedWeightNorm, bounded_weight_norm, remove_bounded_weight_norm

P = [1, 2, math.inf]


def ref_norms(v: torch.Tensor, p: float) -> torch.Tensor:
    flat = v.reshape(v.shape[0], -1)
    if p == 1:
        return flat.abs().sum(1)
    if p == 2:
        return flat.pow(2).sum(1).sqrt()
    return flat.abs().max(1).values


def ref_bounded(v: torch.Tensor, rho: float, p: float) -> torch.Tensor:
    return rho * v / ref_norms(v, p).view((-1,) + (1,) * (v.dim() - 1))


@pytest.mark.parametrize("p", P)
@pytest.mark.parametrize("layer", ["conv", "linear", "conv1d"])
def test_formula_and_rho_is_mean_initial_norm(p, layer):
    torch.manual_seed(0)
    m = {"conv": nn.Conv2d(3, 6, 3), "linear": nn.Linear(7, 5), "conv1d": nn.Conv1d(2, 4, 5)}[layer].double()
    v0 = m.weight.detach().clone()
    rho = ref_norms(v0, p).mean()
    bounded_weight_norm(m, p=p)
    assert parametrize.is_parametrized(m, "weight")
    torch.testing.assert_close(m.parametrizations.weight[0].rho, rho)
    torch.testing.assert_close(m.parametrizations.weight.original, v0)  # v is the initial weight
    torch.testing.assert_close(m.weight, ref_bounded(v0, float(rho), p))
    torch.testing.assert_close(ref_norms(m.weight, p), rho.expand(v0.shape[0]))


@pytest.mark.parametrize("p", P)
def test_norm_stays_fixed_while_training(p):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
    bounded_weight_norm(model[0], p=p)
    rho = model[0].parametrizations.weight[0].rho.clone()
    v0 = model[0].parametrizations.weight.original.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(5):
        loss = nn.functional.cross_entropy(model(torch.randn(8, 3, 8, 8)), torch.randint(0, 3, (8,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.allclose(model[0].parametrizations.weight.original, v0)  # v is trained
    assert torch.equal(model[0].parametrizations.weight[0].rho, rho)  # rho is not
    assert model[0].parametrizations.weight[0].rho.requires_grad is False
    torch.testing.assert_close(ref_norms(model[0].weight.detach(), p), rho.expand(4))


@pytest.mark.parametrize("p", P)
def test_gradcheck_float64(p):
    torch.manual_seed(0)
    prm = BoundedWeightNorm(0.7, p)
    v = (torch.randn(3, 2, 2, 2, dtype=torch.float64) + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(prm, (v,))
    torch.testing.assert_close(prm(v), ref_bounded(v, 0.7, p))


def test_state_dict_round_trip():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 36, 3))
    normlab.apply(a, "bwn", head=True)
    with torch.no_grad():
        a[0].parametrizations.weight.original.mul_(3)  # the raw v drifts; the output norm does not
    torch.manual_seed(1)
    b = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 36, 3))
    normlab.apply(b, "bwn", head=True)
    assert not torch.equal(a[0].parametrizations.weight[0].rho, b[0].parametrizations.weight[0].rho)
    sd = a.state_dict()
    assert "0.parametrizations.weight.0.rho" in sd and "2.parametrizations.weight.0.rho" in sd
    b.load_state_dict(sd)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)
    torch.testing.assert_close(b[0].parametrizations.weight[0].rho, a[0].parametrizations.weight[0].rho)


@pytest.mark.parametrize("bake", [True, False])
def test_remove_bakes_or_restores(bake):
    torch.manual_seed(0)
    m = nn.Conv2d(3, 4, 3)
    v0 = m.weight.detach().clone()
    bounded_weight_norm(m, p=2)
    with torch.no_grad():
        m.parametrizations.weight.original.mul_(torch.tensor([1.0, 2.0, 3.0, 4.0]).view(-1, 1, 1, 1))
    x = torch.randn(2, 3, 6, 6)
    y = m(x)
    remove_bounded_weight_norm(m, bake=bake)
    assert not parametrize.is_parametrized(m) and type(m) is nn.Conv2d
    assert isinstance(m.weight, nn.Parameter)
    if bake:
        torch.testing.assert_close(m(x), y)
    else:
        scale = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(-1, 1, 1, 1)
        torch.testing.assert_close(m.weight, v0 * scale)


def test_remove_keeps_other_parametrizations():
    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    m = nn.Linear(4, 3)
    bounded_weight_norm(m, p=1)
    parametrize.register_parametrization(m, "weight", Double())
    expected = 2 * m.parametrizations.weight[0](m.parametrizations.weight.original)
    torch.testing.assert_close(m.weight, expected)
    remove_bounded_weight_norm(m, bake=True)  # first in the chain: baked into original
    assert len(m.parametrizations.weight) == 1 and isinstance(m.parametrizations.weight[0], Double)
    torch.testing.assert_close(m.weight, expected)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
        self.mid = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.relu(self.mid(self.features(x).mean((2, 3)))))


def test_apply_bwn_skips_head_and_removes():
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(4, 3, 8, 8)
    handle = normlab.apply(model, "bwn", p="inf")
    assert handle.state["bwn"] == ["features.0", "features.3", "mid"]
    for name in handle.state["bwn"]:
        assert parametrize.is_parametrized(model.get_submodule(name), "weight")
        assert model.get_submodule(name).parametrizations.weight[0].p == math.inf
    assert not parametrize.is_parametrized(model.head)
    model.eval()
    y = model(x)
    handle.remove()  # bake=True by default: the same function with plain weights
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    torch.testing.assert_close(model(x), y)

    model2 = Net()
    h2 = normlab.apply(model2, "bwn", head=True)
    assert h2.state["bwn"][-1] == "head"
    model3 = Net()
    h3 = normlab.apply(model3, "bwn", modules=["mid", model3.features[0]])
    assert h3.state["bwn"] == ["mid", "features.0"]
    assert not parametrize.is_parametrized(model3.features[3])


def test_combines_with_lp_batchnorm_and_train_eval_are_the_same_map():
    torch.manual_seed(0)
    model = Net()
    normlab.apply(model, "l1bn+bwn")
    assert type(model.features[1]).__name__ == "L1BatchNorm2d"
    out = model(torch.randn(4, 3, 8, 8))
    out.sum().backward()
    assert torch.isfinite(model.features[0].parametrizations.weight.original.grad).all()
    conv = model.features[0]
    w_train = conv.weight.detach().clone()
    model.eval()
    torch.testing.assert_close(conv.weight, w_train)  # no train/eval difference in the weight


def test_bfloat16_and_zero_filter():
    m = nn.Conv2d(3, 4, 3).bfloat16()
    bounded_weight_norm(m)
    assert m.parametrizations.weight[0].rho.dtype == torch.float32
    x = torch.randn(2, 3, 6, 6, dtype=torch.bfloat16, requires_grad=True)
    y = m(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(m.parametrizations.weight.original.grad).all()
    torch.testing.assert_close(ref_norms(m.weight.float(), 2), m.parametrizations.weight[0].rho.expand(4),
                               rtol=2e-2, atol=0)
    z = nn.Linear(3, 2)
    bounded_weight_norm(z)
    with torch.no_grad():
        z.parametrizations.weight.original[1] = 0
    assert torch.isfinite(z.weight).all() and torch.equal(z.weight[1], torch.zeros(3))


def test_torch_compile_matches_eager():
    # backend="aot_eager": parametrizations trace through dynamo/AOTAutograd without an inductor build.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2))
    normlab.apply(model, "bwn", p=1)
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, backend="aot_eager")
    x = torch.randn(8, 3, 8, 8)
    y, y_c = model(x), compiled(x)
    torch.testing.assert_close(y_c, y)
    y.square().sum().backward()
    y_c.square().sum().backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(q.grad, p.grad)


def test_bad_inputs_give_clear_errors():
    for bad in (3, 0, -1, "foo", True, 2.5):
        with pytest.raises(ValueError, match="p must be 1, 2 or inf"):
            bounded_weight_norm(nn.Linear(3, 3), p=bad)
        with pytest.raises(ValueError, match="p must be 1, 2 or inf"):
            normlab.apply(Net(), "bwn", p=bad)
    with pytest.raises(TypeError, match="has no tensor 'weight'"):
        bounded_weight_norm(nn.ReLU())
    with pytest.raises(ValueError, match="at least 2 dims"):
        bounded_weight_norm(nn.BatchNorm2d(3))
    m = nn.Linear(3, 3)
    bounded_weight_norm(m)
    with pytest.raises(ValueError, match="already carries"):
        bounded_weight_norm(m)
    z = nn.Linear(3, 3)
    nn.init.zeros_(z.weight)
    with pytest.raises(ValueError, match="all zeros"):
        bounded_weight_norm(z)
    with pytest.raises(ValueError, match="carries no BoundedWeightNorm"):
        remove_bounded_weight_norm(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="no submodule 'nope'"):
        normlab.apply(Net(), "bwn", modules=["nope"])
    with pytest.raises(ValueError, match="besides the classifier head"):
        normlab.apply(nn.Sequential(nn.Linear(3, 2)), "bwn")
    with pytest.raises(ValueError, match="rho must be"):
        BoundedWeightNorm(0.0)
    net = Net()
    normlab.apply(net, "bwn")
    with pytest.raises(ValueError, match="already carries"):
        normlab.apply(net, "bwn", head=True)  # checked before anything is applied
    assert not parametrize.is_parametrized(net.head)
