"""Loss evaluation in fp32 against bf16 autocast (`evaluation.loss_precision`), side by side.

    python benchmarks/eval_loss.py                    # embedded default and an 8,000-row file
    python benchmarks/eval_loss.py --cases default

For each case the run's own loss sets (validation and test, after the pipeline's caps) are
measured on the base model through `pipeline.scoring.losses.evaluate_loss`, once in fp32 and
once under bf16 autocast, alternating per set after one warm-up batch of each. Prints seconds,
tokens per second, the speed ratio and the relative difference of the losses. bf16 pays off only
where the CPU multiplies it natively (AVX512-bf16/AMX); elsewhere `loss_precision=auto` keeps
fp32.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    from pipeline.data.packing import collator
    from pipeline.scoring.losses import evaluate_loss
    from whole_run import in_process_cases

    columns = ["case", "set", "examples>", "tokens>", "fp32 s>", "bf16 s>", "speed-up>", "fp32 loss>",
               "bf16 loss>", "rel. diff>"]
    rows = []
    for case, cfg, tokenizer, splits, model in in_process_cases(__doc__.splitlines()[0], columns):
        collate = collator(tokenizer, False)
        batch = cfg.trainer.per_device_eval_batch_size
        sets = {"eval": splits.validation, "test": splits.test}
        for name, ds in sets.items():
            warm = ds.select(range(min(batch, len(ds))))
            for bf16 in (False, True):
                evaluate_loss(model, warm, collate, batch, name, bf16=bf16)
            seconds, losses = {}, {}
            for bf16 in (False, True):
                start = time.perf_counter()
                losses[bf16] = evaluate_loss(model, ds, collate, batch, name, bf16=bf16)[f"{name}/loss"]
                seconds[bf16] = time.perf_counter() - start
            tokens = sum(len(ids) for ids in ds["input_ids"])
            diff = abs(losses[True] - losses[False]) / losses[False]
            print(f"| {case} | {name} | {len(ds)} | {tokens} | {seconds[False]:.1f} | {seconds[True]:.1f} | "
                  f"{seconds[False] / seconds[True]:.2f}x | {losses[False]:.5f} | {losses[True]:.5f} | {diff:.1e} |")
            rows.append({"case": case, "set": name, "fp32_s": seconds[False], "bf16_s": seconds[True],
                         "fp32_loss": losses[False], "bf16_loss": losses[True], "rel_diff": diff})
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
