"""Metrics as strict JSON: a number that is not finite (an empty CrowdPose bin's AP, a PCK of
a joint nobody labelled) is written ``null``, never the ``NaN`` that JSON parsers refuse."""

from __future__ import annotations

import json
import math
from typing import Any


def finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float inside it (dicts, lists, tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`finite_or_none` ``(value)`` with ``allow_nan=False``."""
    return json.dumps(finite_or_none(value), allow_nan=False, **kwargs)
