"""Request bodies of the HTTP API (OpenAI v1 completions / chat completions, Megatron's ``PUT /api``)
as pydantic models, and the errors the API answers with.

Unknown fields are refused by name (HTTP 400), as are OpenAI parameters this server does not
implement when they are set to anything but their neutral value (``presence_penalty`` and
``frequency_penalty`` other than 0, ``best_of`` other than 1 or ``n``, ``logit_bias``, ``suffix``),
so a client never silently gets something other than what it asked for. vLLM's ``ignore_eos``,
``min_tokens``, ``top_k``, ``repetition_penalty`` and ``return_token_ids`` extensions are accepted.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_LOGPROBS = 20


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Sampling(_Strict):
    """The generation parameters both OpenAI endpoints share."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    n: int = Field(default=1, ge=1, le=16)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    return_token_ids: bool = False  # vLLM's extension: each choice's token_ids (and the prompt's)

    @model_validator(mode="after")
    def _supported(self):
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0:
                raise ValueError(f"{name} is not supported by this server (use repetition_penalty); omit it or send 0")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported by this server; omit it")
        if isinstance(self.stop, list) and len(self.stop) > 4:
            raise ValueError("stop takes at most 4 sequences")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    @property
    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def top_k_or_none(self) -> int | None:
        return None if self.top_k in (None, -1, 0) else self.top_k


class CompletionRequest(_Sampling):
    """``POST /v1/completions``. ``prompt``: a string, a list of token ids, or a list of either
    (one choice per prompt, ``n`` each)."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=0)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _completion_supported(self):
        if self.suffix:
            raise ValueError("suffix is not supported by this server; omit it")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported by this server; omit it")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt is an empty list; give a string or token ids")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens must be >= 1 (0 only with echo)")
        if self.echo and self.logprobs is not None:
            raise ValueError("echo with logprobs (prompt log-probabilities) is not supported by this server")
        return self


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"message content part of type {part.get('type')!r} is not supported; send text")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``; the prompt is the tokenizer's chat template applied to
    ``messages`` with the generation prompt added."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _chat_supported(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.max_tokens == 0:
            raise ValueError("max_tokens must be >= 1")
        return self

    @property
    def new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class MegatronRequest(_Strict):
    """Megatron-LM's text-generation server body (``PUT /api``)."""

    prompts: list[str] = Field(min_length=1, max_length=128)
    tokens_to_generate: int = Field(default=64, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=100.0)
    top_k: int = Field(default=0, ge=0)
    top_p: float = Field(default=0.0, ge=0.0, le=1.0)
    logprobs: bool = False
    random_seed: int | None = Field(default=None, ge=0)
    add_BOS: bool = True  # noqa: N815 - Megatron's name
    stop_on_eol: bool = False
    stop_on_double_eol: bool = False

    @model_validator(mode="after")
    def _megatron_supported(self):
        if self.top_k and self.top_p:
            raise ValueError("top_k and top_p cannot both be set (as in Megatron)")
        return self


def finish_reason(engine_reason: str) -> str:
    """The engine's ``eos``/``stop``/``length`` as OpenAI's ``stop``/``length``."""
    return "length" if engine_reason == "length" else "stop"
