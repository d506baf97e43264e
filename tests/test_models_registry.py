import pytest
import torch
from torch import nn

import normlab
from normlab import models
from normlab.methods.registry import swap_norms


def test_cnn_shapes_and_norm_choice():
    for norm, cls in (("bn", nn.BatchNorm2d), ("bn_shift", nn.BatchNorm2d), ("none", nn.Identity)):
        m = models.cnn(norm=norm)
        assert sum(isinstance(x, cls) for x in m.modules()) >= 3
        assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    convs = [x for x in models.cnn().modules() if isinstance(x, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 16, 8] and all(c.stride == (2, 2) for c in convs)
    assert models.cnn(kernel_size=5)[0].kernel_size == (5, 5)
    shift = models.cnn(norm="bn_shift")[1]
    assert shift.weight is None and shift.bias is not None


def test_mlp_and_factory_norm():
    m = models.mlp(norm=lambda nf, dims: nn.LayerNorm(nf))
    assert sum(isinstance(x, nn.LayerNorm) for x in m.modules()) == 3
    assert m(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert [x.out_features for x in m.modules() if isinstance(x, nn.Linear)] == [100, 100, 100, 10]


def test_glorot_init_bounds_and_zero_bias():
    torch.manual_seed(0)
    for m in (models.cnn(init="glorot"), models.mlp(init="glorot")):
        layers = [x for x in m.modules() if isinstance(x, (nn.Conv2d, nn.Linear))]
        for layer in layers:
            w = layer.weight
            fan_in, fan_out = w[0].numel(), w.shape[0] * w[0][0].numel()
            bound = (6 / (fan_in + fan_out)) ** 0.5
            assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound  # U(-b, b), near-filled
            assert torch.count_nonzero(layer.bias) == 0
    torch.manual_seed(0)
    default = models.cnn()
    assert torch.count_nonzero(default[0].bias) == 32  # PyTorch's own init is left alone
    with pytest.raises(ValueError, match="init must be one of"):
        models.mlp(init="he")


def test_model_errors():
    with pytest.raises(ValueError, match="odd"):
        models.cnn(kernel_size=4)
    with pytest.raises(ValueError, match="available"):
        models.build("resnet")
    with pytest.raises(ValueError, match="not a normalization layer"):
        models.cnn(norm="std_loss")


def test_methods_subpackage_is_not_shadowed():
    # The listing is list_methods(); normlab.methods stays the subpackage, so its modules are attributes.
    import types

    import normlab.methods.msr

    assert isinstance(normlab.methods, types.ModuleType)
    assert normlab.methods.msr is normlab.methods.__dict__["msr"]


def test_registry_lists_and_rejects_clearly():
    names = normlab.list_methods()
    assert {"none", "bn", "bn_shift", "std_loss"} <= set(names)
    assert all(isinstance(d, str) and d for d in names.values())
    with pytest.raises(ValueError, match="unknown method 'bogus'; available"):
        normlab.apply(models.cnn(), "bogus")
    with pytest.raises(ValueError, match="combines"):
        normlab.apply(models.cnn(), "bn+std_loss")
    with pytest.raises(TypeError, match="unknown option"):
        normlab.apply(models.cnn(), "std_loss", wieght=1.0)
    with pytest.raises(ValueError, match="has none"):
        normlab.apply(models.cnn(norm="none"), "bn")
    with pytest.raises(TypeError, match="nn.Module"):
        normlab.apply("model", "bn")


def test_swap_finds_nested_norms_and_keeps_channels():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Sequential(nn.BatchNorm2d(4), nn.ModuleList([nn.BatchNorm1d(6)])))
    handle = normlab.apply(model, "bn_shift")
    assert handle.swapped == ["1.0", "1.1.0"]
    assert model[1][0].num_features == 4 and model[1][1][0].num_features == 6
    assert isinstance(model[1][1][0], nn.BatchNorm1d) and model[1][0].weight is None
    normlab.apply(model, "none")
    assert isinstance(model[1][0], nn.Identity)


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def resnet():
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Sequential(Block(32), Block(32)), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(32, 10))


@pytest.mark.parametrize("spec", sorted(normlab.list_methods()) + ["ws+gn", "std_loss+msr", "l1bn+bwn", "none+msr"])
def test_every_method_converts_a_resnet_style_model_forward_and_backward(spec):
    model = resnet()
    handle = normlab.apply(model, spec)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(x), y) + handle.aux_loss()
        opt.zero_grad()
        loss.backward()
        handle.before_step()
        opt.step()
        handle.after_step()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    from normlab.methods.registry import get_method

    norm_methods = [p for p in spec.split("+") if get_method(p).kind == "norm"]
    if norm_methods and norm_methods[0] not in ("bn", "bn_shift"):  # every BN replaced, none left over
        assert not [m for m in model.modules() if type(m) is nn.BatchNorm2d], f"{spec} left BatchNorm2d layers"
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (4, 10)


def test_swap_norms_replaces_every_alias_and_subclasses_and_is_all_or_nothing():
    class Aliased(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.bn = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)
            self.blocks = nn.ModuleList([self.bn])

        def forward(self, x):
            return self.blocks[0](self.c(x))

    model = Aliased()
    assert normlab.apply(model, "gn").swapped == ["bn"]
    assert model.bn is model.blocks[0] and type(model.blocks[0]).__name__ == "GroupNorm2d"

    class MyBN(nn.BatchNorm2d):
        pass

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3), MyBN(4))
    assert normlab.apply(model, "l1bn").swapped == ["1", "3"]
    assert type(model[3]).__name__ == "L1BatchNorm2d"

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6))
    with pytest.raises(ValueError, match=r"cannot replace 3 \(BatchNorm2d\)"):
        swap_norms(model, lambda nf, dims: nn.GroupNorm(4, nf))  # 6 channels, 4 groups
    assert type(model[1]) is nn.BatchNorm2d  # nothing replaced


@pytest.mark.parametrize("name", ["bn", "bn_shift"])
def test_batch_norm_options_are_checked_like_the_other_norms(name):
    for bad, says in (({"momentum": 2.0}, "momentum must be in"), ({"momentum": 0}, "momentum must be in"),
                      ({"eps": 0}, "eps must be")):
        with pytest.raises(ValueError, match=says):
            normlab.norm_layer(name, 8, 2, **bad)
    assert normlab.norm_layer(name, 8, 2, momentum=None).momentum is None


@pytest.mark.parametrize("spec, options", [
    ("bn_shift+msr", {"m": -1.0}),  # the shift-only swap done, then msr rejects m
    ("std_loss+ws", {"ws.eps": -1.0}),  # BN layers replaced and hooks attached, then ws rejects eps
    ("ws+bwn", {"p": "x"}),  # a parametrization registered, then bwn rejects p
    ("ws+bwn+msr", {"m": -1.0}),  # two parametrizations stacked (bwn's remover would refuse to bake)
])
def test_apply_is_all_or_nothing(spec, options):
    torch.manual_seed(0)
    model = models.cnn(norm="bn").eval().to(memory_format=torch.channels_last)
    weights = [model[0].weight, model[3].weight]
    x = torch.randn(4, 1, 28, 28)
    before_out = model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    classes = [type(m) for m in model.modules()]
    with pytest.raises(ValueError):
        normlab.apply(model, spec, **options)
    assert [type(m) for m in model.modules()] == classes
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in model.modules())
    assert torch.equal(model(x), before_out)
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)  # same storage
    # The same model can be passed again, and converts as a fresh one does.
    handle = normlab.apply(model, spec.split("+")[0])
    assert handle.swapped == normlab.apply(models.cnn(norm="bn"), spec.split("+")[0]).swapped


def test_apply_takes_models_with_uninitialized_lazy_layers():
    model = nn.Sequential(nn.LazyConv2d(8, 3), nn.BatchNorm2d(8), nn.ReLU())
    with pytest.raises(ValueError):
        normlab.apply(model, "bn_shift+msr", m=-1.0)  # rolled back without touching the lazy weight
    assert model[1].weight is not None
    assert normlab.apply(model, "gn").swapped == ["1"]
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 8, 6, 6)


def test_apply_rollback_keeps_a_users_parametrization_working():
    from torch.nn.utils import parametrize

    class Abs(nn.Module):
        def forward(self, b):
            return b.abs()

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    parametrize.register_parametrization(model[0], "bias", Abs())  # the conv's class is now its own
    x = torch.randn(2, 1, 8, 8)
    before = model(x)
    with pytest.raises(ValueError):
        normlab.apply(model, "ws+bwn", p="x")  # ws adds a weight property to that class
    assert "weight" not in vars(type(model[0]))
    assert torch.equal(model(x), before)


def test_apply_rollback_names_values_it_could_not_put_back(monkeypatch):
    from normlab.methods import registry

    def scale_then(handle, **options):
        with torch.no_grad():
            handle.model[0].weight.mul_(2)  # an in-place write, not declared with writes_weights

    def fail(handle, **options):
        raise ValueError("second part fails")

    monkeypatch.setitem(registry._METHODS, "_scale", registry.Method("_scale", "", "weight", scale_then))
    monkeypatch.setitem(registry._METHODS, "_fail", registry.Method("_fail", "", "step", fail))
    model = models.cnn(norm="bn")
    with pytest.raises(ValueError, match="second part fails") as info:
        normlab.apply(model, "_scale+_fail")
    assert any("['0.weight']" in note and "stay changed" in note for note in info.value.__notes__)


def test_group_norms_never_split_n_c_input_into_one_feature_groups():
    torch.manual_seed(0)
    x = torch.randn(5, 10)
    for norm in ("gn", "bcn"):
        m = models.mlp(norm=norm, in_features=10, hidden=(16, 16)).eval()  # dims 0: 8 groups of 2
        assert m[2].num_groups == 8
        assert (m(x) - m(torch.randn(5, 10))).abs().max() > 1e-2  # the output depends on the input
        swapped = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4)).eval()
        normlab.apply(swapped, norm)  # BatchNorm1d takes (N, C) or (N, C, L): groups of 2 suit both
        assert swapped[1].num_groups == 8
        assert (swapped(x) - swapped(torch.randn(5, 10))).abs().max() > 1e-2
        assert swapped[1](torch.randn(5, 16, 3)).shape == (5, 16, 3)
        one_each = type(swapped[1])(16, num_groups=16).eval()  # asked for explicitly: refused on (N, C)
        with pytest.raises(ValueError, match="output would be the bias alone"):
            one_each(torch.randn(5, 16))
        assert one_each(torch.randn(5, 16, 3)).shape == (5, 16, 3)  # (N, C, L) is fine


def test_none_and_nf_strip_every_normalization_layer():
    def model():
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(4, 8), nn.Conv2d(8, 8, 3), nn.SyncBatchNorm(8),
                             nn.Conv2d(8, 8, 1), nn.InstanceNorm2d(8), nn.LayerNorm([8, 4, 4]))

    for spec in ("none", "nf"):
        m = model()
        assert normlab.apply(m, spec).swapped == ["1", "3", "5", "6"]
        assert not any(isinstance(x, (nn.GroupNorm, nn.SyncBatchNorm, nn.InstanceNorm2d, nn.LayerNorm))
                       for x in m.modules())
    lazy = nn.Sequential(nn.Conv2d(3, 8, 3), nn.LazyBatchNorm2d())
    with pytest.raises(TypeError, match="run one forward pass"):
        normlab.apply(lazy, "gn")
    assert normlab.apply(lazy, "none").swapped == ["1"]


def test_a_norm_inside_a_registered_norm_is_replaced_with_it_not_from_within():
    from normlab.methods.registry import _NORM_TYPES, register_norm_type, strip_norms

    class BNThenScale(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.num_features, self.bn, self.scale = c, nn.BatchNorm2d(c), nn.Parameter(torch.ones(c))

        def forward(self, x):
            return self.bn(x) * self.scale.view(1, -1, 1, 1)

    register_norm_type(BNThenScale, 2)
    try:
        m = nn.Sequential(nn.Conv2d(3, 4, 3), BNThenScale(4))
        assert normlab.apply(m, "l1bn").swapped == ["1"]
        assert not list(m[1].children()) and "1.bn.weight" not in m.state_dict()
        shared = BNThenScale(4)
        m = nn.Sequential(nn.Conv2d(3, 4, 3), shared)
        m.alias = shared
        assert strip_norms(m) == ["1"]
        assert type(m.alias) is nn.Identity and not list(m.alias.children())
    finally:
        del _NORM_TYPES[BNThenScale]


def test_a_norm_without_tensors_is_replaced_in_the_models_dtype():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False, track_running_stats=False)).double()
    normlab.apply(m, "l1bn")
    assert m[1].weight.dtype == torch.float64
    assert m(torch.randn(2, 3, 5, 5, dtype=torch.float64)).dtype == torch.float64


def test_weight_methods_refuse_transposed_convs_and_stacked_ones_remove_cleanly():
    from torch.nn.utils import parametrize

    for spec in ("ws", "bwn"):
        with pytest.raises(ValueError, match="ConvTranspose2d stores its weight as"):
            normlab.apply(nn.Sequential(nn.ConvTranspose2d(4, 6, 3), nn.BatchNorm2d(6)), spec, modules=["0"])
    for spec in ("ws+bwn", "bwn+ws", "nf+bwn"):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()
        handle = normlab.apply(m, spec)
        x = torch.randn(2, 3, 8, 8)
        y = m(x)
        handle.remove()  # bakes the stack from its first parametrization
        assert not any(parametrize.is_parametrized(mod) for mod in m.modules())
        torch.testing.assert_close(m(x), y)


@pytest.mark.parametrize("name", ["bn", "bn_shift", "gn", "ln", "l1bn", "topkbn", "bcn", "estbn"])
def test_norm_layers_refuse_non_finite_eps_and_no_features(name):
    for eps in (-1.0, float("inf"), float("nan"), True):
        with pytest.raises(ValueError, match="eps must be a finite number > 0"):
            normlab.norm_layer(name, 8, 2, eps=eps)
    with pytest.raises(ValueError, match="num_features must be a positive int"):
        normlab.norm_layer(name, 0, 2)


def test_module_lists_and_noise_are_checked_by_name():
    with pytest.raises(TypeError, match="agc: head: pass a module, a qualified name, or a list of them; got int"):
        normlab.apply(models.cnn(norm="bn"), "agc", head=5)
    with pytest.raises(ValueError, match="noise must be a finite number"):
        normlab.apply(models.cnn(norm="bn"), "msr", noise=float("inf"))
    m = models.cnn(norm="bn")
    normlab.apply(m, "ws", modules=(name for name in ("0", "3")))  # any iterable of names


@pytest.mark.parametrize("name", ["bcn", "estbn", "gn", "ln", "l1bn", "topkbn"])
def test_norm_layers_name_a_non_float_input(name):
    with pytest.raises(TypeError, match="normalizes floating-point tensors, got torch.int64"):
        normlab.norm_layer(name, 4, 2)(torch.ones(4, 4, 3, 3, dtype=torch.long))
