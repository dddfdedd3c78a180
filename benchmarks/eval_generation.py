"""Batched generation for evaluation vs one prompt at a time, on the default model, in one run.

    python benchmarks/eval_generation.py                 # 100 prompts batched, 16 one by one
    python benchmarks/eval_generation.py --examples 100 --batch-size 16 --single 16

Prints the wall time of evaluating `--examples` prompts through
`pipeline.scoring.generation.generate` (batched, length-sorted, left padding) and the throughput
ratio against generating `--single` prompts one at a time, with the same greedy decoding and
max_new_tokens.
"""

from __future__ import annotations

import argparse
import os
import time

from pipeline.config.options import load_option
from pipeline.config.schema import DecodingConfig
from pipeline.data.splits import build_datasets
from pipeline.model import loading
from pipeline.scoring.generation import generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--single", type=int, default=16, help="prompts generated one at a time")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()

    model_cfg = load_option("model", "smollm2_135m")
    folder = loading.resolve_folder(model_cfg, os.environ.get("PIPELINE_CACHE_DIR", "~/.cache/pipeline"))
    tokenizer = loading.load_tokenizer(folder, model_cfg)
    data_cfg = load_option("data", "django_en_fr", seed=0, validation_size=0.0,
                           test_size=float(args.examples), max_length=512)
    prompts = list(build_datasets(data_cfg, tokenizer).test["prompt"])
    model = loading.load_model(folder, model_cfg).eval()
    decoding = DecodingConfig(max_new_tokens=args.max_new_tokens, seed=0)

    start = time.perf_counter()
    batched = generate(model, tokenizer, prompts, decoding, args.batch_size)
    batched_s = time.perf_counter() - start
    start = time.perf_counter()
    single = [generate(model, tokenizer, [p], decoding, 1)[0] for p in prompts[: args.single]]
    single_s = time.perf_counter() - start
    agree = sum(a == b for a, b in zip(batched, single)) / len(single)

    per_prompt_batched, per_prompt_single = batched_s / len(prompts), single_s / len(single)
    print(f"model: {model_cfg.name}, threads: {__import__('torch').get_num_threads()}, "
          f"max_new_tokens: {args.max_new_tokens}")
    print(f"batched (batch {args.batch_size}): {len(prompts)} prompts in {batched_s:.1f} s "
          f"({per_prompt_batched:.2f} s/prompt)")
    print(f"one at a time: {len(single)} prompts in {single_s:.1f} s ({per_prompt_single:.2f} s/prompt)")
    print(f"speed-up of batching: {per_prompt_single / per_prompt_batched:.2f}x; "
          f"identical outputs: {agree:.0%}")


if __name__ == "__main__":
    main()
