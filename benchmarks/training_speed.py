"""Training speed: the pipeline's default training against a careful hand-written Trainer + PEFT loop.

    python benchmarks/training_speed.py                       # both files, 20 steps of 8 (~10 min on 2 cores)
    python benchmarks/training_speed.py --data short --steps 10
    python benchmarks/training_speed.py --model tiny_llama --steps 4   # seconds: a smoke run
    python benchmarks/training_speed.py --profile --data default      # top operators of one default step

Two files: the embedded default (``data=django_en_fr``) and a generated short-completion
classification file (long review prompts, a one-word answer), written to a temporary folder.

The pipeline contender is built by the pipeline's own code (``compose_train``, the data stage,
``loading.load_model``, the adapter's ``apply``, ``pipeline.trainer.build.prepare``), with its
defaults; only what both loops must share is set: random order (``trainer.sampling=random``),
the steps, the batch, no evaluation, no checkpoints, no W&B. The hand-written loop is what a
careful user writes with transformers and PEFT alone: the same LoRA settings (r, alpha, dropout,
PEFT's default targets), the examples formatted by the tokenizer's chat template with the loss
on the answer only, bf16 autocast where the CPU multiplies bf16 natively, batches padded to their
longest, the same optimizer, schedule, seed and data seed (so the same examples in each step).

Each loop runs in its own process (peak RSS is that process's), back to back. The script
asserts that both saw the same formatted examples (token ids and labels) and the same real
(non-padding) tokens in every step, so no speed-up comes from training on less. Figures: the
Trainer's ``train_runtime`` (training only), real tokens per second, their ratio, peak RSS and
the loss (the mean over the steps and the last step's). The process's CPU seconds over training
(user + system) stand beside the wall time: on a shared machine other load moves them less.

The last line is a JSON summary.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ("the battery screen delivery price quality sound camera keyboard box manual support "
         "colour weight size shipping cable charger update software design button light case "
         "strap display speaker handle lid fabric").split()
GOOD = "great lovely solid excellent sturdy reliable impressive pleasant smooth perfect".split()
BAD = "awful flimsy broken disappointing noisy slow cheap faulty useless poor".split()
FILLER = ("I bought this last month for my sister and we have used it every day since then, "
          "mostly in the evening after work when there is time to sit down and try everything").split()


def short_completion_file(folder: Path, n: int = 400, seed: int = 0) -> Path:
    """A classification file: long review prompts (about 150 tokens), a one-word answer."""
    rng = random.Random(seed)
    path = folder / "reviews.jsonl"
    with path.open("w", encoding="utf-8") as out:
        for _ in range(n):
            label = rng.choice(["positive", "negative"])
            sentences = []
            for _ in range(rng.randint(6, 9)):
                tone = rng.choice(GOOD if label == "positive" or rng.random() < 0.2 else BAD)
                words = rng.sample(FILLER, rng.randint(4, 8))
                sentences.append(f"The {rng.choice(WORDS)} is {tone}, {' '.join(words)}.")
            prompt = ("Classify the sentiment of this product review as positive or negative.\n\n"
                      + " ".join(sentences))
            out.write(json.dumps({"prompt": prompt, "completion": label}) + "\n")
    return path


def overrides(args: argparse.Namespace, data: str) -> List[str]:
    """The pipeline's config: its defaults, with what both loops must share (and, for the
    pipeline, ``--pipeline-overrides``)."""
    chosen = ["data=my_jsonl", f"data.path={data}"] if data != "default" else []
    chosen += list(args.pipeline_overrides) if args._loop == "pipeline" else []
    chosen += ["trainer.precision=fp32"] if args.fp32 else []
    return [*chosen, f"model={args.model}", f"trainer.max_steps={args.steps}",
            f"trainer.per_device_train_batch_size={args.batch}", "trainer.sampling=random",
            "trainer.save_steps=null", "trainer.eval_steps=null", "trainer.logging_steps=1",
            "evaluation.splits=[]", "evaluation.metrics=[]", "objective.metric=train/loss",
            "logger=none", f"seed={args.seed}", f"paths.root_dir={ROOT}"]


def digest(ids: List[int], labels: List[int]) -> str:
    return hashlib.sha1(json.dumps([list(ids), list(labels)]).encode()).hexdigest()[:16]


class Recorder:
    """Wraps a collator: each batch's examples (digests, sorted) and real tokens, in order."""

    def __init__(self, collate: Any):
        self.collate, self.steps = collate, []

    def __call__(self, features: List[Dict[str, Any]]) -> Any:
        self.steps.append({"examples": sorted(digest(f["input_ids"], f["labels"]) for f in features),
                           "real_tokens": sum(len(f["input_ids"]) for f in features)})
        return self.collate(features)


def profiled(trainer: Any, step: int) -> Dict[str, str]:
    """Adds a callback profiling training step ``step`` (torch.profiler); the table lands in the
    returned dict once trained."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    table: Dict[str, str] = {}

    class Profile(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == step - 1:
                self.profiler = profile(activities=[ProfilerActivity.CPU])
                self.profiler.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                self.profiler.__exit__(None, None, None)
                events = self.profiler.key_averages()
                total = sum(e.self_cpu_time_total for e in events)
                rows = sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]
                table["step_s"] = f"{total / 1e6:.2f}"
                table["rows"] = [[e.key, round(e.self_cpu_time_total / 1e6, 3),
                                  round(100 * e.self_cpu_time_total / total, 1), e.count] for e in rows]

    trainer.add_callback(Profile())
    return table


def timed(trainer: Any) -> List[float]:
    """Adds a callback timing each training step; the list fills as it trains."""
    from transformers import TrainerCallback

    times: List[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)

    trainer.add_callback(Timer())
    return times


def finish(trainer: Any, recorder: Recorder, examples: List[str], steps: int, out: Path,
           extra: Dict[str, Any], profile_step: int = 0) -> None:
    """Trains and writes what the parent compares."""
    table = profiled(trainer, profile_step) if profile_step else {}
    step_times = timed(trainer)
    cpu = os.times()
    result = trainer.train()
    cpu_s = sum(os.times()[:2]) - sum(cpu[:2])  # user + system: less moved by other load than wall time
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    # accelerate's data loader fetches one batch ahead: keep the batches trained on only.
    seen = recorder.steps[:steps]
    out.write_text(json.dumps({
        "runtime_s": result.metrics["train_runtime"], "mean_loss": result.training_loss,
        "last_loss": losses[-1] if losses else None, "losses": losses, "steps": seen,
        "examples": examples, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "profile": table, "step_s": step_times, "cpu_s": cpu_s, **extra}))


def pipeline_loop(args: argparse.Namespace, out: Path) -> None:
    """The pipeline's default training, built by its own code."""
    from pipeline.commands.compose import compose_train
    from pipeline.data.packing import collator
    from pipeline.data.splits import build_datasets
    from pipeline.model import loading, precision
    from pipeline.scoring.measurement import Evaluator
    from pipeline.trainer import build, startup

    cfg = compose_train(overrides(args, args.data))
    chosen = precision.announce(cfg.trainer.precision)
    folder = loading.resolve_folder(cfg.model, cfg.paths.cache_dir, cfg.data.seed)
    architecture = loading.describe(folder, cfg.model)
    startup.prepare(cfg.seed)
    tokenizer = loading.load_tokenizer(folder, cfg.model)
    splits = build_datasets(cfg.data, tokenizer, cfg.paths.data_cache_dir if cfg.data.cache else None)
    model = cfg.adapter.apply(loading.load_model(folder, cfg.model, cfg.adapter.quantization()), architecture)
    packing = build.packing_for(cfg.data.packing, model)
    batches = collator(tokenizer, packing, cfg.data.pack_length)
    evaluator = Evaluator.build(cfg.evaluation, splits, tokenizer, seed=cfg.data.seed, plain_template=False,
                                collate=batches, loss_batch_size=cfg.trainer.per_device_eval_batch_size)
    run_dir = out.parent / "pipeline_run"
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = build.prepare(cfg.trainer, model, tokenizer, splits, run_dir, seed=cfg.seed,
                            packing=packing, pack_length=cfg.data.pack_length, report_to=[],
                            run_name="speed", resume_from=None, evaluator=evaluator)
    settings = build.describe_speedups(trainer)  # before the recorder wraps the collator
    recorder = Recorder(trainer.data_collator)
    trainer.data_collator = recorder
    examples = [digest(i, l) for i, l in zip(splits.train["input_ids"], splits.train["labels"])]
    finish(trainer, recorder, examples, args.steps, out, {"precision": chosen.precision, "settings": settings},
           profile_step=args.profile_step)


def format_example(tokenizer: Any, messages: List[Dict[str, str]]) -> Dict[str, List[int]]:
    """The chat template's text, the loss on the assistant's answer (and its end of turn) only."""
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    answer_from = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    return {"input_ids": ids, "labels": [-100] * answer_from + ids[answer_from:]}


def handwritten_loop(args: argparse.Namespace, out: Path) -> None:
    """What a careful user writes with transformers and PEFT alone; the pipeline's config is
    read only for the shared settings, and its data stage only for the same split of records."""
    from pipeline.commands.compose import compose_train
    from pipeline.data.splits import load_parts
    from pipeline.model import loading, precision

    cfg = compose_train(overrides(args, args.data))
    folder = loading.resolve_folder(cfg.model, cfg.paths.cache_dir, cfg.data.seed)
    records = load_parts(cfg.data).parts["train"]

    import datasets
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainingArguments, set_seed)

    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    tokenizer.padding_side = "right"
    rows = [format_example(tokenizer, r.messages) for r in records]
    rows = [r for r in rows if len(r["input_ids"]) <= cfg.data.max_length]
    train = datasets.Dataset.from_list(rows)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    adapter = cfg.adapter
    model = get_peft_model(model, LoraConfig(r=adapter.r, lora_alpha=adapter.lora_alpha,
                                             lora_dropout=adapter.lora_dropout, task_type="CAUSAL_LM"))
    bf16 = precision.cpu_has_native_bf16() if not torch.cuda.is_available() else torch.cuda.is_bf16_supported()
    bf16 = bf16 and not args.fp32
    recorder = Recorder(DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100))
    t = cfg.trainer
    targs = TrainingArguments(
        output_dir=str(out.parent / "handwritten_out"), max_steps=args.steps, seed=args.seed,
        data_seed=args.seed, per_device_train_batch_size=args.batch, learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type, warmup_steps=t.warmup_ratio, weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, optim=t.optim, bf16=bf16, logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=not torch.cuda.is_available(), disable_tqdm=True)
    trainer = Trainer(model=model, args=targs, train_dataset=train, data_collator=recorder)
    finish(trainer, recorder, [digest(r["input_ids"], r["labels"]) for r in rows], args.steps, out,
           {"precision": "bf16" if bf16 else "fp32"}, profile_step=args.profile_step)


def run_loop(args: argparse.Namespace, which: str, data: str, out: Path) -> Dict[str, Any]:
    cmd = [sys.executable, __file__, "--_loop", which, "--_out", str(out), "--_data", data,
           "--model", args.model, "--steps", str(args.steps), "--batch", str(args.batch),
           "--seed", str(args.seed), "--_profile-step", str(args.profile_step), *(["--fp32"] if args.fp32 else []),
           "--pipeline-overrides", *args.pipeline_overrides]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{which} loop failed:\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def compare(name: str, pipelines: List[Dict[str, Any]], hands: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Checks that both trained on the same thing in every round; the row of figures (times
    summed over the rounds)."""
    for pipeline, hand in zip(pipelines, hands):
        assert pipeline["examples"] == hand["examples"], f"{name}: the loops formatted different examples"
        for step, (p, h) in enumerate(zip(pipeline["steps"], hand["steps"]), 1):
            assert p == h, f"{name}: step {step} saw different examples or real tokens: {p} vs {h}"
        assert len(pipeline["steps"]) == len(hand["steps"])
    tokens = sum(s["real_tokens"] for s in pipelines[0]["steps"]) * len(pipelines)
    row = {"data": name, "real_tokens": tokens, "rounds": len(pipelines),
           "per_round_ratio": [round(h["runtime_s"] / p["runtime_s"], 3) for p, h in zip(pipelines, hands)]}
    for who, runs in (("pipeline", pipelines), ("handwritten", hands)):
        got = dict(runs[-1], runtime_s=sum(r["runtime_s"] for r in runs), cpu_s=sum(r["cpu_s"] for r in runs),
                   peak_rss_mb=max(r["peak_rss_mb"] for r in runs))
        steps = sorted(t for r in runs for t in r["step_s"])
        row[who] = {"seconds": round(got["runtime_s"], 2), "tokens_per_s": round(tokens / got["runtime_s"], 1),
                    "median_step_s": round(steps[len(steps) // 2], 3), "cpu_s": round(got["cpu_s"], 1),
                    "peak_rss_mb": round(got["peak_rss_mb"]), "mean_loss": round(got["mean_loss"], 4),
                    "last_loss": round(got["last_loss"], 4), "precision": got["precision"],
                    "profile": got.get("profile")}
    row["ratio"] = round(row["handwritten"]["seconds"] / row["pipeline"]["seconds"], 3)
    row["cpu_ratio"] = round(row["handwritten"]["cpu_s"] / row["pipeline"]["cpu_s"], 3)
    row["pipeline_settings"] = pipelines[0].get("settings")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135m", help="a model option (conf/model)")
    parser.add_argument("--data", choices=["default", "short", "both"], default="both",
                        help="the embedded default, the generated short-completion file, or both")
    parser.add_argument("--steps", type=int, default=20, help="training steps of each loop")
    parser.add_argument("--batch", type=int, default=8, help="examples per step")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--rounds", type=int, default=1,
                        help="pairs of runs per file, alternating which loop goes first (figures are sums)")
    parser.add_argument("--threads", type=int, default=0,
                        help="threads of each loop (OMP_NUM_THREADS; 0: torch's default). With 1, CPU seconds "
                             "measure the work alone, even on a machine other jobs share")
    parser.add_argument("--fp32", action="store_true",
                        help="both loops in fp32, as on a CPU without native bf16 (AVX2-only); with "
                             "ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 also on AVX2 kernels alone")
    parser.add_argument("--pipeline-overrides", nargs="*", default=[],
                        help="extra overrides of the pipeline's loop, e.g. trainer.labelled_logits=false")
    parser.add_argument("--profile", action="store_true",
                        help="profile one step of each loop (torch.profiler, top operators by self time)")
    parser.add_argument("--_profile-step", dest="profile_step", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--_loop", choices=["pipeline", "handwritten"], help=argparse.SUPPRESS)
    parser.add_argument("--_out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--_data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._loop:
        args.data = args._data
        return (pipeline_loop if args._loop == "pipeline" else handwritten_loop)(args, args._out)
    from pipeline.model.precision import cpu_kind

    if args.profile:  # the third step: after the first steps' one-off costs
        args.profile_step, args.steps = 3, max(args.steps, 3) if args.steps != 20 else 3

    started, rows, load = time.time(), [], f"{os.getloadavg()[0]:.2f}"
    with tempfile.TemporaryDirectory() as tmp:
        files = {"default": "default", "short": str(short_completion_file(Path(tmp)))}
        names = ["default", "short"] if args.data == "both" else [args.data]
        for name in names:
            got: Dict[str, List[Dict[str, Any]]] = {"pipeline": [], "handwritten": []}
            for r in range(args.rounds):
                for which in (("pipeline", "handwritten") if r % 2 == 0 else ("handwritten", "pipeline")):
                    folder = Path(tmp) / f"{name}-{which}-{r}"
                    folder.mkdir()
                    got[which].append(run_loop(args, which, files[name], folder / "result.json"))
            rows.append(compare(name, got["pipeline"], got["handwritten"]))
    print(f"\nCPU: {cpu_kind()}; {args.threads or 'default'} thread(s); {args.rounds} round(s) of "
          f"{args.steps} steps x {args.batch} examples, "
          f"model {args.model}; load average before/after: {load}, {os.getloadavg()[0]:.2f}\n")
    print("| data | loop | seconds | median s/step | real tokens/s | ratio | CPU s | CPU ratio | peak RSS MB "
          "| mean loss | last loss |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        for who in ("pipeline", "handwritten"):
            r = row[who]
            ratio = f"**{row['ratio']:.2f}x**" if who == "pipeline" else "1.00x"
            cpu_ratio = f"{row['cpu_ratio']:.2f}x" if who == "pipeline" else "1.00x"
            print(f"| {row['data']} | {who} ({r['precision']}) | {r['seconds']:.1f} | {r['median_step_s']:.2f} | "
                  f"{r['tokens_per_s']:.1f} | "
                  f"{ratio} | {r['cpu_s']:.1f} | {cpu_ratio} | {r['peak_rss_mb']} | {r['mean_loss']:.4f} | "
                  f"{r['last_loss']:.4f} |")
    print("same formatted examples and real tokens per step: asserted; per-round ratios: "
          + "; ".join(f"{row['data']} {row['per_round_ratio']}" for row in rows))
    for row in rows:
        for who in ("pipeline", "handwritten"):
            table = row[who].get("profile")
            if table:
                print(f"\n{row['data']}, {who}: step {args.profile_step}, {table['step_s']} s of operator self time\n")
                print("| operator | self s | share | calls |\n|---|---:|---:|---:|")
                for name, seconds, share, calls in table["rows"]:
                    print(f"| `{name}` | {seconds:.3f} | {share:.1f}% | {calls} |")
    print(json.dumps({"benchmark": "training_speed", "model": args.model, "steps": args.steps, "threads": args.threads,
                      "batch": args.batch, "cpu": cpu_kind(), "rows": rows,
                      "wall_s": round(time.time() - started, 1)}))


if __name__ == "__main__":
    main()
