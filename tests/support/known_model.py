"""A checkpoint whose behaviour is known: a tiny model trained on the shared COCO sample.

Made once per test session (the ``known_checkpoint`` fixture of ``conftest.py``): the 12 people
of ``../shared/data/coco_sample`` are sharded, cropped once without augmentation, and a small
PNFS model is fitted to their Gaussian targets for ``STEPS`` Adam steps on one core. The same
model is also saved at initialisation. A test that evaluates the trained checkpoint and gets an
AP above ``TRAINED_AP`` (while the initial one stays under ``INITIAL_AP``) has shown that the
checkpoint's weights reached the model; a loader that built the model but dropped the weights
would score like the initial one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from pnfs.config import Config, config_to_dict, load_config

REPO = Path(__file__).resolve().parents[2]
STEPS = 150
TRAINED_AP = 0.4  # measured 0.60 after these 150 steps (0.0 at initialisation), see docs/testing.md
INITIAL_AP = 0.05  # an untrained model scores 0.0 on the sample
OVERRIDES = [
    "data.num_workers=0",
    "data.input_size=[128,96]",
    "model.backbone.fabric_channels=4",
    "model.backbone.fabric_stem_channels=16",
    "model.channels=4",
    "model.vector_dim=2",
    "eval.batch_size=12",
    "eval.refine=gaussian",
]


@dataclass(frozen=True)
class KnownCheckpoint:
    trained: Path  # {"model": state dict, "config": dict} after training
    initial: Path  # the same model at initialisation, same format
    shards: Path  # val shards of the COCO sample
    annotations: Path  # the sample's COCO keypoints json
    keypoints: torch.Tensor  # [12, 17, 2] the in-memory trained model's flip-test predictions (image px)
    scores: torch.Tensor  # [12, 17]


def config(shards: Path, annotations: Path, *extra: str) -> Config:
    return load_config(
        "demo", [*OVERRIDES, f"data.val_shards={shards}", f"data.val_annotations={annotations}", *extra]
    )


def make_known_checkpoint(shared_data: Path, out: Path) -> KnownCheckpoint:
    from pnfs.data.loaders.build import build_loader
    from pnfs.inference import predict
    from pnfs.keypoints import COCO
    from pnfs.loss import batch_loss, loss_setup
    from pnfs.model import build_model

    root = shared_data / "coco_sample"
    annotations = root / "test_coco.json"
    shards = out / "shards"
    subprocess.run(
        [sys.executable, str(REPO / "data_prep" / "shard_coco.py"), "--images", str(root), "--annotations",
         str(annotations), "--out", str(shards), "--split", "val", "--shard-size", "5", "--no-progress"],
        check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    cfg = config(shards, annotations)
    batches = list(build_loader(cfg, "val"))
    torch.manual_seed(0)
    model = build_model(cfg)
    initial = out / "initial.pt"
    torch.save({"model": model.state_dict(), "config": config_to_dict(cfg)}, initial)
    setup = loss_setup(model, 2.0, torch.device("cpu"), None, False)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model.train()
        for _ in range(STEPS):
            for batch in batches:
                loss = batch_loss(model, batch, setup)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        model.eval()
        trained = out / "trained.pt"
        torch.save({"model": model.state_dict(), "config": config_to_dict(cfg)}, trained)
        poses = [predict(model, b.image, b.affine, flip_permutation=COCO.flip_permutation()) for b in batches]
    finally:
        torch.set_num_threads(threads)
    return KnownCheckpoint(
        trained=trained,
        initial=initial,
        shards=shards,
        annotations=annotations,
        keypoints=torch.cat([p.keypoints for p in poses]),
        scores=torch.cat([p.scores for p in poses]),
    )
