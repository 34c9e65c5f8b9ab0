"""The DALI loader: ``fn.readers.webdataset`` (index files) -> decode -> ``fn.warp_affine``.

The graph reads the same shards and raw arrays as the torch loader, takes the per-sample
augmentation parameters (scale, rotation, flip) from the plan's generator through an
external source, and builds each sample's matrix with DALI arithmetic from the same
formula as :func:`pnfs.data.geometry.region_to_input` composed with ``crop_to_image``:

    M = Flip · T(c_in) · R(θ) · S(k) · T(-c_box) · crop_to_image,   k = W / (region_w · scale)

The matrix warps the image (``inverse_map=False``: we give source -> destination) and moves
the keypoints (``fn.coord_transform``). DALI puts pixel centres at +0.5 whereas pnfs puts
them at integers, so the warp gets ``T(+0.5) · M · T(-0.5)``. Left/right joint swap of
flipped samples and the label weights are applied to the outputs in torch.

Decoding runs on ``mixed`` (nvJPEG) with CUDA, else on the CPU (``device_id=None``: a
CPU-only graph, what the tests run). Order: the reader's own (seeded per epoch when
shuffling: ``random_shuffle`` with ``seed`` from (seed, epoch)); ranks read
``shard_id=rank`` of ``num_shards=world``. Batch counts follow the plan (equal on every
rank for train; val trims the padded last batch). Resuming at ``start_sample`` re-reads and
discards those samples (DALI cannot seek); the torch and gpu loaders resume without reading.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from pnfs.data.batch import IMAGENET_MEAN, IMAGENET_STD, PoseBatch
from pnfs.data.geometry import Augment, flip_joints, inside_image, invert
from pnfs.data.plan import EpochPlan
from pnfs.data.shards import ShardSet

READER_EXTS = ["jpg", "kp.f32", "bbox.f32", "c2i.f32", "score.f32", "ids.i64"]


def dali_available() -> tuple[bool, str]:
    """(usable, why not): DALI imports and can build a CPU graph here."""
    try:
        import nvidia.dali  # noqa: F401
    except Exception as e:  # ImportError, or a broken wheel raising at import
        return False, f"nvidia.dali does not import: {e}"
    return True, ""


def _build_pipeline(
    paths: list[str],
    index_paths: list[str],
    batch_size: int,
    num_threads: int,
    device_id: int | None,
    shard_id: int,
    num_shards: int,
    shuffle: bool,
    seed: int,
    input_size: tuple[int, int],
    margin: float,
    num_joints: int,
    aug_source,
):
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath

    out_h, out_w = input_size
    aspect = out_w / out_h
    gpu = device_id is not None

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed)
    def pipe():
        jpg, kp, bbox, c2i, score, ids = fn.readers.webdataset(
            paths=paths,
            index_paths=index_paths,
            ext=READER_EXTS,
            dtypes=[types.UINT8, types.FLOAT, types.FLOAT, types.FLOAT, types.FLOAT, types.INT64],
            shard_id=shard_id,
            num_shards=num_shards,
            random_shuffle=shuffle,
            initial_fill=1024,
            seed=seed,
            pad_last_batch=not shuffle,
            missing_component_behavior="error",
            name="Reader",
        )
        aug = fn.external_source(source=aug_source, batch=True, dtype=types.FLOAT, ndim=1)
        scale, theta, flip = aug[0], aug[1] * (math.pi / 180.0), aug[2]
        x, y, w, h = bbox[0], bbox[1], bbox[2], bbox[3]
        cx, cy = x + w * 0.5, y + h * 0.5
        region_w = dmath.max(w, h * aspect) * margin
        k = out_w / (region_w * scale)
        cos, sin = dmath.cos(theta) * k, dmath.sin(theta) * k
        sign = 1.0 - 2.0 * flip
        mid_x, mid_y = (out_w - 1) / 2.0, (out_h - 1) / 2.0
        # original px -> input px (geometry.region_to_input), flip folded into row x
        a00, a01, a02 = sign * cos, -sign * sin, sign * (mid_x - (cos * cx - sin * cy)) + flip * (out_w - 1.0)
        a10, a11, a12 = sin, cos, mid_y - (sin * cx + cos * cy)
        # compose with crop_to_image C: (A ∘ C) = A[:, :2] @ C + [0, 0, A[:, 2]]
        c00, c01, c02, c10, c11, c12 = c2i[0], c2i[1], c2i[2], c2i[3], c2i[4], c2i[5]
        m = [
            a00 * c00 + a01 * c10, a00 * c01 + a01 * c11, a00 * c02 + a01 * c12 + a02,
            a10 * c00 + a11 * c10, a10 * c01 + a11 * c11, a10 * c02 + a11 * c12 + a12,
        ]  # fmt: skip
        crop_to_input = fn.reshape(fn.stack(*m), shape=[2, 3])
        to_input = fn.reshape(fn.stack(a00, a01, a02, a10, a11, a12), shape=[2, 3])
        # DALI pixel centres sit at +0.5: warp with T(0.5) · M · T(-0.5)
        half = [
            m[0], m[1], m[2] + 0.5 * (1.0 - m[0] - m[1]),
            m[3], m[4], m[5] + 0.5 * (1.0 - m[3] - m[4]),
        ]  # fmt: skip
        warp_matrix = fn.reshape(fn.stack(*half), shape=[2, 3])
        images = fn.decoders.image(jpg, device="mixed" if gpu else "cpu", output_type=types.RGB)
        images = fn.warp_affine(
            images,
            matrix=warp_matrix,
            size=[out_h, out_w],
            inverse_map=False,
            fill_value=0,
            interp_type=types.INTERP_LINEAR,
        )
        images = fn.crop_mirror_normalize(
            images,
            dtype=types.FLOAT,
            output_layout="CHW",
            mean=[v * 255.0 for v in IMAGENET_MEAN],
            std=[v * 255.0 for v in IMAGENET_STD],
        )
        kp = fn.reshape(kp, shape=[num_joints, 3])
        xy = fn.coord_transform(kp[:, 0:2], MT=crop_to_input)
        return images, xy, kp, to_input, score, ids, aug

    return pipe()


class _AugFeed:
    """External source: the plan's augmentation parameters, one [3] array per sample."""

    def __init__(self, aug: Augment, batch_size: int):
        params = np.stack([aug.scale, aug.rotation, aug.flip.astype(np.float64)], 1).astype(np.float32)
        self.params, self.batch_size, self.pos = params, batch_size, 0

    def __call__(self):
        rows = [
            self.params[(self.pos + i) % len(self.params)]
            if len(self.params)
            else np.array([1, 0, 0], np.float32)
            for i in range(self.batch_size)
        ]
        self.pos += self.batch_size
        return rows


def _to_torch(tensor_list, device: torch.device) -> torch.Tensor:
    """A DALI TensorList (dense) -> torch tensor on ``device``."""
    if hasattr(tensor_list, "as_cpu") and device.type == "cuda":
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dense = tensor_list.as_tensor()
        dtype = {np.dtype("float32"): torch.float32, np.dtype("int64"): torch.int64}
        out = torch.empty(dense.shape(), dtype=dtype.get(np.dtype(dense.dtype), torch.float32), device=device)
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    if hasattr(tensor_list, "as_cpu"):
        tensor_list = tensor_list.as_cpu()
    return torch.from_numpy(np.array(tensor_list.as_tensor()))


class DaliPoseLoader:
    """Iterable of PoseBatch from a DALI graph; ``len()`` = the plan's batch count."""

    def __init__(
        self,
        shards: ShardSet,
        plan: EpochPlan,
        *,
        split: str,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        epoch: int,
        start_sample: int,
        num_threads: int,
        input_size: tuple[int, int],
        margin: float,
        flip_perm: list[int],
        device_id: int | None = None,
    ):
        ok, why = dali_available()
        if not ok:
            raise RuntimeError(f"data.loader=dali: {why}")
        if device_id is None and torch.cuda.is_available():
            device_id = torch.cuda.current_device()
        self.device = torch.device("cuda", device_id) if device_id is not None else torch.device("cpu")
        self.plan, self.batch_size, self.start_sample = plan, batch_size, start_sample
        self.input_size, self.flip_perm = tuple(input_size), flip_perm
        nonempty = [i for i, n in enumerate(shards.counts) if n > 0]
        paths = [shards.paths[i] for i in nonempty]
        index_paths = [str(Path(p).with_suffix(".idx")) for p in paths]
        # the augmentation of the whole (un-resumed) stream, position by position
        full = [a for a in plan.augment]
        aug = Augment(
            np.concatenate([a.scale for a in full]) if full else np.ones(0),
            np.concatenate([a.rotation for a in full]) if full else np.zeros(0),
            np.concatenate([a.flip for a in full]) if full else np.zeros(0, bool),
        )
        if start_sample:
            pad = Augment.identity(start_sample)
            aug = Augment(
                np.concatenate([pad.scale, aug.scale]),
                np.concatenate([pad.rotation, aug.rotation]),
                np.concatenate([pad.flip, aug.flip]),
            )
        self.pipe = _build_pipeline(
            paths,
            index_paths,
            batch_size,
            num_threads,
            device_id,
            rank,
            world_size,
            split == "train",
            int(np.random.default_rng([seed, epoch]).integers(0, 2**31 - 1)),
            self.input_size,
            margin,
            len(flip_perm),
            _AugFeed(aug, batch_size),
        )
        self.pipe.build()

    def __len__(self) -> int:
        return len(self.plan)

    def _run(self) -> dict[str, torch.Tensor]:
        images, xy, kp, to_input, score, ids, aug = self.pipe.run()
        dev = self.device
        return {
            "image": _to_torch(images, dev),
            "xy": _to_torch(xy, dev).double(),
            "kp": _to_torch(kp, dev).double(),
            "to_input": _to_torch(to_input, dev).double(),
            "score": _to_torch(score, dev).reshape(-1).float(),
            "ids": _to_torch(ids, dev).reshape(-1, 2),
            "flip": _to_torch(aug, dev)[:, 2] > 0.5,
        }

    def __iter__(self):
        carry: dict[str, torch.Tensor] | None = None
        skip = self.start_sample
        sizes = [len(b) for b in self.plan.batches]
        for size in sizes:
            while carry is None or len(carry["image"]) < size + skip:
                out = self._run()
                carry = out if carry is None else {k: torch.cat([carry[k], out[k]]) for k in out}
            if skip:
                carry = {k: v[skip:] for k, v in carry.items()}
                skip = 0
            batch = {k: v[:size] for k, v in carry.items()}
            carry = {k: v[size:] for k, v in carry.items()}
            yield self._pose_batch(batch)

    def _pose_batch(self, b: dict[str, torch.Tensor]) -> PoseBatch:
        labelled = b["kp"][..., 2] > 0
        weight = labelled & inside_image(b["xy"], self.input_size)
        xy = torch.where(labelled[..., None], b["xy"], torch.zeros_like(b["xy"]))
        keypoints = torch.cat([xy, weight[..., None].double()], -1)
        keypoints = flip_joints(keypoints, self.flip_perm, b["flip"])
        return PoseBatch(
            image=b["image"],
            keypoints=keypoints.float(),
            affine=invert(b["to_input"]).float(),
            image_id=b["ids"][:, 0].long(),
            ann_id=b["ids"][:, 1].long(),
            score=b["score"],
        )
