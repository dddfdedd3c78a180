"""Evaluation stage: the base and the tuned model answer the same prompts with the same decoding.

Generation is batched (prompts sorted by length, left padding). Scores come from
:mod:`pipeline.metrics` (sacrebleu, rouge-score, SQuAD-style EM/F1, classification). The result
is namespaced metrics (``base/test/bleu``, ``tuned/test/bleu``, ``delta/test/bleu``), one
predictions row per example, and a before/after table.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

from pipeline.config import DecodingConfig, EvaluationConfig
from pipeline.progress import Progress

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


def generation_kwargs(decoding: DecodingConfig, tokenizer: Any) -> Dict[str, Any]:
    """``model.generate`` arguments for greedy, sampling or beam search decoding."""
    kwargs: Dict[str, Any] = {"max_new_tokens": decoding.max_new_tokens, "use_cache": True,
                              "pad_token_id": tokenizer.pad_token_id,
                              "eos_token_id": tokenizer.eos_token_id}
    if decoding.strategy == "sample":
        kwargs.update(do_sample=True, temperature=decoding.temperature, top_p=decoding.top_p)
    elif decoding.strategy == "beam":
        kwargs.update(do_sample=False, num_beams=decoding.num_beams)
    else:
        kwargs.update(do_sample=False, num_beams=1)
    if decoding.stop_strings:
        kwargs.update(stop_strings=list(decoding.stop_strings), tokenizer=tokenizer)
    return kwargs


def _cut_at_stop(text: str, stops: Sequence[str]) -> str:
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    return (text[:cut] if cut >= 0 else text).strip()


def _left_padded(rows: List[List[int]], pad_id: int, prefix: Optional[Any], device: Any) -> Dict[str, Any]:
    """Generation inputs for token rows: left-padded; with a shared prefix, the prefix first, then
    the padding, then each row's rest (positions follow the attention mask, so the rest of every
    row continues right after the prefix), and the prefix's cache."""
    import torch

    skip = len(prefix) if prefix is not None else 0
    rest = [row[skip:] for row in rows]
    width = max(len(r) for r in rest)
    head = list(prefix.tokens) if prefix is not None else []
    inputs = {
        "input_ids": torch.tensor([head + [pad_id] * (width - len(r)) + r for r in rest], device=device),
        "attention_mask": torch.tensor([[1] * skip + [0] * (width - len(r)) + [1] * len(r) for r in rest],
                                       device=device),
    }
    if prefix is not None:
        inputs[prefix.argument] = prefix.cache_for(len(rows))
    return inputs


def generate(model: Any, tokenizer: Any, prompts: List[str], decoding: DecodingConfig,
             batch_size: int, add_special_tokens: bool = False, what: str = "generation") -> List[str]:
    """Generates one completion per prompt, batched; returns them in the prompts' order.

    Prompts are sorted by length so that a batch pads little; the RNG is seeded from
    ``decoding.seed`` so the base and the tuned model sample alike. The tokens every prompt starts
    with are computed once (:mod:`pipeline.prefix`; not for beam search, which reorders the cache).
    """
    import torch

    from pipeline.prefix import SharedPrefix, shared_length

    kwargs = generation_kwargs(decoding, tokenizer)
    rows = tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"] if prompts else []
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: List[str] = [""] * len(prompts)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    torch.manual_seed(decoding.seed)
    try:
        with Progress(len(prompts), what, "prompts") as progress, torch.no_grad():
            shared = shared_length(rows) if rows and decoding.strategy != "beam" else 0
            prefix = SharedPrefix.build(model, rows[0][:shared], generation=True) if shared else None
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                inputs = _left_padded([rows[i] for i in batch], pad_id, prefix, model.device)
                generated = model.generate(**inputs, **kwargs)
                texts = tokenizer.batch_decode(generated[:, inputs["input_ids"].shape[1]:],
                                               skip_special_tokens=True)
                for i, text in zip(batch, texts):
                    outputs[i] = _cut_at_stop(text, decoding.stop_strings)
                progress.update(len(batch))
    finally:
        model.train(was_training)
    return outputs


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
    from pipeline import vllm_engine

    log.info("%s generation through vLLM: %s%s", label or "model",
             ", ".join(f"{s.name} {len(s.prompts)} prompts" for s in sets),
             "; the base model's from the same engine" if with_base else "")
    texts = vllm_engine.predict(model, tokenizer, [(s.prompts, s.add_special_tokens) for s in sets],
                                cfg.decoding, with_base)
    return {key: Predictions({s.name: [_cut_at_stop(t, cfg.decoding.stop_strings) for t in outputs]
                              for s, outputs in zip(sets, per_set)})
            for key, per_set in texts.items()}


def score(sets: List[EvalSet], predictions: Predictions, cfg: EvaluationConfig
          ) -> tuple[Dict[str, float], Dict[str, List[Dict[str, float]]]]:
    """Corpus metrics ``{set}/{metric}`` and per-example scores for each set."""
    from pipeline import metrics as M

    corpus: Dict[str, float] = {}
    per_example: Dict[str, List[Dict[str, float]]] = {}
    for s in sets:
        if s.name not in predictions.outputs:
            continue
        values, rows = M.compute(list(cfg.metrics), predictions.outputs[s.name], s.references,
                                 labels=list(cfg.labels) if cfg.labels else None)
        corpus.update({f"{s.name}/{k}": v for k, v in values.items()})
        per_example[s.name] = rows
    return corpus, per_example


def write_predictions(path: Path, sets: List[EvalSet], base: Measurement, tuned: Measurement) -> int:
    """``eval/predictions.jsonl``: prompt, reference, base and tuned output and their scores.

    Written atomically (:mod:`pipeline.atomic`). Returns the number of rows.
    """
    from pipeline.atomic import open_atomic

    rows = 0
    with open_atomic(path) as f:
        for s in sets:
            if s.name not in tuned.outputs:
                continue
            for i, (prompt, refs) in enumerate(zip(s.prompts, s.references)):
                row = {"set": s.name, "index": i, "prompt": prompt,
                       "reference": refs[0] if len(refs) == 1 else refs,
                       "base": base.outputs[s.name][i], "tuned": tuned.outputs[s.name][i],
                       "base_scores": base.per_example[s.name][i],
                       "tuned_scores": tuned.per_example[s.name][i]}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                rows += 1
    return rows


@dataclass
class Measurement:
    """What one model scored: loss/perplexity and generation metrics per set, its outputs and
    per-example scores. Saved for the base model so a resumed run does not measure it again."""

    metrics: Dict[str, float]
    outputs: Dict[str, List[str]] = field(default_factory=dict)
    per_example: Dict[str, List[Dict[str, float]]] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        from pipeline.runfolder import write_json

        write_json(path, {"metrics": self.metrics, "outputs": self.outputs,
                          "per_example": self.per_example})

    @classmethod
    def load(cls, path: Path) -> Optional["Measurement"]:
        if not path.exists():
            return None
        payload = json.loads(path.read_text(encoding="utf-8"))
        return cls(payload["metrics"], payload["outputs"], payload["per_example"])


def _keeps_logits(model: Any) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (transformers' causal LMs do; a
    model with remote code may not)."""
    from pipeline.prefix import forward_parameters

    return "logits_to_keep" in forward_parameters(model)


def _loss_batch(rows: List[int], ids: Any, labels: Any, collate: Callable, prefix: Optional[Any],
                device: Any) -> Dict[str, Any]:
    """The model inputs and labels of ``rows``: through the run's collator, or, with a shared
    prefix, the rest of each example right-padded behind a copy of the prefix's cache."""
    import torch

    if prefix is None:
        batch = collate([{"input_ids": ids[i], "labels": labels[i]} for i in rows])
        return {k: v.to(device) for k, v in batch.items()}
    skip = len(prefix)
    width = max(len(ids[i]) for i in rows) - skip
    pad = [width - (len(ids[i]) - skip) for i in rows]
    as_tensor = lambda lists: torch.tensor(lists, device=device)  # noqa: E731
    return {
        "input_ids": as_tensor([list(ids[i][skip:]) + [0] * p for i, p in zip(rows, pad)]),
        "attention_mask": as_tensor([[1] * (skip + width - p) + [0] * p for p in pad]),
        "labels": as_tensor([list(labels[i][skip:]) + [-100] * p for i, p in zip(rows, pad)]),
        prefix.argument: prefix.cache_for(len(rows)), "use_cache": True,
    }


def evaluate_loss(model: Any, dataset: Optional[Any], collate: Callable, batch_size: int,
                  name: str, label: str = "", bf16: bool = False) -> Dict[str, float]:
    """Token-weighted mean loss and perplexity on the completion tokens of ``dataset``.

    Computed here rather than by ``Trainer.evaluate``, whose loss is a mean of per-batch means
    and so changes with the batch size; this one is exp(total NLL / total completion tokens)
    whatever the batching. That also lets the batches group examples of similar length (the
    sum does not depend on the order), so a batch pads little, or nothing with the packing
    collator. The tokens every example starts with are computed once (:mod:`pipeline.prefix`).
    ``bf16``: under bf16 autocast (``evaluation.loss_precision``); the cross-entropy itself is
    taken in fp32.
    """
    import torch
    import torch.nn.functional as F

    from pipeline.prefix import SharedPrefix, shared_length

    if dataset is None:
        return {}
    was_training = model.training
    model.eval()
    nll, tokens = 0.0, 0
    ids, labels_all = dataset["input_ids"], dataset["labels"]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    keep = _keeps_logits(model)
    try:
        # no_grad rather than inference_mode: the same model trains next, and a buffer a model
        # caches lazily during this forward (rotary tables, 4-bit quant state) would be an
        # inference tensor that autograd then refuses to save.
        with Progress(len(order), f"{label} {name} loss".strip(), "examples") as progress, \
                torch.no_grad(), torch.autocast(model.device.type, torch.bfloat16, enabled=bf16):
            shared = shared_length(ids, labels_all) if keep and len(ids) else 0
            prefix = SharedPrefix.build(model, ids[0][:shared]) if shared else None
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                batch = _loss_batch(chunk, ids, labels_all, collate, prefix, model.device)
                targets = batch.pop("labels")[:, 1:]  # position p predicts token p + 1
                if keep:
                    # Only positions that predict a completion token go through the output
                    # layer (vocabulary-sized: a fifth of a small model's forward, and most
                    # positions of a short-answer task are prompt): the same numbers, cheaper.
                    positions = (targets != -100).any(0).nonzero().flatten()
                    batch.setdefault("use_cache", False)
                    logits = model(**batch, logits_to_keep=positions).logits
                    targets = targets[:, positions]
                else:
                    logits = model(**batch, use_cache=False).logits[:, :-1]
                nll += F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                       ignore_index=-100, reduction="sum").item()
                tokens += int((targets != -100).sum())
                progress.update(len(chunk))
    finally:
        model.train(was_training)
    loss = nll / max(tokens, 1)
    return {f"{name}/loss": loss, f"{name}/perplexity": math.exp(min(loss, 50.0))}


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
    """Measures a model on the configured sets: losses and generations."""

    def __init__(self, cfg: EvaluationConfig, loss_sets: Dict[str, Any], sets: List[EvalSet],
                 tokenizer: Any, slice_for_training: Optional[EvalSet] = None):
        from pipeline import precision

        self.cfg, self.loss_sets, self.sets, self.tokenizer = cfg, loss_sets, sets, tokenizer
        self.loss_precision = precision.resolve_loss(cfg.loss_precision)
        self.slice_for_training = slice_for_training

    @classmethod
    def build(cls, cfg: EvaluationConfig, splits: Any, tokenizer: Any, seed: int,
              plain_template: bool) -> "Evaluator":
        """Sets from the run's splits (``cfg.splits``) and the test splits of the data options
        named by ``cfg.extra_datasets`` (split with ``seed``)."""
        from pipeline.config import load_option
        from pipeline.data import build_datasets

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
        return cls(cfg, loss_sets, sets, tokenizer, slice_for_training)

    def measure(self, trainer: Any, label: str = "", predictions: Optional[Predictions] = None
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
        (bf16 autocast where it is native), the same for both models.

        The eval/test losses are also logged through the trainer (step 0 for the base model),
        so the loss curves in the run folder and W&B start from the base model.
        """
        metrics: Dict[str, float] = {}
        model = trainer.model
        bf16 = self.loss_precision.precision == "bf16"
        with _without_training_autocast(model):
            for name, dataset in self.loss_sets.items():
                metrics.update(evaluate_loss(model, dataset, trainer.data_collator,
                                             trainer.args.per_device_eval_batch_size, name, label, bf16))
            if predictions is None:
                predictions = predict(model, self.tokenizer, self.sets, self.cfg, label)
        self.log_losses(trainer, metrics)
        corpus, per_example = score(self.sets, predictions, self.cfg)
        metrics.update(corpus)
        return Measurement(metrics, predictions.outputs, per_example)

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
        return counts

    @staticmethod
    def log_losses(trainer: Any, metrics: Dict[str, float]) -> None:
        """Logs the eval/test losses of a measurement through the trainer (W&B, history)."""
        trainer.log({f"{n}_loss": metrics[f"{n}/loss"] for n in ("eval", "test") if f"{n}/loss" in metrics})

    def during_training(self, model: Any) -> Dict[str, float]:
        """Generation metrics on the validation slice (empty when turned off)."""
        if self.slice_for_training is None or not self.cfg.metrics:
            return {}
        predictions = predict(model, self.tokenizer, [self.slice_for_training], self.cfg)
        corpus, _ = score([self.slice_for_training], predictions, self.cfg)
        return {k.split("/", 1)[1]: v for k, v in corpus.items()}


def comparison_table(metrics: Dict[str, float]) -> str:
    """A before/after table of every metric that has ``base/``, ``tuned/`` and ``delta/`` keys."""
    names = sorted(k[len("tuned/"):] for k in metrics if k.startswith("tuned/")
                   and f"base/{k[len('tuned/'):]}" in metrics)
    width = max([len(n) for n in names] + [6])
    lines = [f"{'metric':<{width}}  {'base':>10}  {'tuned':>10}  {'delta':>10}"]
    for n in names:
        base, tuned = metrics[f"base/{n}"], metrics[f"tuned/{n}"]
        lines.append(f"{n:<{width}}  {base:>10.4g}  {tuned:>10.4g}  {tuned - base:>+10.4g}")
    return "\n".join(lines)
