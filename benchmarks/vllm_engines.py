"""The built-in engine against vLLM, side by side in one run, on the default model with a LoRA
adapter: evaluation generation (``evaluation.engine``) and serving (``server.engine``).

    python benchmarks/vllm_engines.py                          # 64 prompts, 48 tokens, greedy
    python benchmarks/vllm_engines.py --prompts 128 --concurrency 16
    python benchmarks/vllm_engines.py --skip-serving             # the evaluation rows only

Needs vLLM's environment (``python -m pipeline.vllm_engine install``). Both engines run the
model in float32 (what ``pipeline.serve`` and the exported command use) on the same prompts
(django_en_fr test prompts) with greedy decoding up to ``--max-tokens`` or EOS.

- Evaluation: ``generation.generate`` (batched ``generate``, ``--batch-size``) against
  ``vllm_client.predict`` (a vLLM offline engine in its own process; its start-up is counted,
  as a run pays it). Also the number of identical outputs.
- Base and tuned (``pipeline.evaluate`` of a LoRA adapter): an engine per model (the tuned
  model's call above, then one for the base) against one engine generating for both (the base's
  prompts without the adapter), whole calls; the outputs must be identical.
- Serving (not with ``--skip-serving``): ``--concurrency`` openai clients against
  ``pipeline.serve`` (built-in, dynamic batching) and against vLLM's server started as
  ``server.engine=vllm`` starts it (start-up reported apart). tokens/s counts the completion
  tokens the servers report.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_throughput import clients, default_pool, start_server  # noqa: E402

from pipeline.config.schema import DecodingConfig  # noqa: E402
from pipeline.scoring import vllm_client  # noqa: E402
from pipeline.scoring.generation import generate  # noqa: E402


def wait_for(url: str, proc: subprocess.Popen, log: Path) -> None:
    import openai

    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=5)
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"vLLM exited:\n{log.read_text()[-3000:]}")
        try:
            client.models.list()
            return
        except openai.APIConnectionError:
            time.sleep(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16, help="the built-in evaluation's batch")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--skip-serving", action="store_true", help="only the evaluation rows")
    args = parser.parse_args()

    from pipeline.server.pool import ModelPool

    vllm_client.python()  # fails early, saying how to install it
    tmp = Path(tempfile.mkdtemp())
    model_cfg, adapter, prompts, pool = default_pool(args.prompts, tmp)
    folder, tokenizer = pool.base_folder, pool.tokenizer
    decoding = DecodingConfig(max_new_tokens=args.max_tokens, seed=0)
    rows = []

    with ModelPool.activate(pool.choices["tuned"]) as model:
        start = time.perf_counter()
        builtin = generate(model, tokenizer, prompts, decoding, args.batch_size)
        builtin_s = time.perf_counter() - start
        # What vllm_client.predict does, with the engine's own timings kept apart.
        start = time.perf_counter()
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        base, saved = vllm_client.on_disk(model, tmp)
        stops = vllm_client.stop_ids(tokenizer, model)
        call = time.perf_counter()
        generated = vllm_client.generate(base, "float32", [vllm_client.Job(ids, saved)], decoding, stops)
        call_s = time.perf_counter() - call
        theirs = [t.strip() for t in tokenizer.batch_decode(generated.outputs[0], skip_special_tokens=True)]
        vllm_s = time.perf_counter() - start
    tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in builtin)
    same = sum(a == b for a, b in zip(builtin, theirs))
    rows.append(("evaluation generation", f"transformers generate, batch {args.batch_size}", builtin_s,
                 tokens / builtin_s, "-"))
    rows.append(("evaluation generation", "vLLM offline engine, whole call (process, start-up)", vllm_s,
                 tokens / vllm_s, f"{same}/{len(prompts)} identical"))
    rows.append(("evaluation generation", f"vLLM offline engine, generation only (start-up "
                 f"{generated.start_s:.0f} s)", generated.generate_s, tokens / generated.generate_s, "-"))
    rows += base_and_tuned(folder, saved, ids, decoding, stops, generated.outputs[0], call_s)
    if args.skip_serving:
        return print_rows(rows, model_cfg, len(prompts), args)

    server, url = start_server(pool, argparse.Namespace(concurrency=args.concurrency,
                                                        max_tokens=args.max_tokens), 10.0)
    clients(url, prompts[:2], 4, 1)  # warm-up
    start = time.perf_counter()
    served = clients(url, prompts, args.max_tokens, args.concurrency)
    seconds = time.perf_counter() - start
    server.should_exit = True
    rows.append(("serving", f"pipeline.serve, {args.concurrency} clients", seconds, served / seconds, "-"))

    port = 8000 + os.getpid() % 1000
    vargs = vllm_client.serve_arguments(folder, "float32", {"tuned": adapter}, model_cfg.name)
    log = tmp / "vllm.log"
    start = time.perf_counter()
    proc = subprocess.Popen(vllm_client.worker_command("serve", *vargs, "--host", "127.0.0.1",
                                                       "--port", str(port)),
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        vurl = f"http://127.0.0.1:{port}/v1"
        wait_for(vurl, proc, log)
        startup = time.perf_counter() - start
        clients(vurl, prompts[:2], 4, 1)
        start = time.perf_counter()
        served = clients(vurl, prompts, args.max_tokens, args.concurrency)
        seconds = time.perf_counter() - start
    finally:
        proc.terminate()
        proc.wait(60)
    rows.append(("serving", f"vLLM server, {args.concurrency} clients (start-up {startup:.0f} s apart)",
                 seconds, served / seconds, "-"))

    print_rows(rows, model_cfg, len(prompts), args)


def base_and_tuned(folder: str, adapter: Path, ids: list, decoding, stops: list, tuned: list,
                   tuned_s: float) -> list:
    """``pipeline.evaluate`` of a LoRA adapter through vLLM: an engine per model (as a training
    run measures, before and after training: ``tuned`` and ``tuned_s`` are the tuned model's
    call, then the base gets its own) against one engine for both, whole calls."""
    start = time.perf_counter()
    base = vllm_client.generate(folder, "float32", [vllm_client.Job(ids)], decoding, stops).outputs[0]
    apart, apart_s = [tuned, base], tuned_s + time.perf_counter() - start
    start = time.perf_counter()
    together = vllm_client.generate(folder, "float32", [vllm_client.Job(ids, adapter), vllm_client.Job(ids)],
                                    decoding, stops).outputs
    together_s = time.perf_counter() - start
    same = sum(a == b for x, y in zip(apart, together) for a, b in zip(x, y))
    tokens = sum(len(o) for outputs in apart for o in outputs)
    return [("base and tuned generation", "vLLM, an engine per model", apart_s, tokens / apart_s, "-"),
            ("base and tuned generation", "vLLM, one engine for both", together_s, tokens / together_s,
             f"{same}/{2 * len(ids)} identical")]


def print_rows(rows: list, model_cfg, prompts: int, args) -> None:
    print(f"model: {model_cfg.name} + LoRA r=8, float32, {prompts} prompts, greedy, max "
          f"{args.max_tokens} new tokens, torch threads {torch.get_num_threads()}, "
          f"CUDA: {torch.cuda.is_available()}")
    print("| task | engine | seconds | tokens/s | outputs |\n|---|---|---:|---:|---|")
    for task, engine, seconds, rate, note in rows:
        print(f"| {task} | {engine} | {seconds:.1f} | {rate:.1f} | {note} |")
    print(f"vLLM / built-in tokens/s: evaluation {rows[1][3] / rows[0][3]:.2f}x whole call, "
          f"{rows[2][3] / rows[0][3]:.2f}x generation only; base and tuned: one engine "
          f"{rows[3][2] / rows[4][2]:.2f}x faster than an engine per model"
          + (f"; serving {rows[6][3] / rows[5][3]:.2f}x" if len(rows) > 5 else ""))


if __name__ == "__main__":
    main()
