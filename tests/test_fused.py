"""The standardization loss's C loops (normlab/_fused.c) against the same maths in torch operations."""

import shutil

import pytest
import torch
import torch.nn.functional as F

from normlab import StandardizationLoss, functional, models
from normlab.functional import _kl_total, _layer_values, patch_moments

needs_fused = pytest.mark.skipif(functional._fused is None and shutil.which("cc") is None,
                                 reason="no C compiler: normlab was installed without its C loops")


def test_the_c_loops_are_built_where_a_compiler_is():
    # `pip install` builds them as an optional extension; a silent build failure would leave every
    # user on the slower torch path.
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler here, so the optional extension is not built")
    assert functional._fused is not None, "normlab/_fused.c was not built: reinstall with `pip install -e .`"


def test_normlab_pure_torch_turns_them_off(monkeypatch):
    monkeypatch.setenv("NORMLAB_PURE_TORCH", "1")
    assert functional._load_fused() is None
    monkeypatch.setenv("NORMLAB_PURE_TORCH", "0")
    assert (functional._load_fused() is None) == (functional._fused is None)


def _layers(seed: int, constant: bool = True):
    # Leaves of every kind the C loops take: patch moments (bias or not), z channels_last 4-D,
    # contiguous 4-D, (N, C), (N, C, L), channels_last_3d 5-D; with `constant`, one channel nearly
    # constant far from 0 (its float32 statistics are ill-conditioned: both paths share them).
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 2, 9, 9, generator=g)
    w1 = torch.randn(5, 2, 3, 3, generator=g, requires_grad=True)
    b1 = torch.randn(5, generator=g, requires_grad=True)
    w2 = torch.randn(4, 2, 2, 2, generator=g, requires_grad=True)
    z4 = torch.randn(6, 7, 5, 5, generator=g) * 3 + 1
    if constant:
        z4[:, 2] = 40.0 + 1e-4 * torch.randn(6, 5, 5, generator=g)
    zs = [z4.contiguous(memory_format=torch.channels_last), torch.randn(6, 3, 4, 4, generator=g),
          torch.randn(8, 5, generator=g) - 2, torch.randn(4, 3, 7, generator=g),
          torch.randn(3, 4, 2, 3, 2, generator=g).contiguous(memory_format=torch.channels_last_3d)]
    zs = [z.requires_grad_() for z in zs]
    return [patch_moments(x, w1, b1, stride=2, padding=1), *zs, patch_moments(x, w2, None, stride=1)], \
        [w1, b1, w2, *zs]


@needs_fused
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_loss_terms_and_gradients_equal_the_torch_path_in_float64(reduction, monkeypatch):
    # The C path on float32 values against the torch path on float64 copies of them (exact moments):
    # the C loops' shifted sums and split-mean gradient keep even the nearly constant channel (variance
    # 1e-8 at a mean of 40, where torch's float32 batch-norm statistics are off by a few percent) to
    # float32 accuracy.
    layers, leaves = _layers(0)
    assert functional._fusable(layers)
    leaves64 = [leaf.detach().double().requires_grad_() for leaf in leaves]
    by_leaf = {id(a): b for a, b in zip(leaves, leaves64)}
    layers64 = [layer._replace(weight=by_leaf[id(layer.weight)], bias=by_leaf.get(id(layer.bias)))
                if isinstance(layer, functional.PatchMoments) else by_leaf[id(layer)] for layer in layers]
    sizes = [layer.weight.shape[0] if hasattr(layer, "weight") else layer.shape[1] for layer in layers]
    out = {}
    for name, lib, ls, lv in (("c", functional._fused, layers, leaves), ("torch", None, layers64, leaves64)):
        monkeypatch.setattr(functional, "_fused", lib)
        total, raw = _kl_total(ls, 1e-5, reduction)
        out[name] = (total, _layer_values(raw, sizes, reduction), torch.autograd.grad(total * 0.7, lv))
    (tc, vc, gc), (tt, vt, gt) = out["c"], out["torch"]
    assert tc.dtype == torch.float32 and tt.dtype == torch.float64
    torch.testing.assert_close(tc.double(), tt, rtol=1e-5, atol=1e-5)
    assert vc == pytest.approx(vt, rel=1e-5, abs=1e-5)
    for a, b, leaf in zip(gc, gt, leaves):
        assert a.shape == leaf.shape and a.dtype == leaf.dtype
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6)
        if leaf.dim() >= 4:  # the gradient is laid out as z is
            assert a.stride() == leaf.stride()


@needs_fused
def test_the_c_path_has_no_second_derivative():
    layers, leaves = _layers(2, constant=False)
    total, _ = _kl_total(layers, 1e-5, "sum")
    assert type(total.grad_fn).__name__.startswith("_FusedKL")
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(total, leaves, create_graph=True)


@needs_fused
def test_moments_of_a_channel_far_from_zero_keep_their_precision():
    # Values near 1e4 with a spread of 1: sums of their squares in float32 would keep no digit of the
    # variance; the C loops sum z - (the channel's first value). Channels last, contiguous and (N, C).
    g = torch.Generator().manual_seed(5)
    for z in (torch.randn(64, 12, 5, 5, generator=g).contiguous(memory_format=torch.channels_last),
              torch.randn(64, 12, 5, 5, generator=g), torch.randn(300, 12, generator=g)):
        z = z * torch.linspace(0.5, 2, 12).view(1, 12, *([1] * (z.dim() - 2))) + 1e4
        shape = functional._z_layout(z)
        buf = torch.empty(3, 12, dtype=torch.float64)
        functional._fused.nl_z_kl(z.data_ptr(), *shape[:1], 12, shape[1], 1e-5, 1.0, *(buf[i].data_ptr() for i in range(3)))
        var, mean = torch.var_mean(z.double().transpose(0, 1).reshape(12, -1), 1, correction=0)
        torch.testing.assert_close(buf[0], mean, rtol=1e-12, atol=1e-5)
        torch.testing.assert_close(buf[1] - 1e-5, var, rtol=1e-5, atol=0)


@needs_fused
def test_gradients_in_float64_against_autograd_of_the_formula():
    # The C path's analytic gradient against autograd through the textbook formula.
    layers, leaves = _layers(1, constant=False)
    total, _ = _kl_total(layers, 1e-5, "sum")
    grads = torch.autograd.grad(total, leaves)
    ref = 0.0
    for layer in layers:
        if isinstance(layer, functional.PatchMoments):
            w = layer.weight.double().flatten(1)
            mu = w @ layer.mean + (0 if layer.bias is None else layer.bias.double())
            var = ((w @ layer.cov) * w).sum(1)
        else:
            z = layer.double()
            dims = (0, *range(2, z.dim()))
            var, mu = torch.var_mean(z, dims, correction=0)
        ref = ref + (0.5 * (mu**2 + var - torch.log(var + 1e-5) - 1)).sum()
    for a, b in zip(grads, torch.autograd.grad(ref, leaves)):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-7)


@needs_fused
def test_other_layouts_and_dtypes_take_the_torch_path():
    z = torch.randn(4, 3, 5, 5)
    assert functional._z_layout(z) == (4, 25)
    assert functional._z_layout(z.contiguous(memory_format=torch.channels_last)) == (100, 1)
    for other in (z.transpose(2, 3), z.double(), z.half(), z[:, :, ::2]):
        assert functional._z_layout(other) is None
        total, _ = _kl_total([other.requires_grad_()], 1e-5, "sum")
        total.backward()
        assert torch.isfinite(other.grad).all()
    x = torch.randn(4, 1, 6, 6)
    pm = patch_moments(x, torch.randn(3, 1, 2, 2).double())  # float64 weight: torch path
    assert not functional._fusable([pm])
    bad = pm._replace(weight=torch.randn(3, 1, 3, 3), cov=pm.cov)  # K of the weight != K of the moments
    assert not functional._fusable([bad])


@needs_fused
def test_batch_table_moments_equal_the_torch_sums(monkeypatch):
    g = torch.Generator().manual_seed(3)
    data = torch.rand(50, 1, 12, 12, generator=g)
    idx = torch.randint(0, 50, (40,), generator=g)[::2]  # not contiguous
    values = {}
    for name, lib in (("c", functional._fused), ("torch", None)):
        monkeypatch.setattr(functional, "_fused", lib)
        torch.manual_seed(0)
        model = models.cnn(norm="none", image_size=12).to(memory_format=torch.channels_last)
        std = StandardizationLoss(model)
        loss = F.cross_entropy(model(std.batch(data, idx)), torch.zeros(20, dtype=torch.long)) + std()
        loss.backward()
        values[name] = (loss.detach(), std.terms(), [p.grad for p in model.parameters()])
    (lc, tc, gc), (lt, tt, gt) = values["c"], values["torch"]
    torch.testing.assert_close(lc, lt, rtol=1e-5, atol=1e-5)
    (first, c1), *rest = tc.items()
    assert c1 == pytest.approx(tt[first], rel=1e-6)  # from the table's moments alone (float32 in the torch path)
    assert [v for _, v in rest] == pytest.approx([tt[k] for k, _ in rest], rel=1e-5, abs=1e-6)
    for a, b in zip(gc, gt):  # later layers' moments: the C loops' sums against torch's float32 statistics
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


@needs_fused
def test_table_loop_refuses_an_index_out_of_range():
    lib = functional._fused
    table = torch.ones(3, 2, dtype=torch.float64)  # k = 1: rows of D_i and Q_i, 1 + 1 wide
    mean, cov = torch.full((1,), 7.0, dtype=torch.float64), torch.full((1, 1), 7.0, dtype=torch.float64)
    center = torch.zeros(1, dtype=torch.float64)
    for bad in ([0, 3], [-1]):
        idx = torch.tensor(bad)
        assert lib.nl_table_moments(table.data_ptr(), 3, idx.data_ptr(), len(idx), 1, center.data_ptr(), 4.0,
                                    mean.data_ptr(), cov.data_ptr()) == -1
        assert mean.item() == cov.item() == 7.0  # nothing written
    idx = torch.tensor([0, 2])
    assert lib.nl_table_moments(table.data_ptr(), 3, idx.data_ptr(), 2, 1, center.data_ptr(), 4.0,
                                mean.data_ptr(), cov.data_ptr()) == 0
    assert mean.item() == 1.0 and cov.item() == pytest.approx(2 / 8 - 1.0)
