"""The training loop: TP x DP on torch.distributed, weighted loss, eval, metrics, checkpoints.

Loss normalisation across data parallelism and gradient accumulation: every optimizer step
minimises ``sum(w * ce) / sum(w)`` over *all* targets of the step (all micro-batches, all DP
ranks), exactly what one process computes on the combined batch. Each rank backpropagates its own
``sum(w * ce) / W_global`` and gradients are summed over the DP group.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from modelzoo.checkpoint import manager as ckpt
from modelzoo.checkpoint.hf_files import read_tokenizer_files
from modelzoo.checkpoint.hf_save import write_hf_dir
from modelzoo.config import ConfigError, RunConfig, dump_yaml
from modelzoo.data.token_types import loss_weights_from_token_types
from modelzoo.parallel.mesh import build_mesh, init_distributed

from .data import ShardedLoader, check_sequence_length, open_training_data
from .loggers import RunLoggers, check_loggers
from .metrics import flops_per_token, measure_matmul_peak, peak_memory_bytes, plot_loss_curve
from .optim import build_optimizer, lr_at, set_lr


@dataclass
class Dist:
    """This process's place in the (dp, tp) mesh."""

    rank: int = 0
    world: int = 1
    dp_rank: int = 0
    dp_world: int = 1
    tp_world: int = 1
    mesh: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def dp_group(self):
        return self.mesh["dp"].get_group() if self.mesh is not None else None


def _setup_dist(cfg: RunConfig, device_type: str) -> Dist:
    n_chips, dp = cfg.samba_compile.n_chips, cfg.data_parallel.world_size
    rank, world = init_distributed(device_type)
    if world != n_chips * dp:
        raise ConfigError(f"{world} processes were launched but the config needs samba_compile.n_chips "
                          f"({n_chips}) x data_parallel.world_size ({dp}) = {n_chips * dp}; launch that many "
                          "(torchrun --nproc-per-node x --nnodes) or change the two keys",
                          key="data_parallel.world_size")
    if world == 1:
        return Dist()
    mesh = build_mesh(n_chips, dp, device_type)
    return Dist(rank, world, rank // n_chips, dp, n_chips, mesh)


def _backend(cfg: RunConfig):
    """The run's backend; under several processes on GPUs, each on its own (LOCAL_RANK) device."""
    from modelzoo.backends import get_backend

    local = int(os.environ.get("LOCAL_RANK", 0))
    if cfg.backend == "cuda":
        return get_backend("cuda", index=local)
    if cfg.backend == "inductor" and torch.cuda.is_available():
        return get_backend("inductor", device=f"cuda:{local}")
    return get_backend(cfg.backend)


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(t, group=group)
    return t


def full_state(model) -> list[tuple[str, torch.Tensor]]:
    """The unsharded HF state of ``model`` (a collective under TP: every rank must call it).
    Tied weights appear once, under the embedding's name, as ``save_pretrained`` writes them."""
    seen: set[int] = set()
    out = []
    for name, param in model.named_parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        tensor = param.full_tensor() if isinstance(param, DTensor) else param
        out.append((name, tensor.detach().cpu()))
    return out


class Trainer:
    """One training run for a (validated) :class:`RunConfig`."""

    def __init__(self, cfg: RunConfig, *, stop_after: int | None = None, quiet: bool = False) -> None:
        self.cfg, self.t = cfg, cfg.training
        self.stop_after, self.quiet = stop_after, quiet  # stop_after: simulate a crash (tests)
        check_loggers(self.t.loggers)  # a missing package fails now, not after the model is built
        self.adapter_run = cfg.peft.method != "none"
        self.backend = _backend(cfg)
        self.device = self.backend.device()
        if self.t.deterministic:
            torch.use_deterministic_algorithms(True)
        self.dist = _setup_dist(cfg, self.device.type)
        for note in self._on_main(lambda: ckpt.prepare_save_dir(
                cfg.checkpoint.save_dir, resume=cfg.checkpoint.resume, overwrite=cfg.checkpoint.overwrite,
                keep_last=cfg.checkpoint.keep_last)):
            self._say(note)
        torch.manual_seed(self.t.seed)
        random.seed(self.t.seed)  # saved with each checkpoint: the same run saves the same state
        self._build_model()
        self._build_data()
        # parameter names for the optimizer state, as the optimizer holds them (after parallelizing)
        self.param_names = {id(p): name for name, p in self.model.named_parameters()}
        self.optimizer = build_optimizer(self.model, self.t, foreach=False if self.dist.tp_world > 1 else None)
        self.total_steps = self._total_steps()
        self.step = 0
        if cfg.checkpoint.resume:
            self._resume()
        self.log = RunLoggers(cfg, main=self.dist.is_main, resumed_at=self.step if cfg.checkpoint.resume else None,
                              quiet=quiet)

    # ------------------------------------------------------------------ setup
    def _build_model(self) -> None:
        from modelzoo.models.llama import from_pretrained
        from modelzoo.models.llama.parallelize import TrainingParallelism, parallelize_for_training
        from modelzoo.models.llama.patch_llama import ENV_VAR

        mcfg, load = self.cfg.model, self.cfg.checkpoint.load_path
        source = load or mcfg.name_or_path
        latest = None
        if self.cfg.checkpoint.resume:
            latest = ckpt.latest_checkpoint(self.cfg.checkpoint.save_dir)
            if latest is None:
                raise ckpt.CheckpointError(f"checkpoint.resume is set but {self.cfg.checkpoint.save_dir} has no "
                                           "'latest' checkpoint; drop checkpoint.resume to start fresh")
            if not self.adapter_run:  # an adapter run's checkpoints hold the adapter; the base stays
                source = str(latest)
        overrides = mcfg.overrides if source == mcfg.name_or_path else None
        if latest is not None and source == str(latest):
            self._say(f"loading checkpoint {latest.absolute()} to resume ...")
        elif Path(source).is_dir():
            self._say(f"loading checkpoint {Path(source).absolute()} ({mcfg.dtype}) ...")
        else:
            self._say(f"building model {source} (preset, random weights, {mcfg.dtype}) ...")
        self.model = from_pretrained(source, dtype=mcfg.dtype, overrides=overrides, seed=self.t.seed,
                                     settings=mcfg, prompt_loss_weight=self.t.prompt_loss_weight, device=self.device)
        if "weighted_loss" not in self.model._modelzoo_patches:  # load_config refuses such a model.patches first
            source, fix = (f"{ENV_VAR}={os.environ[ENV_VAR]!r}", f"unset {ENV_VAR} or add weighted_loss") \
                if ENV_VAR in os.environ else (f"model.patches={mcfg.patches}", "add weighted_loss to model.patches")
            raise ConfigError(f"{source} leaves out the 'weighted_loss' patch, which is the training loss "
                              f"(token-type weights); {fix}")
        self.hf_config = self.model._modelzoo_state["config"]  # the unpatched config, for saving
        check_sequence_length(self.t.max_seq_length, self.hf_config, self.t.allow_long_sequences, source)
        # Read now, kept in memory: the source (e.g. the checkpoint resumed from) may be pruned later.
        self.tokenizer_files = read_tokenizer_files(self._tokenizer_dir(source))
        if self.adapter_run:
            self._add_adapter(source, latest)
        self.model.train()
        settings = TrainingParallelism(sequence_parallel=self.cfg.samba_compile.sequence_parallel,
                                       recompute=self.t.recompute, fsdp=self.t.fsdp,
                                       mixed_precision=self.t.mixed_precision)
        self.parallelism = parallelize_for_training(self.model, self.dist.mesh, settings, backend=self.backend)
        self.compiled = any(getattr(m, "_compiled_call_impl", None) is not None for m in self.model.modules())
        # FSDP and replicate average gradients over DP; the loss is normalised by the global weight
        # sum, so each rank's loss is scaled by the DP size to make that average a sum (gloo has no
        # reduce-scatter with a divide factor of 1).
        self.grad_scale = float(self.dist.dp_world)
        self.forward = self.model

    def _add_adapter(self, source: str, latest: Path | None) -> None:
        """Freeze the base and add the LoRA/DoRA adapter of the ``peft`` section (its weights from
        ``latest`` on resume). The adapter's config names the base model dir; a preset base (not a
        dir) is written once to ``save_dir/base`` so that it does."""
        from modelzoo.peft import add_adapter, lora_config, read_adapter, set_adapter_weights

        if Path(source).is_dir():
            base = str(Path(source).absolute())
        else:
            target = Path(self.cfg.checkpoint.save_dir) / ckpt.BASE_DIR
            if latest is None:
                base = self._on_main(lambda: str(ckpt.write_base_model(
                    self.cfg.checkpoint.save_dir, lambda tmp: self._write_model(tmp, adapter=False))))
            elif (target / "config.json").is_file():
                base = str(target.absolute())
            else:
                raise ckpt.CheckpointError(f"{target} is missing: the adapter run in {self.cfg.checkpoint.save_dir} "
                                           f"trains on preset '{source}', written there at its start; restore it or "
                                           "start a fresh run (checkpoint.overwrite=true)")
        self.lora_config = lora_config(self.cfg.peft, base)
        self._say(f"adding the {self.cfg.peft.method} adapter (r={self.cfg.peft.r}) to the frozen base {base} ...")
        adapted = add_adapter(self.model, self.lora_config, seed=self.t.seed)
        if latest is not None:
            _, tensors = read_adapter(latest)
            set_adapter_weights(self.model, tensors, latest / "adapter_model.safetensors")
        if self.cfg.peft.quantize_base == "int8":
            from modelzoo.checkpoint.int8 import QUANT_KEY, quantize_model_

            quantize_model_(self.model, [f"{name}.base_layer" for name in adapted])
            delattr(self.model.config, QUANT_KEY)  # the base on disk stays float; only this run's copy is int8

    def _tokenizer_dir(self, source: str) -> Path | None:
        for candidate in (Path(source), Path(self.t.dataset_dir or "") / "tokenizer"):
            if (candidate / "tokenizer_config.json").is_file() or (candidate / "tokenizer.json").is_file():
                return candidate
        return None

    def _build_data(self) -> None:
        train, dev, self.data_meta = open_training_data(self.t.dataset_dir, self.t.max_seq_length,
                                                        self.model.config.vocab_size, self.dist.dp_world)
        self.loader = ShardedLoader(train, self.t.batch_size, self.dist.dp_rank, self.dist.dp_world, self.t.seed)
        self.dev_loader = (ShardedLoader(dev, self.t.batch_size, self.dist.dp_rank, self.dist.dp_world,
                                         self.t.seed, shuffle=False)
                           if dev is not None and len(dev) >= self.t.batch_size * self.dist.dp_world else None)

    def _total_steps(self) -> int:
        if self.t.num_epochs:
            return max(self.t.num_epochs * self.loader.steps_per_epoch // self.t.grad_accum_steps, 1)
        return self.t.max_steps

    # ------------------------------------------------------------------ one step
    def _micro_batches(self) -> list[dict[str, torch.Tensor]]:
        return [{k: v.to(self.device) for k, v in self.loader.next_batch().items()}
                for _ in range(self.t.grad_accum_steps)]

    def train_step(self) -> dict[str, Any]:
        """One optimizer step. Loss and gradient norm come back as tensors: reading them (``.item()``)
        waits for the device, which :meth:`fit` does only on log steps."""
        batches = self._micro_batches()
        weight_sum = sum(loss_weights_from_token_types(b["token_type_ids"], self.t.prompt_loss_weight).sum()
                         for b in batches)
        weight_sum = _all_reduce(weight_sum.clone(), self.dist.dp_group()).clamp_min(1e-12)
        loss_sum = torch.zeros((), device=self.device)
        for index, batch in enumerate(batches):
            self._gradient_sync(last=index == len(batches) - 1)
            out = self.forward(**batch, return_logits=False, use_cache=False)
            local = (out.token_loss * out.loss_weight).sum()
            (local * self.grad_scale / weight_sum).backward()
            loss_sum += local.detach()
        grad_norm = self._clip_grads()
        lr = lr_at(self.step, self.t, self.total_steps)
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        loss = _all_reduce(loss_sum, self.dist.dp_group()) / weight_sum
        tokens = sum(b["input_ids"].numel() for b in batches) * self.dist.dp_world
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens}

    def _gradient_sync(self, last: bool) -> None:
        """Under replicate (DDP) all-reduce gradients only after the last micro-batch of a step
        (they accumulate locally until then); FSDP reduce-scatters every micro-batch (keeping
        unsharded gradients would cost the memory FSDP saves)."""
        if self.parallelism.get("data_parallel") == "replicate" and self.t.grad_accum_steps > 1:
            self.model.set_requires_gradient_sync(last)

    def _clip_grads(self) -> torch.Tensor:
        """The global L2 gradient norm (a 0-dim tensor), after clipping to ``training.clip_grad_norm``.

        ``torch.nn.utils`` computes each group's norm; a DTensor gradient (TP- and/or DP-sharded)
        contributes its full norm. Gradients are grouped by device mesh, since DTensors on different
        meshes cannot meet in one op: under DP x TP the TP-sharded ones live on the 2-D mesh and the
        others on the DP mesh; under TP alone some are plain tensors (the replicated embedding,
        identical on every TP rank). The group norms combine as ``sqrt(sum(n_i^2))``."""
        from torch.distributed.tensor.experimental import implicit_replication

        params = [p for p in self.model.parameters() if p.grad is not None]
        groups: dict[Any, list[torch.nn.Parameter]] = {}
        for p in params:
            groups.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
        norms = [torch.zeros((), device=self.device)] if not groups else []
        with implicit_replication():
            for group in groups.values():
                norm = torch.nn.utils.get_total_norm([p.grad for p in group])
                norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
            total = torch.linalg.vector_norm(torch.stack(norms)) if len(norms) > 1 else norms[0]
            if self.t.clip_grad_norm is not None:  # one scale for all, applied group by group
                for group in groups.values():
                    torch.nn.utils.clip_grads_with_norm_(group, self.t.clip_grad_norm, total)
        return total

    # ------------------------------------------------------------------ eval / checkpoints
    @torch.no_grad()
    def evaluate(self) -> dict[str, float] | None:
        if self.dev_loader is None:
            return None
        self.model.eval()
        loss_sum = torch.zeros((), device=self.device)
        weight_sum = torch.zeros((), device=self.device)
        for batch in self.dev_loader.epoch_batches():
            out = self.forward(**{k: v.to(self.device) for k, v in batch.items()}, return_logits=False, use_cache=False)
            loss_sum += (out.token_loss * out.loss_weight).sum()
            weight_sum += out.loss_weight.sum()
        self.model.train()
        loss = (_all_reduce(loss_sum, self.dist.dp_group()) / _all_reduce(weight_sum, self.dist.dp_group())).item()
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50))}

    def save(self) -> Path | None:
        """Write checkpoint ``step_{step}`` (all ranks call this; rank 0 writes the HF dir (or the
        adapter) and the trainer state, every rank its part of the DCP training state)."""
        save_dir = Path(self.cfg.checkpoint.save_dir)
        tmp = self._on_main(lambda: ckpt.begin(save_dir, self.step))
        self._write_model(tmp)  # collective
        if self.dist.is_main:
            global_micro_batch = self.t.batch_size * self.dist.dp_world
            ckpt.write_trainer_state(tmp, {
                "step": self.step, "total_steps": self.total_steps,
                "data": {"epoch": self.loader.state.epoch,  # the position whatever the layout
                         "samples_in_epoch": self.loader.state.micro_step * global_micro_batch,
                         "global_micro_batch": global_micro_batch},
                "layout": {"n_chips": self.dist.tp_world, "world_size": self.dist.dp_world,
                           "fsdp": self.t.fsdp},
                "python_rng": ckpt.python_rng_state(),
            }, dump_yaml(self.cfg))
        self._barrier()
        ckpt.write_training_state(tmp, self.optimizer, self.param_names)  # collective
        self._barrier()
        return self._on_main(lambda: ckpt.finalize(save_dir, self.step, tmp, self.cfg.checkpoint.keep_last))

    def _write_model(self, directory: Path, *, adapter: bool | None = None) -> None:
        """The model part of a checkpoint: the HF model dir, or for an adapter run only the adapter
        as ``peft`` writes it (the base is referenced by its path). A collective under TP and FSDP:
        every rank gathers, rank 0 writes. ``adapter=False``: the full model, in an adapter run too."""
        if self.adapter_run if adapter is None else adapter:
            from modelzoo.peft import adapter_state, write_adapter

            adapter = adapter_state(self.model)
            if self.dist.is_main:
                write_adapter(directory, self.lora_config, adapter)
                for name, data in self.tokenizer_files.items():
                    (directory / name).write_bytes(data)
            return
        state = full_state(self.model)
        if self.dist.is_main:
            write_hf_dir(directory, self.hf_config, state, generation_config=self.model.generation_config,
                         tokenizer_files=self.tokenizer_files)

    def _resume_position(self, trainer_state: dict[str, Any], latest: Path) -> dict[str, int]:
        """The loader position of this run's layout for the saved one: the same number of global
        samples consumed in the same epoch (the sampler's order does not depend on the layout)."""
        data = trainer_state["data"]
        global_micro_batch = self.t.batch_size * self.dist.dp_world
        micro_step, rest = divmod(int(data["samples_in_epoch"]), global_micro_batch)
        if rest:
            raise ckpt.CheckpointError(
                f"{latest} stopped {data['samples_in_epoch']} samples into epoch {data['epoch']}, which is not a "
                f"whole number of this run's micro-batches (training.batch_size {self.t.batch_size} x "
                f"data_parallel.world_size {self.dist.dp_world} = {global_micro_batch}); resume with a global "
                f"micro-batch that divides it, e.g. the saved one ({data['global_micro_batch']})")
        return {"epoch": int(data["epoch"]), "micro_step": micro_step}

    def _resume(self) -> None:
        """Optimizer state, RNG and data position from ``latest``, whatever layout wrote it (the
        weights were loaded from its HF dir in :meth:`_build_model`)."""
        latest = ckpt.latest_checkpoint(self.cfg.checkpoint.save_dir)
        trainer_state = ckpt.read_trainer_state(latest)
        ckpt.read_training_state(latest, self.optimizer, self.param_names)  # collective; refuses the old format
        self.loader.load_state_dict(self._resume_position(trainer_state, latest))
        ckpt.set_python_rng_state(trainer_state["python_rng"])
        self.step = int(trainer_state["step"])
        saved = trainer_state["layout"]
        self._say(f"resumed from {latest} at step {self.step} (saved at n_chips={saved['n_chips']} x "
                  f"world_size={saved['world_size']}, now {self.dist.tp_world} x {self.dist.dp_world})")

    def _say(self, line: str) -> None:
        """A progress line on stderr (rank 0, unless quiet); above the progress bar while it runs."""
        if self.dist.is_main and not self.quiet:
            from tqdm import tqdm

            tqdm.write(line, file=sys.stderr)
            sys.stderr.flush()

    def _barrier(self) -> None:
        if self.dist.world > 1:
            dist.barrier()

    def _on_main(self, fn):
        """``fn()`` on rank 0, its result on every rank; a user error there is raised on every rank
        (so no rank waits forever in a collective for one that has failed)."""
        result, error = None, None
        if self.dist.is_main:
            try:
                result = fn()
            except ckpt.CheckpointError as err:
                error = str(err)
        if self.dist.world > 1:
            box = [result, error]
            dist.broadcast_object_list(box, src=0)
            result, error = box
        if error is not None:
            raise ckpt.CheckpointError(error)
        return result

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, Any]:
        from tqdm import tqdm

        cfg = self.t
        flops_tok = flops_per_token(self.model.config, cfg.max_seq_length)
        peak = measure_matmul_peak(torch.float32 if self.cfg.model.dtype == "float32" else torch.bfloat16,
                                   str(self.device), seconds=0.3)
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step",
                   disable=self.quiet or not self.dist.is_main, file=sys.stderr, dynamic_ncols=True)
        last: dict[str, Any] = {}
        if self.step >= self.total_steps:  # resumed a finished run: nothing to train, save or log
            bar.close()
            self.log.close()
            return {"step": self.step, "history": self.log.history}
        if self.compiled:
            self._say(f"compiling the decoder blocks (backend {self.cfg.backend}) in the first step ...")
        try:
            self._loop(bar, flops_tok, peak, last)
        finally:
            bar.close()
            self.log.close()
        return {"step": self.step, "history": self.log.history, **last}

    def _loop(self, bar, flops_tok: float, peak: float, last: dict[str, Any]) -> None:
        """The steps of :meth:`fit` from the current one, then the final save, eval and plot."""
        cfg = self.t
        window_tokens, window_start = 0, time.perf_counter()
        while self.step < self.total_steps:
            if self.stop_after is not None and self.step >= self.stop_after:
                break
            metrics = self.train_step()
            window_tokens += metrics.pop("tokens")
            bar.update(1)
            record: dict[str, Any] = {}
            if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                metrics = {k: v.item() if torch.is_tensor(v) else v for k, v in metrics.items()}
                elapsed = time.perf_counter() - window_start
                tps = window_tokens / max(elapsed, 1e-9)
                record = {"step": self.step, **metrics, "tokens_per_s": tps,
                          "mfu": tps * flops_tok / (peak * self.dist.world),
                          "peak_memory_gib": peak_memory_bytes(str(self.device)) / 1024**3,
                          "epoch": self.loader.state.epoch}
                window_tokens, window_start = 0, time.perf_counter()
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{tps:,.0f}")
            if cfg.eval_every and self.step % cfg.eval_every == 0:
                record.update({"step": self.step, **self._evaluate_and_say()})
            if record:
                self.log.write(record)
                last.update(record)
            if self.cfg.checkpoint.save_every and self.step % self.cfg.checkpoint.save_every == 0:
                self.save()
        if self.step >= self.total_steps:
            if not (self.cfg.checkpoint.save_every and self.step % self.cfg.checkpoint.save_every == 0):
                self.save()
            evaluated = cfg.eval_every and self.step % cfg.eval_every == 0
            final_eval = None if evaluated else self._evaluate_and_say()
            if final_eval:
                self.log.write({"step": self.step, **final_eval})
                last.update(final_eval)
            if self.dist.is_main:
                plot_loss_curve(self.log.records(), Path(cfg.output_dir) / "loss_curve.png")

    def _evaluate_and_say(self) -> dict[str, float]:
        """:meth:`evaluate` (empty without a dev split), its result as a line on screen."""
        result = self.evaluate() or {}
        if result:
            self._say(f"step {self.step}: dev loss {result['eval_loss']:.4f}, ppl {result['eval_ppl']:.2f}")
        return result
