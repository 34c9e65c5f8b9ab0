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

Decoding runs on ``mixed`` (nvJPEG) when the batches go to a CUDA device, else on the CPU
(``device_id=None``: a CPU-only graph, what the tests run without CUDA). The graph's outputs
become torch tensors through DALI's own PyTorch plugin (``DALIGenericIterator``), which puts
each output where DALI produced it: a GPU graph's images on its GPU (on torch's current
stream), the keypoints, matrices, ids and augmentation parameters (CPU operators in both
graphs) on the CPU. The CPU and GPU graphs therefore share every line of the conversion;
only the batch's final move differs, which copies the host tensors to a GPU from page-locked
memory without the host waiting (:meth:`pnfs.data.batch.PoseBatch.to_device`).

Order: the reader's own (seeded per epoch when shuffling: ``random_shuffle`` with ``seed``
from (seed, epoch)); ranks read ``shard_id=rank`` of ``num_shards=world``. Batch counts follow
the plan (equal on every rank for train; val trims the padded last batch). Resuming at
``start_sample`` re-reads and discards those samples (DALI cannot seek); the torch and gpu
loaders resume without reading.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from pnfs.data.bad_samples import BadSampleError
from pnfs.data.batch import IMAGENET_MEAN, IMAGENET_STD, PoseBatch
from pnfs.data.geometry import Augment, flip_joints, inside_image, invert
from pnfs.data.plan import EpochPlan
from pnfs.data.shards.reader import ShardSet

READER_EXTS = ["jpg", "kp.f32", "bbox.f32", "c2i.f32", "score.f32", "ids.i64"]


def dali_available() -> tuple[bool, str]:
    """(usable, why not): DALI imports and can build a CPU graph here."""
    try:
        import nvidia.dali
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception as e:  # ImportError, or a broken wheel raising at import
        return False, f"nvidia.dali (with its PyTorch plugin) does not import: {e}"
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


OUTPUTS = ("image", "xy", "kp", "to_input", "score", "ids", "aug")  # the graph's outputs, in order


def plugin_batches(pipe) -> Iterator[dict[str, torch.Tensor]]:
    """The graph's batches as {name: tensor} through ``DALIGenericIterator`` (builds ``pipe``).

    image [B, 3, H, W] float32, xy [B, K, 2] float32, kp [B, K, 3] float32, to_input [B, 2, 3]
    float32, score [B, 1] float32, ids [B, 2] int64, aug [B, 3] float32 (scale, degrees, flip);
    each on the device DALI produced it on. ``size=-1``: the iterator has no epoch end of its
    own (the reader wraps around); the plan decides how many batches are taken.
    """
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    for (outputs,) in DALIGenericIterator(pipe, list(OUTPUTS)):
        yield outputs


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
        device: torch.device | str | None = None,
    ):
        """device: where the batches go (default: the current CUDA device, else the CPU). The
        graph runs on that GPU when it is a CUDA device, else on the CPU."""
        ok, why = dali_available()
        if not ok:
            raise RuntimeError(f"data.loader=dali: {why}")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        device_id = self.device.index if self.device.type == "cuda" else None
        self.plan, self.batch_size, self.start_sample = plan, batch_size, start_sample
        self.input_size, self.flip_perm = (input_size[0], input_size[1]), flip_perm
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
        self.outputs = plugin_batches(self.pipe)

    def __len__(self) -> int:
        return len(self.plan)

    def __iter__(self):
        """The plan's batches cut from the graph's. When the sizes line up (the usual case: the
        graph's batch size is the plan's and nothing is skipped) each batch is the graph's
        outputs as they are; only a remainder carried over is concatenated with the next ones."""
        carry: dict[str, torch.Tensor] | None = None
        skip = self.start_sample
        sizes = [len(b) for b in self.plan.batches]
        for size in sizes:
            while carry is None or len(carry["image"]) < size + skip:
                out = self._next_output()
                carry = out if carry is None else {k: torch.cat([carry[k], out[k]]) for k in out}
            if skip:
                carry = {k: v[skip:] for k, v in carry.items()}
                skip = 0
            batch = {k: v[:size] for k, v in carry.items()}
            carry = {k: v[size:] for k, v in carry.items()} if len(carry["image"]) > size else None
            yield self._pose_batch(batch)

    def _next_output(self) -> dict[str, torch.Tensor]:
        """The graph's next batch; a failure inside the graph (a JPEG its decoder refuses, an
        array of the wrong size) as :class:`BadSampleError`: DALI reads and decodes inside its
        graph, so it cannot drop, name or replace one sample as the torch and gpu loaders do."""
        try:
            return next(self.outputs)
        except RuntimeError as e:
            raise BadSampleError(
                f"data.loader=dali: the DALI graph failed, most likely on a bad sample it cannot drop "
                f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}); "
                "data.loader=torch or gpu drop, name and count bad samples (data.on_error=skip)"
            ) from e

    def _pose_batch(self, b: dict[str, torch.Tensor]) -> PoseBatch:
        """Plugin outputs -> PoseBatch on ``self.device`` (keypoint bookkeeping where they are)."""
        xy, kp = b["xy"].double(), b["kp"].double()
        flip = b["aug"][:, 2] > 0.5
        labelled = kp[..., 2] > 0
        weight = labelled & inside_image(xy, self.input_size)
        xy = torch.where(labelled[..., None], xy, torch.zeros_like(xy))
        keypoints = torch.cat([xy, weight[..., None].double()], -1)
        keypoints = flip_joints(keypoints, self.flip_perm, flip)
        ids = b["ids"].reshape(-1, 2)
        batch = PoseBatch(
            image=b["image"],
            keypoints=keypoints.float(),
            affine=invert(b["to_input"].double()).float(),
            image_id=ids[:, 0].long(),
            ann_id=ids[:, 1].long(),
            score=b["score"].reshape(-1).float(),
        )
        return batch.to_device(self.device)  # (a GPU graph's host outputs: pinned, asynchronous)
