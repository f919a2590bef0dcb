"""Training a tiny model on a tiny FSC-147: the loss goes down, checkpoints and logs are written,
the learning rate decays, and `clipcount eval` reads what training wrote."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from clipcount.cli import main
from clipcount.config import TrainConfig, tiny_config
from clipcount.data import TrainingDataset, build_dataset, collate
from clipcount.data.augment import AugmentConfig
from clipcount.engine.train import TrainingObjective, train
from clipcount.engine.trainer_state import load_trainer_state
from clipcount.modeling.checkpoint import load_model
from clipcount.modeling.clip_count import ClipCount

from .fixtures import write_fsc147

STEPS_PER_EPOCH = 2  # 8 training images, batch 4


def learnable_config():
    # A softplus output: the tiny model's ReLU output can die in its first steps (all zeros, no gradient).
    config = tiny_config()
    config.decoder.activation = "softplus"
    return config


def training_set(root: Path, augment: bool = True) -> TrainingDataset:
    plain = AugmentConfig(mosaic_prob=0.0, augment_prob=0.0)
    return TrainingDataset(build_dataset("fsc147", root, "train"), crop_size=64, augment_cfg=plain, seed=0,
                           augment=augment)


def full_set_density_loss(model: ClipCount, dataset: TrainingDataset) -> float:
    """Density MSE over every training image (fixed crops, eval mode): no batch-to-batch noise."""
    dataset.set_epoch(0)
    batch = collate([dataset[i] for i in range(len(dataset))])
    model.eval()
    with torch.no_grad():
        total, _, _ = TrainingObjective(model, 0.07, None)(batch["image"], batch["density"], batch["prompt"], 0.0, 1.0)
    return total.item()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("train")
    root = write_fsc147(base / "FSC147")
    torch.manual_seed(0)
    initial = ClipCount(learnable_config())
    torch.manual_seed(0)
    model = ClipCount(learnable_config())
    cfg = TrainConfig(contrastive_epochs=1, density_epochs=14, batch_size=4, lr=3e-3, lr_decay=0.5,
                      lr_decay_every=10, num_workers=0, checkpoint_every=10, log_every=1, seed=0)
    result = train(model, training_set(root), cfg, base / "run", device="cpu", progress=False)
    return {"root": root, "run": base / "run", "model": model, "initial": initial, "result": result, "cfg": cfg}


def test_training_runs_both_stages_to_the_end(trained):
    result = trained["result"]
    assert result.finished and result.step == 15 * STEPS_PER_EPOCH and result.epoch == 15
    lines = [json.loads(line) for line in (trained["run"] / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, 31))
    assert {line["stage"] for line in lines[:STEPS_PER_EPOCH]} == {"contrastive"}
    assert {line["stage"] for line in lines[STEPS_PER_EPOCH:]} == {"density"}
    assert all(line["density"] == 0.0 for line in lines[:STEPS_PER_EPOCH])
    assert all(line["contrastive"] == 0.0 and line["density"] > 0 for line in lines[STEPS_PER_EPOCH:])
    assert all({"loss", "lr", "time", "epoch"} <= set(line) for line in lines)


def test_learning_rate_decays_every_lr_decay_every_epochs(trained):
    lines = [json.loads(line) for line in (trained["run"] / "metrics.jsonl").read_text().splitlines()]
    lr = {line["epoch"] if line["step"] % STEPS_PER_EPOCH else line["epoch"] - 1: line["lr"] for line in lines}
    assert lr[0] == pytest.approx(3e-3) and lr[9] == pytest.approx(3e-3)
    assert lr[10] == pytest.approx(1.5e-3) and lr[14] == pytest.approx(1.5e-3)


def test_training_lowers_the_loss(trained):
    losses = trained["result"].losses[STEPS_PER_EPOCH:]  # the density stage
    first, last = sum(losses[:6]) / 6, sum(losses[-6:]) / 6
    assert last < 0.9 * first, (first, last)
    dataset = training_set(trained["root"], augment=False)
    before = full_set_density_loss(trained["initial"], dataset)
    after = full_set_density_loss(trained["model"], dataset)
    assert after < 0.8 * before, (before, after)


def test_checkpoints_hold_the_trained_weights_and_trainer_state(trained):
    run, model = trained["run"], trained["model"]
    for name in ("last", "final"):
        loaded = load_model(run / name)
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), (name, key)
    state = load_trainer_state(run / "last")
    assert state["position"]["step"] == 30 and state["position"]["seconds"] > 0
    assert {k: state["position"][k] for k in ("epoch", "batch")} == {"epoch": 15, "batch": 0}
    assert state["train_config"]["lr"] == 3e-3
    assert not (run / "final" / "trainer_state.json").exists()
    assert not list(run.glob(".*"))  # no temporary folders left behind
    config = json.loads((run / "final" / "config.json").read_text())
    assert config["training"]["step"] == 30


def test_clipcount_eval_reads_the_trained_checkpoint(trained, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["eval", "--model", str(trained["run"] / "final"), "--dataset", "fsc147", "--root",
                 str(trained["root"]), "--split", "test", "--stride", "32", "--out", str(out), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "MAE" in printed and "published: CLIP-Count" in printed and "17.45" in printed
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert [row["image"] for row in rows] == ["11.jpg", "12.jpg"]
    assert set(rows[0]) == {"image", "prompt", "gt", "predicted", "error"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 2 and set(summary["per_class"]) == {"apples", "cars"}
    assert summary["published"]["CLIP-Count"] == {"mae": 17.45, "rmse": 104.88}


def test_cli_train_reads_a_config_file_and_flags_override_it(tmp_path, capsys):
    root = write_fsc147(tmp_path / "FSC147", {"train": 4})
    config = tmp_path / "exp.yaml"
    config.write_text("model:\n  decoder:\n    activation: softplus\ntrain:\n  lr: 0.01\n  batch_size: 8\n"
                      "  contrastive_epochs: 1\n  density_epochs: 1\n")
    out = tmp_path / "run"
    code = main(["train", "--dataset", "fsc147", "--root", str(root), "--out", str(out), "--tiny", "--config",
                 str(config), "--batch-size", "2", "--max-steps", "3", "--workers", "1", "--checkpoint-every", "2",
                 "--ema-decay", "0.9", "--text-similarity", "--empty-count-weight", "1e-5", "--image-height", "96",
                 "--no-progress"])
    assert code == 0
    assert "stopped at step 3" in capsys.readouterr().out
    state = load_trainer_state(out / "last")
    assert state["position"]["step"] == 3
    assert state["train_config"]["lr"] == 0.01 and state["train_config"]["batch_size"] == 2
    assert state["train_config"]["ema_decay"] == 0.9 and state["weight_average"]["updates"] == 3
    assert load_model(out / "final").config.decoder.activation == "softplus"
    assert load_model(out / "final").config.text_similarity
    assert load_model(out / "final").config.image_height == 96 and state["train_config"]["empty_count_weight"] == 1e-5


@pytest.mark.parametrize(
    ("extra", "message"),
    [([], "--clip"), (["--tiny", "--config", "{cfg}"], "unknown training settings"),
     (["--tiny", "--ema-decay", "1.5"], "ema_decay must be in"),
     (["--tiny", "--max-seconds", "0"], "max_seconds must be positive")],
)
def test_cli_train_errors_are_for_people(tmp_path, capsys, extra, message):
    root = write_fsc147(tmp_path / "FSC147", {"train": 2})
    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps({"train": {"learning_rate": 1}}))
    args = ["train", "--dataset", "fsc147", "--root", str(root), "--out", str(tmp_path / "run")]
    assert main(args + [a.replace("{cfg}", str(cfg)) for a in extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_cli_train_will_not_overwrite_a_run_without_resume(trained, capsys):
    args = ["train", "--dataset", "fsc147", "--root", str(trained["root"]), "--out", str(trained["run"]), "--tiny"]
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["train", "--dataset", "fsc147-s", "--root", str(trained["root"]), "--out", "x", "--tiny"]) == 2
    assert "counts only" in capsys.readouterr().err
