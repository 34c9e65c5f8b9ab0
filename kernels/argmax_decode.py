"""Heatmap decoding: per (n, j) the argmax over H*W, its value, and the quarter offset.

    x = argmax column + 0.25 * sign(s[y, x+1] - s[y, x-1])   when 0 < x < W-1
    y = argmax row    + 0.25 * sign(s[y+1, x] - s[y-1, x])   when 0 < y < H-1

Coordinates are in heatmap pixels (x, y); ties in the argmax go to the first index in
row-major order.
"""

from __future__ import annotations

import torch


def argmax_decode_reference(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [N, J, H, W] -> coords [N, J, 2] (x, y) float32, maxvals [N, J] float32."""
    n, j, h, w = scores.shape
    flat = scores.float().reshape(n, j, h * w)
    index = flat.argmax(dim=-1)  # documented to return the first maximal index
    maxvals = flat.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    x = index % w
    y = index // w

    def at(yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
        return flat.gather(-1, (yy.clamp(0, h - 1) * w + xx.clamp(0, w - 1)).unsqueeze(-1)).squeeze(-1)

    dx = torch.sign(at(y, x + 1) - at(y, x - 1)) * ((x > 0) & (x < w - 1))
    dy = torch.sign(at(y + 1, x) - at(y - 1, x)) * ((y > 0) & (y < h - 1))
    coords = torch.stack([x.float() + 0.25 * dx, y.float() + 0.25 * dy], dim=-1)
    return coords, maxvals


def argmax_decode(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [N, J, H, W] -> (coords [N, J, 2] in heatmap pixels, maxvals [N, J])."""
    return argmax_decode_reference(scores)
