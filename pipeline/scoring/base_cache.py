"""The base model's measurement, cached across runs.

Every run measures the base model on its evaluation sets before training. The runs of a sweep
or of a multirun over seeds measure the same base on the same examples, so the result is stored
under the model cache, keyed by a fingerprint of everything it depends on:

- the base weights: the model folder (path, and every file's name, size and modification time)
  or the hub id and revision, the model settings (dtype, attention implementation) and the
  quantisation (a 4-bit base is a different base); not ``trainer.precision``: measurements run
  without the training autocast;
- the tokenizer (its files are in the model folder) and the exact evaluation examples: every
  loss set's token ids and labels (so the template and ``max_length`` are in), every generation
  set's prompts and references;
- decoding (its seed only when it samples), metric settings, the evaluation batch size
  (batched generation pads) and the precision of the losses (``evaluation.loss_precision``);
- the versions of torch, transformers, peft and bitsandbytes;
- with ``evaluation.benchmarks.tasks``: the tasks and their settings (limit, few-shot, seed,
  batch size), lm-eval's version and the files of ``include_path`` (task YAMLs by content, their
  data files by size and modification time).

A run that finds its fingerprint reuses the measurement; ``evaluation.cache_base=false`` opts
out. An entry that cannot be read back whole is ignored with a warning and measured again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional

from pipeline.config.options import plain
from pipeline.config.schema import ModelConfig, QuantizationSettings
from pipeline.runs.runfolder import RunFolder, package_versions, write_json
from pipeline.scoring import benchmarks
from pipeline.scoring.measurement import Evaluator, Measurement

log = logging.getLogger(__name__)

# Bump when the stored layout or what a measurement means changes (2: losses behind a shared
# prefix; 3: each example's loss kept too).
FORMAT = 3
PACKAGES = ("torch", "transformers", "peft", "bitsandbytes")


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _weights(folder: str, model_settings: Dict[str, Any]) -> Dict[str, Any]:
    """What identifies the base weights: a local folder's files, else the hub id and revision."""
    path = Path(folder)
    if not path.is_dir():
        return {"hub": folder, "revision": model_settings.get("revision")}
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                   for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    return {"folder": str(path.resolve()), "files": files}


def _examples(evaluator: Evaluator) -> Dict[str, Any]:
    loss = {name: _digest({"input_ids": ds["input_ids"], "labels": ds["labels"]})
            for name, ds in evaluator.loss_sets.items()}
    generation = {s.name: _digest({"prompts": s.prompts, "references": s.references,
                                   "special": s.add_special_tokens}) for s in evaluator.sets}
    return {"loss": loss, "generation": generation}


def fingerprint(folder: str, model_settings: Dict[str, Any], quantization: Optional[Any],
                evaluator: Evaluator) -> str:
    """The cache key of a base measurement (a hex digest).

    Args:
        folder: the resolved model folder or hub id (``pipeline.model.loading.resolve_folder``).
        model_settings: the ``model`` config as a plain dict.
        quantization: the adapter's quantisation settings (None for a float base).
        evaluator: the run's evaluation sets and settings.
    """
    settings = {k: v for k, v in model_settings.items() if k not in ("name", "gradient_checkpointing")}
    evaluation = evaluator.cfg
    decoding = plain(evaluation.decoding)
    if decoding.get("strategy") != "sample":
        decoding.pop("seed", None)  # greedy and beam search do not draw: a multirun's seeds share it
    # The dtype the base's weights are measured in (model.dtype; auto: the checkpoint's own), so
    # that a measurement of an fp32 base never stands for a bf16 one.
    weight_dtype = settings.get("dtype")
    if weight_dtype == "auto" and (Path(folder) / "config.json").is_file():
        checkpoint = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
        weight_dtype = checkpoint.get("dtype") or checkpoint.get("torch_dtype") or "float32"
    return _digest({
        "format": FORMAT,
        "weights": _weights(folder, settings), "model": settings, "weight_dtype": weight_dtype,
        "quantization": quantization.as_dict() if quantization else None,
        "examples": _examples(evaluator),
        "decoding": decoding, "metrics": list(evaluation.metrics),
        "labels": list(evaluation.labels) if evaluation.labels else None,
        "batch_size": evaluation.batch_size, "loss_precision": evaluator.loss_precision.precision,
        "packages": package_versions(PACKAGES),
        # vLLM's kernels may break a near-tie otherwise (the default is left out: older keys hold)
        **({"engine": evaluation.engine} if evaluation.engine != "transformers" else {}),
        # (absent without tasks, so that the keys of runs without benchmarks hold)
        **({"benchmarks": bench} if (bench := benchmarks.fingerprint_payload(evaluation.benchmarks)) else {}),
    })



def entry_path(cache_dir: str, key: str) -> Path:
    """``<paths.base_cache_dir>/<fingerprint>.json``."""
    return Path(os.path.expanduser(cache_dir)) / f"{key}.json"


def load(cache_dir: str, key: str, evaluator: Evaluator) -> Optional[Measurement]:
    """The cached measurement for ``key``, or None when there is none or it cannot be trusted."""
    path = entry_path(cache_dir, key)
    if not path.exists():
        return None
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        # An entry without per-example losses (written before they were kept) is incomplete.
        measurement = Measurement.from_dict(payload)
        problem = _incomplete(payload, key, measurement, evaluator)
    except (OSError, ValueError, KeyError, TypeError) as err:
        problem = f"unreadable ({type(err).__name__}: {err})"
    if problem:
        log.warning("ignoring the cached base measurement %s: %s; measuring the base again", path, problem)
        return None
    return measurement


def _incomplete(payload: Dict[str, Any], key: str, measurement: Measurement, evaluator: Evaluator) -> str:
    """Why a read-back entry does not match what this run would measure ('' when it does)."""
    if payload.get("fingerprint") != key:
        return "its fingerprint does not match its file name"
    for name, dataset in evaluator.loss_sets.items():
        if f"{name}/loss" not in measurement.metrics:
            return f"no {name}/loss"
        if len(measurement.losses.get(name) or []) != len(dataset):
            return f"set {name!r} lacks per-example losses or has the wrong number of them"
    if evaluator.cfg.metrics:
        for s in evaluator.sets:
            outputs = measurement.outputs.get(s.name) or []
            scores = measurement.per_example.get(s.name) or []
            if not len(outputs) == len(scores) == len(s.prompts):
                return f"set {s.name!r} is missing or has the wrong number of examples"
    for task in evaluator.cfg.benchmarks.tasks:
        name = benchmarks.set_name(task)
        if not measurement.benchmarks.get(name) or not any(k.startswith(f"{name}/") for k in measurement.metrics):
            return f"benchmark {task!r} lacks its results or its examples"
    return ""


def store(cache_dir: str, key: str, measurement: Measurement) -> Path:
    """Writes the entry atomically (a reader sees the whole file or none)."""
    path = entry_path(cache_dir, key)
    write_json(path, {"fingerprint": key, "format": FORMAT, **measurement.as_dict()})
    return path


class BaseSource:
    """Where a run's base measurement comes from: an earlier attempt of this run (``resumed``),
    the cache of base measurements (``cached``), or a measurement now (``measured``). Recorded in
    ``run.json`` as ``base_measurement`` with the fingerprint; the run folder keeps its own copy
    (``eval/base.json``), so it stays self-contained and resumable."""

    def __init__(self, run: RunFolder, cache_dir: str, key: Optional[str], measurement: Optional[Measurement],
                 writes: bool):
        self.run, self.cache_dir, self.key, self.measurement, self.writes = run, cache_dir, key, measurement, writes

    @classmethod
    def find(cls, run: RunFolder, cache_dir: str, evaluator: Evaluator, *, folder: str, model: ModelConfig,
             quantization: Optional[QuantizationSettings], use_cache: bool, writes: bool) -> "BaseSource":
        """The base measurement this run already has, if any.

        Args:
            run: the run folder (``eval/base.json`` of an earlier attempt).
            cache_dir: ``paths.base_cache_dir``.
            evaluator: the run's evaluation sets and settings.
            folder: the resolved base model folder.
            model: the base model's settings.
            quantization: the 4-bit settings of a quantized base, or None.
            use_cache: read and fill the cache (``evaluation.cache_base``, and a single process:
                several processes measure together, ZeRO-3 gathering weights collectively, and must
                agree on measuring, which a cache that another run may fill meanwhile cannot promise).
            writes: this process writes files (rank 0).
        """
        resumed = Measurement.load(run.path / "eval" / "base.json")
        key = fingerprint(folder, plain(model), quantization, evaluator) if use_cache else None
        cached = load(cache_dir, key, evaluator) if key and resumed is None else None
        source = "resumed" if resumed else "cached" if cached else "measured"
        if cached:
            log.info("base model: measurement reused from the cache (fingerprint %s)", key[:12])
            if writes:
                cached.save(run.path / "eval" / "base.json")
        run.update(base_measurement=source, base_fingerprint=key)
        return cls(run, cache_dir, key, resumed or cached, writes)

    def save(self, measured: Measurement) -> None:
        """Keeps a new measurement in the run folder (for a resume) and in the cache."""
        if not self.writes:
            return
        measured.save(self.run.path / "eval" / "base.json")
        if self.key:
            store(self.cache_dir, self.key, measured)
