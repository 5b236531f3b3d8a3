"""``modelzoo-serve`` as a real subprocess on 127.0.0.1, talked to with the ``openai`` client and httpx:
greedy completions equal ``transformers`` (one by one, 16 at once through 4 slots, streamed), chat
through the tokenizer's template, seeded sampling under load, tensor parallel, Megatron's API,
metrics, and every error path (bad parameters, context, key, body size, full queue, disconnect,
a failing request, SIGTERM), plus a bounded load test."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest
from helpers.generation_fixtures import hf_greedy, random_prompts, save_checkpoint
from helpers.serving_fixtures import HELPERS, ServerProcess
from transformers import AutoTokenizer

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
FAULT_SEED = 4242
NEW = 16
MAX_LEN = 256


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "tiny-llama"
    model = save_checkpoint(path, "llama3_2_tiny")
    return path, model, AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    """The main server: 4 slots, an API key, and the fault hook armed for one seed."""
    env = {"PYTHONPATH": f"{HELPERS / 'serve_fault_site'}:{HELPERS.parent}", "SERVE_FAULT_SEED": str(FAULT_SEED)}
    proc = ServerProcess(checkpoint[0], "--max-batch", "4", "--max-model-len", str(MAX_LEN), "--api-key", KEY,
                         "--max-body-bytes", "65536", log=tmp_path_factory.mktemp("log") / "server.log", env=env)
    yield proc
    assert proc.stop() == 0, proc.output()


def _client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


def _post(server, path, body, headers=AUTH, **kwargs):
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=60, **kwargs)


def _oracle(model, prompt: list[int], new: int = NEW) -> list[int]:
    return hf_greedy(model, [prompt], new, eos=2)[0]


def test_greedy_completions_equal_transformers_one_by_one_and_concurrently(server, checkpoint):
    path, model, tok = checkpoint
    client = _client(server)
    [listed] = client.models.list().data
    assert listed.id == path.name
    lengths = (3, 17, 5, 40, 9, 2, 25, 11, 6, 30, 14, 4, 21, 8, 13, 7)
    prompts = random_prompts(model.config.vocab_size, lengths=lengths, seed=4)
    want = [_oracle(model, p) for p in prompts]

    def ask(prompt):
        out = client.completions.create(model=path.name, prompt=prompt, max_tokens=NEW, temperature=0,
                                        extra_body={"return_token_ids": True})
        assert out.usage.prompt_tokens == len(prompt) and out.usage.completion_tokens == len(out.choices[0].token_ids)
        return out.choices[0].token_ids, out.choices[0].text

    one_by_one = [ask(p) for p in prompts[:4]]
    assert [ids for ids, _ in one_by_one] == want[:4]
    with ThreadPoolExecutor(16) as pool:  # 16 at once through 4 slots: each slot is reused
        together = list(pool.map(ask, prompts))
    assert [ids for ids, _ in together] == want
    assert [text for _, text in together] == [tok.decode(w, skip_special_tokens=True) for w in want]

    text = "the river runs over the green stone"
    streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(
        model=path.name, prompt=text, max_tokens=NEW, temperature=0, stream=True))
    assert streamed == tok.decode(_oracle(model, tok.encode(text)), skip_special_tokens=True)


def test_chat_applies_the_chat_template(server, checkpoint):
    path, model, tok = checkpoint
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a river over the stone"}]
    out = _client(server).chat.completions.create(model=path.name, messages=messages, max_tokens=NEW, temperature=0,
                                                  extra_body={"return_token_ids": True})
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    choice = out.choices[0]
    assert choice.prompt_token_ids == list(ids) and out.usage.prompt_tokens == len(ids)
    assert choice.token_ids == _oracle(model, list(ids))
    assert choice.message.content == tok.decode(choice.token_ids, skip_special_tokens=True)
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")


def test_seeded_sampling_is_the_same_alone_and_under_load(server, checkpoint):
    path = checkpoint[0]
    client = _client(server)

    def sample(seed, prompt="the light over the train"):
        return client.completions.create(model=path.name, prompt=prompt, max_tokens=NEW, temperature=0.9, top_p=0.95,
                                         seed=seed, extra_body={"ignore_eos": True}).choices[0].text

    alone = sample(123)
    with ThreadPoolExecutor(8) as pool:
        loaded = list(pool.map(sample, [5, 6, 123, 7, 8, 123, 9, 10]))
    assert loaded[2] == alone and loaded[5] == alone
    assert sample(124) != alone  # the seed matters


def test_megatron_api_and_metrics(server, checkpoint):
    path, model, tok = checkpoint
    prompts = ["the river", "seven blue clouds over"]
    out = httpx.put(f"{server.url}/api", json={"prompts": prompts, "tokens_to_generate": NEW, "temperature": 0,
                                               "top_k": 1, "logprobs": True}, headers=AUTH, timeout=60)
    assert out.status_code == 200, out.text
    body = out.json()
    for prompt, text, logprobs in zip(prompts, body["text"], body["logprobs"], strict=True):
        ids = _oracle(model, tok.encode(prompt))
        assert text == prompt + tok.decode(ids, skip_special_tokens=True) and len(logprobs) == len(ids)
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert 'modelzoo_requests_total{endpoint="/api",status="200"}' in metrics
    for name in ("modelzoo_time_to_first_token_seconds_count", "modelzoo_time_per_output_token_seconds_count",
                 "modelzoo_generation_tokens_total", "modelzoo_prompt_tokens_total", "modelzoo_queue_length",
                 "modelzoo_running_requests"):
        assert name in metrics


@pytest.mark.parametrize(("body", "status", "param", "words"), [
    ({"prompt": "hi", "bogus": 1}, 400, "bogus", "unknown parameter 'bogus'"),
    ({"prompt": "hi", "temperature": 5}, 400, "temperature", "less than or equal to 2"),
    ({"prompt": "hi", "presence_penalty": 0.5}, 400, None, "presence_penalty is not supported"),
    ({"prompt": [5] * 250, "max_tokens": 10}, 400, "max_tokens", f"maximum context length is {MAX_LEN} tokens"),
    ({"prompt": "hi", "model": "gpt-4"}, 404, "model", "does not exist"),
])
def test_invalid_requests_get_openai_errors(server, body, status, param, words):
    out = _post(server, "/v1/completions", body)
    assert out.status_code == status, out.text
    error = out.json()["error"]
    assert words in error["message"] and error["param"] == param and error["type"]


def test_api_key_and_body_limit(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        out = _post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2}, headers=headers)
        assert out.status_code == 401 and out.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/health").status_code == 200  # health needs no key
    big = {"prompt": "x" * 70000, "max_tokens": 2}
    out = _post(server, "/v1/completions", big)
    assert out.status_code == 413 and out.json()["error"]["code"] == "request_too_large"
    assert "the limit is 65536" in out.json()["error"]["message"]
    chunked = httpx.post(f"{server.url}/v1/completions", headers={**AUTH, "Content-Type": "application/json"},
                         content=iter([json.dumps(big).encode()]), timeout=30)  # no content-length
    assert chunked.status_code == 413


def test_a_failing_request_fails_alone(server, checkpoint):
    path, model, tok = checkpoint
    with ThreadPoolExecutor(2) as pool:
        bad = pool.submit(_post, server, "/v1/completions", {"prompt": "the river", "max_tokens": NEW,
                                                             "temperature": 1.0, "seed": FAULT_SEED})
        good = pool.submit(_post, server, "/v1/completions", {"prompt": "the river", "max_tokens": NEW,
                                                              "temperature": 0})
    assert bad.result().status_code == 500
    error = bad.result().json()["error"]
    assert error["code"] == "generation_failed" and "injected fault" in error["message"]
    assert good.result().status_code == 200
    assert good.result().json()["choices"][0]["text"] == tok.decode(_oracle(model, tok.encode("the river")),
                                                                    skip_special_tokens=True)
    assert server.health()["status"] == "ok"


def test_load_completes_every_request_with_flat_memory(server):
    """8 clients x 4 requests, three times (the first wave warms up): every response complete, no
    failure, and the server's resident memory flat after the warm-up."""
    rss = []
    process = psutil.Process(server.proc.pid)

    async def client(index: int, http: httpx.AsyncClient) -> list[int]:
        done = []
        for turn in range(4):
            out = await http.post("/v1/completions", json={
                "prompt": [5 + index + turn] * (3 + 5 * index), "max_tokens": 24, "temperature": 0,
                "ignore_eos": True})
            assert out.status_code == 200, out.text
            done.append(out.json()["usage"]["completion_tokens"])
        return done

    async def wave():
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=120) as http:
            return await asyncio.gather(*(client(i, http) for i in range(8)))

    for _ in range(3):
        counts = asyncio.run(wave())
        assert [c for row in counts for c in row] == [24] * 32
        rss.append(process.memory_info().rss)
    growth = (rss[2] - rss[0]) / 2**20
    print(f"server RSS after each wave (MiB): {[round(r / 2**20, 1) for r in rss]}")
    assert growth < 32, f"server memory grew {growth:.1f} MiB after warm-up"
    assert server.health()["running"] == 0


# -------------------------------------------------------------------- queue, disconnect, SIGTERM


@pytest.fixture
def small_server(checkpoint, tmp_path):
    proc = ServerProcess(checkpoint[0], "--max-batch", "2", "--max-queue", "1", "--max-model-len", "4096",
                         log=tmp_path / "small.log")
    yield proc
    proc.stop()


def _long(prompt: str = "the river", tokens: int = 3000, stream: bool = True) -> dict:
    return {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "stream": stream}


def test_full_queue_and_disconnects_free_their_slots(small_server):
    server = small_server
    with httpx.Client(base_url=server.url, timeout=60) as http:
        def open_stream():
            return http.send(http.build_request("POST", "/v1/completions", json=_long()), stream=True)

        first = open_stream()
        lines = [first.iter_lines()]  # kept: dropping the iterator would close the connection
        assert first.status_code == 200 and next(lines[0]).startswith("data: ")
        second = open_stream()
        lines.append(second.iter_lines())
        assert second.status_code == 200 and next(lines[1]).startswith("data: ")
        queued = open_stream()
        assert server.wait_health(lambda h: h["waiting"] == 1)["running"] == 2
        full = httpx.post(f"{server.url}/v1/completions", json=_long(stream=False), timeout=30)
        assert full.status_code == 503 and full.headers["Retry-After"] == "1"
        assert full.json()["error"]["code"] == "queue_full"
        for response in (first, second, queued):  # the clients go away mid-stream
            response.close()
    state = server.wait_health(lambda h: h["running"] == 0 and h["waiting"] == 0)
    assert state["running"] == 0 and state["waiting"] == 0, f"slots not freed after disconnects: {state}"
    after = httpx.post(f"{server.url}/v1/completions", json=_long(tokens=8, stream=False), timeout=30)
    assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 8


def test_sigterm_finishes_requests_in_flight_then_exits(small_server):
    server, chunks, usage = small_server, [], []

    def stream():
        body = {**_long(tokens=400), "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    chunks.append(chunk)
                    if chunk.get("usage"):
                        usage.append(chunk["usage"])

    reader = threading.Thread(target=stream)
    reader.start()
    server.wait_health(lambda h: h["running"] == 1)
    server.proc.send_signal(signal.SIGTERM)
    reader.join(120)
    assert server.proc.wait(60) == 0, server.output()
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "length" and usage == [{"prompt_tokens": usage[0]["prompt_tokens"],
                                                   "completion_tokens": 400,
                                                   "total_tokens": usage[0]["prompt_tokens"] + 400}]
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health", timeout=5)


# ----------------------------------------------------------------------------- tensor parallel


def test_two_chips_serve_the_same_greedy_tokens(checkpoint, tmp_path, server):
    path, model, _ = checkpoint
    prompts = random_prompts(model.config.vocab_size, lengths=(4, 13, 7), seed=12)
    tp = ServerProcess(path, "--n-chips", "2", "--max-batch", "2", "--max-model-len", str(MAX_LEN),
                       log=tmp_path / "tp.log")
    try:
        def ask(url, headers, prompt):
            out = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": NEW, "temperature": 0,
                                                            "return_token_ids": True}, headers=headers, timeout=120)
            assert out.status_code == 200, out.text
            return out.json()["choices"][0]["token_ids"]

        with ThreadPoolExecutor(3) as pool:
            two = list(pool.map(lambda p: ask(tp.url, {}, p), prompts))
        one = [ask(server.url, AUTH, p) for p in prompts]
        assert two == one == [_oracle(model, p) for p in prompts]
    finally:
        assert tp.stop() == 0, tp.output()


def test_usage_errors_answer_fast_with_one_line(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "modelzoo.cli.serve", "--checkpoint", str(tmp_path / "missing")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        f"error: --checkpoint {tmp_path / 'missing'}: no such directory (and not a preset name)"]


def test_the_serve_command_imports_no_torch_before_parsing():
    import subprocess
    import sys

    code = "import sys, modelzoo.cli.serve; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


def test_a_request_past_its_timeout_gets_504_and_frees_its_slot(checkpoint, tmp_path):
    proc = ServerProcess(checkpoint[0], "--max-batch", "1", "--max-model-len", "8192", "--request-timeout", "1",
                         log=tmp_path / "timeout.log")
    try:
        out = httpx.post(f"{proc.url}/v1/completions", json=_long(tokens=8000, stream=False), timeout=60)
        assert out.status_code == 504 and out.json()["error"]["code"] == "timeout"
        assert "within 1 s" in out.json()["error"]["message"]
        assert proc.wait_health(lambda h: h["running"] == 0)["running"] == 0
        after = httpx.post(f"{proc.url}/v1/completions", json=_long(tokens=4, stream=False), timeout=30)
        assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 4
    finally:
        assert proc.stop() == 0, proc.output()
