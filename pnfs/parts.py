"""Body-part groupings of Table I of the paper.

Each part fabric predicts the joints of one group. With P=8 some joints (shoulders,
elbows, knees) belong to two parts: their score maps are summed across parts, so such a
joint's score lies in [0, 2).

Indices follow our joint orders (``pnfs.keypoints``): MPII 0..15 and COCO 0..16.
"""

from __future__ import annotations

Grouping = tuple[tuple[int, ...], ...]


def _r(a: int, b: int) -> tuple[int, ...]:
    return tuple(range(a, b + 1))


PART_GROUPINGS: dict[str, dict[int, Grouping]] = {
    "mpii": {
        1: (_r(0, 15),),
        3: (_r(0, 2), _r(3, 8), _r(9, 15)),
        5: (_r(0, 4), (5, 7), (6, 8), (9, 10, 15), _r(11, 14)),
        8: (_r(0, 4), (3, 5), (5, 7), (4, 6), (6, 8), (9, 10, 11, 12, 15), (11, 13), (12, 14)),
    },
    "coco": {
        1: (_r(0, 16),),
        3: (_r(0, 4), _r(5, 10), _r(11, 16)),
        5: (_r(0, 6), (7, 9), (8, 10), (11, 12), _r(13, 16)),
        8: (_r(0, 6), (5, 7), (7, 9), (6, 8), (8, 10), _r(11, 14), (13, 15), (14, 16)),
    },
}

PART_NAMES: dict[int, tuple[str, ...]] = {
    1: ("all",),
    3: ("head", "upper_limb", "lower_limb"),
    5: ("head_shoulder", "left_lower_arm", "right_lower_arm", "thigh", "lower_limb"),
    8: (
        "head_shoulder",
        "left_upper_arm",
        "left_lower_arm",
        "right_upper_arm",
        "right_lower_arm",
        "thigh",
        "left_lower_leg",
        "right_lower_leg",
    ),
}


def part_grouping(dataset: str, num_parts: int) -> Grouping:
    """Table I grouping for ``dataset`` (``mpii`` or ``coco``) with P = ``num_parts``."""
    if dataset not in PART_GROUPINGS:
        raise ValueError(f"no Table I grouping for data set {dataset!r}; give model.custom_parts")
    if num_parts not in PART_GROUPINGS[dataset]:
        raise ValueError(f"model.num_parts={num_parts} has no Table I grouping (expected 1, 3, 5 or 8)")
    return PART_GROUPINGS[dataset][num_parts]


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
