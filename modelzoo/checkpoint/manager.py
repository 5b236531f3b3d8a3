"""Training checkpoints: an HF model dir plus training state, atomic, with ``latest`` and keep-last-K.

Layout of ``checkpoint.save_dir``::

    step_00000100/            HF model dir (config.json, generation_config.json, safetensors,
                              tokenizer files) that transformers opens unchanged, plus
      training_state/
        trainer_state.json    step, data position, schedule, layout, RNG of rank 0 (readable)
        rank_00000.pt         per-rank optimizer state (local shards) and RNG (tensors only:
                              loads with weights_only=True)
        config.yaml           the resolved run config
    latest                    name of the newest complete checkpoint

A checkpoint is written under ``.tmp-step_...`` and renamed when every rank has finished, so a
crash mid-save leaves the previous checkpoint (and ``latest``) intact.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from .hf_save import replace_dir
from .hf_weights import CheckpointError

STATE_DIR = "training_state"
TRAINER_STATE = "trainer_state.json"
LATEST = "latest"
_STEP_RE = re.compile(r"^step_(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def rng_state() -> dict[str, Any]:
    """Torch (CPU, CUDA) and Python RNG states, as tensors and lists (weights_only-loadable)."""
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(save_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``save_dir``, oldest first."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    return sorted(p for p in save_dir.iterdir() if p.is_dir() and _STEP_RE.match(p.name))


def latest_checkpoint(save_dir: str | Path) -> Path | None:
    """The checkpoint ``latest`` points to (None when there is none)."""
    pointer = Path(save_dir) / LATEST
    if not pointer.is_file():
        return None
    path = Path(save_dir) / pointer.read_text().strip()
    if not (path / STATE_DIR / TRAINER_STATE).is_file():
        raise CheckpointError(f"{pointer} names {path.name}, which is not a complete checkpoint; "
                              "point it at another step_* dir or delete it to start fresh")
    return path


def resolve_model_dir(path: str | Path) -> Path:
    """The HF model dir a user means by ``path``: a ``latest`` pointer file, or a training run's
    checkpoints dir (or the run dir holding ``checkpoints/``), resolve to the newest checkpoint;
    any other path is returned as it is."""
    path = Path(path)
    if path.name == LATEST and path.is_file():
        return latest_checkpoint(path.parent)
    if path.is_dir() and not (path / "config.json").is_file():
        for save_dir in (path, path / "checkpoints"):
            if (save_dir / LATEST).is_file():
                return latest_checkpoint(save_dir)
    return path


def tmp_dir(save_dir: str | Path, step: int) -> Path:
    return Path(save_dir) / f".tmp-{step_dir_name(step)}"


def finalize(save_dir: str | Path, step: int, keep_last: int) -> Path:
    """Rank 0, after every rank wrote into the temp dir: rename, move ``latest``, prune old ones."""
    save_dir = Path(save_dir)
    final = save_dir / step_dir_name(step)
    replace_dir(tmp_dir(save_dir, step), final)
    pointer_tmp = save_dir / f".{LATEST}.tmp"
    pointer_tmp.write_text(final.name + "\n")
    os.replace(pointer_tmp, save_dir / LATEST)
    if keep_last > 0:
        for old in list_checkpoints(save_dir)[:-keep_last]:
            shutil.rmtree(old)
    return final


def write_rank_state(directory: Path, rank: int, optimizer_state: dict, extra: dict[str, Any]) -> None:
    (directory / STATE_DIR).mkdir(parents=True, exist_ok=True)
    torch.save({"optimizer": optimizer_state, "rng": rng_state(), **extra}, directory / STATE_DIR / rank_file(rank))


def write_trainer_state(directory: Path, state: dict[str, Any], config_yaml: str) -> None:
    (directory / STATE_DIR).mkdir(parents=True, exist_ok=True)
    (directory / STATE_DIR / TRAINER_STATE).write_text(json.dumps(state, indent=2) + "\n")
    (directory / STATE_DIR / "config.yaml").write_text(config_yaml)


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / STATE_DIR / TRAINER_STATE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable training state ({err}); resume from another checkpoint") from err


def read_rank_state(checkpoint: Path, rank: int) -> dict[str, Any]:
    path = checkpoint / STATE_DIR / rank_file(rank)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint was written by a different process layout "
                              "or is incomplete; resume with the same n_chips x world_size")
    return torch.load(path, map_location="cpu", weights_only=True)
