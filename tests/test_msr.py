"""Mean shift rejection (Ruff, Beck & Bach 2019): init, per-step constraint, options, registry."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import normlab
from normlab.methods.msr import MeanShiftRejection, msr_init

torch.set_num_threads(1)


def tiny(bn: bool = False) -> nn.Sequential:
    norm = (lambda c: nn.BatchNorm2d(c)) if bn else (lambda c: nn.Identity())
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), norm(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), norm(8), nn.ReLU(),
        nn.Conv2d(8, 6, 1), nn.ReLU(),  # a 1x1 kernel: mean over input channels
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
    )


def slice_means(w: torch.Tensor) -> torch.Tensor:
    """Reference: mean of every kernel slice W[o, i] (k > 1), or of W[o, :] for 1x1 kernels."""
    if w[0, 0].numel() > 1:
        return torch.stack([torch.stack([w[o, i].mean() for i in range(w.shape[1])]) for o in range(w.shape[0])])
    return torch.stack([w[o].mean() for o in range(w.shape[0])])


def worst_mean(model: nn.Module) -> float:
    return max(float(slice_means(m.weight.detach()).abs().max())
               for m in model.modules() if isinstance(m, nn.Conv2d))


def batch(seed: int, n: int = 8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g) + 0.5, torch.randint(0, 3, (n,), generator=g)


def train(model, handle, opt, steps, check=None):
    for step in range(steps):
        x, y = batch(step)
        loss = F.cross_entropy(model(x), y) + handle.aux_loss()
        opt.zero_grad()
        loss.backward()
        handle.before_step()
        opt.step()
        handle.after_step()
        if check is not None:
            check()


def test_init_zero_mean_unit_magnitude():
    torch.manual_seed(0)
    model = tiny()
    head = model[-1].weight.detach().clone()
    normlab.apply(model, "msr")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    for conv in convs:
        w = conv.weight.detach()
        assert slice_means(w).abs().max() < 1e-6
        norms = torch.stack([w[o].pow(2).sum().sqrt() for o in range(w.shape[0])])
        torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0)
        assert w.abs().max() > 0.05  # not collapsed to zero
    assert torch.equal(model[-1].weight, head)  # Linear layers are left alone by default


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3),
    lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2),
    lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
], ids=["sgd_momentum", "adam_wd", "adamw"])
def test_project_keeps_kernels_zero_mean_under_any_optimizer(make_opt):
    torch.manual_seed(0)
    model = tiny()
    handle = normlab.apply(model, "msr")
    start = [m.weight.detach().clone() for m in model.modules() if isinstance(m, nn.Conv2d)]
    worst = []
    train(model, handle, make_opt(model.parameters()), 100, check=lambda: worst.append(worst_mean(model)))
    assert max(worst) < 1e-6
    moved = [float((m.weight.detach() - w0).abs().max()) for m, w0 in
             zip([m for m in model.modules() if isinstance(m, nn.Conv2d)], start)]
    assert min(moved) > 1e-3  # the kernels did train


def test_without_projection_adam_leaves_the_isocline():
    # The control for the test above: Adam's per-element scaling breaks a zero-mean gradient, and
    # the authors' amplification only suppresses the mean part, so both drift off the isocline.
    for mode in (None, "amplify"):
        torch.manual_seed(0)
        model = tiny()
        handle = normlab.apply(model, "msr", **({} if mode is None else {"mode": mode}))
        if mode is None:
            handle.post_step.clear()
        train(model, handle, torch.optim.Adam(model.parameters(), lr=1e-2), 20)
        assert worst_mean(model) > 1e-4, mode


def _grads(model, seed=0):
    model.zero_grad()
    x, y = batch(seed)
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["amplify", "both", "project"])
def test_gradient_transform_matches_reference(mode):
    torch.manual_seed(0)
    model = tiny()
    m = 10.0
    msr = MeanShiftRejection(model, mode=mode, m=m)
    raw = _grads(model)
    msr.before_step()
    for name, p in model.named_parameters():
        g = raw[name]
        if name.endswith("weight") and g.dim() == 4:
            ref = torch.empty_like(g)
            for o in range(g.shape[0]):
                if g[0, 0].numel() > 1:
                    for i in range(g.shape[1]):
                        mu = g[o, i].mean()
                        ref[o, i] = g[o, i] - mu if mode == "project" else g[o, i] * (1 + m) - mu * m
                else:
                    mu = g[o].mean()
                    ref[o] = g[o] - mu if mode == "project" else g[o] * (1 + m) - mu * m
        else:
            ref = g  # biases and the Linear head are untouched
        torch.testing.assert_close(p.grad, ref, rtol=1e-5, atol=1e-7)


def test_a_tied_kernel_is_transformed_once():
    torch.manual_seed(0)
    c1, c2 = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)
    c2.weight = c1.weight
    net = nn.Sequential(c1, c2)
    msr = MeanShiftRejection(net, mode="amplify", m=10.0)
    assert [name for name, _ in msr.modules] == ["0"]
    net(torch.randn(2, 3, 5, 5)).sum().backward()
    g = c1.weight.grad.clone()
    msr.before_step()
    torch.testing.assert_close(c1.weight.grad, g * 11 - g.mean((2, 3), keepdim=True) * 10)


def test_1x1_kernels_use_the_mean_over_input_channels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 4, 1), nn.Conv2d(4, 4, 1, groups=4))  # plain and depthwise 1x1
    depthwise = model[1].weight.detach().clone()
    msr = MeanShiftRejection(model)
    with torch.no_grad():
        model[0].weight.add_(0.3)
    msr.project()
    w = model[0].weight.detach()[:, :, 0, 0]
    assert torch.stack([w[o].sum() for o in range(4)]).abs().max() < 1e-6
    assert w.abs().min() > 0  # the slice is the input-channel row, not the single element
    assert torch.equal(model[1].weight, depthwise)  # one element per slice: left alone
    assert msr_init(model) == ["0"]
    assert model[0].weight[:, :, 0, 0].sum(1).abs().max() < 1e-6
    assert torch.equal(model[1].weight, depthwise)


def test_noise_changes_gradients_but_not_their_slice_means():
    torch.manual_seed(0)
    model = tiny()
    msr = MeanShiftRejection(model, mode="amplify", m=0.0, noise=0.5)  # m=0: noise is the only change
    raw = _grads(model)
    msr.before_step()
    for name, p in model.named_parameters():
        if name.endswith("weight") and p.dim() == 4:
            g, g0 = p.grad, raw[name]
            assert (g - g0).abs().max() > 1e-3 * g0.abs().max()
            torch.testing.assert_close(slice_means(g), slice_means(g0), rtol=0, atol=1e-7)
            # bounded by noise * rms * 2 per slice (|u - mean u| <= 2)
            dims = (2, 3) if g[0, 0].numel() > 1 else (1, 2, 3)
            rms = g0.pow(2).mean(dims, keepdim=True).sqrt()
            assert ((g - g0).abs() <= 2 * 0.5 * rms + 1e-7).all()
    # and with the default projection the weights stay on the isocline
    handle = normlab.apply(model, "msr", noise=0.5)
    train(model, handle, torch.optim.Adam(model.parameters(), lr=1e-2), 10)
    assert worst_mean(model) < 1e-6


def test_torch_compile_matches_eager():
    # aot_eager keeps compilation fast; the msr hooks run outside the compiled forward either way.
    torch.manual_seed(0)
    eager = tiny()
    compiled_src = copy.deepcopy(eager)
    h_eager = normlab.apply(eager, "msr")
    h_comp = normlab.apply(compiled_src, "msr")
    compiled = torch.compile(compiled_src, backend="aot_eager")
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1, momentum=0.9)
    opt_c = torch.optim.SGD(compiled_src.parameters(), lr=0.1, momentum=0.9)
    train(eager, h_eager, opt_e, 4)
    train(compiled, h_comp, opt_c, 4)
    for (n, a), b in zip(eager.named_parameters(), compiled_src.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    assert worst_mean(compiled_src) < 1e-6
    x, _ = batch(99)
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec", ["std_loss+msr", "none+msr"])
def test_registry_combinations(spec):
    torch.manual_seed(0)
    model = tiny(bn=True)
    handle = normlab.apply(model, spec, mode="project", m=5.0)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert worst_mean(model) < 1e-6
    if spec.startswith("std_loss"):
        model(batch(0)[0])
        assert float(handle.aux_loss().detach()) > 0
    train(model, handle, torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3), 10)
    assert worst_mean(model) < 1e-6
    assert "msr" in normlab.list_methods()


def test_attach_to_optimizer_and_parametrized_weights():
    class Scale(nn.Module):
        def forward(self, w):
            return 2.0 * w

    torch.manual_seed(0)
    model = tiny()
    parametrize.register_parametrization(model[0], "weight", Scale())
    msr_init(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-2)
    msr = MeanShiftRejection(model).attach(opt)
    for step in range(10):
        x, y = batch(step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()  # the hooks run before_step/after_step
    assert worst_mean(model) < 1e-6  # model[0].weight is 2 * original: zero-mean too
    assert msr.max_abs_mean() < 1e-6
    msr.remove()
    x, y = batch(0)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert worst_mean(model) > 1e-6  # detached: Adam drifts again


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="mode"):
        normlab.apply(tiny(), "msr", mode="center")
    with pytest.raises(ValueError, match="noise"):
        normlab.apply(tiny(), "msr", noise=-1.0)
    with pytest.raises(ValueError, match="m must be a finite number >= 0 .the gradient amplification."):
        normlab.apply(tiny(), "msr", mode="amplify", m=float("inf"))
    with pytest.raises(ValueError, match="linear=True"):
        normlab.apply(nn.Sequential(nn.Linear(4, 4)), "msr")
    mlp = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    normlab.apply(mlp, "msr", linear=True)
    assert mlp[0].weight.sum(1).abs().max() < 1e-6


def test_ws_plus_msr_constrains_the_raw_weights():
    torch.manual_seed(0)
    model = tiny(bn=True)
    handle = normlab.apply(model, "ws+msr")
    assert parametrize.is_parametrized(model[0])
    train(model, handle, torch.optim.Adam(model.parameters(), lr=1e-2), 10)
    assert worst_mean(model) < 1e-6  # the standardized weights (zero-mean originals stay zero-mean)
    raw = model[0].parametrizations.weight.original.detach()
    assert slice_means(raw).abs().max() < 1e-6
