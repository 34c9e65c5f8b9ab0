"""Keypoint sets: joint names in order, flip pairs, skeleton, OKS sigmas, part groupings, colours.

A keypoint set is a small YAML file (the built-ins live in ``pnfs/keypoint_sets/``)::

    name: hand5
    joints: [wrist, thumb_tip, index_tip, middle_tip, little_tip]   # names, in annotation order
    flip_pairs: [[left_x, right_x], ...]    # by name; [] when nothing swaps under a mirror
    skeleton: [[wrist, thumb_tip], ...]     # limbs drawn on overlays, by name
    sigmas: [0.03, ...]                     # optional: OKS sigmas, one per joint (COCO-style AP)
    parts:                                  # the part grouping of the search (paper, Table I)
      2: {palm: [wrist, thumb_tip], fingers: [index_tip, middle_tip, little_tip]}
    colors: [[255, 0, 0], ...]              # optional: one RGB colour per skeleton edge

``parts`` maps P to named groups of joint names (several groupings, chosen by
``model.num_parts``); a single mapping ``{name: [joints]}`` gives one grouping with P = its size.
Every joint must belong to at least one part; a joint may belong to two (Table I, P=8).

The built-ins are the paper's (Section III-E, Table I):

* ``coco`` (17): the standard order, COCO's sigmas, Table I groupings P = 1, 3, 5, 8;
* ``mpii`` (16): head top, upper neck, thorax, l/r shoulder, l/r elbow, l/r wrist, l/r hip,
  l/r knee, l/r ankle, pelvis; the raw MPII/HRNet json uses another order
  (0 r_ankle ... 15 l_wrist) and ``MPII_FROM_RAW`` re-orders joints *and* visibility;
* ``crowdpose`` (14): its annotation order, the CrowdPose authors' sigmas, P = 1, 3.

:func:`load_keypoint_set` reads a built-in name or a path and raises
:class:`KeypointSetError` naming the file, the key and the offending value.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

BUILTIN_DIR = Path(__file__).parent / "keypoint_sets"
BUILTIN_NAMES: tuple[str, ...] = ("coco", "mpii", "crowdpose")

Grouping = tuple[tuple[int, ...], ...]


class KeypointSetError(ValueError):
    """A keypoint-set file is unusable; the message names the file, the key and the value."""


@dataclass(frozen=True)
class JointSet:
    """A named set of K joints with everything that depends only on the joint order.

    ``groupings`` maps P to (part names, joint indices per part); ``colors`` holds one RGB
    colour per skeleton edge (None: the overlay palette).
    """

    name: str
    joints: tuple[str, ...]
    flip_pairs: tuple[tuple[int, int], ...]
    skeleton: tuple[tuple[int, int], ...]
    sigmas: tuple[float, ...] | None = None  # OKS per-joint sigmas (COCO-style AP needs them)
    groupings: Mapping[int, tuple[tuple[str, ...], Grouping]] = field(default_factory=dict, hash=False)
    colors: tuple[tuple[int, int, int], ...] | None = None

    @property
    def num_joints(self) -> int:
        return len(self.joints)

    def flip_permutation(self) -> list[int]:
        """Index map so that ``flipped[:, perm]`` swaps every left joint with its right twin."""
        perm = list(range(self.num_joints))
        for a, b in self.flip_pairs:
            perm[a], perm[b] = b, a
        return perm


def _fail(source: str, key: str, why: str) -> None:
    raise KeypointSetError(f"{source}: {key}: {why}")


def _names(value: Any, source: str, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        _fail(source, key, f"expected a list of joint names, got {value!r}")
    return value


def _index_of(name: str, index: dict[str, int], source: str, key: str) -> int:
    if name not in index:
        _fail(source, key, f"unknown joint {name!r}; the set's joints are {list(index)}")
    return index[name]


def _pairs(value: Any, index: dict[str, int], source: str, key: str) -> list[tuple[int, int]]:
    if not isinstance(value, list):
        _fail(source, key, f"expected a list of [joint, joint] pairs, got {value!r}")
    out = []
    for i, pair in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(n, str) for n in pair):
            _fail(source, where, f"expected a pair of joint names, got {pair!r}")
        out.append((_index_of(pair[0], index, source, where), _index_of(pair[1], index, source, where)))
    return out


def _grouping(value: Any, index: dict[str, int], source: str, key: str) -> tuple[tuple[str, ...], Grouping]:
    if not isinstance(value, dict) or not value:
        _fail(source, key, f"expected a mapping of part name -> joint names, got {value!r}")
    groups = []
    for part, members in value.items():
        where = f"{key}.{part}"
        members = _names(members, source, where)
        if not members:
            _fail(source, where, "the part is empty")
        if len(set(members)) != len(members):
            _fail(source, where, f"lists a joint twice: {members}")
        groups.append(tuple(_index_of(n, index, source, where) for n in members))
    covered = {j for g in groups for j in g}
    missing = [name for name, j in index.items() if j not in covered]
    if missing:
        _fail(source, key, f"joint {missing[0]!r} is in no part (uncovered: {missing})")
    return tuple(str(p) for p in value), tuple(groups)


def _groupings(value: Any, index: dict[str, int], source: str) -> dict[int, tuple[tuple[str, ...], Grouping]]:
    if not isinstance(value, dict) or not value:
        _fail(source, "parts", f"expected a mapping (P -> groups, or part name -> joints), got {value!r}")
    if all(isinstance(v, list) for v in value.values()):  # one grouping: P is its size
        names, groups = _grouping(value, index, source, "parts")
        return {len(groups): (names, groups)}
    out = {}
    for p, grouping in value.items():
        if isinstance(p, bool) or not isinstance(p, int) or p < 1:
            _fail(source, f"parts.{p}", "expected a positive number of parts P as the key")
        names, groups = _grouping(grouping, index, source, f"parts.{p}")
        if len(groups) != p:
            _fail(source, f"parts.{p}", f"has {len(groups)} parts, expected P={p}")
        out[p] = (names, groups)
    return out


def _colors(value: Any, num_edges: int, source: str) -> tuple[tuple[int, int, int], ...]:
    ok = isinstance(value, list) and all(
        isinstance(c, list) and len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c)
        for c in value
    )
    if not ok:
        _fail(source, "colors", f"expected a list of [r, g, b] (0..255) per skeleton edge, got {value!r}")
    if len(value) != num_edges:
        _fail(source, "colors", f"expected {num_edges} colours (one per skeleton edge), got {len(value)}")
    return tuple((c[0], c[1], c[2]) for c in value)


KEYS = ("name", "joints", "flip_pairs", "skeleton", "sigmas", "parts", "colors")


def parse_keypoint_set(data: Any, source: str) -> JointSet:
    """A :class:`JointSet` from the mapping of a keypoint-set YAML; ``source`` names it in errors."""
    if not isinstance(data, dict):
        raise KeypointSetError(f"{source}: expected a mapping with keys {list(KEYS)}")
    for key in data:
        if key not in KEYS:
            _fail(source, str(key), f"unknown key; a keypoint set has {list(KEYS)}")
    for key in ("name", "joints", "flip_pairs", "skeleton", "parts"):
        if key not in data:
            _fail(source, key, "missing")
    if not isinstance(data["name"], str) or not data["name"]:
        _fail(source, "name", f"expected a non-empty string, got {data['name']!r}")
    joints = _names(data["joints"], source, "joints")
    if not joints:
        _fail(source, "joints", "the set has no joints")
    duplicates = sorted({n for n in joints if joints.count(n) > 1})
    if duplicates:
        _fail(source, "joints", f"joint {duplicates[0]!r} is listed twice")
    index = {n: i for i, n in enumerate(joints)}

    flip_pairs = _pairs(data["flip_pairs"], index, source, "flip_pairs")
    partner: dict[int, int] = {}
    for i, (a, b) in enumerate(flip_pairs):
        if a == b:
            _fail(source, f"flip_pairs[{i}]", f"pairs joint {joints[a]!r} with itself")
        for j, other in ((a, b), (b, a)):
            if partner.get(j, other) != other:
                _fail(
                    source,
                    f"flip_pairs[{i}]",
                    f"asymmetric: {joints[j]!r} is paired with both "
                    f"{joints[partner[j]]!r} and {joints[other]!r}",
                )
            partner[j] = other
    skeleton = _pairs(data["skeleton"], index, source, "skeleton")

    sigmas = data.get("sigmas")
    if sigmas is not None:
        if not isinstance(sigmas, list) or not all(
            isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0 for s in sigmas
        ):
            _fail(source, "sigmas", f"expected a list of positive numbers, got {sigmas!r}")
        if len(sigmas) != len(joints):
            _fail(source, "sigmas", f"expected {len(joints)} sigmas (one per joint), got {len(sigmas)}")
        sigmas = tuple(float(s) for s in sigmas)
    colors = data.get("colors")
    return JointSet(
        name=data["name"],
        joints=tuple(joints),
        flip_pairs=tuple(flip_pairs),
        skeleton=tuple(skeleton),
        sigmas=sigmas,
        groupings=_groupings(data["parts"], index, source),
        colors=None if colors is None else _colors(colors, len(skeleton), source),
    )


def keypoint_set_path(name_or_path: str | Path) -> Path:
    """The YAML of a built-in name (``coco``, ``mpii``, ``crowdpose``) or a path as given."""
    if str(name_or_path) in BUILTIN_NAMES:
        return BUILTIN_DIR / f"{name_or_path}.yaml"
    path = Path(name_or_path)
    if not path.is_file():
        raise KeypointSetError(
            f"keypoint set {str(name_or_path)!r}: neither a built-in ({', '.join(BUILTIN_NAMES)}) nor a file"
        )
    return path


@functools.cache
def _load(path: str) -> JointSet:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise KeypointSetError(f"{path}: cannot read the keypoint set: {err}") from None
    return parse_keypoint_set(data, path)


def load_keypoint_set(name_or_path: str | Path) -> JointSet:
    """The keypoint set of a built-in name or a YAML path (read once per path)."""
    return _load(str(keypoint_set_path(name_or_path).resolve()))


COCO = load_keypoint_set("coco")
MPII = load_keypoint_set("mpii")
CROWDPOSE = load_keypoint_set("crowdpose")

# Raw MPII/HRNet json order: 0 r_ankle, 1 r_knee, 2 r_hip, 3 l_hip, 4 l_knee, 5 l_ankle,
# 6 pelvis, 7 thorax, 8 upper_neck, 9 head_top, 10 r_wrist, 11 r_elbow, 12 r_shoulder,
# 13 l_shoulder, 14 l_elbow, 15 l_wrist.  ``ours[i] = raw[MPII_FROM_RAW[i]]``.
MPII_FROM_RAW: tuple[int, ...] = (9, 8, 7, 13, 12, 14, 11, 15, 10, 3, 2, 4, 1, 5, 0, 6)

JOINT_SETS: dict[str, JointSet] = {"coco": COCO, "mpii": MPII, "crowdpose": CROWDPOSE}


def joint_set(name: str | Path) -> JointSet:
    """The keypoint set of a built-in name (``coco``, ``mpii``, ``crowdpose``) or a YAML path."""
    return load_keypoint_set(name)
