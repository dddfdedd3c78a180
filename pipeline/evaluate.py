"""Evaluation entry point: ``python -m pipeline.evaluate run=<run folder>`` or
``python -m pipeline.evaluate model=... adapter_path=... evaluation=qa``.

The base model (adapters disabled, the same weights in memory) and the tuned model answer the
same prompts with the same decoding; results go to a new folder, the evaluated run is untouched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import hydra
from omegaconf import DictConfig

from pipeline.adapters.registry import settings_for
from pipeline.adapters.saved import SavedRun, is_adapter, load_adapter, read_run
from pipeline.commands import runner
from pipeline.commands.compose import record, typed_config
from pipeline.commands.validation import validate_evaluate
from pipeline.config.app_schema import EvaluateConfig
from pipeline.config.errors import ConfigError
from pipeline.config.options import CONF_DIR
from pipeline.model import loading
from pipeline.runs.runfolder import RunFolder
from pipeline.scoring.measurement import Evaluator, before_after, before_after_table, write_predictions


def _source(cfg: EvaluateConfig) -> SavedRun:
    """Data, model, adapter settings and artifact folder: from the run folder when given."""
    if cfg.run:
        return read_run(cfg.run)
    if not cfg.adapter_path:
        raise ConfigError(["give run=<run folder>, or adapter_path=<adapter or model folder>"])
    return SavedRun(cfg.data, cfg.model, settings_for(cfg.adapter_method), Path(cfg.adapter_path))


def _models(folder: str, source: SavedRun) -> Tuple[Any, Optional[Any]]:
    """(tuned, base) models; for an adapter they are one PEFT model (base None: its adapter is
    toggled off to measure the base)."""
    if is_adapter(source.artifact):
        base = loading.load_model(folder, source.model, source.settings.quantization())
        return load_adapter(base, source.artifact), None
    return loading.load_model(str(source.artifact), source.model), loading.load_model(folder, source.model)


def evaluate(cfg: DictConfig) -> Dict[str, float]:
    """Measures base and tuned model on the configured sets; returns the metrics."""
    run = RunFolder(Path(cfg.paths.run_dir))
    with runner.recording(run, record(cfg), runner.task_overrides()):
        config: EvaluateConfig = typed_config(cfg)
        source = _source(config)
        validate_evaluate(config, source.data)  # before any model loads
        folder = loading.resolve_folder(source.model, config.paths.cache_dir, source.data.seed)
        tokenizer = loading.load_tokenizer(folder, source.model)
        evaluator = Evaluator.for_data(config.evaluation, source.data, tokenizer)
        tuned_model, base_model = _models(folder, source)
        # An adapter's base and tuned generations come from one vLLM engine (evaluation.engine=vllm).
        generated = evaluator.predict_base_and_tuned(tuned_model) if base_model is None else {}
        if base_model is None:
            with tuned_model.disable_adapter():
                base = evaluator.measure(tuned_model, "base", generated.get("base"))
        else:
            base = evaluator.measure(base_model, "base")
        tuned = evaluator.measure(tuned_model, "tuned", generated.get("tuned"))
        metrics = before_after(base.metrics, tuned.metrics)
        write_predictions(run.path / "eval" / "predictions.jsonl", evaluator.recorded_sets, base, tuned)
        run.write_metrics(metrics)
        print("base vs tuned:\n" + before_after_table(metrics))
        run.finish("success", evaluated=str(source.artifact))
    return metrics


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="evaluate")
def main(cfg: DictConfig) -> Dict[str, float]:
    return runner.main(evaluate, cfg)


if __name__ == "__main__":
    main()
    runner.end_process()
