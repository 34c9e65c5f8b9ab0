"""``PoseBatch``'s moves (``to``, ``to_device``, ``pin_memory``, ``len``) and :func:`to_device`.

Without CUDA the moves to a GPU are watched through stand-ins for ``Tensor.to``,
``Tensor.pin_memory`` and ``Tensor.is_pinned`` that record their calls: a host tensor bound
for CUDA must be pinned (when it is not) and copied with ``non_blocking=True``; every other
move is a plain ``.to(device)``. ``meta`` stands for "another device" where a real move is
wanted.
"""

from __future__ import annotations

import pytest
import torch

from pnfs.data.batch import HEATMAP_STRIDE, IMAGENET_MEAN, IMAGENET_STD, PoseBatch, to_device

FIELDS = ("image", "keypoints", "affine", "image_id", "ann_id", "score")


def _batch(n: int = 3) -> PoseBatch:
    """N = 3 crops of 8x6 pixels and 5 joints, every field distinct, with the documented dtypes."""
    return PoseBatch(
        image=torch.arange(n * 3 * 8 * 6, dtype=torch.float32).view(n, 3, 8, 6),
        keypoints=torch.arange(n * 5 * 3, dtype=torch.float32).view(n, 5, 3),
        affine=torch.arange(n * 6, dtype=torch.float32).view(n, 2, 3) + 0.5,
        image_id=torch.arange(n, dtype=torch.int64) + 100,
        ann_id=torch.arange(n, dtype=torch.int64) + 200,
        score=torch.linspace(0.25, 1.0, n),
    )


class _Calls:
    """Stand-ins for Tensor.to / pin_memory / is_pinned that record every call.

    ``to`` and ``pin_memory`` return a new tensor (a clone) whose identity is kept, so a test
    can tell which tensor was copied; ``is_pinned`` answers from ``pinned`` (the ids of the
    tensors "in page-locked memory")."""

    def __init__(self, monkeypatch, *, real_to: bool = False):
        self.to: list[tuple[int, tuple, dict]] = []
        self.pin: list[int] = []
        self.pinned: set[int] = set()
        self.made: dict[int, torch.Tensor] = {}
        original_to = torch.Tensor.to
        calls = self

        def to(self, *args, **kwargs):
            calls.to.append((id(self), args, kwargs))
            out = original_to(self, *args, **kwargs) if real_to else self.clone()
            calls.made[id(out)] = out
            return out

        def pin_memory(self, *args, **kwargs):
            assert not args and not kwargs
            calls.pin.append(id(self))
            out = self.clone()
            calls.made[id(out)] = out
            calls.pinned.add(id(out))
            return out

        def is_pinned(self, *args, **kwargs):
            return id(self) in calls.pinned

        monkeypatch.setattr(torch.Tensor, "to", to)
        monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
        monkeypatch.setattr(torch.Tensor, "is_pinned", is_pinned)


CUDA = torch.device("cuda", 0)  # a device object only: nothing runs on it here


def test_len_is_the_number_of_crops():
    assert len(_batch(3)) == 3
    assert len(_batch(1)) == 1


def test_to_moves_every_field_keeping_shapes_and_dtypes():
    batch = _batch()
    moved = batch.to("meta")
    assert moved is not batch
    for name in FIELDS:
        a, b = getattr(batch, name), getattr(moved, name)
        assert b.device.type == "meta", name
        assert (b.shape, b.dtype) == (a.shape, a.dtype), name
        assert a.device.type == "cpu", name  # the original is left as it was


def test_to_passes_non_blocking_on_and_defaults_to_blocking(monkeypatch):
    calls = _Calls(monkeypatch, real_to=True)
    batch = _batch()
    ids = [id(getattr(batch, name)) for name in FIELDS]
    batch.to("meta", non_blocking=True)
    assert calls.to == [(i, ("meta",), {"non_blocking": True}) for i in ids]
    calls.to.clear()
    batch.to("meta")
    assert calls.to == [(i, ("meta",), {"non_blocking": False}) for i in ids]
    assert calls.pin == []


def test_pin_memory_pins_every_field_into_a_new_batch(monkeypatch):
    calls = _Calls(monkeypatch)
    batch = _batch()
    pinned = batch.pin_memory()
    assert calls.pin == [id(getattr(batch, name)) for name in FIELDS]
    for name in FIELDS:
        a, b = getattr(batch, name), getattr(pinned, name)
        assert id(b) in calls.pinned, name  # the field is the pinned copy
        assert torch.equal(a, b), name
    assert calls.to == []


def test_a_host_tensor_bound_for_cuda_is_pinned_then_copied_without_blocking(monkeypatch):
    calls = _Calls(monkeypatch)
    t = torch.arange(4.0)
    out = to_device(t, CUDA)
    assert calls.pin == [id(t)]
    ((copied, args, kwargs),) = calls.to
    assert copied != id(t) and copied in calls.pinned  # the copy is made from the pinned tensor
    assert args == (CUDA,) and kwargs == {"non_blocking": True}
    assert id(out) in calls.made and torch.equal(out, t)


def test_a_pinned_host_tensor_is_copied_to_cuda_as_it_is(monkeypatch):
    calls = _Calls(monkeypatch)
    t = torch.arange(4.0)
    calls.pinned.add(id(t))
    to_device(t, CUDA)
    assert calls.pin == []
    assert calls.to == [(id(t), (CUDA,), {"non_blocking": True})]


@pytest.mark.parametrize(
    ("source", "target"),
    [
        ("cpu", torch.device("cpu")),
        ("meta", CUDA),
        ("meta", torch.device("cpu")),
        ("cpu", torch.device("meta")),
    ],
)
def test_every_other_move_is_a_plain_to(monkeypatch, source, target):
    """A CPU target, or a source that is not on the host: no pinning, a blocking ``.to``."""
    t = torch.arange(4.0, device=source)
    calls = _Calls(monkeypatch)
    out = to_device(t, target)
    assert calls.pin == []
    assert calls.to == [(id(t), (target,), {})]
    assert id(out) in calls.made


def test_a_real_move_to_another_device_returns_the_tensor_there():
    t = torch.arange(4.0)
    assert to_device(t, torch.device("meta")).device.type == "meta"
    same = to_device(t, torch.device("cpu"))
    assert same.device.type == "cpu" and torch.equal(same, t)


def test_batch_to_device_moves_every_field_through_to_device(monkeypatch):
    calls = _Calls(monkeypatch)
    batch = _batch()
    moved = batch.to_device(CUDA)
    ids = [id(getattr(batch, name)) for name in FIELDS]
    assert calls.pin == ids  # none of them was pinned
    assert [args for _, args, _ in calls.to] == [(CUDA,)] * len(FIELDS)
    assert all(kwargs == {"non_blocking": True} for _, _, kwargs in calls.to)
    for name in FIELDS:
        assert id(getattr(moved, name)) in calls.made, name
        assert torch.equal(getattr(moved, name), getattr(batch, name)), name


def test_batch_to_device_on_meta_moves_every_field():
    moved = _batch().to_device(torch.device("meta"))
    assert all(getattr(moved, name).device.type == "meta" for name in FIELDS)


def test_the_constants_are_imagenets_and_the_heatmap_stride():
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406)
    assert IMAGENET_STD == (0.229, 0.224, 0.225)
    assert HEATMAP_STRIDE == 4
