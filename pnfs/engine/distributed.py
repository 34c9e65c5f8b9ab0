"""Process-group setup read from the environment (torchrun or a plain single process), and
the DDP-specific parts of training: gradient and buffer averaging, the DDP wrapper. The
collectives that evaluation shares with training (gather, broadcast, barrier, sum) are in
:mod:`pnfs.process_group`, a level below both.

``torchrun`` exports RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; without
them the run is a single process and no process group is created. gloo on CPU, NCCL on
CUDA.

Elastic restarts: under ``torchrun --max-restarts N`` the agent's TCP store outlives the
workers, so after a restart the new workers could read the dead worker's address from
keys written by the previous group (on torch 2.14 with gloo 4 of 9 restarts crashed and 1
hung). We therefore build the process group on a store whose keys are prefixed with
``TORCHELASTIC_RESTART_COUNT``: every restart gets a fresh key space.
"""

from __future__ import annotations

import datetime
import inspect
import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    restart_count: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"environment variable {name}={value!r} is not an integer") from None


def pick_device(request: str, local_rank: int) -> torch.device:
    """``auto``: this rank's CUDA device when CUDA is available, else CPU."""
    if request not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device {request!r}; expected auto, cpu or cuda")
    if request == "cpu" or (request == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available")
    index = local_rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def restart_prefixed_store(rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store:
    """The rendezvous store of ``env://`` wrapped in a ``restart-<k>/`` key prefix.

    Under torchrun (``TORCHELASTIC_USE_AGENT_STORE=True``) the elastic agent already hosts
    a TCP store at MASTER_ADDR:MASTER_PORT and every worker is a client; otherwise rank 0
    hosts it.
    """
    host = os.environ.get("MASTER_ADDR")
    port = os.environ.get("MASTER_PORT")
    if not host or not port:
        raise RuntimeError(
            f"WORLD_SIZE={world_size} but MASTER_ADDR/MASTER_PORT are not set; launch with torchrun"
        )
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        host_name=host,
        port=int(port),
        world_size=world_size,
        is_master=(rank == 0 and not agent_hosts),
        timeout=timeout,
        wait_for_workers=False,
    )
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"pnfs/restart-{restart}/", store)


def init_distributed(
    device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S, cuda_graph: bool = False
) -> DistContext:
    """Read rank/world from the environment, pick the device, start the process group.

    ``cuda_graph`` (``train.cuda_graph``): an NCCL group that lets a CUDA graph capture its
    collectives (:func:`allow_collectives_in_cuda_graphs`, set before the group starts)."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    restart = _env_int("TORCHELASTIC_RESTART_COUNT", 0)
    if not 0 <= rank < world_size:
        raise RuntimeError(f"RANK={rank} is outside WORLD_SIZE={world_size}")
    dev = pick_device(device, local_rank)
    if cuda_graph and world_size > 1 and dev.type == "cuda":
        if dist.is_initialized() and os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING") != "0":
            raise RuntimeError(
                "train.cuda_graph: the process group was started with NCCL's asynchronous error "
                "handling on, which forbids capturing its collectives; start it with "
                "init_distributed(..., cuda_graph=True)"
            )
        allow_collectives_in_cuda_graphs()
    if world_size > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        store = restart_prefixed_store(rank, world_size, timeout)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {}
        if backend == "nccl":
            kwargs["device_id"] = dev
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world_size, timeout=timeout, **kwargs
        )
    return DistContext(rank, world_size, local_rank, dev, restart)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def average_gradients(params: list[nn.Parameter], world_size: int) -> None:
    """All-reduce mean of ``p.grad`` (the darts1 architecture step, which bypasses DDP)."""
    if world_size == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world_size)


def average_buffers(model: nn.Module, world_size: int) -> None:
    """All-reduce mean of the floating-point buffers (BatchNorm running statistics).

    DDP does not broadcast them at each forward (:func:`wrap_ddp`), so between epochs each rank
    keeps statistics of its own batches; averaging them at the end of each epoch gives every
    rank (and the evaluation) the same model, with statistics from all ranks' data."""
    if world_size == 1:
        return
    for buf in model.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf)
            buf.div_(world_size)


def wrap_ddp(model: nn.Module, device: torch.device, for_cuda_graph: bool = False) -> nn.Module:
    """``DistributedDataParallel`` around ``model`` without the broadcast of every buffer (the
    BatchNorm statistics) from rank 0 at each forward: :func:`average_buffers` averages them at
    each epoch's end instead (docs/design.md §7). ``gradient_as_bucket_view`` stays off: DDP then
    copies the reduced gradients into each ``p.grad`` in place, which keeps them views of the flat
    gradient buffer (``train.flat_params``, :mod:`pnfs.engine.flat`). ``for_cuda_graph``
    (``train.cuda_graph``): DDP's static graph, built on a side stream, as PyTorch's CUDA-graph
    notes ask before a capture."""
    from pnfs.engine.graph import side_stream

    ddp = nn.parallel.DistributedDataParallel
    # torch >= 2.14 names the switch forward_sync_buffers and deprecates broadcast_buffers
    no_forward_broadcast: dict[str, Any]
    if "forward_sync_buffers" in inspect.signature(ddp).parameters:
        no_forward_broadcast = {"forward_sync_buffers": False}
    else:
        no_forward_broadcast = {"broadcast_buffers": False}
    device_ids = [device.index] if device.type == "cuda" else None
    with side_stream(device) if for_cuda_graph else nullcontext():
        return ddp(model, device_ids=device_ids, static_graph=for_cuda_graph, **no_forward_broadcast)


def allow_collectives_in_cuda_graphs() -> None:
    """NCCL's asynchronous error handling off (its watchdog queries events, which a capture
    forbids): set before the process group starts when ``train.cuda_graph`` is on, as PyTorch's
    CUDA-graph notes ask for capturing DDP's all-reduces."""
    os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "0"
    os.environ["NCCL_ASYNC_ERROR_HANDLING"] = "0"  # the name before torch 2.2
