"""CNN density decoder: interaction maps (coarse to fine) -> one density map at window resolution.

Stage k: [add lateral(map k) when there is a map at this resolution] -> conv3x3 + GroupNorm + GELU ->
x2 bilinear (all but the last stage). A 1x1 convolution to one channel, a resize to the window size
and the output activation (linear by default, see DecoderConfig.activation) then give the density.

The 1x1 convolution runs *before* the final resize: bilinear weights sum to 1, so resizing commutes
with a per-pixel affine map, and resizing one channel instead of `channels[-1]` (32) to 384x384 is
the same result for a thirty-second of the work and memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clipcount.config import DecoderConfig


def _conv_norm_act(in_ch: int, out_ch: int, kernel: int, groups: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size=kernel, padding=kernel // 2),
        nn.GroupNorm(groups, out_ch),
        nn.GELU(),
    )


_ACTIVATIONS = {
    "relu": F.relu,
    "softplus": F.softplus,
    "sigmoid": torch.sigmoid,
    "identity": lambda x: x,
}


class DensityDecoder(nn.Module):
    def __init__(self, cfg: DecoderConfig, in_channels: int, scales: int):
        super().__init__()
        channels = tuple(cfg.channels)
        if scales > len(channels):
            raise ValueError(f"{scales} interaction scales need at least {scales} decoder stages")
        self.activation = cfg.activation
        inputs = (in_channels,) + channels[:-1]
        self.convs = nn.ModuleList(
            _conv_norm_act(i, o, 3, cfg.groups) for i, o in zip(inputs, channels)
        )
        # lateral k adds interaction map k (k >= 1) at the input of stage k
        self.laterals = nn.ModuleList(
            _conv_norm_act(in_channels, channels[k - 1], 1, cfg.groups) for k in range(1, scales)
        )
        self.final_conv = nn.Sequential(nn.Conv2d(channels[-1], 1, kernel_size=1))

    def forward(self, maps: list[torch.Tensor], out_size: tuple[int, int]) -> torch.Tensor:
        """maps[k]: (B, C, h * 2**k, w * 2**k) -> density (B, 1, *out_size).

        Runs channels-last (the interaction's maps already are: no copy), which oneDNN and cuDNN
        convolve faster than the default layout."""
        maps = [m.contiguous(memory_format=torch.channels_last) for m in maps]
        x = maps[0]
        last = len(self.convs) - 1
        for stage, conv in enumerate(self.convs):
            if 1 <= stage < len(maps):
                x = x + self.laterals[stage - 1](maps[stage])
            x = conv(x)
            if stage < last:
                x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        # the head runs in float32 even under autocast: bf16 rounding of the pre-activation is
        # unbiased, but a convex activation (softplus, exp-like near 0) turns it into a bias of
        # +0.7% on every count; one channel, so it costs nothing
        with torch.autocast(x.device.type, enabled=False):
            x = self.final_conv(x.float())  # (B, 1, h, w)
            x = F.interpolate(x, size=out_size, mode="bilinear", align_corners=False)
            return _ACTIVATIONS[self.activation](x)
