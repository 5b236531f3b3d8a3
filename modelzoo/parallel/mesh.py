"""Process groups and device meshes for tensor (``n_chips``) x data (``world_size``) parallelism.

Processes = n_chips x world_size. Ranks are laid out data-parallel-major: ranks
``[d * n_chips, (d + 1) * n_chips)`` form the TP group of DP replica ``d``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A free TCP port on localhost (for a single-machine rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def default_backend(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def init_distributed(device_type: str = "cpu") -> tuple[int, int]:
    """Join the process group described by the torchrun environment (RANK, WORLD_SIZE, ...).

    Returns ``(rank, world_size)``; ``(0, 1)`` without touching torch.distributed when not launched.
    """
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group(backend=default_backend(device_type))
    return dist.get_rank(), dist.get_world_size()


def build_mesh(n_chips: int, world_size: int, device_type: str = "cpu"):
    """A 2-D ``DeviceMesh`` with dims ``("dp", "tp")`` of sizes ``(world_size, n_chips)``."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (world_size, n_chips), mesh_dim_names=("dp", "tp"))


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    fn(rank, world_size, *args)
    dist.barrier()  # no rank tears the group down while another still talks to it
    dist.destroy_process_group()


def spawn_cpu(fn: Callable[..., Any], nprocs: int, *args: Any) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``nprocs`` local CPU processes joined by gloo.

    ``fn`` must be importable (module level). A failing rank raises here, with its traceback.
    """
    mp.spawn(_worker, args=(nprocs, free_port(), fn, args), nprocs=nprocs, join=True)
