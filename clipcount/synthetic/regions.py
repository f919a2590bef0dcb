"""Region-level pretraining signal for the synthetic CLIP, and a probe of what its patches know.

Real CLIP's patch tokens carry what a patch shows (colour, part of an object) after web-scale
training; a CLIP pretrained on scene captions alone for minutes does not get there (28% zero-shot
class accuracy, a linear probe explaining 9% of per-patch counts). The world annotates every
object, so pretraining can teach patches directly: each patch's embedding (CLIP's own `ln_post` and
`proj` applied to the patch token) is classified against the text embeddings of

    the training classes + "background"        ("red circles", ...)
    the shapes + "background"                  ("circles", ...)
    the colours + "background"                 ("red objects", ...)

with soft targets: the share of the patch's pixels each class covers (`stream.class_fractions`).
The shape and colour heads teach the text tower each word on its own, which is what lets it
compose a held-out pair ("green triangles") that no pixel or caption of training ever showed.

`patch_probe` fits a linear classifier on frozen patch tokens (colour, shape) and reports held-out
accuracy: the before/after measurement of what the patches know.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from clipcount.modeling.clip import CLIP
from clipcount.synthetic.prompts import ALL_CLASSES, COLOURS, SHAPES, TRAIN_CLASSES, format_prompt

BACKGROUND = "background"


@dataclass(frozen=True)
class RegionTexts:
    """The texts of the three heads and, per head, the columns of `class_fractions` (0 =
    background, 1 + k = ALL_CLASSES[k]) each text's target sums. Held-out classes have no text and
    never occur in training crops."""

    texts: tuple[str, ...]
    heads: tuple[tuple[int, int], ...]  # (start, end) of each head's texts in `texts`
    columns: tuple[tuple[tuple[int, ...], ...], ...]  # per head, per text: fraction columns

    @classmethod
    def build(cls) -> "RegionTexts":
        def col(c: tuple[str, str]) -> int:
            return 1 + ALL_CLASSES.index(c)

        class_head = [(BACKGROUND, (0,))] + [(format_prompt(*c), (col(c),)) for c in TRAIN_CLASSES]
        shape_head = [(BACKGROUND, (0,))] + [
            (format_prompt(None, s), tuple(col(c) for c in ALL_CLASSES if c[1] == s)) for s in SHAPES]
        colour_head = [(BACKGROUND, (0,))] + [
            (f"{k} objects", tuple(col(c) for c in ALL_CLASSES if c[0] == k)) for k in COLOURS]
        texts, heads, columns = [], [], []
        for head in (class_head, shape_head, colour_head):
            heads.append((len(texts), len(texts) + len(head)))
            texts.extend(t for t, _ in head)
            columns.append(tuple(c for _, c in head))
        return cls(tuple(texts), tuple(heads), tuple(columns))

    def targets(self, fractions: torch.Tensor) -> list[torch.Tensor]:
        """Fractions (B, N, 1 + C) -> one soft target (B, N, T_h) per head (rows sum to 1 where the
        head covers every class present; a held-out class would leave its share out)."""
        out = []
        for cols in self.columns:
            summed = [fractions[..., list(c)].sum(-1) for c in cols]
            target = torch.stack(summed, dim=-1)
            out.append(target / target.sum(-1, keepdim=True).clamp_min(1e-6))
        return out


def patch_embeddings(clip: CLIP, tokens: torch.Tensor) -> torch.Tensor:
    """Vision output tokens (B, 1 + N, width) (`VisionTransformer.tokens`) -> patch embeddings
    (B, N, E) in the joint space."""
    return clip.visual.ln_post(tokens[:, 1:]) @ clip.visual.proj


def region_loss(clip: CLIP, tokens: torch.Tensor, fractions: torch.Tensor, text_tokens: torch.Tensor,
                texts: RegionTexts) -> torch.Tensor:
    """Vision output tokens (B, 1 + N, width), fractions (B, N, 1 + C), text token ids (T, L) ->
    scalar: the mean over heads of the soft cross-entropy of patch-text cosine logits."""
    patches = F.normalize(patch_embeddings(clip, tokens).float(), dim=-1)  # (B, N, E)
    text = F.normalize(clip.encode_text(text_tokens).float(), dim=-1)  # (T, E)
    logits = clip.logit_scale.exp().float() * patches @ text.t()  # (B, N, T)
    # Most patches are background: weighting each patch by 0.1 + its covered share keeps the loss
    # about the objects (which shape, which colour) instead of about finding the background.
    weight = 0.1 + (1.0 - fractions[..., 0].float())  # (B, N)
    weight = weight / weight.sum()
    losses = []
    for (start, end), target in zip(texts.heads, texts.targets(fractions.float())):
        log_probs = F.log_softmax(logits[..., start:end], dim=-1)
        losses.append(-((target * log_probs).sum(-1) * weight).sum())
    return torch.stack(losses).mean()


# ---- what the patches know ----------------------------------------------------------------------

@torch.no_grad()
def _probe_data(clip: CLIP, n: int, seed: int, crop: int, device) -> tuple[torch.Tensor, np.ndarray]:
    """Patch tokens (M, width) and labels (M, 2): colour and shape index of the object covering most of
    each patch (-1 for patches that are mostly background), from `n` test-mode scenes."""
    from clipcount.synthetic.pretrain import preprocess
    from clipcount.synthetic.stream import class_fractions
    from clipcount.synthetic.world import WorldConfig, make_scene

    world = WorldConfig(mode="test", height=crop, min_width=crop, max_width=crop, min_size=max(6.0, crop / 24),
                        max_size=max(12.0, crop / 8), max_per_class=30, classes_per_scene=(2, 4))
    grid = clip.cfg.vision.grid_size
    feats, labels = [], []
    for i in range(n):
        scene = make_scene(np.random.default_rng([seed, i]), world)
        fractions = class_fractions(scene, 0, 0, crop, grid)  # (N, 1 + C)
        image = torch.from_numpy(scene.image.transpose(2, 0, 1).copy())[None].to(device)
        tokens = clip.visual.tokens(preprocess(image, clip.cfg.vision.image_size))[0, 1:]  # (N, width)
        best = fractions[:, 1:].argmax(1)
        covered = fractions[:, 1:].max(1) >= 0.25
        colour = np.where(covered, best // len(SHAPES), -1)
        shape = np.where(covered, best % len(SHAPES), -1)
        feats.append(tokens.float().cpu())
        labels.append(np.stack([colour, shape], axis=1))
    return torch.cat(feats), np.concatenate(labels)


def patch_probe(clip: CLIP, n_train: int = 60, n_test: int = 30, seed: int = 40_000_000,
                crop: int = 384, device: str | torch.device = "cpu", ridge: float = 1.0) -> dict[str, float]:
    """Held-out accuracy of linear classifiers of colour and of shape from frozen patch tokens, on
    patches at least a quarter covered by one object (chance: 1/6 each). The classifiers are ridge
    regressions onto one-hot labels (closed form: deterministic, and no optimiser settings to tune).
    Scenes hold held-out classes too, so a probe reads colour and shape, not memorised pairs."""
    clip = clip.to(device).eval()
    x_train, y_train = _probe_data(clip, n_train, seed, crop, device)
    x_test, y_test = _probe_data(clip, n_test, seed + 1, crop, device)
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    out = {}
    for k, name in enumerate(("colour", "shape")):
        keep_train, keep_test = y_train[:, k] >= 0, y_test[:, k] >= 0
        if not keep_train.any() or not keep_test.any():
            out[name], out[f"{name}_patches"] = float("nan"), 0
            continue
        xs = torch.cat([x_train[keep_train], torch.ones(int(keep_train.sum()), 1)], dim=1).double()  # (M, C + 1)
        onehot = F.one_hot(torch.from_numpy(y_train[keep_train, k]), 6).double()  # (M, 6)
        gram = xs.t() @ xs + ridge * torch.eye(xs.shape[1], dtype=torch.float64)
        weights = torch.linalg.solve(gram, xs.t() @ onehot)  # (C + 1, 6)
        test = torch.cat([x_test[keep_test], torch.ones(int(keep_test.sum()), 1)], dim=1).double()
        guess = (test @ weights).argmax(1).numpy()
        out[name] = float(np.mean(guess == y_test[keep_test, k]))
        out[f"{name}_patches"] = int(keep_test.sum())
    return out


__all__ = ["BACKGROUND", "RegionTexts", "patch_embeddings", "patch_probe", "region_loss"]
