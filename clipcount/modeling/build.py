"""Building a CLIP-Count model: fresh on top of CLIP weights, or from a saved clipcount checkpoint."""

from __future__ import annotations

import os
from collections.abc import Callable

from clipcount.config import ClipCountConfig
from clipcount.modeling.checkpoint import load_model
from clipcount.modeling.clip_count import ClipCount
from clipcount.modeling.weights import load_state_strict, read_clip


def build_model(config: ClipCountConfig | None = None, clip_weights: str | os.PathLike | None = None,
                clip_activation: str | None = None, say: Callable[[str], None] | None = None) -> ClipCount:
    """A new model whose CLIP comes from `clip_weights` (OpenAI/OpenCLIP file, HF folder or hub id).

    The CLIP architecture is read from the weights, so `config.clip` is replaced by it; its
    activation from the source's config, else `clip_activation`, else QuickGELU, and `say` is told
    which and why (a bare file cannot say it, and the wrong one shifts every embedding).
    """
    config = config or ClipCountConfig()
    if clip_weights is not None:
        weights = read_clip(clip_weights, activation=clip_activation)
        if say is not None:
            say(weights.describe(clip_weights))
        config.clip = weights.config
        model = ClipCount(config)
        load_state_strict(model.clip, weights.state, str(clip_weights))
        return model
    return ClipCount(config)


def load_or_build(source: str | os.PathLike | None, config: ClipCountConfig | None = None,
                  clip_weights: str | os.PathLike | None = None) -> ClipCount:
    """Resume from a clipcount checkpoint when `source` is given, else build fresh."""
    if source is not None:
        return load_model(source)
    return build_model(config, clip_weights)
