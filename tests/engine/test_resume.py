"""Exact resume: a run stopped (or killed with SIGKILL) and resumed ends with the same weights as
an uninterrupted one; trainer state round-trips without pickle; checkpoints are swapped in whole."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from clipcount.cli import main
from clipcount.config import TrainConfig, tiny_config
from clipcount.data import TrainingDataset, build_dataset
from clipcount.data.augment import AugmentConfig
from clipcount.engine.run_folder import find_checkpoint, swap_in
from clipcount.engine.train import train
from clipcount.engine.trainer_state import load_trainer_state, pack, save_trainer_state, unpack
from clipcount.errors import CheckpointError, ConfigError
from clipcount.modeling.checkpoint import load_model
from clipcount.modeling.clip_count import ClipCount

from .fixtures import write_fsc147

REPO = Path(__file__).resolve().parents[2]


# ---- trainer state without pickle ----------------------------------------------------------------

def test_pack_unpack_round_trips_nested_state_exactly():
    state = {
        "ints": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}, 7: {}},
        "groups": [{"lr": 1e-4 * 0.33, "betas": (0.9, 0.95), "params": [0, 7], "foreach": None, "flag": False}],
        "numpy": ("MT19937", np.arange(5, dtype=np.uint32), 2, 0, 0.0),
        "python": (3, tuple(range(5)), None),
        "raw": b"\x00\xff",
        "$odd": 1,
        "half": torch.ones(2, dtype=torch.float16),
    }
    structure, tensors = pack(state)
    json.dumps(structure)  # plain JSON
    back = unpack(json.loads(json.dumps(structure)), tensors)
    assert back["ints"][0]["step"].item() == 3.0 and torch.equal(back["ints"][0]["exp_avg"], state["ints"][0]["exp_avg"])
    assert back["ints"][7] == {} and set(back["ints"]) == {0, 7}
    assert back["groups"][0] == state["groups"][0] and isinstance(back["groups"][0]["betas"], tuple)
    assert back["numpy"][0] == "MT19937" and back["numpy"][1].dtype == np.uint32
    assert np.array_equal(back["numpy"][1], state["numpy"][1]) and back["python"] == state["python"]
    assert back["raw"] == b"\x00\xff" and back["$odd"] == 1 and back["half"].dtype == torch.float16


def test_optimizer_state_survives_the_files(tmp_path):
    param = torch.nn.Parameter(torch.randn(4))
    optimizer = torch.optim.AdamW([param], lr=1e-3, betas=(0.9, 0.95))
    for _ in range(3):
        param.grad = torch.randn(4)
        optimizer.step()
    save_trainer_state(tmp_path, {"optimizer": optimizer.state_dict()})
    assert not any(p.suffix in (".pt", ".pkl", ".bin") for p in tmp_path.iterdir())
    fresh = torch.optim.AdamW([torch.nn.Parameter(param.detach().clone())], lr=1.0)
    fresh.load_state_dict(load_trainer_state(tmp_path)["optimizer"])
    saved, loaded = optimizer.state_dict(), fresh.state_dict()
    assert loaded["param_groups"] == saved["param_groups"]
    for key in ("step", "exp_avg", "exp_avg_sq"):
        assert torch.equal(loaded["state"][0][key], saved["state"][0][key])


def test_damaged_trainer_state_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="no trainer state"):
        load_trainer_state(tmp_path)
    save_trainer_state(tmp_path, {"x": torch.zeros(1)})
    (tmp_path / "trainer_state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_trainer_state(tmp_path)


def test_swap_in_replaces_whole_folders_and_recovers_an_interrupted_swap(tmp_path):
    def folder(name: str, text: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        (path / "model.safetensors").write_text(text)
        return path

    swap_in(folder(".last.tmp", "one"), tmp_path / "last")
    swap_in(folder(".last.tmp", "two"), tmp_path / "last")
    assert (tmp_path / "last" / "model.safetensors").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    # a kill between "move the old one aside" and "move the new one in"
    os.replace(tmp_path / "last", tmp_path / ".last.old")
    folder(".last.tmp", "half-written")
    assert find_checkpoint(tmp_path) == tmp_path / ".last.old"
    assert find_checkpoint(tmp_path / "nothing") is None


# ---- exact resume -------------------------------------------------------------------------------

def make_run(root: Path):
    """A fresh tiny model (same initial weights every time) and an augmented training set."""
    config = tiny_config()
    config.decoder.activation = "softplus"
    torch.manual_seed(0)
    model = ClipCount(config)
    augment = AugmentConfig(mosaic_prob=0.5, augment_prob=0.5)
    dataset = TrainingDataset(build_dataset("fsc147", root, "train"), crop_size=64, augment_cfg=augment, seed=0)
    return model, dataset


def run_config(max_steps: int, **kw) -> TrainConfig:
    # 8 images, batch 2: 4 steps an epoch; step 3 is inside the contrastive epoch, step 7 inside a density one
    base = dict(contrastive_epochs=1, density_epochs=2, batch_size=2, lr=3e-3, lr_decay_every=1, lr_decay=0.5,
                num_workers=0, checkpoint_every=2, log_every=1, seed=0, max_steps=max_steps)
    return TrainConfig(**{**base, **kw})


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def fsc_root(tmp_path_factory):
    return write_fsc147(tmp_path_factory.mktemp("resume") / "FSC147")


@pytest.fixture(scope="module")
def uninterrupted(fsc_root, tmp_path_factory):
    model, dataset = make_run(fsc_root)
    result = train(model, dataset, run_config(7), tmp_path_factory.mktemp("straight"), device="cpu", progress=False)
    assert result.step == 7
    return model.state_dict(), result


def test_stop_and_resume_mid_epoch_gives_identical_weights(fsc_root, uninterrupted, tmp_path):
    reference, straight = uninterrupted
    model, dataset = make_run(fsc_root)
    first = train(model, dataset, run_config(3), tmp_path, device="cpu", progress=False)
    position = load_trainer_state(tmp_path / "last")["position"]
    assert first.step == 3 and {k: position[k] for k in ("step", "epoch", "batch")} == {"step": 3, "epoch": 0, "batch": 3}
    model, dataset = make_run(fsc_root)  # a new process would start like this
    torch.manual_seed(1234)  # whatever the global RNG holds now, resume restores the saved one
    second = train(model, dataset, run_config(7), tmp_path, resume=True, device="cpu", progress=False)
    assert second.step == 7
    assert second.losses == straight.losses[3:]
    assert_same_weights(model.state_dict(), reference)
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 8))  # one log, as if never interrupted


def test_resuming_mid_epoch_with_another_batch_size_is_refused(fsc_root, tmp_path):
    model, dataset = make_run(fsc_root)
    train(model, dataset, run_config(3), tmp_path, device="cpu", progress=False)
    model, dataset = make_run(fsc_root)
    with pytest.raises(ConfigError, match="batch_size"):
        train(model, dataset, run_config(7, batch_size=4), tmp_path, resume=True, device="cpu", progress=False)


CLI_ARGS = ["--dataset", "fsc147", "--tiny", "--batch-size", "2", "--contrastive-epochs", "1",
            "--density-epochs", "2", "--lr", "3e-3", "--workers", "0", "--checkpoint-every", "2",
            "--log-every", "1", "--no-progress"]


def test_sigkill_after_a_checkpoint_then_resume_gives_identical_weights(fsc_root, tmp_path):
    """A real `python -m clipcount train` killed with SIGKILL, resumed with --resume."""
    steps = 12
    reference_out, killed_out = tmp_path / "reference", tmp_path / "killed"
    common = ["--root", str(fsc_root), "--max-steps", str(steps)] + CLI_ARGS
    assert main(["train", "--out", str(reference_out)] + common) == 0
    reference = load_model(reference_out / "final").state_dict()

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS=str(torch.get_num_threads()))
    process = subprocess.Popen([sys.executable, "-m", "clipcount", "train", "--out", str(killed_out)] + common,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while find_checkpoint(killed_out) is None or not (find_checkpoint(killed_out) / "trainer_state.json").exists():
            assert process.poll() is None, process.stderr.read().decode()
            assert time.time() < deadline, "no checkpoint within 120 s"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    killed_at = load_trainer_state(find_checkpoint(killed_out))["position"]["step"]
    assert 2 <= killed_at < steps, "the run finished before it could be killed"

    torch.manual_seed(999)
    assert main(["train", "--out", str(killed_out), "--resume"] + common) == 0
    assert_same_weights(load_model(killed_out / "final").state_dict(), reference)
    assert load_trainer_state(killed_out / "last")["position"]["step"] == steps
