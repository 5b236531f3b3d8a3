"""Streaming writers vs the library calls they stand in for: peak memory writing one file.

Writes one ~1 GiB file of 64 bf16 tensors [4096, 2048], produced one 16 MiB block at a time (as a
conversion produces them), four ways, each in a fresh child process, and prints the child's peak
RSS above its import baseline and the wall time:

    safetensors  modelzoo ShardedSafetensorsWriter (streams)  vs  safetensors.torch.save_file
    torch .pth   modelzoo TorchPthWriter (streams)            vs  torch.save

The library calls need every tensor of the file in memory at once, so their peak grows with the
file (a conversion shard is up to --max-shard-size, a Meta file is a whole model-parallel rank);
the streaming writers hold one block.

    python benchmarks/bench_writers.py [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import sys, time, torch
kind, path = sys.argv[1], sys.argv[2]
N, ROWS, COLS, BLOCK = 64, 4096, 2048, 2048  # 64 x 16 MiB bf16 = 1 GiB; blocks of 2048 rows = 8 MiB
def base():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024
def block(i, start):
    return torch.full((BLOCK, COLS), float(i % 7), dtype=torch.bfloat16)
if kind.startswith("ours"):
    from modelzoo.checkpoint.safetensors_io import ShardedSafetensorsWriter
    from modelzoo.checkpoint.torch_io import TorchPthWriter
specs = [(f"t{i}", torch.bfloat16, (ROWS, COLS)) for i in range(N)]
before = base()
t0 = time.perf_counter()
if kind == "ours-safetensors":
    writer = ShardedSafetensorsWriter(path, specs, max_shard_bytes=10**12)
    for i in range(N):
        writer.write(f"t{i}", (block(i, s) for s in range(0, ROWS, BLOCK)))
    writer.close()
elif kind == "save_file":
    from safetensors.torch import save_file
    save_file({f"t{i}": torch.cat([block(i, s) for s in range(0, ROWS, BLOCK)]) for i in range(N)},
              f"{path}/model.safetensors")
elif kind == "ours-pth":
    writer = TorchPthWriter(f"{path}/consolidated.00.pth", specs)
    for i in range(N):
        writer.write(f"t{i}", torch.cat([block(i, s) for s in range(0, ROWS, BLOCK)]))
    writer.close()
elif kind == "torch.save":
    torch.save({f"t{i}": torch.cat([block(i, s) for s in range(0, ROWS, BLOCK)]) for i in range(N)},
               f"{path}/consolidated.00.pth")
wall = time.perf_counter() - t0
peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
print(f"{(peak - before) / 2**20:.0f} {wall:.2f}")
"""


def run(kind: str, root: Path) -> tuple[float, float]:
    out = root / kind
    out.mkdir()
    proc = subprocess.run([sys.executable, "-c", CHILD, kind, str(out)], capture_output=True, text=True, check=True)
    peak, wall = proc.stdout.split()
    for file in out.iterdir():
        file.unlink()
    return float(peak), float(wall)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=None, help="where to make the temp dir (default: system temp)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_writers_", dir=args.dir) as tmp:
        root = Path(tmp)
        for ours, library in (("ours-safetensors", "save_file"), ("ours-pth", "torch.save")):
            (p_ours, w_ours), (p_lib, w_lib) = run(ours, root), run(library, root)
            print(f"{ours:<17} peak +{p_ours:5.0f} MiB  {w_ours:5.2f} s   |  {library:<10} peak +{p_lib:5.0f} MiB  "
                  f"{w_lib:5.2f} s   ->  {p_lib / max(p_ours, 1):.0f}x the memory, {w_lib / w_ours:.2f}x the time")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
