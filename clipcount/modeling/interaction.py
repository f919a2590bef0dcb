"""Hierarchical patch-text interaction: self-attention over patches, cross-attention to the text, MLP.

Block 0 runs on the ViT's patch grid (14x14 for ViT-B/16); every further block first refines the map
with a 3x3 convolution, doubles its resolution (28x28, 56x56, ...) and then runs the same three
sub-layers. Each block's output is kept as a map for the decoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clipcount.config import InteractionConfig
from clipcount.modeling.clip import in_weight_dtype


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, length, width = x.shape
    return x.view(batch, length, heads, width // heads).transpose(1, 2)  # (B, h, L, d)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    batch, heads, length, dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * dim)


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N, C), computed in the weights' dtype (in_weight_dtype), answered in x's."""
        return in_weight_dtype(self._forward, x, self.qkv.weight)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (_split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(_merge_heads(out))


class CrossAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.wq = nn.Linear(width, width)
        self.wk = nn.Linear(width, width)
        self.wv = nn.Linear(width, width)
        self.proj = nn.Linear(width, width)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # x: (B, N, C) queries; context: (B, T, C) keys and values
        if context.shape[1] == 1 and not (self.training and self.dropout):
            # One key (CLIP-Count's single text token): every query gives it softmax weight exactly
            # 1, so each query receives its value; the queries need not be computed at all. The
            # output and every gradient are those of full attention: wq, wk and the block's norm1
            # only ever get zero gradients, so they are left out of the graph and AdamW skips them.
            # In training that saves ~5% of a density step on 2 CPU cores. Attention dropout would
            # drop the one weight, so training with it takes the full path.
            return self.proj(self.wv(context)).expand(-1, x.shape[1], -1)
        return self.full_attention(x, context)

    def full_attention(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x (B, N, C), context (B, T, C) -> (B, N, C), whatever T."""
        q = _split_heads(self.wq(x), self.heads)
        k = _split_heads(self.wk(context), self.heads)
        v = _split_heads(self.wv(context), self.heads)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(_merge_heads(out))


class FeedForward(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return in_weight_dtype(lambda t: self.fc2(self.act(self.fc1(t))), x, self.fc1.weight)


class InteractionBlock(nn.Module):
    """One scale of patch-text interaction; `upsample` blocks refine and double the map first."""

    def __init__(self, cfg: InteractionConfig, upsample: bool, has_conv: bool):
        super().__init__()
        width = cfg.width
        self.upsample = upsample
        self.norm0 = nn.LayerNorm(width)
        if has_conv:  # block 0 of the published model owns an unused conv0
            self.conv0 = nn.Conv2d(width, width, kernel_size=3, padding=1)
        self.selfattn = SelfAttention(width, cfg.heads, cfg.dropout)
        self.norm1 = nn.LayerNorm(width)
        self.attn = CrossAttention(width, cfg.heads, cfg.dropout)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = FeedForward(width, int(width * cfg.mlp_ratio))

    def forward(self, x: torch.Tensor, grid: tuple[int, int], text: torch.Tensor):
        """x (B, N, C) on `grid`, text (B, T, C) -> (x (B, N', C), grid')."""
        x, grid = self.attend_patches(x, grid)
        return self.attend_text(x, text), grid

    def attend_patches(self, x: torch.Tensor, grid: tuple[int, int]):
        """The text-independent first half: [refine and double the map,] self-attention."""
        if self.upsample:
            x, grid = self._refine_and_upsample(x, grid)
        return x + self.selfattn(self.norm0(x)), grid

    def attend_text(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The second half: cross-attention to the text (B, T, C), then the MLP."""
        x = x + self.attn(self.norm1(x), text)
        return x + self.mlp(self.norm2(x))

    def _refine_and_upsample(self, x: torch.Tensor, grid: tuple[int, int]):
        fmap = tokens_to_map(x, grid)  # (B, C, h, w), channels-last
        fmap = fmap + F.gelu(self.conv0(fmap))
        fmap = F.interpolate(fmap, scale_factor=2, mode="bilinear", align_corners=False)
        return map_to_tokens(fmap), (2 * grid[0], 2 * grid[1])


class HierarchicalInteraction(nn.Module):
    def __init__(self, cfg: InteractionConfig, compat: bool = False):
        super().__init__()
        if cfg.scales < 1:
            raise ValueError(f"interaction needs at least one scale, got {cfg.scales}")
        self.fim_blocks = nn.ModuleList(
            InteractionBlock(cfg, upsample=i > 0, has_conv=i > 0 or compat) for i in range(cfg.scales)
        )

    def forward(self, patches: torch.Tensor, grid: tuple[int, int], text: torch.Tensor) -> list[torch.Tensor]:
        """patches (B, N, C) on `grid`, text (B, T, C) -> one map per scale, (B, C, h * 2**k, w * 2**k),
        channels-last."""
        return self.finish(self.start(patches, grid), grid, text)

    def start(self, patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """patches (B, N, C) -> (B, N, C): block 0's self-attention, which no prompt changes (one
        image counted for many prompts runs it once)."""
        return self.fim_blocks[0].attend_patches(patches, grid)[0]

    def finish(self, x: torch.Tensor, grid: tuple[int, int], text: torch.Tensor) -> list[torch.Tensor]:
        """`start`'s output (B, N, C) on `grid`, text (B, T, C) -> the maps of `forward`."""
        maps = []
        for index, block in enumerate(self.fim_blocks):
            if index > 0:
                x, grid = block.attend_patches(x, grid)
            x = block.attend_text(x, text)
            maps.append(tokens_to_map(x, grid))
        return maps


# Tokens (B, h*w, C) are a channels-last map (B, C, h, w) in memory already: converting either way is
# a view, and convolutions, GroupNorm and resizing run faster on channels-last maps (oneDNN, cuDNN).

def tokens_to_map(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, h*w, C) -> (B, C, h, w) in channels-last memory order, without copying contiguous tokens."""
    return x.reshape(x.shape[0], grid[0], grid[1], x.shape[2]).permute(0, 3, 1, 2)


def map_to_tokens(fmap: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h*w, C); a view for channels-last maps."""
    return fmap.permute(0, 2, 3, 1).reshape(fmap.shape[0], -1, fmap.shape[1])
