"""Evaluation with the sets' shared opening computed once (`pipeline.scoring.prefix`) against
every example computed whole, side by side.

    python benchmarks/shared_prefix.py                  # embedded default and an 8,000-row file
    python benchmarks/shared_prefix.py --cases default

For each case, the run's own sets (after the pipeline's caps) are measured on the base model
through `pipeline.scoring`: the losses of the validation and test sets (in the precision
`evaluation.loss_precision=auto` picks here, and in fp32) and the generations of the test prompts
(fp32, the case's decoding), once with the shared prefix and once without, alternating, after a
warm-up of each. Prints seconds, the speed ratio, the relative difference of the losses and how
many generated outputs are identical.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


@contextlib.contextmanager
def whole_examples():
    """Evaluation as it was before: no shared prefix."""
    from pipeline.scoring.prefix import SharedPrefix

    real = SharedPrefix.build
    SharedPrefix.build = classmethod(lambda cls, *args, **kwargs: None)
    try:
        yield
    finally:
        SharedPrefix.build = real


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    from pipeline.data.packing import collator
    from pipeline.model.precision import resolve_loss
    from pipeline.scoring.generation import generate
    from pipeline.scoring.losses import evaluate_loss
    from pipeline.scoring.measurement import Evaluator
    from pipeline.scoring.prefix import shared_length
    from whole_run import in_process_cases

    columns = ["case", "work", "examples>", "shared tokens / mean length>", "whole s>", "shared s>", "speed-up>",
               "same result"]
    rows = []
    for case, cfg, tokenizer, splits, model in in_process_cases(__doc__.splitlines()[0], columns):
        evaluation = cfg.evaluation  # cfg: the case's checked TrainConfig
        collate = collator(tokenizer, False)
        batch = cfg.trainer.per_device_eval_batch_size
        # The evaluator only supplies the sets; they are measured below, with and without the prefix.
        evaluator = Evaluator.build(evaluation, splits, tokenizer, seed=cfg.data.seed, plain_template=False,
                                    collate=collator(tokenizer, cfg.data.packing, cfg.data.pack_length),
                                    loss_batch_size=batch)
        precisions = sorted({resolve_loss("auto").precision, "fp32"})

        def report(work, n, shared, mean, whole_s, shared_s, same, extra):
            print(f"| {case} | {work} | {n} | {shared} / {mean:.1f} | {whole_s:.1f} | {shared_s:.1f} | "
                  f"{whole_s / shared_s:.2f}x | {same} |")
            rows.append({"case": case, "work": work, "whole_s": whole_s, "shared_s": shared_s, **extra})

        for name, ds in evaluator.loss_sets.items():
            ids = ds["input_ids"]
            shared = shared_length(ids, ds["labels"])
            for precision in precisions:
                bf16 = precision == "bf16"
                loss = lambda: evaluate_loss(model, ds, collate, batch, name, bf16=bf16)[f"{name}/loss"]  # noqa: E731
                warm = ds.select(range(min(batch, len(ds))))
                evaluate_loss(model, warm, collate, batch, name, bf16=bf16)
                with whole_examples():
                    evaluate_loss(model, warm, collate, batch, name, bf16=bf16)
                    whole_s, whole = timed(loss)
                shared_s, value = timed(loss)
                diff = abs(value - whole) / whole
                report(f"{name} loss, {precision}", len(ds), shared, sum(map(len, ids)) / len(ids), whole_s,
                       shared_s, f"rel. diff {diff:.1e}", {"whole_loss": whole, "shared_loss": value})
        for s in evaluator.sets:
            encoded = tokenizer(s.prompts, add_special_tokens=s.add_special_tokens)["input_ids"]
            shared = shared_length(encoded)
            gen = lambda: generate(model, tokenizer, s.prompts, evaluation.decoding,  # noqa: E731
                                   evaluation.batch_size, s.add_special_tokens)
            generate(model, tokenizer, s.prompts[:evaluation.batch_size], evaluation.decoding,
                     evaluation.batch_size, s.add_special_tokens)
            with whole_examples():
                whole_s, whole = timed(gen)
            shared_s, outputs = timed(gen)
            same = sum(a == b for a, b in zip(whole, outputs))
            report(f"{s.name} generation, fp32, {evaluation.decoding.max_new_tokens} new tokens at most",
                   len(s.prompts), shared, sum(map(len, encoded)) / len(encoded), whole_s, shared_s,
                   f"{same}/{len(outputs)} outputs identical", {"identical": same, "prompts": len(outputs)})
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
