"""Memory and speed on CUDA, against the memory estimator: full fine-tuning, LoRA, QLoRA (4-bit)
and QLoRA with gradient checkpointing, on Llama 3.1 8B's and Llama 3.2 1B's shapes (random
weights, `model=synthetic_llama_8b|1b`) and the embedded default; then packing on vs off and the
attention kernels (sdpa, eager, flash-attention 2 when it is installed) on the 1B shape; ZeRO-2
vs ZeRO-3 when several GPUs are visible. One table, and a JSON line at the end.

    python benchmarks/gpu_check.py                                  # everything (~8 min on an H200)
    python benchmarks/gpu_check.py --models synthetic_llama_1b --steps 6 --budget-min 4
    python benchmarks/gpu_check.py --dry-run                        # the plan and the estimates, no GPU needed
    python -m pytest -m gpu                                         # the GPU tests

Each run is ``python -m pipeline.train`` in its own process (its own peak), bf16 weights and
autocast, ``--steps`` steps of 4 sequences on generated text of 64-960 words (up to 1,024
tokens), no evaluation, no checkpoints. Columns:

* tokens/s: the run's training tokens per second (first step included);
* estimate: ``pipeline.estimate``'s model states for the same overrides (weights, gradients,
  optimizer states; activations are not part of it);
* model states: measured, the memory allocated just before an optimizer step (from the second
  one on), when backward has freed the activations and the optimizer holds its states;
* peak: ``torch.cuda.max_memory_allocated`` over the run; activations = peak - model states;
* gap: estimate vs measured model states.

Random weights are built once into the model cache (on the GPU, in bf16) before any run is
timed. Without CUDA the script says so and exits 0, unless ``--dry-run``.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GiB = 2**30
METHODS = {"full": ["adapter=full", "trainer.learning_rate=2e-5"],
           "lora": ["adapter=lora"],
           "qlora": ["adapter=qlora", "adapter.compute_dtype=bfloat16"],
           "qlora + GC": ["adapter=qlora", "adapter.compute_dtype=bfloat16", "model.gradient_checkpointing=true"]}
MODELS = ["synthetic_llama_8b", "synthetic_llama_1b", "smollm2_135m"]
WORDS = ("model data train adapter rank alpha learning rate memory token batch layer weight "
         "gradient optimizer state sweep trial prune report serve export quantize bottleneck "
         "attention kernel sequence packing throughput device cluster node process").split()


def write_data(path: Path, rows: int = 400, seed: int = 0) -> Path:
    """Prompt/completion pairs of 64-960 words: lengths vary, as real instruction data does."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(rows):
            n = rng.randint(64, 960)
            words = [rng.choice(WORDS) for _ in range(n)]
            cut = max(1, n // 4)
            f.write(json.dumps({"prompt": " ".join(words[:cut]), "completion": " ".join(words[cut:])}) + "\n")
    return path


def common(data: Path, steps: int) -> list:
    return ["data=my_jsonl", f"data.path={data}", "data.max_length=1024", "data.pack_length=1024",
            "data.validation_size=0", "data.test_size=0", "evaluation.splits=[]", "evaluation.metrics=[]",
            "objective.metric=train/loss", "logger=none", "trainer.precision=bf16", "model.dtype=bfloat16",
            f"trainer.max_steps={steps}", "trainer.save_steps=null", "trainer.logging_steps=1",
            "trainer.per_device_train_batch_size=4", "trainer.sampling=sequential"]


def plan(models: list, gpus: int, flash: bool) -> dict:
    """Name -> (model, overrides), in the order they run (the most telling first)."""
    runs = {}
    for model in models:
        for method, overrides in METHODS.items():
            runs[f"{model} {method}"] = (model, overrides)
    probe = "synthetic_llama_1b" if "synthetic_llama_1b" in models else models[0]
    runs[f"{probe} lora, packed"] = (probe, ["adapter=lora", "data.packing=true"])
    runs[f"{probe} lora, eager attention"] = (probe, ["adapter=lora", "model.attn_implementation=eager"])
    if flash:
        runs[f"{probe} lora, flash-attention 2"] = (probe, ["adapter=lora",
                                                            "model.attn_implementation=flash_attention_2"])
    if gpus > 1:
        for method in ("lora", "full"):
            for stage in ("zero2", "zero3"):
                runs[f"{probe} {method} {stage} x{gpus}"] = (probe, [*METHODS[method], f"distributed={stage}",
                                                                     f"distributed.nproc_per_node={gpus}"])
    return runs


def build(model: str) -> Tuple[float, str]:
    """Builds a random model's weights into the cache in a process of its own: (seconds, error
    or "")."""
    started = time.time()
    code = ("import sys; from pipeline.commands.compose import compose_train; "
            "from pipeline.model import loading; cfg = compose_train(sys.argv[1:]); "
            "loading.resolve_folder(cfg.model, cfg.paths.cache_dir, cfg.data.seed)")
    proc = subprocess.run([sys.executable, "-c", code, f"model={model}"], cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    error = "" if proc.returncode == 0 else f"building {model}: " + (lines[-1][:160] if lines else "failed")
    return time.time() - started, error


def run(name: str, overrides: list, out: Path) -> dict:
    run_dir = out / name.replace(" ", "_").replace(",", "").replace("+", "")
    proc = subprocess.run([sys.executable, "-m", "pipeline.train", f"hydra.run.dir={run_dir}", *overrides],
                          cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        return {"error": lines[-1][:200] if lines else f"exit {proc.returncode}"}
    return json.loads((run_dir / "metrics.json").read_text())


def predicted_gib(overrides: list) -> float:
    from pipeline.estimate import predict

    return predict(overrides).total / GiB


def row(name: str, m: dict, predicted: float) -> str:
    if "error" in m:
        return f"| {name} | failed: {m['error']} | | {predicted:.2f} | | | | |"
    states = m.get("perf/model_state_cuda_mb", float("nan")) / 1024
    peak = m.get("perf/peak_cuda_mb", float("nan")) / 1024
    gap = (predicted - states) / states if states == states and states else float("nan")
    return (f"| {name} | {m['params/trainable']:,} | {m['perf/train_tokens_per_s']:,.0f} | {predicted:.2f} | "
            f"{states:.2f} | {gap:+.1%} | {peak:.2f} | {peak - states:.2f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--budget-min", type=float, default=8.0,
                        help="launch no new run after this many minutes (what ran is reported)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the estimates only")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()
    import importlib.util

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print("gpu_check: no CUDA device visible; nothing to measure (skipped). --dry-run prints the plan.")
        return 0
    gpus = torch.cuda.device_count() if cuda else 1
    runs = plan(args.models, gpus, flash=importlib.util.find_spec("flash_attn") is not None)
    device = f"{gpus} x {torch.cuda.get_device_name(0)}" if cuda else "no GPU (dry run)"
    print(f"gpu_check: {device}, torch {torch.__version__}, {args.steps} steps of 4 sequences per run")
    started, results, built = time.time(), {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        data = write_data(Path(tmp) / "data.jsonl")
        base = common(data, args.steps)
        predictions = {name: predicted_gib([f"model={model}", *base, *o, *args.overrides])
                       for name, (model, o) in runs.items()}
        for name, (model, overrides) in runs.items():
            if args.dry_run:
                results[name] = {"error": "dry run"}
                continue
            if time.time() - started > args.budget_min * 60:
                results[name] = {"error": f"not run: over --budget-min {args.budget_min:g}"}
                continue
            if model.startswith("synthetic") and model not in built:
                built[model] = build(model)
            if built.get(model, (0, ""))[1]:
                results[name] = {"error": built[model][1]}
            else:
                results[name] = run(name, [f"model={model}", *base, *overrides, *args.overrides], Path(tmp))
            print(row(name, results[name], predictions[name]), flush=True)
    print(f"\nrandom weights built in: {', '.join(f'{k} {v[0]:.0f} s' for k, v in built.items()) or 'none'}; "
          f"{(time.time() - started) / 60:.1f} min in all")
    print("| run | trainable | tokens/s | estimate GiB | model states GiB | gap | peak GiB | activations GiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, m in results.items():
        print(row(name, m, predictions[name]))
    print(json.dumps({"device": device, "steps": args.steps, "results": {
        name: {"predicted_gib": predictions[name], **{k: v for k, v in m.items()
                                                      if k.startswith(("perf/", "params/")) or k == "error"}}
        for name, m in results.items()}}))
    return 1 if any("error" in m and not m["error"].startswith(("not run", "dry run")) for m in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
