"""The HTTP API over the continuous-batching engine (FastAPI): OpenAI v1 and Megatron's ``PUT /api``.

    server = Server(engine, tokenizer, ServerSettings(model_name="llama"))
    app = create_app(server)          # uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``,
``PUT /api`` (Megatron-LM's text-generation server), ``GET /health``, ``GET /metrics``
(Prometheus). Requests become :class:`~modelzoo.generation.scheduler.EngineRequest` s; the engine
runs in its own thread (:class:`~modelzoo.generation.scheduler.EngineThread`) and hands tokens back
to the event loop, one ``asyncio.Queue`` per HTTP request.

Errors are OpenAI-shaped (``{"error": {"message", "type", "param", "code"}}``): 400 for an invalid or
unknown parameter and a prompt beyond the context, 401 without the API key (when one is set), 404
for another model name, 413 for a body over the limit, 503 with ``Retry-After`` when the queue is
full or the server is shutting down, 504 when a request runs past its timeout, 500 when a request
fails inside the engine (the others go on). A client that disconnects has its request cancelled:
its slot is free at the next engine step.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from modelzoo.generation.sampling import SamplingParams
from modelzoo.generation.scheduler import (
    FINISH_ABORT,
    FINISH_ERROR,
    EngineRequest,
    EngineThread,
    GenerationError,
    QueueFull,
    RequestResult,
    SlotEngine,
    TokenEvent,
)

from .metrics import ServerMetrics
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, MegatronRequest, finish_reason

API_PREFIXES = ("/v1/", "/api")


@dataclass
class ServerSettings:
    """``model_name``: the id ``/v1/models`` lists (requests naming another get 404; no ``model``
    means this one). ``api_key``: required as ``Authorization: Bearer KEY`` on ``/v1/*`` and
    ``/api`` when set. ``request_timeout``: seconds from arrival to the last token.
    ``max_body_bytes``: larger request bodies get 413."""

    model_name: str
    api_key: str | None = None
    request_timeout: float = 600.0
    max_body_bytes: int = 1 << 20
    retry_after_s: int = 1


class ClientGone(Exception):
    """The HTTP client disconnected while its request was running."""


class Server:
    """The engine thread, the tokenizer and the metrics one app serves."""

    def __init__(self, engine: SlotEngine, tokenizer, settings: ServerSettings, own_thread: bool = True) -> None:
        """``own_thread``: the app steps the engine in a background thread while it runs; False when
        the caller steps it (``server.thread.run()`` on the main thread, as ``modelzoo-serve`` does)."""
        self.engine, self.tokenizer, self.settings = engine, tokenizer, settings
        self.own_thread = own_thread
        self.thread = EngineThread(engine)
        self.metrics = ServerMetrics(lambda: engine.waiting, lambda: engine.running)
        self.created = int(time.time())

    # --------------------------------------------------------------------------- tokens <-> text

    def encode(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", param="messages")
        try:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        except ValueError as err:
            raise APIError(400, str(err), param="messages") from None
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=body.add_generation_prompt,
                                                 tokenize=True, return_dict=False)
        return [int(i) for i in ids]

    # ------------------------------------------------------------------------------- requests

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.settings.model_name:
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{self.settings.model_name}'",
                           param="model", code="model_not_found")

    def sampling(self, temperature: float, top_k: int | None, top_p: float | None, repetition_penalty: float,
                 seed: int | None) -> SamplingParams:
        if seed is None:
            seed = secrets.randbits(62)
        greedy = temperature == 0 or top_k == 1
        return SamplingParams(0.0 if greedy else temperature, None if greedy else top_k,
                              None if greedy or top_p is None or top_p >= 1.0 else top_p, repetition_penalty, seed)

    def new_tokens(self, prompt: list[int], asked: int | None, param: str = "max_tokens") -> int:
        """``asked``, or what is left of the context; 400 naming the limit when it does not fit."""
        limit = min(self.engine.max_model_len, self.engine.cache.max_length)
        if asked is None:
            asked = limit - len(prompt)
        if len(prompt) + asked > limit or asked < 1 and len(prompt) > limit:
            raise APIError(400, f"this model's maximum context length is {limit} tokens; the request needs "
                                f"{len(prompt) + asked} ({len(prompt)} in the prompt, {asked} to generate): "
                                f"shorten the prompt or lower {param}", param=param, code="context_length_exceeded")
        return asked

    def submit(self, requests: list[EngineRequest]) -> Submission:
        return Submission(self, requests)


class Submission:
    """Engine requests of one HTTP request; their events arrive on one asyncio queue as
    ``(tag, TokenEvent | RequestResult)``."""

    def __init__(self, server: Server, requests: list[EngineRequest]) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.deadline = self.loop.time() + server.settings.request_timeout
        self.handles = []
        self.pending = len(requests)
        for request in requests:
            request.on_token = self._put
            request.on_finish = self._put
            try:
                self.handles.append(server.thread.submit(request))
            except QueueFull as err:
                self.cancel("queue full")
                raise APIError(503, str(err), type="server_overloaded", code="queue_full",
                               headers={"Retry-After": str(server.settings.retry_after_s)}) from None
            except GenerationError as err:
                self.cancel("invalid")
                raise APIError(400, str(err), param="prompt") from None

    def _put(self, item: TokenEvent | RequestResult) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def cancel(self, reason: str) -> None:
        for handle in self.handles:
            if not handle.done:
                handle.cancel(reason)

    async def events(self, http: Request | None) -> AsyncIterator[TokenEvent | RequestResult]:
        """Events until every request finished; 504 past the deadline, :class:`ClientGone` when
        ``http``'s client disconnects (checked while waiting)."""
        while self.pending:
            remaining = self.deadline - self.loop.time()
            if remaining <= 0:
                self.cancel("timeout")
                raise APIError(504, f"the request did not finish within {self.server.settings.request_timeout:g} s "
                                    "(the server's --request-timeout)", type="timeout", code="timeout")
            if not self.queue.empty():  # an event already queued (several arrived together): no timer
                item = self.queue.get_nowait()
            else:
                try:
                    item = await asyncio.wait_for(self.queue.get(), min(remaining, 0.5))
                except asyncio.TimeoutError:
                    if http is not None and await http.is_disconnected():
                        self.cancel("client disconnected")
                        raise ClientGone from None
                    continue
            if isinstance(item, RequestResult):
                self.pending -= 1
                self._record(item)
            yield item

    def _record(self, result: RequestResult) -> None:
        if result.finish_reason == FINISH_ERROR:
            return
        self.server.metrics.finished(result.prompt_tokens, len(result.token_ids), result.ttft_s, result.latency_s)

    async def results(self, http: Request | None) -> list[RequestResult]:
        """Every result, in submission order; 500 when one failed inside the engine."""
        done: dict[Any, RequestResult] = {}
        async for item in self.events(http):
            if isinstance(item, RequestResult):
                fail(item)
                done[item.tag] = item
        return [done[handle.request.tag] for handle in self.handles]


def fail(result: RequestResult) -> None:
    """Raise the API error for a request the engine could not finish."""
    if result.finish_reason == FINISH_ERROR:
        raise APIError(500, f"generation failed: {result.error}", type="server_error", code="generation_failed")
    if result.finish_reason == FINISH_ABORT:
        if result.error == "shutdown":
            raise APIError(503, "the server is shutting down", type="server_overloaded", code="shutdown")
        raise APIError(500, f"generation was cancelled ({result.error})", type="server_error", code="cancelled")


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


# ------------------------------------------------------------------------------------ completions


class _Completions:
    """``/v1/completions``: one choice per (prompt, n)."""

    def __init__(self, server: Server, body: CompletionRequest) -> None:
        server.check_model(body.model)
        self.server, self.body = server, body
        prompt = body.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        self.prompts: list[list[int]] = []
        self.prompt_texts: list[str] = []
        for item in prompt:
            if isinstance(item, str):
                self.prompts.append(server.encode(item))
                self.prompt_texts.append(item)
            else:
                if not item:
                    raise APIError(400, "a prompt of token ids is empty", param="prompt")
                self.prompts.append(list(item))
                self.prompt_texts.append(server.decode(list(item)) if body.echo else "")
        self.max_tokens = [server.new_tokens(p, body.max_tokens) for p in self.prompts]
        self.id, self.created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        self.sampling = server.sampling(body.temperature, body.top_k_or_none, body.top_p, body.repetition_penalty,
                                        body.seed)

    def requests(self) -> list[EngineRequest]:
        body, out = self.body, []
        for p, prompt in enumerate(self.prompts):
            for j in range(body.n):
                index = p * body.n + j
                out.append(EngineRequest(prompt, self.max_tokens[p], self.sampling, body.stops, body.ignore_eos,
                                         body.min_tokens, body.logprobs, stream_text=body.stream,
                                         seed_index=index, tag=index))
        return out

    def _logprobs(self, tokens: list[int], logprobs: list[float], tops: list[list[tuple[int, float]]],
                  offset: int) -> dict[str, Any]:
        texts = [self.server.token_text(t) for t in tokens]
        offsets, position = [], offset
        for text in texts:
            offsets.append(position)
            position += len(text)
        return {"tokens": texts, "token_logprobs": logprobs,
                "top_logprobs": [{self.server.token_text(t): v for t, v in top} for top in tops],
                "text_offset": offsets}

    def response(self, results: list[RequestResult]) -> dict[str, Any]:
        body, choices = self.body, []
        for result in results:
            prefix = self.prompt_texts[result.tag // body.n] if body.echo else ""
            logprobs = None
            if body.logprobs is not None:
                logprobs = self._logprobs(result.token_ids, result.token_logprobs, result.top_logprobs, len(prefix))
            choices.append({"index": result.tag, "text": prefix + result.text, "logprobs": logprobs,
                            "finish_reason": finish_reason(result.finish_reason)})
            if body.return_token_ids:
                choices[-1].update(token_ids=result.token_ids, prompt_token_ids=self.prompts[result.tag // body.n])
        completion = sum(len(r.token_ids) for r in results)
        prompt = sum(len(p) for p in self.prompts) * body.n
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.server.settings.model_name, "choices": choices, "usage": _usage(prompt, completion)}

    def echo_only(self) -> dict[str, Any]:
        """``max_tokens: 0`` with ``echo``: the prompts back, nothing generated."""
        choices = [{"index": p * self.body.n + j, "text": text, "logprobs": None, "finish_reason": "length"}
                   for p, text in enumerate(self.prompt_texts) for j in range(self.body.n)]
        prompt = sum(len(p) for p in self.prompts) * self.body.n
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.server.settings.model_name, "choices": choices, "usage": _usage(prompt, 0)}

    def chunk(self, index: int, text: str, finish: str | None = None, logprobs=None) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.server.settings.model_name,
                "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]}

    async def stream(self, submission: Submission, http: Request) -> AsyncIterator[str]:
        body = self.body
        offsets = {}
        if body.echo:
            for index in range(len(self.prompts) * body.n):
                offsets[index] = len(self.prompt_texts[index // body.n])
                yield _sse(self.chunk(index, self.prompt_texts[index // body.n]))
        completion = 0
        async for item in submission.events(http):
            if isinstance(item, TokenEvent):
                logprobs = None
                if body.logprobs is not None and item.token_id is not None:
                    logprobs = self._logprobs([item.token_id], [item.logprob], [item.top_logprobs or []],
                                              offsets.get(item.tag, 0))
                offsets[item.tag] = offsets.get(item.tag, 0) + len(item.text)
                yield _sse(self.chunk(item.tag, item.text, None, logprobs))
            else:
                fail(item)
                completion += len(item.token_ids)
                yield _sse(self.chunk(item.tag, "", finish_reason(item.finish_reason)))
        if body.stream_options is not None and body.stream_options.include_usage:
            usage = _usage(sum(len(p) for p in self.prompts) * body.n, completion)
            yield _sse({"id": self.id, "object": "text_completion", "created": self.created,
                        "model": self.server.settings.model_name, "choices": [], "usage": usage})


# ------------------------------------------------------------------------------- chat completions


class _Chat:
    """``/v1/chat/completions``: ``n`` choices of one conversation."""

    def __init__(self, server: Server, body: ChatCompletionRequest) -> None:
        server.check_model(body.model)
        self.server, self.body = server, body
        self.prompt = server.chat_prompt(body)
        self.max_tokens = server.new_tokens(self.prompt, body.new_tokens,
                                            "max_completion_tokens" if body.max_completion_tokens else "max_tokens")
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        self.sampling = server.sampling(body.temperature, body.top_k_or_none, body.top_p, body.repetition_penalty,
                                        body.seed)

    def requests(self) -> list[EngineRequest]:
        body = self.body
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        return [EngineRequest(self.prompt, self.max_tokens, self.sampling, body.stops, body.ignore_eos, body.min_tokens,
                              logprobs, stream_text=body.stream, seed_index=j, tag=j) for j in range(body.n)]

    def _entry(self, token: int, logprob: float) -> dict[str, Any]:
        text = self.server.token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def _logprobs(self, tokens: list[int], logprobs: list[float], tops: list[list[tuple[int, float]]]):
        if not self.body.logprobs:
            return None
        return {"content": [{**self._entry(t, lp), "top_logprobs": [self._entry(a, v) for a, v in top]}
                            for t, lp, top in zip(tokens, logprobs, tops, strict=True)]}

    def response(self, results: list[RequestResult]) -> dict[str, Any]:
        choices = [{"index": r.tag, "message": {"role": "assistant", "content": r.text},
                    "logprobs": self._logprobs(r.token_ids, r.token_logprobs, r.top_logprobs),
                    "finish_reason": finish_reason(r.finish_reason)} for r in results]
        if self.body.return_token_ids:
            for choice, result in zip(choices, results, strict=True):
                choice.update(token_ids=result.token_ids, prompt_token_ids=self.prompt)
        completion = sum(len(r.token_ids) for r in results)
        return {"id": self.id, "object": "chat.completion", "created": self.created,
                "model": self.server.settings.model_name, "choices": choices,
                "usage": _usage(len(self.prompt) * self.body.n, completion)}

    def chunk(self, index: int, delta: dict, finish: str | None = None, logprobs=None) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.server.settings.model_name,
                "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}

    async def stream(self, submission: Submission, http: Request) -> AsyncIterator[str]:
        for j in range(self.body.n):
            yield _sse(self.chunk(j, {"role": "assistant", "content": ""}))
        completion = 0
        async for item in submission.events(http):
            if isinstance(item, TokenEvent):
                logprobs = None
                if item.token_id is not None:
                    logprobs = self._logprobs([item.token_id], [item.logprob], [item.top_logprobs or []])
                yield _sse(self.chunk(item.tag, {"content": item.text}, None, logprobs))
            else:
                fail(item)
                completion += len(item.token_ids)
                yield _sse(self.chunk(item.tag, {}, finish_reason(item.finish_reason)))
        options = self.body.stream_options
        if options is not None and options.include_usage:
            yield _sse({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                        "model": self.server.settings.model_name, "choices": [],
                        "usage": _usage(len(self.prompt) * self.body.n, completion)})


# ------------------------------------------------------------------------------------------ app


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _validation_message(err: RequestValidationError) -> tuple[str, str | None]:
    first = err.errors()[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "extra_forbidden":
        return f"unknown parameter '{param}'", param
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON ({first.get('msg')})", None
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    return (f"{param}: {message}" if param else message), param


class _Guard:
    """ASGI middleware: the body size limit, the API key, and the request counter by status."""

    def __init__(self, app, server: Server) -> None:
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        settings = self.server.settings
        status_seen: list[int] = []

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status_seen.append(message["status"])
            await send(message)

        try:
            if path.startswith(API_PREFIXES):
                headers = dict(scope.get("headers") or [])
                if settings.api_key is not None:
                    auth = headers.get(b"authorization", b"").decode("latin-1")
                    if not secrets.compare_digest(auth, f"Bearer {settings.api_key}"):
                        raise APIError(401, "a valid API key is required: send 'Authorization: Bearer KEY'",
                                       code="invalid_api_key")
                length = headers.get(b"content-length")
                if length is not None and int(length) > settings.max_body_bytes:
                    raise APIError(413, f"the request body is {int(length)} bytes; the limit is "
                                        f"{settings.max_body_bytes}", code="request_too_large")
                if scope["method"] in ("POST", "PUT"):
                    receive = await self._buffered(receive, settings.max_body_bytes)
            await self.app(scope, receive, counted_send)
        except APIError as err:
            if status_seen:  # the response had started; nothing more can be said
                raise
            await _error_response(err)(scope, receive, counted_send)
        finally:
            if path.startswith(API_PREFIXES) and status_seen:
                self.server.metrics.requests.labels(path, str(status_seen[0])).inc()

    @staticmethod
    async def _buffered(receive, limit: int):
        """Read the whole body (413 past ``limit``, also without a content-length), then replay it;
        later calls reach the client's own ``receive`` (disconnect detection)."""
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                raise APIError(413, f"the request body exceeds the limit of {limit} bytes", code="request_too_large")
            more = message.get("more_body", False)
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def buffered():
            return replay.pop() if replay else await receive()

        return buffered


def create_app(server: Server):
    """The ASGI app serving ``server``: the FastAPI app behind the size/key guard (the engine thread
    starts and stops with the app)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if server.own_thread:
            server.thread.start()
        try:
            yield
        finally:
            # uvicorn has waited for in-flight requests (its graceful-shutdown timeout); abort the rest
            await asyncio.get_running_loop().run_in_executor(None, lambda: server.thread.stop(drain=False))

    app = FastAPI(title="modelzoo", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        return _error_response(err)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        message, param = _validation_message(err)
        return _error_response(APIError(400, message, param=param))

    @app.exception_handler(Exception)
    async def crashed(request: Request, err: Exception):
        return _error_response(APIError(500, f"internal error: {type(err).__name__}: {err}", type="server_error"))

    @app.get("/health")
    async def health():
        if not server.thread.alive:
            return JSONResponse({"status": "engine stopped", "error": repr(server.thread.error)}, status_code=503)
        return {"status": "ok", "running": server.engine.running, "waiting": server.engine.waiting}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type=server.metrics.content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": server.settings.model_name, "object": "model", "created": server.created, "owned_by": "modelzoo",
            "max_model_len": min(server.engine.max_model_len, server.engine.cache.max_length)}]}

    async def respond(handler, http: Request):
        if handler.body.stream:
            submission = server.submit(handler.requests())

            async def events():
                try:
                    async for line in handler.stream(submission, http):
                        yield line
                    yield _sse("[DONE]")
                except APIError as err:
                    yield _sse(err.body())
                    yield _sse("[DONE]")
                except ClientGone:
                    return
                finally:
                    submission.cancel("client disconnected")

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        submission = server.submit(handler.requests())
        try:
            return handler.response(await submission.results(http))
        except ClientGone:
            return Response(status_code=499)
        finally:
            submission.cancel("client disconnected")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request):
        handler = _Completions(server, body)
        if body.max_tokens == 0:
            return handler.echo_only()
        return await respond(handler, http)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: Request):
        return await respond(_Chat(server, body), http)

    @app.put("/api")
    async def megatron(body: MegatronRequest, http: Request):
        prompts = [server.encode(p, add_special_tokens=body.add_BOS) for p in body.prompts]
        for prompt in prompts:
            server.new_tokens(prompt, body.tokens_to_generate, "tokens_to_generate")
        sampling = server.sampling(body.temperature, body.top_k or None, body.top_p or None, 1.0, body.random_seed)
        stops = ("\n\n",) if body.stop_on_double_eol else ("\n",) if body.stop_on_eol else ()
        requests = [EngineRequest(p, body.tokens_to_generate, sampling, stops, logprobs=0 if body.logprobs else None,
                                  seed_index=i, tag=i) for i, p in enumerate(prompts)]
        results = await server.submit(requests).results(http)
        out: dict[str, Any] = {
            "text": [prompt + r.text for prompt, r in zip(body.prompts, results, strict=True)],
            "segments": [[server.token_text(t) for t in r.token_ids] for r in results]}
        if body.logprobs:
            out["logprobs"] = [r.token_logprobs for r in results]
        return out

    return _Guard(app, server)
