"""Several prompts per training image for datasets with one annotated class per image (FSC-147,
folder datasets): the image's own class and classes it does not hold, with all-zero targets.

Without negatives nothing in training ever needs the text: each image has one class, and counting
whatever is there scores perfectly. That is the published model's failure on FSC-147-S (the prompt
names a class that is not the dominant one: MAE 45.59 against 5.99 for T2ICount). A negative here is
another image's class name; a share of them are hard, the names nearest the image's own by text
embedding ("apples" beside "oranges"), picked once with the model's own text encoder
(`nearest_class_names`).

Caveat (FSC-147): only one class per image is annotated, so a class named by another image may be
present, unannotated, in this one ("people" in a street full of cars), and its zero target is then
wrong. `negative_share` (TrainConfig) sets how often a prompt slot is such a negative; keep it
moderate on FSC-147, where a wrong zero teaches the model to miss what it was not asked about.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from clipcount.errors import ConfigError


class WithNegativePrompts(torch.utils.data.Dataset):
    """Wrap a `TrainingDataset`: item i gets `prompts` (P strings: its own class first), `density`
    (P, 1, S, S) and `count` (P,), each further slot a negative with probability `negative_share`
    (zero map), else its own class again. Deterministic in (seed, epoch, index)."""

    def __init__(self, base: torch.utils.data.Dataset, class_names: Sequence[str], prompts_per_image: int,
                 negative_share: float, hard_negative_share: float = 0.5,
                 nearest: Mapping[str, Sequence[str]] | None = None, seed: int = 0):
        if prompts_per_image < 1:
            raise ConfigError(f"prompts per image must be >= 1, got {prompts_per_image}")
        for name, value in (("negative share", negative_share), ("hard negative share", hard_negative_share)):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"the {name} must be between 0 and 1, got {value}")
        self.base = base
        self.names = sorted(set(class_names))
        self.prompts_per_image = int(prompts_per_image)
        self.negative_share = float(negative_share)
        self.hard_negative_share = float(hard_negative_share)
        self.nearest = {k: list(v) for k, v in (nearest or {}).items()}
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.base[index]
        rng = np.random.default_rng([self.seed, self.epoch, int(index), 23])
        own = item["prompt"]
        prompts = [own] + [self.negative(own, rng) if rng.random() < self.negative_share else own
                           for _ in range(self.prompts_per_image - 1)]
        zero = torch.zeros_like(item["density"])
        densities = [item["density"] if p == own else zero for p in prompts]
        counts = [float(item["count"]) if p == own else 0.0 for p in prompts]
        return {"image": item["image"], "density": torch.stack(densities), "count": torch.tensor(counts),
                "prompts": prompts, "name": item["name"]}

    def negative(self, own: str, rng: np.random.Generator) -> str:
        """A class name other than `own`: one of its nearest names (hard) or any other name."""
        hard = [n for n in self.nearest.get(own, []) if n != own]
        if hard and rng.random() < self.hard_negative_share:
            return hard[int(rng.integers(len(hard)))]
        others = [n for n in self.names if n != own]
        if not others:
            raise ConfigError("negative prompts need at least two class names in the training set")
        return others[int(rng.integers(len(others)))]


@torch.no_grad()
def nearest_class_names(model, names: Sequence[str], k: int = 3) -> dict[str, list[str]]:
    """Each class name -> the k other names whose text embeddings (the model's own text encoder,
    context tokens included) are most similar by cosine: the hard negatives of a dataset."""
    names = sorted(set(names))
    if len(names) < 2:
        return {n: [] for n in names}
    was_training = model.training
    model.eval()
    embeddings = []
    for start in range(0, len(names), 64):
        embeddings.append(model.encode_text(names[start:start + 64]).squeeze(1).float())  # (b, E)
    model.train(was_training)
    text = torch.nn.functional.normalize(torch.cat(embeddings), dim=-1)  # (C, E)
    similarity = text @ text.t()
    similarity.fill_diagonal_(-float("inf"))
    top = similarity.topk(min(k, len(names) - 1), dim=1).indices  # (C, k)
    return {name: [names[j] for j in top[i].tolist()] for i, name in enumerate(names)}


__all__ = ["WithNegativePrompts", "nearest_class_names"]
