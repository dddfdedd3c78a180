"""Packed (padding-free) vs padded batches on a realistic length mix, measured in one run.

    python benchmarks/packing.py                     # SmolLM2-135M, 4 steps of 8 examples (~4 min)
    python benchmarks/packing.py --steps 10 --batch 16 --pack-length 1024
    python benchmarks/packing.py --model tiny_llama  # seconds; for trying the script

The examples are the train splits of the two embedded data sets, shuffled together with a
fixed seed: django_en_fr (short UI strings) and chatterbot_qa (multi-turn conversations, up to
256 tokens), a long-tailed mix. Each step takes the next ``--batch`` examples and trains on them
twice, once as a padded batch (the pipeline's padding collator) and once packed into rows of at
most ``--pack-length`` tokens (``data.packing=true``), on two copies of the same LoRA model
(r=16, alpha 32, dropout off so that both copies see the same computation) with their own
AdamW: the same examples per step and the same weights, so their losses must agree. The order
of the two alternates every step, so load drift hits both alike. A step is forward + backward +
optimizer step; the figure is real (non-padding) tokens per second. Target: packed / padded
>= 1.5.

The last line is a JSON summary.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def examples(tokenizer, seed: int) -> list:
    from pipeline.config.options import load_option
    from pipeline.data.splits import build_datasets

    rows = []
    for name in ("django_en_fr", "chatterbot_qa"):
        option = load_option("data", name, seed=seed, validation_size=0, test_size=0)
        rows += [{"input_ids": r["input_ids"], "labels": r["labels"]}
                 for r in build_datasets(option, tokenizer).train]
    random.Random(seed).shuffle(rows)
    return rows


def step(model, optimizer, batch) -> tuple:
    start = time.perf_counter()
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start, loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--pack-length", type=int, default=512)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    import torch

    from pipeline.adapters.lora import LoraSettings
    from pipeline.config.options import load_option
    from pipeline.data import packing
    from pipeline.model import loading

    torch.manual_seed(args.seed)
    cache_dir = os.environ.get("PIPELINE_CACHE_DIR", "~/.cache/pipeline")
    model_cfg = load_option("model", args.model)
    folder = loading.resolve_folder(model_cfg, cache_dir, seed=args.seed)
    tokenizer = loading.load_tokenizer(folder, model_cfg)
    rows = examples(tokenizer, args.seed)
    lengths = [len(r["input_ids"]) for r in rows]
    base = loading.load_model(folder, model_cfg)  # use_cache=False: packed rows need it
    padded_model = LoraSettings(r=16, lora_alpha=32, lora_dropout=0.0).apply(base, None).train()
    packed_model = copy.deepcopy(padded_model)
    modes = {
        "padded": (padded_model, packing.collator(tokenizer, packing=False)),
        "packed": (packed_model, packing.collator(tokenizer, packing=True, pack_length=args.pack_length)),
    }
    optimizers = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
                  for name, (m, _) in modes.items()}
    stats = {name: {"time": 0.0, "real": 0, "slots": 0, "losses": []} for name in modes}
    print(f"{len(rows)} examples, lengths: mean {sum(lengths) / len(lengths):.0f}, "
          f"max {max(lengths)}, median {sorted(lengths)[len(lengths) // 2]} tokens", flush=True)
    for i in range(args.steps + 1):  # step 0 warms both up and is not counted
        features = rows[i * args.batch:(i + 1) * args.batch]
        order = ["padded", "packed"] if i % 2 == 0 else ["packed", "padded"]
        for name in order:
            model, collate = modes[name]
            batch = collate(features)
            took, loss = step(model, optimizers[name], batch)
            if i == 0:
                continue
            s = stats[name]
            s["time"] += took
            s["real"] += packing.real_tokens(batch)
            s["slots"] += batch["input_ids"].numel()
            s["losses"].append(loss)
        if i:
            print(f"step {i}: " + ", ".join(
                f"{n} {tuple(modes[n][1](features)['input_ids'].shape)} loss {stats[n]['losses'][-1]:.5f}"
                for n in modes), flush=True)
    speed = {n: s["real"] / s["time"] for n, s in stats.items()}
    ratio = speed["packed"] / speed["padded"]
    gap = max(abs(a - b) for a, b in zip(stats["padded"]["losses"], stats["packed"]["losses"]))
    print("\n| batches | real tokens/s | real / computed tokens | mean loss |")
    print("|---|---:|---:|---:|")
    for n, s in stats.items():
        print(f"| {n} | {speed[n]:.1f} | {s['real'] / s['slots']:.1%} | "
              f"{sum(s['losses']) / len(s['losses']):.5f} |")
    print(f"packed / padded real tokens/s: {ratio:.2f}x (target >= 1.5: {'met' if ratio >= 1.5 else 'NOT met'}); "
          f"largest loss difference in a step: {gap:.2e}")
    print(json.dumps({"benchmark": "packing", "model": args.model, "steps": args.steps, "batch": args.batch,
                      "pack_length": args.pack_length, "real_tokens_per_s": speed, "ratio": round(ratio, 3),
                      "utilisation": {n: round(s["real"] / s["slots"], 4) for n, s in stats.items()},
                      "losses": {n: s["losses"] for n, s in stats.items()}, "max_loss_diff": gap}))


if __name__ == "__main__":
    main()
