"""A short check on CUDA: QLoRA, LoRA and full fine-tuning for a few bf16 steps each, then
ZeRO-2 vs ZeRO-3 when several GPUs are visible. Prints peak GPU memory and tokens/s per run.

    python benchmarks/gpu_check.py                     # default model (SmolLM2-135M), 10 steps
    python benchmarks/gpu_check.py --steps 20 model=hub model.path=/models/llama-3-8b

Each run is ``python -m pipeline.train`` in its own process (its own peak memory), evaluation
off. Without CUDA it says so and exits 0: there is nothing to measure.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"qlora": ["adapter=qlora", "adapter.compute_dtype=bfloat16"], "lora": ["adapter=lora"],
           "full": ["adapter=full", "trainer.learning_rate=2e-5"]}


def run(name: str, overrides: list, steps: int, out: Path) -> dict:
    run_dir = out / name
    cmd = [sys.executable, "-m", "pipeline.train", "trainer.precision=bf16", "model.dtype=bfloat16",
           f"trainer.max_steps={steps}", "trainer.save_steps=null", "trainer.logging_steps=1",
           "data.validation_size=0", "data.test_size=0", "evaluation.splits=[]", "evaluation.metrics=[]",
           "objective.metric=train/loss", "logger=none", "trainer.sampling=sequential",
           f"hydra.run.dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"
        return {"error": tail}
    return json.loads((run_dir / "metrics.json").read_text())


def plan(gpus: int) -> dict:
    """Runs to make: every method on one GPU; with several, LoRA and full under ZeRO-2 and ZeRO-3."""
    runs = {f"{m} (1 GPU)": o for m, o in METHODS.items()}
    if gpus > 1:
        for method in ("lora", "full"):
            for stage in ("zero2", "zero3"):
                runs[f"{method} {stage} x{gpus}"] = [*METHODS[method], f"distributed={stage}",
                                                      f"distributed.nproc_per_node={gpus}"]
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible; nothing to measure (skipped).")
        return 0
    gpus = torch.cuda.device_count()
    print(f"gpu_check: {gpus} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
          f"{args.steps} steps per run")
    with tempfile.TemporaryDirectory() as tmp:
        results = {name: run(name, [*o, *args.overrides], args.steps, Path(tmp))
                   for name, o in plan(gpus).items()}
    print("| run | trainable | tokens/s | peak GPU MiB (rank 0) | final loss |")
    print("|---|---:|---:|---:|---:|")
    failed = 0
    for name, m in results.items():
        if "error" in m:
            failed += 1
            print(f"| {name} | failed: {m['error']} ||||")
            continue
        print(f"| {name} | {m['params/trainable']:,} | {m['perf/train_tokens_per_s']:.0f} | "
              f"{m.get('perf/peak_cuda_mb', float('nan')):.0f} | {m['train/loss']:.4f} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
