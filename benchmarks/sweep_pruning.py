"""What pruning buys a sweep: the shipped sweep with its pruner and without, same wall-clock budget.

    python benchmarks/sweep_pruning.py                               # embedded default, 30 min each
    python benchmarks/sweep_pruning.py --budget-min 12
    python benchmarks/sweep_pruning.py --budget-min 2 model=tiny_llama debug=fast   # a smoke test
    python benchmarks/sweep_pruning.py --pruner '{_target_: optuna.pruners.SuccessiveHalvingPruner, min_resource: 5, reduction_factor: 4}' --baseline earlier.json
    python benchmarks/sweep_pruning.py --seeds 4      # best trials and default config over 4 seeds

Both sweeps run `python -m pipeline.train -m sweep=<sweep> sweep.timeout_min=<budget>` with the
same sampler seed on the same data, everything else as shipped; the second with
`sweep.pruner=null trainer.eval_steps=null` (without a pruner, evaluations during training would
buy nothing). Each has its own base-measurement cache, so each pays for measuring the base
once. Then the default config (`python -m pipeline.train`) runs once for its test BLEU.

Reported per sweep: trials finished, training steps (a complete trial's final step, a pruned
trial's last reported step), the same over the first N trials of each (N: the smaller count,
an equal-trials comparison), seconds spent in the evaluations that pruning reads, the best
validation objective, and the best trial's test BLEU next to the default config's. The sweep
only ever sees the validation split; the test figures are read afterwards.

One seed decides little: greedy BLEU over a few dozen short prompts moves by several points
with the training seed alone. With ``--seeds N`` each best trial's configuration and the default
config are trained again with seeds 1..N-1 (the sweeps' own seed counts as the first; the
split stays fixed), and the test metrics are reported as mean and spread over the N seeds.
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
           f"sweep.n_trials={args.max_trials}", f"sweep.timeout_min={args.budget_min}",
           f"paths.output_dir={out}", f"paths.base_cache_dir={out / ('cache_' + name)}",
           *args.overrides, *extra]
    started = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
    folder = out / "sweeps" / name
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{folder / 'study.db'}")
    trials = sorted((t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")), key=lambda t: t.number)
    steps = [int(t.user_attrs["metrics"]["train/steps"]) if t.state.name == "COMPLETE" else t.last_step
             for t in trials]
    best = study.best_trial
    return {"trials": len(trials), "complete": sum(t.state.name == "COMPLETE" for t in trials),
            "steps": steps, "eval_s": sum(t.user_attrs.get("intermediate_evaluations", {}).get("seconds", 0.0)
                                          for t in trials),
            "best": study.best_value, "best_trial": best.number, "best_params": best.params,
            "best_overrides": list(best.user_attrs.get("overrides", [])),
            "best_test": {k: v for k, v in best.user_attrs["metrics"].items() if k.startswith("tuned/test/")},
            "wall_s": time.time() - started, "budget_used_min": study.user_attrs.get("budget_used_s", 0) / 60}


def run_default(out: Path, args: argparse.Namespace, config: tuple = (), name: str = "default") -> dict:
    """One run of the default config (with ``config`` overrides: a best trial's values)."""
    cmd = [sys.executable, "-m", "pipeline.train", f"paths.output_dir={out / name}",
           f"paths.base_cache_dir={out / 'cache_default'}", *args.overrides, *config]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:  # the sweeps' figures still print
        print(f"{name} failed (its figures are missing below):\n{proc.stderr[-3000:]}", file=sys.stderr)
        return {}
    metrics = json.loads(next((out / name).rglob("metrics.json")).read_text())
    return {k: v for k, v in metrics.items() if k.startswith(("tuned/test/", "tuned/eval/loss"))}


def over_seeds(out: Path, args: argparse.Namespace, first: dict, config: list, label: str) -> dict:
    """``first`` (the seed already measured) and seeds 1..N-1: each test metric's values."""
    runs = [first] + [run_default(out, args, (*config, f"seed={s}"), f"{label}_seed{s}")
                      for s in range(1, args.seeds)]
    return {k: [r[k] for r in runs if k in r] for k in first if k.startswith("tuned/test/")}


def spread(values: list) -> str:
    if not values:
        return "nan"
    mean = sum(values) / len(values)
    sd = (sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)) ** 0.5
    return f"{mean:.2f} ± {sd:.2f} ({', '.join(f'{v:.2f}' for v in values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", default="lora_rank_alpha_lr")
    parser.add_argument("--budget-min", type=float, default=30.0, help="wall-clock budget of each sweep")
    parser.add_argument("--max-trials", type=int, default=500, help="sweep.n_trials (the budget ends it first)")
    parser.add_argument("--metric", default="tuned/test/bleu", help="the test metric to compare")
    parser.add_argument("--pruner", help="the pruner to measure, as a sweep.pruner override value "
                        "(a preset name or {_target_: ...}; default: the sweep's own)")
    parser.add_argument("--baseline", type=Path, help="the last line (JSON) of an earlier run of this "
                        "script with the same sweep, budget and overrides: its unpruned sweep and "
                        "default config are reused instead of run again (half the time)")
    parser.add_argument("--seeds", type=int, default=1, help="train each best trial's config and the "
                        "default config with this many seeds for the test comparison")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()
    chosen = [f"sweep.pruner={args.pruner}"] if args.pruner else []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        pruned = run_sweep("bench_pruned", out, args, chosen)
        if args.baseline:
            earlier = json.loads(args.baseline.read_text().strip().splitlines()[-1])
            full, default = earlier["unpruned"], earlier["default"]
        else:
            full = run_sweep("bench_unpruned", out, args, ["sweep.pruner=null", "trainer.eval_steps=null"])
            default = run_default(out, args)
        seeded = {}
        if args.seeds > 1:  # a best trial is its overrides on the default config
            for label, result in (("pruned", pruned), ("unpruned", full)):
                if "best_overrides" in result:  # (absent from a --baseline of an older run)
                    seeded[label] = over_seeds(out, args, result["best_test"], result["best_overrides"],
                                               f"{label}_best")
            seeded["default"] = over_seeds(out, args, default, [], "default")
    n = min(pruned["trials"], full["trials"])
    print(f"sweep={args.sweep}, budget {args.budget_min:g} min each, same sampler seed; "
          f"pruner: {args.pruner or 'as shipped'}; overrides: {' '.join(args.overrides) or 'none (embedded default)'}"
          + (f"; unpruned sweep and default config from {args.baseline}" if args.baseline else ""))
    print("| sweep | trials (complete) | training steps | steps, first %d trials | pruning evals s "
          "| best validation objective | best trial's %s |" % (n, args.metric))
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, r in (("with pruner", pruned), ("without", full)):
        print(f"| {label} | {r['trials']} ({r['complete']}) | {sum(r['steps'])} | {sum(r['steps'][:n])} "
              f"| {r['eval_s']:.0f} | {r['best']:.5f} (trial {r['best_trial']}) "
              f"| {r['best_test'].get(args.metric, float('nan')):.2f} |")
    print(f"| default config | - | - | - | - | {default.get('tuned/eval/loss', float('nan')):.5f} "
          f"| {default.get(args.metric, float('nan')):.2f} |")
    first_n = sum(pruned["steps"][:n]) / max(sum(full["steps"][:n]), 1)
    print(f"training steps over the first {n} trials, with / without pruning: {first_n:.2f}x")
    print(f"trials in the same budget, with / without pruning: {pruned['trials'] / max(full['trials'], 1):.2f}x")
    print(f"best validation objective, with vs without: {pruned['best']:.5f} vs {full['best']:.5f} "
          f"({(pruned['best'] - full['best']) / abs(full['best']):+.2%})")
    print(f"{args.metric}: best pruned trial {pruned['best_test'].get(args.metric, float('nan')):.2f}, "
          f"best unpruned trial {full['best_test'].get(args.metric, float('nan')):.2f}, "
          f"default config {default.get(args.metric, float('nan')):.2f}")
    for label, values in seeded.items():
        print(f"{args.metric} over {args.seeds} seeds, {label}: {spread(values.get(args.metric, []))}")
    print(json.dumps({"pruned": pruned, "unpruned": full, "default": default, "seeds": seeded}))


if __name__ == "__main__":
    main()
