"""pnfs/evaluate/strict_json.py: metrics with NaN or infinity are written as strict JSON, the
non-finite numbers as ``null`` at every depth, everything else unchanged (issue 26, mutation
section of docs/testing.md)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pnfs.evaluate.strict_json import dumps, finite_or_none

NON_FINITE = [float("nan"), float("inf"), float("-inf")]


@pytest.mark.parametrize("bad", NON_FINITE)
def test_a_non_finite_float_becomes_none_at_every_depth(bad):
    value = {"ap": bad, "bins": [0.5, bad, (bad, 2.0)], "nested": {"deeper": {"pck": bad}}}
    assert finite_or_none(value) == {
        "ap": None,
        "bins": [0.5, None, [None, 2.0]],
        "nested": {"deeper": {"pck": None}},
    }
    assert finite_or_none(bad) is None


def test_finite_values_and_other_types_pass_unchanged():
    value = {"ap": 0.25, "n": 3, "ok": True, "name": "nan", "none": None, "neg": -1e300, 5: [1, "x"]}
    got = finite_or_none(value)
    assert got == value
    assert type(got["n"]) is int and got["ok"] is True and got["name"] == "nan"
    assert finite_or_none(0.0) == 0.0 and finite_or_none("inf") == "inf"
    assert finite_or_none((1.0, 2)) == [1.0, 2]  # tuples become lists, as json writes them
    assert finite_or_none(np.float64("nan")) is None  # numpy's float64 is a float


def test_dumps_writes_null_and_passes_json_options_through():
    metrics = {"AP": float("nan"), "bins": [1.0, float("inf")], "b": 2}
    text = dumps(metrics, indent=1, sort_keys=True)
    assert text == json.dumps({"AP": None, "b": 2, "bins": [1.0, None]}, indent=1, sort_keys=True)
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict constant {c}"))["AP"] is None


def test_dumps_refuses_what_it_cannot_make_strict():
    """allow_nan=False stays on: a non-finite number hidden in a type finite_or_none does not
    walk (a numpy array's element is not a Python float) fails loudly instead of writing NaN."""

    class Odd(float):
        pass

    assert math.isnan(Odd("nan"))
    assert dumps({"x": Odd("nan")}) == '{"x": null}'  # a float subclass is still a float
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        dumps({"x": {1.5}}, default=lambda s: [float("nan")])
