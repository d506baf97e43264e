"""L1 / top-k batch norm (Hoffer et al. 2018): formulas, gradients, running statistics, eval, dtypes,
torch.compile, the registry and error messages. References are written out here with plain ops."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import normlab
from normlab.methods import lp_batchnorm as lp
from normlab.methods.lp_batchnorm import (L1BatchNorm1d, L1BatchNorm2d, TopKBatchNorm1d, TopKBatchNorm2d,
                                          expected_topk_mean)

EPS = 1e-5


def paper_c(n: int) -> float:
    return 0.5 * (1 + math.sqrt(math.pi * math.log(4))) / math.sqrt(2 * math.log(n))


def reference(x, weight, bias, k, const, eps=EPS):
    """Plain composition: statistics over every dim but 1, |x - mu| sorted for top-k."""
    c = x.shape[1]
    flat = x.transpose(0, 1).reshape(c, -1)
    mu = flat.mean(1)
    dev = (flat - mu[:, None]).abs()
    s = const * (dev.mean(1) if k == 0 else dev.sort(1, descending=True).values[:, :k].mean(1))
    shape = (1, -1) + (1,) * (x.dim() - 2)
    y = (x - mu.view(shape)) / torch.sqrt(s.view(shape) ** 2 + eps)
    if weight is not None:
        y = y * weight.view(shape) + bias.view(shape)
    return y, mu, s


def make(kind: str, c: int, dims: int, **kw):
    one = dims in (0, 1)
    if kind == "l1":
        return (L1BatchNorm1d if one else L1BatchNorm2d)(c, **kw)
    k = {"linf": 1, "top3": 3, "top10": 10}[kind]
    return (TopKBatchNorm1d if one else TopKBatchNorm2d)(c, k=k, **kw)


def k_of(kind: str) -> int:
    return {"l1": 0, "linf": 1, "top3": 3, "top10": 10}[kind]


def const_of(kind: str, n: int, calibrated: bool = False) -> float:
    k = k_of(kind)
    if k == 0:
        return math.sqrt(math.pi / 2)
    return 1 / expected_topk_mean(n, k) if calibrated else paper_c(n)


SHAPES = {"2d": (16, 5), "1d": (6, 5, 7), "img": (4, 5, 6, 7), "img_cl": (4, 5, 6, 7)}
KINDS = ["l1", "linf", "top3", "top10"]


def sample(name: str, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*SHAPES[name], generator=g, dtype=dtype) * 2 + 0.5
    if name == "img_cl":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def dims_of(name: str) -> int:
    return {"2d": 0, "1d": 1, "img": 2, "img_cl": 2}[name]


@pytest.fixture(params=[False, True], ids=["one_chunk", "many_chunks"])
def chunking(request, monkeypatch):
    # The CPU path reduces in chunks of the batch; force one sample per chunk to test the chunked code.
    if request.param:
        monkeypatch.setattr(lp, "_CHUNK_ELEMS", 1)
    return request.param


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_forward_and_gradients_match_reference(kind, shape, chunking):
    x = sample(shape).requires_grad_()
    m = make(kind, 5, dims_of(shape), dtype=torch.float64)
    with torch.no_grad():
        m.weight.normal_()
        m.bias.normal_()
    n = x.numel() // 5
    y = m(x)
    y_ref, _, _ = reference(x, m.weight, m.bias, k_of(kind), const_of(kind, n))
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    if shape == "img_cl":
        assert y.is_contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, m.weight, m.bias), g)
    grads_ref = torch.autograd.grad(y_ref, (x, m.weight, m.bias), g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_calibrated_constant_matches_reference():
    x = sample("img").requires_grad_()
    m = TopKBatchNorm2d(5, k=3, calibrated=True, dtype=torch.float64)
    n = x.numel() // 5
    y_ref, _, _ = reference(x, m.weight, m.bias, 3, 1 / expected_topk_mean(n, 3))
    torch.testing.assert_close(m(x), y_ref)


def test_top_k_concentrated_in_one_sample_and_non_contiguous_input():
    # The top k of a channel all in one sample, and a non-contiguous (sliced) input.
    x = torch.randn(8, 3, 40, dtype=torch.float64)
    x[5, 1] *= 50
    xs = x[:, :, ::2].requires_grad_()
    m = TopKBatchNorm1d(3, k=10, dtype=torch.float64)
    y = m(xs)
    y_ref, _, _ = reference(xs, m.weight, m.bias, 10, paper_c(xs.numel() // 3))
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, xs, g)[0], torch.autograd.grad(y_ref, xs, g)[0])


@pytest.mark.parametrize("kind", ["l1", "linf", "top3"])
@pytest.mark.parametrize("shape", ["1d", "img_cl"])
def test_gradcheck_float64(kind, shape, chunking):
    x = torch.randn((4, 3, 5) if shape == "1d" else (3, 3, 3, 4), dtype=torch.float64)
    if shape == "img_cl":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    n = x.numel() // 3

    def fn(x, w, b):
        return lp.lp_batch_norm(x, None, None, w, b, True, 0.1, EPS, k_of(kind), const_of(kind, n))

    assert torch.autograd.gradcheck(fn, (x, w, b))


def test_gradcheck_without_affine_and_weight_only_gradient():
    x = sample("1d").requires_grad_()
    assert torch.autograd.gradcheck(lambda x: lp.lp_batch_norm(x, None, None, None, None, True, k=0,
                                                               const=math.sqrt(math.pi / 2)), (x,))
    m = L1BatchNorm1d(5, dtype=torch.float64)
    m(sample("1d")).pow(2).sum().backward()  # input without grad: only the parameters get one
    assert m.weight.grad is not None and m.bias.grad is not None


@pytest.mark.parametrize("kind", KINDS)
def test_running_stats_follow_pytorch_momentum_convention(kind):
    m = make(kind, 5, 2, momentum=0.3, dtype=torch.float64)
    xs = [sample("img", seed=s) for s in range(3)]
    rm, rv = torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)
    for i, x in enumerate(xs):
        m(x)
        _, mu, s = reference(x, None, None, k_of(kind), const_of(kind, x.numel() // 5))
        rm = 0.7 * rm + 0.3 * mu  # newest batch weighted by momentum, as nn.BatchNorm
        rv = 0.7 * rv + 0.3 * s**2  # running_var holds the variance-equivalent scale**2
        assert int(m.num_batches_tracked) == i + 1
    torch.testing.assert_close(m.running_mean, rm)
    torch.testing.assert_close(m.running_var, rv)


def test_momentum_none_is_cumulative_average():
    m = L1BatchNorm2d(5, momentum=None, dtype=torch.float64)
    xs = [sample("img", seed=s) for s in range(3)]
    for x in xs:
        m(x)
    mus = torch.stack([reference(x, None, None, 0, math.sqrt(math.pi / 2))[1] for x in xs])
    torch.testing.assert_close(m.running_mean, mus.mean(0))


@pytest.mark.parametrize("kind", KINDS)
def test_eval_uses_running_stats_per_sample_and_eval_affine(kind):
    m = make(kind, 5, 2, dtype=torch.float64)
    with torch.no_grad():
        m.weight.normal_()
        m.bias.normal_()
    for s in range(3):
        m(sample("img", seed=s))
    m.eval()
    x = sample("img", seed=7)
    y = m(x)
    shape = (1, -1, 1, 1)
    ref = (x - m.running_mean.view(shape)) / torch.sqrt(m.running_var.view(shape) + EPS)
    torch.testing.assert_close(y, ref * m.weight.view(shape) + m.bias.view(shape))
    torch.testing.assert_close(m(x[1:2]), y[1:2])  # a sample's output ignores the rest of the batch
    scale, shift = m.eval_affine()
    assert scale.shape == shift.shape == (5,)
    torch.testing.assert_close(x * scale.view(shape) + shift.view(shape), y)
    before = m.running_mean.clone()
    m(x)
    assert torch.equal(before, m.running_mean)  # eval does not update


def test_fold_into_conv_is_exact():
    fold = pytest.importorskip("normlab.methods.fold")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3), L1BatchNorm2d(5), nn.ReLU())
    for _ in range(3):
        model(torch.randn(8, 3, 9, 9))
    model.eval()
    x = torch.randn(4, 3, 9, 9)
    folded = fold.fold(model)
    assert not any(isinstance(mm, L1BatchNorm2d) for mm in folded.modules())
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["l1", "top10"])
def test_state_dict_round_trip(kind):
    m = make(kind, 5, 2)
    with torch.no_grad():
        m.weight.normal_()
    for s in range(2):
        m(sample("img", torch.float32, seed=s))
    m2 = make(kind, 5, 2)
    m2.load_state_dict(m.state_dict())
    assert set(m.state_dict()) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    m.eval()
    m2.eval()
    x = sample("img", torch.float32, seed=9)
    torch.testing.assert_close(m2(x), m(x), rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", ["1d", "img_cl"])
def test_bfloat16_forward_backward_finite(kind, param_dtype, shape):
    m = make(kind, 5, dims_of(shape), dtype=param_dtype)
    x = sample(shape, torch.float32).mul(30).bfloat16().requires_grad_()
    y = m(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all() and torch.isfinite(m.weight.grad).all()
    ref, _, _ = reference(x.detach().float(), None, None, k_of(kind), const_of(kind, x.numel() // 5))
    torch.testing.assert_close(y.float(), ref, rtol=0.05, atol=0.05)
    m.eval()
    assert torch.isfinite(m(x)).all()


@pytest.mark.parametrize("method,opts", [("l1bn", {}), ("topkbn", {"k": 3}), ("linfbn", {})])
def test_torch_compile_matches_eager(method, opts):
    # backend="aot_eager": traces the autograd.Function through dynamo and AOTAutograd without the
    # inductor C++ compile (about 10-30 s per model on this machine); inductor also matches.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2))
    normlab.apply(model, method, **opts)
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, backend="aot_eager")
    x = torch.randn(8, 3, 8, 8)
    lp._expected_topk_mean.cache_clear()  # the compiled forward computes its constant first, untraced
    y_c, y = compiled(x), model(x)
    y.square().sum().backward()
    y_c.square().sum().backward()
    torch.testing.assert_close(y_c, y)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(q.grad, p.grad)
    torch.testing.assert_close(twin[1].running_var, model[1].running_var)
    model.eval()
    compiled.eval()
    torch.testing.assert_close(compiled(x), model(x))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))])
        self.fc = nn.Linear(4, 6)
        self.bn1d = nn.BatchNorm1d(6)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.blocks[0](x)
        return self.bn1d(self.fc(x.mean((2, 3))))


@pytest.mark.parametrize("method,cls2d,cls1d,k", [("l1bn", L1BatchNorm2d, L1BatchNorm1d, None),
                                                  ("topkbn", TopKBatchNorm2d, TopKBatchNorm1d, 10),
                                                  ("linfbn", TopKBatchNorm2d, TopKBatchNorm1d, 1)])
def test_apply_swaps_every_batchnorm(method, cls2d, cls1d, k):
    model = Net()
    handle = normlab.apply(model, method)
    assert sorted(handle.swapped) == ["blocks.0.1", "bn1d", "stem.1"]
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert type(model.stem[1]) is cls2d and type(model.blocks[0][1]) is cls2d and type(model.bn1d) is cls1d
    if k is not None:
        assert model.stem[1].k == k
    out = model(torch.randn(16, 3, 6, 6))
    out.sum().backward()
    assert torch.isfinite(out).all()
    # swapping again (e.g. l1bn -> topkbn) finds the registered layer types
    normlab.apply(model, "topkbn", k=2)
    assert type(model.stem[1]) is TopKBatchNorm2d and model.stem[1].k == 2


def test_norm_layer_factory_dims_and_options():
    assert type(normlab.norm_layer("l1bn", 8, 0)) is L1BatchNorm1d
    assert type(normlab.norm_layer("linfbn", 8, 1)) is TopKBatchNorm1d
    layer = normlab.norm_layer("topkbn", 8, 2, k=4, calibrated=True, momentum=0.2)
    assert type(layer) is TopKBatchNorm2d and layer.k == 4 and layer.calibrated and layer.momentum == 0.2
    with pytest.raises(ValueError, match="dims"):
        normlab.norm_layer("l1bn", 8, 3)


def test_constants():
    # E[mean of all n |N(0,1)|] = sqrt(2/pi); the top-1 of 1000 and top-10 of 1000 by Monte Carlo.
    assert expected_topk_mean(1, 1) == pytest.approx(math.sqrt(2 / math.pi), rel=1e-6)
    assert expected_topk_mean(50, 50) == pytest.approx(math.sqrt(2 / math.pi), rel=1e-6)
    z = torch.randn(4000, 1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64).abs()
    assert expected_topk_mean(1000, 1) == pytest.approx(float(z.amax(1).mean()), rel=5e-3)
    assert expected_topk_mean(1000, 10) == pytest.approx(float(z.topk(10, 1).values.mean()), rel=3e-3)
    assert lp.paper_constant(16384) == pytest.approx(paper_c(16384))
    # METHODS.md: with the paper's C(n), Gaussian input and n = 16384 the scale is about 1.3-1.45 sigma
    # (output variance 0.48 for k=1, 0.60 for k=10); the calibrated constant gives unit variance.
    x = torch.randn(16, 8, 32, 32, generator=torch.Generator().manual_seed(1))
    for k in (1, 10):
        assert 0.4 < TopKBatchNorm2d(8, k=k)(x).var().item() < 0.7
        assert 0.85 < TopKBatchNorm2d(8, k=k, calibrated=True)(x).var().item() < 1.15
    assert 0.95 < L1BatchNorm2d(8)(x).var().item() < 1.05


def test_bad_inputs_give_clear_errors():
    for bad in (0, -1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="k must be an int >= 1"):
            TopKBatchNorm2d(4, k=bad)
    with pytest.raises(ValueError, match="k must be"):
        normlab.norm_layer("topkbn", 4, 2, k=0)
    with pytest.raises(ValueError, match="expects .*1d variant"):
        L1BatchNorm2d(4)(torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match="expects .*2d variant"):
        TopKBatchNorm1d(4)(torch.randn(2, 4, 5, 5))
    with pytest.raises(ValueError, match="got 3 channels"):
        L1BatchNorm2d(4)(torch.randn(2, 3, 5, 5))
    with pytest.raises(ValueError, match="k=10 needs at least k values per channel"):
        TopKBatchNorm1d(4)(torch.randn(6, 4))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        L1BatchNorm1d(4)(torch.randn(1, 4))
    with pytest.raises(ValueError, match="num_features"):
        L1BatchNorm2d(0)
    with pytest.raises(ValueError, match="momentum"):
        L1BatchNorm2d(4, momentum=2.0)
    with pytest.raises(ValueError, match="eps"):
        L1BatchNorm2d(4, eps=0)
    with pytest.raises(TypeError, match="unknown option"):
        normlab.apply(Net(), "l1bn", k=3)
    with pytest.raises(ValueError, match="has none"):
        normlab.apply(nn.Sequential(nn.Linear(3, 3)), "l1bn")
    m = TopKBatchNorm1d(4, k=2).eval()
    assert m(torch.randn(1, 4)).shape == (1, 4)  # eval needs no batch statistics


@pytest.mark.parametrize("kind", KINDS)
def test_float16_parameters_beyond_scale_256(kind):
    # scale**2 > 65504 overflows float16: the training output must still be standardized, not zero.
    m = make(kind, 5, 2, dtype=torch.float16)
    x = sample("img", torch.float32).mul(300).half().requires_grad_()
    y = m(x)
    assert y.dtype == torch.float16
    ref, _, _ = reference(x.detach().float(), None, None, k_of(kind), const_of(kind, x.numel() // 5))
    torch.testing.assert_close(y.float(), ref, rtol=0.01, atol=0.01)
    y.float().square().sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(m.weight.grad).all()


def test_a_rejected_batch_leaves_the_running_statistics_alone():
    for m, bad in ((L1BatchNorm1d(3, momentum=None), torch.randn(1, 3)),
                   (TopKBatchNorm1d(3, k=4, momentum=None), torch.randn(3, 3)),
                   (normlab.norm_layer("bcn", 4, 2, num_groups=2, estimate=False, momentum=None), torch.randn(1, 4, 1, 1))):
        with pytest.raises(ValueError, match="value|values per channel"):
            m(bad)
        assert int(m.num_batches_tracked) == 0
        x = torch.randn(8, m.num_features) if m.running_mean.shape == (3,) else torch.randn(8, 4, 3, 3)
        m(x)
        dims = [d for d in range(x.dim()) if d != 1]
        torch.testing.assert_close(m.running_mean, x.mean(dims))  # cumulative average of one batch


def test_functional_bad_input():
    with pytest.raises(ValueError, match=r"shape \(N, C, ...\)"):
        lp.lp_batch_norm(torch.randn(5), None, None, training=True)
    with pytest.raises(ValueError, match="k must be an int >= 0"):
        lp.lp_batch_norm(torch.randn(5, 3), None, None, training=True, k=-1)
