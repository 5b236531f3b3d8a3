"""modelzoo as an lm-evaluation-harness model backend, registered as ``modelzoo``.

    import lm_eval, modelzoo.eval
    lm_eval.simple_evaluate(model="modelzoo", model_args="checkpoint=DIR,batch_size=8", tasks=[...])

``model_args`` keys: ``checkpoint`` (any form ``modelzoo-generate`` takes), ``adapter``,
``tokenizer``, ``dtype`` (float32), ``quantize`` (none | int8), ``backend`` (generation engine:
cpu | inductor | cuda), ``batch_size``, ``max_length`` (default: the model's context),
``max_gen_toks`` (256), ``add_bos_token`` (default: the tokenizer's own behaviour).

The request semantics are the harness's ``hf`` backend's, so the numbers agree with
``--model hf`` on the same weights (tests: within 1e-4 in fp32, accuracies exactly):

- ``loglikelihood``: context and continuation are tokenized together (the harness's
  ``_encode_pair``), the window is left-truncated to ``max_length + 1`` tokens, the continuation's
  log-probability summed, ``is_greedy`` when every continuation token is the argmax;
- ``loglikelihood_rolling``: the harness's rolling windows (prefix token, ``max_length``);
- ``generate_until``: greedy (or sampled, when the task asks) on the static-cache continuous-batching
  engine (:class:`~modelzoo.generation.SlotEngine`), context left-truncated to
  ``max_length - max_gen_toks``, stopping at EOS or a stop string, the text cut at the first stop
  string.

Scoring runs on :class:`~modelzoo.eval.scoring.Scorer` (the LM head only at scored positions).
Under tensor parallelism every rank runs the same evaluation in lockstep and reports itself as
rank 0 of 1 to the harness (no request sharding; the caller prints on rank 0 only).
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, has_bos_prefix, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from .scoring import Scorer, ScoreRequest

DEFAULT_MAX_GEN_TOKS = 256


def _bool(value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


@register_model("modelzoo")
class ModelzooLM(TemplateLM):
    """The ``modelzoo`` harness model (see the module doc). Pass ``model`` and ``tokenizer`` objects
    to evaluate a model already loaded (``modelzoo-eval lm-eval`` does, for tensor parallelism)."""

    def __init__(self, checkpoint: str | None = None, adapter: str | None = None, tokenizer: Any = None,
                 dtype: str = "float32", quantize: str = "none", backend: str = "cpu",
                 batch_size: int | str = 8, max_length: int | str | None = None,
                 max_gen_toks: int | str = DEFAULT_MAX_GEN_TOKS, add_bos_token: bool | str | None = None,
                 model: Any = None, progress: bool = True, max_batch_size: Any = None, device: Any = None,
                 **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"unknown model_args for modelzoo: {', '.join(sorted(unknown))}; known: checkpoint, "
                             "adapter, tokenizer, dtype, quantize, backend, batch_size, max_length, max_gen_toks, "
                             "add_bos_token")
        if str(batch_size).startswith("auto"):
            raise ValueError("batch_size=auto is not supported by the modelzoo backend; give a number")
        if model is None:
            model, tokenizer = self._load(checkpoint, adapter, tokenizer, dtype, quantize)
        elif tokenizer is None or isinstance(tokenizer, str):
            raise ValueError("with a model object, pass its tokenizer object too")
        self.model, self.tokenizer = model, tokenizer
        self.backend_name = backend
        self._batch_size = int(batch_size)
        self._max_length = int(max_length) if max_length else int(model.config.max_position_embeddings)
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = _bool(add_bos_token)
        self.show_progress = _bool(progress)
        self.scorer = Scorer(model, self._batch_size)
        self._engine = None
        self.generated_tokens = 0

    @staticmethod
    def _load(checkpoint: str | None, adapter: str | None, tokenizer: str | None, dtype: str, quantize: str):
        from modelzoo.generation import load_for_generation
        from modelzoo.generation.source import load_source_tokenizer, resolve_model_source

        if not checkpoint:
            raise ValueError("the modelzoo backend needs model_args checkpoint=DIR (an HF dir, a training run, "
                             "or a preset name)")
        found, _ = resolve_model_source(checkpoint, adapter, tokenizer, quantize=quantize)
        model = load_for_generation(found.source, dtype=dtype, quantize=quantize, adapter=found.adapter)
        return model, load_source_tokenizer(found)[0]

    # ----------------------------------------------------------------------------- properties

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "tokenizer").replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    # ---------------------------------------------------------------------------- tokenizing

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        if add_special_tokens is None:
            if has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
                add_special_tokens = False
            elif self.add_bos_token is not None:
                add_special_tokens = self.add_bos_token
        options = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        ids = list(self.tokenizer.encode(string, **options))
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------------------- scoring

    def _window(self, context: list[int], continuation: list[int]) -> ScoreRequest:
        return ScoreRequest((context + continuation)[-(self.max_length + 1):], len(continuation))

    def _progress(self, total: int, desc: str):
        return tqdm(total=total, desc=desc, disable=not self.show_progress)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        windows = []
        for _, context, continuation in requests:
            if not continuation:
                raise ValueError("a loglikelihood request with an empty continuation (nothing to score)")
            windows.append(self._window(context, continuation))
        with self._progress(len(windows), "modelzoo loglikelihood") as bar:
            scores = self.scorer.score(windows, bar.update)
        return [(s.logprob, s.greedy) for s in scores]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            for context, target in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append(self._window(context, target))
                owner.append(index)
        with self._progress(len(windows), "modelzoo loglikelihood_rolling") as bar:
            scores = self.scorer.score(windows, bar.update)
        totals = [0.0] * len(requests)
        for index, score in zip(owner, scores, strict=True):
            totals[index] += score.logprob
        return totals

    # ---------------------------------------------------------------------------- generation

    def _generation_engine(self):
        from modelzoo.generation import SlotEngine

        if self._engine is None:
            self._engine = SlotEngine(self.model, self.tokenizer, backend=self.backend_name,
                                      max_batch=self._batch_size, max_model_len=self.max_length)
        return self._engine

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import normalize_gen_kwargs

        from modelzoo.generation import EngineRequest, SamplingParams

        engine = self._generation_engine()
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        handles, untils = [], []
        for context, gen_kwargs in (req.args for req in requests):
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = int(kwargs.pop("max_gen_toks"))
            if max_gen >= self.max_length:
                raise ValueError(f"a task asks for {max_gen} new tokens but max_length is {self.max_length}; "
                                 "raise max_length or lower the task's max_gen_toks")
            do_sample = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature") or 0) > 0
            sampling = SamplingParams(float(kwargs["temperature"]) if do_sample else 0.0,
                                      kwargs.get("top_k") if do_sample else None,
                                      kwargs.get("top_p") if do_sample else None, 1.0, int(kwargs.get("seed", 0)))
            prompt = self.tok_encode(context, left_truncate_len=self.max_length - max_gen)
            handles.append(engine.submit(EngineRequest(prompt, max_gen, sampling, stop=[u for u in until if u])))
            untils.append(until)
        with self._progress(len(handles), "modelzoo generate_until") as bar:
            done = 0
            while engine.has_work():
                engine.step()
                finished = sum(h.done for h in handles)
                bar.update(finished - done)
                done = finished
        out = []
        for handle, until in zip(handles, untils, strict=True):
            result = handle.result
            if result.error:
                raise RuntimeError(f"generation failed: {result.error}")
            self.generated_tokens += len(result.token_ids)
            out.append(postprocess_generated_text(self.tok_decode(result.token_ids), until, None))
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=True)  # our bar counts the scoring, not tokenizing
