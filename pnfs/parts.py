"""Part groupings: which joints each part fabric predicts (the paper's Table I).

The groupings come with the keypoint set (``parts`` in its YAML, see :mod:`pnfs.keypoints`);
COCO's and MPII's are Table I's for P = 1, 3, 5, 8. With P=8 some joints (shoulders, elbows,
knees) belong to two parts: their score maps are summed across parts, so such a joint's
score lies in [0, 2).
"""

from __future__ import annotations

from pnfs.keypoints import Grouping, JointSet


def part_grouping(joints: JointSet, num_parts: int) -> Grouping:
    """The grouping of ``joints`` with P = ``num_parts`` (joint indices per part)."""
    return _entry(joints, num_parts)[1]


def part_names(joints: JointSet, num_parts: int) -> tuple[str, ...]:
    """The names of the parts of the grouping with P = ``num_parts``."""
    return _entry(joints, num_parts)[0]


def _entry(joints: JointSet, num_parts: int) -> tuple[tuple[str, ...], Grouping]:
    if num_parts not in joints.groupings:
        raise ValueError(
            f"model.num_parts={num_parts}: keypoint set {joints.name!r} has groupings for "
            f"P in {sorted(joints.groupings)}; add one under its 'parts' or give model.custom_parts"
        )
    return joints.groupings[num_parts]


def validate_grouping(grouping: Grouping, num_joints: int) -> None:
    """Every joint must be covered by at least one part, indices in range, no empty part."""
    covered: set[int] = set()
    for p, joints in enumerate(grouping):
        if not joints:
            raise ValueError(f"part {p} of the grouping is empty")
        if len(set(joints)) != len(joints):
            raise ValueError(f"part {p} lists a joint twice: {list(joints)}")
        for j in joints:
            if not 0 <= j < num_joints:
                raise ValueError(f"part {p} names joint {j}, outside 0..{num_joints - 1}")
        covered.update(joints)
    missing = sorted(set(range(num_joints)) - covered)
    if missing:
        raise ValueError(f"joints {missing} belong to no part")
