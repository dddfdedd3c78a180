"""Merge entry point: ``python -m pipeline.merge 'runs=[<run>,<run>]' merge.method=ties merge.density=0.5``.

The LoRA adapters of finished runs (trained on the same base) merge into one adapter with PEFT's
``add_weighted_adapter``; the merged adapter is then measured on **each source run's own sets**
next to that run's adapter and the base, so that the table reads "the merge keeps X% of each
source's gain". Results and the merged adapter (``adapter/``) go to a new folder; the sources are
untouched. ``metrics.json``: ``base/<source>/<split>/<metric>``, ``source/<source>/...``,
``merged/<source>/...`` and ``kept/<source>/...`` ((merged - base) / (source - base)), and
``kept/mean/...`` / ``kept/min/...`` over the sources. The folder reads as a run (its
``merged_from.yaml``): ``pipeline.serve run=<folder>``, ``pipeline.export run=<folder>``.

``python -m pipeline.merge -m merge_sweep=<name> 'runs=[...]'`` searches ``merge.weights`` and
``merge.density`` with the Optuna sweeper of training sweeps (``sweeps/merge/``); each trial is
one merge, which records its metrics on its trial.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, List

import hydra
from omegaconf import DictConfig

from pipeline.adapters.merging import MERGED, combine, merge_problems, source_names
from pipeline.adapters.saved import SavedRun, is_adapter, load_adapter, read_run, write_merged_from
from pipeline.commands import runner
from pipeline.commands.compose import record, typed_config
from pipeline.config.app_schema import MergeConfig
from pipeline.config.errors import ConfigError
from pipeline.config.options import CONF_DIR
from pipeline.model import loading
from pipeline.runs.atomic import commit_folder
from pipeline.runs.runfolder import RunFolder
from pipeline.scoring.measurement import Evaluator
from pipeline.study import trial as sweep_trial


def _base_key(saved: SavedRun) -> str:
    """What must be equal for adapters to share a base: the model, its quantisation, and for a
    tiny random model the seed it is built from."""
    quantization = saved.settings.quantization()
    return json.dumps([str(saved.model), quantization.key() if quantization else None,
                       saved.data.seed if saved.model.source == "tiny" else None])


def problems(cfg: MergeConfig) -> List[str]:
    """Every problem with the ``merge`` config that shows before any weights load."""
    if len(cfg.runs) < 2:
        return [f"runs has {len(cfg.runs)} run folder(s); a merge needs two or more, e.g. runs='[a,b]'"]
    found, adapters, bases = [], [], []
    for i, run in enumerate(cfg.runs):
        try:
            saved = read_run(run)
        except ConfigError as err:
            found += [f"runs[{i}]: {problem}" for problem in err.problems]
            continue
        if not is_adapter(saved.artifact):
            found.append(f"runs[{i}]={run!r} trained every weight (adapter=full): only adapters merge")
            continue
        adapters.append(json.loads((saved.artifact / "adapter_config.json").read_text()))
        bases.append(_base_key(saved))
    if len(set(bases)) > 1:
        found.append("runs: the adapters were trained on different bases (model, quantisation or a tiny "
                     "model's data.seed differ); merge adapters of one base")
    if not found:
        found += merge_problems(cfg.merge, adapters)
    return found


def _measured(model: Any, evaluator: Evaluator, name: str) -> Dict[str, Dict[str, float]]:
    """The base, the source's own adapter and the merged adapter on one source's sets."""
    with model.disable_adapter():
        base = evaluator.measure(model, f"base on {name}").metrics
    model.set_adapter(name)
    own = evaluator.measure(model, name).metrics
    model.set_adapter(MERGED)
    merged = evaluator.measure(model, f"merged on {name}").metrics
    return {"base": base, "source": own, "merged": merged}


def merge_metrics(name: str, measured: Dict[str, Dict[str, float]]) -> Dict[str, Any]:
    """``<side>/<source>/<split>/<metric>`` for base, source and merged, and ``kept/...``: the
    share of the source's gain over the base that the merge keeps (None where there is no gain)."""
    metrics: Dict[str, Any] = {}
    for side, values in measured.items():
        metrics.update({f"{side}/{name}/{key}": value for key, value in values.items()})
    for key, base in measured["base"].items():
        gain = measured["source"][key] - base
        metrics[f"kept/{name}/{key}"] = (measured["merged"][key] - base) / gain if gain else None
    return metrics


def kept_overall(names: List[str], metrics: Dict[str, Any]) -> Dict[str, float]:
    """``kept/mean/<split>/<metric>`` and ``kept/min/...``: the share of the gain kept, averaged
    over the sources and for the worst-served one, where every source has it (one number to
    compare merges by)."""
    keys = {k.split("/", 2)[2] for k in metrics if k.startswith(f"kept/{names[0]}/")}
    overall = {}
    for key in sorted(keys):
        shares = [metrics.get(f"kept/{name}/{key}") for name in names]
        if all(share is not None for share in shares):
            overall[f"kept/mean/{key}"] = sum(shares) / len(shares)
            overall[f"kept/min/{key}"] = min(shares)
    return overall


def table(names: List[str], metrics: Dict[str, Any]) -> str:
    """base | source | merged | kept, per source and metric."""
    rows = [f"{'source / metric':40} {'base':>10} {'source':>10} {'merged':>10} {'kept':>7}"]
    for name in names:
        for key in sorted(k.split("/", 2)[2] for k in metrics if k.startswith(f"base/{name}/")):
            kept = metrics[f"kept/{name}/{key}"]
            rows.append(f"{name + ' ' + key:40} {metrics[f'base/{name}/{key}']:>10.4g} "
                        f"{metrics[f'source/{name}/{key}']:>10.4g} {metrics[f'merged/{name}/{key}']:>10.4g} "
                        f"{f'{100 * kept:.0f}%' if kept is not None else 'n/a':>7}")
    return "\n".join(rows)


def merge(cfg: DictConfig) -> Dict[str, Any]:
    """Merges the runs' adapters, measures the merge on each source's sets, saves it; returns
    the metrics."""
    run = RunFolder(Path(cfg.paths.run_dir))
    with runner.recording(run, record(cfg), runner.task_overrides()):
        config: MergeConfig = typed_config(cfg, problems)  # every problem before any weights load
        trial = sweep_trial.start_trial(config, run)  # a merge sweep's trial (None otherwise)
        sources = [read_run(r) for r in config.runs]
        names = source_names(config.runs)
        first = sources[0]
        folder = loading.resolve_folder(first.model, config.paths.cache_dir, first.data.seed)
        tokenizer = loading.load_tokenizer(folder, first.model)
        model = load_adapter(loading.load_model(folder, first.model, first.settings.quantization()),
                             first.artifact, adapter_name=names[0])
        for name, source in zip(names[1:], sources[1:]):
            model.load_adapter(str(source.artifact), adapter_name=name)
        combine(model, names, config.merge, MERGED)
        metrics: Dict[str, Any] = {}
        for name, source in zip(names, sources):
            evaluator = Evaluator.for_data(config.evaluation, source.data, tokenizer)
            metrics.update(merge_metrics(name, _measured(model, evaluator, name)))
        metrics.update(kept_overall(names, metrics))
        _save_merged(model, run.path)
        write_merged_from(run.path, config.runs[0])  # serve, export and evaluate read it as a run
        run.write_metrics(metrics)
        sweep_trial.record_metrics(trial, metrics)
        print("base | source | merged, on each source's sets:\n" + table(names, metrics))
        run.finish("success", sources=[str(Path(r).resolve()) for r in config.runs])
    return metrics


def _save_merged(model: Any, run_dir: Path) -> None:
    """The merged adapter alone, as ``<run>/adapter`` (PEFT writes a named adapter into a
    sub-folder of that name)."""
    tmp = run_dir / ".adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), selected_adapters=[MERGED], safe_serialization=True)
    commit_folder(tmp / MERGED, run_dir / "adapter")
    shutil.rmtree(tmp, ignore_errors=True)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="merge")
def main(cfg: DictConfig) -> Dict[str, Any]:
    return runner.main(merge, cfg)


if __name__ == "__main__":
    main()
    runner.end_process()
