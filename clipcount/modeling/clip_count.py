"""CLIP-Count: the assembly of a frozen CLIP, prompts, patch-text interaction and a density decoder.

    images (B,3,H,W) in [0,1] ──resize+normalise──> prompted ViT ──> patch tokens (B, N, Cv)
                                                                   │ patch_feat_proj + positions
    prompts (P strings) ──tokenise──> text encoder + context ──> text (P, 1, E)
                                                                   ▼
                                  hierarchical interaction (14x14, 28x28, ...) ──> maps
                                  [text_similarity: + patch-text cosine map, one more channel]
                                                                   ▼
                                  CNN decoder ──> density (B, 1, H, W); count = sum / density_scale

`encode_image` and `encode_text` are separate so that one image can be counted for many prompts
(and one prompt over many windows) without encoding anything twice.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from clipcount.config import CLIP_MEAN, CLIP_STD, ClipCountConfig
from clipcount.errors import PromptError
from clipcount.modeling.clip import CLIP, on_meta_device
from clipcount.modeling.decoder import DensityDecoder
from clipcount.modeling.interaction import HierarchicalInteraction
from clipcount.modeling.prompts import TextContext, VisualPrompts
from clipcount.modeling.tokenizer import ClipTokenizer


def sincos_table(length: int, dim: int, shape_only: bool = False) -> torch.Tensor:
    """A fixed 1-D sine-cosine position table (1, length, dim), as in the published model.

    `shape_only`: an empty tensor of that shape, for models built on the meta device (the table is
    in every checkpoint, and computing it there would import torch's compiler stack: seconds)."""
    if shape_only:
        return torch.empty(1, length, dim)
    half = dim // 2
    freqs = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64) / half)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float().unsqueeze(0)


class ClipCount(nn.Module):
    def __init__(self, config: ClipCountConfig | None = None):
        super().__init__()
        self.config = config = config or ClipCountConfig()
        vision, width = config.clip.vision, config.interaction.width
        self.clip = CLIP(config.clip)
        self.visual_prompts = VisualPrompts(config.prompts, vision.width, config.compat)
        self.text_context = TextContext(config.prompts, config.clip.text.width, config.compat)
        self.patch_feat_proj = nn.Linear(vision.width, width)
        self.patch_feat_proj_contrast = nn.Linear(vision.width, config.clip.embed_dim)
        # the interaction attends to text in its own width; identity at the published sizes
        self.text_proj = (
            nn.Identity() if config.clip.embed_dim == width else nn.Linear(config.clip.embed_dim, width)
        )
        self.register_buffer("patch_pos_embed", sincos_table(vision.grid_size**2, width, shape_only=on_meta_device()))
        self.interaction = HierarchicalInteraction(config.interaction, config.compat)
        self.decoder = DensityDecoder(config.decoder, width + int(config.text_similarity), config.interaction.scales)
        if config.compat:  # present in the published checkpoint, unused in its forward pass
            self.unused = nn.ModuleDict({"decoder_norm": nn.LayerNorm(width), "decoder_ln_pre": nn.LayerNorm(width)})
            self.unused.requires_grad_(False)
        self.set_constant_buffers()
        self.tokenizer = ClipTokenizer()
        self.freeze_clip()

    def set_constant_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)create the buffers no checkpoint stores, e.g. after building on the meta device."""
        if device is None:
            device = self.patch_pos_embed.device if self.patch_pos_embed.device.type != "meta" else "cpu"
        self.register_buffer("pixel_mean", torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1), persistent=False)

    # ---- training set-up ----------------------------------------------------------------------

    def freeze_clip(self) -> None:
        """CLIP stays frozen (its image tower trains only when `train_image_encoder` is set)."""
        self.clip.requires_grad_(False)
        if self.config.train_image_encoder:
            self.clip.visual.requires_grad_(True)

    def train(self, mode: bool = True) -> "ClipCount":
        super().train(mode)
        if not self.config.train_image_encoder:
            self.clip.eval()  # frozen towers never run in training mode
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    # ---- encoders -----------------------------------------------------------------------------

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> CLIP input (B, 3, S, S), resized and normalised."""
        size = self.config.clip.vision.image_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(
                images, size=(size, size), mode="bilinear", align_corners=False, antialias=self.config.antialias
            )
        return (images - self.pixel_mean.to(images.dtype)) / self.pixel_std.to(images.dtype)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> patch tokens (B, N, Cv) after `vpt_norm` (no class token)."""
        check_images(images)
        tokens = self.visual_prompts(self.clip.visual, self.preprocess(images))  # (B, 1 + N, Cv)
        return tokens[:, 1:]

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        check_prompts(prompts)
        length = self.text_context.token_length(self.config.clip.text.context_length)
        return self.tokenizer(list(prompts), context_length=length).to(self.pixel_mean.device)

    def prompt_cut(self, prompt: str) -> str | None:
        """The words of `prompt` the text encoder reads when it is too long to read whole, else None.

        CLIP's context holds 77 tokens, less the start and end tokens and the learned context."""
        capacity = self.config.clip.text.context_length - 2 - self.text_context.num_tokens
        ids = self.tokenizer.encode(prompt)
        return self.tokenizer.decode(ids[:capacity]) if len(ids) > capacity else None

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """P prompts -> text embeddings (P, 1, E)."""
        return self.text_context(self.clip, self.tokenize(prompts))

    def contrastive_features(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, N, Cv) -> (B, N, E), compared with the text embedding by the contrastive loss."""
        return self.patch_feat_proj_contrast(patch_tokens)

    # ---- density ------------------------------------------------------------------------------

    def interaction_maps(self, patch_tokens: torch.Tensor, text: torch.Tensor) -> list[torch.Tensor]:
        """Patch tokens (B, N, Cv), text (B, 1, E) -> maps (B, C [+ 1], g * 2**k, g * 2**k), one per scale."""
        return self.maps_from_shared(self.shared_features(patch_tokens), text)

    def shared_features(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, N, Cv) -> (B, N, C) or, with `text_similarity`, (B, N, C + E): the start of
        the interaction that no prompt changes (projection, positions, the first self-attention), and
        then the unit-length contrastive features; computed once per window for all prompts. One
        tensor, so callers can cache, batch and repeat it without knowing what it holds."""
        grid = int(math.isqrt(patch_tokens.shape[1]))
        x = self.patch_feat_proj(patch_tokens) + self.patch_pos_embed.to(patch_tokens.dtype)
        x = self.interaction.start(x, (grid, grid))
        if not self.config.text_similarity:
            return x
        contrast = F.normalize(self.contrastive_features(patch_tokens).to(x.dtype), dim=-1)  # (B, N, E)
        return torch.cat([x, contrast], dim=-1)

    def maps_from_shared(self, shared: torch.Tensor, text: torch.Tensor) -> list[torch.Tensor]:
        """`shared_features` (B, N, C [+ E]), text (B, 1, E) -> the maps of `interaction_maps`:
        (B, C [+ 1], g * 2**k, g * 2**k), the similarity map (bilinear) as the last channel."""
        grid = int(math.isqrt(shared.shape[1]))
        width = self.config.interaction.width
        maps = self.interaction.finish(shared[..., :width], (grid, grid), self.text_proj(text))
        if not self.config.text_similarity:
            return maps
        unit_text = F.normalize(text.to(shared.dtype), dim=-1)  # (B, 1, E)
        similarity = (shared[..., width:] * unit_text).sum(-1)  # (B, N): cosine, as in the contrastive loss
        similarity = similarity.view(-1, 1, grid, grid)
        return [torch.cat([m, F.interpolate(similarity, size=m.shape[-2:], mode="bilinear", align_corners=False)],
                          dim=1) for m in maps]

    def decode(self, maps: list[torch.Tensor], out_size: tuple[int, int]) -> torch.Tensor:
        return self.decoder(maps, out_size)

    def density_from_features(
        self, patch_tokens: torch.Tensor, text: torch.Tensor, out_size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Patch tokens (B, N, Cv), text (B, 1, E) or (1, 1, E) -> density (B, 1, H, W)."""
        return self.density_from_shared(self.shared_features(patch_tokens), text, out_size)

    def density_from_shared(
        self, shared: torch.Tensor, text: torch.Tensor, out_size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """`shared_features` (B, N, C), text (B, 1, E) or (1, 1, E) -> density (B, 1, H, W)."""
        if text.shape[0] == 1 and shared.shape[0] > 1:
            text = text.expand(shared.shape[0], -1, -1)
        size = out_size or (self.config.window_size, self.config.window_size)
        return self.decode(self.maps_from_shared(shared, text), size)

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] and B prompts -> density (B, 1, H, W)."""
        check_images(images)
        check_prompts(prompts, batch=images.shape[0])
        return self.density_from_features(self.encode_image(images), self.encode_text(prompts), images.shape[-2:])

    def count(self, density: torch.Tensor) -> torch.Tensor:
        """Density (B, 1, H, W) -> counts (B,): sums / density_scale, floored at 0 (a linear head can
        sum slightly below 0 where there is nothing to count)."""
        return (density.sum(dim=(1, 2, 3)) / self.config.density_scale).clamp(min=0)


def check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected images as a tensor (B, 3, H, W) with values in [0, 1], got {shape}")


def check_prompts(prompts: Sequence[str], batch: int | None = None) -> None:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise PromptError(f"expected a list of prompt strings, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise PromptError("the prompt list is empty; give one text prompt per image, e.g. ['apples']")
    if batch is not None and len(prompts) != batch:
        raise PromptError(f"got {len(prompts)} prompts for {batch} images; give exactly one prompt per image")
    for prompt in prompts:
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptError(f"prompt {prompt!r} is empty; say what to count, e.g. 'red cars'")
