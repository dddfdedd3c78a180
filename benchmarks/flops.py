"""Hardware efficiency of LoRA training on the default model, and the settings that change it.

    python benchmarks/flops.py                      # SmolLM2-135M, 3 steps per setting, 1 in bf16
    python benchmarks/flops.py --steps 8 --bf16-steps 2
    python benchmarks/flops.py --skip "bf16 autocast"   # leave out the slow setting
    python benchmarks/flops.py --model tiny_llama   # seconds; for trying the script

One process loads the model once with LoRA r=16 (alpha 32, PEFT's default targets), as the
pipeline builds it, and trains it on the same padded batches of the default data
(django_en_fr) under each setting, interleaved step by step (setting order rotates every
round, so load drift on a shared machine hits all alike):

- ``fp32``: the pipeline's default (float32, lora_dropout=0.05, all threads);
- ``dropout off``: LoRA dropout modules replaced by identities (what lora_dropout=0 builds);
- ``1 thread``: ``torch.set_num_threads(1)``;
- ``bf16 autocast``: forward under ``torch.autocast("cpu", torch.bfloat16)``, as the Trainer
  does with ``bf16=True`` (``trainer.precision=bf16``); only the first ``--bf16-steps`` batches
  (default 1): on a CPU without native bf16 one step takes minutes. Its speed is compared with
  the default setting's on the same batches.

A step is forward + backward + AdamW step on the adapter's weights (the Trainer's optimizer).

Training FLOPs per step, counted for LoRA (T = real, non-padding tokens):
  forward 2 x N x T (N: weights of every matmul: the base linear layers, lm_head included,
  plus the adapter's A and B), backward activation gradients 2 x N x T, weight gradients only
  for the adapter's 2 x N_adapter x T, plus attention scores and values 4 x d x L x sum(len^2)
  forward and twice that backward (counted over each example's real length, not halved for
  causality). Full fine-tuning's 6 x N x T would overstate LoRA's work by the frozen weights'
  gradients; both are printed.

The matmul peak is ``torch.matmul`` at the model's MLP shape ([512 x hidden] @ [hidden x
intermediate]) in float32 and bfloat16, and ``F.linear`` in bfloat16 (the oneDNN path autocast
takes), measured before and after the training steps in the same run (best of the two).
Efficiency is reported against each. The last line is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Callable, Dict, List

ROOT = Path(__file__).resolve().parents[1]

from pipeline.model.precision import cpu_kind  # noqa: E402


def matmul_peak(dtype, shape, seconds: float, linear: bool = False) -> float:
    """Best FLOP/s of one matmul shape over repeated calls lasting ``seconds`` (at least 2 calls)."""
    import torch

    m, k, n = shape
    a = torch.randn(m, k).to(dtype)
    b = torch.randn(n, k).to(dtype) if linear else torch.randn(k, n).to(dtype)
    op: Callable = (lambda: torch.nn.functional.linear(a, b)) if linear else (lambda: torch.matmul(a, b))
    op()  # warm-up
    best, spent = 0.0, 0.0
    calls = 0
    while spent < seconds or calls < 2:
        start = time.perf_counter()
        op()
        took = time.perf_counter() - start
        spent += took
        calls += 1
        best = max(best, 2 * m * k * n / took)
    return best


def peaks(shape, seconds: float) -> Dict[str, float]:
    import torch

    return {"fp32 matmul": matmul_peak(torch.float32, shape, seconds),
            "bf16 matmul": matmul_peak(torch.bfloat16, shape, seconds),
            "bf16 linear": matmul_peak(torch.bfloat16, shape, seconds, linear=True)}


def load(args: argparse.Namespace):
    """The model with LoRA, its tokenizer, and ``steps`` padded batches of the default data."""
    from pipeline.adapters.lora import LoraSettings
    from pipeline.config.options import load_option
    from pipeline.data.packing import collator
    from pipeline.data.splits import build_datasets
    from pipeline.model import loading

    cache_dir = os.environ.get("PIPELINE_CACHE_DIR", "~/.cache/pipeline")
    model_cfg = load_option("model", args.model)
    folder = loading.resolve_folder(model_cfg, cache_dir, seed=args.seed)
    tokenizer = loading.load_tokenizer(folder, model_cfg)
    model = loading.load_model(folder, model_cfg)
    model = LoraSettings(r=16, lora_alpha=32, lora_dropout=0.05).apply(model, None)
    data_cfg = load_option("data", "django_en_fr", seed=args.seed, validation_size=0, test_size=0)
    train = build_datasets(data_cfg, tokenizer).train
    collate = collator(tokenizer, packing=False)
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in train]
    batches = [collate(rows[i * args.batch:(i + 1) * args.batch]) for i in range(args.steps)]
    return model, batches


def flop_count(model, batch) -> Dict[str, float]:
    """LoRA training FLOPs of one batch (see the module docstring), and 6 x N x T."""
    import torch

    base = adapter = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            if ".lora_A." in f"{name}." or ".lora_B." in f"{name}.":
                adapter += module.weight.numel()
            else:
                base += module.weight.numel()
    config = model.get_base_model().config
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    tokens = sum(lengths)
    attention = 4 * config.hidden_size * config.num_hidden_layers * sum(n * n for n in lengths)
    lora = 2 * (base + adapter) * tokens * 2 + 2 * adapter * tokens + 3 * attention
    return {"lora": float(lora), "six_n_t": 6.0 * (base + adapter) * tokens, "tokens": tokens,
            "matmul_params": base + adapter, "adapter_params": adapter}


def settings(model) -> Dict[str, Callable]:
    """Each setting as a context-making function around one training step."""
    import contextlib

    import torch

    threads = torch.get_num_threads()
    dropouts = [m.lora_dropout for m in model.modules() if hasattr(m, "lora_dropout")]
    saved = [dict(d.items()) for d in dropouts]

    @contextlib.contextmanager
    def default():
        yield

    @contextlib.contextmanager
    def no_dropout():
        for d in dropouts:
            for key in d.keys():
                d[key] = torch.nn.Identity()
        try:
            yield
        finally:
            for d, modules in zip(dropouts, saved):
                for key, module in modules.items():
                    d[key] = module

    @contextlib.contextmanager
    def one_thread():
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)

    return {f"fp32 ({threads} threads)": default, "dropout off": no_dropout,
            "1 thread": one_thread, "bf16 autocast": default}


def step(model, optimizer, batch, bf16: bool) -> float:
    import torch

    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--steps", type=int, default=3, help="training steps per setting")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--peak-seconds", type=float, default=3.0)
    parser.add_argument("--bf16-steps", type=int, default=1,
                        help="steps of the bf16 setting (each is minutes on a CPU without native bf16)")
    parser.add_argument("--skip", default="", help="comma-separated settings to leave out")
    args = parser.parse_args()

    import torch

    torch.manual_seed(args.seed)
    model, batches = load(args)
    model.train()
    config = model.get_base_model().config
    shape = (512, config.hidden_size, config.intermediate_size)
    before = peaks(shape, args.peak_seconds)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    step(model, optimizer, batches[0], bf16=False)  # warm-up, not timed
    options = {k: v for k, v in settings(model).items() if k not in args.skip.split(",")}
    names = list(options)
    times: Dict[str, List[float]] = {n: [] for n in names}
    flops = [flop_count(model, b) for b in batches]
    for i, batch in enumerate(batches):
        order = names[i % len(names):] + names[:i % len(names)]
        for name in order:
            if name == "bf16 autocast" and i >= args.bf16_steps:
                continue
            with options[name]():
                times[name].append(step(model, optimizer, batch, bf16=name == "bf16 autocast"))
        print(f"step {i + 1}: " + ", ".join(f"{n} {times[n][i]:.2f}s" for n in names if len(times[n]) > i),
              flush=True)
    after = peaks(shape, args.peak_seconds)
    peak = {k: max(before[k], after[k]) for k in before}

    total = {k: sum(f[k] for f in flops) for k in ("lora", "six_n_t", "tokens")}
    print(f"\ncpu: {cpu_kind()}")
    print(f"model {args.model}: {flops[0]['matmul_params']:,} matmul weights, "
          f"{flops[0]['adapter_params']:,} adapter weights; {total['tokens']} real tokens in "
          f"{args.steps} steps of {args.batch}")
    print("FLOPs = 4 N T + 2 N_adapter T + 12 d L sum(len^2)  (forward 2NT, backward activation "
          "grads 2NT, adapter weight grads 2 N_adapter T, attention fwd 4 d L len^2 + bwd 2x)")
    print("matmul peak at " + "x".join(map(str, shape)) + ": " +
          ", ".join(f"{k} {v / 1e9:.2f} GFLOP/s" for k, v in peak.items()))
    print("\n| setting | steps | s/step | tokens/s | training GFLOP/s | vs fp32 matmul peak | vs bf16 matmul peak "
          "| vs bf16 linear peak | speed vs default |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = {}
    for name in names:  # each setting over the batches it ran (bf16: the first --bf16-steps)
        ran = len(times[name])
        if not ran:
            continue
        spent = sum(times[name])
        work = sum(f["lora"] for f in flops[:ran])
        rate = work / spent
        default_rate = sum(f["lora"] for f in flops[:ran]) / sum(times[names[0]][:ran])
        rows[name] = {"steps": ran, "s_per_step": spent / ran,
                      "tokens_per_s": sum(f["tokens"] for f in flops[:ran]) / spent,
                      "train_flops_per_s": rate, "speedup": rate / default_rate,
                      **{f"efficiency_vs_{k.replace(' ', '_')}": rate / v for k, v in peak.items()}}
        r = rows[name]
        print(f"| {name} | {ran} | {r['s_per_step']:.2f} | {r['tokens_per_s']:.1f} | {rate / 1e9:.2f} | "
              f"{rate / peak['fp32 matmul']:.1%} | {rate / peak['bf16 matmul']:.0%} | "
              f"{rate / peak['bf16 linear']:.1%} | {r['speedup']:.2f}x |")
    print(f"(6 N T would count {total['six_n_t'] / total['lora']:.2f}x the LoRA FLOPs above)")
    print(json.dumps({"benchmark": "flops", "cpu": cpu_kind(), "model": args.model, "steps": args.steps, "batch": args.batch,
                      "threads": torch.get_num_threads(), "peak_flops_per_s": peak,
                      "lora_flops_per_step_avg": total["lora"] / len(batches), "settings": rows}))


if __name__ == "__main__":
    main()
