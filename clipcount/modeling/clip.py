"""CLIP image and text encoders (Radford et al. 2021), written for clipcount.

Parameter names follow OpenAI's layout (`visual.conv1.weight`, `transformer.resblocks.0.attn.in_proj_weight`,
...) so that OpenAI and OpenCLIP weights load by name and the published CLIP-Count checkpoint maps
one-to-one; `weights.py` renames the Hugging Face layout into this one.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from clipcount.config import CLIPConfig, TextConfig, VisionConfig


QUICK_GELU_SCALE = 1.702


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI's CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(QUICK_GELU_SCALE * x)


def in_weight_dtype(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fn(x) computed in `weight`'s dtype and answered in x's, outside autocast.

    With bf16 weight copies swapped in (engine.inference.CastWeights) a layer's matmuls run in bf16
    while what surrounds it (attention softmax, layer norms, the residual stream) stays float32;
    with float32 weights, or under autocast (which casts by its own rules), it is plain fn(x)."""
    if x.dtype == weight.dtype or torch.is_autocast_enabled(x.device.type):
        return fn(x)
    return fn(x.to(weight.dtype)).to(x.dtype)


def on_meta_device() -> bool:
    """Whether modules are being built on the meta device (shapes only, before loading a checkpoint)."""
    return torch.empty(0).device.type == "meta"


def random_parameter(*shape: int, scale: float) -> nn.Parameter:
    """`scale` * N(0, 1) values; on the meta device only the shape. (Random ops on meta run Python
    decompositions that import torch's compiler stack: seconds of start-up for values that the
    checkpoint replaces anyway.)"""
    if on_meta_device():
        return nn.Parameter(torch.empty(shape))
    return nn.Parameter(scale * torch.randn(shape))


def make_activation(name: str) -> nn.Module:
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"unknown activation {name!r}; use 'quick_gelu' or 'gelu'")


class MultiheadSelfAttention(nn.Module):
    """Self-attention with the packed `in_proj_weight` layout of `nn.MultiheadAttention`."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        # x: (B, L, C)
        batch, length, width = x.shape
        qkv = in_weight_dtype(lambda t: F.linear(t, self.in_proj_weight, self.in_proj_bias), x, self.in_proj_weight)
        qkv = qkv.view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=causal)
        return in_weight_dtype(self.out_proj, out.transpose(1, 2).reshape(batch, length, width), self.out_proj.weight)


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, activation: str):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = make_activation(activation)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return in_weight_dtype(self._forward, x, self.c_fc.weight)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.gelu, QuickGELU):
            return self._quick_gelu_forward(x)
        return self.c_proj(self.gelu(self.c_fc(x)))

    def _quick_gelu_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same MLP with QuickGELU as one fused SiLU: x * sigmoid(a x) = silu(a x) / a.

        The factors a and 1 / a ride along in the two matmuls (their alpha), so the activation is
        one pass over the block's widest tensor instead of three (multiply, sigmoid, multiply).
        """
        scale = QUICK_GELU_SCALE
        flat = x.reshape(-1, x.shape[-1])  # (B * L, C)
        hidden = torch.addmm(self.c_fc.bias * scale, flat, self.c_fc.weight.t(), alpha=scale)  # a * c_fc(x)
        out = torch.addmm(self.c_proj.bias, F.silu(hidden), self.c_proj.weight.t(), alpha=1 / scale)
        return out.view(*x.shape[:-1], out.shape[-1])


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, activation: str, eps: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = MultiheadSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, int(width * mlp_ratio), activation)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, activation: str, eps: float):
        super().__init__()
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_ratio, activation, eps) for _ in range(layers)
        )

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, causal=causal)
        return x


def linear_patchify(width: int, patch_size: int) -> nn.Conv2d:
    """CLIP's own stem: one linear map of each patch's pixels, (B, 3, S, S) -> (B, width, S / p, S / p)."""
    return nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of each pixel of a (B, C, H, W) map. Unlike GroupNorm it pools
    nothing across space, so a pixel keeps its absolute colour, and unlike BatchNorm it holds no
    running statistics that a frozen tower in train mode would update."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvStem(nn.Module):
    """Images (B, 3, S, S) -> patch tokens (B, width, S / patch, S / patch), like CLIP's `conv1`.

    log2(patch) stages, each a stride-2 3x3 convolution and a 3x3 convolution (channel LayerNorm and
    GELU after each), channels doubling up to `width` in the last stage; then a 1x1 convolution to
    `width`. Receptive field of a token: 31 px at patch 16, so it sees an object across patch borders.
    """

    def __init__(self, width: int, patch_size: int, eps: float = 1e-5):
        super().__init__()
        stages = patch_size.bit_length() - 1  # patch_size is a power of 2 (VisionConfig checks)
        layers: list[nn.Module] = []
        channels_in = 3
        for stage in range(stages):
            channels = max(8, width >> (stages - 1 - stage))
            layers += [nn.Conv2d(channels_in, channels, 3, stride=2, padding=1), ChannelLayerNorm(channels, eps=eps),
                       nn.GELU(), nn.Conv2d(channels, channels, 3, padding=1), ChannelLayerNorm(channels, eps=eps),
                       nn.GELU()]
            channels_in = channels
        layers.append(nn.Conv2d(channels_in, width, 1))
        self.layers = nn.Sequential(*layers)
        self.width = width

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


class HybridStem(ConvStem):
    """A ConvStem plus CLIP's linear patchify, summed: (B, 3, S, S) -> (B, width, S / patch, S / patch).

    Why both: trained on object crops, the conv stem's per-patch features in whole scenes name shape
    (a linear probe: 0.62) but lose colour (0.76); the patchify's linear map of each patch's pixels
    keeps it (summed: colour 0.90, shape 0.59).
    """

    def __init__(self, width: int, patch_size: int, eps: float = 1e-5):
        super().__init__(width, patch_size, eps)
        self.patchify = linear_patchify(width, patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images) + self.patchify(images)


def _make_stem(cfg: VisionConfig) -> nn.Module:
    """The module that turns pixels into patch tokens, by `VisionConfig.stem`."""
    if cfg.stem == "conv":
        return ConvStem(cfg.width, cfg.patch_size, cfg.layer_norm_eps)
    if cfg.stem == "hybrid":
        return HybridStem(cfg.width, cfg.patch_size, cfg.layer_norm_eps)
    return linear_patchify(cfg.width, cfg.patch_size)


class VisionTransformer(nn.Module):
    """CLIP's ViT. `embed` and `resblocks` are public so visual prompts can run it layer by layer."""

    def __init__(self, cfg: VisionConfig, activation: str):
        super().__init__()
        self.cfg = cfg
        width, grid = cfg.width, cfg.grid_size
        scale = width**-0.5
        # `conv1` keeps OpenAI's name for either stem, so every caller reaches the tokens one way
        self.conv1: nn.Module = _make_stem(cfg)
        self.class_embedding = random_parameter(width, scale=scale)
        self.positional_embedding = random_parameter(grid * grid + 1, width, scale=scale)
        self.ln_pre = nn.LayerNorm(width, eps=cfg.layer_norm_eps)
        self.transformer = Transformer(width, cfg.layers, cfg.heads, cfg.mlp_ratio, activation, cfg.layer_norm_eps)
        self.ln_post = nn.LayerNorm(width, eps=cfg.layer_norm_eps)
        self.proj = random_parameter(width, cfg.embed_dim, scale=scale)

    @property
    def resblocks(self) -> nn.ModuleList:
        return self.transformer.resblocks

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, S, S) -> tokens (B, 1 + N, width) with class token and positions."""
        # .to: under autocast the residual stream keeps the images' precision (float32) and only the
        # matmuls run in bf16; a bf16 stream loses ~0.7% of a count over 12 layers of additions
        patches = self.conv1(images).to(images.dtype)  # (B, C, g, g)
        grid = patches.shape[-2:]
        patches = patches.flatten(2).transpose(1, 2)  # (B, N, C)
        cls = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        tokens = torch.cat([cls, patches], dim=1)
        return tokens + self._positions(grid).to(tokens.dtype)

    def _positions(self, grid: tuple[int, int]) -> torch.Tensor:
        """Positional embedding, interpolated (bicubic) when the patch grid differs from training."""
        pos = self.positional_embedding
        trained = int(math.isqrt(pos.shape[0] - 1))
        if tuple(grid) == (trained, trained):
            return pos
        table = pos[1:].reshape(1, trained, trained, -1).permute(0, 3, 1, 2)
        table = F.interpolate(table, size=tuple(grid), mode="bicubic", align_corners=False)
        return torch.cat([pos[:1], table.flatten(2).squeeze(0).t()], dim=0)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, S, S) -> every output token (B, 1 + N, width), class token first."""
        return self.transformer(self.ln_pre(self.embed(images)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, S, S) -> CLIP image embeddings (B, embed_dim)."""
        return self.ln_post(self.tokens(images)[:, 0]) @ self.proj


class CLIP(nn.Module):
    """The two CLIP towers. Text attributes sit at the top level, as in OpenAI's layout."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        text: TextConfig = cfg.text
        self.visual = VisionTransformer(cfg.vision, cfg.activation)
        meta = on_meta_device()  # nn.Embedding draws its own N(0, 1) weights unless given some
        self.token_embedding = nn.Embedding(
            text.vocab_size, text.width, _weight=torch.empty(text.vocab_size, text.width) if meta else None
        )
        self.positional_embedding = random_parameter(text.context_length, text.width, scale=0.01)
        self.transformer = Transformer(
            text.width, text.layers, text.heads, text.mlp_ratio, cfg.activation, text.layer_norm_eps
        )
        self.ln_final = nn.LayerNorm(text.width, eps=text.layer_norm_eps)
        self.text_projection = random_parameter(text.width, cfg.embed_dim, scale=text.width**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        if not meta:
            nn.init.normal_(self.token_embedding.weight, std=0.02)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, S, S) -> (B, embed_dim), not L2-normalised."""
        return self.visual(images)

    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, L) -> (B, embed_dim), read at the end-of-text token (the largest id)."""
        return self.text_features(self.token_embedding(token_ids), token_ids.argmax(dim=-1))

    def text_features(self, token_embeddings: torch.Tensor, eot_index: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, L, width) -> (B, embed_dim), pooled at `eot_index` (B,)."""
        length = token_embeddings.shape[1]
        x = token_embeddings + self.positional_embedding[:length].to(token_embeddings.dtype)
        x = self.ln_final(self.transformer(x, causal=True))
        pooled = x[torch.arange(x.shape[0], device=x.device), eot_index]
        return pooled @ self.text_projection

    def forward(self, images: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Contrastive logits (B_img, B_txt) and their transpose, as in CLIP pretraining."""
        image = F.normalize(self.encode_image(images), dim=-1)
        text = F.normalize(self.encode_text(token_ids), dim=-1)
        logits = self.logit_scale.exp() * image @ text.t()
        return logits, logits.t()
