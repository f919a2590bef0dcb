"""Trainable prompts around the frozen CLIP: deep visual prompts (VPT) and text context tokens (CoOp)."""

from __future__ import annotations

import torch
from torch import nn

from clipcount.config import PromptConfig
from clipcount.modeling.clip import CLIP, VisionTransformer, random_parameter


class VisualPrompts(nn.Module):
    """Deep visual prompt tuning: `tokens` learnable tokens per prompted layer, after the class token.

    Layer i (i < layers) sees its own prompt tokens `vpt_proj(visual_prompt[i])`; before the first
    unprompted layer the prompt tokens are removed. `compat` reproduces the published indexing, where
    layer i >= 1 sees prompt i - 1 (prompt 0 twice, the last prompt never).
    Every output token then passes `vpt_norm`, a new LayerNorm (CLIP's ln_post is not used).
    """

    def __init__(self, cfg: PromptConfig, width: int, compat: bool = False):
        super().__init__()
        self.num_tokens = cfg.visual_tokens if cfg.visual_layers > 0 else 0
        self.num_layers = cfg.visual_layers if self.num_tokens > 0 else 0
        self.compat = compat
        if self.num_layers:
            self.visual_prompt = nn.Parameter(torch.empty(self.num_layers, self.num_tokens, width))
            nn.init.uniform_(self.visual_prompt, -width**-0.5, width**-0.5)
            self.vpt_proj = nn.Linear(width, width)
            self.dropout = nn.Dropout(cfg.visual_dropout)
        self.vpt_norm = nn.LayerNorm(width, eps=1e-6)

    def _prompt_for_layer(self, layer: int, batch: int) -> torch.Tensor:
        index = max(layer - 1, 0) if self.compat else layer
        prompt = self.dropout(self.vpt_proj(self.visual_prompt[index]))  # (T, C)
        return prompt.unsqueeze(0).expand(batch, -1, -1)

    def forward(self, vit: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, S, S) -> tokens (B, 1 + N, C), class token first, prompts removed."""
        tokens = vit.embed(images)  # (B, 1 + N, C)
        batch, count = tokens.shape[0], self.num_tokens
        if self.num_layers:
            prompt = self._prompt_for_layer(0, batch).to(tokens.dtype)
            tokens = torch.cat([tokens[:, :1], prompt, tokens[:, 1:]], dim=1)
        x = vit.ln_pre(tokens)
        for layer, block in enumerate(vit.resblocks):
            if 0 < layer < self.num_layers:
                prompt = self._prompt_for_layer(layer, batch).to(x.dtype)
                x = torch.cat([x[:, :1], prompt, x[:, 1 + count :]], dim=1)
            elif layer == self.num_layers and layer > 0:
                x = torch.cat([x[:, :1], x[:, 1 + count :]], dim=1)
            x = block(x)
        if self.num_layers >= len(vit.resblocks):  # every layer prompted: drop prompts at the end
            x = torch.cat([x[:, :1], x[:, 1 + count :]], dim=1)
        return self.vpt_norm(x)


class TextContext(nn.Module):
    """CoOp-style learnable context: [start, ctx_1..ctx_n, class tokens..., end-of-text, padding].

    The prompt is tokenised to `context_length - n` ids so that with the context inserted the sequence
    is exactly `context_length` long and its end-of-text token sits at (unshifted index + n).
    `compat` reproduces the published code: the prompt is tokenised to the full length, the last n
    positions are cut, and the feature is read at the *unshifted* end-of-text index (a context token for
    one-token class names, so "car" and "apples" got the same embedding).
    """

    def __init__(self, cfg: PromptConfig, width: int, compat: bool = False):
        super().__init__()
        self.num_tokens = cfg.text_context_tokens
        self.compat = compat
        self.learnable_context = random_parameter(self.num_tokens, width, scale=0.02)

    def token_length(self, context_length: int) -> int:
        """How many token ids the tokenizer should produce for one prompt."""
        return context_length if self.compat else context_length - self.num_tokens

    def forward(self, clip: CLIP, token_ids: torch.Tensor) -> torch.Tensor:
        """Token ids (P, token_length) -> text embeddings (P, 1, embed_dim)."""
        n, count = self.num_tokens, token_ids.shape[0]
        embeddings = clip.token_embedding(token_ids)  # (P, L, W)
        context = self.learnable_context.to(embeddings.dtype).unsqueeze(0).expand(count, -1, -1)
        tail = embeddings[:, 1 : embeddings.shape[1] - n] if self.compat else embeddings[:, 1:]
        sequence = torch.cat([embeddings[:, :1], context, tail], dim=1)
        eot_index = token_ids.argmax(dim=-1) + (0 if self.compat else n)
        return clip.text_features(sequence, eot_index).unsqueeze(1)
