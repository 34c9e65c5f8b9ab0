"""Multi-process training under torchrun on CPU (gloo): DDP on one and on two "nodes", DeepSpeed
ZeRO-1, and an elastic restart after ``kill -9`` of a worker. The runs search with ``darts1``,
the strategy with the most moving parts (held-out stream, second optimizer). Every check reads
the workers' own lines (rank, step, sha256 of the weights; the optimizer line), not only
torchrun's exit code, and every run is killed with its whole process group on timeout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pnfs.config import load_config
from pnfs.model import build_model
from tests.support.engine import PY, REPO, TINY_OVERRIDES, digests, free_port, tiny_dataset, worker_env

pytestmark = pytest.mark.distributed

TORCHRUN = [PY, "-m", "torch.distributed.run"]
EPOCHS, STEPS = 2, 3  # 3 steps per epoch (of 4: 32 weight samples / (2 ranks x 4)), 6 in all
RUN_TIMEOUT = 200


def train_args(data: dict, out_dir: Path, *extra: str) -> list[str]:
    return [
        str(REPO / "launch" / "train.py"),
        "--config",
        str(REPO / "pnfs" / "configs" / "demo.yaml"),
        *TINY_OVERRIDES,
        *data["overrides"],
        f"train.epochs={EPOCHS}",
        f"train.max_steps_per_epoch={STEPS}",
        "train.checkpoint_every=2",
        "train.keep_last=2",
        "--strategy",
        "darts1",
        "--out",
        str(out_dir),
        *extra,
    ]


def start(cmd: list[str], **env: str) -> subprocess.Popen:
    """torchrun in its own session, so that a timeout can kill the agent and all its workers."""
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=worker_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen, timeout: float = RUN_TIMEOUT) -> str:
    """The run's output once it exited 0; on timeout the process group is killed and the test fails."""
    try:
        output = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output = proc.communicate()[0]
        pytest.fail(f"torchrun did not finish within {timeout} s:\n{output[-4000:]}")
    assert proc.returncode == 0, output[-4000:]
    return output


def assert_finished_together(output: str, steps: int) -> str:
    found = digests(output)
    assert set(found) == {0, 1}, f"both workers must report; got {found}\n{output[-3000:]}"
    assert found[0][:2] == found[1][:2] == ("finished", steps), found
    assert found[0][2] == found[1][2], "ranks ended with different weights"
    return found[0][2]


def assert_darts1_optimizers(output: str, data: dict) -> None:
    """The rank-0 log names what each optimizer holds: no alpha/beta among the weights."""
    cfg = load_config(None, [*TINY_OVERRIDES, *data["overrides"]])
    model = build_model(cfg)
    weights = len([p for p in model.weight_parameters() if p.requires_grad])
    arch = len(model.arch_parameters())
    expected = (
        f"weight optimizer: {weights} weight tensors, alpha/beta excluded (0 tensors); "
        f"architecture optimizer: {arch} alpha/beta tensors"
    )
    assert expected in output, output[-3000:]


def assert_architecture_moved(out_dir: Path) -> None:
    """The exported softmax(alpha)/softmax(beta) left the uniform start (alpha, beta = 0)."""
    arch = json.loads((out_dir / "architecture" / "final.json").read_text())
    for fabric in [*arch["parts"], arch["backbone"]]:
        assert any(abs(v - 1 / len(row)) > 1e-4 for row in fabric["alpha"] for v in row), fabric["alpha"]
        assert any(abs(v - 1 / 3) > 1e-4 for beta in fabric["beta"].values() for v in beta)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    """One node, two processes, the whole run: the reference the other runs must equal."""
    out = tmp_path_factory.mktemp("ddp")
    proc = start([*TORCHRUN, "--nproc_per_node=2", f"--master_port={free_port()}", *train_args(data, out)])
    return finish(proc), out


@pytest.mark.timeout(300)
def test_two_processes_end_with_identical_weights(data, uninterrupted):
    output, out = uninterrupted
    assert "on 2 process(es), device cpu, strategy darts1, engine ddp" in output
    assert_finished_together(output, steps=EPOCHS * STEPS)
    assert_darts1_optimizers(output, data)
    assert_architecture_moved(out)
    assert (out / "checkpoints" / f"step-{EPOCHS * STEPS:08d}.pt").is_file()
    assert len(list((out / "checkpoints").glob("step-*.pt"))) == 2  # train.keep_last
    for name in ("architecture/final.png", "architecture/epoch-000.json", "config.yaml", "train.log"):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.timeout(300)
def test_two_nodes_on_localhost_train_together(data, uninterrupted, tmp_path):
    port = free_port()
    nodes = [
        start(
            [
                *TORCHRUN,
                "--nnodes=2",
                f"--node_rank={node}",
                "--nproc_per_node=1",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
                *train_args(data, tmp_path / "two-nodes"),
            ]
        )
        for node in (0, 1)
    ]
    try:
        outputs = [finish(p) for p in nodes]
    finally:
        for p in nodes:  # a failed node must not leave the other one waiting for it
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert digests(outputs[0])[0][0] == "finished" and digests(outputs[1])[1][0] == "finished"
    digest = assert_finished_together(outputs[0] + outputs[1], steps=EPOCHS * STEPS)
    # same world size, same rank order: the same weights as two processes on one node
    assert digest == digests(uninterrupted[0])[0][2]


@pytest.mark.timeout(300)
def test_deepspeed_zero1_on_cpu_two_processes(data, tmp_path):
    out = tmp_path / "ds"
    proc = start(
        [
            *TORCHRUN,
            "--nproc_per_node=2",
            f"--master_port={free_port()}",
            *train_args(data, out, "train.epochs=1"),
            "--deepspeed",
            str(REPO / "launch" / "deepspeed_zero1.json"),
        ],
        DS_ACCELERATOR="cpu",
    )
    output = finish(proc)
    assert "engine deepspeed (ZeRO stage 1)" in output
    assert "built successfully" not in output  # the shared-memory op was not compiled
    assert_finished_together(output, steps=STEPS)
    assert_darts1_optimizers(output, data)
    assert_architecture_moved(out)


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        out += [int(c) for c in children]
        todo += [int(c) for c in children]
    return out


def worker_pid(agent_pid: int, rank: int) -> int | None:
    """The first-generation worker of ``rank`` among the agent's descendants."""
    for pid in descendants(agent_pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"TORCHELASTIC_RESTART_COUNT=0" in env:
            return pid
    return None


@pytest.mark.timeout(360)
def test_kill_9_of_a_worker_restarts_and_ends_like_the_uninterrupted_run(data, uninterrupted, tmp_path):
    out = tmp_path / "elastic"
    agent = start(
        [
            *TORCHRUN,
            "--nproc_per_node=2",
            "--max-restarts=1",
            f"--master_port={free_port()}",
            *train_args(data, out),
            "--resume",
            "auto",
        ]
    )
    first_checkpoint = out / "checkpoints" / "step-00000002.pt"
    deadline = time.monotonic() + RUN_TIMEOUT
    victim = None
    while victim is None and time.monotonic() < deadline and agent.poll() is None:
        if first_checkpoint.exists():
            victim = worker_pid(agent.pid, rank=1)
        time.sleep(0.005)
    if victim is None:
        os.killpg(agent.pid, signal.SIGKILL)
        pytest.fail(f"no worker to kill before the run ended:\n{agent.communicate()[0][-4000:]}")
    os.kill(victim, signal.SIGKILL)
    output = finish(agent)
    assert "restart 1" in output and "resuming from" in output, output[-4000:]
    digest = assert_finished_together(output, steps=EPOCHS * STEPS)
    assert digest == digests(uninterrupted[0])[0][2]
