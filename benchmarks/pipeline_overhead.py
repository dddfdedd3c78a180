"""Pipeline overhead: `pipeline.train` vs a minimal hand-written Trainer + PEFT script, one run.

    python benchmarks/pipeline_overhead.py                   # SmolLM2-135M, 2 rounds x 6 steps (~5 min)
    python benchmarks/pipeline_overhead.py --rounds 4 --steps 12
    python benchmarks/pipeline_overhead.py --model tiny_llama --steps 20   # seconds; overhead-bound

Both contenders train the same model (LoRA r=16, alpha 32, dropout 0.05 on PEFT's default
targets), on the same tokenized examples (the pipeline's data stage builds them for both), in
the same order (random sampling, data_seed = seed), with the same batch, steps, optimizer,
schedule, padding collator (pad to a multiple of 8) and seed; evaluation, checkpoints and W&B
are off in both. Each runs in a fresh process; rounds alternate which goes first, so load drift
on a shared machine hits both alike. The figure is training tokens (non-padding input tokens)
per second of the Trainer's own ``train_runtime`` (the training phase only); both must see the
same token count. The ratio pipeline / baseline should be >= 0.97.

The last line is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def common_overrides(args: argparse.Namespace) -> list:
    """The Hydra overrides of the pipeline's run; the baseline composes the same config."""
    return [f"model={args.model}", "adapter=lora", f"trainer.max_steps={args.steps}",
            f"trainer.per_device_train_batch_size={args.batch}", "trainer.sampling=random",
            "trainer.save_steps=null", "trainer.eval_steps=null", "trainer.logging_steps=5",
            "data.validation_size=0", "data.test_size=0", "evaluation.splits=[]",
            "evaluation.metrics=[]", "objective.metric=train/loss", "logger=none",
            f"seed={args.seed}"]


def run_pipeline(args: argparse.Namespace, run_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "pipeline.train", *common_overrides(args), f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pipeline run failed:\n{proc.stderr[-3000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"tokens": metrics["train/tokens"], "runtime_s": metrics["perf/train_runtime_s"],
            "loss": metrics["train/loss"]}


def run_baseline(args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--_baseline", str(out), "--model", args.model,
           "--steps", str(args.steps), "--batch", str(args.batch), "--seed", str(args.seed)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"baseline run failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def baseline(args: argparse.Namespace, out: Path) -> None:
    """The hand-written contender: what a user would write with Trainer + PEFT alone."""
    from pipeline.commands.compose import compose_train
    # the same tokenized data and model folder
    from pipeline.data.splits import build_datasets
    from pipeline.model import loading

    cfg = compose_train(common_overrides(args) + [f"paths.root_dir={ROOT}"])
    cache_dir = os.environ.get("PIPELINE_CACHE_DIR", cfg.paths.cache_dir)
    folder = loading.resolve_folder(cfg.model, cache_dir, cfg.seed)

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainingArguments, set_seed)

    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    tokenizer.padding_side = "right"
    train = build_datasets(cfg.data, tokenizer).train
    train = train.remove_columns(["prompt", "reference"])
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM"))
    pad = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, pad_to_multiple_of=8)
    seen = []

    def collate(features):  # the non-padding tokens of each batch, as the pipeline counts them
        batch = pad(features)
        seen.append(int(batch["attention_mask"].sum()))
        return batch

    trainer_cfg = cfg.trainer
    targs = TrainingArguments(
        output_dir=str(out.parent / "baseline_out"), max_steps=args.steps, seed=args.seed,
        data_seed=args.seed, per_device_train_batch_size=args.batch,
        learning_rate=trainer_cfg.learning_rate, lr_scheduler_type=trainer_cfg.lr_scheduler_type,
        warmup_steps=trainer_cfg.warmup_ratio, weight_decay=trainer_cfg.weight_decay,
        max_grad_norm=trainer_cfg.max_grad_norm, optim=trainer_cfg.optim, logging_steps=5,
        save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(), disable_tqdm=True)
    trainer = Trainer(model=model, args=targs, train_dataset=train, data_collator=collate)
    result = trainer.train()
    # accelerate's data loader fetches one batch ahead: count the batches trained on only.
    out.write_text(json.dumps({"tokens": sum(seen[:args.steps]), "runtime_s": result.metrics["train_runtime"],
                               "loss": result.training_loss}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--_baseline", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._baseline:
        return baseline(args, args._baseline)
    results = {"pipeline": [], "baseline": []}
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = ["pipeline", "baseline"] if r % 2 == 0 else ["baseline", "pipeline"]
            for name in order:
                where = Path(tmp) / f"{name}{r}"
                got = run_pipeline(args, where) if name == "pipeline" else run_baseline(args, where.with_suffix(".json"))
                results[name].append(got)
                print(f"round {r + 1} {name}: {got['tokens']} tokens in {got['runtime_s']:.2f} s = "
                      f"{got['tokens'] / got['runtime_s']:.1f} tokens/s, loss {got['loss']:.4f}", flush=True)
    same_tokens = all(p["tokens"] == b["tokens"] for p, b in zip(results["pipeline"], results["baseline"]))
    speed = {name: sum(x["tokens"] for x in rs) / sum(x["runtime_s"] for x in rs) for name, rs in results.items()}
    per_round = [p["tokens"] / p["runtime_s"] / (b["tokens"] / b["runtime_s"])
                 for p, b in zip(results["pipeline"], results["baseline"])]
    ratio = speed["pipeline"] / speed["baseline"]
    median = sorted(per_round)[len(per_round) // 2] if len(per_round) % 2 else \
        sum(sorted(per_round)[len(per_round) // 2 - 1:len(per_round) // 2 + 1]) / 2
    print(f"\n| contender | tokens/s (all rounds) |\n|---|---:|\n| pipeline.train | {speed['pipeline']:.1f} |\n"
          f"| Trainer + PEFT script | {speed['baseline']:.1f} |")
    print(f"ratio pipeline / baseline: {ratio:.3f} (per round: {', '.join(f'{x:.3f}' for x in per_round)}; "
          f"median {median:.3f}); "
          f"same token count: {same_tokens}; target >= 0.97: {'met' if ratio >= 0.97 else 'NOT met'}")
    print(json.dumps({"benchmark": "pipeline_overhead", "model": args.model, "steps": args.steps,
                      "batch": args.batch, "rounds": args.rounds, "tokens_per_s": speed,
                      "ratio": round(ratio, 4), "median_round_ratio": round(median, 4), "per_round": [round(x, 4) for x in per_round],
                      "same_tokens": same_tokens, "wall_s": round(time.time() - started, 1)}))


if __name__ == "__main__":
    main()
