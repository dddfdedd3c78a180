"""What a standard benchmark costs and shows on the embedded default: two hand-made lm-eval tasks
(standard ones need the Hugging Face Hub, which an offline machine cannot reach), measured on the
base and the tuned model of one training run.

    python benchmarks/standard_benchmarks.py                  # embedded default, 300 + 200 examples (~10 min)
    python benchmarks/standard_benchmarks.py --model tiny_llama --steps 4 --examples 40

The tasks, written into a scratch folder as lm-eval task YAMLs with their data:

- ``fr_choice`` (multiple choice, ``acc``/``acc_norm``): an English UI string of the shipped
  Django catalog and four French strings, the right translation among three others of the same
  catalog; the run trains on that catalog's train split, so this is an in-domain probe.
- ``sums`` (generate until a newline or 16 tokens, ``exact_match`` of the last number in the
  answer): "What is 7 plus 5?", a probe of something the training data never shows.

Runs ``pipeline.train`` in this process with ``evaluation.benchmarks`` set to both tasks, each
task timed on its own for each model, and prints per task: examples, seconds per 100 examples for
the base and the tuned model, both scores and the change with its paired 95% interval.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHOICE = """task: fr_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "English: {{{{english}}}}\\nFrench:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
  - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
"""

SUMS = """task: sums
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question: What is {{{{a}}}} plus {{{{b}}}}?\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 16
  do_sample: false
filter_list:
  - name: number
    filter:
      - function: regex
        regex_pattern: "(-?\\\\d+)"
        group_select: -1
      - function: take_first
metric_list:
  - {{metric: exact_match, aggregation: mean, higher_is_better: true}}
"""


def write_tasks(folder: Path, choice_examples: int, sum_examples: int, seed: int = 0) -> Path:
    """The two task YAMLs and their data files in ``folder``."""
    rng = random.Random(seed)
    records = [json.loads(line) for line in
               (ROOT / "pipeline" / "assets" / "data" / "django_en_fr.jsonl").read_text().splitlines()]
    french = [r["output"] for r in records]
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "fr_choice.jsonl", "w") as f:
        for record in rng.sample(records, min(choice_examples, len(records))):
            others = rng.sample([t for t in french if t != record["output"]], 3)
            choices = [record["output"], *others]
            rng.shuffle(choices)
            f.write(json.dumps({"english": record["input"], "choices": choices,
                                "label": choices.index(record["output"])}, ensure_ascii=False) + "\n")
    with open(folder / "sums.jsonl", "w") as f:
        for _ in range(sum_examples):
            a, b = rng.randint(1, 49), rng.randint(1, 49)
            f.write(json.dumps({"a": a, "b": b, "answer": str(a + b)}) + "\n")
    (folder / "fr_choice.yaml").write_text(CHOICE.format(data=folder / "fr_choice.jsonl"))
    (folder / "sums.yaml").write_text(SUMS.format(data=folder / "sums.jsonl"))
    return folder


def timed_benchmarks(timings: Dict[str, List[float]]) -> None:
    """Runs each task of a benchmark call on its own and keeps its seconds (per task, in call
    order: the base first, then the tuned model)."""
    import dataclasses

    from pipeline.scoring import benchmarks

    original = benchmarks.run

    def each_task(model: Any, tokenizer: Any, cfg: Any, label: str = "") -> Any:
        merged = benchmarks.BenchmarkResult()
        for task in cfg.tasks:
            started = time.perf_counter()
            result = original(model, tokenizer, dataclasses.replace(cfg, tasks=[task]), label)
            timings.setdefault(task, []).append(time.perf_counter() - started)
            merged.metrics.update(result.metrics)
            merged.examples.update(result.examples)
        return merged

    benchmarks.run = each_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135m", help="model option (default: the embedded default's)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the run's own)")
    parser.add_argument("--examples", type=int, default=300, help="multiple-choice examples (sums: 2/3 of it)")
    parser.add_argument("--out", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from pipeline.commands import store  # noqa: F401  (registers the schemas)
    from pipeline.config.options import CONF_DIR
    from pipeline.runs import quiet
    from pipeline.scoring.resampling import MetricRef, change_interval, read_predictions
    from pipeline.train import train

    quiet.install()
    out = args.out or Path(tempfile.mkdtemp(prefix="standard_benchmarks_"))
    tasks = write_tasks(out / "tasks", args.examples, args.examples * 2 // 3)
    run_dir = out / "run"
    overrides = [f"model={args.model}", "logger=none", f"paths.run_dir={run_dir}", f"paths.root_dir={ROOT}",
                 f"paths.base_cache_dir={out / 'base_cache'}", "evaluation.benchmarks.tasks=[fr_choice,sums]",
                 f"evaluation.benchmarks.include_path={tasks}", "evaluation.benchmarks.limit=null",
                 *([f"trainer.max_steps={args.steps}"] if args.steps else [])]
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    timings: Dict[str, List[float]] = {}
    timed_benchmarks(timings)
    started = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - started

    metrics = json.loads((run_dir / "metrics.json").read_text())
    rows = read_predictions(run_dir / "eval" / "predictions.jsonl")
    print(f"\n{args.model}: training run with both benchmarks, {wall:.0f} s wall time "
          f"(training {metrics.get('perf/train_runtime_s', 0):.0f} s)\n")
    print("| task | metric | examples | base s/100 | tuned s/100 | base | tuned | change [95% interval] |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for task, metric in (("fr_choice", "acc"), ("fr_choice", "acc_norm"), ("sums", "exact_match_number")):
        interval = change_interval([rows], MetricRef.parse(f"delta/benchmark/{task}/{metric}"))
        base_s, tuned_s = timings[task]
        n = interval.examples
        print(f"| {task} | {metric} | {n} | {100 * base_s / n:.1f} | {100 * tuned_s / n:.1f} "
              f"| {metrics[f'base/benchmark/{task}/{metric}']:.3f} | {metrics[f'tuned/benchmark/{task}/{metric}']:.3f} "
              f"| {interval.change:+.3f} [{interval.low:+.3f}, {interval.high:+.3f}] |")
    print(f"\nrun folder: {run_dir}")


if __name__ == "__main__":
    main()
