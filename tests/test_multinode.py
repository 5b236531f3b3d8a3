"""Multi-node launch: two torchrun "nodes" on this machine train exactly like the single launch.

Each run is started the way a user starts it, as subprocesses of the real CLI:

* single launch: ``python -m modelzoo.cli.train ...``, which starts its n_chips x world_size local
  ranks itself (FileStore rendezvous, ``modelzoo.parallel.launch``);
* two nodes: two ``torchrun --nnodes 2 --nproc-per-node 1`` invocations started together, one per
  "node", meeting at a rendezvous endpoint on 127.0.0.1 (c10d, the elastic rendezvous a cluster
  user types, and the static ``--master-addr``/``--node_rank`` one). Both share the filesystem, as
  on a cluster with a shared checkpoint dir; only global rank 0 writes the checkpoint and metrics.

Every subprocess runs in its own session under a deadline and is killed (whole process group) when
the test fails or times out, so nothing can hang or outlive it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from synthetic_data import write_dataset
from torch.testing import assert_close

from modelzoo.parallel.launch import loopback_interface

ROOT = Path(__file__).resolve().parents[1]
DEADLINE_S = 240  # per launch; a healthy one takes ~15 s on 2 cores
FINAL = "step_00000005"
# set by a launcher around pytest itself; the runs here must start from a clean slate
_LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                 "MASTER_ADDR", "MASTER_PORT", "MODELZOO_INIT_FILE", "MODELZOO_LAUNCHER_PID",
                 "TORCHELASTIC_RUN_ID")

# name -> the layout overrides; both are 2 processes
LAYOUTS = {
    "dp2": {"data_parallel.world_size": 2},
    "tp2": {"samba_compile.tensor_parallel": "weight", "samba_compile.n_chips": 2},
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("ds") / "data", n_train_files=4, rows_per_file=16)


def _overrides(run_dir: Path, data: Path, layout: dict) -> list[str]:
    base = {
        "model.name_or_path": "llama2_tiny", "training.dataset_dir": str(data), "training.max_seq_length": 32,
        "training.batch_size": 4, "training.max_steps": 5, "training.warmup_steps": 2,
        "training.learning_rate": 1e-3, "training.log_every": 1, "training.seed": 7,
        "training.deterministic": True, "checkpoint.save_dir": str(run_dir / "ck"),
        "training.output_dir": str(run_dir / "out"), "samba_compile.output_folder": str(run_dir / "plan"),
        **layout,
    }
    return [f"{k}={v}" for k, v in base.items()]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_ENV}
    iface = loopback_interface()
    env.update(GLOO_SOCKET_IFNAME=iface, NCCL_SOCKET_IFNAME=iface, OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    return env


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _kill(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the ranks it started
            except ProcessLookupError:
                pass
    for proc in procs:
        proc.wait()


def _run_together(commands: dict[str, list[str]], logs: Path) -> dict[str, str]:
    """Start every command at once, wait for all under :data:`DEADLINE_S`; returns each one's output.
    Any failure or the deadline kills them all and fails the test with their output."""
    logs.mkdir(parents=True, exist_ok=True)
    procs: dict[str, subprocess.Popen] = {}
    files = {name: logs / f"{name}.log" for name in commands}
    deadline = time.monotonic() + DEADLINE_S

    def output() -> dict[str, str]:
        return {name: path.read_text(errors="replace").replace("\r", "\n") for name, path in files.items()}

    def report(why: str) -> str:
        return why + "".join(f"\n--- {name} (last 3000 chars) ---\n{text[-3000:]}" for name, text in output().items())

    try:
        for name, cmd in commands.items():
            with open(files[name], "wb") as log:
                procs[name] = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL, start_new_session=True)
        while True:
            codes = {name: proc.poll() for name, proc in procs.items()}
            failed = {name: code for name, code in codes.items() if code not in (None, 0)}
            if failed:
                pytest.fail(report(f"exit status {failed}"))
            if all(code == 0 for code in codes.values()):
                return output()
            if time.monotonic() > deadline:
                pytest.fail(report(f"still running after {DEADLINE_S} s: "
                                   f"{[name for name, code in codes.items() if code is None]}"))
            time.sleep(0.1)
    finally:
        _kill(list(procs.values()))


def _torchrun(node_rank: int, rendezvous: list[str], overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node_rank),
            "--nproc-per-node", "1", *rendezvous, "-m", "modelzoo.cli.train", "--config", "llama_tiny", *overrides]


def _losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "out" / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


@pytest.mark.parametrize(("layout", "rdzv"), [("dp2", "c10d"), ("tp2", "static")])
def test_two_node_torchrun_matches_single_launch(tmp_path, data, layout, rdzv):
    single, nodes = tmp_path / "single", tmp_path / "nodes"
    out = _run_together({"single": [sys.executable, "-m", "modelzoo.cli.train", "--config", "llama_tiny",
                                    *_overrides(single, data, LAYOUTS[layout])]}, tmp_path / "logs")
    assert "launching 2 processes" in out["single"]

    port = _free_port()
    if rdzv == "c10d":  # node_rank is not used by c10d: it hands out the node ranks itself
        rendezvous = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                      "--rdzv-id", f"modelzoo-test-{uuid.uuid4().hex[:8]}"]
    else:  # static: node_rank 0 hosts the store at master-addr:master-port and is global rank 0
        rendezvous = ["--master-addr", "127.0.0.1", "--master-port", str(port)]
    overrides = _overrides(nodes, data, LAYOUTS[layout])
    out = _run_together({f"node{r}": _torchrun(r, rendezvous, overrides) for r in (0, 1)}, tmp_path / "logs")

    # under torchrun the CLI joins the group instead of starting its own ranks
    assert not any("launching" in text for text in out.values()), out
    # exactly one process (global rank 0) reports, writes the metrics and the checkpoint
    reporters = [name for name, text in out.items() if "done: 5 steps" in text]
    assert len(reporters) == 1, out
    if rdzv == "static":
        assert reporters == ["node0"]

    want, got = _losses(single), _losses(nodes)
    assert len(want) == len(got) == 5
    assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64), atol=1e-6, rtol=0)

    assert (nodes / "ck" / "latest").read_text().strip() == FINAL
    ref, new = single / "ck" / FINAL, nodes / "ck" / FINAL
    for sub in ("training_state", "training_state/dcp"):  # one DCP file per rank, as in the single launch
        assert sorted(p.name for p in (new / sub).iterdir()) == sorted(p.name for p in (ref / sub).iterdir())
    a, b = load_file(ref / "model.safetensors"), load_file(new / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert_close(b[key], a[key], atol=1e-6, rtol=0, msg=key)
    # nothing else in the shared dirs: no scratch left behind, no second writer's files
    for sub in ("ck", "out"):
        assert sorted(p.name for p in (nodes / sub).iterdir()) == sorted(p.name for p in (single / sub).iterdir())
