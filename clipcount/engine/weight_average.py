"""An exponential moving average (EMA) of a model's trainable weights, kept beside training.

Why: with the small batches a CPU affords, the weights at the last step carry that step's noise;
the average over the last ~1 / (1 - decay) steps is a smoother model at no cost to training (it
never feeds back into the optimizer). `train` saves it as the `final/` model when
`TrainConfig.ema_decay` > 0; `last/` keeps the raw weights, and the average rides in the trainer
state so a resumed run continues it exactly.

Only parameters with requires_grad are averaged: the frozen CLIP would only be copied unchanged.
In the first steps the decay is capped at (1 + n) / (10 + n) after n updates, so the average is
not dominated by the initial weights when a run is short.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from clipcount.errors import CheckpointError, ConfigError


class WeightAverage:
    """EMA of `model`'s trainable parameters: shadow = decay * shadow + (1 - decay) * weight."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"ema_decay must be in (0, 1) (e.g. 0.998), or 0 for no average, not {decay}")
        self.decay = decay
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.shadow = [p.detach().clone() for p in self.params]
        self.updates = 0

    @torch.no_grad()
    def restart(self) -> None:
        """Start the average afresh from the model's current weights."""
        for p, s in zip(self.params, self.shadow):
            s.copy_(p)
        self.updates = 0

    def current_decay(self) -> float:
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current weights in; call after each optimizer step."""
        self.updates += 1
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - self.current_decay())

    @contextmanager
    @torch.no_grad()
    def applied(self) -> Iterator[None]:
        """The model holds the averaged weights inside the block and its own weights again after."""
        own = [p.detach().clone() for p in self.params]
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)
        try:
            yield
        finally:
            for p, o in zip(self.params, own):
                p.copy_(o)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates,
                "weights": {name: s for name, s in zip(self.names, self.shadow)}}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        weights = state["weights"]
        missing = sorted(set(self.names) - set(weights))
        if missing:
            raise CheckpointError(f"the saved weight average lacks {len(missing)} trainable parameters "
                                  f"(first: {missing[0]}); resume with the model it was trained with")
        for name, s in zip(self.names, self.shadow):
            s.copy_(weights[name])
        self.updates = int(state["updates"])
