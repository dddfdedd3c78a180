"""Measuring a model: the base and the tuned model answer the same prompts with the same decoding.

:class:`Evaluator` scores a model from the model, its tokenizer and the evaluation sets: losses
(:mod:`pipeline.scoring.losses`), generations (:mod:`pipeline.scoring.generation`, or vLLM:
:mod:`pipeline.scoring.vllm_client`) and their scores (:mod:`pipeline.scoring.metrics`:
sacrebleu, rouge-score, SQuAD-style EM/F1, classification). It needs no Trainer: training
(:mod:`pipeline.trainer.fit`) and ``pipeline.evaluate`` both call it. The result is namespaced
metrics (``base/test/bleu``, ``tuned/test/bleu``, ``delta/test/bleu``), one predictions row per
example (:func:`write_predictions`), and a before/after table.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

from pipeline.config.options import load_option
from pipeline.config.schema import DataConfig, EvaluationConfig
from pipeline.data.packing import collator
from pipeline.data.splits import Splits, build_datasets
from pipeline.model import precision
from pipeline.runs.atomic import open_atomic
from pipeline.runs.runfolder import write_json
from pipeline.scoring import benchmarks, metrics as scores, vllm_client
from pipeline.scoring.generation import cut_at_stop, generate
from pipeline.scoring.losses import evaluate_loss

log = logging.getLogger(__name__)


@dataclass
class EvalSet:
    """Prompts and references of one evaluation set (``test``, ``eval`` or an extra dataset)."""

    name: str
    prompts: List[str]
    references: List[List[str]]
    add_special_tokens: bool = False  # True for the plain template (bos), False for chat templates
    examples: Optional[Any] = None  # tokenized rows (loss / perplexity), or None


@dataclass
class Predictions:
    """Outputs of one model on every set, keyed by set name."""

    outputs: Dict[str, List[str]] = field(default_factory=dict)


def eval_set(name: str, dataset: Any, cfg: EvaluationConfig, plain_template: bool) -> Optional[EvalSet]:
    """An :class:`EvalSet` from a tokenized split (its ``prompt``/``reference`` columns)."""
    if dataset is None or len(dataset) == 0:
        return None
    if cfg.max_examples is not None:
        dataset = dataset.select(range(min(cfg.max_examples, len(dataset))))
    return EvalSet(name=name, prompts=list(dataset["prompt"]),
                   references=[[r] for r in dataset["reference"]],
                   add_special_tokens=plain_template, examples=dataset)


def predict(model: Any, tokenizer: Any, sets: List[EvalSet], cfg: EvaluationConfig,
            label: str = "") -> Predictions:
    """Generations of ``model`` for every set (nothing when no generation metric is asked for)."""
    predictions = Predictions()
    if not cfg.metrics or not sets:
        return predictions
    if cfg.engine == "vllm":
        return predict_with_vllm(model, tokenizer, sets, cfg, label)["model"]
    for s in sets:
        predictions.outputs[s.name] = generate(model, tokenizer, s.prompts, cfg.decoding,
                                               cfg.batch_size, s.add_special_tokens,
                                               what=f"{label} {s.name} generation".strip())
    return predictions


def predict_with_vllm(model: Any, tokenizer: Any, sets: List[EvalSet], cfg: EvaluationConfig,
                      label: str = "", with_base: bool = False) -> Dict[str, Predictions]:
    """Generations of every set from one vLLM engine: ``{"model": ...}``, and with ``with_base``
    (a model under a LoRA adapter) also ``"base"``, the same prompts without the adapter."""
    log.info("%s generation through vLLM: %s%s", label or "model",
             ", ".join(f"{s.name} {len(s.prompts)} prompts" for s in sets),
             "; the base model's from the same engine" if with_base else "")
    texts = vllm_client.predict(model, tokenizer, [(s.prompts, s.add_special_tokens) for s in sets],
                                cfg.decoding, with_base)
    return {key: Predictions({s.name: [cut_at_stop(t, cfg.decoding.stop_strings) for t in outputs]
                              for s, outputs in zip(sets, per_set)})
            for key, per_set in texts.items()}


def score(sets: List[EvalSet], predictions: Predictions, cfg: EvaluationConfig
          ) -> tuple[Dict[str, float], Dict[str, List[Dict[str, float]]]]:
    """Corpus metrics ``{set}/{metric}`` and per-example scores for each set."""
    corpus: Dict[str, float] = {}
    per_example: Dict[str, List[Dict[str, float]]] = {}
    for s in sets:
        if s.name not in predictions.outputs:
            continue
        values, rows = scores.compute(list(cfg.metrics), predictions.outputs[s.name], s.references,
                                 labels=list(cfg.labels) if cfg.labels else None)
        corpus.update({f"{s.name}/{k}": v for k, v in values.items()})
        per_example[s.name] = rows
    return corpus, per_example


@dataclass
class Measurement:
    """What one model scored: loss/perplexity and generation metrics per set, its outputs and
    per-example scores. Saved for the base model so a resumed run does not measure it again.

    Attributes:
        metrics: ``{set}/{metric}``: losses token-weighted over each loss set, generation
            metrics over each generation set.
        outputs: per generation set, one output per example.
        per_example: per generation set, each example's generation scores.
        losses: per loss set, each example's ``{"loss": ..., "loss_tokens": ...}`` (its mean
            token loss and how many completion tokens it has; see
            :class:`pipeline.scoring.losses.SetLoss`). A generation set's examples are the first
            ones of the loss set of the same name.
        benchmarks: per benchmark set (``benchmark/<task>``), one row per example scored
            (:class:`pipeline.scoring.benchmarks.BenchmarkResult`); empty when none ran.
    """

    metrics: Dict[str, float]
    outputs: Dict[str, List[str]] = field(default_factory=dict)
    per_example: Dict[str, List[Dict[str, float]]] = field(default_factory=dict)
    losses: Dict[str, List[Dict[str, float]]] = field(default_factory=dict)
    benchmarks: Dict[str, List[Dict[str, Any]]] = field(default_factory=dict)

    def as_dict(self) -> Dict[str, Any]:
        return {"metrics": self.metrics, "outputs": self.outputs, "per_example": self.per_example,
                "losses": self.losses, "benchmarks": self.benchmarks}

    @classmethod
    def from_dict(cls, payload: Dict[str, Any]) -> "Measurement":
        """A saved measurement; one saved before per-example losses (or benchmarks) were kept
        reads back without them."""
        return cls(dict(payload["metrics"]), payload["outputs"], payload["per_example"],
                   payload["losses"] if "losses" in payload else {},
                   payload["benchmarks"] if "benchmarks" in payload else {})

    def save(self, path: Path) -> None:
        write_json(path, self.as_dict())

    @classmethod
    def load(cls, path: Path) -> Optional["Measurement"]:
        """The measurement saved at ``path``, or None when there is none.

        A file saved before per-example losses were kept has no ``losses``: it reads back
        without them, and its rows in ``eval/predictions.jsonl`` then carry no base loss (a
        paired comparison on the base's loss says so).
        """
        if not path.exists():
            return None
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))


def _scores(measured: Measurement, name: str, i: int, generated: bool) -> Dict[str, float]:
    """Example ``i`` of set ``name``: its generation scores, and its loss where it has one."""
    scores = dict(measured.per_example[name][i]) if generated else {}
    losses = measured.losses.get(name, [])
    if i < len(losses):
        scores.update(losses[i])
    return scores


def write_predictions(path: Path, sets: List[EvalSet], base: Measurement, tuned: Measurement) -> int:
    """``eval/predictions.jsonl``: one row per example measured, base and tuned side by side.

    A row holds ``set``, ``index`` (in the set), ``prompt``, ``reference`` (a string, or a list
    of several), ``base`` and ``tuned`` (the outputs; null for an example only measured by its
    loss: a set that generates nothing, such as the validation set, or an example beyond
    ``evaluation.max_examples``), and ``base_scores`` / ``tuned_scores``: the example's
    generation scores (``bleu``, ``rougeL`` ...) and, on a loss set, ``loss`` (the mean token
    loss over its completion tokens) and ``loss_tokens`` (how many there are). A set's
    ``{set}/loss`` in ``metrics.json`` is token-weighted over all of them, not the mean of the
    per-example losses (:class:`pipeline.scoring.losses.SetLoss`).

    Args:
        path: the file, written atomically (:mod:`pipeline.runs.atomic`).
        sets: every set to write, each with all its examples (:attr:`Evaluator.recorded_sets`).
        base: the base model's measurement.
        tuned: the tuned model's measurement.

    Returns:
        The number of rows.
    """
    rows = 0
    with open_atomic(path) as f:
        for s in sets:
            outputs = tuned.outputs[s.name] if s.name in tuned.outputs else []
            count = max(len(outputs), len(tuned.losses.get(s.name, [])))
            for i, (prompt, refs) in enumerate(zip(s.prompts[:count], s.references)):
                generated = i < len(outputs)
                row = {"set": s.name, "index": i, "prompt": prompt,
                       "reference": refs[0] if len(refs) == 1 else refs,
                       "base": base.outputs[s.name][i] if generated else None,
                       "tuned": outputs[i] if generated else None,
                       "base_scores": _scores(base, s.name, i, generated),
                       "tuned_scores": _scores(tuned, s.name, i, generated)}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                rows += 1
        for row in benchmark_rows(base, tuned):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            rows += 1
    return rows


def benchmark_rows(base: Measurement, tuned: Measurement) -> Iterator[Dict[str, Any]]:
    """The predictions rows of the benchmarks both models ran: one per example, set
    ``benchmark/<task>``, index lm-eval's document id, each model's output and scores."""
    for name, examples in tuned.benchmarks.items():
        before = {(e["index"], e["prompt"]): e for e in base.benchmarks.get(name, [])}
        for example in examples:
            other = before.get((example["index"], example["prompt"]))
            yield {"set": name, "index": example["index"], "prompt": example["prompt"],
                   "reference": example["reference"],
                   "base": other["output"] if other else None, "tuned": example["output"],
                   "base_scores": dict(other["scores"]) if other else {},
                   "tuned_scores": dict(example["scores"])}


@contextlib.contextmanager
def _without_training_autocast(model: Any) -> Iterator[None]:
    """Runs ``model`` without the autocast wrapper accelerate puts on the forward of a model it
    prepared for mixed precision (it keeps the original as ``_original_forward``)."""
    patched = "_original_forward" in vars(model) and "forward" in vars(model)
    if patched:
        wrapper = vars(model)["forward"]
        model.forward = model._original_forward
    try:
        yield
    finally:
        if patched:
            model.forward = wrapper


class Evaluator:
    """Measures a model on the configured sets: losses (``loss_sets``: per name, tokenized
    examples) and generations (``sets``). ``recorded_sets`` are those of
    ``eval/predictions.jsonl``, every example measured (:func:`recorded_sets`)."""

    def __init__(self, cfg: EvaluationConfig, loss_sets: Dict[str, Any], sets: List[EvalSet],
                 tokenizer: Any, collate: Callable, loss_batch_size: int,
                 slice_for_training: Optional[EvalSet] = None):
        self.cfg, self.loss_sets, self.sets, self.tokenizer = cfg, loss_sets, sets, tokenizer
        self.collate, self.loss_batch_size = collate, loss_batch_size
        self.loss_precision = precision.resolve_loss(cfg.loss_precision)
        self.slice_for_training = slice_for_training
        self.recorded_sets = recorded_sets(loss_sets, sets)

    @classmethod
    def for_data(cls, cfg: EvaluationConfig, data: DataConfig, tokenizer: Any) -> "Evaluator":
        """The sets of a finished run's data (``pipeline.evaluate``, ``pipeline.merge``): its
        splits rebuilt as it split them, batched unpacked, ``cfg.batch_size`` examples a batch."""
        return cls.build(cfg, build_datasets(data, tokenizer), tokenizer, seed=data.seed,
                         plain_template=data.template == "plain", collate=collator(tokenizer, False),
                         loss_batch_size=cfg.batch_size)

    @classmethod
    def build(cls, cfg: EvaluationConfig, splits: Splits, tokenizer: Any, *, seed: int,
              plain_template: bool, collate: Callable, loss_batch_size: int) -> "Evaluator":
        """Sets from the run's splits (``cfg.splits``) and the test splits of the data options
        named by ``cfg.extra_datasets`` (split with ``seed``).

        Args:
            cfg: the evaluation settings.
            splits: the run's tokenized splits.
            tokenizer: the model's tokenizer.
            seed: the split seed of the extra datasets (``data.seed``).
            plain_template: prompts were rendered without a chat template (add the bos token).
            collate: batches loss examples (the run's padding or packing collator).
            loss_batch_size: examples per loss batch.
        """
        extra = {name: build_datasets(load_option("data", name, seed=seed), tokenizer)
                 for name in cfg.extra_datasets}
        named = {"eval": splits.validation, "test": splits.test}
        unknown = [s for s in cfg.splits if s not in named]
        if unknown:
            raise ValueError(f"evaluation.splits has unknown split(s) {unknown}; use eval and/or test")
        loss_sets = {name: ds for name, ds in named.items() if ds is not None}
        loss_sets.update({name: ds.test for name, ds in extra.items() if ds.test is not None})
        candidates = [(name, named[name]) for name in cfg.splits]
        candidates += [(name, ds.test) for name, ds in extra.items()]
        sets = [s for name, ds in candidates if (s := eval_set(name, ds, cfg, plain_template))]
        slice_for_training = None
        if cfg.during_training and splits.validation is not None:
            rows = splits.validation.select(range(min(cfg.during_training_examples,
                                                      len(splits.validation))))
            slice_for_training = eval_set("eval", rows, cfg, plain_template)
        return cls(cfg, loss_sets, sets, tokenizer, collate, loss_batch_size, slice_for_training)

    def measure(self, model: Any, label: str = "", predictions: Optional[Predictions] = None
                ) -> Measurement:
        """Losses on every loss set and generation metrics on every generation set.

        ``label`` (``base``, ``tuned``) names the model in progress lines; ``predictions``: its
        generations when already made (:meth:`predict_base_and_tuned`).

        Both models generate as they are saved and served: in their own dtype, without the
        autocast a bf16/fp16 run trains under (bf16 greedy decoding of a small model can differ
        a lot: measured on the default model, tuned BLEU 4.0 under bf16 autocast against 17.6
        in float32, the same weights). Once trained, accelerate leaves the model's forward under
        autocast; that patch is undone while measuring, so base and tuned match in precision.
        Losses, means over every completion token, are taken in ``evaluation.loss_precision``
        (bf16 autocast where it is native), the same for both models; each example's own mean
        token loss is kept too (``Measurement.losses``).
        """
        metrics: Dict[str, float] = {}
        losses: Dict[str, List[Dict[str, float]]] = {}
        bf16 = self.loss_precision.precision == "bf16"
        with _without_training_autocast(model):
            for name, dataset in self.loss_sets.items():
                measured = evaluate_loss(model, dataset, self.collate, self.loss_batch_size, name, label, bf16)
                metrics.update(measured)
                losses[name] = measured.examples
            if predictions is None:
                predictions = predict(model, self.tokenizer, self.sets, self.cfg, label)
            # in the model's own dtype too, as the base was measured before training
            measured = benchmarks.run(model, self.tokenizer, self.cfg.benchmarks, label)
        corpus, per_example = score(self.sets, predictions, self.cfg)
        metrics.update(corpus)
        metrics.update(measured.metrics)
        return Measurement(metrics, predictions.outputs, per_example, losses, measured.examples)

    def predict_base_and_tuned(self, model: Any) -> Dict[str, Predictions]:
        """``{"base": ..., "tuned": ...}`` generations of a model under a LoRA adapter, from one
        vLLM engine (one start-up instead of two) when ``evaluation.engine=vllm``; empty for the
        built-in engine, or when nothing is generated."""
        if self.cfg.engine != "vllm" or not self.cfg.metrics or not self.sets:
            return {}
        texts = predict_with_vllm(model, self.tokenizer, self.sets, self.cfg, "tuned", with_base=True)
        return {"base": texts["base"], "tuned": texts["model"]}

    def counts(self) -> Dict[str, int]:
        """How many examples each set is measured on (``data/<set>_loss_examples`` and
        ``data/<set>_generation_examples``), logged and kept in ``metrics.json``: a capped
        set's metrics mean that many examples."""
        counts = {f"data/{name}_loss_examples": len(ds) for name, ds in self.loss_sets.items()}
        if self.cfg.metrics:
            counts.update({f"data/{s.name}_generation_examples": len(s.prompts) for s in self.sets})
        log.info("evaluation per model: loss on %s (%s: %s); generation on %s (evaluation.max_examples=%s)",
                 ", ".join(f"{n} {len(ds)}" for n, ds in self.loss_sets.items()) or "nothing",
                 self.loss_precision.precision, self.loss_precision.reason,
                 ", ".join(f"{s.name} {len(s.prompts)}" for s in self.sets) if self.cfg.metrics else "nothing",
                 self.cfg.max_examples)
        bench = self.cfg.benchmarks
        if bench.tasks:
            log.info("benchmarks per model (lm-eval): %s, %s examples per task", ", ".join(bench.tasks),
                     bench.limit if bench.limit is not None else "all")
        return counts

    def during_training(self, model: Any) -> Dict[str, float]:
        """Generation metrics on the validation slice (empty when turned off)."""
        if self.slice_for_training is None or not self.cfg.metrics:
            return {}
        predictions = predict(model, self.tokenizer, [self.slice_for_training], self.cfg)
        corpus, _ = score([self.slice_for_training], predictions, self.cfg)
        return {k.split("/", 1)[1]: v for k, v in corpus.items()}


def _whole(name: str, dataset: Any) -> EvalSet:
    """Every example of a tokenized set as an :class:`EvalSet` (no ``evaluation.max_examples`` cap)."""
    return EvalSet(name=name, prompts=list(dataset["prompt"]), references=[[r] for r in dataset["reference"]],
                   examples=dataset)


def recorded_sets(loss_sets: Dict[str, Any], sets: List[EvalSet]) -> List[EvalSet]:
    """The sets ``eval/predictions.jsonl`` has rows of, each with every example measured: a
    generation set as a loss set of the same name holds it, whole (the generation set is its
    first ``evaluation.max_examples`` examples), then the loss sets that generate nothing (the
    validation set, by default).

    Args:
        loss_sets: per name, the tokenized examples the losses are measured on.
        sets: the generation sets.
    """
    generating = [_whole(s.name, loss_sets[s.name]) if s.name in loss_sets else s for s in sets]
    named = {s.name for s in sets}
    return generating + [_whole(name, ds) for name, ds in loss_sets.items() if name not in named]


def before_after(base: Dict[str, float], tuned: Dict[str, float]) -> Dict[str, float]:
    """``base/*``, ``tuned/*`` and ``delta/*`` (tuned - base) keys for the same metric names
    (no delta of a standard error: it is not a score)."""
    out = {f"base/{k}": v for k, v in base.items()}
    out.update({f"tuned/{k}": v for k, v in tuned.items()})
    out.update({f"delta/{k}": tuned[k] - base[k] for k in base if k in tuned and not k.endswith("_stderr")})
    return out


def loss_logs(metrics: Dict[str, float]) -> Dict[str, float]:
    """A measurement's eval/test losses under the names the Trainer logs them by (``eval_loss``,
    ``test_loss``), so the loss curves in the run folder and W&B start from the base model."""
    return {f"{n}_loss": metrics[f"{n}/loss"] for n in ("eval", "test") if f"{n}/loss" in metrics}


def before_after_table(metrics: Dict[str, float]) -> str:
    """A before/after table of every metric that has ``base/``, ``tuned/`` and ``delta/`` keys."""
    names = sorted(k[len("tuned/"):] for k in metrics if k.startswith("tuned/") and not k.endswith("_stderr")
                   and f"base/{k[len('tuned/'):]}" in metrics)
    width = max([len(n) for n in names] + [6])
    lines = [f"{'metric':<{width}}  {'base':>10}  {'tuned':>10}  {'delta':>10}"]
    for n in names:
        base, tuned = metrics[f"base/{n}"], metrics[f"tuned/{n}"]
        lines.append(f"{n:<{width}}  {base:>10.4g}  {tuned:>10.4g}  {tuned - base:>+10.4g}")
    return "\n".join(lines)
