"""Where a run's scalars go (``training.loggers``): ``metrics.jsonl``, TensorBoard, Weights & Biases.

Rank 0 opens one :class:`RunLoggers`; each record the trainer writes (``step`` plus scalars: loss,
lr, grad_norm, tokens_per_s, mfu, peak_memory_gib, epoch, eval_loss, eval_ppl) goes to every
requested logger under the same names, with ``step`` as the global step. All of it lies under
``training.output_dir``:

    metrics.jsonl                       jsonl: one JSON object per record
    tensorboard/events.out.tfevents.*   tensorboard: ``torch.utils.tensorboard.SummaryWriter``
    wandb/offline-run-*/                wandb: offline unless ``training.wandb_mode`` / WANDB_MODE

A resumed run reads as one uninterrupted run in all three: metrics.jsonl keeps the records up to the
checkpoint, and the TensorBoard writer starts with a purge at the step after it (TensorBoard hides
the events of the steps trained again, and on a fresh run those of an earlier run in the same dir).
A W&B run is one process's run: a resumed run is a new W&B run whose steps start after the checkpoint.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from modelzoo.config import ConfigError, RunConfig, config_to_dict

from .metrics import MetricsLog

#: logger -> (modules it imports, the pip package that provides them)
PACKAGES: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard", "torch.utils.tensorboard"), "tensorboard"),
    "wandb": (("wandb",), "wandb"),
}
TENSORBOARD_DIR = "tensorboard"


def check_loggers(names: Iterable[str]) -> None:
    """A one-line :class:`ConfigError` (key ``training.loggers``) for the first requested logger
    whose package cannot be imported; run before training starts."""
    for name in dict.fromkeys(names):
        modules, pip = PACKAGES.get(name, ((), ""))
        for module in modules:
            try:
                importlib.import_module(module)
            except ImportError as err:
                raise ConfigError(
                    f"training.loggers names '{name}' but {module} cannot be imported ({err}); "
                    f"pip install {pip} (or pip install -e \".[{name}]\"), or drop '{name}' from training.loggers",
                    key="training.loggers") from None


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numeric values of ``record`` besides ``step``."""
    return {k: v for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardLogger:
    """Scalars into ``log_dir`` as TensorBoard events, tag = the metrics.jsonl key."""

    def __init__(self, log_dir: Path, purge_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def write(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()  # a killed run keeps what it logged (a record per log step: cheap)

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """A Weights & Biases run in ``output_dir/wandb`` (offline unless told otherwise)."""

    def __init__(self, output_dir: Path, *, mode: str | None, project: str, config: dict[str, Any],
                 quiet: bool) -> None:
        import wandb

        self.mode = mode or os.environ.get("WANDB_MODE") or "offline"
        self.run = wandb.init(project=project, name=output_dir.resolve().name, dir=str(output_dir),
                              mode=self.mode, config=config, settings=wandb.Settings(silent=quiet))

    def write(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class RunLoggers:
    """The run's loggers, from the ``training`` section; ``main=False`` (ranks other than 0) logs
    nothing and only keeps ``history``. The interface of :class:`MetricsLog`: ``write``,
    ``history``, ``records``; plus ``close``."""

    def __init__(self, cfg: RunConfig, *, main: bool, resumed_at: int | None = None, quiet: bool = False) -> None:
        t = cfg.training
        names = list(dict.fromkeys(t.loggers)) if main else []
        out = Path(t.output_dir)
        self.metrics = MetricsLog(out / "metrics.jsonl" if "jsonl" in names else None, resumed_at=resumed_at)
        self.sinks: list[TensorBoardLogger | WandbLogger] = []
        if "tensorboard" in names:
            self.sinks.append(TensorBoardLogger(out / TENSORBOARD_DIR, purge_step=(resumed_at or 0) + 1))
        if "wandb" in names:
            out.mkdir(parents=True, exist_ok=True)
            self.sinks.append(WandbLogger(out, mode=t.wandb_mode, project=t.wandb_project,
                                          config=config_to_dict(cfg), quiet=quiet))

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.metrics.history

    def records(self) -> list[dict[str, Any]]:
        """The run's records: metrics.jsonl's (earlier processes of a resumed run too), else this process's."""
        return self.metrics.records() if self.metrics.path else self.history

    def write(self, record: dict[str, Any]) -> None:
        self.metrics.write(record)
        values = scalars(record)
        for sink in self.sinks:
            sink.write(int(record["step"]), values)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []
