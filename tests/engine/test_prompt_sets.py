"""Several prompts per training image: the objective with P prompts is the mean of P one-prompt
objectives (one image encoding shared), datasets get negative prompts with all-zero targets, and
`clipcount train --prompts-per-image` trains with them."""

from __future__ import annotations

import pytest
import torch

from clipcount.cli import main
from clipcount.config import tiny_config
from clipcount.data import TrainingDataset, build_dataset, collate
from clipcount.data.augment import AugmentConfig
from clipcount.data.negatives import WithNegativePrompts, nearest_class_names
from clipcount.engine.train import TrainingObjective
from clipcount.errors import ConfigError
from clipcount.modeling.checkpoint import load_model
from clipcount.modeling.clip_count import ClipCount

from .fixtures import write_fsc147


def test_objective_over_prompts_is_the_mean_of_single_prompt_objectives():
    torch.manual_seed(0)
    model = ClipCount(tiny_config()).eval()
    objective = TrainingObjective(model, 0.07, None)
    images = torch.rand(2, 3, 64, 64)
    density = torch.rand(2, 3, 1, 64, 64) * (torch.rand(2, 3, 1, 1, 1) > 0.3)
    prompts = [["apples", "cars", "red stars"], ["people", "apples", "birds"]]
    with torch.no_grad():
        total, contrastive, mse = objective(images, density, prompts, 1.0, 1.0)
        singles = [objective(images[b:b + 1], density[b, p][None], [prompts[b][p]], 1.0, 1.0)
                   for b in range(2) for p in range(3)]
    assert float(mse) == pytest.approx(sum(float(s[2]) for s in singles) / 6, rel=1e-5)
    with_positives = [float(s[1]) for b, s in zip(range(6), singles) if float(density.flatten(0, 1)[b].sum()) > 0]
    assert float(contrastive) == pytest.approx(sum(with_positives) / len(with_positives), rel=1e-5)


@pytest.fixture
def fsc(tmp_path):
    return write_fsc147(tmp_path / "FSC147", {"train": 6})


def plain_set(root) -> TrainingDataset:
    return TrainingDataset(build_dataset("fsc147", root, "train"), crop_size=64,
                           augment_cfg=AugmentConfig(mosaic_prob=0.0, augment_prob=0.0), seed=0)


def test_dataset_negatives_have_all_zero_targets(fsc):
    base = plain_set(fsc)
    names = [base.base[i].prompt for i in range(len(base))]
    assert len(set(names)) >= 2
    wrapped = WithNegativePrompts(base, names, prompts_per_image=3, negative_share=1.0, seed=0)
    batch = collate([wrapped[i] for i in range(len(wrapped))])
    assert batch["density"].shape == (len(wrapped), 3, 1, 64, 64) and batch["count"].shape == (len(wrapped), 3)
    for i, prompts in enumerate(batch["prompts"]):
        own = base[i]
        assert prompts[0] == own["prompt"] and torch.equal(batch["density"][i, 0], own["density"])
        for p in range(1, 3):
            assert prompts[p] != own["prompt"]
            assert float(batch["density"][i, p].abs().max()) == 0.0 and float(batch["count"][i, p]) == 0.0
    none = WithNegativePrompts(base, names, prompts_per_image=3, negative_share=0.0, seed=0)
    assert all(set(none[i]["prompts"]) == {base[i]["prompt"]} for i in range(len(none)))
    with pytest.raises(ConfigError):
        WithNegativePrompts(base, names, prompts_per_image=2, negative_share=1.5)


def test_hard_dataset_negatives_are_the_nearest_names():
    torch.manual_seed(0)
    model = ClipCount(tiny_config())
    names = ["apples", "green apples", "cars", "people", "birds"]
    nearest = nearest_class_names(model, names, k=2)
    assert set(nearest) == set(names) and all(len(v) == 2 and n not in v for n, v in nearest.items())
    text = torch.nn.functional.normalize(model.encode_text(names).squeeze(1), dim=-1)
    sims = text @ text.t()
    i = names.index("apples")
    ranked = [names[j] for j in sims[i].argsort(descending=True).tolist() if j != i][:2]
    assert nearest["apples"] == ranked


def test_cli_train_with_negative_prompts(fsc, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--dataset", "fsc147", "--root", str(fsc), "--out", str(out), "--tiny", "--batch-size", "2",
                 "--max-steps", "2", "--workers", "0", "--prompts-per-image", "3", "--negative-share", "0.5",
                 "--no-progress"])
    assert code == 0
    config = load_model(out / "final").config
    assert config.window_size == 64
    import json

    saved = json.loads((out / "final" / "config.json").read_text())["training"]["train_config"]
    assert saved["prompts_per_image"] == 3 and saved["negative_share"] == 0.5
