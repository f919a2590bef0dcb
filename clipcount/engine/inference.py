"""Inference on whole images: windows batched together, the image encoded once for all prompts,
text embeddings cached. Everything that counts (the API, the CLI, evaluation) goes through here.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Sequence

import torch

from clipcount.engine.windows import WINDOWINGS, merge_windows, plan_windows, resize_to_height, split_windows
from clipcount.modeling.clip_count import ClipCount, check_prompts


def pick_device(device: str | torch.device | None = None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype: bf16 on a GPU by default, none (float32) on the CPU."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if precision in ("fp32", "float32"):
        return None
    if precision in ("bf16", "bfloat16"):
        return torch.bfloat16
    raise ValueError(f"unknown precision {precision!r}; use auto, fp32 or bf16")


# On a CPU a few windows already keep the matmul units busy (3 windows of ViT-B/16 are 651 token
# rows); larger batches only raise peak memory (activations, allocator and oneDNN caches).
CPU_MAX_BATCH = 4


class DensityPredictor:
    """Counts images of any size with a `ClipCount` model, following the 384-high window protocol.

    `max_batch`: windows (and window-prompt pairs) per forward pass; at most CPU_MAX_BATCH on a CPU.
    `windowing`: "clipcount" or "published" (engine.windows); default: the model's config says
    (converted published checkpoints say "published", to reproduce the published evaluation).
    """

    def __init__(self, model: ClipCount, stride: int = 128, max_batch: int = 64,
                 device: str | torch.device | None = None, precision: str = "auto", text_cache_size: int = 1024,
                 windowing: str | None = None):
        self.windowing = windowing or model.config.windowing
        if self.windowing not in WINDOWINGS:
            raise ValueError(f"unknown windowing {self.windowing!r}; use one of {', '.join(WINDOWINGS)}")
        self.device = pick_device(device)
        self.autocast_dtype = pick_dtype(self.device, precision)
        self.model = model.to(self.device).eval()
        self.stride = stride
        self.max_batch = min(max_batch, CPU_MAX_BATCH) if self.device.type == "cpu" else max_batch
        self.window = model.config.window_size
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._text_cache_size = text_cache_size

    @property
    def density_scale(self) -> float:
        return self.model.config.density_scale

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @torch.inference_mode()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """P prompts -> (P, 1, E), each prompt encoded once per predictor (LRU cache)."""
        check_prompts(prompts)
        missing = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        if missing:
            with self._autocast():
                encoded = self.model.encode_text(missing)
            for prompt, embedding in zip(missing, encoded):
                self._text_cache[prompt] = embedding
        for prompt in prompts:
            self._text_cache.move_to_end(prompt)
        while len(self._text_cache) > self._text_cache_size:
            self._text_cache.popitem(last=False)
        return torch.stack([self._text_cache[p] for p in prompts])

    @torch.inference_mode()
    def encode_windows(self, windows: torch.Tensor) -> torch.Tensor:
        """(K, 3, S, S) in [0, 1] -> patch tokens (K, N, C), in chunks of `max_batch`."""
        chunks = []
        with self._autocast():
            for first in range(0, windows.shape[0], self.max_batch):
                chunk = windows[first : first + self.max_batch].to(self.device, non_blocking=True)
                chunks.append(self.model.encode_image(chunk))
        return torch.cat(chunks)

    @torch.inference_mode()
    def decode_windows(self, features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Patch tokens (K, N, C) x text (P, 1, E) -> densities (P, K, 1, S, S), all pairs batched.

        What no prompt changes (`shared_features`) is computed once per window, not once per pair.
        """
        windows, prompts = features.shape[0], text.shape[0]
        pairs = [(p, k) for p in range(prompts) for k in range(windows)]
        outputs = []
        with self._autocast():
            shared = torch.cat([self.model.shared_features(features[first : first + self.max_batch])
                                for first in range(0, windows, self.max_batch)])  # (K, N, C)
            for first in range(0, len(pairs), self.max_batch):
                chunk = pairs[first : first + self.max_batch]
                feats = shared[[k for _, k in chunk]]
                texts = text[[p for p, _ in chunk]]
                outputs.append(self.model.density_from_shared(feats, texts, (self.window, self.window)).float())
        return torch.cat(outputs).view(prompts, windows, 1, self.window, self.window)

    @torch.inference_mode()
    def predict(self, image: torch.Tensor, prompts: Sequence[str]) -> list[torch.Tensor]:
        """Image (3, H, W) in [0, 1] -> one density (window, W') per prompt, on the CPU, float32.

        The image is resized to the window height first; count = density.sum() / density_scale.
        """
        return self.predict_many([image], prompts)[0]

    @torch.inference_mode()
    def predict_many(self, images: Sequence[torch.Tensor], prompts: Sequence[str]) -> list[list[torch.Tensor]]:
        """Images [(3, H, W)] -> for each image, one density (window, W') per prompt (as `predict`).

        The windows of all images share forward passes of up to `max_batch` windows: on a GPU a
        few small images alone would leave most of it idle.
        """
        text = self.encode_prompts(prompts)
        plans, windows = [], []
        for image in images:
            resized, _, _ = resize_to_height(image.float(), self.window)
            plans.append(plan_windows(self.window, resized.shape[-1], self.window, self.stride, self.windowing))
            windows.append(split_windows(resized, plans[-1]))  # (K_i, 3, S, S)
        densities = self.decode_windows(self.encode_windows(torch.cat(windows)), text)  # (P, sum K_i, 1, S, S)
        results, first = [], 0
        for plan in plans:
            own = densities[:, first : first + plan.num_windows]
            results.append([merge_windows(d, plan)[0].cpu() for d in own])
            first += plan.num_windows
        return results

    def count(self, density: torch.Tensor) -> float:
        """A merged density map (..., H, W) -> its count, by the model's own rule (ClipCount.count:
        sum / density_scale, floored at 0)."""
        return float(self.model.count(density.reshape(1, 1, *density.shape[-2:]))[0])
