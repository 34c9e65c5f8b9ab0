"""Joint sets: names in our order, left/right flip pairs, skeleton edges and OKS sigmas.

Our joint orders are the paper's (Section III-E):

* MPII (16): head top, upper neck, thorax, l/r shoulder, l/r elbow, l/r wrist, l/r hip,
  l/r knee, l/r ankle, pelvis. The raw MPII/HRNet json uses another order
  (0 r_ankle ... 15 l_wrist); ``MPII_FROM_RAW`` re-orders joints *and* visibility.
* COCO (17): the standard order (nose, eyes, ears, shoulders, elbows, wrists, hips,
  knees, ankles).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class JointSet:
    """A named set of K joints with everything that depends only on the joint order."""

    name: str
    joints: tuple[str, ...]
    flip_pairs: tuple[tuple[int, int], ...]
    skeleton: tuple[tuple[int, int], ...]
    sigmas: tuple[float, ...] | None = None  # OKS per-joint sigmas (COCO-style sets only)

    @property
    def num_joints(self) -> int:
        return len(self.joints)

    def flip_permutation(self) -> list[int]:
        """Index map so that ``flipped[:, perm]`` swaps every left joint with its right twin."""
        perm = list(range(self.num_joints))
        for a, b in self.flip_pairs:
            perm[a], perm[b] = b, a
        return perm


COCO = JointSet(
    name="coco",
    joints=(
        "nose",
        "left_eye",
        "right_eye",
        "left_ear",
        "right_ear",
        "left_shoulder",
        "right_shoulder",
        "left_elbow",
        "right_elbow",
        "left_wrist",
        "right_wrist",
        "left_hip",
        "right_hip",
        "left_knee",
        "right_knee",
        "left_ankle",
        "right_ankle",
    ),
    flip_pairs=((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16)),
    skeleton=(
        (15, 13),
        (13, 11),
        (16, 14),
        (14, 12),
        (11, 12),
        (5, 11),
        (6, 12),
        (5, 6),
        (5, 7),
        (6, 8),
        (7, 9),
        (8, 10),
        (1, 2),
        (0, 1),
        (0, 2),
        (1, 3),
        (2, 4),
        (3, 5),
        (4, 6),
    ),
    # COCO keypoint evaluation sigmas (cocoeval.py), in joint order.
    sigmas=(
        0.026,
        0.025,
        0.025,
        0.035,
        0.035,
        0.079,
        0.079,
        0.072,
        0.072,
        0.062,
        0.062,
        0.107,
        0.107,
        0.087,
        0.087,
        0.089,
        0.089,
    ),
)

MPII = JointSet(
    name="mpii",
    joints=(
        "head_top",
        "upper_neck",
        "thorax",
        "left_shoulder",
        "right_shoulder",
        "left_elbow",
        "right_elbow",
        "left_wrist",
        "right_wrist",
        "left_hip",
        "right_hip",
        "left_knee",
        "right_knee",
        "left_ankle",
        "right_ankle",
        "pelvis",
    ),
    flip_pairs=((3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14)),
    skeleton=(
        (0, 1),
        (1, 2),
        (2, 3),
        (2, 4),
        (3, 5),
        (5, 7),
        (4, 6),
        (6, 8),
        (2, 15),
        (15, 9),
        (15, 10),
        (9, 11),
        (11, 13),
        (10, 12),
        (12, 14),
    ),
)

# Raw MPII/HRNet json order: 0 r_ankle, 1 r_knee, 2 r_hip, 3 l_hip, 4 l_knee, 5 l_ankle,
# 6 pelvis, 7 thorax, 8 upper_neck, 9 head_top, 10 r_wrist, 11 r_elbow, 12 r_shoulder,
# 13 l_shoulder, 14 l_elbow, 15 l_wrist.  ``ours[i] = raw[MPII_FROM_RAW[i]]``.
MPII_FROM_RAW: tuple[int, ...] = (9, 8, 7, 13, 12, 14, 11, 15, 10, 3, 2, 4, 1, 5, 0, 6)

JOINT_SETS: dict[str, JointSet] = {"coco": COCO, "mpii": MPII}


def joint_set(name: str) -> JointSet:
    """The joint set for a data set name (``coco`` or ``mpii``)."""
    try:
        return JOINT_SETS[name]
    except KeyError:
        raise ValueError(f"unknown joint set {name!r}; expected one of {sorted(JOINT_SETS)}") from None
