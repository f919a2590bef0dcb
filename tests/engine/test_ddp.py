"""DistributedDataParallel on CPU: two gloo processes, set up from torchrun's environment variables,
train through both stages (stage 1 leaves the decoder unused) and end with identical weights."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

from clipcount.config import TrainConfig, tiny_config
from clipcount.data import TrainingDataset, build_dataset
from clipcount.engine.trainer_state import load_trainer_state
from clipcount.modeling.checkpoint import load_model
from clipcount.modeling.clip_count import ClipCount

from .fixtures import write_fsc147

WORLD = 2


def weights_hash(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ddp_worker(rank: int, root: str, out: str, port: int, limits: bool = False) -> None:
    """One training process, configured the way torchrun configures it. `limits`: a weight average,
    and a time limit that only rank 0 has reached (ranks must follow rank 0's clock)."""
    from clipcount.engine.distributed import current_context, shutdown
    from clipcount.engine.train import train

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.manual_seed(100 + rank)  # different initial weights: DDP must start every rank from rank 0's
    config = tiny_config()
    config.decoder.activation = "softplus"
    model = ClipCount(config)
    dataset = TrainingDataset(build_dataset("fsc147", root, "train"), crop_size=64, seed=0)
    # 8 images, global batch 4 (2 per process): 2 steps an epoch; steps 1-2 contrastive, 3-4 density
    cfg = TrainConfig(contrastive_epochs=1, density_epochs=1, batch_size=4, lr=3e-3, num_workers=0,
                      checkpoint_every=2, log_every=1, seed=0)
    if limits:
        cfg.ema_decay, cfg.max_seconds = 0.9, (1e-9 if rank == 0 else 3600.0)
    result = train(model, dataset, cfg, out, device="cpu", progress=False)
    Path(out, f"hash_rank{rank}.json").write_text(json.dumps({"hash": weights_hash(model.state_dict()),
                                                               "step": result.step}))
    shutdown(current_context())


def test_two_gloo_processes_train_to_identical_weights(tmp_path):
    root = write_fsc147(tmp_path / "FSC147")
    out = tmp_path / "run"
    mp.spawn(ddp_worker, args=(str(root), str(out), free_port()), nprocs=WORLD, join=True)
    reports = [json.loads((out / f"hash_rank{rank}.json").read_text()) for rank in range(WORLD)]
    assert reports[0]["step"] == reports[1]["step"] == 4
    assert reports[0]["hash"] == reports[1]["hash"]
    # rank 0 wrote the checkpoints, with the same weights
    assert weights_hash(load_model(out / "final").state_dict()) == reports[0]["hash"]
    state = load_trainer_state(out / "last")
    assert state["world_size"] == WORLD and len(state["rng"]) == WORLD
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]  # one writer
    stages = [json.loads(line)["stage"] for line in lines]
    assert stages == ["contrastive", "contrastive", "density", "density"]


def test_a_time_limit_stops_every_process_at_rank_0s_step(tmp_path):
    root = write_fsc147(tmp_path / "FSC147")
    out = tmp_path / "run"
    mp.spawn(ddp_worker, args=(str(root), str(out), free_port(), True), nprocs=WORLD, join=True)
    reports = [json.loads((out / f"hash_rank{rank}.json").read_text()) for rank in range(WORLD)]
    assert reports[0]["step"] == reports[1]["step"] == 1  # no process waits for another's next step
    assert reports[0]["hash"] == reports[1]["hash"]
    assert load_trainer_state(out / "last")["weight_average"]["updates"] == 1
