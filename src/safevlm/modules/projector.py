"""Safety projectors: vision features V (B, N, Dv) -> safety features S (B, M, Ds)."""

from __future__ import annotations

import math

import torch
from torch import nn

from safevlm.config import SafetyConfig


class MLPProjector(nn.Module):
    """Per-patch two-layer MLP; keeps all N features (M = N)."""

    def __init__(self, config: SafetyConfig):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(config.vision_hidden_size),
            nn.Linear(config.vision_hidden_size, config.safety_dim),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.safety_dim, config.safety_dim),
        )

    def forward(self, vision_features: torch.Tensor) -> torch.Tensor:
        """(B, N, Dv) -> (B, N, Ds)."""
        return self.net(vision_features)


class _ResidualConvBlock(nn.Module):
    """Pre-norm residual block: GroupNorm -> SiLU -> 3x3 conv, twice."""

    def __init__(self, channels: int, dropout: float):
        super().__init__()
        groups = math.gcd(channels, 32)
        self.body = nn.Sequential(
            nn.GroupNorm(groups, channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(groups, channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class CAbstractorProjector(nn.Module):
    """C-Abstractor-style projector (Honeybee): conv residual blocks over the patch grid,
    adaptive average pooling to a square grid of M tokens, more blocks, then an MLP readout.

    Needs N (without a CLS feature) to be a square grid; with the 'full' strategy the CLS
    feature is dropped before the grid is formed.
    """

    def __init__(self, config: SafetyConfig):
        super().__init__()
        n = config.num_image_features
        self.has_cls = config.vision_feature_select_strategy == "full"
        grid_tokens = n - 1 if self.has_cls else n
        self.grid = math.isqrt(grid_tokens)
        if self.grid * self.grid != grid_tokens:
            raise ValueError(
                f"cabstractor needs the image features to form a square grid; got {grid_tokens} patch features"
            )
        self.out_side = math.isqrt(config.num_safety_features)
        width = config.safety_dim
        self.stem = nn.Conv2d(config.vision_hidden_size, width, 1)
        self.before = nn.Sequential(*[_ResidualConvBlock(width, config.dropout) for _ in range(config.cabstractor_depth)])
        self.pool = nn.AdaptiveAvgPool2d(self.out_side)
        self.after = nn.Sequential(*[_ResidualConvBlock(width, config.dropout) for _ in range(config.cabstractor_depth)])
        self.readout = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))

    def forward(self, vision_features: torch.Tensor) -> torch.Tensor:
        """(B, N, Dv) -> (B, M, Ds) with M = num_safety_features."""
        if self.has_cls:
            vision_features = vision_features[:, 1:]
        b, n, d = vision_features.shape
        if n != self.grid * self.grid:
            raise ValueError(f"cabstractor was built for {self.grid * self.grid} patch features, got {n}")
        x = vision_features.transpose(1, 2).reshape(b, d, self.grid, self.grid)
        x = self.after(self.pool(self.before(self.stem(x))))
        x = x.flatten(2).transpose(1, 2)  # (B, M, Ds)
        return self.readout(x)


def build_safety_projector(config: SafetyConfig) -> nn.Module:
    """The projector named by ``config.projector_kind``."""
    kinds = {"mlp": MLPProjector, "cabstractor": CAbstractorProjector}
    if config.projector_kind not in kinds:
        raise ValueError(f"unknown projector_kind {config.projector_kind!r}; allowed: {', '.join(kinds)}")
    return kinds[config.projector_kind](config)
