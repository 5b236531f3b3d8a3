"""Training checkpoints: an HF model dir plus training state, atomic, with ``latest`` and keep-last-K.

Layout of ``checkpoint.save_dir``::

    step_00000100/            HF model dir (config.json, generation_config.json, safetensors,
                              tokenizer files) that transformers opens unchanged, plus
      training_state/
        trainer_state.json    step, data position (samples consumed), schedule, layout, Python
                              RNG (readable)
        dcp/                  optimizer state and torch RNG, written by every rank with
                              torch.distributed.checkpoint (.metadata + __R_0.distcp): keyed by
                              parameter name and stored as global tensors, so a run saved at one
                              layout (TP x DP, FSDP or not) resumes at another
        config.yaml           the resolved run config
    latest                    name of the newest complete checkpoint

A LoRA/DoRA run (``peft.method``) saves only its adapter in each checkpoint, as ``peft`` writes it
(``adapter_config.json`` + ``adapter_model.safetensors``, plus the tokenizer files and
``training_state/``); the adapter config's ``base_model_name_or_path`` is the absolute path of the
frozen base model dir, which is referenced, not copied (a preset base is written once to ``base/``).

A checkpoint is written into owned scratch (``.step_....tmp-PID-hex``, see
:mod:`modelzoo.checkpoint.atomic`), gets its ``.modelzoo-output.json`` marker, is fsynced and renamed
when every rank has finished, and only then does ``latest`` move: a kill at any moment leaves the
previous checkpoint (and ``latest``) intact. Pruning renames a checkpoint to scratch before deleting
it, so no half-deleted checkpoint ever keeps its name. The next run removes the scratch a killed run
left (:func:`prepare_save_dir`). Only checkpoints whose marker lists exactly their files are ever
replaced or deleted.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .atomic import (
    check_replaceable,
    clean_debris,
    finish,
    make_scratch,
    marker_proof,
    remove_tree,
    replace_file,
    scratch_re,
)
from .hf_weights import CheckpointError

STATE_DIR = "training_state"
DCP_DIR = "dcp"
TRAINER_STATE = "trainer_state.json"
LATEST = "latest"
KIND = "training-checkpoint"
_STEP_RE = re.compile(r"^step_(\d{8})$")
_SCRATCH_RE = scratch_re(r"step_\d{8}|base")
BASE_DIR = "base"
"""An adapter run on a preset (randomly initialised, not a dir) writes its frozen base here once,
so the adapters' ``base_model_name_or_path`` names a model dir that exists."""
BASE_KIND = "adapter-base-model"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def python_rng_state() -> list[int]:
    """Python's Mersenne-Twister state (JSON-ready; the torch RNG is saved with DCP)."""
    return list(random.getstate()[1])


def set_python_rng_state(state: list[int]) -> None:
    random.setstate((3, tuple(state), None))


def list_checkpoints(save_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``save_dir``, oldest first."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    return sorted(p for p in save_dir.iterdir() if p.is_dir() and _STEP_RE.match(p.name))


def latest_checkpoint(save_dir: str | Path) -> Path | None:
    """The checkpoint ``latest`` points to; without ``latest`` (a run killed between renaming its
    first checkpoint into place and writing the pointer), the newest complete checkpoint of ours;
    None when there is none."""
    pointer = Path(save_dir) / LATEST
    if not pointer.is_file():
        complete = [p for p in list_checkpoints(save_dir) if is_ours(p) is None]
        return complete[-1] if complete else None
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


def is_ours(checkpoint: Path) -> str | None:
    """None when ``checkpoint`` is a checkpoint this tool wrote (its marker lists exactly its files)."""
    return marker_proof(KIND)(Path(checkpoint))


def prepare_save_dir(save_dir: str | Path, *, resume: bool, overwrite: bool, keep_last: int = 0,
                     dry_run: bool = False) -> list[str]:
    """Rank 0, before training: remove what killed runs left, and make sure a fresh run loses nothing.

    A fresh run (not ``resume``) into a save_dir that already holds checkpoints is refused, unless
    ``overwrite``: then those checkpoints are deleted, each only if provably ours. A resumed run
    finishes the pruning a killed run may not have done (``keep_last`` up to ``latest``). Returns
    lines to print; ``dry_run`` only checks (the launcher's preflight)."""
    save_dir = Path(save_dir)
    notes = []
    if not save_dir.is_dir():
        return notes
    if not dry_run:
        debris = [p for p in save_dir.iterdir() if _SCRATCH_RE.match(p.name)]
        for path in clean_debris(debris):
            notes.append(f"removed {path}, left by an interrupted save")
    existing = list_checkpoints(save_dir)
    if resume:
        if not dry_run:
            _prune(save_dir, keep_last)
        return notes
    if not (existing or (save_dir / LATEST).exists()):
        return notes
    where = f"checkpoint.save_dir {save_dir}"
    if not overwrite:
        names = ", ".join(p.name for p in existing[-3:]) or LATEST
        raise CheckpointError(f"{where} already holds checkpoints of an earlier run ({names}); set "
                              "checkpoint.resume=true to continue it, checkpoint.overwrite=true to replace "
                              "them, or choose another checkpoint.save_dir")
    for path in existing:
        check_replaceable(path, marker_proof(KIND), what=f"{where}: checkpoint", error=CheckpointError)
    if not dry_run:
        for path in existing:
            remove_tree(path)
        (save_dir / LATEST).unlink(missing_ok=True)
        notes.append(f"checkpoint.overwrite: removed {len(existing)} checkpoint(s) of an earlier run from {save_dir}")
    return notes


def write_base_model(save_dir: str | Path, write: Callable[[Path], None]) -> Path:
    """Rank 0: ``write(scratch)`` the base model dir of an adapter run and publish it as
    ``save_dir/base`` (replacing only a base this tool wrote). Returns its absolute path."""
    final = (Path(save_dir) / BASE_DIR).absolute()
    check_replaceable(final, marker_proof(BASE_KIND), what="adapter base model", error=CheckpointError)
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = make_scratch(final, "tmp")
    write(scratch)
    finish(scratch, final, BASE_KIND)
    return final


def begin(save_dir: str | Path, step: int) -> Path:
    """Rank 0: the owned scratch dir that checkpoint ``step`` is written into."""
    return make_scratch(Path(save_dir) / step_dir_name(step), "tmp")


def finalize(save_dir: str | Path, step: int, scratch: Path, keep_last: int) -> Path:
    """Rank 0, after every rank wrote into ``scratch``: mark, fsync, rename, move ``latest``, prune."""
    save_dir = Path(save_dir)
    final = save_dir / step_dir_name(step)
    check_replaceable(final, marker_proof(KIND), what="checkpoint", error=CheckpointError)
    finish(scratch, final, KIND)
    pointer_tmp = save_dir / f".{LATEST}.tmp"
    pointer_tmp.write_text(final.name + "\n")
    replace_file(pointer_tmp, save_dir / LATEST)
    _prune(save_dir, keep_last)
    return final


def _prune(save_dir: Path, keep_last: int) -> None:
    """Delete (ours only) all but the ``keep_last`` newest checkpoints up to ``latest``; a newer one
    than ``latest`` (a kill before the pointer moved) is left to be replaced by the next save."""
    latest = latest_checkpoint(save_dir)
    if keep_last <= 0 or latest is None:
        return
    for old in [p for p in list_checkpoints(save_dir) if p.name <= latest.name][:-keep_last]:
        if is_ours(old) is None:
            remove_tree(old)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns that it 'assumes' a single process when there is no process group: we mean it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .*single process", category=UserWarning)
        yield


def _optimizer_state(optimizer, names: dict[int, str]) -> dict[str, dict[str, Any]]:
    """The optimizer's per-parameter state keyed by parameter name: the same keys at any layout
    (the tensors are DTensors under TP/FSDP/replicate, whose global shapes DCP stores)."""
    return {names[id(p)]: optimizer.state[p] for group in optimizer.param_groups for p in group["params"]
            if p in optimizer.state}


def _init_optimizer_state(optimizer) -> None:
    """Materialise the optimizer's state (a step on zero gradients at lr 0; AdamW then leaves
    every parameter unchanged) so that DCP has tensors of the right layout to load into."""
    if optimizer.state:
        return
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    lrs = [group["lr"] for group in optimizer.param_groups]
    for p in params:
        p.grad = torch.zeros_like(p)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)


def write_training_state(directory: Path, optimizer, names: dict[int, str]) -> None:
    """All ranks: the optimizer state and torch RNG into ``training_state/dcp/`` with
    ``torch.distributed.checkpoint`` (a collective under several processes).

    The optimizer state is keyed by parameter name (``names``: ``id(param)`` -> name, as
    ``named_parameters`` gives them) and every DTensor is stored as its global tensor in pieces, so
    a later run loads it into any other layout (TP x DP, FSDP or not). The RNG is rank 0's (every
    rank holds the same: one seed, no dropout)."""
    import torch.distributed.checkpoint as dcp

    state = {"optimizer": _optimizer_state(optimizer, names), "rng": {"torch": torch.get_rng_state()}}
    with _single_process_quiet():
        dcp.save(state, checkpoint_id=str(directory / STATE_DIR / DCP_DIR), no_dist=not _distributed())


def read_training_state(checkpoint: Path, optimizer, names: dict[int, str]) -> None:
    """All ranks: load ``training_state/dcp/`` into ``optimizer``'s state in place (resharded to
    this run's layout) and restore the torch RNG. Raises CheckpointError for a checkpoint without
    it (naming the old per-rank format when that is what it holds) or one DCP cannot read."""
    import torch.distributed.checkpoint as dcp

    folder = checkpoint / STATE_DIR / DCP_DIR
    if not (folder / ".metadata").is_file():
        legacy = sorted((checkpoint / STATE_DIR).glob("rank_*.pt"))
        if legacy:
            raise CheckpointError(
                f"{checkpoint / STATE_DIR} holds per-rank training state ({legacy[0].name}, ...), the format of "
                "earlier modelzoo versions, which this version does not resume; its HF model dir is intact: "
                f"start a new run from it with checkpoint.load_path={checkpoint} (the optimizer state starts "
                "afresh), or finish the run with the version that wrote it")
        raise CheckpointError(f"{folder}/.metadata is missing: the checkpoint's training state is incomplete; "
                              "resume from another checkpoint (point 'latest' at it) or start a new run")
    _init_optimizer_state(optimizer)
    state = {"optimizer": _optimizer_state(optimizer, names), "rng": {"torch": torch.get_rng_state()}}
    try:
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=str(folder), no_dist=not _distributed())
    except Exception as err:  # DCP wraps each rank's failure (CheckpointException, RuntimeError, ...)
        last = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{folder}: cannot load the training state ({last}); the files may be damaged "
                              "or from another model; resume from another checkpoint") from err
    torch.set_rng_state(state["rng"]["torch"])


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
