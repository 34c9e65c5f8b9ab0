"""``argmax_decode``: reference, Triton under the interpreter, compiled ahead of time, and on a GPU.

Markers: ``interpret`` (Triton on CPU, ``TRITON_INTERPRET=1``: ``make test-interpret``), ``aot``
(compiled for sm_80/sm_90 here, no GPU: ``kernels/aot.py``), ``gpu`` (needs CUDA); the
rest runs in the normal pass. Hand-built cases: ``support/kernel_cases.py``.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pnfs.kernels import argmax_decode, argmax_decode_reference
from tests.support.kernel_cases import (
    DRAWN,
    DRAWN_DTYPES,
    DRAWN_LAYOUTS,
    MULTI_TILE_PIXELS,
    aot_cases,
    assert_compiles_without_spills_within_shared_memory,
    assert_decoded,
    assert_no_atomic_operations,
    assert_vectorised_global_loads,
    decode_batch,
    in_drawn_layout,
    in_layout,
    triton_for_interpreter_cases,  # noqa: F401  (autouse fixture)
)

# -------------------------------------------------------------------- reference


def test_reference_decoding_of_hand_built_maps():
    maps, expected_xy, peak = decode_batch()
    assert_decoded(*argmax_decode_reference(maps), expected_xy, peak)
    assert_decoded(*argmax_decode_reference(maps.to(memory_format=torch.channels_last)), expected_xy, peak)


# ------------------------------------------------- Triton under the interpreter


@pytest.mark.interpret
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_argmax_decode_hand_built_maps(layout):
    """Ties, peaks on each border and corner, all-zero and constant maps, NaN, +-inf."""
    maps, expected_xy, peak = decode_batch()
    assert_decoded(*argmax_decode(in_layout(maps, layout)), expected_xy, peak)


@pytest.mark.interpret
def test_argmax_decode_tie_between_pixels_of_the_same_lane_in_different_blocks():
    """The kernel scans 1024 pixels per step; a tie 1024 pixels later must not win."""
    scores = torch.zeros(1, 2, 40, 30)
    scores.view(1, 2, -1)[0, 0, [5, 5 + 1024]] = 1.0
    scores.view(1, 2, -1)[0, 1, [100, 100 + 1024, 3]] = torch.tensor([2.0, 2.0, 1.0])
    coords, maxvals = argmax_decode(scores)
    torch.testing.assert_close(coords, torch.tensor([[[5.0, 0.0], [10.0, 3.0]]]), rtol=0, atol=0)
    torch.testing.assert_close(maxvals, torch.tensor([[1.0, 2.0]]), rtol=0, atol=0)


@pytest.mark.interpret
@pytest.mark.parametrize(
    "shape, dtype, layout",
    [
        ((2, 17, 24, 18), torch.float32, "nchw"),  # realistic small (96x72 input / 4)
        ((1, 1, 13, 11), torch.float32, "nchw"),
        ((3, 16, 33, 35), torch.float32, "channels_last"),  # more than one block of pixels
        ((2, 5, 9, 7), torch.bfloat16, "nchw"),  # rounding makes ties: first index must win
        ((2, 3, 40, 30), torch.bfloat16, "nchw"),  # ties more than one block (1024 px) apart
        ((2, 5, 9, 7), torch.float16, "strided"),
    ],
)
def test_argmax_decode_matches_reference_on_random_maps(shape, dtype, layout):
    scores = in_layout(torch.rand(shape).to(dtype), layout)
    coords, maxvals = argmax_decode(scores)
    ref_coords, ref_maxvals = argmax_decode_reference(scores)
    torch.testing.assert_close(coords, ref_coords, rtol=0, atol=0)
    torch.testing.assert_close(maxvals, ref_maxvals, rtol=0, atol=0)


@pytest.mark.interpret
@pytest.mark.parametrize("hw", MULTI_TILE_PIXELS)
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_argmax_decode_over_many_blocks_with_the_peak_anywhere(hw, where):
    h, w = hw
    scores = torch.rand(2, 3, h, w) * 0.5
    y, x = {"first": (0, 1), "middle": (h // 2, w // 2), "last": (h - 1, w - 2)}[where]
    scores[1, 2, y, x] = 1.0  # in the last block of 1024 px for "last"
    scores[1, 2, y, x + 1] = 0.9
    for row in (y - 1, y + 1):  # equal upper and lower neighbours: no y offset
        if 0 <= row < h:
            scores[1, 2, row, x] = 0.3
    coords, maxvals = argmax_decode(scores)
    ref_coords, ref_maxvals = argmax_decode_reference(scores)
    torch.testing.assert_close(coords, ref_coords, rtol=0, atol=0)
    torch.testing.assert_close(maxvals, ref_maxvals, rtol=0, atol=0)
    assert coords[1, 2].tolist() == [x + 0.25, float(y)]


@pytest.mark.interpret
@DRAWN
@given(
    n=st.integers(1, 2), j=st.integers(1, 3), h=st.integers(1, 40), w=st.integers(1, 40),
    dtype=DRAWN_DTYPES, layout=DRAWN_LAYOUTS, seed=st.integers(0, 2**16),
)  # fmt: skip
def test_argmax_decode_on_drawn_shapes(n, j, h, w, dtype, layout, seed):
    torch.manual_seed(seed)
    scores = in_drawn_layout(torch.rand(n, j, h, w).to(dtype), layout)
    coords, maxvals = argmax_decode(scores)
    ref_coords, ref_maxvals = argmax_decode_reference(scores)
    torch.testing.assert_close(coords, ref_coords, rtol=0, atol=0)
    torch.testing.assert_close(maxvals, ref_maxvals, rtol=0, atol=0)


@pytest.mark.interpret
def test_argmax_decode_batch_offsets_past_two_to_the_31_are_int64():
    """n * sN = 2 * (2^30 + 16) > 2^31 - 1 with both factors below 2^31: in int32 it wraps.

    A view of 3 uint8 maps whose batch stride is 2^30 + 16, starting 2^31 elements into a
    4 GiB storage that is allocated but never touched (only 48 elements and the decoy are
    written). Wrapped int32 offsets would land on element 2^31 + 2^31 + 32 - 2^32 = 32 of the
    storage, where a decoy peak of 7 sits; int64 offsets read map 2's real peak of 9.
    """
    batch_stride = 2**30 + 16
    storage = torch.empty(2**32 + 64, dtype=torch.uint8)
    maps = storage.as_strided((3, 1, 4, 4), (batch_stride, 16, 4, 1), storage_offset=2**31)
    maps.zero_()
    maps[2, 0, 1, 2], maps[2, 0, 1, 3] = 9, 5  # peak at (x=2, y=1), larger right neighbour
    storage[:64] = 0
    storage[32 + 1 * 4 + 3] = 7  # where map 2's (x=3, y=1) would be read with wrapped offsets
    coords, maxvals = argmax_decode(maps)
    assert coords[2].tolist() == [[2.25, 1.0]] and maxvals[2].tolist() == [9.0]
    ref_coords, ref_maxvals = argmax_decode_reference(maps)
    torch.testing.assert_close(coords, ref_coords, rtol=0, atol=0)
    torch.testing.assert_close(maxvals, ref_maxvals, rtol=0, atol=0)


# ------------------------------------------------- ahead of time (sm_80, sm_90)


@pytest.mark.aot
@pytest.mark.parametrize("spec, device", aot_cases("argmax_decode"))
def test_aot_compiles_without_spills_within_shared_memory(spec, device):
    assert_compiles_without_spills_within_shared_memory(spec, device)


@pytest.mark.aot
@pytest.mark.parametrize("spec, device", aot_cases("argmax_decode"))
def test_aot_has_no_atomic_operations(spec, device):
    assert_no_atomic_operations(spec, device)


@pytest.mark.aot
@pytest.mark.parametrize("spec, device", aot_cases("argmax_decode", dense_only=True))
def test_aot_dense_paths_vectorise_their_global_loads(spec, device):
    assert_vectorised_global_loads(spec, device)


# --------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
def test_argmax_decode_on_gpu_matches_reference(monkeypatch):
    monkeypatch.setenv("PNFS_KERNELS", "triton")
    maps, expected_xy, peak = decode_batch()
    assert_decoded(*(t.cpu() for t in argmax_decode(maps.cuda())), expected_xy, peak)
    s = torch.rand(32, 17, 96, 72, device="cuda")
    torch.testing.assert_close(argmax_decode(s), argmax_decode_reference(s), rtol=0, atol=0)
    s = in_layout(torch.rand(32, 17, 96, 72), "channels_last").cuda()  # the strided path
    torch.testing.assert_close(argmax_decode(s), argmax_decode_reference(s), rtol=0, atol=0)
