"""Data: annotation readers, shards, loaders and on-device targets (docs/data.md, docs/design.md §9).

The package is laid out by stage:

* ``annotations/``: COCO and MPII files read into :class:`PersonRecord` lists (coco, mpii, records);
* ``shards/``: the WebDataset shards written (writer, cli), read (reader) and checked against
  their ``manifest.json`` (manifest);
* ``loaders/``: ``build_loader`` (build) and its three implementations (torch_loader,
  gpu_loader, dali_loader) over one plan reader and one crop assembly;
* the shared contracts at this level: batch (:class:`PoseBatch`), geometry, plan
  (:class:`EpochPlan`), targets (:func:`gaussian_targets`) and bad_samples.

The names below are the public API; benchmarks and launchers import them from ``pnfs.data``
only. They are imported on first use (PEP 562 ``__getattr__``), so ``import pnfs.data`` pulls
in neither torch nor cv2.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (milliseconds)

if TYPE_CHECKING:
    from pnfs.data.annotations.coco import load_json, read_coco_detections, read_coco_persons
    from pnfs.data.annotations.mpii import read_mpii_persons
    from pnfs.data.annotations.records import PersonRecord, SkipReport
    from pnfs.data.bad_samples import BadSample, BadSampleError, BadSampleReport
    from pnfs.data.batch import HEATMAP_STRIDE, IMAGENET_MEAN, IMAGENET_STD, PoseBatch
    from pnfs.data.geometry import Augment, box_to_region, region_to_input
    from pnfs.data.loaders.build import build_loader
    from pnfs.data.loaders.plan_reader import worker_init
    from pnfs.data.plan import EpochPlan
    from pnfs.data.shards.reader import ShardSet
    from pnfs.data.targets import gaussian_targets

# public name -> the module that defines it
_HOME = {
    "load_json": "pnfs.data.annotations.coco",
    "read_coco_detections": "pnfs.data.annotations.coco",
    "read_coco_persons": "pnfs.data.annotations.coco",
    "read_mpii_persons": "pnfs.data.annotations.mpii",
    "PersonRecord": "pnfs.data.annotations.records",
    "SkipReport": "pnfs.data.annotations.records",
    "BadSample": "pnfs.data.bad_samples",
    "BadSampleError": "pnfs.data.bad_samples",
    "BadSampleReport": "pnfs.data.bad_samples",
    "HEATMAP_STRIDE": "pnfs.data.batch",
    "IMAGENET_MEAN": "pnfs.data.batch",
    "IMAGENET_STD": "pnfs.data.batch",
    "PoseBatch": "pnfs.data.batch",
    "Augment": "pnfs.data.geometry",
    "box_to_region": "pnfs.data.geometry",
    "region_to_input": "pnfs.data.geometry",
    "build_loader": "pnfs.data.loaders.build",
    "worker_init": "pnfs.data.loaders.plan_reader",
    "EpochPlan": "pnfs.data.plan",
    "ShardSet": "pnfs.data.shards.reader",
    "gaussian_targets": "pnfs.data.targets",
}

__all__ = [
    "HEATMAP_STRIDE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Augment",
    "BadSample",
    "BadSampleError",
    "BadSampleReport",
    "EpochPlan",
    "PersonRecord",
    "PoseBatch",
    "ShardSet",
    "SkipReport",
    "box_to_region",
    "build_loader",
    "gaussian_targets",
    "load_json",
    "read_coco_detections",
    "read_coco_persons",
    "read_mpii_persons",
    "region_to_input",
    "worker_init",
]


def __getattr__(name: str):
    """Import the module that defines public ``name`` on first use and return the name."""
    if name not in _HOME:
        raise AttributeError(f"module 'pnfs.data' has no attribute {name!r}; public names: {__all__}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
