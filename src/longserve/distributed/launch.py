"""Starting the ranks of one tensor-parallel engine and joining them into process groups.

One node (the usual case): the engine process is rank 0 and starts ranks 1..N-1 as child processes, meeting
them on a free loopback port. Several nodes: every node runs ``longserve worker`` with ``--nnodes/--node-rank/
--master-addr/--master-port`` as torchrun takes them; node 0's first process is rank 0, every other rank only
follows it. A process started by torchrun itself is placed from torchrun's RANK/WORLD_SIZE/LOCAL_RANK/
MASTER_ADDR/MASTER_PORT environment variables.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from longserve.distributed.parallel import TensorParallel

log = logging.getLogger(__name__)


class RankDiedError(RuntimeError):
    """A rank of the tensor-parallel group exited: the engine cannot step any more."""


@dataclass(frozen=True)
class RankPlacement:
    """Where one rank sits: its global rank, the group size, its index on its node and the rendezvous."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    expert_parallel: bool = False
    timeout_s: float = 300.0  # a collective that waits longer (a rank hung) raises instead of hanging

    def device(self, device: str) -> torch.device:
        """This rank's device: ``cuda:<local_rank>`` (offset by an explicit ``cuda:N``), or the CPU."""
        base = torch.device(device)
        if base.type != "cuda":
            return base
        index = (base.index or 0) + self.local_rank
        available = torch.cuda.device_count()
        if index >= available:
            raise ValueError(
                f"tensor parallel rank {self.rank} needs cuda:{index}, but this node has {available} GPU(s)"
            )
        return torch.device("cuda", index)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def node_placements(
    world_size: int,
    nnodes: int,
    node_rank: int,
    master_addr: str,
    master_port: int,
    expert_parallel: bool,
) -> list[RankPlacement]:
    """The ranks this node runs, in order (node 0's first is rank 0)."""
    if world_size % nnodes:
        raise ValueError(f"tensor_parallel_size ({world_size}) must be a multiple of nnodes ({nnodes})")
    if not 0 <= node_rank < nnodes:
        raise ValueError(f"node_rank ({node_rank}) must be in [0, {nnodes})")
    per_node = world_size // nnodes
    return [
        RankPlacement(node_rank * per_node + i, world_size, i, master_addr, master_port, expert_parallel)
        for i in range(per_node)
    ]


def torchrun_placement(expert_parallel: bool) -> RankPlacement | None:
    """This process's place when torchrun started it (its environment variables), else ``None``."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return RankPlacement(
        int(os.environ["RANK"]),
        int(os.environ["WORLD_SIZE"]),
        int(os.environ.get("LOCAL_RANK", os.environ["RANK"])),
        os.environ.get("MASTER_ADDR", "127.0.0.1"),
        int(os.environ.get("MASTER_PORT", "29500")),
        expert_parallel,
    )


def join_group(
    placement: RankPlacement,
    device: torch.device,
    watch: Callable[[], None] | None = None,  # rank 0: raises when a follower it started has exited
) -> TensorParallel:
    """Rendezvous with the other ranks; tensors go over NCCL on CUDA and gloo on the CPU.

    Rank 0 hosts the rendezvous store and waits for every rank to check in, calling ``watch`` meanwhile, so a
    follower that dies while starting fails the engine at once instead of after the timeout."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=placement.timeout_s)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    first = placement.rank == 0
    store = dist.TCPStore(
        placement.master_addr, placement.master_port, placement.world_size, is_master=first,
        timeout=timeout, wait_for_workers=False,
    )  # fmt: skip
    if first:
        _wait_for_ranks(store, placement, watch)
    else:
        store.set(f"longserve/joined/{placement.rank}", "1")
    dist.init_process_group(
        backend, store=store, rank=placement.rank, world_size=placement.world_size, timeout=timeout
    )
    group = dist.group.WORLD
    control = group if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    return TensorParallel(
        placement.rank, placement.world_size, group, control, expert_parallel=placement.expert_parallel
    )


def _wait_for_ranks(store, placement: RankPlacement, watch: Callable[[], None] | None) -> None:
    keys = [f"longserve/joined/{rank}" for rank in range(1, placement.world_size)]
    deadline = time.monotonic() + placement.timeout_s
    while not store.check(keys):
        if watch is not None:
            watch()
        if time.monotonic() > deadline:
            raise RankDiedError(f"not every rank joined within {placement.timeout_s:.0f} s")
        time.sleep(0.05)


def in_group() -> bool:
    """Whether this process has joined a group (and not left it)."""
    return dist.is_initialized()


def leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class FollowerRanks:
    """The ranks this process started (every rank of the node but rank 0 itself), watched by rank 0.

    Each is a fresh interpreter (``python -m MODULE --placement JSON``, the EngineConfig as JSON on stdin), so
    the parent's ``__main__`` is never re-imported: a script without a ``__main__`` guard can start ranks."""

    def __init__(self, module: str, config_json: bytes, placements: list[RankPlacement]) -> None:
        self.processes: list[subprocess.Popen] = []
        self.names: list[str] = []
        for placement in placements:
            command = [sys.executable, "-m", module, "--placement", json.dumps(asdict(placement))]
            process = subprocess.Popen(command, stdin=subprocess.PIPE)
            process.stdin.write(config_json)
            process.stdin.close()
            self.processes.append(process)
            self.names.append(f"rank-{placement.rank}")

    def check(self) -> None:
        """Raise ``RankDiedError`` when a started rank has exited."""
        for process, name in zip(self.processes, self.names, strict=True):
            if process.poll() is not None:
                raise RankDiedError(f"tensor parallel {name} exited with code {process.returncode}")

    def wait(self) -> int:
        """Wait for every rank to leave; the worst exit code."""
        return max(process.wait() for process in self.processes)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Wait for the ranks to leave (after rank 0 told them to), then terminate any that did not."""
        for process, name in zip(self.processes, self.names, strict=True):
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("tensor parallel %s did not stop; terminating it", name)
                process.terminate()
                try:
                    process.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def placement_from_json(text: str) -> RankPlacement:
    return RankPlacement(**json.loads(text))
