"""Type-check the package as it is installed: ``pnfs`` with ``kernels/`` as ``pnfs.kernels``.

setup.py installs the top-level folder ``kernels/`` as the subpackage ``pnfs.kernels``
(``package_dir``), and the editable install resolves that through an import hook that mypy cannot
follow. So this script lays out the installed shape once more, as symbolic links under
``.mypy_cache/installed_tree/``::

    installed_tree/pnfs/<each entry of pnfs/>  -> pnfs/<entry>
    installed_tree/pnfs/kernels                -> kernels/

and runs ``mypy -p pnfs`` there with the settings of ``[tool.mypy]`` in pyproject.toml, so that
``from pnfs.kernels import ...`` resolves to the files in ``kernels/``. The tree sits at a fixed
place, so mypy's incremental cache stays valid between runs. Error lines are printed with the
repository's own paths (``kernels/aot.py``, not ``.mypy_cache/installed_tree/pnfs/kernels/aot.py``).

Usage (``make lint`` runs it)::

    python tools/typecheck.py            # the repository this script sits in
    python tools/typecheck.py --root DIR # another checkout with pnfs/, kernels/, pyproject.toml

Exit status: mypy's (0 clean, 1 type errors, 2 a usage or configuration error).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TREE_DIR = Path(".mypy_cache") / "installed_tree"


def build_installed_tree(root: Path, tree: Path | None = None) -> Path:
    """Lay out ``root/pnfs`` and ``root/kernels`` as installed, in ``tree`` (default
    ``root/.mypy_cache/installed_tree``, laid anew each time: only links, never the files).

    Returns ``tree``, the folder that holds the package ``pnfs`` (the one mypy runs in).
    """
    source, kernels = root / "pnfs", root / "kernels"
    for folder in (source, kernels):
        if not (folder / "__init__.py").is_file():
            raise SystemExit(f"typecheck: {folder} is not a package (no __init__.py)")
    if (source / "kernels").exists():
        raise SystemExit(
            f"typecheck: {source / 'kernels'} exists, but pnfs.kernels is installed from {kernels}"
        )
    tree = root / TREE_DIR if tree is None else tree
    if tree.exists():
        shutil.rmtree(tree)
    package = tree / "pnfs"
    package.mkdir(parents=True)
    for entry in sorted(source.iterdir()):
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
    (package / "kernels").symlink_to(kernels.resolve(), target_is_directory=True)
    return tree


def repository_path(line: str) -> str:
    """Rewrite a mypy report line from the tree's paths to the repository's.

    ``pnfs/kernels/aot.py:3: error: ...`` -> ``kernels/aot.py:3: error: ...``; other lines as they are.
    """
    kernels_prefix = "pnfs" + os.sep + "kernels" + os.sep
    if line.startswith(kernels_prefix):
        return "kernels" + os.sep + line[len(kernels_prefix) :]
    return line


def run_mypy(root: Path, extra_args: list[str]) -> int:
    """Run ``mypy -p pnfs`` over the installed tree of ``root``; print its report; return its status."""
    tree = build_installed_tree(root)
    command = [
        sys.executable,
        "-m",
        "mypy",
        "--config-file",
        str(root / "pyproject.toml"),
        "--cache-dir",
        str(root / ".mypy_cache"),
        "-p",
        "pnfs",
        *extra_args,
    ]
    # MYPYPATH from the caller's shell would put other copies of pnfs on the search path.
    env = {key: value for key, value in os.environ.items() if key != "MYPYPATH"}
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
    for line in done.stdout.splitlines():
        print(repository_path(line))
    sys.stderr.write(done.stderr)
    return done.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=REPO_ROOT, help="checkout holding pnfs/ and kernels/")
    args, extra = parser.parse_known_args(argv)
    return run_mypy(args.root.resolve(), extra)


if __name__ == "__main__":
    sys.exit(main())
