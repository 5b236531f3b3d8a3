"""Process groups and device meshes for tensor (``n_chips``) x data (``world_size``) parallelism.

Processes = n_chips x world_size. Ranks are laid out data-parallel-major: ranks
``[d * n_chips, (d + 1) * n_chips)`` form the TP group of DP replica ``d``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def default_backend(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def init_distributed(device_type: str = "cpu") -> tuple[int, int]:
    """Join the process group described by the environment: our local launcher's
    (:mod:`modelzoo.parallel.launch`: a FileStore, loopback sockets, die with the launcher) or
    torchrun's (RANK, WORLD_SIZE, MASTER_ADDR, ...; multi-node).

    Returns ``(rank, world_size)``; ``(0, 1)`` without touching torch.distributed when not launched.
    """
    from .launch import INIT_FILE_ENV, watch_parent

    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1
    if not dist.is_initialized():
        if INIT_FILE_ENV in os.environ:
            watch_parent()
            dist.init_process_group(backend=default_backend(device_type),
                                    init_method=f"file://{os.environ[INIT_FILE_ENV]}",
                                    rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
        else:
            dist.init_process_group(backend=default_backend(device_type))
    return dist.get_rank(), dist.get_world_size()


def shutdown_distributed() -> None:
    """Leave the process group cleanly: every rank meets at a barrier, then the group is destroyed.

    A process that exits with a live gloo group can abort in its C++ teardown (``terminate called
    without an active exception``, SIGABRT) after its work is done; torchrun then reports the run as
    failed. No-op when not distributed.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def build_mesh(n_chips: int, world_size: int, device_type: str = "cpu"):
    """A 2-D ``DeviceMesh`` with dims ``("dp", "tp")`` of sizes ``(world_size, n_chips)``."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (world_size, n_chips), mesh_dim_names=("dp", "tp"))


def _worker(rank: int, world_size: int, store: str, fn: Callable, args: tuple) -> None:
    from .launch import loopback_env

    os.environ.update(loopback_env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    fn(rank, world_size, *args)
    shutdown_distributed()  # no rank tears the group down while another still talks to it


def spawn_cpu(fn: Callable[..., Any], nprocs: int, *args: Any) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``nprocs`` local CPU processes joined by gloo (FileStore
    rendezvous, loopback sockets).

    ``fn`` must be importable (module level). A failing rank raises here, with its traceback.
    """
    with tempfile.TemporaryDirectory(prefix="modelzoo-rdzv-") as rdzv:
        mp.spawn(_worker, args=(nprocs, os.path.join(rdzv, "store"), fn, args), nprocs=nprocs, join=True)
