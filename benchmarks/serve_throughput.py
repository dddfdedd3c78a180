"""Serving throughput: the OpenAI-compatible server with 1 and with 8 concurrent clients, vs
in-process batched ``model.generate`` (the ceiling), on the default model with a LoRA adapter.

    python benchmarks/serve_throughput.py                       # 32 requests, 32 tokens, greedy
    python benchmarks/serve_throughput.py --requests 48 --max-tokens 32 --concurrency 8
    python benchmarks/serve_throughput.py --max-wait-ms 10 50 100 --rounds 3

The concurrent-client mode runs once per ``server.max_wait_ms`` setting in each of ``--rounds``
alternating rounds (one server per setting over the same loaded model), so the settings are
compared side by side in one run.

Every mode generates the same prompts (django_en_fr test prompts) with the same adapter and
greedy decoding, up to ``--max-tokens`` new tokens or EOS; tokens/s counts the generated tokens
(the server's usage counts, EOS excluded, for the clients; the same count for the ceiling).
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List

import torch

from pipeline.config.app_schema import ServerConfig
from pipeline.config.options import load_option
from pipeline.data.splits import build_datasets
from pipeline.model import loading


def fresh_lora(folder: str, path: Path) -> Path:
    """A LoRA adapter (r=8, q/v) with a small random B: it changes the outputs a little."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(folder),
                           LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.01)
    model.save_pretrained(path)
    return path


def ceiling(pool, prompts: List[str], max_tokens: int, batch_size: int) -> int:
    """In-process left-padded batched greedy generation; returns generated tokens (EOS excluded)."""
    from pipeline.server.pool import ModelPool

    tokenizer, eos = pool.tokenizer, pool.tokenizer.eos_token_id
    tokenizer.padding_side = "left"
    tokens = 0
    with torch.inference_mode(), ModelPool.activate(pool.choices["tuned"]) as model:
        for start in range(0, len(prompts), batch_size):
            encoded = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True)
            out = model.generate(**encoded, max_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)[:, encoded["input_ids"].shape[1]:]
            for row in out.tolist():
                tokens += row.index(eos) if eos in row else len(row)
    tokenizer.padding_side = "right"
    return tokens


def clients(url: str, prompts: List[str], max_tokens: int, concurrency: int) -> int:
    """Sends every prompt through ``concurrency`` openai clients; returns completion tokens."""
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key="unused", max_retries=0)

    def one(prompt: str) -> int:
        response = client.completions.create(model="tuned", prompt=prompt, max_tokens=max_tokens,
                                             temperature=0)
        return response.usage.completion_tokens

    with ThreadPoolExecutor(concurrency) as workers:
        return sum(workers.map(one, prompts))


def batch_rows(url: str) -> tuple:
    """(rows generated, generate calls) so far, from the server's /metrics."""
    import httpx

    values = dict(line.rsplit(" ", 1) for line in httpx.get(url.replace("/v1", "/metrics")).text.splitlines()
                  if line.startswith("pipeline_batch_rows_"))
    return float(values["pipeline_batch_rows_sum"]), float(values["pipeline_batch_rows_count"])


def timed(fn, *args) -> tuple:
    start = time.perf_counter()
    tokens = fn(*args)
    return tokens, time.perf_counter() - start


def start_server(pool, args, max_wait_ms: float) -> tuple:
    """A server on a free port over ``pool`` with its own engine; returns (server, url)."""
    import uvicorn

    from pipeline.server.app import create_app

    server_cfg = ServerConfig(max_batch_size=args.concurrency, max_wait_ms=max_wait_ms,
                              max_tokens_limit=args.max_tokens, default_max_tokens=args.max_tokens)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(pool, server_cfg, None), host="127.0.0.1",
                                           port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}/v1"


def default_pool(count: int, tmp: Path) -> tuple:
    """(model config, adapter folder, ``count`` django_en_fr test prompts, a model pool serving the
    default model with a fresh LoRA adapter as ``tuned``)."""
    from pipeline.server.pool import ModelPool, Source

    cache = os.environ.get("PIPELINE_CACHE_DIR", "~/.cache/pipeline")
    model_cfg = load_option("model", "smollm2_135m")
    folder = loading.resolve_folder(model_cfg, cache)
    tokenizer = loading.load_tokenizer(folder, model_cfg)
    data_cfg = load_option("data", "django_en_fr", seed=0, validation_size=0.0,
                           test_size=float(count), max_length=256)
    prompts = list(build_datasets(data_cfg, tokenizer).test["prompt"])[:count]
    adapter = fresh_lora(folder, tmp / "lora")
    pool = ModelPool(model_cfg, model_cfg.name, [Source("tuned", model_cfg, adapter)], cache, 0)
    return model_cfg, adapter, prompts, pool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, nargs="+", default=[10.0, 100.0],
                        help="server.max_wait_ms settings compared side by side (concurrent clients)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per setting")
    args = parser.parse_args()

    model_cfg, _, prompts, pool = default_pool(args.requests, Path(tempfile.mkdtemp()))
    # One server (and engine) per setting over the same loaded model; only one works at a time.
    servers = {wait: start_server(pool, args, wait) for wait in args.max_wait_ms}
    first_url = servers[args.max_wait_ms[0]][1]
    for _, url in servers.values():
        clients(url, prompts[:2], 4, 1)  # warm-up

    results = {"in-process generate, batch 8 (ceiling)": [timed(ceiling, pool, prompts, args.max_tokens, 8)],
               f"server, 1 client (max_wait_ms={args.max_wait_ms[0]:g})":
                   [timed(clients, first_url, prompts, args.max_tokens, 1)]}
    batches = {wait: [0.0, 0.0] for wait in args.max_wait_ms}
    for _ in range(args.rounds):  # alternating, so that load drift hits every setting alike
        for wait, (_, url) in servers.items():
            rows, calls = batch_rows(url)
            results.setdefault(f"server, {args.concurrency} concurrent clients (max_wait_ms={wait:g})", []).append(
                timed(clients, url, prompts, args.max_tokens, args.concurrency))
            rows_after, calls_after = batch_rows(url)
            batches[wait][0] += rows_after - rows
            batches[wait][1] += calls_after - calls
    for server, _ in servers.values():
        server.should_exit = True
    rates = {name: sum(t for t, _ in runs) / sum(s for _, s in runs) for name, runs in results.items()}
    ceiling_rate = rates["in-process generate, batch 8 (ceiling)"]
    single_rate = rates[f"server, 1 client (max_wait_ms={args.max_wait_ms[0]:g})"]
    print(f"model: {model_cfg.name} + LoRA r=8, {len(prompts)} requests, greedy, max_tokens "
          f"{args.max_tokens}, threads: {torch.get_num_threads()}, {args.rounds} alternating rounds")
    print("| mode | runs | tokens/s | vs 1 client | vs ceiling |\n|---|---:|---:|---:|---:|")
    for name, runs in results.items():
        print(f"| {name} | {len(runs)} | {rates[name]:.1f} | {rates[name] / single_rate:.2f}x | "
              f"{rates[name] / ceiling_rate:.2f}x |")
    for wait, (rows, calls) in batches.items():
        print(f"max_wait_ms={wait:g}, {args.concurrency} clients: {rows:.0f} requests in {calls:.0f} generate "
              f"calls (mean batch {rows / max(calls, 1):.1f})")


if __name__ == "__main__":
    main()
