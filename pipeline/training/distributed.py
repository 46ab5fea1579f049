"""Process-group plumbing shared by standalone runs and Ray Train workers.

Ray Train owns the process group inside a sweep; standalone `isoflop train` spawns its own ranks
with torch.multiprocessing. Either way DeepSpeed reuses the group it finds.
"""
from __future__ import annotations

import os
import socket
from typing import Callable

import torch
import torch.distributed as dist


def configure_accelerator() -> None:
    """DeepSpeed picks its accelerator at import time: tell it before it is imported."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")


def device_for_rank() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def ensure_process_group() -> tuple[int, int]:
    """(rank, world size); makes a one-rank group when none exists. DeepSpeed asks for LOCAL_RANK."""
    if not dist.is_initialized():
        # an in-process store: no port to race for, and nothing written to os.environ that child
        # processes (Ray workers, a sweep driver started by this process) would inherit
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", store=dist.HashStore(),
                                rank=0, world_size=1)
    os.environ.setdefault("LOCAL_RANK", str(dist.get_rank() % max(1, torch.cuda.device_count() or 1)))
    return dist.get_rank(), dist.get_world_size()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, threads: int, fn: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(threads)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=rank, world_size=world_size)
    try:
        fn(*args)
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable, world_size: int, *args) -> None:
    """Run fn(*args) on `world_size` local ranks (CPU processes with gloo, or one per GPU with NCCL)."""
    threads = max(1, (os.cpu_count() or 1) // world_size)
    torch.multiprocessing.spawn(_worker, args=(world_size, free_port(), threads, fn, args), nprocs=world_size, join=True)
