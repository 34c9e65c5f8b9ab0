"""One resume dict per checkpoint, written atomically, loaded with ``weights_only=True``.

Layout of the dict (tensors and plain Python types only)::

    format        "pnfs-checkpoint"          (a foreign file fails on this key)
    version       pnfs.__version__
    model         state dict of the bare model, alpha/beta included
    optimizers    {"weights": ..., "arch": ... or None}
    schedule      {"epoch": e, "lr": lr}      (the lr is a pure function of the epoch)
    position      {"epoch": e, "samples_seen": n, "global_step": s, ...}
    rng           one entry per rank: torch / cuda / numpy / python generator states
    rank_buffers  one entry per rank (None for one process): its floating-point buffers by
                  name (BatchNorm statistics, each rank's own between epoch ends)
    config        the run's config as a plain dict
    metrics       {"score": ..., ...} of the last evaluation, and "best_score"

Files are ``step-<global_step:08d>.pt`` plus ``best.pt``; each is written to a temporary
name in the same folder, fsynced, then renamed, so a crash leaves either the old or the
new file, never half of one. ``keep_last`` newest step files are kept.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

import pnfs

FORMAT = "pnfs-checkpoint"
STEP_FILE = re.compile(r"^step-(\d{8})\.pt$")
BEST_FILE = "best.pt"
TEMP_FILE = re.compile(r"^\..+\.pt\.tmp-\d+$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the file and why."""


# --------------------------------------------------------------------------- RNG states


def capture_rng_state() -> dict[str, Any]:
    """This process's generator states as tensors and plain types."""
    np_state = np.random.get_state(legacy=True)
    if isinstance(np_state, dict):  # legacy=True gives the tuple for numpy's global MT19937
        raise TypeError(f"capture_rng_state: numpy's global generator is {np_state.get('bit_generator')}")
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": _to_plain(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    random.setstate(_to_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def floating_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's floating-point buffers (BatchNorm running statistics) by name, on the CPU.
    Under DDP each rank keeps its own between epoch ends (docs/design.md §7), so a checkpoint
    holds every rank's and a resume gives each rank its own back: it goes on bitwise."""
    return {
        name: b.detach().to("cpu", copy=True) for name, b in model.named_buffers() if b.is_floating_point()
    }


def load_buffers(model: torch.nn.Module, buffers: dict[str, torch.Tensor]) -> None:
    """Copy :func:`floating_buffers`' entries into ``model``'s buffers of the same names."""
    own = dict(model.named_buffers())
    with torch.no_grad():
        for name, value in buffers.items():
            own[name].copy_(value)


def _to_plain(x: Any) -> Any:
    return [_to_plain(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuple(x: Any) -> Any:
    return tuple(_to_tuple(v) for v in x) if isinstance(x, list) else x


# --------------------------------------------------------------------------- files


def step_path(folder: Path, global_step: int) -> Path:
    return Path(folder) / f"step-{global_step:08d}.pt"


def list_step_checkpoints(folder: str | Path) -> list[Path]:
    """``step-*.pt`` files of ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(match.group(1)), p) for p in folder.iterdir() if (match := STEP_FILE.match(p.name))]
    return [p for _, p in sorted(found, key=lambda step_path: step_path[0])]


def latest_checkpoint(folder: str | Path) -> Path | None:
    steps = list_step_checkpoints(folder)
    return steps[-1] if steps else None


def atomic_save(obj: dict[str, Any], path: str | Path) -> Path:
    """``torch.save`` to ``<path>.tmp-<pid>``, fsync the file, rename, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def remove_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files of :func:`atomic_save` that a killed writer left behind.

    Only rank 0 of the one run that owns ``folder`` writes there, so at start-up every such
    file is stale."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if TEMP_FILE.match(p.name)]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def deepspeed_dir(path: Path) -> Path:
    """DeepSpeed's own optimizer shards of a step file (``step-N.pt`` -> ``step-N.deepspeed/``)."""
    return path.with_name(path.name[: -len(".pt")] + ".deepspeed")


def prune_step_checkpoints(folder: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the ``keep_last`` newest step files (and their DeepSpeed folders)."""
    steps = list_step_checkpoints(folder)
    removed = steps[: max(0, len(steps) - keep_last)]
    for p in removed:
        p.unlink(missing_ok=True)
        if deepspeed_dir(p).is_dir():
            shutil.rmtree(deepspeed_dir(p), ignore_errors=True)
    return removed


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and check a checkpoint; any problem raises :class:`CheckpointError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"checkpoint {path} cannot be read (truncated, corrupt or not a torch file: {first}); "
            "older checkpoints in the same folder are untouched"
        ) from None
    except Exception as e:  # unpickling errors of foreign objects
        raise CheckpointError(f"checkpoint {path} holds objects pnfs did not write ({e})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a pnfs checkpoint (no 'format': {FORMAT!r} key)")
    for key in ("model", "optimizers", "position", "config", "rng"):
        if key not in obj:
            raise CheckpointError(f"checkpoint {path} lacks the {key!r} entry")
    return obj


def resolve_resume(resume: str | None, checkpoint_dir: str | Path) -> Path | None:
    """``auto``: the latest step file in ``checkpoint_dir`` (None when there is none yet);
    a path: that file (it must exist); None/empty: start fresh."""
    if not resume:
        return None
    if resume == "auto":
        return latest_checkpoint(checkpoint_dir)
    path = Path(resume)
    if not path.is_file():
        raise CheckpointError(f"--resume {resume}: no such checkpoint file")
    return path


def new_checkpoint(**entries: Any) -> dict[str, Any]:
    """The resume dict with its format tag and the pnfs version."""
    return {"format": FORMAT, "version": pnfs.__version__, **entries}


def own_storage(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with every tensor that views a larger storage copied into its own.

    ``torch.save`` writes a tensor's whole storage: a parameter that views a flat buffer
    (``train.flat_params``, :mod:`pnfs.engine.flat`) would otherwise put the buffer in the file
    (once, as the views share it, but a state dict that holds only some of them would still
    carry all of it). With copies the file holds each tensor's own bytes, as without flat
    parameters."""
    return {
        name: t.clone()
        if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() > t.numel() * t.element_size()
        else t
        for name, t in state.items()
    }


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with plain-number learning rates: a ``train.cuda_graph`` run's
    tensor learning rate (on its GPU) is saved as the float it holds (one host read, at a
    checkpoint), so any run, eager or graphed, on any device, loads the file alike."""
    state = optimizer.state_dict()
    for group in state["param_groups"]:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"] = float(group["lr"])
    return state
