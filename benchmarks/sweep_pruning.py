"""Compute that pruning saves in a sweep: the same sweep with its pruner and without.

    python benchmarks/sweep_pruning.py                          # tiny model, 10 trials, 12 steps
    python benchmarks/sweep_pruning.py --trials 20 --steps 40 --eval-steps 5 model=smollm2_135m

Both sweeps run `python -m pipeline.train -m sweep=<sweep>` with the same sampler and seed on the
same data; the second one with `sweep.pruner=null`. Training steps of a trial are its final step
(complete) or the step at which it was pruned. The sampler sees the pruned trials' last values,
so after the first pruning the two sweeps may sample different points: the comparison is of
whole sweeps (cost and best objective), not of trial pairs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

ROOT = Path(__file__).resolve().parents[1]


def run_sweep(name: str, out: Path, args: argparse.Namespace, extra: list) -> dict:
    cmd = [sys.executable, "-m", "pipeline.train", "-m", f"sweep={args.sweep}", f"sweep.name={name}",
           f"sweep.n_trials={args.trials}", "model=tiny_llama", "debug=fast", "evaluation=perplexity",
           "trainer.save_steps=null", f"trainer.max_steps={args.steps}",
           f"trainer.eval_steps={args.eval_steps}", f"paths.output_dir={out}", *args.overrides, *extra]
    started = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
    folder = out / "sweeps" / name
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{folder / 'study.db'}")
    steps, states = 0, {}
    for trial in study.trials:
        states[trial.state.name] = states.get(trial.state.name, 0) + 1
        if trial.state.name == "COMPLETE":
            steps += int(trial.user_attrs["metrics"]["train/steps"])
        elif trial.state.name == "PRUNED":
            steps += trial.last_step
    return {"steps": steps, "states": states, "best": study.best_value,
            "wall_s": time.time() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", default="lora_rank_alpha_lr")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--eval-steps", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every trial")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pruned = run_sweep("bench_pruned", Path(tmp), args, [])
        full = run_sweep("bench_unpruned", Path(tmp), args, ["sweep.pruner=null"])
    print(f"sweep={args.sweep}: {args.trials} trials x {args.steps} steps (evaluation every "
          f"{args.eval_steps}), same sampler seed")
    print("| run | trials | training steps | wall s | best objective |")
    print("|---|---|---:|---:|---:|")
    for label, r in (("with pruner", pruned), ("without", full)):
        states = ", ".join(f"{n} {s.lower()}" for s, n in sorted(r["states"].items()))
        print(f"| {label} | {states} | {r['steps']} | {r['wall_s']:.0f} | {r['best']:.5f} |")
    print(f"training steps with / without pruning: {pruned['steps'] / full['steps']:.2f} "
          f"(saved {1 - pruned['steps'] / full['steps']:.0%}); wall time ratio "
          f"{pruned['wall_s'] / full['wall_s']:.2f}; best objective difference "
          f"{pruned['best'] - full['best']:+.5f} ({(pruned['best'] - full['best']) / abs(full['best']):+.3%})")
    print(json.dumps({"pruned": pruned, "unpruned": full}))


if __name__ == "__main__":
    main()
