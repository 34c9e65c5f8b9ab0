"""pnfs/data/__init__.py, the data package's public API (docs/design.md §9): every name in
``__all__`` is the object its own module defines, an unknown name is refused naming the public
ones, and ``import pnfs.data`` loads neither torch nor cv2 (the names load on first use)."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import pnfs.data


@pytest.mark.parametrize("name", pnfs.data.__all__)
def test_each_public_name_is_its_modules_own_object(name):
    home = importlib.import_module(pnfs.data._HOME[name])
    assert getattr(pnfs.data, name) is getattr(home, name)


def test_all_and_the_lazy_table_name_the_same_names():
    assert sorted(pnfs.data.__all__) == sorted(pnfs.data._HOME)


def test_an_unknown_name_is_refused_with_the_public_ones():
    with pytest.raises(AttributeError, match=r"no attribute 'build_loaders'.*'build_loader'"):
        pnfs.data.build_loaders  # noqa: B018


def test_importing_the_package_loads_neither_torch_nor_cv2():
    code = "import sys, pnfs.data; print(sorted(m for m in ('torch', 'cv2', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
