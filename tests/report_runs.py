"""Fake run folders for the report tests, written by the real writers.

The config is composed from conf/ as ``pipeline.train`` composes it, ``run.json`` and
``config.yaml`` come from :class:`pipeline.runs.runfolder.RunFolder`, the predictions from
:func:`pipeline.scoring.measurement.write_predictions` with scores from
:func:`pipeline.scoring.metrics.compute`;
only the model outputs, each example's loss and the cost figures are made up.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from pipeline.commands.compose import record
from pipeline.runs.runfolder import RunFolder
from pipeline.scoring.losses import perplexity
from pipeline.scoring.measurement import EvalSet, Measurement, write_predictions
from pipeline.scoring.metrics import compute
from tests.conftest import compose_train

METRICS = ["bleu", "exact_match"]
RETENTION_SET = "chatterbot_qa"  # a shipped data option the fake runs "do not train on"
QUESTIONS = ["What is AI?", "Who are you?", "Do you like music?", "What time is it?",
             "Can you help me?", "What is your name?"]
ANSWERS = ["a branch of computer science", "i am a chat bot", "yes i like jazz", "i do not have a clock",
           "of course i can", "my name is bot"]
REFERENCES = [
    "le chat dort", "il pleut encore", "ouvrez la porte", "la maison est grande",
    "nous mangeons du pain", "le train part demain", "elle lit un livre", "fermez la fenêtre",
    "le ciel est bleu", "ils jouent au parc", "je bois du café", "la route est longue",
]
PROMPTS = [f"Translate to French: sentence {i}" for i in range(len(REFERENCES))]
WRONG = "je ne sais pas"
# The validation set: measured by its loss only, as a training run measures it.
VALIDATION_REFERENCES = ["bonjour", "merci beaucoup", "à demain", "il fait beau", "je suis là", "au revoir"]
VALIDATION_PROMPTS = [f"Translate to French: greeting {i}" for i in range(len(VALIDATION_REFERENCES))]


def outputs(correct: int, references: Sequence[str] = REFERENCES) -> List[str]:
    """Model outputs that reproduce the first ``correct`` references and miss the rest."""
    return [ref if i < correct else WRONG for i, ref in enumerate(references)]


@dataclass
class Retained:
    """A run's made-up outputs and losses on :data:`RETENTION_SET`, before and after tuning.

    Attributes:
        base_correct: Answers the base model gets right.
        tuned_correct: Answers the tuned model gets right.
        base_loss: The base model's loss on the set.
        tuned_loss: The tuned model's loss on the set.
    """

    base_correct: int
    tuned_correct: int
    base_loss: float
    tuned_loss: float


def example_losses(references: Sequence[str], correct: Optional[int]) -> List[Dict[str, float]]:
    """Made-up per-example losses (``loss``, ``loss_tokens``) as ``Evaluator.measure`` records
    them: the base model's (``correct`` None) the same in every run; a tuned model's lower the
    more examples it gets right, and lower on those it gets right."""
    rows = []
    for i, ref in enumerate(references):
        if correct is None:
            loss = 3.0 + 0.1 * (i % 3)
        else:
            loss = 2.8 - 0.1 * correct + 0.07 * ((i * correct) % 5) - (0.5 if i < correct else 0.0)
        rows.append({"loss": loss, "loss_tokens": len(ref.split()) + 1})
    return rows


def write_run(folder: Path, overrides: Sequence[str], correct: int, costs: Dict[str, float],
              status: str = "success", retained: Optional[Retained] = None) -> Path:
    """A finished run folder of ``python -m pipeline.train <overrides>``.

    Args:
        folder: The run folder to create.
        overrides: The command-line overrides (``model=tiny_llama`` is added to compose fast).
        correct: How many test examples the tuned model gets right (the base model gets none);
            it sets the losses on the test and the validation set too (:func:`example_losses`).
        costs: ``params/*`` and ``perf/*`` figures for ``metrics.json``.
        status: The final status; only a successful run gets metrics and predictions.
        retained: The run's figures on :data:`RETENTION_SET`, measured as an extra dataset
            (``evaluation.extra_datasets``), or None for a run without one.
    """
    cfg = compose_train(["model=tiny_llama", *overrides], folder)
    run = RunFolder(folder)
    run.start(record(cfg), list(overrides))
    if status != "success":
        run.finish(status, RuntimeError("trial stopped"))
        return folder
    sets = [EvalSet("test", PROMPTS, [[r] for r in REFERENCES])]
    base_texts, tuned_texts = {"test": outputs(0)}, {"test": outputs(correct)}
    losses: Dict[str, Dict[str, float]] = {"base": {}, "tuned": {}}
    if retained:
        sets.append(EvalSet(RETENTION_SET, QUESTIONS, [[a] for a in ANSWERS]))
        base_texts[RETENTION_SET] = outputs(retained.base_correct, ANSWERS)
        tuned_texts[RETENTION_SET] = outputs(retained.tuned_correct, ANSWERS)
        losses = {"base": {f"{RETENTION_SET}/loss": retained.base_loss},
                  "tuned": {f"{RETENTION_SET}/loss": retained.tuned_loss}}
    validation = EvalSet("eval", VALIDATION_PROMPTS, [[r] for r in VALIDATION_REFERENCES])
    per_example = {side: {"test": example_losses(REFERENCES, known), "eval": example_losses(VALIDATION_REFERENCES, known)}
                   for side, known in (("base", None), ("tuned", correct))}
    base = _measure(sets, base_texts, losses["base"], per_example["base"])
    tuned = _measure(sets, tuned_texts, losses["tuned"], per_example["tuned"])
    write_predictions(folder / "eval" / "predictions.jsonl", [*sets, validation], base, tuned)
    values = {**{f"base/{k}": v for k, v in base.metrics.items()},
              **{f"tuned/{k}": v for k, v in tuned.metrics.items()}}
    values.update({f"delta/{k}": tuned.metrics[k] - base.metrics[k] for k in base.metrics})
    run.write_metrics({**values, **costs})
    (folder / "history.jsonl").write_text("".join(
        json.dumps({"step": s, "train/loss": 3.0 - 0.1 * s * correct}) + "\n" for s in (2, 4, 6)))
    run.finish("success")
    return folder


def _measure(sets: List, texts: Dict[str, List[str]], losses: Dict[str, float],
             example_losses: Dict[str, List[Dict[str, float]]]):
    """A :class:`pipeline.scoring.measurement.Measurement` of ``texts`` (per set), scored for
    real, with each example's loss and each loss set's loss token-weighted from them."""
    values, per_example = dict(losses), {}
    for s in sets:
        corpus, per_example[s.name] = compute(METRICS, texts[s.name], s.references)
        values.update({f"{s.name}/{k}": v for k, v in corpus.items()})
    for name, rows in example_losses.items():
        loss = sum(r["loss"] * r["loss_tokens"] for r in rows) / sum(r["loss_tokens"] for r in rows)
        values.update({f"{name}/loss": loss, f"{name}/perplexity": perplexity(loss)})
    return Measurement(values, texts, per_example, example_losses)


# Per method and seed: test examples right after tuning, then the retention set's answers right
# (base 4 of 6) and loss (base 2.0) after tuning: full fine-tuning forgets the most.
METHOD_RUNS = {("full", 1): (10, Retained(4, 1, 2.0, 2.9)), ("full", 2): (11, Retained(4, 2, 2.0, 2.7)),
               ("lora", 1): (8, Retained(4, 4, 2.0, 2.1)), ("lora", 2): (9, Retained(4, 3, 2.0, 2.2))}


def write_methods_multirun(root: Path) -> Path:
    """``-m experiment=compare_methods adapter=full,lora seed=1,2`` as :data:`METHOD_RUNS` says,
    with :data:`RETENTION_SET` measured as an extra dataset; full costs more of everything."""
    for job, ((method, seed), (correct, retained)) in enumerate(sorted(METHOD_RUNS.items())):
        costs = {"params/trainable": 1e6 if method == "full" else 1e4,
                 "perf/peak_rss_mb": 4000.0 if method == "full" else 3000.0, "perf/wall_time_s": 60.0 + seed}
        write_run(root / f"{job}_{method}", ["experiment=compare_methods", f"adapter={method}", f"seed={seed}"],
                  correct, costs, retained=retained)
    return root
