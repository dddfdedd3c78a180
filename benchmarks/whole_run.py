"""Whole-run cost: `pipeline.train` against a hand-written Trainer + PEFT script doing the same work.

    python benchmarks/whole_run.py                       # embedded default and an 8,000-row file
    python benchmarks/whole_run.py --cases default       # one case
    python benchmarks/whole_run.py --rows 2000           # a smaller generated file

Cases:
- ``default``: the embedded default (`python -m pipeline.train`: LoRA on SmolLM2-135M, English ->
  French, BLEU/chrF/ROUGE on the test prompts);
- ``classification``: a generated prompt/completion file of ``--rows`` short examples with two
  labels (`data=my_jsonl evaluation=classification evaluation.labels=[positive,negative]`),
  everything else default, as a user would run their own file.

Per case, in this order and each in a fresh process: the pipeline (first run: it measures the
base), the pipeline again with the same command (the base measurement comes from the cache) and
the script. The script is what a user would write with Trainer + PEFT alone: it takes the
pipeline's tokenized splits and evaluation sets (so the examples are the same), measures the
base (loss on the validation and test sets in the precision the pipeline picks, generation on the
same prompts with the same greedy decoding), trains the same steps with the same batch and schedule, then measures the tuned
model alike. Wall time is the whole process, imports included; the training share is the
Trainer's ``train_runtime`` over the wall time. The last line is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = {"positive": ["great", "lovely", "excellent", "fine", "superb", "pleasant", "good", "wonderful"],
         "negative": ["awful", "poor", "terrible", "bad", "dreadful", "broken", "boring", "weak"]}
FILLER = ["the", "service", "was", "and", "food", "room", "staff", "really", "quite", "overall", "day",
          "experience", "price", "view", "our", "stay", "trip", "very", "a", "bit"]


def classification_file(path: Path, rows: int, seed: int = 0) -> Path:
    """``rows`` reviews whose label is the sentiment of the one opinion word they hold."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(rows):
            label = rng.choice(sorted(WORDS))
            words = rng.sample(FILLER, rng.randint(6, 14))
            words.insert(rng.randrange(len(words) + 1), rng.choice(WORDS[label]))
            prompt = f"Review: {' '.join(words)}.\nIs this review positive or negative?"
            f.write(json.dumps({"prompt": prompt, "completion": label}) + "\n")
    return path


def case_overrides(case: str, data_file: Path) -> list:
    if case == "default":
        return ["logger=none"]
    return ["logger=none", "data=my_jsonl", f"data.path={data_file}", "evaluation=classification",
            "evaluation.labels=[positive,negative]"]


def in_process_cases(description: str, columns: list):
    """For the benchmarks that measure pieces of a run in one process: parses ``--cases`` and
    ``--rows``, writes the classification file, prints the CPU and the table's header
    (``columns``: a name, ``>`` ending a right-aligned one); yields each case's parts
    (:func:`case_parts`) with its name."""
    import torch

    from pipeline.model.precision import cpu_kind

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--cases", default="default,classification")
    parser.add_argument("--rows", type=int, default=8000)
    args = parser.parse_args()
    data_file = classification_file(Path(tempfile.mkdtemp()) / "reviews.jsonl", args.rows)
    print(f"CPU: {cpu_kind()}; threads: {torch.get_num_threads()}")
    print("| " + " | ".join(c.rstrip(">") for c in columns) + " |")
    print("|" + "|".join("---:" if c.endswith(">") else "---" for c in columns) + "|")
    for case in args.cases.split(","):
        yield (case, *case_parts(case, data_file))


def case_parts(case: str, data_file: Path) -> tuple:
    """A case's composed train config (a checked ``TrainConfig``), tokenizer, splits (after the
    caps) and base model, for the benchmarks that measure pieces of a run in one process."""
    from pipeline.commands.compose import compose_train
    from pipeline.data.splits import build_datasets
    from pipeline.model import loading

    cfg = compose_train([*case_overrides(case, data_file), f"paths.root_dir={ROOT}"])
    folder = loading.resolve_folder(cfg.model, os.environ.get("PIPELINE_CACHE_DIR", cfg.paths.cache_dir),
                                    cfg.data.seed)
    tokenizer = loading.load_tokenizer(folder, cfg.model)
    splits = build_datasets(cfg.data, tokenizer)
    return cfg, tokenizer, splits, loading.load_model(folder, cfg.model)


def run_pipeline(overrides: list, run_dir: Path, cache: Path) -> dict:
    cmd = [sys.executable, "-m", "pipeline.train", *overrides, f"hydra.run.dir={run_dir}",
           f"paths.base_cache_dir={cache}"]
    start, began = time.perf_counter(), time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"pipeline run failed:\n{proc.stderr[-3000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    info = json.loads((run_dir / "run.json").read_text())
    return {"wall_s": wall, "train_s": metrics["perf/train_runtime_s"], "base": info["base_measurement"],
            "first_step_s": info["first_step_at"] - began,
            "metrics": {k: v for k, v in metrics.items() if k.startswith("tuned/test/")}}


def run_script(overrides: list, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--_script", str(out), "--_overrides", json.dumps(overrides)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"script failed:\n{proc.stderr[-3000:]}")
    return {"wall_s": wall, **json.loads(out.read_text())}


def plain_generate(model, tokenizer, prompts: list, evaluation) -> list:
    """``model.generate`` over length-sorted, left-padded batches, every prompt whole: what a
    script does (the pipeline's own generation computes the prompts' shared opening once)."""
    import torch

    from pipeline.scoring.generation import generation_kwargs

    kwargs = generation_kwargs(evaluation.decoding, tokenizer)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs = [""] * len(prompts)
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    for start in range(0, len(order), evaluation.batch_size):
        batch = order[start:start + evaluation.batch_size]
        encoded = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            generated = model.generate(**encoded, **kwargs)
        texts = tokenizer.batch_decode(generated[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
        for i, text in zip(batch, texts):
            outputs[i] = text.strip()
    tokenizer.padding_side = padding_side
    return outputs


def script(out: Path, overrides: list) -> None:
    """The hand-written contender (composing the config only to read the same settings)."""
    from pipeline.commands.compose import compose_train
    from pipeline.data.packing import collator
    from pipeline.data.splits import build_datasets
    from pipeline.model import loading
    from pipeline.model.precision import resolve, resolve_loss
    from pipeline.scoring import metrics
    from pipeline.scoring.measurement import Evaluator

    cfg = compose_train([*overrides, f"paths.root_dir={ROOT}"])
    folder = loading.resolve_folder(cfg.model, os.environ.get("PIPELINE_CACHE_DIR", cfg.paths.cache_dir),
                                    cfg.data.seed)

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed

    set_seed(cfg.seed)
    tokenizer = loading.load_tokenizer(folder, cfg.model)
    splits = build_datasets(cfg.data, tokenizer)
    # The evaluator only supplies the sets; the script measures losses and generations itself.
    evaluator = Evaluator.build(cfg.evaluation, splits, tokenizer, seed=cfg.data.seed, plain_template=False,
                                collate=collator(tokenizer, cfg.data.packing, cfg.data.pack_length),
                                loss_batch_size=cfg.trainer.per_device_eval_batch_size)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=cfg.adapter.r, lora_alpha=cfg.adapter.lora_alpha,
                                             lora_dropout=cfg.adapter.lora_dropout, task_type="CAUSAL_LM"))
    pad = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, pad_to_multiple_of=8)

    loss_bf16 = resolve_loss(cfg.evaluation.loss_precision).precision == "bf16"  # as the pipeline

    def measure() -> dict:
        result = {}
        model.eval()
        for name, ds in evaluator.loss_sets.items():
            nll = tokens = 0
            with torch.no_grad(), torch.autocast(model.device.type, torch.bfloat16, enabled=loss_bf16):
                for i in range(0, len(ds), cfg.trainer.per_device_eval_batch_size):
                    rows = ds[i:i + cfg.trainer.per_device_eval_batch_size]
                    batch = pad([{"input_ids": a, "labels": b} for a, b in zip(rows["input_ids"], rows["labels"])])
                    labels = batch.pop("labels")
                    logits = model(**batch).logits[:, :-1]
                    nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(),
                                                             reduction="sum").item()
                    tokens += int((labels[:, 1:] != -100).sum())
            result[f"{name}/loss"] = nll / tokens
        for s in evaluator.sets:
            outputs = plain_generate(model, tokenizer, s.prompts, cfg.evaluation)
            values, _ = metrics.compute(list(cfg.evaluation.metrics), outputs, s.references,
                                  labels=list(cfg.evaluation.labels) if cfg.evaluation.labels else None)
            result.update({f"{s.name}/{k}": v for k, v in values.items()})
        model.train()
        return result

    base = measure()
    t = cfg.trainer
    args = TrainingArguments(
        output_dir=str(out.parent / "script_out"), max_steps=t.max_steps, seed=cfg.seed, data_seed=cfg.seed,
        per_device_train_batch_size=t.per_device_train_batch_size, learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type, warmup_steps=t.warmup_ratio, weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, optim=t.optim, logging_steps=t.logging_steps, save_strategy="no",
        train_sampling_strategy=t.sampling, report_to=[], use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True, bf16=resolve(t.precision).precision == "bf16")  # what the pipeline picks
    trainer = Trainer(model=model, args=args, data_collator=pad,
                      train_dataset=splits.train.remove_columns(["prompt", "reference"]))
    train_s = trainer.train().metrics["train_runtime"]
    tuned = measure()
    out.write_text(json.dumps({"train_s": train_s, "base": base,
                               "metrics": {f"tuned/{k}": v for k, v in tuned.items() if k.startswith("test/")}}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="default,classification")
    parser.add_argument("--rows", type=int, default=8000)
    parser.add_argument("--_script", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--_overrides", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._script:
        return script(args._script, json.loads(args._overrides))
    from pipeline.model.precision import cpu_kind

    summary = {"benchmark": "whole_run", "cpu": cpu_kind(), "rows": args.rows, "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data_file = classification_file(tmp / "reviews.jsonl", args.rows)
        for case in args.cases.split(","):
            overrides = case_overrides(case, data_file)
            results = {"pipeline": run_pipeline(overrides, tmp / case / "first", tmp / case / "cache"),
                       "pipeline, cached base": run_pipeline(overrides, tmp / case / "second", tmp / case / "cache"),
                       "script": run_script(overrides, tmp / case / "script.json")}
            print(f"\n{case} (cpu: {summary['cpu']})\n| contender | wall s | training s | training share "
                  "| wall vs script | first step s | tuned test metrics |\n|---|---:|---:|---:|---:|---:|---|")
            for name, r in results.items():
                shown = ", ".join(f"{k.split('/')[-1]} {v:.2f}" for k, v in sorted(r["metrics"].items())
                                  if not k.endswith(("perplexity", "loss")) or k.endswith("test/loss"))
                first = f"{r['first_step_s']:.0f}" if "first_step_s" in r else "-"
                print(f"| {name} | {r['wall_s']:.1f} | {r['train_s']:.1f} | {r['train_s'] / r['wall_s']:.0%} | "
                      f"{r['wall_s'] / results['script']['wall_s']:.2f}x | {first} | {shown} |", flush=True)
            summary["cases"][case] = {name: {k: v for k, v in r.items() if k != "base"} for name, r in results.items()}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
