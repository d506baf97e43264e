"""normlab.methods.fold: folding batch-statistics layers into the preceding conv/linear."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

import normlab
from normlab.methods.fold import FoldReport, fold, fold_report
from normlab.methods.std_loss import ChannelAffine, _Probe

torch.set_num_threads(1)

HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs",
         "_backward_hooks", "_backward_pre_hooks")


class MeanAbsNorm(nn.Module):
    """Test-local layer with the folding protocol: per-channel mean-absolute-deviation norm.

    Train: batch mean and mean |x - mu|, running averages updated; eval:
    ``y = (x - running_mean) / running_mad * weight + bias``.
    """

    def __init__(self, num_features: int, momentum: float = 0.3) -> None:
        super().__init__()
        self.num_features, self.momentum = num_features, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_mad", torch.ones(num_features))

    def forward(self, x):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        dims = [d for d in range(x.dim()) if d != 1]
        if self.training:
            mu = x.mean(dims)
            mad = (x - mu.view(shape)).abs().mean(dims)
            if bool(mad.min() > 0):  # data-dependent: fx can only treat the layer as a leaf
                with torch.no_grad():
                    self.running_mean.lerp_(mu, self.momentum)
                    self.running_mad.lerp_(mad, self.momentum)
        else:
            mu, mad = self.running_mean, self.running_mad
        return (x - mu.view(shape)) / mad.view(shape) * self.weight.view(shape) + self.bias.view(shape)

    def eval_affine(self):
        scale = self.weight / self.running_mad
        return scale, self.bias - self.running_mean * scale


class UnitNorm(nn.Module):
    """Test parametrization: ``W[o] / ||W[o]|| * 1.5``."""

    def forward(self, w):
        return 1.5 * w / w.flatten(1).norm(dim=1).view(-1, *([1] * (w.dim() - 1)))


def warm_up(model: nn.Module, shape, steps: int = 5) -> None:
    """A few SGD steps in train mode so that affine params and running stats are non-trivial."""
    torch.manual_seed(1)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        x = torch.randn(*shape) * 2 + 0.7
        loss = model(x).pow(2).mean() + model(x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def assert_equivalent(model: nn.Module, folded: nn.Module, x: torch.Tensor) -> None:
    model.eval()
    with torch.no_grad():
        ref, out = model(x), folded(x)
    err = float((out - ref).abs().max() / ref.abs().max())
    assert err <= 1e-5, err


def assert_clean(folded: nn.Module, allowed=()) -> None:
    for name, m in folded.named_modules():
        assert not m.training, name
        assert not parametrize.is_parametrized(m), name
        assert not isinstance(m, _Probe), name
        if not isinstance(m, allowed):
            assert not isinstance(m, (_BatchNorm, ChannelAffine, MeanAbsNorm)), name
            assert not hasattr(m, "eval_affine"), name
        for attr in HOOKS:
            assert not getattr(m, attr), (name, attr)


def bn_variant(kind: str, c: int, dims: int) -> nn.Module:
    cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    if kind == "affine":
        return cls(c)
    if kind == "no_affine":
        return cls(c, affine=False)
    return normlab.norm_layer("bn_shift", c, dims)  # weight None, learnable shift


@pytest.mark.parametrize("kind", ["affine", "shift_only", "no_affine"])
@pytest.mark.parametrize("dims,bias", [(2, False), (2, True), (1, True), (3, False)])
def test_conv_bn(kind, dims, bias):
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    model = nn.Sequential(conv(3, 6, 3, bias=bias), bn_variant(kind, 6, dims), nn.ReLU(),
                          conv(6, 5, 1, bias=bias), bn_variant(kind, 5, dims))
    shape = (8, 3) + (7,) * dims
    warm_up(model, shape)
    if kind == "shift_only":
        assert model[1].weight is None
    assert model[1].running_var.sub(1).abs().max() > 0.1  # the running stats are not trivial
    folded = fold(model)
    assert_equivalent(model, folded, torch.randn(*shape) * 2 + 0.7)
    assert_clean(folded)
    assert folded[0].bias is not None and folded[3].bias is not None
    assert isinstance(folded[1], nn.Identity) and isinstance(folded[4], nn.Identity)


def test_linear_bn1d_and_reference_formula():
    model = nn.Sequential(nn.Linear(5, 7, bias=False), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3), nn.BatchNorm1d(3))
    warm_up(model, (16, 5))
    folded = fold(model)
    assert_equivalent(model, folded, torch.randn(32, 5))
    lin, bn = model[0], model[1]  # reference: W' = W * g / sqrt(v + eps), b' = beta - m * g / sqrt(v + eps)
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(folded[0].weight, lin.weight * s[:, None])
    torch.testing.assert_close(folded[0].bias, bn.bias - bn.running_mean * s)
    assert_clean(folded)


def test_a_norm_after_a_linear_on_a_sequence_is_guarded_or_kept():
    # Linear on (N, L, F) acts on F, BatchNorm1d(L) on dim 1: nothing to fold, though the sizes match.
    model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3))
    warm_up(model, (8, 4, 6))
    x = torch.randn(5, 4, 6)
    with pytest.raises(AssertionError, match=r"'1' was folded into the Linear '0'.*fold\(model, example=x\)"):
        fold(model)(x)  # without an example: folded as for (N, C), behind a guard, never silently wrong
    with pytest.warns(UserWarning, match="after the Linear 0, whose output on the example has 3 dims"):
        kept = fold(model, example=x)
    assert isinstance(kept[1], nn.BatchNorm1d) and "1" in fold_report(model, example=(x,)).kept
    assert_equivalent(model, kept, x)
    with pytest.raises(ValueError, match="example: the model did not run on it"):
        fold(model, example=torch.randn(5, 7))


def test_a_norm_after_a_linear_on_n_c_folds_with_or_without_an_example():
    model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3))
    warm_up(model, (16, 6))
    x = torch.randn(9, 6)
    for folded in (fold(model), fold(model, example=x)):
        assert isinstance(folded[1], nn.Identity)
        assert_equivalent(model, folded, x)
        assert_equivalent(model, torch.fx.symbolic_trace(folded), x)  # the guard traces
        assert_clean(folded)


def test_conv_channel_affine_and_std_loss_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3), nn.BatchNorm2d(4),
                          nn.ReLU(), nn.Flatten(), nn.Linear(36, 3))
    handle = normlab.apply(model, "std_loss", affine=True)
    assert isinstance(model[1], ChannelAffine)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ChannelAffine):
                m.weight.uniform_(0.5, 2.0)
                m.bias.normal_()
    assert any(m._forward_hooks for m in model.modules())
    folded = fold(model)
    assert_equivalent(model, folded, torch.randn(4, 3, 7, 7))
    assert_clean(folded)
    assert fold_report(model).folded == {"1": "0", "4": "3"}
    handle.remove()

    plain = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(150, 3))
    normlab.apply(plain, "std_loss")
    assert isinstance(plain[1], _Probe)
    folded = fold(plain)
    assert_equivalent(plain, folded, torch.randn(4, 3, 7, 7))
    assert_clean(folded)
    assert fold_report(plain).probes == ["1"]


def test_eval_affine_layer_and_parametrized_weight():
    model = nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), MeanAbsNorm(6), nn.ReLU(),
                          nn.Conv2d(6, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 1), MeanAbsNorm(4))
    parametrize.register_parametrization(model[3], "weight", UnitNorm())
    parametrize.register_parametrization(model[6], "weight", UnitNorm())
    warm_up(model, (8, 3, 9, 9))
    assert model[1].running_mad.sub(1).abs().max() > 0.05
    folded = fold(model)
    assert_equivalent(model, folded, torch.randn(4, 3, 9, 9) * 2 + 0.7)
    assert_clean(folded)
    report = fold_report(model)
    assert report.folded == {"1": "0", "4": "3", "7": "6"}
    assert report.baked == ["3.weight", "6.weight"]
    assert type(folded[3]) is nn.Conv2d and isinstance(folded[3].weight, nn.Parameter)


def test_legacy_weight_norm_is_baked():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nn.utils.weight_norm(model[0])
    warm_up(model, (8, 3, 6, 6))
    folded = fold(model)
    assert_equivalent(model, folded, torch.randn(4, 3, 6, 6))
    assert_clean(folded)
    assert not hasattr(folded[0], "weight_g")


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1, gn: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.GroupNorm(2, cout) if gn else nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.down(x))


class ResNetish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layers = nn.Sequential(Block(8, 8), nn.Sequential(Block(8, 16, 2, gn=True), Block(16, 16)))
        self.post = nn.BatchNorm2d(16)       # after a residual add: nothing to fold into
        self.tap = nn.Conv2d(16, 16, 1)
        self.tap_bn = nn.BatchNorm2d(16)     # the conv output is also used elsewhere
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.post(self.layers(self.stem(x)))
        t = self.tap(x)
        x = self.tap_bn(t) + t
        return self.head(x.mean((2, 3)))


def test_resnet_style_folds_what_it_can_and_reports_the_rest():
    torch.manual_seed(0)
    model = ResNetish()
    warm_up(model, (4, 3, 8, 8))
    before = copy.deepcopy(model.state_dict())
    with pytest.warns(UserWarning, match=r"layers\.1\.0\.bn1 \(GroupNorm"):
        folded = fold(model)
    assert_equivalent(model, folded, torch.randn(4, 3, 8, 8) + 0.5)
    report = fold_report(model)
    assert isinstance(report, FoldReport) and report.tracer == "fx"
    assert report.folded == {
        "stem.1": "stem.0", "layers.0.bn1": "layers.0.conv1", "layers.0.bn2": "layers.0.conv2",
        "layers.1.0.bn2": "layers.1.0.conv2", "layers.1.0.down.1": "layers.1.0.down.0",
        "layers.1.1.bn1": "layers.1.1.conv1", "layers.1.1.bn2": "layers.1.1.conv2",
    }
    assert set(report.kept) == {"layers.1.0.bn1", "post", "tap_bn"}
    assert "not directly after" in report.kept["post"]
    assert "other users" in report.kept["tap_bn"]
    assert "GroupNorm" in str(report)
    assert_clean(folded, allowed=(nn.GroupNorm, nn.BatchNorm2d))
    kept_types = {n: type(m).__name__ for n, m in folded.named_modules() if isinstance(m, (nn.GroupNorm, _BatchNorm))}
    assert kept_types == {"layers.1.0.bn1": "GroupNorm", "post": "BatchNorm2d", "tap_bn": "BatchNorm2d"}
    # the input model is untouched (weights, stats, structure)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(model.stem[1], nn.BatchNorm2d) and model.stem[0].bias is None


def test_fallback_to_sequential_when_tracing_fails():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3),
                                      nn.Identity(), nn.BatchNorm2d(4), nn.BatchNorm2d(4))
            self.other = nn.BatchNorm2d(4)

        def forward(self, x):
            x = self.body(x)
            return self.other(x) if x.sum() > 0 else x  # data-dependent: fx cannot trace this

    model = Branchy()
    warm_up(model, (8, 3, 8, 8))
    with pytest.warns(UserWarning, match="other"):
        folded = fold(model)
    torch.manual_seed(3)
    assert_equivalent(model, folded, torch.randn(4, 3, 8, 8) + 1.0)
    report = fold_report(model)
    assert report.tracer == "sequential"
    assert report.folded == {"body.1": "body.0", "body.5": "body.3", "body.6": "body.3"}
    assert list(report.kept) == ["other"]


def test_inplace_and_input_model_untouched():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    parametrize.register_parametrization(model[0], "weight", UnitNorm())
    hook = model[2].register_forward_hook(lambda *a: None)
    model.train()
    state = copy.deepcopy(model.state_dict())
    folded = fold(model)
    assert folded is not model
    assert model.training and isinstance(model[1], nn.BatchNorm2d)
    assert parametrize.is_parametrized(model[0]) and model[2]._forward_hooks
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    hook.remove()
    same = fold(model, inplace=True)
    assert same is model and isinstance(model[1], nn.Identity) and not model.training
    assert_clean(model)


def test_shared_conv_and_untracked_bn_stay():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.bn = nn.BatchNorm2d(3)
            self.live = nn.BatchNorm2d(3, track_running_stats=False)
            self.conv2 = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.bn(self.conv(self.conv(x))) + self.live(self.conv2(x))

    model = Shared()
    warm_up(model, (4, 3, 6, 6))
    with pytest.warns(UserWarning):
        folded = fold(model)
    report = fold_report(model)
    assert report.folded == {}
    assert "called 2 times" in report.kept["bn"]
    assert "batch statistics" in report.kept["live"]
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(folded(x), model.eval()(x))


def test_identity_chains_grouped_and_transposed_convs():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 6, 3, groups=2, bias=False)
            self.skip = nn.Identity()
            self.bn_a = nn.BatchNorm2d(6)
            self.bn_b = MeanAbsNorm(6)  # two norms in a row: both fold into conv
            self.up = nn.ConvTranspose2d(6, 4, 2, stride=2, groups=2)
            self.bn_up = nn.BatchNorm2d(4)

        def forward(self, x):
            x = torch.relu(self.bn_b(self.bn_a(self.skip(self.conv(x)))))
            return self.bn_up(self.up(x))

    model = Net()
    warm_up(model, (8, 4, 7, 7))
    folded = fold(model)
    assert_equivalent(model, folded, torch.randn(4, 4, 7, 7) + 0.5)
    assert fold_report(model).folded == {"bn_a": "conv", "bn_b": "conv", "bn_up": "up"}
    assert_clean(folded)


# --- layers of the other normlab method modules --------------------------------------------------

def test_weight_standardization_is_baked_and_bn_folded():
    from normlab.methods.ws import WSConv2d

    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), WSConv2d(6, 4, 3, bias=False),
                          nn.BatchNorm2d(4))
    handle = normlab.apply(model, "ws", modules=["0"])
    assert parametrize.is_parametrized(model[0]) and parametrize.is_parametrized(model[3])
    warm_up(model, (8, 3, 8, 8))
    folded = fold(model)
    assert_equivalent(model, folded, torch.randn(4, 3, 8, 8))
    assert_clean(folded)
    assert fold_report(model).baked == ["0.weight", "3.weight"]
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model(x), model(x))  # the input model still works, still standardized
    assert parametrize.is_parametrized(model[0])
    handle.remove()


def bn_net() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3),
                         nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(36, 6), nn.BatchNorm1d(6),
                         nn.ReLU(), nn.Linear(6, 3))


@pytest.mark.parametrize("spec,types", [("l1bn", ("L1BatchNorm2d", "L1BatchNorm1d")),
                                        ("topkbn", ("TopKBatchNorm2d", "TopKBatchNorm1d")),
                                        ("linfbn", ("TopKBatchNorm2d", "TopKBatchNorm1d")),
                                        ("estbn", ("EstimatedBatchNorm2d", "EstimatedBatchNorm1d"))])
def test_batch_statistics_norms_fold(spec, types):
    model = bn_net()
    normlab.apply(model, spec)
    assert (type(model[1]).__name__, type(model[8]).__name__) == types
    warm_up(model, (16, 3, 7, 7))
    assert model[1].running_var.sub(1).abs().max() > 0.05
    folded = fold(model)
    assert_equivalent(model, folded, torch.randn(8, 3, 7, 7) * 2 + 0.7)
    assert_clean(folded)
    assert fold_report(model).folded == {"1": "0", "4": "3", "8": "7"}


@pytest.mark.parametrize("spec,kept_type", [("bcn", "BatchChannelNorm"), ("gn", "GroupNorm"), ("ln", "LayerNorm")])
def test_group_style_norms_stay_and_are_reported(spec, kept_type):
    from normlab.methods.bcn import BatchChannelNorm2d
    from normlab.methods.groupnorm import GroupNorm2d

    model = bn_net()
    normlab.apply(model, spec, **({"num_groups": 2} if spec != "ln" else {}))
    assert isinstance(model[1], BatchChannelNorm2d if spec == "bcn" else GroupNorm2d)
    warm_up(model, (16, 3, 7, 7))
    with pytest.warns(UserWarning, match="could not be folded"):
        folded = fold(model)
    assert_equivalent(model, folded, torch.randn(8, 3, 7, 7) * 2 + 0.7)
    report = fold_report(model)
    assert report.folded == {} and set(report.kept) == {"1", "4", "8"}
    assert all(kept_type in why for why in report.kept.values()), report.kept
    assert type(folded[1]) is type(model[1])


@pytest.mark.parametrize("spec", ["bwn", "nf"])
def test_weight_parametrization_methods_are_baked(spec):
    model = bn_net()
    normlab.apply(model, spec)
    assert parametrize.is_parametrized(model[0])
    warm_up(model, (16, 3, 7, 7))
    folded = fold(model)
    assert_equivalent(model, folded, torch.randn(8, 3, 7, 7) * 2 + 0.7)
    assert_clean(folded)
    report = fold_report(model)
    assert report.baked[:3] == ["0.weight", "3.weight", "7.weight"] and not report.kept
    assert report.folded == ({"1": "0", "4": "3", "8": "7"} if spec == "bwn" else {})


def test_tied_weights_and_aliased_norms_are_kept_not_folded_wrongly():
    class Tied(nn.Module):
        def __init__(self, tie: str):
            super().__init__()
            self.c1, self.c2, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
            setattr(self.c2, tie, getattr(self.c1, tie))

        def forward(self, x):
            return self.bn(self.c1(x)) + self.c2(x)

    class Aliased(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
            self.blocks = nn.ModuleList([self.bn])

        def forward(self, x):
            return self.blocks[0](self.c(x))

    for model, why in ((Tied("weight"), "c1 shares a parameter"), (Tied("bias"), "c1 shares a parameter"),
                       (Aliased(), "bn is reachable under 2 names (bn, blocks.0)")):
        warm_up(model, (4, 3, 6, 6))
        with pytest.warns(UserWarning, match="could not be folded"):
            folded = fold(model)
        assert fold_report(model).folded == {} and why in fold_report(model).kept["bn"]
        x = torch.randn(2, 3, 6, 6)
        torch.testing.assert_close(folded(x), model.eval()(x))
    seq = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1))
    seq[2].weight = seq[0].weight
    assert "0 shares a parameter" in fold_report(seq).kept["1"]


def test_a_model_that_is_a_norm_layer_is_reported_kept():
    bn = nn.BatchNorm2d(3)
    assert list(fold_report(bn).kept) == [""]
    with pytest.warns(UserWarning, match=r"\(the model\) \(the model itself is the normalization layer"):
        assert isinstance(fold(bn), nn.BatchNorm2d)
    with pytest.raises(ValueError, match="never the model itself, which is a BatchNorm2d: wrap it"):
        normlab.apply(nn.BatchNorm2d(3), "l1bn")
