"""tools/typecheck.py (``make lint``): mypy sees ``kernels/`` as ``pnfs.kernels``, as setup.py installs it.

The full check of the repository runs in ``make lint``; these tests run the same script, with the
repository's own ``[tool.mypy]`` settings, on a two-file package, so they take seconds.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "typecheck.py"


def _typecheck_module():
    spec = importlib.util.spec_from_file_location("typecheck", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _package(root: Path, user: str, kernel: str) -> Path:
    """A checkout in miniature: pnfs/user.py imports pnfs.kernels.scale, which is kernels/scale.py."""
    for folder in ("pnfs", "kernels"):
        (root / folder).mkdir(parents=True)
        (root / folder / "__init__.py").write_text("")
    (root / "pnfs" / "user.py").write_text(user)
    (root / "kernels" / "scale.py").write_text(kernel)
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


KERNEL = "def double(x: int) -> int:\n    return 2 * x\n"
USER = "from pnfs.kernels.scale import double\n\n\ndef run() -> int:\n    return double({arg})\n"


def _typecheck(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--root", str(root)], capture_output=True, text=True, timeout=300
    )


def test_the_installed_tree_holds_every_module_of_pnfs_and_kernels(tmp_path):
    tree = _typecheck_module().build_installed_tree(REPO, tmp_path / "tree")
    seen = {
        (Path(folder) / name).resolve()
        for folder, _, names in os.walk(tree / "pnfs", followlinks=True)  # as mypy walks it
        for name in names
        if name.endswith(".py")
    }
    wanted = {p.resolve() for folder in ("pnfs", "kernels") for p in (REPO / folder).rglob("*.py")}
    assert wanted and wanted <= seen
    assert (tree / "pnfs" / "kernels").resolve() == (REPO / "kernels").resolve()
    assert all(p.is_file() for p in (REPO / "pnfs").rglob("*.py"))  # links only: nothing moved


def test_an_import_of_pnfs_kernels_resolves_and_a_clean_package_passes(tmp_path):
    done = _typecheck(_package(tmp_path, USER.format(arg="2"), KERNEL))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Success: no issues found in 4 source files" in done.stdout


def test_a_wrong_call_into_pnfs_kernels_is_caught_at_its_line(tmp_path):
    done = _typecheck(_package(tmp_path, USER.format(arg='"2"'), KERNEL))
    assert done.returncode == 1
    wrong_argument = 'Argument 1 to "double" has incompatible type "str"; expected "int"  [arg-type]'
    assert f"pnfs/user.py:5: error: {wrong_argument}" in done.stdout


def test_an_error_in_an_unannotated_kernel_function_is_reported_at_kernels_path(tmp_path):
    """check_untyped_defs is on, and report lines name kernels/..., where the file is."""
    kernel = KERNEL + "\n\ndef untyped():\n    return 1 + 'one'\n"
    done = _typecheck(_package(tmp_path, USER.format(arg="2"), kernel))
    assert done.returncode == 1
    assert 'kernels/scale.py:6: error: Unsupported operand types for + ("int" and "str")  [operator]' in (
        done.stdout
    )
    assert "pnfs/kernels/" not in done.stdout


def test_a_pnfs_kernels_folder_beside_the_mapping_is_refused(tmp_path):
    root = _package(tmp_path, USER.format(arg="2"), KERNEL)
    (root / "pnfs" / "kernels").mkdir()
    done = _typecheck(root)
    assert done.returncode != 0
    assert "pnfs.kernels is installed from" in done.stdout + done.stderr
