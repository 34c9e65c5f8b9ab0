"""Shared fixtures and the marker rules of the suite.

* ``interpret`` tests run only with ``TRITON_INTERPRET=1`` set before triton was imported
  (``make test-interpret`` does that in its own pytest process).
* ``gpu`` tests are skipped without CUDA.
* Tests that read real samples take ``shared_data`` and skip when ``../shared/data`` is absent,
  except in CI (``CI`` set, as ``.ci/run`` does) or with ``PNFS_REQUIRE_DATA=1``: there a missing
  folder ends the run at its start with one line naming it, so a checkout that lost its real
  samples cannot go green. ``-ra`` (pyproject addopts) lists every skip with its reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PNFS_SHARED_DATA", REPO.parent / "shared" / "data"))


def data_required() -> bool:
    """True in CI (``CI`` set to anything but "", "0", "false") or with ``PNFS_REQUIRE_DATA=1``."""
    ci = os.environ.get("CI", "").strip().lower()
    return ci not in ("", "0", "false") or os.environ.get("PNFS_REQUIRE_DATA") == "1"


def pytest_sessionstart(session):
    if data_required() and not SHARED_DATA.is_dir():
        raise pytest.UsageError(
            f"real samples missing: {SHARED_DATA} is not a folder (CI or PNFS_REQUIRE_DATA=1 needs "
            "../shared/data beside the checkout, or PNFS_SHARED_DATA)"
        )


def pytest_collection_modifyitems(config, items):
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    skip_interpret = pytest.mark.skip(
        reason="needs TRITON_INTERPRET=1 before triton is imported (make test-interpret)"
    )
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "interpret" in item.keywords and not interpreted:
            item.add_marker(skip_interpret)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the checkout (or $PNFS_SHARED_DATA); skips when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(
            f"real samples not found at {SHARED_DATA} (the ../shared/data folder beside the checkout)"
        )
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def known_checkpoint(shared_data, tmp_path_factory):
    """A tiny model trained on the shared COCO sample, and the same model at initialisation
    (see ``tests/support/known_model.py``); made once per session."""
    from tests.support.known_model import make_known_checkpoint

    return make_known_checkpoint(shared_data, tmp_path_factory.mktemp("known-checkpoint"))
