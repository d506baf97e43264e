"""NF nets (Brock et al. 2021): scaled weight standardization, nonlinearity gammas, AGC, the nf/agc methods."""

import math

import pytest
import torch
import torch.nn.functional as F
from scipy import integrate
from torch import nn
from torch.nn.utils import parametrize

import normlab
from normlab import models
from normlab.methods.nf import (AdaptiveGradientClipping, ScaledWeightStandardization, adaptive_clip_grad_,
                                nonlinearity_gamma, remove_scaled_weight_standardization,
                                scaled_weight_standardization)
from normlab.methods.ws import weight_standardization


def ref_sws(w, gain, gamma, eps):
    out = torch.empty_like(w)
    for o in range(w.shape[0]):
        f = w[o].double()
        n = f.numel()
        mu = f.sum() / n
        var = ((f - mu) ** 2).sum() / n
        out[o] = (gain[o].double() * gamma * (f - mu) / torch.sqrt(var * n + eps)).to(w.dtype)
    return out


def ref_agc(p, g, clip, eps):
    # Unit = output row for 2+ dims, the whole tensor for 0/1-d tensors.
    g = g.clone().double()
    units = [slice(None)] if p.dim() <= 1 else range(p.shape[0])
    for u in units:
        wn = max(p[u].double().norm().item(), eps)
        gn = g[u].norm().item()
        if gn / wn > clip:
            g[u] = g[u] * clip * wn / gn
    return g.to(p.dtype)


@pytest.mark.parametrize("shape", [(6, 3, 3, 3), (4, 5), (3, 2, 5)])
def test_scaled_ws_matches_reference(shape):
    w = torch.randn(shape) * 0.1 + 0.02
    p = ScaledWeightStandardization(shape[0], gamma=1.7, eps=1e-4)
    with torch.no_grad():
        p.gain.copy_(torch.rand(shape[0]) + 0.5)
    torch.testing.assert_close(p(w), ref_sws(w, p.gain, 1.7, 1e-4), rtol=1e-5, atol=1e-6)
    # unit gain and gamma: every filter has squared norm ~1 (variance-preserving for unit inputs)
    q = ScaledWeightStandardization(shape[0], eps=1e-12)
    torch.testing.assert_close(q(w).flatten(1).pow(2).sum(1), torch.ones(shape[0]), rtol=1e-4, atol=0)


def test_gamma_values_against_scipy():
    assert nonlinearity_gamma("relu") == pytest.approx(math.sqrt(2 / (1 - 1 / math.pi)), rel=1e-6)
    assert nonlinearity_gamma("identity") == pytest.approx(1.0, rel=1e-6)
    pdf = lambda z: math.exp(-z * z / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    fns = {"tanh": math.tanh, "silu": lambda z: z / (1 + math.exp(-z)),
           "gelu": lambda z: 0.5 * z * (1 + math.erf(z / math.sqrt(2))),
           "sigmoid": lambda z: 1 / (1 + math.exp(-z))}
    for name, f in fns.items():
        m1 = integrate.quad(lambda z: f(z) * pdf(z), -20, 20, limit=200)[0]
        m2 = integrate.quad(lambda z: f(z) ** 2 * pdf(z), -20, 20, limit=200)[0]
        assert nonlinearity_gamma(name) == pytest.approx(1 / math.sqrt(m2 - m1 * m1), rel=1e-6), name
    assert nonlinearity_gamma(lambda z: 2 * z) == pytest.approx(0.5, rel=1e-6)


def test_gradcheck_float64():
    def sws(w, gain):
        q = ScaledWeightStandardization(4, gamma=1.3, eps=1e-3).double()
        del q.gain
        q.gain = gain  # a plain tensor input instead of the parameter, so gradcheck can vary it
        return q(w)

    w = torch.randn(4, 3, 3, dtype=torch.float64, requires_grad=True)
    gain = torch.rand(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(sws, (w, gain))
    assert torch.autograd.gradgradcheck(sws, (w, gain))


def test_parametrized_conv_and_remove():
    m = nn.Conv2d(3, 5, 3)
    raw = m.weight.detach().clone()
    scaled_weight_standardization(m, gamma="relu", eps=1e-4)
    sws = m.parametrizations.weight[0]
    assert sws.gamma == pytest.approx(math.sqrt(2 / (1 - 1 / math.pi)), rel=1e-6)
    assert any(p is sws.gain for p in m.parameters())  # the gain is trained with the model
    torch.testing.assert_close(m.weight, ref_sws(raw, torch.ones(5), sws.gamma, 1e-4), rtol=1e-5, atol=1e-6)
    x = torch.randn(2, 3, 6, 6)
    y = m(x)
    remove_scaled_weight_standardization(m, bake=True)
    assert not parametrize.is_parametrized(m)
    torch.testing.assert_close(m(x), y)


def test_adaptive_clip_matches_reference():
    torch.manual_seed(1)
    params = [torch.randn(6, 4, 3, 3), torch.randn(5, 7), torch.randn(6) * 0.01, torch.zeros(3), torch.randn(2, 3)]
    grads = [torch.randn_like(p) * s for p, s in zip(params, [0.5, 0.001, 1.0, 1e-6, 0.0])]
    grads[0][0] *= 1e-4  # one filter below the threshold, the others above
    ps = [nn.Parameter(p.clone()) for p in params]
    for p, g in zip(ps, grads):
        p.grad = g.clone()
    adaptive_clip_grad_(ps, clip=0.01, eps=1e-3)
    for p, g, q in zip(params, grads, ps):
        torch.testing.assert_close(q.grad, ref_agc(p, g, 0.01, 1e-3), rtol=1e-5, atol=1e-8)
    assert torch.equal(ps[0].grad[0], grads[0][0])  # untouched below the threshold
    assert not torch.equal(ps[0].grad[1], grads[0][1])
    ratio = ps[0].grad[1:].flatten(1).norm(dim=1) / params[0][1:].flatten(1).norm(dim=1)
    torch.testing.assert_close(ratio, torch.full_like(ratio, 0.01))


class HeadFirst(nn.Module):
    """The classifier head is defined first; a conv registered after it owns the last parameters."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.body = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.extra = nn.Conv2d(2, 2, 1)  # last parameters of the model, not the head

    def forward(self, x):
        return self.fc(self.body(x + self.extra(x)))


def test_agc_excludes_the_head_by_module_not_position():
    model = HeadFirst()
    names = [n for n, _ in model.named_parameters()]
    assert names[-1].startswith("extra") and names[0].startswith("fc")
    agc = AdaptiveGradientClipping(model, clip=1e-4)
    assert agc.head == ["fc"]
    clipped = {n for n, _ in agc.named_params}
    assert clipped == {n for n in names if not n.startswith("fc")}
    model(torch.randn(2, 2, 5, 5)).pow(2).sum().mul(1e3).backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    agc()
    for n, p in model.named_parameters():
        if n.startswith("fc"):
            assert torch.equal(p.grad, before[n]), n
        else:
            torch.testing.assert_close(p.grad, ref_agc(p.detach(), before[n], 1e-4, 1e-3)), n
    assert not torch.equal(model.extra.weight.grad, before["extra.weight"])
    # the head given by name (here another module) or no head at all
    assert AdaptiveGradientClipping(model, head="extra").head == ["extra"]
    assert len(AdaptiveGradientClipping(model, head=[]).params) == len(names)
    assert len(AdaptiveGradientClipping(model, head=[model.fc, "extra"]).params) == 2


def test_nf_method_on_cnn():
    model = models.cnn()
    handle = normlab.apply(model, "nf", gamma="relu")
    assert handle.swapped == ["1", "4", "7"]
    assert all(isinstance(model[i], nn.Identity) for i in (1, 4, 7))
    convs = [model[i] for i in (0, 3, 6)]
    assert all(parametrize.is_parametrized(c, "weight") for c in convs)
    assert not parametrize.is_parametrized(model[10])  # head: plain
    gammas = [c.parametrizations.weight[0].gamma for c in convs]
    assert gammas[0] == 1.0 and gammas[1] == gammas[2] == pytest.approx(nonlinearity_gamma("relu"))
    state = handle.state["nf"]
    assert state["head"] == ["10"] and state["standardized"] == ["0", "3", "6"]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    F.cross_entropy(model(x), y).mul(100).backward()
    raw = {n: p.grad.clone() for n, p in model.named_parameters()}
    handle.before_step()
    for n, p in model.named_parameters():
        if n.startswith("10."):
            assert torch.equal(p.grad, raw[n])
        else:
            torch.testing.assert_close(p.grad, ref_agc(p.detach(), raw[n], 0.01, 1e-3))
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    model.eval()
    xe = torch.randn(2, 1, 28, 28)
    out = model(xe)
    handle.remove()
    assert handle.pre_step == [] and not any(parametrize.is_parametrized(m) for m in model.modules())
    torch.testing.assert_close(model(xe), out)


def test_nf_signal_propagation_with_gamma():
    # A deep ReLU MLP keeps unit-scale pre-activations with the ReLU gamma, and loses them without.
    torch.manual_seed(0)

    def variance_at_depth(gamma):
        layers = [nn.Linear(256, 256)]
        for _ in range(15):
            layers += [nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 256, bias=False)]
        layers += [nn.ReLU(), nn.Linear(256, 10)]
        model = nn.Sequential(*layers)
        normlab.apply(model, "nf", gamma=gamma)
        with torch.no_grad():
            return model[:-2](torch.randn(512, 256)).var().item()

    assert 0.5 < variance_at_depth("relu") < 2.0
    assert variance_at_depth(1.0) < 1e-3


def test_nf_state_dict_round_trip_and_mlp():
    a, b = models.mlp(), models.mlp()
    normlab.apply(a, "nf")
    normlab.apply(b, "nf")
    with torch.no_grad():
        a[1].parametrizations.weight[0].gain.mul_(1.5)
    sd = a.state_dict()
    assert "1.parametrizations.weight.0.gain" in sd and "1.parametrizations.weight.original" in sd
    b.load_state_dict(sd)
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(a(x), b(x))


def test_combinations():
    with pytest.raises(ValueError, match="combines"):
        normlab.apply(models.cnn(), "nf+bn")
    with pytest.raises(ValueError, match="already standardized"):
        normlab.apply(models.cnn(), "nf+ws")
    with pytest.raises(ValueError, match="already applies adaptive gradient clipping"):
        normlab.apply(models.cnn(), "nf+agc")
    h = normlab.apply(models.cnn(), "nf+agc", **{"nf.clip": 0, "agc.clip": 0.02})
    assert h.state["nf"]["agc"] is None and h.state["agc"].clip == 0.02 and len(h.pre_step) == 1
    h = normlab.apply(models.cnn(), "bn+agc", clip=0.05)
    model = h.model
    model(torch.randn(4, 1, 28, 28)).sum().backward()
    h.before_step()
    h = normlab.apply(models.cnn(), "ws+gn+agc")
    assert len(h.pre_step) == 1


def test_bfloat16_forward_backward_finite():
    model = models.cnn(channels=(8, 8, 8))
    h = normlab.apply(model, "nf", gamma="relu")
    model.to(torch.bfloat16)
    x = torch.randn(4, 1, 28, 28, dtype=torch.bfloat16)
    y = model(x)
    y.float().pow(2).sum().backward()
    h.before_step()
    assert torch.isfinite(y).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_compile_matches_eager():
    # aot_eager: inductor's C++ compilation takes ~30 s per model on this machine.
    torch._dynamo.reset()
    model = models.cnn(channels=(8, 8, 8))
    normlab.apply(model, "nf", gamma="relu")
    x = torch.randn(4, 1, 28, 28)
    yc = torch.compile(model, backend="aot_eager")(x)
    yc.sum().backward()
    gain = model[3].parametrizations.weight[0].gain
    gc = gain.grad.clone()
    model.zero_grad()
    ye = model(x)
    ye.sum().backward()
    torch.testing.assert_close(yc, ye)
    torch.testing.assert_close(gc, gain.grad)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown nonlinearity"):
        nonlinearity_gamma("relu6x")
    with pytest.raises(ValueError, match="gamma"):
        ScaledWeightStandardization(3, gamma=-1.0)
    with pytest.raises(ValueError, match="eps"):
        ScaledWeightStandardization(3, eps=0)
    with pytest.raises(ValueError, match="clip"):
        AdaptiveGradientClipping(models.cnn(), clip=0)
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        AdaptiveGradientClipping(models.cnn(), eps=float("inf"))
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        adaptive_clip_grad_(nn.Parameter(torch.randn(3, 3)), eps=float("nan"))
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        ScaledWeightStandardization(3, eps=float("inf"))
    with pytest.raises(ValueError, match="clip"):
        normlab.apply(models.cnn(), "nf", clip=-1)
    with pytest.raises(ValueError, match="no submodule 'classifier'"):
        AdaptiveGradientClipping(models.cnn(), head="classifier")
    with pytest.raises(ValueError, match="not a submodule"):
        AdaptiveGradientClipping(models.cnn(), head=nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no Conv"):
        normlab.apply(nn.Sequential(nn.Linear(3, 3)), "nf")
    with pytest.raises(ValueError, match="besides the head to standardize; pass linear=True"):
        normlab.apply(nn.Sequential(nn.Linear(3, 3)), "nf", linear=False)
    with pytest.raises(ValueError, match="head .default: the last Linear. names every such layer"):
        normlab.apply(nn.Sequential(nn.Linear(3, 3)), "nf", linear=True)
    mlp = nn.Sequential(nn.Linear(1, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
    with pytest.raises(ValueError, match=r"nf: 0: .* single element.*list it in head=\[...\]"):
        normlab.apply(mlp, "nf", linear=True)
    assert normlab.apply(mlp, "nf", linear=True, head=["0", "4"]).state["nf"]["standardized"] == ["2"]  # the hint works
    with pytest.raises(ValueError, match="already standardized"):
        scaled_weight_standardization(weight_standardization(nn.Conv2d(2, 2, 3)))
    p = nn.Parameter(torch.randn(3, 3))
    p.grad = torch.randn(3, 3).to_sparse()
    with pytest.raises(ValueError, match="sparse"):
        adaptive_clip_grad_([p])


def test_bad_nf_options_name_themselves_and_leave_the_model_untouched():
    model = models.cnn(norm="bn")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inf = float("inf")
    for opts, says in (({"agc_eps": -1}, "nf: agc_eps must be"), ({"eps": 0}, "nf: eps must be"),
                       ({"eps": inf}, "nf: eps must be a finite"), ({"agc_eps": inf}, "nf: agc_eps must be a finite"),
                       ({"clip": inf}, "nf: clip must be a finite")):
        with pytest.raises(ValueError, match=says):
            normlab.apply(model, "nf", **opts)
        assert isinstance(model[1], nn.BatchNorm2d) and not parametrize.is_parametrized(model[0])
    assert model.state_dict().keys() == before.keys()
    normlab.apply(model, "nf")  # and it can still be applied
