"""The OpenAI-compatible server, driven by the official ``openai`` client on 127.0.0.1.

One server on the tiny Llama serves: the base (``tiny_llama``), a run folder (``tuned``), two
LoRA adapters (``a``, ``b``) sharing the base, and a bottleneck adapter (``bn``, another PEFT
type: its own copy of the base).
"""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from pipeline.commands.compose import typed_config
from pipeline.config.app_schema import ServeConfig, ServerConfig
from pipeline.config.errors import ConfigError
from pipeline.config.schema import ModelConfig
from pipeline.scoring.vllm_client import VllmError
from pipeline.serve import build_app, vllm_arguments
from pipeline.server import plan
from tests.adapter_factory import make_bottleneck, make_lora, make_run
from tests.conftest import CONF, ROOT, python_path

KEY = "test-key-123"
PROMPT = "The capital of France is"
ERROR_FIELDS = {"message", "type", "param", "code"}


def compose_serve(overrides, run_dir: Path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("serve", overrides=[f"paths.run_dir={run_dir}", f"paths.root_dir={ROOT}",
                                           *overrides])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(app):
    """Starts uvicorn on a free 127.0.0.1 port in a thread; returns (server, thread, port)."""
    import uvicorn

    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.02)
    return uv, thread, port


@pytest.fixture(scope="module")
def adapters(tiny_folder, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("serve")
    return {"run": make_run(root / "run", make_lora(tiny_folder, root / "t", seed=3), []),
            "a": make_lora(tiny_folder, root / "a", seed=1), "b": make_lora(tiny_folder, root / "b", seed=2),
            "bn": make_bottleneck(tiny_folder, root / "bn", seed=4)}


@pytest.fixture(scope="module")
def server(adapters, tmp_path_factory):
    cfg = compose_serve([f"run={adapters['run']}", "model=tiny_llama",
                         f"adapters={{a: {adapters['a']}, b: {adapters['b']}, bn: {adapters['bn']}}}",
                         f"server.api_key={KEY}", "server.max_prompt_tokens=64",
                         "server.max_tokens_limit=32", "server.default_max_tokens=16",
                         "server.max_wait_ms=50"],
                        tmp_path_factory.mktemp("serve_run"))
    app = build_app(cfg)
    uv, thread, port = start_server(app)
    yield app, f"http://127.0.0.1:{port}"
    uv.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server[1]}/v1", api_key=KEY, max_retries=0)


def complete(client, model, prompt=PROMPT, **kwargs):
    kwargs.setdefault("temperature", 0)
    kwargs.setdefault("max_tokens", 8)
    return client.completions.create(model=model, prompt=prompt, **kwargs)


def test_models_lists_the_base_and_every_adapter(client):
    models = {m.id: m for m in client.models.list()}
    assert list(models) == ["tiny_llama", "tuned", "a", "b", "bn"]
    assert models["a"].model_extra["parent"] == "tiny_llama"
    assert models["tiny_llama"].model_extra["parent"] is None


def test_adapter_switching_matches_in_process_generation(client, server, adapters, tiny_folder):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    service = server[0].state.service
    tokenizer = service.tokenizer
    device = next(service.pool.choices["tiny_llama"].model.parameters()).device  # CUDA when there is one
    ids = tokenizer(PROMPT, return_tensors="pt").to(device)

    def reference(adapter=None) -> str:
        model = AutoModelForCausalLM.from_pretrained(tiny_folder)
        model = PeftModel.from_pretrained(model, adapter) if adapter else model
        out = model.to(device).eval().generate(**ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    texts = {m: complete(client, m).choices[0].text for m in ("tiny_llama", "a", "b", "tuned", "a")}
    assert texts["tiny_llama"] == reference()
    assert texts["a"] == reference(adapters["a"])
    assert texts["tuned"] == reference(adapters["run"] / "adapter")
    assert len({texts["tiny_llama"], texts["a"], texts["b"], texts["tuned"]}) == 4
    assert complete(client, "bn").choices[0].finish_reason == "length"


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_the_server_generates_on_cuda(client, server, adapters, tiny_folder):
    """With a GPU the server puts every model there and answers as the same model does in
    process on that GPU."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    service = server[0].state.service
    assert {next(c.model.parameters()).device.type for c in service.pool.choices.values()} == {"cuda"}
    ids = service.tokenizer(PROMPT, return_tensors="pt").to("cuda")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_folder), adapters["a"])
    with torch.no_grad():
        out = model.to("cuda").eval().generate(**ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    expected = service.tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert complete(client, "a").choices[0].text == expected


def test_chat_stream_equals_chat_and_reports_usage(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    whole = client.chat.completions.create(model="a", messages=messages, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model="a", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content != ""
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert whole.usage.prompt_tokens > 10 and whole.usage.total_tokens == (
        whole.usage.prompt_tokens + whole.usage.completion_tokens)


def test_max_tokens_and_stop(client):
    full = complete(client, "b", max_tokens=12)
    assert full.usage.completion_tokens == 12 and full.choices[0].finish_reason == "length"
    text = full.choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    cut = complete(client, "b", max_tokens=12, stop=[stop, "never-appears"])
    assert cut.choices[0].text == text[:text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in complete(client, "b", max_tokens=12, stop=stop, stream=True))
    assert streamed == cut.choices[0].text


def test_n_and_seeded_sampling_are_reproducible(client):
    first = complete(client, "a", n=3, temperature=1.0, seed=7, max_tokens=6)
    again = complete(client, "a", n=3, temperature=1.0, seed=7, max_tokens=6)
    other = complete(client, "a", n=3, temperature=1.0, seed=8, max_tokens=6)
    texts = [c.text for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.text for c in again.choices]
    assert texts != [c.text for c in other.choices]
    assert len(set(texts)) > 1  # n samples, not one sample repeated
    assert first.usage.completion_tokens == 18


def test_concurrent_requests_are_batched_and_each_gets_its_adapters_answer(client, server):
    models = ["a", "b", "tiny_llama", "tuned"] * 2
    alone = {m: complete(client, m).choices[0].text for m in set(models)}
    rows, batches = _metric(server, "pipeline_batch_rows_sum"), _metric(server, "pipeline_batch_rows_count")
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda m: complete(client, m).choices[0].text, models))
    assert together == [alone[m] for m in models]
    assert _metric(server, "pipeline_batch_rows_sum") - rows == 8
    assert _metric(server, "pipeline_batch_rows_count") - batches < 8  # some shared a generate call


def test_api_key_is_required(server):
    wrong = openai.OpenAI(base_url=f"{server[1]}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        wrong.models.list()
    assert err.value.body["code"] == "invalid_api_key"
    response = httpx.post(f"{server[1]}/v1/completions", json={"model": "a", "prompt": "x"})
    assert response.status_code == 401 and set(response.json()["error"]) == ERROR_FIELDS
    assert httpx.get(f"{server[1]}/health").json()["status"] == "ok"  # health needs no key


@pytest.mark.parametrize("path, body, status, param, code", [
    ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model", "model_not_found"),
    ("/v1/completions", b'{"model": "a", "prompt": ', 400, None, "invalid_json"),
    ("/v1/completions", {"model": "a"}, 400, "prompt", "missing_required_parameter"),
    ("/v1/chat/completions", {"model": "a"}, 400, "messages", "missing_required_parameter"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, 400, "model",
     "missing_required_parameter"),
    ("/v1/chat/completions", {"model": "a", "messages": [{"role": "robot", "content": "hi"}]}, 400,
     "messages.0.role", "invalid_value"),
    ("/v1/completions", {"model": "a", "prompt": "word " * 100}, 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", {"model": "a", "prompt": "x", "max_tokens": 33}, 400, "max_tokens", "invalid_value"),
    ("/v1/completions", {"model": "a", "prompt": "x", "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ("/v1/completions", {"model": "a", "prompt": "x", "temperature": "hot"}, 400, "temperature",
     "invalid_value"),
    ("/v1/completions", {"model": "a", "prompt": "x", "n": 9}, 400, "n", "invalid_value"),
    ("/v1/completions", {"model": "a", "prompt": "x", "logprobs": 2}, 400, "logprobs", "unsupported_parameter"),
    ("/v1/completions", {"model": "a", "prompt": []}, 400, "prompt", "invalid_value"),
    ("/v1/completions", [1, 2], 400, None, "invalid_value"),
    ("/v1/nothing", {}, 404, None, "not_found"),
    ("/invocations", b"not json", 400, None, "invalid_json"),
    ("/invocations", {"model": "nope", "prompt": "x"}, 404, "model", "model_not_found"),
])
def test_malformed_requests_get_openai_4xx_errors(server, path, body, status, param, code):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(server[1] + path, content=raw, headers={
        "Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == ERROR_FIELDS and error["message"]
    assert (error["param"], error["code"]) == (param, code)
    assert error["type"] == "invalid_request_error"


def test_text_that_is_not_unicode_gets_a_400_and_the_connection_stays_usable(server):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    bodies = [("/v1/chat/completions", {"model": "a", "messages": [{"role": "user", "content": "hi \ud800"}]}),
              ("/v1/completions", {"model": "a", "prompt": "x\udfff", "max_tokens": 2}),
              ("/invocations", {"model": "a", "messages": [{"role": "user", "content": [
                  {"type": "text", "text": "\ud83d"}]}]})]
    with httpx.Client(base_url=server[1], headers=headers, timeout=60) as http:  # one keep-alive connection
        for path, body in bodies:
            response = http.post(path, content=json.dumps(body).encode())  # valid JSON: "\ud800" escapes
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert set(error) == ERROR_FIELDS and error["code"] == "invalid_value"
            assert "not valid Unicode" in error["message"] and "\\ud" in error["message"]
            ok = http.post("/v1/completions", json={"model": "a", "prompt": PROMPT, "max_tokens": 2})
            assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def fuzzed_bodies(count: int, seed: int = 0):
    """``count`` (path, raw body) pairs: mostly malformed, some by chance valid; types, encodings,
    sizes and nesting varied field by field."""
    import random

    rng = random.Random(seed)
    odd = [None, True, False, 0, -1, 7, 1.5, -2.5, 1e308, 2 ** 70, "", "x", "x" * 3000, "\ud800", "a\udfffb",
           "\u0000", "🙂" * 50, [], {}, [[[]]], {"a": {"b": {"c": []}}}, ["a", 1, None], [{"type": "text"}]]

    def nested(depth):
        return [nested(depth - 1)] if depth else rng.choice(odd)

    def value():
        return nested(rng.randint(1, 40)) if rng.random() < 0.1 else rng.choice(odd)

    for _ in range(count):
        path = rng.choice(["/v1/completions", "/v1/chat/completions", "/invocations"])
        roll = rng.random()
        if roll < 0.15:  # not JSON, not UTF-8, too deep, truncated
            yield path, rng.choice([b"\xff\xfe\x00", b"{", b"[" * 100000, b'{"prompt": "x"', b"\x00" * 64,
                                    "{\"prompt\": \"\u00e9\"}".encode("latin-1"), b"null", b"1e999"])
            continue
        chat = path == "/v1/chat/completions" or (path == "/invocations" and rng.random() < 0.5)
        body = ({"model": "a", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2} if chat
                else {"model": "a", "prompt": "hello", "max_tokens": 2})
        keys = ["model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "stream_options",
                "max_completion_tokens", "logprobs", "user", "extra"] + (["messages"] if chat else ["prompt"])
        for key in rng.sample(keys, rng.randint(1, 3)):
            body[key] = value()
        if chat and isinstance(body.get("messages"), list) and body["messages"] and rng.random() < 0.5:
            message = dict(body["messages"][0]) if isinstance(body["messages"][0], dict) else {}
            message[rng.choice(["role", "content", "name"])] = rng.choice(
                [value(), [{"type": "text", "text": value()}], [{"type": "image_url", "image_url": value()}],
                 "assistant", "developer", "robot"])
            body["messages"] = [message]
        yield path, json.dumps(body, allow_nan=True).encode()


def test_fuzzed_malformed_bodies_never_get_a_5xx_and_the_server_stays_healthy(server):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    statuses = {}
    with httpx.Client(base_url=server[1], headers=headers, timeout=60) as http:
        for path, raw in fuzzed_bodies(300):
            response = http.post(path, content=raw)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            assert response.status_code < 500, (path, raw[:300], response.text[:500])
            if response.status_code >= 400:
                error = response.json()["error"]
                assert set(error) == ERROR_FIELDS and error["message"], response.text
        assert sum(n for code, n in statuses.items() if code >= 400) >= 200, statuses  # mostly malformed
        assert http.get("/health").json()["status"] == "ok"
        ok = http.post("/v1/completions", json={"model": "a", "prompt": PROMPT, "max_tokens": 2})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_sagemaker_ping_and_invocations(client, server):
    assert httpx.get(f"{server[1]}/ping").status_code == 200
    messages = [{"role": "user", "content": "Hi"}]
    response = httpx.post(f"{server[1]}/invocations", headers={"Authorization": f"Bearer {KEY}"},
                          json={"messages": messages, "max_tokens": 6, "temperature": 0})
    assert response.status_code == 200 and response.json()["model"] == "tuned"  # the first adapter
    direct = client.chat.completions.create(model="tuned", messages=messages, max_tokens=6, temperature=0)
    assert response.json()["choices"][0]["message"]["content"] == direct.choices[0].message.content


def test_metrics_count_requests_tokens_and_batches(client, server):
    before = _metric(server, 'pipeline_requests_total{path="/v1/completions",status="200"}')
    complete(client, "a", max_tokens=3)
    assert _metric(server, 'pipeline_requests_total{path="/v1/completions",status="200"}') == before + 1
    assert _metric(server, 'pipeline_tokens_total{kind="completion"}') >= 3
    assert _metric(server, 'pipeline_request_seconds_count{path="/v1/completions"}') >= before + 1


def _metric(server, name: str) -> float:
    for line in httpx.get(f"{server[1]}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_a_failing_request_fails_alone_and_close_finishes_queued_work(server):
    from pipeline.server.engine import Engine, Failure, Finish, GenerationRequest

    pool = server[0].state.service.pool
    engine = Engine(pool, max_batch_size=8, max_wait_s=0.2)  # the server's engine stays idle meanwhile
    events = {"good": [], "bad": [], "late": []}
    good_ids = pool.tokenizer(PROMPT)["input_ids"]
    engine.start()
    engine.submit(GenerationRequest("a", good_ids, events["good"].append, max_tokens=4))
    engine.submit(GenerationRequest("a", [10 ** 8], events["bad"].append, max_tokens=4))  # no such token
    engine.submit(GenerationRequest("b", good_ids, events["late"].append, max_tokens=4))
    engine.close(timeout=60)  # returns only after the queue is drained
    assert isinstance(events["bad"][-1], Failure) and "generation failed" in events["bad"][-1].message
    for name in ("good", "late"):
        assert isinstance(events[name][-1], Finish) and events[name][-1].completion_tokens == 4


def test_serve_settings_are_checked_before_loading(tmp_path, adapters):
    cfg = compose_serve(["model=tiny_llama", "server.port=0", "server.max_batch_size=0",
                         f"run={adapters['run']}", f"adapters={{tuned: {adapters['a']}}}"], tmp_path)
    with pytest.raises(ConfigError) as err:
        typed_config(cfg, plan.problems)  # what pipeline.serve does first
    for fragment in ("server.port=0", "server.max_batch_size=0", "run_name='tuned' is also in adapters"):
        assert fragment in str(err.value)
    assert len(err.value.problems) == 3
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose_serve(["server.prot=1"], tmp_path)  # a typo fails at composition


def test_vllm_engine_serves_the_same_names_and_refuses_what_it_cannot(tmp_path, adapters, tiny_folder,
                                                                      monkeypatch):
    """server.engine=vllm: the `vllm serve` arguments, and every refusal before anything starts."""
    monkeypatch.setenv("PIPELINE_API_KEY", KEY)
    args = vllm_arguments(compose_serve(["model=tiny_llama", "server.engine=vllm", "server.port=8123",
                                         f"run={adapters['run']}", f"adapters={{a: {adapters['a']}}}",
                                         "server.vllm_args=[--max-num-seqs,4]"], tmp_path))
    assert args[:5] == [tiny_folder, "--dtype", "float32", "--served-model-name", "tiny_llama"]
    modules = args[args.index("--lora-modules") + 1:args.index("--host")]
    assert modules == [f"tuned={(adapters['run'] / 'adapter').resolve()}", f"a={Path(adapters['a']).resolve()}"]
    assert args[args.index("--max-lora-rank") + 1] == "8" and args[args.index("--max-loras") + 1] == "3"
    assert args[-6:] == ["--port", "8123", "--uvicorn-log-level", "info", "--max-num-seqs", "4"]
    assert KEY not in " ".join(args)  # the key travels in vLLM's environment only

    qlora = make_run(tmp_path / "qrun", adapters["a"], ["adapter=qlora"])
    with pytest.raises(VllmError) as err:
        vllm_arguments(compose_serve(["model=tiny_llama", "server.engine=vllm", f"run={qlora}",
                                      f"adapters={{bn: {adapters['bn']}}}"], tmp_path))
    assert "tuned was trained on a 4-bit base (QLoRA)" in str(err.value)
    assert "vLLM serves LoRA adapters only, and this one is BOTTLENECK" in str(err.value)
    gpt2 = make_run(tmp_path / "gpt2run", adapters["a"], ["model=tiny_gpt2"])
    with pytest.raises(VllmError, match="trained on model tiny_gpt2 .* but the server's base is"):
        vllm_arguments(compose_serve(["model=tiny_llama", "server.engine=vllm",
                                      f"adapters={{g: {gpt2}}}"], tmp_path))


@pytest.mark.slow
def test_load_500_requests_16_concurrent(server):
    import asyncio

    async def main():
        client = openai.AsyncOpenAI(base_url=f"{server[1]}/v1", api_key=KEY, max_retries=0)
        gate = asyncio.Semaphore(16)
        models = ["tiny_llama", "tuned", "a", "b"]

        async def one(i: int):
            async with gate:
                start = time.perf_counter()
                try:
                    await client.completions.create(model=models[i % 4], prompt=f"{PROMPT} {i}",
                                                    max_tokens=4, temperature=0)
                    status = 200
                except openai.APIStatusError as err:
                    status = err.status_code
                return status, time.perf_counter() - start

        return await asyncio.gather(*(one(i) for i in range(500)))

    results = asyncio.run(main())
    latencies = sorted(seconds for _, seconds in results)
    statuses = [status for status, _ in results]
    p50, p99 = statistics.median(latencies), latencies[int(0.99 * len(latencies)) - 1]
    print(f"\n500 requests, 16 concurrent: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
          f"statuses {sorted(set(statuses))}")
    assert all(status < 500 for status in statuses)
    assert statuses.count(200) == 500


def test_sigterm_finishes_requests_in_flight_then_exits(tmp_path):
    # The real thing: `python -m pipeline.serve` in its own process, stopped by SIGTERM (what
    # SLURM, Kubernetes and systemd send) while it generates.
    import os
    import signal
    import subprocess
    import sys

    port = free_port()
    env = {**os.environ, "PYTHONPATH": python_path()}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.serve", "model=tiny_llama", f"server.port={port}",
                             f"paths.output_dir={tmp_path}"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:] if proc.poll() else "slow start"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=120)
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(complete, client, "tiny_llama", max_tokens=24)
            while "pipeline_batch_rows_count 0" in httpx.get(url + "/metrics", timeout=10).text:
                time.sleep(0.01)  # until generation has started
            proc.send_signal(signal.SIGTERM)
            response = pending.result(timeout=120)
        assert response.usage.completion_tokens == 24 and response.choices[0].finish_reason == "length"
        output, _ = proc.communicate(timeout=60)
        # uvicorn shuts down gracefully, then exits by the signal it got (as a shell expects)
        assert proc.returncode in (0, -signal.SIGTERM), output[-3000:]
        assert "Application shutdown complete" in output and "Traceback" not in output
        assert "Callback RunFolderCheck" not in output, output[:2000]  # it ran, without a warning
        with pytest.raises(openai.APIConnectionError):  # it no longer listens
            complete(client, "tiny_llama")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_serve_config_is_typed_and_its_engine_a_checked_choice(tmp_path):
    from hydra.errors import ConfigCompositionException

    typed = typed_config(compose_serve(["model=tiny_llama", "server.engine=vllm"], tmp_path))
    assert isinstance(typed, ServeConfig) and isinstance(typed.server, ServerConfig)
    assert isinstance(typed.model, ModelConfig) and typed.server.engine == "vllm"
    with pytest.raises(ConfigCompositionException) as err:
        compose_serve(["model=tiny_llama", "server.engine=vlm"], tmp_path)
    assert "Invalid value 'vlm', expected one of [builtin, vllm]" in str(err.value.__cause__)
