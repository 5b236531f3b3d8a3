"""Start the processes of a single-machine run, reachable from this machine only, dying together.

What torchrun's ``--standalone`` does, without its weak spots for a local run: its rendezvous
stores (TCPStore) listen on every interface, and its workers live on (39 s and more) after the
launcher is killed. Here:

* Rendezvous goes through a ``FileStore`` in a private temp dir (no listening socket at all), and
  gloo / NCCL are pinned to the loopback interface, so nothing listens outside 127.0.0.1.
* Each worker dies with its launcher: ``PR_SET_PDEATHSIG`` (Linux) plus a watchdog thread that
  exits when the worker's parent changes (any OS, and a ``kill -9`` of the whole process group).
* When one worker fails, the others are stopped and its exit status is returned; Ctrl-C / SIGTERM
  of the launcher reaches every worker.

Multi-node runs are started by torchrun itself (``--rdzv-endpoint`` names the endpoint); workers
then see torchrun's environment and :func:`modelzoo.parallel.mesh.init_distributed` joins it as is.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

INIT_FILE_ENV = "MODELZOO_INIT_FILE"
PARENT_ENV = "MODELZOO_LAUNCHER_PID"
_PR_SET_PDEATHSIG = 1


def loopback_interface() -> str:
    """The name of the interface holding 127.0.0.1 (``lo`` on Linux, ``lo0`` on macOS)."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == "127.0.0.1" for a in addrs):
            return name
    return "lo"


def loopback_env() -> dict[str, str]:
    """Environment that makes gloo and NCCL bind their sockets to loopback only."""
    iface = loopback_interface()
    return {"GLOO_SOCKET_IFNAME": iface, "NCCL_SOCKET_IFNAME": iface, "MASTER_ADDR": "127.0.0.1"}


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the launcher (the forking thread) dies (Linux)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def watch_parent(interval: float = 0.2) -> None:
    """In a worker: exit at once when the launcher that started it is gone (parent pid changes)."""
    expected = int(os.environ.get(PARENT_ENV, os.getppid()))

    def watch() -> None:
        while True:
            if os.getppid() != expected:
                os._exit(1)
            time.sleep(interval)

    threading.Thread(target=watch, name="modelzoo-parent-watch", daemon=True).start()


def _stop(procs: list[subprocess.Popen], grace: float = 5.0) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def launch_local(nprocs: int, cmd: list[str], *, threads_per_process: int | None = None) -> int:
    """Run ``cmd`` as ``nprocs`` ranks of one process group on this machine; returns the exit status
    (0 when all succeed, else the first failure's; 128 + signal for a worker killed by a signal)."""
    rdzv = tempfile.mkdtemp(prefix="modelzoo-rdzv-")
    threads = threads_per_process or max(1, (os.cpu_count() or 1) // nprocs)
    base = {**os.environ, **loopback_env(), INIT_FILE_ENV: os.path.join(rdzv, "store"),
            PARENT_ENV: str(os.getpid()), "WORLD_SIZE": str(nprocs), "LOCAL_WORLD_SIZE": str(nprocs)}
    base.setdefault("OMP_NUM_THREADS", str(threads))
    procs: list[subprocess.Popen] = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def forward(signum, frame):
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    try:
        for sig in previous:
            signal.signal(sig, forward)
        for rank in range(nprocs):
            env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0"}
            procs.append(subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent))
        while True:
            codes = [proc.poll() for proc in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                _stop(procs)
                return failed[0] if failed[0] > 0 else 128 - failed[0]
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.05)
    finally:
        _stop(procs)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(rdzv, ignore_errors=True)
