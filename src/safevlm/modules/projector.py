"""Safety projectors: vision features V (B, N, Dv) -> safety features S (B, M, Ds)."""

from __future__ import annotations

import math

import torch
from torch import nn

from safevlm.config import SafetyConfig


class MLPProjector(nn.Module):
    """Per-patch two-layer MLP; keeps all N features of each image (M = N, or each image's own
    count on bases with variable numbers of features: padding stays padding, masked by the head)."""

    keeps_length = True  # output row i has the valid features of input row i (lengths apply)

    def __init__(self, config: SafetyConfig):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(config.vision_hidden_size),
            nn.Linear(config.vision_hidden_size, config.safety_dim),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.safety_dim, config.safety_dim),
        )

    def forward(self, vision_features: torch.Tensor, lengths=None, grids=None) -> torch.Tensor:
        """(B, N, Dv) -> (B, N, Ds); each feature alone, so padded rows never touch valid ones."""
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

    Each image is pooled on its own 2-D grid: ``grids[i] = (offset, rows, cols)`` names the
    grid inside image i's features (an anyres image's unpadded tile grid, a dynamic-resolution
    image's patch grid); images with the same grid shape go through the convolutions together.
    Without ``grids`` (fixed-grid bases), N (without a CLS feature) must be a square grid; with
    the 'full' strategy the CLS feature is dropped before the grid is formed.
    """

    keeps_length = False  # always M tokens per image

    def __init__(self, config: SafetyConfig):
        super().__init__()
        self.grid = None
        self.has_cls = config.vision_feature_select_strategy == "full"
        if not config.variable_image_features:
            n = config.num_image_features
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

    def _fixed_grids(self, vision_features: torch.Tensor) -> torch.Tensor:
        if self.grid is None:
            raise ValueError("cabstractor on a base with variable image features needs each image's grid (grids)")
        offset = 1 if self.has_cls else 0
        n = vision_features.shape[1] - offset
        if n != self.grid * self.grid:
            raise ValueError(f"cabstractor was built for {self.grid * self.grid} patch features, got {n}")
        return torch.tensor([[offset, self.grid, self.grid]], dtype=torch.long).expand(vision_features.shape[0], 3)

    def forward(self, vision_features: torch.Tensor, lengths=None, grids=None) -> torch.Tensor:
        """(B, N, Dv) -> (B, M, Ds) with M = num_safety_features; ``grids`` (B, 3) long
        ``(offset, rows, cols)`` per image (default: the fixed square grid)."""
        grids = self._fixed_grids(vision_features) if grids is None else grids
        b = vision_features.shape[0]
        shapes: dict[tuple[int, int, int], list[int]] = {}
        for i, grid in enumerate(grids.tolist()):
            shapes.setdefault(tuple(grid), []).append(i)
        if len(shapes) == 1:  # one grid shape (every fixed-grid base): one batch, no scatter
            (offset, rows, cols), = shapes
            return self._pool(vision_features, offset, rows, cols)
        out = vision_features.new_empty((b, self.out_side * self.out_side, self.readout[-1].out_features))
        for (offset, rows, cols), idx in shapes.items():
            select = torch.tensor(idx, device=vision_features.device)
            out[select] = self._pool(vision_features.index_select(0, select), offset, rows, cols).to(out.dtype)
        return out

    def _pool(self, vision_features: torch.Tensor, offset: int, rows: int, cols: int) -> torch.Tensor:
        """Images sharing one grid: (n, N, Dv) -> (n, M, Ds)."""
        n, length, d = vision_features.shape
        if rows < 1 or cols < 1 or offset + rows * cols > length:
            raise ValueError(f"a {rows}x{cols} grid at feature {offset} does not fit {length} features")
        x = vision_features[:, offset:offset + rows * cols].transpose(1, 2).reshape(n, d, rows, cols)
        x = self.after(self.pool(self.before(self.stem(x))))
        x = x.flatten(2).transpose(1, 2)  # (n, M, Ds)
        return self.readout(x)


def build_safety_projector(config: SafetyConfig) -> nn.Module:
    """The projector named by ``config.projector_kind``."""
    kinds = {"mlp": MLPProjector, "cabstractor": CAbstractorProjector}
    if config.projector_kind not in kinds:
        raise ValueError(f"unknown projector_kind {config.projector_kind!r}; allowed: {', '.join(kinds)}")
    return kinds[config.projector_kind](config)
