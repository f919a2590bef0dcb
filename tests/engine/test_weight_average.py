"""The weight average (TrainConfig.ema_decay) and the time limit (TrainConfig.max_seconds) of training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clipcount.engine.train import train
from clipcount.engine.trainer_state import load_trainer_state
from clipcount.engine.weight_average import WeightAverage
from clipcount.errors import ConfigError
from clipcount.modeling.checkpoint import load_model

from .test_resume import assert_same_weights, make_run, run_config


def two_layers() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[0].requires_grad_(False)  # frozen, like the CLIP towers
    return model


def test_the_average_follows_the_ema_formula_over_trainable_weights_only():
    model = two_layers()
    average = WeightAverage(model, decay=0.9)
    assert average.names == ["1.weight", "1.bias"]
    expected = model[1].weight.detach().clone()
    for n in range(1, 6):
        with torch.no_grad():
            model[1].weight.add_(1.0)
        average.update()
        decay = min(0.9, (1 + n) / (10 + n))
        expected = decay * expected + (1 - decay) * model[1].weight.detach()
    assert torch.allclose(average.shadow[0], expected)


def test_applied_swaps_the_average_in_and_back_out():
    model = two_layers()
    average = WeightAverage(model, decay=0.5)
    own = model[1].weight.detach().clone()
    average.shadow[0].fill_(7.0)
    with average.applied():
        assert torch.equal(model[1].weight, torch.full_like(own, 7.0))
    assert torch.equal(model[1].weight, own)


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5])
def test_a_decay_outside_0_1_is_refused(decay):
    with pytest.raises(ConfigError, match="ema_decay"):
        WeightAverage(two_layers(), decay)


@pytest.fixture(scope="module")
def fsc_root(tmp_path_factory):
    from .fixtures import write_fsc147

    return write_fsc147(tmp_path_factory.mktemp("ema") / "FSC147")


def test_final_holds_the_average_and_last_the_raw_weights(fsc_root, tmp_path):
    model, dataset = make_run(fsc_root)
    train(model, dataset, run_config(6, ema_decay=0.8), tmp_path, device="cpu", progress=False)
    raw, final = load_model(tmp_path / "last").state_dict(), load_model(tmp_path / "final").state_dict()
    assert_same_weights(raw, model.state_dict())
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    changed = {key for key in raw if not torch.equal(raw[key], final[key])}
    assert changed and changed <= trainable  # frozen weights are never averaged
    saved = load_trainer_state(tmp_path / "last")["weight_average"]
    assert saved["updates"] == 6 and set(saved["weights"]) == trainable
    for key in trainable:
        assert torch.equal(saved["weights"][key], final[key])


def test_a_resumed_run_continues_the_average_exactly(fsc_root, tmp_path):
    model, dataset = make_run(fsc_root)
    train(model, dataset, run_config(7, ema_decay=0.8), tmp_path / "straight", device="cpu", progress=False)
    model, dataset = make_run(fsc_root)
    train(model, dataset, run_config(3, ema_decay=0.8), tmp_path / "stopped", device="cpu", progress=False)
    model, dataset = make_run(fsc_root)
    train(model, dataset, run_config(7, ema_decay=0.8), tmp_path / "stopped", resume=True, device="cpu",
          progress=False)
    assert_same_weights(load_model(tmp_path / "stopped" / "final").state_dict(),
                        load_model(tmp_path / "straight" / "final").state_dict())


def test_without_an_average_final_equals_last(fsc_root, tmp_path):
    model, dataset = make_run(fsc_root)
    train(model, dataset, run_config(2), tmp_path, device="cpu", progress=False)
    assert_same_weights(load_model(tmp_path / "last").state_dict(), load_model(tmp_path / "final").state_dict())
    assert "weight_average" not in load_trainer_state(tmp_path / "last")


def test_max_seconds_stops_mid_epoch_and_counts_time_over_resumes(fsc_root, tmp_path):
    model, dataset = make_run(fsc_root)
    result = train(model, dataset, run_config(None, max_seconds=1e-9), tmp_path, device="cpu", progress=False)
    assert result.step == 1 and not result.finished  # the limit is checked after each step
    first = load_trainer_state(tmp_path / "last")["position"]["seconds"]
    assert first > 0
    model, dataset = make_run(fsc_root)
    result = train(model, dataset, run_config(None, max_seconds=1e-9), tmp_path, resume=True, device="cpu",
                   progress=False)
    assert result.step == 1  # already out of time: a resumed run takes no step
    model, dataset = make_run(fsc_root)
    result = train(model, dataset, run_config(3, max_seconds=3600.0), tmp_path, resume=True, device="cpu",
                   progress=False)
    assert result.step == 3
    assert load_trainer_state(tmp_path / "last")["position"]["seconds"] > first


def test_resuming_a_run_saved_without_an_average_starts_one_from_its_weights(fsc_root, tmp_path):
    model, dataset = make_run(fsc_root)
    train(model, dataset, run_config(3), tmp_path, device="cpu", progress=False)
    saved = load_model(tmp_path / "last").state_dict()
    model, dataset = make_run(fsc_root)
    average = WeightAverage(model, 0.9)
    model.load_state_dict(saved)
    average.restart()
    assert average.updates == 0
    assert all(torch.equal(s, saved[name]) for name, s in zip(average.names, average.shadow))
    model, dataset = make_run(fsc_root)
    train(model, dataset, run_config(7, ema_decay=0.9), tmp_path, resume=True, device="cpu", progress=False)
    assert load_trainer_state(tmp_path / "last")["weight_average"]["updates"] == 4  # counted from the resume
