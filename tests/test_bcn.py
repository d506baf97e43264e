"""Batch-channel norm and estimated batch norm (Qiao et al. 2019): formulas, estimates, folding, registry."""

import copy

import pytest
import torch
from torch import nn

import normlab
from normlab import models
from normlab.methods.bcn import BatchChannelNorm1d, BatchChannelNorm2d, EstimatedBatchNorm1d, EstimatedBatchNorm2d
from normlab.methods.fold import fold
from normlab.methods.registry import norm_layer


def ref_bn(x, mean, var, w, b, eps):
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return (x - mean.view(shape)) / torch.sqrt(var.view(shape) + eps) * w.view(shape) + b.view(shape)


def batch_moments(x):
    dims = [0] + list(range(2, x.dim()))
    n = x.numel() // x.shape[1]
    mean = x.sum(dims) / n
    shape = (1, -1) + (1,) * (x.dim() - 2)
    var = ((x - mean.view(shape)) ** 2).sum(dims) / n
    return mean, var, n


def ref_gn(x, groups, w, b, eps):
    n, c = x.shape[:2]
    xs = x.reshape(n, groups, -1)
    mu = xs.mean(-1, keepdim=True)
    var = ((xs - mu) ** 2).mean(-1, keepdim=True)
    y = ((xs - mu) / torch.sqrt(var + eps)).reshape(x.shape)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return y * w.view(shape) + b.view(shape)


def randomize(layer):
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    return layer


@pytest.mark.parametrize("shape,cls", [((4, 12, 5, 5), BatchChannelNorm2d), ((6, 12), BatchChannelNorm1d),
                                       ((3, 12, 7), BatchChannelNorm1d)])
def test_bcn_training_and_eval_match_reference(shape, cls):
    layer = randomize(cls(12, num_groups=4, momentum=0.2))
    x = torch.randn(shape) * 2 + 0.5
    y = layer(x)
    mean, var, n = batch_moments(x)
    u = ref_bn(x, mean, var, layer.bn_weight, layer.bn_bias, 1e-5)
    torch.testing.assert_close(y, ref_gn(u, 4, layer.weight, layer.bias, 1e-5), rtol=1e-4, atol=1e-5)
    # running statistics as nn.BatchNorm: unbiased variance, PyTorch momentum convention
    torch.testing.assert_close(layer.running_mean, 0.2 * mean)
    torch.testing.assert_close(layer.running_var, 0.8 + 0.2 * var * n / (n - 1))
    assert layer.num_batches_tracked.item() == 1
    layer.eval()
    x2 = torch.randn(shape)
    u2 = ref_bn(x2, layer.running_mean, layer.running_var, layer.bn_weight, layer.bn_bias, 1e-5)
    torch.testing.assert_close(layer(x2), ref_gn(u2, 4, layer.weight, layer.bias, 1e-5), rtol=1e-4, atol=1e-5)


def test_estbn_training_uses_updated_estimates_and_they_move():
    layer = randomize(EstimatedBatchNorm2d(5, momentum=0.1))
    rm, rv = torch.zeros(5), torch.ones(5)
    for step in range(3):
        x = torch.randn(2, 5, 4, 4) * 3 + 2
        y = layer(x)
        mean, var, _ = batch_moments(x)
        rm = 0.9 * rm + 0.1 * mean
        second = (((x - rm.view(1, -1, 1, 1)) ** 2).sum((0, 2, 3)) / (x.numel() / 5))  # around the new estimate
        rv = 0.9 * rv + 0.1 * second
        torch.testing.assert_close(layer.running_mean, rm)
        torch.testing.assert_close(layer.running_var, rv)
        torch.testing.assert_close(y, ref_bn(x, rm, rv, layer.weight, layer.bias, 1e-5), rtol=1e-5, atol=1e-5)
    assert layer.num_batches_tracked.item() == 3
    assert (layer.running_mean - 0).abs().min() > 0.1  # the estimates actually moved (the released code's do not)
    layer.eval()
    x = torch.randn(2, 5, 4, 4)
    y = layer(x)
    torch.testing.assert_close(layer.running_mean, rm)  # eval: no update
    torch.testing.assert_close(y, ref_bn(x, rm, rv, layer.weight, layer.bias, 1e-5), rtol=1e-5, atol=1e-5)


def test_estbn_cumulative_momentum_and_micro_batch():
    layer = EstimatedBatchNorm2d(3, momentum=None)
    x = torch.randn(1, 3, 6, 6) * 2 + 1  # a single image: plain batch norm would still work, (1, C) would not
    layer(x)
    mean, var, _ = batch_moments(x)
    torch.testing.assert_close(layer.running_mean, mean)  # first step copies the batch
    torch.testing.assert_close(layer.running_var, var)
    one = EstimatedBatchNorm1d(4)
    y = one(torch.randn(1, 4))  # batch of one (N, C) sample: BN refuses, estimated BN does not
    assert torch.isfinite(y).all()
    with pytest.raises(ValueError):
        nn.BatchNorm1d(4)(torch.randn(1, 4))


def test_estbn_gradient_is_per_channel_affine_and_gradcheck():
    layer = randomize(EstimatedBatchNorm2d(3)).double()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    (layer(x) * g).sum().backward()
    scale = layer.weight / torch.sqrt(layer.running_var + layer.eps)
    torch.testing.assert_close(x.grad, g * scale.view(1, -1, 1, 1))
    check_gradients(layer, x.detach())


def check_gradients(layer, x):
    # Training mode: the output of estimated batch norm depends on the input through the estimates,
    # which are constants for autograd by design, so the input gradient is checked in eval mode
    # (and analytically above); the parameters are checked in both modes.
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    state = copy.deepcopy(layer.state_dict())

    def train_fn(*ps):
        layer.load_state_dict(state)  # the estimates move on every call: start from the same ones
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    layer.train()
    assert torch.autograd.gradcheck(train_fn, tuple(params))
    layer.eval()
    assert torch.autograd.gradcheck(lambda a, *ps: torch.func.functional_call(layer, dict(zip(names, ps)), (a,)),
                                    (x.clone().requires_grad_(), *params))


def test_bcn_gradcheck_float64():
    layer = randomize(BatchChannelNorm2d(6, num_groups=3)).double()
    names = [n for n, _ in layer.named_parameters()]
    x = torch.randn(3, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    # training mode: batch statistics, the gradient flows through them
    assert torch.autograd.gradcheck(lambda a, *ps: torch.func.functional_call(layer, dict(zip(names, ps)), (a,)),
                                    (x, *params))
    est = randomize(BatchChannelNorm2d(6, num_groups=3, estimate=True)).double()
    est(torch.randn(3, 6, 3, 3, dtype=torch.float64) + 1)
    check_gradients(est, x.detach())


def test_bcn_estimate_matches_reference():
    layer = randomize(BatchChannelNorm2d(8, num_groups=2, estimate=True, momentum=0.5))
    x = torch.randn(1, 8, 5, 5) + 3
    y = layer(x)
    mean, var, _ = batch_moments(x)
    rm = 0.5 * mean
    second = ((x - rm.view(1, -1, 1, 1)) ** 2).mean((0, 2, 3))
    rv = 0.5 + 0.5 * second
    torch.testing.assert_close(layer.running_var, rv)
    u = ref_bn(x, rm, rv, layer.bn_weight, layer.bn_bias, 1e-5)
    torch.testing.assert_close(y, ref_gn(u, 2, layer.weight, layer.bias, 1e-5), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("make", [lambda: BatchChannelNorm2d(8, 4), lambda: BatchChannelNorm2d(8, 4, estimate=True),
                                  lambda: EstimatedBatchNorm2d(8)])
def test_eval_sample_independent_of_batch(make):
    layer = randomize(make())
    for _ in range(3):
        layer(torch.randn(4, 8, 3, 3) * 2 + 1)
    layer.eval()
    x = torch.randn(5, 8, 3, 3)
    alone = layer(x[:1])
    with_others = layer(torch.cat([x[:1], torch.randn(7, 8, 3, 3) * 10]))[:1]
    torch.testing.assert_close(alone, with_others)


@pytest.mark.parametrize("make", [lambda: BatchChannelNorm2d(8, 4, estimate=True), lambda: EstimatedBatchNorm2d(8)])
def test_state_dict_round_trip(make):
    a, b = randomize(make()), make()
    a(torch.randn(4, 8, 3, 3) + 1)
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    x = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(a(x), b(x))
    assert set(a.state_dict()) >= {"running_mean", "running_var", "num_batches_tracked"}


def test_estbn_eval_affine_and_fold():
    conv = nn.Conv2d(3, 6, 3)
    est = randomize(EstimatedBatchNorm2d(6))
    model = nn.Sequential(conv, est, nn.ReLU())
    for _ in range(3):
        model(torch.randn(2, 3, 6, 6) + 1)
    model.eval()
    x = torch.randn(2, 3, 6, 6)
    scale, shift = est.eval_affine()
    z = conv(x)
    torch.testing.assert_close(est(z), z * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1), rtol=1e-5, atol=1e-5)
    folded = fold(model)
    assert not any(isinstance(m, EstimatedBatchNorm2d) for m in folded.modules())
    torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)


def test_bfloat16_forward_backward_finite():
    for layer in (BatchChannelNorm2d(16, 4), BatchChannelNorm2d(16, 4, estimate=True), EstimatedBatchNorm2d(16)):
        layer = layer.to(torch.bfloat16)
        x = (torch.randn(2, 16, 4, 4) * 3 + 1).to(torch.bfloat16).requires_grad_()
        y = layer(x)
        y.float().pow(2).sum().backward()
        assert y.dtype == torch.bfloat16 and torch.isfinite(y).all() and torch.isfinite(x.grad).all()
        assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


@pytest.mark.parametrize("spec", ["bcn", "estbn"])
def test_compile_matches_eager(spec):
    # aot_eager: inductor's C++ compilation takes ~30 s per model on this machine.
    torch._dynamo.reset()
    model = models.cnn(channels=(8, 8, 8))
    normlab.apply(model, spec)
    twin = copy.deepcopy(model)
    x = torch.randn(4, 1, 28, 28)
    yc = torch.compile(model, backend="aot_eager")(x)
    ye = twin(x)
    torch.testing.assert_close(yc, ye)
    yc.sum().backward(), ye.sum().backward()
    torch.testing.assert_close(model[1].running_var, twin[1].running_var)
    torch.testing.assert_close(model[0].weight.grad, twin[0].weight.grad)


def test_registry_and_group_rule():
    model = models.cnn()
    h = normlab.apply(model, "bcn", num_groups=8)
    assert [type(model[i]) for i in (1, 4, 7)] == [BatchChannelNorm2d] * 3
    assert [model[i].num_groups for i in (1, 4, 7)] == [8, 8, 8] and h.swapped == ["1", "4", "7"]
    assert norm_layer("bcn", 100, 2).num_groups == 25  # largest divisor of 100 not above 32
    assert norm_layer("bcn", 7, 2, num_groups=4).num_groups == 1
    assert isinstance(norm_layer("bcn", 10, 0), BatchChannelNorm1d)
    assert isinstance(norm_layer("estbn", 10, 2), EstimatedBatchNorm2d)
    mlp = models.mlp(norm="bcn")
    mlp(torch.randn(3, 1, 28, 28)).sum().backward()
    normlab.apply(mlp, "estbn", momentum=0.05)  # registered types are swappable again
    assert isinstance(mlp[2], EstimatedBatchNorm1d) and mlp[2].momentum == 0.05
    m = models.cnn(norm="estbn")
    normlab.apply(m, "ws")
    m(torch.randn(1, 1, 28, 28)).sum().backward()  # micro-batch of one image trains


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="momentum"):
        EstimatedBatchNorm2d(4, momentum=0)
    with pytest.raises(ValueError, match="num_groups"):
        BatchChannelNorm2d(4, num_groups=0)
    with pytest.raises(ValueError, match="num_features"):
        BatchChannelNorm2d(0)
    with pytest.raises(ValueError, match="eps"):
        EstimatedBatchNorm2d(4, eps=0)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        BatchChannelNorm2d(4, 2)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="got 3 channels"):
        EstimatedBatchNorm2d(4)(torch.randn(2, 3, 2, 2))
    with pytest.raises(ValueError, match="dims"):
        norm_layer("bcn", 8, 3)
