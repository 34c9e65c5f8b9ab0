"""Gaussian score-map targets, made on the batch's device in one vectorised pass.

For joint k of sample n at input pixel (x, y) the target on the heatmap grid (u, v) is

    T[n, k, v, u] = exp(-((u - x/s)² + (v - y/s)²) / (2σ²))        (s = stride = 4)

with its peak (value 1) at the exact, unrounded u = x/s (pnfs.data.batch convention), so the
decoder's x = u·s has no constant bias. The weight is 1 for a labelled joint (v > 0) whose
heatmap position lies on the heatmap, u in [-0.5, w - 0.5) and v in [-0.5, h - 0.5); for any
other joint weight and map are 0. Every loader feeds this same function, so the numbers do
not depend on which loader produced the batch.
"""

from __future__ import annotations

import torch

from pnfs.data.batch import HEATMAP_STRIDE


def gaussian_targets(
    keypoints: torch.Tensor,
    heatmap_size: tuple[int, int],
    sigma: float = 2.0,
    stride: int = HEATMAP_STRIDE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets [N, K, h, w] float32 and weights [N, K] float32 for keypoints [N, K, 3].

    keypoints: (x, y) in input pixels and a label weight (> 0: labelled); heatmap_size: (h, w).
    The separable form exp(-du²/2σ²)·exp(-dv²/2σ²) is computed as an outer product.
    """
    if keypoints.ndim != 3 or keypoints.shape[-1] != 3:
        raise ValueError(f"keypoints must be [N, K, 3], got {tuple(keypoints.shape)}")
    h, w = heatmap_size
    kp = keypoints.float()
    u = kp[..., 0] / stride  # [N, K]
    v = kp[..., 1] / stride
    on_map = (u >= -0.5) & (u < w - 0.5) & (v >= -0.5) & (v < h - 0.5)
    weights = ((kp[..., 2] > 0) & on_map & torch.isfinite(u) & torch.isfinite(v)).float()
    us = torch.arange(w, device=kp.device, dtype=torch.float32)
    vs = torch.arange(h, device=kp.device, dtype=torch.float32)
    u = torch.nan_to_num(u)
    v = torch.nan_to_num(v)
    gx = torch.exp(-((us - u[..., None]) ** 2) / (2.0 * sigma**2))  # [N, K, w]
    gy = torch.exp(-((vs - v[..., None]) ** 2) / (2.0 * sigma**2))  # [N, K, h]
    # the weight goes into the small factor: broadcasting it over [h, w] costs 30x more on a CPU
    targets = (gy * weights[..., None])[..., :, None] * gx[..., None, :]
    return targets, weights
