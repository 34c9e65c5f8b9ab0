"""COCO person keypoints -> WebDataset shards (one sample per person or per detection).

    python data_prep/shard_coco.py --images coco/val2017 \
        --annotations coco/annotations/person_keypoints_val2017.json --out data/coco [--verify]

With ``--detections FILE`` (a COCO detection-result json) every person box of the detector
becomes a sample instead (keypoints unlabelled, ``score`` = the box score). ``--keypoints`` names
the keypoint set of the annotations: ``coco`` (default), ``crowdpose`` or a YAML file
(see ``pnfs/keypoints.py``). See
``pnfs/data/shards/writer.py`` for the sample layout and ``manifest.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pnfs.data import load_json, read_coco_detections, read_coco_persons
from pnfs.data.shards.cli import common_parser, fail, run
from pnfs.errors import run_main
from pnfs.keypoints import KeypointSetError, load_keypoint_set


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = common_parser(__doc__.splitlines()[0])
    p.add_argument("--detections", default=None, help="COCO detection-result json (person boxes)")
    p.add_argument("--det-score-threshold", type=float, default=0.0, help="drop detections below")
    p.add_argument("--keypoints", default="coco", help="keypoint set: coco, crowdpose or a YAML path")
    args = p.parse_args(argv)
    try:
        joints = load_keypoint_set(args.keypoints)
    except KeypointSetError as err:
        fail(f"--keypoints: {err}")
    if args.detections is not None and not Path(args.detections).is_file():
        fail(f"detection file not found: {args.detections}")

    def read(skipped, filtered):
        data = load_json(args.annotations)
        if args.detections is not None:
            dets = load_json(args.detections)
            recs = read_coco_detections(dets, data, skipped, filtered, args.det_score_threshold, joints)
            return recs, len(dets) if isinstance(dets, list) else 0
        recs = read_coco_persons(data, skipped, filtered, joints)
        return recs, len(data.get("annotations", [])) if isinstance(data, dict) else 0

    return run(args, joints.name, read, clip_box=True, argv=["data_prep/shard_coco.py", *argv])


if __name__ == "__main__":
    sys.exit(run_main(main, extra=(OSError,)))  # an --out that cannot be written
