"""docs/testing.md's "Keys and flags" table lists every config key and every flag of the
launch/ and data_prep/ scripts beside a test that sets it the way a user does (issue 26).

A new key or flag without a row fails here, naming the row to add; so does a row whose test
is not found in tests/, and a row for a key or flag that no longer exists."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import re
from pathlib import Path

import pytest

from pnfs.config import Config

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "testing.md"
SECTION = "## Keys and flags"
SCRIPTS = sorted((REPO / "launch").glob("*.py")) + sorted((REPO / "data_prep").glob("*.py"))
ROW = re.compile(r"^\|\s*`([^`]+)`\s*\|\s*(?:`([^`]+)`|(not yet))\s*\|")
NOT_YET = "not yet"
# keys and flags with no test through the user's door yet (docs/testing.md says why)
KNOWN_GAPS: set[str] = set()


def config_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every leaf field of the config dataclasses, dotted as an override spells it."""
    keys = []
    for f in dataclasses.fields(cls):
        default = f.default_factory if f.default_factory is not dataclasses.MISSING else f.default
        if isinstance(default, type) and dataclasses.is_dataclass(default):
            keys += config_keys(default, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


class _Parser(Exception):
    """Carries the parser a script built, out of its ``main`` before it parses anything."""


def script_flags(script: Path) -> list[str]:
    """``--flag`` options of one script, read from the argparse parser its ``main`` builds."""
    spec = importlib.util.spec_from_file_location(f"pnfs_table_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def grab(parser, *args, **kwargs):
        raise _Parser(parser)

    real = argparse.ArgumentParser.parse_known_args
    argparse.ArgumentParser.parse_known_args = grab
    try:
        module.main([])
    except _Parser as caught:
        parser = caught.args[0]
    else:
        raise AssertionError(f"{script.name}: main() parsed no arguments")
    finally:
        argparse.ArgumentParser.parse_known_args = real
    return [a.option_strings[-1] for a in parser._actions if a.option_strings and a.dest != "help"]


def expected_names() -> list[str]:
    flags = [f"{s.relative_to(REPO)} {flag}" for s in SCRIPTS for flag in script_flags(s)]
    return config_keys() + flags


def table_rows() -> dict[str, str]:
    """{key or "script flag": "test_file.py::test_name"} from the section's table."""
    text = DOC.read_text()
    assert SECTION in text, f"{DOC}: no '{SECTION}' section"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        m = ROW.match(line)
        if m:
            assert m.group(1) not in rows, f"{DOC}: two rows for `{m.group(1)}`"
            rows[m.group(1)] = m.group(2) or NOT_YET
    return rows


def test_config_keys_reach_every_section_and_nested_backbone():
    keys = config_keys()
    assert {"model.backbone.name", "data.verify_shards", "train.max_bad_steps", "search.arch_split"} <= set(
        keys
    )
    assert "eval.refine" in keys and "model.backbone" not in keys


def test_script_flags_are_read_from_the_parsers():
    assert "--prune-below" in script_flags(REPO / "launch" / "export.py")
    assert "--shard-size" in script_flags(REPO / "data_prep" / "shard_mpii.py")


def test_every_key_and_flag_has_a_row():
    rows = table_rows()
    missing = [name for name in expected_names() if name not in rows]
    assert not missing, (
        f"{DOC} '{SECTION}' lacks a row for each of these; add one per name, naming the test that "
        "sets it the way a user does:\n"
        + "\n".join(f"| `{name}` | `test_<file>.py::test_<name>` |" for name in missing)
    )


def test_no_row_names_a_key_or_flag_that_is_gone():
    stale = sorted(set(table_rows()) - set(expected_names()))
    assert not stale, f"{DOC} '{SECTION}' has rows for keys or flags that no longer exist: {stale}"


def _test_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name.startswith("test")}


def test_every_row_names_a_test_that_exists():
    wrong = []
    for name, test in table_rows().items():
        if test == NOT_YET:
            continue
        file, _, function = test.partition("::")
        path = REPO / "tests" / file
        if not path.is_file() or function not in _test_functions(path):
            wrong.append(f"`{name}`: tests/{file} has no {function or '(no ::test name)'}")
    assert not wrong, f"{DOC} '{SECTION}': rows naming a test that is not found:\n" + "\n".join(wrong)


def test_the_open_rows_are_exactly_the_known_gaps():
    """Rows marked "not yet" (no test through the user's door so far) are the gaps listed in
    docs/testing.md; a new key or flag cannot join them silently, and a gap that got its test
    must leave the list."""
    open_rows = {name for name, test in table_rows().items() if test == NOT_YET}
    assert open_rows == KNOWN_GAPS, (
        f"rows marked '{NOT_YET}' differ from KNOWN_GAPS in {__file__}: "
        f"new: {sorted(open_rows - KNOWN_GAPS)}, now covered: {sorted(KNOWN_GAPS - open_rows)}"
    )


@pytest.mark.parametrize(
    "row, want",
    [
        (
            "| `train.lr` | `test_config.py::test_defaults_and_overrides` |",
            "test_config.py::test_defaults_and_overrides",
        ),
        ("| `launch/demo.py --nproc` | not yet |", None),
    ],
)
def test_a_row_is_read_as_name_and_test(row, want):
    m = ROW.match(row)
    assert m and m.group(2) == want and (m.group(3) == NOT_YET) == (want is None)
