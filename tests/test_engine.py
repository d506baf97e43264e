import math

import pytest
import torch

from normlab import engine
from normlab.engine import RunConfig, Sampler, train


def test_run_is_deterministic():
    cfg = RunConfig(method="std_loss", steps=30, eval_every=10, seed=3)
    a, b = train(cfg), train(cfg)
    assert a.curve == b.curve
    assert [r["step"] for r in a.curve] == [0, 10, 20, 30]
    assert a.diverged_at is None and 0 <= a.final["test_acc"] <= 1
    assert set(a.curve[1]) == {"step", "loss", "aux", "train_acc", "test_loss", "test_acc"}
    assert a.curve[1]["aux"] > 0


def test_std_loss_runs_take_first_conv_moments_from_the_data_table(monkeypatch):
    # The engine feeds each minibatch through StandardizationLoss.batch: the first conv's moments
    # come from the training set's per-example table, never from the batch's own patches.
    import importlib

    std_loss = importlib.import_module("normlab.methods.std_loss")
    monkeypatch.setattr(std_loss, "patch_moments", lambda *a, **k: pytest.fail("batch patches used"))
    res = train(RunConfig(method="std_loss", steps=5, eval_every=5))
    assert res.diverged_at is None and res.curve[-1]["aux"] > 0


def test_same_seed_same_init_across_methods_and_different_seeds_differ():
    h1, _ = engine.build_run(RunConfig(method="none", seed=1))
    h2, _ = engine.build_run(RunConfig(method="std_loss", seed=1))
    h3, _ = engine.build_run(RunConfig(method="none", seed=2))
    assert torch.equal(h1.model[0].weight, h2.model[0].weight)
    assert not torch.equal(h1.model[0].weight, h3.model[0].weight)


def test_sampler_is_a_pure_function_of_seed_and_step():
    s1, s2 = Sampler(0, 1000, 128), Sampler(0, 1000, 128)
    assert torch.equal(s1(9), s2(9)) and torch.equal(s1(3), Sampler(0, 1000, 128)(3))
    epoch = torch.cat([s1(i) for i in range(7)])
    assert len(set(epoch.tolist())) == 7 * 128  # no repeat within an epoch
    assert not torch.equal(s1(0), s1(7))  # a new permutation each epoch
    with pytest.raises(ValueError, match="exceeds"):
        Sampler(0, 10, 128)


def test_divergence_is_recorded_with_last_finite_values():
    res = train(RunConfig(method="none", steps=200, eval_every=5, lr=1e4))
    assert res.diverged_at is not None and res.diverged_at <= 200
    assert all(math.isfinite(r["test_loss"]) for r in res.curve)
    assert res.curve[-1]["step"] < res.diverged_at


@pytest.mark.parametrize("steps,every", [(50, 1), (2, 5)])
def test_divergence_at_an_evaluation_or_the_last_step_is_recorded(steps, every):
    # The update of an evaluated step blows up: its test loss is NaN. Recorded as diverged there,
    # never as a finished run with a NaN row.
    res = train(RunConfig(model="mlp", method="none", steps=steps, eval_every=every, lr=1e4))
    assert res.diverged_at is not None
    assert all(math.isfinite(r["test_loss"]) for r in res.curve)
    assert res.curve[-1]["step"] < res.diverged_at


def test_an_unreadable_checkpoint_starts_the_run_over(tmp_path):
    cfg = RunConfig(model="mlp", method="none", steps=6, eval_every=3)
    ckpt = tmp_path / "run.pt"
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="cannot be read"):
        res = train(cfg, checkpoint=str(ckpt))
    assert res.curve == train(cfg).curve and not ckpt.exists()


def test_checkpoint_resume_gives_the_same_numbers(tmp_path, monkeypatch):
    cfg = RunConfig(method="bn_shift", steps=40, eval_every=10, seed=5, optimizer="adam", lr=1e-3)
    full = train(cfg)
    ckpt = tmp_path / "run.pt"

    class Stop(Exception):
        pass

    def stop_at_20(row):
        if row["step"] == 20:
            raise Stop

    with pytest.raises(Stop):
        train(cfg, on_eval=stop_at_20, checkpoint=str(ckpt))
    assert ckpt.exists()  # written at step 10 (and at 20 before on_eval stops it)
    # Count the steps the resumed call trains: a restart from scratch would give the same curve (the
    # run is deterministic), so the curve alone cannot tell that it resumed.
    trained, real = [], Sampler.__call__
    monkeypatch.setattr(Sampler, "__call__", lambda self, step: trained.append(step) or real(self, step))
    resumed = train(cfg, checkpoint=str(ckpt))
    assert resumed.curve == full.curve
    assert trained[0] in (10, 20) and len(trained) == 40 - trained[0]
    assert not ckpt.exists()


@pytest.mark.parametrize("bad,match", [
    (dict(steps=0), "steps"), (dict(lr=-1.0), "lr"), (dict(optimizer="lbfgs"), "optimizer"),
    (dict(model="resnet"), "model"), (dict(dataset="cifar"), "dataset"), (dict(batch_size=2.5), "batch_size"),
    (dict(weight_decay=float("nan")), "weight_decay must be a finite"), (dict(momentum=float("inf")), "momentum"),
    (dict(optimizer="adam", momentum=0.9), "momentum applies to sgd only"),
])
def test_bad_config(bad, match):
    with pytest.raises(ValueError, match=match):
        RunConfig(**bad)


@pytest.mark.parametrize("inplace", [False, True])
def test_preactivation_percentiles_are_of_the_relu_input(inplace):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(inplace=inplace), torch.nn.Linear(6, 2))
    x = torch.randn(200, 4)
    qs = [1, 50, 99]
    got = engine.preactivation_percentiles(model, x, qs)
    with torch.no_grad():
        expected = torch.quantile(model[0](x).flatten(), torch.tensor([0.01, 0.5, 0.99])).tolist()
    assert got == pytest.approx(expected, rel=1e-6)
    assert got[0] < 0  # the negative half survives an in-place ReLU
