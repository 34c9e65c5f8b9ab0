"""Hand-built decoding cases shared by the reference tests and the Triton (interpreter) tests.

Each case is one 5x7 map (H=5, W=7) with the coordinates (x, y) and peak value a correct decoder
must return: argmax with the first index on ties, 0.25 px toward the larger neighbour when the
peak is not on that axis' border, and the NaN policy of ``pnfs.kernels.argmax_decode``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

H, W = 5, 7
NAN = float("nan")
INF = float("inf")


@dataclass(frozen=True)
class DecodeCase:
    name: str
    values: dict[tuple[int, int], float]  # (x, y) -> value; every other pixel is ``background``
    x: float
    y: float
    peak: float
    background: float = 0.0

    def map(self) -> torch.Tensor:
        m = torch.full((H, W), self.background)
        for (x, y), v in self.values.items():
            m[y, x] = v
        return m


DECODE_CASES = [
    # tie between (2, 1) and (5, 3): the first in row-major order wins; right > left, below == above
    DecodeCase(
        "tie", {(2, 1): 1.0, (5, 3): 1.0, (3, 1): 0.5, (1, 1): 0.2, (2, 0): 0.3, (2, 2): 0.3}, 2.25, 1.0, 1.0
    ),
    DecodeCase("tie_in_one_row", {(1, 2): 2.0, (4, 2): 2.0, (2, 2): 1.0}, 1.25, 2.0, 2.0),
    DecodeCase("top_border", {(3, 0): 1.0, (4, 0): 0.1, (2, 0): 0.4, (3, 1): 0.9}, 2.75, 0.0, 1.0),
    DecodeCase("bottom_border", {(3, 4): 1.0, (4, 4): 0.6, (2, 4): 0.4, (3, 3): 0.9}, 3.25, 4.0, 1.0),
    DecodeCase("left_border", {(0, 2): 1.0, (0, 3): 0.6, (0, 1): 0.4, (1, 2): 0.9}, 0.0, 2.25, 1.0),
    DecodeCase("right_border", {(6, 2): 1.0, (6, 3): 0.1, (6, 1): 0.4, (5, 2): 0.9}, 6.0, 1.75, 1.0),
    DecodeCase("top_left_corner", {(0, 0): 1.0, (1, 0): 0.5, (0, 1): 0.5}, 0.0, 0.0, 1.0),
    DecodeCase("bottom_right_corner", {(6, 4): 1.0, (5, 4): 0.5, (6, 3): 0.5}, 6.0, 4.0, 1.0),
    DecodeCase("interior_equal_neighbours", {(3, 2): 1.0, (2, 2): 0.5, (4, 2): 0.5}, 3.0, 2.0, 1.0),
    DecodeCase("all_zero", {}, 0.0, 0.0, 0.0),
    DecodeCase("constant", {}, 0.0, 0.0, 0.25, background=0.25),
    # NaN counts as the maximum: the first NaN (row 2 before row 3) is the peak, value NaN
    DecodeCase(
        "nan_peak", {(1, 3): NAN, (4, 2): NAN, (5, 1): 9.0, (5, 2): 0.5, (4, 3): 0.2}, 4.25, 2.25, NAN
    ),
    # a NaN neighbour (of a NaN peak: any NaN is the peak) gives no offset on its axis
    DecodeCase("nan_neighbour", {(3, 2): NAN, (4, 2): NAN, (2, 2): 1.0, (3, 3): 1.0}, 3.0, 2.25, NAN),
    DecodeCase("all_nan", {}, 0.0, 0.0, NAN, background=NAN),
    DecodeCase("negative", {(4, 1): -0.5, (4, 2): -0.7, (4, 0): -0.9}, 4.0, 1.25, -0.5, background=-1.0),
    DecodeCase("minus_inf", {}, 0.0, 0.0, -INF, background=-INF),
    DecodeCase("plus_inf", {(2, 3): INF, (3, 3): 1.0}, 2.25, 3.0, INF),
]


def decode_batch(cases: list[DecodeCase] = DECODE_CASES) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """scores [2, len(cases), H, W] (the cases, then again in reverse order) and expected coords, peaks."""
    maps = torch.stack([c.map() for c in cases])
    expected_xy = torch.tensor([[c.x, c.y] for c in cases])
    expected_peak = torch.tensor([c.peak for c in cases])
    flip = torch.arange(len(cases) - 1, -1, -1)
    return (
        torch.stack([maps, maps[flip]]),
        torch.stack([expected_xy, expected_xy[flip]]),
        torch.stack([expected_peak, expected_peak[flip]]),
    )


def vector_batch(d: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The cases with no negative value as vectors [2, J*d, H, W]: channel 0 of each joint holds the
    map value a >= 0 (or NaN), the others 0, so n^2 = a^2 keeps the map's order and ties and the
    expected peak is the score n^2 / (1 + n^2) of the case's peak."""
    cases = [c for c in DECODE_CASES if c.background >= 0 and not any(v < 0 for v in c.values.values())]
    cases = [c for c in cases if not math.isinf(c.peak)]
    maps, expected_xy, peak = decode_batch(cases)
    n, j, h, w = maps.shape
    vectors = torch.zeros(n, j, d, h, w)
    vectors[:, :, 0] = maps
    n2 = peak * peak
    return vectors.reshape(n, j * d, h, w), expected_xy, n2 / (1.0 + n2)


def assert_decoded(
    coords: torch.Tensor, maxvals: torch.Tensor, expected_xy: torch.Tensor, peak: torch.Tensor
):
    assert coords.dtype == torch.float32 and maxvals.dtype == torch.float32
    assert torch.isfinite(coords).all(), "coordinates must always be finite"
    torch.testing.assert_close(coords, expected_xy, rtol=0, atol=0)
    torch.testing.assert_close(maxvals, peak, rtol=0, atol=0, equal_nan=True)
