"""One engine over several ranks: rank 0 (the engine's own process) schedules, samples and sends each step's
description to the follower ranks; every rank runs the same forward pass on its shard.

Followers load their shard while rank 0 loads its own, say whether they succeeded (``confirm_loaded``), capture
the same CUDA graphs in the same order (captures run collectives), then follow step descriptions until rank 0
sends ``None``. A follower that dies makes rank 0's next step raise ``RankDiedError``: the engine fails its
requests and its process exits instead of waiting in a collective.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import msgspec
import torch

from longserve.config import EngineConfig
from longserve.distributed.launch import (
    FollowerRanks,
    RankPlacement,
    free_port,
    in_group,
    join_group,
    leave_group,
    node_placements,
    torchrun_placement,
)
from longserve.distributed.parallel import TensorParallel
from longserve.loading.errors import ModelLoadError

log = logging.getLogger(__name__)
RANK_PROCESS = "longserve.engine.rank_process"  # a follower's entry point


@dataclass
class EngineRanks:
    """Rank 0's handle on the group: its ``TensorParallel`` view, its device and the followers it started."""

    tp: TensorParallel
    device: torch.device
    followers: FollowerRanks | None = None

    def lead(self, step) -> None:
        """Send a step (a ``StepDescription``) to every follower; raises ``RankDiedError`` if one has exited."""
        if not self.tp.is_parallel:
            return
        if self.followers is not None:
            self.followers.check()
        self.tp.broadcast_object(step)

    def report_loaded(self, error: str | None = None) -> None:
        """Rank 0's side of ``confirm_loaded``. When any rank failed, the followers are stopped and the group
        left; a follower's failure raises ``ModelLoadError`` here (rank 0's own is re-raised by its caller)."""
        if not self.tp.is_parallel:
            return
        try:
            confirm_loaded(self.tp, error)
        except ValueError as exc:
            if self.followers is not None:
                self.followers.stop()
            leave_group()
            if error is None:
                raise ModelLoadError(str(exc)) from None

    def close(self) -> None:
        """Tell the followers to leave, wait for them and leave the group (idempotent)."""
        if not self.tp.is_parallel or not in_group():
            return
        try:
            if self.followers is not None:
                self.followers.check()
            self.tp.broadcast_object(None)
        except RuntimeError as exc:  # a follower already gone (RankDiedError too): stop the rest below
            log.warning("tensor parallel shutdown: %s", exc)
        if self.followers is not None:
            self.followers.stop()
        leave_group()


def placements_for(config: EngineConfig) -> list[RankPlacement]:
    """The ranks this process's node runs, first the one this process is (torchrun: just this process)."""
    launched = torchrun_placement(config.enable_expert_parallel)
    if launched is not None:
        if launched.world_size != config.tensor_parallel_size:
            raise ValueError(
                f"torchrun started {launched.world_size} processes, but tensor_parallel_size is "
                f"{config.tensor_parallel_size}"
            )
        return [launched]
    port = config.master_port or (free_port() if config.nnodes == 1 else 29500)
    return node_placements(
        config.tensor_parallel_size, config.nnodes, config.node_rank, config.master_addr, port,
        config.enable_expert_parallel,
    )  # fmt: skip


def start_ranks(config: EngineConfig) -> EngineRanks:
    """Rank 0's group: start this node's other ranks and join them (a no-op view for one device)."""
    if config.tensor_parallel_size == 1:
        return EngineRanks(TensorParallel(), torch.device(config.device))
    first, *others = placements_for(config)
    if first.rank != 0:
        raise ValueError(f"the engine runs on rank 0, not rank {first.rank} (node_rank {config.node_rank})")
    device = first.device(config.device)
    share_cores(config, device, local_ranks=len(others) + 1)
    for placement in others:  # every rank's device exists before any process starts
        placement.device(config.device)
    followers = FollowerRanks(RANK_PROCESS, msgspec.json.encode(config), others) if others else None
    try:
        tp = join_group(first, device, watch=followers.check if followers is not None else None)
    except (RuntimeError, ValueError):
        if followers is not None:
            followers.stop(timeout_s=1.0)
        raise
    log.info("tensor parallel: rank 0 of %d on %s", tp.size, device)
    return EngineRanks(tp, device, followers)


def share_cores(config: EngineConfig, device: torch.device, local_ranks: int) -> None:
    """CPU ranks split the node's cores (``num_threads`` each when set): N ranks of all-cores thread pools
    oversubscribe the machine, and a rank that waits for a core stalls every collective (4x slower steps
    measured with 2 ranks on 2 cores)."""
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    elif device.type == "cpu" and local_ranks > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))


def confirm_loaded(tp: TensorParallel, error: str | None) -> None:
    """Every rank says whether its shard loaded; any failure raises on every rank, naming the rank."""
    if not tp.is_parallel:
        if error is not None:
            raise ValueError(error)
        return
    errors = tp.all_gather_object(error)
    failed = [f"rank {rank}: {message}" for rank, message in enumerate(errors) if message is not None]
    if failed:
        raise ValueError("; ".join(failed))


def run_follower(config: EngineConfig, placement: RankPlacement) -> None:
    """A follower rank's whole life (rank_process.py's, or a torchrun-started process's)."""
    from longserve.engine.model_loading import allocate_caches, build_graphs, load_model
    from longserve.engine.model_runner import ModelRunner

    logging.basicConfig(
        level=logging.WARNING, format=f"rank {placement.rank} %(levelname)s %(name)s: %(message)s"
    )
    device = placement.device(config.device)
    share_cores(config, device, local_ranks=config.tensor_parallel_size // config.nnodes)
    tp = join_group(placement, device)
    try:
        try:
            loaded = load_model(config, device, tp)
            _, caches = allocate_caches(config, loaded, device, tp)
            error = None
        except (ValueError, RuntimeError, OSError) as exc:  # reported to rank 0, which raises it for all
            error = f"{type(exc).__name__}: {exc}"
        confirm_loaded(tp, error)
        resolved = config.resolved(device.type)
        max_model_len = min(
            resolved.max_model_len or loaded.model_config.max_position_embeddings,
            loaded.model_config.max_position_embeddings,
        )
        graphs = build_graphs(resolved, loaded, caches, device, tp, max_model_len)
        runner = ModelRunner(
            loaded.model, caches, config.block_size, device, graphs, max_context=max_model_len
        )
        while (step := tp.broadcast_object()) is not None:
            runner.follow(step)
    finally:
        leave_group()


def follows_only(config: EngineConfig) -> bool:
    """Whether this process only hosts follower ranks: a torchrun process of rank > 0, or a node other than 0."""
    if config.tensor_parallel_size == 1:
        return False
    launched = torchrun_placement(config.enable_expert_parallel)
    return launched.rank > 0 if launched is not None else config.node_rank > 0


def run_follower_node(config: EngineConfig) -> int:
    """Run this process's follower ranks until rank 0 ends them; 0 when all left cleanly."""
    placements = placements_for(config)
    if len(placements) == 1 and torchrun_placement(config.enable_expert_parallel) is not None:
        run_follower(config, placements[0])  # torchrun started this very rank
        return 0
    return FollowerRanks(RANK_PROCESS, msgspec.json.encode(config), placements).wait()
