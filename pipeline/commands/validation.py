"""Rules across config fields, checked on the typed config before any weights load.

Each check returns the problems it finds (never raises), so that one :class:`ConfigError`
reports all of them, each naming the key, the value and the fix. The rules of a stage's own
settings that need its code (the adapter method's, DeepSpeed's, ``trainer.extra`` against
``TrainingArguments``, the metric registry) are asked of that stage.
"""

from __future__ import annotations

import importlib.util
import os
import signal
from pathlib import Path
from typing import List

from pipeline.adapters.lora import NEEDS_WHOLE_WEIGHTS
from pipeline.adapters.registry import ADAPTERS, AdapterSettings
from pipeline.config.app_schema import EvaluateConfig
from pipeline.config.errors import ConfigError
from pipeline.config.options import group_options
from pipeline.config.schema import (DataConfig, EvaluationConfig, ModelConfig, PreemptionConfig, TrainConfig,
                                    TrainerConfig)
from pipeline.data.records import LOADERS
from pipeline.scoring import benchmarks
from pipeline.scoring.metrics import METRICS
from pipeline.trainer import distributed
from pipeline.trainer.build import unknown_extra_keys
from pipeline.trainer.objective import metric_names, reports_any


LOCAL_SUFFIXES = tuple(LOADERS)  # a path with one of these suffixes is a local file


def _check_data(data: DataConfig) -> List[str]:
    problems = []
    fractions = [v for v in (data.validation_size, data.test_size) if 0 <= v < 1]
    if sum(fractions) >= 1:
        problems.append(f"data.validation_size + data.test_size = {sum(fractions)} leaves no "
                        "training examples; make them smaller")
    if data.packing and data.pack_length < data.max_length:
        problems.append(f"data.pack_length={data.pack_length} must be >= data.max_length="
                        f"{data.max_length} (every example must fit in a packed row); raise it, or "
                        "set data.packing=false")
    if data.template == "plain" and data.format == "messages":
        problems.append("data.format=messages needs data.template=chat (a chat template renders "
                        "the turns); use data.template=chat")
    if data.splits is not None and (not isinstance(data.splits, dict) or not all(
            k in ("train", "validation", "test") and isinstance(v, str) for k, v in data.splits.items())):
        problems.append(f"data.splits={data.splits!r} must map train/validation/test to source split "
                        "names, e.g. data.splits='{train: train, validation: validation, test: test}'")
    for i, source in enumerate(data.mix):
        if (source.examples is None) == (source.fraction is None):
            problems.append(f"data.mix[{i}] ({source.data}) needs examples (a count) or fraction (of the "
                            "main training examples), one of them")
        if source.data not in group_options("data"):
            problems.append(f"data.mix[{i}].data={source.data!r} is not a data option; available: "
                            f"{', '.join(group_options('data'))}")
    path = data.path
    looks_local = path.startswith(("/", ".", "~")) or Path(path).suffix in LOCAL_SUFFIXES
    if looks_local and not Path(os.path.expanduser(path)).exists():
        problems.append(f"data.path={path!r} does not exist")
    return problems



def _check_model(model: ModelConfig) -> List[str]:
    problems = []
    if model.source == "hub" and not model.path:
        problems.append("model.path is required with model.source=hub (a hub id or a local folder)")
    elif model.source == "hub" and model.path.startswith(("/", ".", "~")) \
            and not Path(os.path.expanduser(model.path)).is_dir():
        problems.append(f"model.path={model.path!r} is not an existing folder (a local path; "
                        "a hub id looks like org/name)")
    if model.source == "gguf" and not (model.gguf_package and model.gguf_file):
        problems.append("model.gguf_package and model.gguf_file are required with model.source=gguf")
    if model.source == "tiny":
        if model.tiny is None:
            problems.append("model.tiny must describe the architecture with model.source=tiny")
        if not model.tokenizer:
            problems.append("model.tokenizer is required with model.source=tiny (whose tokenizer to use)")
    return problems


def _check_trainer(trainer: TrainerConfig) -> List[str]:
    problems = []
    if trainer.extra:
        problems += unknown_extra_keys(trainer.extra)
    if "torch_compile" in trainer.extra:
        problems.append("trainer.extra.torch_compile is set by trainer.compile; use trainer.compile=on "
                        "(or off, or auto) instead")
    return problems


def _check_preemption(preemption: PreemptionConfig) -> List[str]:
    problems = [f"preemption.signals has {name!r}, not a signal name such as SIGTERM or SIGUSR1"
                for name in preemption.signals
                if name not in signal.Signals.__members__ or name in ("SIGKILL", "SIGSTOP")]
    return problems


def _check_evaluation_sets(ev: EvaluationConfig, data: DataConfig) -> List[str]:
    """The evaluation's settings and sets, for training and ``pipeline.evaluate`` alike."""
    problems = []
    sizes = {"eval": "validation_size", "test": "test_size"}
    for split in ev.splits:
        if split not in sizes:
            problems.append(f"evaluation.splits has {split!r}; use eval and/or test")
        elif getattr(data, sizes[split]) == 0:  # a negative size is reported by _check_data
            problems.append(f"evaluation.splits has {split!r} but data.{sizes[split]}=0; remove it "
                            f"or set data.{sizes[split]}")
    options = group_options("data")
    for name in ev.extra_datasets:
        if name not in options:
            problems.append(f"evaluation.extra_datasets has {name!r}, not a data option; "
                            f"available: {', '.join(options)}")
    for name in ev.metrics:
        if name not in METRICS and not name.startswith("evaluate:"):
            problems.append(f"evaluation.metrics has unknown metric {name!r}; available: "
                            f"{', '.join(sorted(METRICS))}, or evaluate:<name or path>")
    if {"accuracy", "macro_f1"} & set(ev.metrics) and not ev.labels:
        problems.append("evaluation.labels must list the label set for accuracy / macro_f1, "
                        "e.g. evaluation.labels=[positive,negative]")
    if ev.engine == "vllm" and ev.decoding.strategy == "beam" and ev.metrics:
        problems.append("evaluation.engine=vllm: evaluation.decoding.strategy=beam is not "
                        "supported; use greedy or sample, or evaluation.engine=transformers")
    return problems + benchmarks.problems(ev.benchmarks)


def _check_evaluation(cfg: TrainConfig) -> List[str]:
    ev = cfg.evaluation
    problems = _check_evaluation_sets(ev, cfg.data)
    if ev.engine == "vllm":
        method = ADAPTERS.get(cfg.adapter.method)
        if method is not None and not method.vllm:
            problems.append(f"evaluation.engine=vllm: vLLM does not generate with adapter="
                            f"{cfg.adapter.method} (LoRA, full and none only); use "
                            "evaluation.engine=transformers")
        if cfg.distributed.nproc_per_node > 1:
            problems.append("evaluation.engine=vllm runs in one process: every rank of "
                            f"distributed.nproc_per_node={cfg.distributed.nproc_per_node} would start "
                            "an engine; use evaluation.engine=transformers, or re-evaluate the run with "
                            "python -m pipeline.evaluate run=<run> evaluation.engine=vllm")
    if ev.during_training and not (cfg.trainer.eval_steps and cfg.data.validation_size > 0
                                   and ev.metrics):
        problems.append("evaluation.during_training needs trainer.eval_steps, a validation split "
                        "(data.validation_size > 0) and evaluation.metrics")
    return problems


def _check_objective(cfg: TrainConfig) -> List[str]:
    name = cfg.objective.metric
    if reports_any(cfg, name):
        return []
    return [f"objective.metric={name!r} is not a metric this run reports; available: "
            f"{', '.join(metric_names(cfg))}"]


def _check_distributed(cfg: TrainConfig, settings: AdapterSettings) -> List[str]:
    """What cannot run under ``distributed`` with this adapter, precision and machine."""
    cuda = None
    if cfg.distributed.nproc_per_node > 1:  # only then does the GPU count matter: torch is slow to import
        import torch  # lazy: torch takes seconds to import; only several processes need the GPU count

        cuda = torch.cuda.device_count() if torch.cuda.is_available() else None
    installed = importlib.util.find_spec("deepspeed") is not None
    return distributed.check(cfg.distributed, settings, cfg.trainer.precision, cuda, installed)


def _check_resume(resume: str) -> List[str]:
    if resume in ("never", "auto") or Path(resume).exists():
        return []
    return [f"resume={resume!r} is neither never, auto nor an existing run folder or checkpoint"]


def problems(cfg: TrainConfig, check_adapter: bool = True) -> List[str]:
    """Every problem with a ``train`` config that shows without the model's weights.

    Args:
        cfg: the typed ``train`` config.
        check_adapter: run the adapter method's own checks (off when its keys are already wrong).
    """
    found = _check_data(cfg.data)
    found += _check_model(cfg.model)
    found += _check_trainer(cfg.trainer)
    found += _check_resume(cfg.resume)
    found += _check_preemption(cfg.preemption)
    found += _check_evaluation(cfg)
    found += _check_objective(cfg)
    if check_adapter and cfg.adapter.method in ADAPTERS:
        settings: AdapterSettings = cfg.adapter
        found += settings.check(None)  # the architecture's part: once the model's config is read
        if settings.quantized and cfg.model.dtype == "float16" and cfg.trainer.precision != "fp16":
            found.append("model.dtype=float16 with a quantized base trains in fp16 weights "
                         "without loss scaling; use model.dtype=float32 or trainer.precision=fp16")
        found += _check_distributed(cfg, settings)
        init = getattr(settings, "init", None)
        if init in NEEDS_WHOLE_WEIGHTS and cfg.distributed.zero_stage == 3:
            found.append(f"adapter.init={init} under ZeRO-3: {NEEDS_WHOLE_WEIGHTS[init]}; use distributed=zero2 "
                         "or adapter.init=default")
    return found


def validate_evaluate(cfg: EvaluateConfig, data: DataConfig) -> None:
    """The ``evaluate`` config's problems at once, before any model loads: its evaluation
    settings against the data it measures (``data``: the run's, or ``data=``), the model.

    Raises:
        ConfigError: listing every problem.
    """
    found = _check_evaluation_sets(cfg.evaluation, data)
    if not cfg.run:
        found += _check_data(data) + _check_model(cfg.model)
        if cfg.adapter_method not in ADAPTERS:
            found.append(f"adapter_method={cfg.adapter_method!r} is unknown; choose one of: "
                         f"{', '.join(sorted(ADAPTERS))}")
    if found:
        raise ConfigError(found)
