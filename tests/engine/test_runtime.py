"""The process-wide settings a run makes (pnfs/engine/runtime.py)."""

from __future__ import annotations

import pytest
import torch

from pnfs.config import load_config
from pnfs.engine.runtime import set_determinism


@pytest.fixture
def torch_settings_restored():
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=True)
    torch.backends.cudnn.benchmark = before[1]


def test_deterministic_false_after_true_in_one_process_switches_them_off(torch_settings_restored):
    """A second run in the same process must not inherit the first run's train.deterministic."""
    set_determinism(load_config("demo", ["train.deterministic=true"]))
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.benchmark is False
    set_determinism(load_config("demo", ["train.deterministic=false"]))
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.benchmark is torch.cuda.is_available()  # autotuning only where cuDNN runs
    set_determinism(load_config("demo", ["train.deterministic=true"]))
    assert torch.are_deterministic_algorithms_enabled()
