"""``modelzoo-generate`` / ``run_generation.py``: generate text from an HF checkpoint (or a preset).

examples:
  modelzoo-generate --checkpoint runs/llama_tiny/checkpoints/latest --prompt "The capital of France is"
  modelzoo-generate --checkpoint DIR --prompts-file prompts.jsonl --batch-size 8 --output-json out.json
  modelzoo-generate --checkpoint DIR --temperature 0.8 --top-p 0.9 --seed 1 --stream --prompt "Hi"
  modelzoo-generate --checkpoint DIR --quantize int8 --backend inductor --prompt "Hi"
  modelzoo-generate --checkpoint DIR --n-chips 2 --prompt "Hi"          # tensor parallel, 2 processes
  modelzoo-generate --checkpoint BASE --adapter ADAPTER --prompt "Hi"   # LoRA/DoRA adapter, unmerged
  modelzoo-generate --checkpoint runs/lora/checkpoints --prompt "Hi"    # a LoRA run: its base + newest adapter
  modelzoo-generate --config llama_tiny generation.max_new_tokens=16     # preset: random weights
  modelzoo-generate --checkpoint DIR                                     # interactive: a prompt per line

Flags override the config (``--config``, default ``llama_tiny`` from configs/generation/), and
``key=value`` overrides (hydra syntax) override the YAML. Weights come from ``checkpoint.load_path``
when set, else from ``model.name_or_path``; ``--checkpoint`` sets the latter. The tokenizer is the
checkpoint's own (``--tokenizer DIR`` to use another); presets get a byte-level stand-in.
``--adapter`` adds a peft LoRA/DoRA adapter to the base, unmerged (LoRA also under --n-chips; not
with int8: merge it with ``modelzoo-convert merge-lora`` first); it may be a LoRA training run's dir,
its checkpoints dir or one checkpoint. A ``--checkpoint`` that holds an adapter and no model (a LoRA
run's) means its base (``adapter_config.json``'s base_model_name_or_path) plus that adapter. With an
adapter the tokenizer is the adapter's, when it has one.
A ``--prompts-file`` is JSON lines, each ``{"prompt": "..."}`` or a JSON string.
Exit status: 0 done, 2 bad input (one ``error:`` line says what and how to fix it), 1 a worker failed.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from modelzoo.checkpoint.json_file import json_lines
from modelzoo.cli.errors import UsageError
from modelzoo.cli.model_options import BACKENDS, DTYPES, QUANTIZE
from modelzoo.config import ConfigError, GenerationRunConfig, config_to_dict
from modelzoo.config.build import build
from modelzoo.config.checks import check_config

#: flag dest -> config key it sets
FLAG_KEYS = {
    "max_new_tokens": "generation.max_new_tokens", "temperature": "generation.temperature",
    "top_k": "generation.top_k", "top_p": "generation.top_p",
    "repetition_penalty": "generation.repetition_penalty", "seed": "generation.seed",
    "stop": "generation.stop", "chat": "generation.chat", "stream": "generation.stream",
    "batch_size": "generation.batch_size", "quantize": "generation.quantize",
    "max_length": "generation.max_length", "dtype": "model.dtype", "backend": "backend",
    "n_chips": "samba_compile.n_chips", "checkpoint": "model.name_or_path",
}
EXIT_OK = 0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, with a suggestion, instead of usage + message
        if message.startswith("unrecognized arguments:"):
            unknown = message.split(":", 1)[1].split()
            flags = [opt for action in self._actions for opt in action.option_strings if opt.startswith("--")]
            hints = [f"'{u}': did you mean {near[0]}?" for u in unknown if u.startswith("-")
                     for near in [difflib.get_close_matches(u.split("=")[0], flags, n=1)] if near]
            message = f"unknown option(s) {' '.join(unknown)}" + (f" ({'; '.join(hints)})" if hints else "")
        raise UsageError(f"{message}; see {self.prog} --help")


def _parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n", 1)
    p = _Parser(prog="modelzoo-generate", description=doc[0].replace("``", "'"), epilog=doc[1].replace("``", "'"),
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="llama_tiny", help="YAML path or bare name from configs/generation/ "
                   "(default: %(default)s)")
    p.add_argument("--checkpoint", help="HF checkpoint dir (float or pre-quantized int8), a training run's dir "
                   "(its newest checkpoint; a LoRA run's: its base + adapter), or a preset name (random weights)")
    p.add_argument("--adapter", metavar="DIR",
                   help="peft LoRA/DoRA adapter dir (adapter_config.json + adapter_model.safetensors) to run on the "
                        "--checkpoint base, unmerged; or a LoRA training run's dir / checkpoints dir (its newest)")
    p.add_argument("--tokenizer", help="tokenizer dir (default: the adapter's, else the checkpoint dir)")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    p.add_argument("--prompts-file", help="JSON lines file: {\"prompt\": \"...\"} per line")
    p.add_argument("--max-new-tokens", type=int, help="tokens to generate per prompt (default: the config's "
                   "generation.max_new_tokens; llama_tiny: 32)")
    p.add_argument("--temperature", type=float, help="0 = greedy; > 0 samples (default: the config's; llama_tiny: 0)")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, help="nucleus sampling: smallest set with this probability mass")
    p.add_argument("--repetition-penalty", type=float, help="> 1 discourages repeating prompt/generated tokens")
    p.add_argument("--seed", type=int, help="sampling seed (each prompt draws from its own seeded stream)")
    p.add_argument("--stop", action="append", help="stop string (repeatable); the completion ends before it")
    p.add_argument("--chat", action="store_true", default=None, help="wrap prompts in the tokenizer's chat template")
    p.add_argument("--stream", action="store_true", default=None, help="print tokens as they are generated")
    p.add_argument("--batch-size", type=int, help="prompts decoded together (default: the config's "
                   "generation.batch_size; llama_tiny: 1)")
    p.add_argument("--max-length", type=int, help="static KV-cache slots (padded prompt + new tokens)")
    p.add_argument("--dtype", choices=DTYPES,
                   help="weights and compute (default: the config's model.dtype; llama_tiny: float32)")
    p.add_argument("--backend", choices=BACKENDS,
                   help="cpu: eager; inductor: torch.compile; cuda: eager on the GPU (default: the config's; cpu)")
    p.add_argument("--n-chips", type=int, help="tensor-parallel degree: processes on this machine (default: 1)")
    p.add_argument("--quantize", choices=QUANTIZE,
                   help="int8: weight-only, per output channel (default: the config's generation.quantize; none)")
    p.add_argument("--output-json", help="write completions, settings and telemetry to this file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. generation.top_k=50")
    for action in p._actions:  # options that set a config key default to the config's value
        dest = FLAG_KEYS.get(action.dest)
        if dest and action.help and "default" not in action.help:
            action.help += f" (default: the config's {dest})"
    return p


# ------------------------------------------------------------------------------------ config


def resolve_config(args: argparse.Namespace) -> tuple[GenerationRunConfig, str | None]:
    """The YAML config with ``key=value`` overrides, then the flags, and the adapter dir to run (or
    None); errors name the flag."""
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise UsageError(f"'{bad[0]}' is neither an option nor a key=value override; see modelzoo-generate --help")
    from modelzoo.models.llama.checks import check_run_config, load_run_config

    cfg = load_run_config(args.config, args.overrides, kind="generation")
    data = config_to_dict(cfg)
    given = {dest: getattr(args, dest) for dest in FLAG_KEYS if getattr(args, dest) is not None}
    if "checkpoint" in given:
        data["checkpoint"]["load_path"] = None
    if given.get("n_chips", 1) > 1:
        data["samba_compile"]["tensor_parallel"] = "weight"
    for dest, value in given.items():
        section, _, key = FLAG_KEYS[dest].rpartition(".")
        (data[section] if section else data)[key] = value
    for section, key in (("checkpoint", "load_path"), ("model", "name_or_path")):
        # a training run's dir, its checkpoints dir or its ``latest`` file mean the newest checkpoint
        if data[section].get(key) and Path(data[section][key]).exists():
            from modelzoo.checkpoint.manager import resolve_model_dir

            data[section][key] = str(resolve_model_dir(data[section][key]))
    adapter = _adapter_of(data, args.adapter)
    flag_of = {FLAG_KEYS[d]: "--" + d.replace("_", "-") for d in given}
    try:
        cfg = build(GenerationRunConfig, data)
        check_config(cfg)
        check_run_config(cfg)
    except ConfigError as err:
        flag = flag_of.get(err.key or "")
        raise (err.located(flag, None) if flag else err) from None
    return cfg, adapter


def _adapter_of(data: dict, flag: str | None) -> str | None:
    """The adapter dir to run: ``--adapter`` (a LoRA run's dir meaning its newest checkpoint), or
    the one the weights source holds when it is an adapter and no model (a LoRA run's checkpoint);
    then the source becomes that adapter's base, in ``data``."""
    section, key = ("checkpoint", "load_path") if data["checkpoint"].get("load_path") else ("model", "name_or_path")
    path = data[section].get(key)
    if not flag and not (path and Path(path).is_dir()):  # a preset, or no dir yet: no adapter (nor torch import)
        return None
    from modelzoo.peft.locate import adapter_base, holds_adapter, resolve_adapter_dir

    if not (path and holds_adapter(path)):
        return str(resolve_adapter_dir(flag)) if flag else None
    if flag:
        raise UsageError(f"--checkpoint {path} is an adapter (adapter_config.json, no model weights) and --adapter "
                         f"{flag} another; give the base model as --checkpoint, or drop --adapter")
    data[section][key] = str(adapter_base(path, f"give the base as --checkpoint BASE --adapter {path}"))
    return path


def weights_source(cfg: GenerationRunConfig) -> str:
    return cfg.checkpoint.load_path or cfg.model.name_or_path


# ----------------------------------------------------------------------------------- prompts


def read_prompts_file(path: str) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--prompts-file {path}: no such file")
    prompts = []
    for number, item in json_lines(path, fix="write one JSON object per line", error=UsageError):
        if isinstance(item, dict) and isinstance(item.get("prompt"), str):
            prompts.append(item["prompt"])
        elif isinstance(item, str):
            prompts.append(item)
        else:
            raise UsageError(f"{path}:{number}: expected {{\"prompt\": \"...\"}} or a JSON string, got {json.dumps(item)[:60]}")
    if not prompts:
        raise UsageError(f"--prompts-file {path}: no prompts in it")
    return prompts


# ------------------------------------------------------------------------------------- output


class StreamPrinter:
    """Streams completions in prompt order: the first unfinished one live, later ones buffered."""

    def __init__(self, prompts: list[str], out: TextIO, echo: bool = True) -> None:
        self.prompts, self.out, self.echo = prompts, out, echo
        self.next, self.started = 0, False
        self.buffers: dict[int, str] = {}
        self.finished: set[int] = set()

    def __call__(self, index: int, piece: str, done: bool) -> None:
        self.buffers[index] = self.buffers.get(index, "") + piece
        if done:
            self.finished.add(index)
        while self.next < len(self.prompts):
            if not self.started:
                self.out.write(self.prompts[self.next] if self.echo else "")
                self.started = True
            self.out.write(self.buffers.pop(self.next, ""))
            if self.next not in self.finished:
                break
            self.out.write("\n")
            self.next, self.started = self.next + 1, False
        self.out.flush()


@dataclass
class Job:
    """Everything a (tensor-parallel) worker needs; picklable."""

    cfg: GenerationRunConfig
    prompts: list[str] | None
    tokenizer_dir: str | None = None
    output_json: str | None = None
    interactive: bool = False
    adapter: str | None = None


def _tokenizer_for(job: Job):
    from modelzoo.generation import ByteTokenizer, load_tokenizer
    from modelzoo.generation.tokenizer import has_tokenizer
    from modelzoo.models.llama import is_preset

    source = weights_source(job.cfg)
    if job.tokenizer_dir:
        return load_tokenizer(job.tokenizer_dir), job.tokenizer_dir
    if job.adapter and has_tokenizer(job.adapter):  # the tokenizer the adapter was trained with
        return load_tokenizer(job.adapter), job.adapter
    if is_preset(source) and not has_tokenizer(source):
        return ByteTokenizer(), "byte-level stand-in"
    return load_tokenizer(source), source


def preflight(job: Job):
    """Checks that need no weights: the checkpoint's config, the adapter (files, shapes against the
    base, layout), tokenizer, vocab, prompt lengths, output path. Returns ``(tokenizer, token ids of
    the prompts)``."""
    from modelzoo.generation.engine import GenerationError, encode_prompts, validate_requests
    from modelzoo.generation.loading import is_prequantized
    from modelzoo.generation.tokenizer import check_vocab
    from modelzoo.models.llama import is_preset, load_llama_config

    cfg, source = job.cfg, weights_source(job.cfg)
    config = load_llama_config(source, cfg.model.overrides if is_preset(source) else None)
    n_chips = cfg.samba_compile.n_chips
    if job.adapter:
        from modelzoo.generation.loading import check_adapter

        lora = check_adapter(job.adapter, source, cfg.generation.quantize,
                             cfg.model.overrides if is_preset(source) else None)
        if lora.use_dora and n_chips > 1:
            raise UsageError(f"--adapter {job.adapter} is a DoRA adapter, which runs on one chip only (its weight norm "
                             f"spans the tensor-parallel split); use --n-chips 1, or merge it (modelzoo-convert "
                             f"merge-lora) and run the merged model with --n-chips {n_chips}")
    tokenizer, tok_source = _tokenizer_for(job)
    check_vocab(tokenizer, config.vocab_size, tok_source, source)
    if job.output_json and not Path(job.output_json).resolve().parent.is_dir():
        raise UsageError(f"--output-json {job.output_json}: directory {Path(job.output_json).parent} does not exist")
    if n_chips > 1:
        if cfg.backend != "cpu":
            raise UsageError(f"--n-chips {n_chips} runs on --backend cpu (gloo processes); got --backend {cfg.backend}")
        if cfg.generation.quantize != "none" or is_prequantized(source):
            raise UsageError(f"--n-chips {n_chips} with int8 weights is not supported; use a float checkpoint "
                             "and no --quantize, or --n-chips 1")
        if job.interactive:
            raise UsageError(f"interactive mode runs in one process; give --prompt or --prompts-file with "
                             f"--n-chips {n_chips}")
    ids = None
    if job.prompts is not None:
        ids = encode_prompts(tokenizer, job.prompts, cfg.generation.chat)
        gen = cfg.generation
        validate_requests(ids, gen.max_new_tokens, config.vocab_size, config.max_position_embeddings)
        longest = max(map(len, ids))
        if gen.max_length is not None and longest + gen.max_new_tokens > gen.max_length:
            raise GenerationError(f"the longest prompt has {longest} tokens; with --max-new-tokens {gen.max_new_tokens} "
                                  f"it does not fit the static cache --max-length {gen.max_length} "
                                  "(generation.max_length); raise it or lower --max-new-tokens")
    return tokenizer, ids


def _warnings(cfg: GenerationRunConfig, out: TextIO) -> None:
    ignored = [n for n in ("fp32_skip_add", "mixedp_attn") if getattr(cfg.model, n)]
    if ignored:
        print(f"warning: model.{', model.'.join(ignored)} is not applied by generation (only fp32_ln and "
              "fp32_logits are)", file=out)
    from modelzoo.generation.loading import is_prequantized

    int8 = cfg.generation.quantize == "int8" or is_prequantized(weights_source(cfg))
    if int8 and cfg.backend == "cpu":
        print("warning: int8 on --backend cpu saves memory but decodes slower than float32 (eager PyTorch has "
              "no fast int8 matrix-vector kernel on CPU); use --backend inductor for int8 speed", file=out)


def run_job(job: Job, rank: int = 0, world_size: int = 1, out: TextIO | None = None,
            err: TextIO | None = None, stdin: TextIO | None = None, tokenizer=None) -> int:
    """Load, generate, print (rank 0) and write the JSON output. Runs in every TP process."""
    from modelzoo.generation import Generator, SamplingParams, load_for_generation

    out, err, stdin = out or sys.stdout, err or sys.stderr, stdin or sys.stdin
    cfg, gen = job.cfg, job.cfg.generation
    main_rank = rank == 0
    if tokenizer is None:
        tokenizer, _ = _tokenizer_for(job)
    model = load_for_generation(weights_source(cfg), dtype=cfg.model.dtype, quantize=gen.quantize,
                                overrides=cfg.model.overrides, seed=0, adapter=job.adapter,
                                precision={"fp32_ln": cfg.model.fp32_ln, "fp32_logits": cfg.model.fp32_logits})
    if world_size > 1:
        from torch.distributed.device_mesh import init_device_mesh

        from modelzoo.models.llama.parallelize import parallelize_llama

        parallelize_llama(model, init_device_mesh("cpu", (world_size,)))
    if main_rank:
        _warnings(cfg, err)
    generator = Generator(model, tokenizer, backend=cfg.backend, batch_size=gen.batch_size, max_length=gen.max_length)
    sampling = SamplingParams(gen.temperature, gen.top_k, gen.top_p, gen.repetition_penalty, gen.seed)
    completions = []

    def serve(prompts: list[str], stream: bool) -> None:
        printer = StreamPrinter(prompts, out, echo=not job.interactive) if stream and main_rank else None
        done = generator.generate(prompts, gen.max_new_tokens, sampling, gen.stop, gen.chat, on_text=printer)
        for c in done:
            c.index = len(completions)
            completions.append(c)
        if main_rank and printer is None:
            for c in done:
                print(f"{c.prompt}{c.text}", file=out)
        out.flush()

    if job.interactive:
        print("interactive: type a prompt and press Enter (an empty line or Ctrl-D quits)", file=err)
        while True:
            print("> ", end="", file=err, flush=True)
            line = stdin.readline()
            if not line.strip():
                break
            serve([line.rstrip("\n")], stream=True)
    else:
        serve(job.prompts, stream=gen.stream)
    if main_rank:
        out.flush()  # the completions before the summary, also when stdout and stderr share a terminal
        print(generator.telemetry.line(), file=err)
        if job.output_json:
            payload = {"config": config_to_dict(cfg), "completions": [c.to_dict() for c in completions],
                       "telemetry": generator.telemetry.summary(), "tensor_parallel": world_size,
                       "adapter": job.adapter}
            Path(job.output_json).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
            print(f"wrote {job.output_json}", file=err)
    return EXIT_OK


def _tp_worker(rank: int, world_size: int, job: Job) -> None:
    run_job(job, rank, world_size)


def _run(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    cfg, adapter = resolve_config(args)
    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += read_prompts_file(args.prompts_file)
    job = Job(cfg, prompts or None, args.tokenizer, args.output_json, interactive=not prompts, adapter=adapter)
    tokenizer, _ = preflight(job)  # every user error surfaces here, before weights load or processes start
    n_chips = cfg.samba_compile.n_chips
    if n_chips == 1:
        return run_job(job, tokenizer=tokenizer)
    from modelzoo.cli.errors import spawn_reporting_errors

    return spawn_reporting_errors(_tp_worker, n_chips, job)


def main(argv: list[str] | None = None) -> int:
    """Console entry point; a user error prints one ``error:`` line and returns 2."""
    from modelzoo.cli.errors import run_reporting_errors

    return run_reporting_errors(_run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
