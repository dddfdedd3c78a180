"""Standard benchmarks on the model in memory, through lm-evaluation-harness.

lm-eval (the ``bench`` extra) is the engine: its task registry, prompts, few-shot sampling,
filters and metrics; this module wires it to a model already loaded (the base with its adapter
off, then the tuned model, the 4-bit base included) through lm-eval's own ``HFLM``, without
saving and reloading, and turns its results into the run's metric names:

- ``benchmark/<task>/<metric>`` from lm-eval's ``"<metric>,<filter>"`` keys: the filter
  ``none`` is dropped (``acc,none`` -> ``acc``), any other is kept as a suffix
  (``exact_match,strict-match`` -> ``exact_match_strict-match``); the standard error where
  lm-eval gives one is ``<metric>[_<filter>]_stderr``;
- a group (``mmlu``) reports its totals only, unless ``evaluation.benchmarks.subtasks`` asks for
  each subtask too;
- each example's scores (lm-eval's ``log_samples``) under the set ``benchmark/<task>``, for the
  paired intervals of the report and of sweep constraints; a group's examples are those of its
  subtasks.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import logging
import os
import random
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import numpy as np

from pipeline.config.errors import PipelineError
from pipeline.config.schema import BenchmarksConfig

log = logging.getLogger(__name__)

PREFIX = "benchmark"
EXTRA = "pip install -e '.[bench]' (lm-evaluation-harness)"
# lm-eval bootstraps the standard error of metrics that are not means (BLEU, F1 over a corpus)
# with 100,000 resamples by default: minutes on a CPU for a few hundred examples. A thousand
# give the second digit of a standard error, which is all a report shows.
BOOTSTRAP_ITERS = 1000
# lm-eval writes these next to a task's figures; they are not metrics.
NOT_METRICS = ("alias", "name", "sample_len", "sample_count", "samples")


def installed() -> bool:
    """Whether lm-evaluation-harness is importable (the ``bench`` extra)."""
    try:
        metadata.version("lm_eval")
    except metadata.PackageNotFoundError:
        return False
    return True


def _version() -> str:
    return metadata.version("lm_eval") if installed() else "missing"


def set_name(task: str) -> str:
    """The evaluation-set name of a task's examples: ``benchmark/<task>``."""
    return f"{PREFIX}/{task}"


def metric_key(lm_eval_key: str) -> Optional[str]:
    """Our name for one of lm-eval's result keys, or None for a key that is not a metric.

    ``acc,none`` -> ``acc``; ``exact_match,strict-match`` -> ``exact_match_strict-match``;
    ``acc_stderr,none`` -> ``acc_stderr``; ``exact_match_stderr,strict-match`` ->
    ``exact_match_strict-match_stderr``.
    """
    if "," not in lm_eval_key:
        return None
    metric, _, flt = lm_eval_key.partition(",")
    stderr = metric.endswith("_stderr")
    metric = metric[: -len("_stderr")] if stderr else metric
    name = metric if flt == "none" else f"{metric}_{flt}"
    return f"{name}_stderr" if stderr else name


def task_manager(cfg: BenchmarksConfig) -> Any:
    """lm-eval's task index: the tasks of ``include_path`` alone when they are every task asked
    for (indexing lm-eval's ~15,000 built-in tasks takes seconds), else the built-in ones too."""
    from lm_eval.tasks import TaskManager  # lazy: the bench extra; imports torch and datasets

    include = os.path.expanduser(cfg.include_path) if cfg.include_path else None
    if include:
        own = TaskManager(include_path=include, include_defaults=False)
        if all(t in own.all_tasks for t in cfg.tasks):
            return own
    return TaskManager(include_path=include)


def problems(cfg: BenchmarksConfig) -> List[str]:
    """What keeps ``evaluation.benchmarks`` from running, before any model loads: the extra,
    the task folder, and task names lm-eval does not know (with the closest ones)."""
    if not cfg.tasks:
        return []
    if not installed():
        return [f"evaluation.benchmarks.tasks={list(cfg.tasks)} needs lm-evaluation-harness: {EXTRA}"]
    found = []
    if cfg.include_path and not Path(os.path.expanduser(cfg.include_path)).is_dir():
        found.append(f"evaluation.benchmarks.include_path={cfg.include_path} is not a folder "
                     "(give the folder of your task YAMLs)")
        return found
    known = task_manager(cfg).all_tasks
    for task in cfg.tasks:
        if task not in known:
            close = difflib.get_close_matches(task, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            where = f" nor in {cfg.include_path}" if cfg.include_path else \
                " (a task of your own: evaluation.benchmarks.include_path=<folder of its YAML>)"
            found.append(f"evaluation.benchmarks.tasks: {task!r} is not an lm-eval task, group "
                         f"or tag{where}{hint}")
    return found


def _folder_state(folder: Path) -> List[Any]:
    """Every file below ``folder``: its path, and for a task YAML its text, for any other file
    (the task's data) its size and modification time."""
    state = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = str(path.relative_to(folder))
        if path.suffix in (".yaml", ".yml", ".py"):
            state.append([rel, hashlib.sha256(path.read_bytes()).hexdigest()])
        else:
            stat = path.stat()
            state.append([rel, stat.st_size, stat.st_mtime_ns])
    return state


def fingerprint_payload(cfg: BenchmarksConfig) -> Optional[Dict[str, Any]]:
    """What a base measurement's benchmark results depend on (None when no task is asked for):
    the settings, lm-eval's version (its built-in task YAMLs) and the files of ``include_path``."""
    if not cfg.tasks:
        return None
    folder = Path(os.path.expanduser(cfg.include_path)) if cfg.include_path else None
    return {"tasks": list(cfg.tasks), "limit": cfg.limit, "num_fewshot": cfg.num_fewshot,
            "batch_size": cfg.batch_size, "subtasks": cfg.subtasks, "chat_template": cfg.chat_template,
            "seed": cfg.seed, "lm_eval": _version(),
            "include": _folder_state(folder) if folder and folder.is_dir() else None}


@dataclass
class BenchmarkResult:
    """What one model scored on the benchmarks.

    Attributes:
        metrics: ``benchmark/<task>/<metric>`` (and ``..._stderr``).
        examples: per set ``benchmark/<task>``, one row per example: ``index`` (lm-eval's
            doc id), ``prompt``, ``reference``, ``output`` (the chosen choice or the filtered
            generation) and ``scores`` (``{metric: value}``, named as in ``metrics``).
    """

    metrics: Dict[str, float] = field(default_factory=dict)
    examples: Dict[str, List[Dict[str, Any]]] = field(default_factory=dict)


@contextlib.contextmanager
def _own_random_state() -> Iterator[None]:
    """lm-eval seeds Python's, numpy's and torch's generators; a benchmark of the base before
    training must not change what the run then draws (data order, dropout)."""
    import torch  # lazy: loaded by then anyway (a model is in memory)

    states = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])


def _dataset_error(err: BaseException, task: str) -> Optional[str]:
    """A message for a task whose dataset cannot be fetched (no network, offline mode)."""
    text = f"{type(err).__name__}: {err}"
    offline = ("ConnectionError", "OfflineModeIsEnabled", "LocalEntryNotFoundError", "HfHubHTTPError",
               "DatasetNotFoundError", "ConnectTimeout", "MaxRetryError", "Couldn't reach", "offline")
    if not any(mark in text for mark in offline):
        return None
    return (f"benchmark task {task!r} needs its dataset, which could not be loaded ({text.splitlines()[0]}). "
            "Standard tasks download their data from the Hugging Face Hub on first use: run once where "
            "the Hub is reachable (the data is then cached), and set HF_DATASETS_OFFLINE=1 to read that "
            "cache; or give a task of your own with local data files (evaluation.benchmarks.include_path)")


def _name_the_failing_task(manager: Any, tasks: List[str], err: BaseException) -> None:
    """When ``err`` is a dataset that could not be fetched, raises an error naming the task it
    belongs to (each task loaded alone; lm-eval's own error names only the dataset)."""
    if _dataset_error(err, "") is None:
        return
    for task in tasks:
        try:
            manager.load([task])
        except Exception as own:
            why = _dataset_error(own, task)
            if why:
                raise PipelineError(why) from own


def run(model: Any, tokenizer: Any, cfg: BenchmarksConfig, label: str = "") -> BenchmarkResult:
    """Every task of ``cfg`` on ``model`` as it is in memory (an adapter toggled off measures
    the base); nothing when no task is asked for.

    Args:
        model: a transformers (or PEFT) causal LM.
        tokenizer: its tokenizer.
        cfg: ``evaluation.benchmarks``.
        label: the model's name in the progress line (``base``, ``tuned``).
    """
    if not cfg.tasks:
        return BenchmarkResult()
    if not installed():
        raise PipelineError(f"evaluation.benchmarks.tasks needs lm-evaluation-harness: {EXTRA}")
    import lm_eval  # lazy: the bench extra
    from lm_eval.models.huggingface import HFLM

    manager = task_manager(cfg)
    log.info("%s benchmarks through lm-eval %s: %s (limit %s per task)", label or "model", _version(),
             ", ".join(cfg.tasks), cfg.limit if cfg.limit is not None else "none")
    was_training = model.training
    with _own_random_state():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size)
        try:
            results = lm_eval.simple_evaluate(
                model=lm, tasks=list(cfg.tasks), task_manager=manager, limit=cfg.limit,
                num_fewshot=cfg.num_fewshot, log_samples=True, bootstrap_iters=BOOTSTRAP_ITERS,
                apply_chat_template=cfg.chat_template, random_seed=cfg.seed, numpy_random_seed=cfg.seed,
                torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed)
        except Exception as err:
            _name_the_failing_task(manager, list(cfg.tasks), err)
            raise
    model.train(was_training)
    return convert(results, list(cfg.tasks), cfg.subtasks)


def _reported_tasks(results: Dict[str, Any], asked: List[str], subtasks: bool) -> Dict[str, List[str]]:
    """Per reported name, the leaf tasks whose examples it holds: each task asked for, each
    group asked for (and with ``subtasks`` each of its subtasks)."""
    groups = results.get("group_subtasks", {})

    def leaves(name: str) -> List[str]:
        if name not in groups:
            return [name]
        return [leaf for child in groups[name] for leaf in leaves(child)]

    reported: Dict[str, List[str]] = {}
    for name in asked:
        reported[name] = leaves(name)
        if subtasks and name in groups:
            for child in _descendants(name, groups):
                reported[child] = leaves(child)
    return reported


def _descendants(name: str, groups: Dict[str, List[str]]) -> List[str]:
    found = []
    for child in groups.get(name, []):
        found += [child] + _descendants(child, groups)
    return found


def _figures(entry: Dict[str, Any]) -> Dict[str, float]:
    figures = {}
    for key, value in entry.items():
        name = metric_key(key) if key not in NOT_METRICS else None
        if name is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
            figures[name] = float(value)
    return figures


def _text(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


def _example(sample: Dict[str, Any]) -> Dict[str, Any]:
    """One lm-eval sample as a predictions row: prompt, reference and the model's output."""
    arguments = sample.get("arguments") or [("",)]
    prompt = _text(arguments[0][0])
    target = sample.get("target")
    responses = sample.get("filtered_resps")
    choices = [a[1] for a in arguments if len(a) > 1 and isinstance(a[1], str)]
    if choices and len(choices) == len(arguments) and isinstance(responses, list) and responses \
            and all(isinstance(r, (list, tuple)) for r in responses):  # multiple choice: loglikelihoods
        best = max(range(len(responses)), key=lambda i: float(responses[i][0]))
        output = choices[best].strip()
        reference = choices[target].strip() if isinstance(target, int) and 0 <= target < len(choices) \
            else _text(target)
    else:
        output = _text(responses[0] if isinstance(responses, list) and responses else responses)
        reference = _text(target)
    return {"index": int(sample["doc_id"]), "prompt": prompt, "reference": reference, "output": output,
            "scores": {}}


def _examples(samples: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """A task's samples as one row per document: a document scored under several filters has
    one sample per filter, merged here with each filter's metric names."""
    rows: Dict[int, Dict[str, Any]] = {}
    for sample in samples:
        row = rows.setdefault(int(sample["doc_id"]), _example(sample))
        flt = sample.get("filter", "none")
        for metric in sample.get("metrics", []):
            value = sample.get(metric)
            if isinstance(value, (int, float)) or hasattr(value, "item"):
                name = metric_key(f"{metric},{flt}")
                row["scores"][name] = float(value)
    return [rows[i] for i in sorted(rows)]


def convert(results: Dict[str, Any], asked: List[str], subtasks: bool) -> BenchmarkResult:
    """lm-eval's result dictionary (``simple_evaluate`` with ``log_samples``) in our names."""
    converted = BenchmarkResult()
    figures = {**results.get("results", {}), **results.get("groups", {})}
    samples = results.get("samples", {})
    for name, leaves in _reported_tasks(results, asked, subtasks).items():
        converted.metrics.update({f"{set_name(name)}/{k}": v for k, v in _figures(figures.get(name, {})).items()})
        rows = [row for leaf in leaves for row in _examples(samples.get(leaf, []))]
        if rows:
            converted.examples[set_name(name)] = rows
    return converted
