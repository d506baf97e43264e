import math

import pytest
import torch
import torch.nn.functional as F

from normlab.functional import channel_moments, layer_kls, patch_moments, standardization_kl


def reference_kl(z, dims):
    m = z.double().mean(dims)
    v = z.double().var(dims, unbiased=False)
    return 0.5 * (m * m + v - torch.log(v + 1e-5) - 1)


@pytest.mark.parametrize("shape", [(64, 3), (16, 3, 7), (8, 3, 5, 6), (4, 3, 2, 5, 3)])
def test_closed_form_for_2d_to_5d(shape):
    z = torch.randn(shape) * 2.0 + 0.5
    dims = (0, *range(2, len(shape)))
    ref = reference_kl(z, dims)
    torch.testing.assert_close(standardization_kl(z, reduction="none").double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(standardization_kl(z).double(), ref.sum(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(standardization_kl(z, reduction="mean").double(), ref.mean(), rtol=1e-5, atol=1e-6)
    assert standardization_kl(z, reduction="none").shape == (3,)


def test_known_value_and_standard_normal_is_near_zero():
    # N(1, 4): 0.5 * (1 + 4 - log 4 - 1) = 1.3068...
    z = torch.randn(200_000, 1, dtype=torch.float64) * 2 + 1
    assert standardization_kl(z).item() == pytest.approx(0.5 * (1 + 4 - math.log(4) - 1), abs=0.02)
    assert standardization_kl(torch.randn(200_000, 4)).item() == pytest.approx(0.0, abs=1e-3)


def test_matches_monte_carlo_kl_of_gaussians():
    # KL(N(mu, s^2) || N(0, 1)) = E_p[log p(x) - log q(x)], estimated by sampling p.
    mu, s = torch.tensor([0.7, -1.2, 0.0]), torch.tensor([0.5, 1.5, 2.0])
    x = torch.randn(400_000, 3, dtype=torch.float64) * s + mu
    log_p = -0.5 * ((x - mu) / s) ** 2 - torch.log(s) - 0.5 * math.log(2 * math.pi)
    log_q = -0.5 * x**2 - 0.5 * math.log(2 * math.pi)
    mc = (log_p - log_q).mean(0)
    ours = standardization_kl(x, reduction="none")
    torch.testing.assert_close(ours, mc, rtol=0.02, atol=0.01)


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("shape,dim", [((5, 3), None), ((4, 3, 5), None), ((3, 2, 3, 4), None), ((4, 3, 5), (0, 2)),
                                       ((4, 3, 5), 0)])
def test_gradcheck_float64(shape, dim, reduction):
    z = (torch.randn(shape, dtype=torch.float64) * 1.3 + 0.2).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: standardization_kl(t, dim=dim, reduction=reduction), (z,))


def test_gradient_matches_autograd_through_plain_formula():
    z = torch.randn(6, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    standardization_kl(z).backward()
    z2 = z.detach().clone().requires_grad_()
    reference_kl(z2, (0, 2, 3)).sum().backward()
    torch.testing.assert_close(z.grad, z2.grad)


def test_layer_kls_equals_stack_of_single_layers_and_gradcheck():
    zs = [torch.randn(8, c, 3, 3, dtype=torch.float64, requires_grad=True) for c in (2, 3)]
    zs.append(torch.randn(8, 4, dtype=torch.float64, requires_grad=True))
    for reduction in ("sum", "mean"):
        ref = torch.stack([standardization_kl(z, reduction=reduction) for z in zs])
        torch.testing.assert_close(layer_kls(zs, reduction=reduction), ref)
        assert torch.autograd.gradcheck(lambda *t: layer_kls(list(t), reduction=reduction), tuple(zs))


def test_channels_last_matches_contiguous():
    z = torch.randn(16, 5, 6, 6)
    zc = z.contiguous(memory_format=torch.channels_last).requires_grad_()
    z = z.clone().requires_grad_()
    torch.testing.assert_close(standardization_kl(zc), standardization_kl(z))
    standardization_kl(zc).backward()
    standardization_kl(z).backward()
    torch.testing.assert_close(zc.grad, z.grad)


def test_zero_variance_channel_is_finite():
    z = torch.randn(32, 3)
    z[:, 1] = 2.0
    z.requires_grad_()
    value = standardization_kl(z)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(z.grad).all()
    expected = 0.5 * (4.0 + 0.0 - math.log(1e-5) - 1)
    assert standardization_kl(z.detach(), reduction="none")[1].item() == pytest.approx(expected, rel=1e-5)


def test_batch_of_one_without_other_dims_is_a_clear_error():
    with pytest.raises(ValueError, match="undefined"):
        standardization_kl(torch.randn(1, 8))
    # one sample with spatial dims is fine: statistics over H, W
    assert torch.isfinite(standardization_kl(torch.randn(1, 8, 4, 4)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_finite_and_float32_statistics(dtype):
    z = (torch.randn(64, 4, 3, 3) * 30).to(dtype).requires_grad_()
    value = standardization_kl(z)
    assert value.dtype == torch.float32
    value.backward()
    assert z.grad.dtype == dtype and torch.isfinite(z.grad.float()).all()
    ref = reference_kl(z.detach().float(), (0, 2, 3)).sum()
    assert value.item() == pytest.approx(ref.item(), rel=1e-4)
    mean, var = channel_moments(z.detach())
    assert mean.dtype == torch.float32 and var.dtype == torch.float32


@pytest.mark.parametrize("bad,exc,match", [
    (dict(z=torch.randn(5)), ValueError, "batch and a channel"),
    (dict(z=torch.ones(4, 3, dtype=torch.long)), TypeError, "floating-point"),
    (dict(z=[1.0, 2.0]), TypeError, "torch.Tensor"),
    (dict(z=torch.randn(4, 3), reduction="max"), ValueError, "reduction"),
    (dict(z=torch.randn(4, 3), eps=0.0), ValueError, "eps"),
    (dict(z=torch.randn(4, 3), eps=float("inf")), ValueError, "eps must be a finite number > 0"),
    (dict(z=torch.randn(4, 3, 2), dim=()), ValueError, "at least one"),
    (dict(z=torch.randn(4, 3, 2), dim=(0, 0)), ValueError, "repeated"),
])
def test_bad_inputs(bad, exc, match):
    with pytest.raises(exc, match=match):
        standardization_kl(**bad)


def test_layer_kls_checks_eps_as_standardization_kl_does():
    from normlab.functional import layer_kls

    for eps in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="eps must be a finite number > 0"):
            layer_kls([torch.zeros(4, 3)], eps=eps)


CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@pytest.mark.parametrize("d, geometry", [
    (1, dict(stride=3, padding=0, dilation=1)),
    (2, dict(stride=2, padding=1, dilation=1)),
    (2, dict(stride=(1, 2), padding=(2, 0), dilation=(2, 1))),
    (3, dict(stride=(1, 2, 1), padding=(1, 0, 1), dilation=1)),
])
@pytest.mark.parametrize("bias", [True, False])
def test_patch_moments_stand_for_the_conv_output(d, geometry, bias):
    x = torch.randn(6, 3, *([9] * d), dtype=torch.float64)
    w = torch.randn(5, 3, *([3] * d), dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True) if bias else None
    z = CONV[d](x, w, b, **geometry)
    pm = patch_moments(x, w, b, **geometry)
    mean, var = channel_moments(z.detach())
    w2 = w.detach().reshape(5, -1)
    torch.testing.assert_close(w2 @ pm.mean + (0 if b is None else b.detach()), mean)
    torch.testing.assert_close(((w2 @ pm.cov) * w2).sum(1), var)
    assert pm.count == z.numel() // 5
    params = (w, b) if bias else (w,)
    for reduction in ("sum", "mean"):
        ref = layer_kls([z, z * 2], reduction=reduction)
        got = layer_kls([pm, z * 2], reduction=reduction)
        torch.testing.assert_close(got, ref)
        torch.testing.assert_close(torch.autograd.grad(got.sum(), params, retain_graph=True),
                                   torch.autograd.grad(ref.sum(), params, retain_graph=True))
    assert torch.autograd.gradcheck(
        lambda *p: layer_kls([patch_moments(x, p[0], p[1] if bias else None, **geometry)]), params)


@pytest.mark.parametrize("padding", [0, 1])
def test_patch_moments_keep_float32_precision_under_a_large_input_mean(padding):
    # mean / std = 2000: uncentred float32 second moments would lose every digit of the variance
    torch.manual_seed(0)
    x = torch.randn(64, 1, 12, 12) * 0.5 + 1000.0
    w = torch.randn(4, 1, 3, 3)
    pm = patch_moments(x, w, None, stride=2, padding=padding)
    w2 = w.view(4, -1).double()
    _, var = channel_moments(F.conv2d(x.double(), w.double(), None, 2, padding))
    assert pm.cov.dtype == pm.mean.dtype == torch.float64
    torch.testing.assert_close(((w2 @ pm.cov) * w2).sum(1), var, rtol=1e-4, atol=0)
    if not padding:
        torch.testing.assert_close(pm.mean.double(), x.double().mean().expand(9), rtol=1e-3, atol=0)


@pytest.mark.parametrize("padding", [0, 1])
def test_patch_moments_keep_precision_when_examples_differ_in_level_against_a_zero_sum_kernel(padding):
    # Examples 1000x apart in level, a kernel that sums to 0: the output's variance comes from the
    # small spread within examples, which a float32 covariance of all patches would round away
    # (the loss came out 25.82 / 33.86 instead of 25.13 / 25.92 before the per-example shift).
    torch.manual_seed(0)
    for level in (10.0, 30.0):
        x = torch.randn(64, 1, 1, 1) * level + torch.randn(64, 1, 28, 28) * 0.01
        w = torch.randn(8, 1, 3, 3)
        w -= w.mean((2, 3), keepdim=True)
        b = torch.zeros(8)
        got = layer_kls([patch_moments(x, w, b, padding=padding)])
        ref = standardization_kl(F.conv2d(x.double(), w.double(), b.double(), padding=padding))
        torch.testing.assert_close(got.double(), ref.reshape(got.shape), rtol=1e-4, atol=0)  # was 3e-2


def test_patch_moments_keep_precision_when_input_channels_have_different_means():
    # Channel means +1000 and -1000: one shift for the whole input would leave both far from 0.
    torch.manual_seed(0)
    x = torch.randn(32, 2, 10, 10)
    x[:, 0] += 1000.0
    x[:, 1] -= 1000.0
    w = torch.randn(6, 2, 3, 3)
    for padding in (0, 1):
        pm = patch_moments(x, w, None, padding=padding)
        w2 = w.view(6, -1).double()
        mean, var = channel_moments(F.conv2d(x.double(), w.double(), None, 1, padding))
        torch.testing.assert_close(((w2 @ pm.cov) * w2).sum(1), var, rtol=1e-4, atol=0)
        torch.testing.assert_close(w2 @ pm.mean, mean, rtol=1e-4, atol=1e-2)


def test_gradient_of_a_nearly_constant_channel_far_from_zero():
    # var ~ 0, mean 10: d kl / dz = (mu + (1 - r)(z - mu)) / n; written as b*z + a it cancels to 0.
    for eps in (1e-5, 1e-8):
        z = torch.full((256, 1), 10.0, requires_grad=True)
        standardization_kl(z, eps=eps).backward()
        torch.testing.assert_close(z.grad, torch.full_like(z, 10.0 / 256))


def test_no_silent_second_derivative():
    z = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(standardization_kl(z), z, create_graph=True)


def test_channel_moments_is_differentiable():
    z = torch.randn(6, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: channel_moments(t), (z,))
    with torch.no_grad():
        torch.testing.assert_close(channel_moments(z), (z.mean((0, 2)), z.var((0, 2), correction=0)))


def test_patch_moments_bad_inputs():
    w = torch.randn(4, 1, 3, 3)
    with pytest.raises(ValueError, match="weight of shape"):
        patch_moments(torch.randn(2, 2, 8, 8), w)
    with pytest.raises(TypeError, match="float32 or float64"):
        patch_moments(torch.ones(2, 1, 8, 8, dtype=torch.int64), w)
    with pytest.raises(ValueError, match="padding must be"):
        patch_moments(torch.randn(2, 1, 8, 8), w, padding=(1, 1, 1))
    with pytest.raises(ValueError, match="larger than the padded input"):
        patch_moments(torch.randn(2, 1, 2, 2), w)
    with pytest.raises(ValueError, match="undefined"):
        patch_moments(torch.randn(1, 1, 3, 3), w)  # one patch: no variance
    with pytest.raises(TypeError, match="Tensor or a PatchMoments"):
        layer_kls([torch.randn(4, 2), "z"])


def test_out_of_range_dims_and_zero_strides_are_errors():
    z = torch.randn(4, 3, 5, 5)
    for dim in ((0, 5), -5, 4):
        with pytest.raises(IndexError, match="dim must name dims of z"):
            standardization_kl(z, dim=dim)
    w = torch.randn(2, 3, 3, 3)
    with pytest.raises(ValueError, match="stride must be an int >= 1"):
        patch_moments(z, w, stride=0)
    with pytest.raises(ValueError, match="dilation must be an int >= 1"):
        patch_moments(z, w, dilation=0)
