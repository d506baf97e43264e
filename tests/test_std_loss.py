import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normlab
from normlab import StandardizationLoss, models
from normlab.functional import standardization_kl


def net():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5),
                         nn.ReLU(), nn.Linear(5, 3))


def test_default_probes_every_conv_and_linear_but_the_head():
    loss = StandardizationLoss(net())
    assert [name for name, _ in loss.modules] == ["0", "3"]


def test_value_is_weighted_sum_of_per_layer_kl_of_outputs():
    model = net()
    x = torch.randn(16, 1, 6, 6)
    with StandardizationLoss(model, weight=0.5) as std:
        model(x)
        value = std()
        terms = std.terms()
    z1 = model[0](x)
    z2 = model[3](model[2](model[1](z1)))
    expected = {"0": standardization_kl(z1).item(), "3": standardization_kl(z2).item()}
    assert terms == pytest.approx(expected, rel=1e-5)
    assert value.item() == pytest.approx(0.5 * sum(expected.values()), rel=1e-5)


def test_explicit_modules_by_name_and_object_and_mean_reduction():
    model = net()
    x = torch.randn(8, 1, 6, 6)
    std = StandardizationLoss(model, modules=["0", model[3]], reduction="mean")
    model(x)
    with torch.no_grad():
        z1 = model[0](x)
    assert std.terms() == {}  # terms are those of the last call, and there was none yet
    value = std()
    assert std.terms()["0"] == pytest.approx(standardization_kl(z1, reduction="mean").item(), rel=1e-5)
    assert value.item() > 0


def test_gradient_flows_to_parameters():
    model = net()
    with StandardizationLoss(model) as std:
        model(torch.randn(8, 1, 6, 6))
        std().backward()
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0
    assert model[5].weight.grad is None  # the head is not probed and the task loss was not used


def test_nothing_recorded_in_eval_or_no_grad():
    model = net()
    std = StandardizationLoss(model)
    model.eval()
    model(torch.randn(4, 1, 6, 6))
    assert std._pending == [] and std().item() == 0.0
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 1, 6, 6))
    assert std._pending == []
    with torch.inference_mode():
        model(torch.randn(4, 1, 6, 6))
    assert std._pending == []


def test_each_call_consumes_its_terms():
    model = net()
    std = StandardizationLoss(model)
    model(torch.randn(4, 1, 6, 6))
    assert std().item() > 0
    assert std().item() == 0.0


def test_remove_leaves_no_trace():
    model = net()
    x = torch.randn(4, 1, 6, 6)
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    before_out = model(x)
    with StandardizationLoss(model) as std:
        model(x)
        std()
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
    after = model.state_dict()
    assert after.keys() == before_state.keys()
    assert all(torch.equal(after[k], before_state[k]) for k in after)
    torch.testing.assert_close(model(x), before_out)


def test_bad_arguments():
    with pytest.raises(TypeError, match="nn.Module"):
        StandardizationLoss("model")
    for weight in (-1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="weight must be a finite number"):
            StandardizationLoss(net(), weight=weight)
    with pytest.raises(ValueError, match="reduction"):
        StandardizationLoss(net(), reduction="none")
    with pytest.raises(ValueError, match="no submodule 'nope'"):
        StandardizationLoss(net(), modules=["nope"])
    with pytest.raises(ValueError, match="not a submodule"):
        StandardizationLoss(net(), modules=[nn.Linear(2, 2)])
    model = net()
    with pytest.raises(ValueError, match="module '0' is listed twice"):
        StandardizationLoss(model, modules=["0", model[0]])
    with pytest.raises(ValueError, match="besides the classifier head"):
        StandardizationLoss(nn.Sequential(nn.Linear(3, 2)))


def test_batch_of_one_on_linear_layer_is_a_clear_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    std = StandardizationLoss(model)
    model(torch.randn(1, 4))
    with pytest.raises(ValueError, match="undefined"):
        std()


def test_method_swaps_norms_for_probes_and_records_their_inputs():
    model = models.cnn(norm="bn")
    handle = normlab.apply(model, "std_loss", weight=2.0)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert handle.swapped == ["1", "4", "7"]
    x = torch.randn(8, 1, 28, 28)
    model(x)
    value = handle.aux_loss()
    z1 = model[0](x)
    assert handle.state["std_loss"].terms()["1"] == pytest.approx(standardization_kl(z1).item(), rel=1e-5)
    assert value.item() == pytest.approx(2.0 * sum(handle.state["std_loss"].terms().values()), rel=1e-5)
    handle.remove()
    model(x)
    assert handle.aux_loss().item() == 0.0


def test_probes_report_without_hooks_and_a_second_loss_or_a_copy_is_handled():
    import copy

    model = models.cnn(norm="bn")
    handle = normlab.apply(model, "std_loss")
    probes = [m for m in model.modules() if type(m).__name__ == "_Probe"]
    assert len(probes) == 3 and all(p.report is not None and not p._forward_hooks for p in probes)
    x = torch.randn(8, 1, 28, 28)
    # a second loss on the same probes takes forward hooks, and both see every layer
    with StandardizationLoss(model, modules=["1", "4", "7"], record="input") as second:
        assert all(len(p._forward_hooks) == 1 for p in probes)
        model(x)
        torch.testing.assert_close(second(), handle.aux_loss())
    twin = copy.deepcopy(model)
    twin(x * 10)  # a copy's probes hold the same report, which ignores them
    assert handle.aux_loss().item() == 0.0
    model(x)
    want = handle.aux_loss()
    assert want.item() > 0
    handle.state["std_loss"].remove()
    assert all(p.report is None and not p._forward_hooks for p in probes)
    model(x)
    assert handle.state["std_loss"]().item() == 0.0


def test_method_affine_and_model_without_norms():
    model = models.cnn(norm="bn")
    handle = normlab.apply(model, "std_loss", affine=True)
    from normlab.methods.std_loss import ChannelAffine

    assert sum(isinstance(m, ChannelAffine) for m in model.modules()) == 3
    plain = models.cnn(norm="none")
    handle = normlab.apply(plain, "std_loss")
    assert [n for n, _ in handle.state["std_loss"].modules] == ["0", "3", "6"]
    with pytest.raises(ValueError, match="affine=True"):
        normlab.apply(models.cnn(norm="none"), "std_loss", affine=True)


def test_training_step_lowers_the_loss():
    torch.manual_seed(0)
    model = models.cnn(norm="bn")
    handle = normlab.apply(model, "std_loss")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(64, 1, 28, 28) * 3 + 1, torch.randint(0, 10, (64,))
    first = None
    for _ in range(20):
        F.cross_entropy(model(x), y)
        aux = handle.aux_loss()
        first = first if first is not None else aux.item()
        opt.zero_grad()
        aux.backward()
        opt.step()
    assert aux.item() < 0.5 * first


def inplace_net(inplace: bool, norm: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, 4, 3, padding=1)] + ([nn.BatchNorm2d(4)] if norm else [])
    return nn.Sequential(*layers, nn.ReLU(inplace=inplace), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def test_tensor_overwritten_in_place_is_a_clear_error_not_wrong_statistics():
    model = inplace_net(inplace=True)
    std = StandardizationLoss(model)
    model(torch.randn(16, 1, 6, 6))
    with pytest.raises(RuntimeError, match="modified in place.*copy=True"):
        std()


def test_copy_keeps_the_pre_activation_under_an_inplace_relu():
    x, y = torch.randn(16, 1, 6, 6), torch.randint(0, 3, (16,))
    grads, values = [], []
    for inplace, copy in ((False, False), (True, True)):
        model = inplace_net(inplace)
        with StandardizationLoss(model, copy=copy) as std:
            out = model(x)
            loss = F.cross_entropy(out, y) + std()
            values.append((out.detach(), std.terms()["0"]))
        loss.backward()
        grads.append([p.grad for p in model.parameters()])
    assert torch.equal(values[0][0], values[1][0])
    assert values[1][1] == pytest.approx(standardization_kl(inplace_net(False)[0](x)).item(), rel=1e-6)
    assert values[0][1] == pytest.approx(values[1][1], rel=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_method_copies_by_default_when_the_model_has_inplace_modules():
    x = torch.randn(16, 1, 6, 6)
    ref = normlab.apply(inplace_net(False, norm=True), "std_loss")
    assert not ref.state["std_loss"].copy
    ref.model(x)
    handle = normlab.apply(inplace_net(True, norm=True), "std_loss")
    assert handle.state["std_loss"].copy
    handle.model(x)
    assert handle.aux_loss().item() == pytest.approx(ref.aux_loss().item(), rel=1e-6)
    off = normlab.apply(inplace_net(True, norm=True), "std_loss", copy=False)
    off.model(x)
    with pytest.raises(RuntimeError, match="modified in place"):
        off.aux_loss()


def first_conv_net(inplace: bool = False, norm: bool = False) -> nn.Sequential:
    torch.manual_seed(0)  # K = 1 * 3 * 3 = 9 <= 2 * 8: patch moments by default
    return nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), *([nn.BatchNorm2d(8)] if norm else []),
                         nn.ReLU(inplace=inplace), nn.Conv2d(8, 4, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


@pytest.mark.parametrize("via_method", [False, True])
def test_first_conv_from_patch_moments_equals_recording_its_output(via_method):
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
    results = []
    for patch in (False, None):
        model = first_conv_net(norm=via_method)
        if via_method:
            std = normlab.apply(model, "std_loss", patch_moments=patch).state["std_loss"]
        else:
            std = StandardizationLoss(model, patch_moments=patch)
        out = model(x)
        kinds = [type(layer).__name__ for _, layer, _ in std._pending]
        aux = std()
        (F.cross_entropy(out, y) + aux).backward()
        results.append((kinds, aux.item(), std.terms(), [p.grad for p in model.parameters() if p.grad is not None]))
        std.remove()
    (k0, v0, t0, g0), (k1, v1, t1, g1) = results
    assert k0[0] == "Tensor" and k1[0] == "PatchMoments"
    assert v1 == pytest.approx(v0, rel=1e-5)
    assert t1 == pytest.approx(t0, rel=1e-5) and len(t1) == (1 if via_method else 2)
    for a, b in zip(g0, g1, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_patch_moments_are_taken_before_an_inplace_relu_can_overwrite_anything():
    # The first conv's output is never recorded, so an in-place ReLU after it needs no copy.
    x = torch.randn(16, 1, 8, 8)
    model = first_conv_net(inplace=True)
    with StandardizationLoss(model) as std:
        model(x)
        std()
        terms = std.terms()
    assert terms["0"] == pytest.approx(standardization_kl(first_conv_net()[0](x)).item(), rel=1e-5)
    with StandardizationLoss(model, patch_moments=False) as std:  # the recorded output is overwritten
        model(x)
        with pytest.raises(RuntimeError, match="modified in place"):
            std()


def test_patch_moments_only_where_they_apply():
    model = first_conv_net()
    x = torch.randn(4, 1, 8, 8)
    with StandardizationLoss(model) as std:  # the input needs a gradient: recorded as usual
        model(x.requires_grad_())
        assert [type(layer).__name__ for _, layer, _ in std._pending] == ["Tensor", "Tensor"]
        std()
        model(x.detach())
        assert [type(layer).__name__ for _, layer, _ in std._pending] == ["PatchMoments", "Tensor"]
    wide = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2))  # K = 27 > 2 * 4
    for patch, kinds in ((None, ["Tensor"]), (True, ["PatchMoments"])):
        with StandardizationLoss(wide, patch_moments=patch) as std:
            wide(torch.randn(4, 3, 8, 8))
            assert [type(layer).__name__ for _, layer, _ in std._pending] == kinds
    with pytest.raises(ValueError, match="patch_moments must be"):
        StandardizationLoss(model, patch_moments="yes")


def test_activation_checkpointing_records_each_layer_once_per_step():
    # The recomputation of a checkpointed segment during backward must not be recorded as the next
    # step's pre-activations (which would add a stale term and backward through a freed graph).
    from torch.utils.checkpoint import checkpoint

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x):
            y = checkpoint(lambda t: torch.relu(self.b(torch.relu(t))), self.a(x), use_reentrant=False)
            return self.head(y)

    torch.manual_seed(0)
    model = Net()
    with StandardizationLoss(model) as std:
        for _ in range(2):
            x = torch.randn(16, 4) * 3
            out = model(x)
            loss = std()
            with torch.no_grad():
                a = model.a(x)
                expected = standardization_kl(a) + standardization_kl(model.b(torch.relu(a)))
            torch.testing.assert_close(loss.detach(), expected)
            (out.sum() + loss).backward()


def test_linear_on_a_sequence_standardizes_each_feature_over_batch_and_time():
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(32, 10, 6)
    with StandardizationLoss(model) as std:
        model(x)
        loss = std()
    torch.testing.assert_close(loss, standardization_kl(model[0](x).reshape(-1, 4)))
    loss.backward()
    assert torch.isfinite(model[0].weight.grad).all()


def test_clear_discards_a_failed_forward_and_terms_follow_the_last_call():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    std = StandardizationLoss(model)
    model[0](torch.randn(8, 4))  # a forward that got as far as layer '0', then the batch was skipped
    std.clear()
    x = torch.randn(8, 4)
    model(x)
    loss = std()
    with torch.no_grad():
        h = model[0](x)
        expected = standardization_kl(h) + standardization_kl(model[2](torch.relu(h)))
    torch.testing.assert_close(loss, expected)
    assert list(std.terms()) == ["0", "2"]
    model.eval()
    model(x)
    assert std().item() == 0.0 and std.terms() == {}


def test_unbatched_conv_input_is_a_clear_error():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(0), nn.Linear(4 * 16, 2))
    with StandardizationLoss(model):
        with pytest.raises(ValueError, match="needs batched input"):
            model(torch.randn(1, 6, 6))


def test_weight_changed_between_forward_and_loss_is_a_clear_error():
    model = models.cnn(norm="none")
    with StandardizationLoss(model) as std:
        model(torch.randn(8, 1, 28, 28))
        with torch.no_grad():
            model[0].weight.mul_(2)
        with pytest.raises(RuntimeError, match="weight of module '0' was modified in place"):
            std()


def _std_loss_module():
    import importlib

    return importlib.import_module("normlab.methods.std_loss")


@pytest.mark.parametrize("d, geometry", [
    (1, dict(stride=3, padding=0, dilation=1)),
    (2, dict(stride=2, padding=1, dilation=1)),
    (2, dict(stride=(1, 2), padding=(2, 0), dilation=(2, 1))),
    (3, dict(stride=(1, 2, 1), padding=(1, 0, 1), dilation=1)),
])
def test_batch_sums_first_conv_moments_from_the_per_example_table(d, geometry, monkeypatch):
    # Per-channel means of 100 and -50: the table is shifted by the data's own channel means.
    torch.manual_seed(0)
    conv = getattr(nn, f"Conv{d}d")
    data = torch.randn(40, 3, *([9] * d)) + torch.tensor([100.0, -50.0, 0.0]).view(1, 3, *([1] * d))
    index = torch.tensor([3, 7, 7, 0, 39, 12])
    model = nn.Sequential(conv(3, 8, 3, **geometry), nn.ReLU(), nn.Flatten(1), nn.LazyLinear(4))
    model(data[:2])  # materialize the head
    reference = model.double()
    with StandardizationLoss(reference, patch_moments=False) as std:
        reference(data[index].double())
        want = std()
        want_grad = torch.autograd.grad(want, reference[0].weight)[0]
    model.float()

    def no_batch_path(*args, **kwargs):
        raise AssertionError("the batch's patches were used")

    monkeypatch.setattr(_std_loss_module(), "patch_moments", no_batch_path)
    with StandardizationLoss(model, patch_moments=True) as std:
        x = std.batch(data, index)
        torch.testing.assert_close(x, data[index], rtol=0, atol=0)
        model(x)
        assert type(std._pending[0][1]).__name__ == "PatchMoments"
        got = std()
        got_grad = torch.autograd.grad(got, model[0].weight)[0]
        assert got.item() == pytest.approx(want.item(), rel=1e-5)
        torch.testing.assert_close(got_grad.double(), want_grad, rtol=1e-4, atol=1e-6)
        with pytest.raises(AssertionError, match="patches were used"):
            model(data[index])  # a tensor that did not come from batch() takes the usual path


def test_batch_falls_back_when_its_tensor_or_the_data_changed():
    torch.manual_seed(0)
    data = torch.randn(20, 1, 8, 8)
    index = torch.arange(6)
    model, twin = first_conv_net(), first_conv_net()

    def loss_of(x):
        with StandardizationLoss(twin, patch_moments=False) as ref:
            twin(x)
            return ref().item()

    with StandardizationLoss(model) as std:
        x = std.batch(data, index)
        x.mul_(3)  # the caller changed the batch: its own values count
        model(x)
        assert std().item() == pytest.approx(loss_of(data[index] * 3), rel=1e-5)
        x = std.batch(data, index)
        data[:6] += 5  # the data changed after the gather: x still holds the old rows
        model(x)
        assert std().item() == pytest.approx(loss_of(x), rel=1e-5)
        model(std.batch(data, index))  # and a new gather sees the new data through a new table
        assert std().item() == pytest.approx(loss_of(data[index]), rel=1e-5)


def test_batch_skips_a_table_over_the_size_limit(monkeypatch):
    calls = []
    mod = _std_loss_module()
    real = mod.patch_moments
    monkeypatch.setattr(mod, "patch_moments", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(mod, "_TABLE_BYTES", 1000)
    data = torch.randn(20, 1, 8, 8)
    model = first_conv_net()
    with StandardizationLoss(model) as std:
        model(std.batch(data, torch.arange(8)))
        assert std().item() > 0 and calls == [1]


def test_batch_keeps_precision_when_the_batch_is_far_from_the_data_mean():
    # Pixels 0..255 and a batch of blank images: the first layer's variance is exactly 0.
    torch.manual_seed(0)
    data = torch.randint(0, 256, (200, 1, 8, 8)).float()
    data[:50] = 0
    index = torch.arange(20)
    with StandardizationLoss(twin := first_conv_net(), patch_moments=False) as ref:
        twin(data[index])
        want = ref()
    model = first_conv_net()
    with StandardizationLoss(model) as std:
        model(std.batch(data, index))
        assert std._pending[0][1].cov.abs().max().item() < 1e-6
        assert std().item() == pytest.approx(want.item(), rel=1e-6)


@pytest.mark.parametrize("numbers", [[-1, 0, 5, -30], [29, 0, 5, 0]])
@pytest.mark.parametrize("dtype", [torch.int16, torch.int64])
def test_batch_index_is_read_like_indexing_and_may_be_reused(numbers, dtype, monkeypatch):
    torch.manual_seed(0)
    data = torch.randn(30, 1, 8, 8)
    model, twin = first_conv_net(), first_conv_net()
    with StandardizationLoss(twin, patch_moments=False) as ref:
        twin(data[torch.tensor(numbers)])
        want = ref().item()
    calls = []
    mod = _std_loss_module()
    real = mod.patch_moments
    monkeypatch.setattr(mod, "patch_moments", lambda *a, **k: calls.append(1) or real(*a, **k))
    with StandardizationLoss(model) as std:
        for reuse in (False, True):
            index = torch.tensor(numbers, dtype=dtype)
            x = std.batch(data, index)
            torch.testing.assert_close(x, data[index.long()], rtol=0, atol=0)
            if reuse:
                index.fill_(7)  # the caller refills its index buffer before the forward pass
            model(x)
            assert std().item() == pytest.approx(want, rel=1e-5)
    # batch() reads an int64 CPU index of row numbers as it is (others it converts: a copy), and one
    # refilled in place makes the first conv take its batch's own patches, never other rows
    assert calls == ([1] if dtype == torch.int64 and min(numbers) >= 0 else [])


def test_batch_stops_building_tables_for_ever_new_data(monkeypatch):
    mod = _std_loss_module()
    builds = []
    real = mod._build_table
    monkeypatch.setattr(mod, "_build_table", lambda *a: builds.append(1) or real(*a))
    data = torch.randn(40, 1, 8, 8)
    model = first_conv_net()
    with StandardizationLoss(model) as std:
        for _ in range(2):  # the same data: one table
            model(std.batch(data, torch.arange(8)))
            std()
        model(std.batch(data[:30], torch.arange(8)))  # a slice is a new tensor: a second table
        std()
        assert len(builds) == 2
        model(std.batch(data[:20], torch.arange(8)))  # a third: refused, the batch's patches are used
        assert type(std._pending[0][1]).__name__ == "PatchMoments" and len(builds) == 2
        std()
        with pytest.warns(UserWarning, match="builds no more") as caught:  # said at the next batch(), once
            std.batch(data[:20], torch.arange(8))
        assert caught[0].filename == __file__
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model(std.batch(data[:20], torch.arange(8)))
        assert len(builds) == 2


def test_batch_bad_input():
    std = StandardizationLoss(first_conv_net())
    with pytest.raises(TypeError, match="data must be a tensor"):
        std.batch([[1.0]], torch.arange(1))
    with pytest.raises(ValueError, match="at least 2 dims, got shape"):
        std.batch(torch.randn(5), torch.arange(1))
    for index in (torch.ones(2, 2, dtype=torch.long), torch.ones(3, dtype=torch.bool), torch.zeros(3)):
        with pytest.raises(ValueError, match="index must be a 1-D tensor of integer row numbers"):
            std.batch(torch.randn(5, 1, 8, 8), index)
    for bad in ([5], [-6]):
        with pytest.raises(IndexError, match=r"outside \[-5, 5\) for data of 5 rows"):
            std.batch(torch.randn(5, 1, 8, 8), bad)


def _first_conv_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2))


def test_a_first_conv_with_other_hooks_records_its_output():
    x = torch.randn(8, 1, 8, 8)
    losses = []
    for patches in (True, False):
        m = _first_conv_model()
        pre = m[0].register_forward_pre_hook(lambda mod, args: (args[0] * 3 + 5,))
        with StandardizationLoss(m, patch_moments=patches) as std:
            m(x)
            losses.append(std())
        pre.remove()
        post = m[0].register_forward_hook(lambda mod, args, out: out * 2 + 1)
        with StandardizationLoss(m, patch_moments=patches) as std:
            m(x)
            losses.append(std())
        post.remove()
    torch.testing.assert_close(losses[0], losses[2])
    torch.testing.assert_close(losses[1], losses[3])


def test_empty_batch_runs_forward_and_the_loss_says_why_it_has_no_value():
    m = _first_conv_model()
    with StandardizationLoss(m, patch_moments=True) as std:
        assert m(torch.empty(0, 1, 8, 8)).shape == (0, 2)
        with pytest.raises(ValueError, match="undefined"):
            std()


def test_a_deep_copy_of_the_model_does_not_report_into_the_loss():
    import copy

    m = _first_conv_model()
    x = torch.randn(8, 1, 8, 8)
    std = StandardizationLoss(m, patch_moments=True)
    m(x)
    alone = std()
    twin = copy.deepcopy(m)
    twin(x * 10)
    m(x)
    torch.testing.assert_close(std(), alone)  # only m's layer, once
    std.remove()


def test_bad_probe_targets_and_eps_are_named():
    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    m = nn.Sequential(nn.Linear(3, 3), Pair())
    with StandardizationLoss(m, modules=[m[1]]):
        with pytest.raises(TypeError, match="module '1' returned a tuple"):
            m(torch.randn(4, 3))
    for eps in (float("inf"), None, "a"):
        with pytest.raises(ValueError, match="eps must be a finite number > 0"):
            StandardizationLoss(m, modules=[m[0]], eps=eps)


def test_batch_rejects_uint8_masks_and_takes_unsigned_numpy_indices():
    import numpy as np

    data = torch.randn(10, 1, 8, 8)
    std = StandardizationLoss(_first_conv_model())
    with pytest.raises(ValueError, match="uint8 index a tensor as masks"):
        std.batch(data, torch.tensor([1, 0, 1], dtype=torch.uint8))
    idx = np.array([3, 1, 9], dtype=np.uint64)
    assert torch.equal(std.batch(data, idx), data[[3, 1, 9]])


def test_a_linear_layer_with_a_batch_of_one_is_named():
    m = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with StandardizationLoss(m) as std:
        m(torch.randn(1, 3))
        with pytest.raises(ValueError, match="module '0' gave \\(1, 4\\): at most one value per channel"):
            std()
        m(torch.randn(3))  # one unbatched sample: a vector of features, no batch dim
        with pytest.raises(ValueError, match="module '0' gave \\(4,\\): at most one value per channel"):
            std()
