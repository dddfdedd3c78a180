"""Start-up cost: command to first training step, next to bare imports, measured in one run.

    python benchmarks/startup.py                 # 3 rounds (~2-3 min on 2 CPU cores)
    python benchmarks/startup.py --rounds 10

The contenders run as fresh processes, interleaved round by round (so load drift hits them
alike); the figure of each is its median over the rounds:

- ``python -c "import torch"`` and ``python -c "import transformers, peft"``: the floor any
  training script pays;
- ``python -m pipeline.train --help`` and a config error (``trainer.learning_rate=-1``): these
  must import no torch, so they should cost a fraction of the above;
- ``python -m pipeline.train model=tiny_llama debug=fast``: from launching the command to the
  moment its first training step begins, as the run itself records it (``first_step_at`` in
  run.json, written by a Trainer callback at ``on_step_begin`` of the first step). Start-up
  includes the tiny model's data, model and the base model's evaluation (losses and
  generation), which the pipeline measures before training.

The last line is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list, env: dict) -> float:
    """Wall seconds of a command that must succeed."""
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return time.time() - start


def config_error(env: dict, run_dir: Path) -> float:
    """Wall seconds of a run stopped by validation (exit code 1 is the expected outcome)."""
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "pipeline.train", "model=tiny_llama", "debug=fast",
                           "trainer.learning_rate=-1", f"hydra.run.dir={run_dir}"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 1 or "trainer.learning_rate" not in proc.stderr:
        raise RuntimeError(f"the config error run did not fail as expected:\n{proc.stderr[-2000:]}")
    return time.time() - start


def first_step(env: dict, run_dir: Path) -> dict:
    """Seconds from launching the debug=fast run to its first training step, and in all."""
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "pipeline.train", "model=tiny_llama", "debug=fast",
                           f"hydra.run.dir={run_dir}"], cwd=ROOT, env=env, capture_output=True, text=True)
    total = time.time() - start
    if proc.returncode != 0:
        raise RuntimeError(f"the debug=fast run failed:\n{proc.stderr[-2000:]}")
    info = json.loads((run_dir / "run.json").read_text())
    return {"first_step": info["first_step_at"] - start, "total": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "WANDB_SILENT": "true", "PYTHONPATH": path}
    names = ["import torch", "import transformers, peft", "pipeline.train --help",
             "pipeline.train config error", "debug=fast: first step", "debug=fast: whole run"]
    times = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        timed([sys.executable, "-m", "pipeline.train", "--help"], env)  # warm the file cache
        for r in range(args.rounds):
            times["import torch"].append(timed([sys.executable, "-c", "import torch"], env))
            times["import transformers, peft"].append(
                timed([sys.executable, "-c", "import transformers, peft"], env))
            times["pipeline.train --help"].append(
                timed([sys.executable, "-m", "pipeline.train", "--help"], env))
            times["pipeline.train config error"].append(config_error(env, Path(tmp) / f"bad{r}"))
            fast = first_step(env, Path(tmp) / f"fast{r}")
            times["debug=fast: first step"].append(fast["first_step"])
            times["debug=fast: whole run"].append(fast["total"])
            print(f"round {r + 1}: " + ", ".join(f"{n} {v[-1]:.2f}s" for n, v in times.items()),
                  flush=True)
    median = {name: statistics.median(v) for name, v in times.items()}
    floor = median["import transformers, peft"]
    print("\n| command | median s | vs `import transformers, peft` |")
    print("|---|---:|---:|")
    for name in names:
        print(f"| {name} | {median[name]:.2f} | {median[name] / floor:.2f}x |")
    print(json.dumps({"benchmark": "startup", "rounds": args.rounds,
                      "median_s": {k: round(v, 3) for k, v in median.items()},
                      "first_step_over_import_transformers_peft": round(median["debug=fast: first step"] / floor, 2)}))


if __name__ == "__main__":
    main()
