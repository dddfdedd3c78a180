"""Training cost of each adapter method on the same model, data and batch, measured in one run.

    python benchmarks/method_throughput.py                      # default model, 4 steps each
    python benchmarks/method_throughput.py model=tiny_llama --steps 8

Each method runs through `python -m pipeline.train` (a fresh process, so peak memory is its
own) with evaluation off; the table shows trainable parameters, training tokens/s, peak RSS and
adapter size, and tokens/s as a ratio of LoRA's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def trained_methods() -> list:
    """Every registered method that trains (``none`` does not)."""
    from pipeline.adapters.registry import ADAPTERS

    return [name for name, settings in sorted(ADAPTERS.items()) if settings.trains]


def run(method: str, steps: int, overrides: list, out: Path) -> dict:
    run_dir = out / method
    cmd = [sys.executable, "-m", "pipeline.train", f"adapter={method}", f"trainer.max_steps={steps}",
           "trainer.save_steps=null", "trainer.logging_steps=1", "data.validation_size=0",
           "data.test_size=0", "evaluation.splits=[]", "evaluation.metrics=[]",
           "objective.metric=train/loss", "logger=none",
           "trainer.sampling=sequential", f"hydra.run.dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads((run_dir / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--methods", default=",".join(trained_methods()))
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {m: run(m, args.steps, args.overrides, Path(tmp)) for m in args.methods.split(",")}
    lora_speed = results.get("lora", {}).get("perf/train_tokens_per_s")
    print("| method | trainable | trainable % | tokens/s | vs lora | peak RSS MB | artifact MB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for method, m in results.items():
        if "error" in m:
            print(f"| {method} | failed: {m['error']} |||||")
            continue
        speed = m["perf/train_tokens_per_s"]
        ratio = f"{speed / lora_speed:.2f}x" if lora_speed else "-"
        print(f"| {method} | {m['params/trainable']:,} | {m['params/trainable_pct']:.3f} | "
              f"{speed:.1f} | {ratio} | {m['perf/peak_rss_mb']:.0f} | {m.get('perf/artifact_mb', 0):.1f} |")


if __name__ == "__main__":
    main()
