"""Evaluation entry point: ``python -m pipeline.evaluate run=<run folder>`` or
``python -m pipeline.evaluate model=... adapter_path=... evaluation=qa``.

The base model (adapters disabled, the same weights in memory) and the tuned model answer the
same prompts with the same decoding; results go to a new folder, the evaluated run is untouched.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Tuple

import hydra
from omegaconf import DictConfig

from pipeline import config as C, errors
from pipeline import data, scoring, model as models, packing, runfolder, trainer

log = logging.getLogger("pipeline.evaluate")


def _source(cfg: C.EvaluateConfig) -> Tuple[C.DataConfig, C.ModelConfig, Any, Path]:
    """Data, model, adapter settings and artifact folder: from the run folder when given."""
    if cfg.run:
        return runfolder.read_run(cfg.run)
    if not cfg.adapter_path:
        raise C.ConfigError(["give run=<run folder>, or adapter_path=<adapter or model folder>"])
    return cfg.data, cfg.model, C.adapter_settings(cfg.adapter_method), Path(cfg.adapter_path)


def _models(folder: str, model_cfg: C.ModelConfig, settings: Any, artifact: Path) -> Tuple[Any, Any]:
    """(tuned, base) models; for an adapter they are one PEFT model, its adapter toggled."""
    from pipeline.adapters import load_adapter

    if (artifact / "adapter_config.json").exists():
        base = models.load_model(folder, model_cfg, settings.quantization())
        return load_adapter(base, artifact), None
    from transformers import AutoModelForCausalLM

    tuned = AutoModelForCausalLM.from_pretrained(artifact)
    return tuned, models.load_model(folder, model_cfg)


def evaluate(cfg: DictConfig) -> dict:
    """Measures base and tuned model on the configured sets; returns the metrics."""
    run = runfolder.RunFolder(Path(cfg.paths.run_dir))
    run.start(cfg, list(hydra.core.hydra_config.HydraConfig.get().overrides.task))
    try:
        cfg = C.typed_config(cfg)
        data_cfg, model_cfg, settings, artifact = _source(cfg)
        folder = models.resolve_folder(model_cfg, cfg.paths.cache_dir, data_cfg.seed)
        tokenizer = models.load_tokenizer(folder, model_cfg)
        splits = data.build_datasets(data_cfg, tokenizer)
        evaluator = scoring.Evaluator.build(cfg.evaluation, splits, tokenizer, seed=data_cfg.seed,
                                               plain_template=data_cfg.template == "plain")
        tuned_model, base_model = _models(folder, model_cfg, settings, artifact)
        args = trainer.training_arguments(
            C.TrainerConfig(per_device_eval_batch_size=cfg.evaluation.batch_size), run.path / "tmp",
            cfg.seed, has_eval=False, report_to=[], run_name=run.path.name)

        # An adapter's base and tuned generations come from one vLLM engine (evaluation.engine=vllm).
        generated = evaluator.predict_base_and_tuned(tuned_model) if base_model is None else {}

        def measure(model: Any, label: str) -> scoring.Measurement:
            hf_trainer = trainer.build_trainer(model, tokenizer, args, None, None,
                                               packing.collator(tokenizer, False), "stop",
                                               run.path / "history.jsonl")
            return evaluator.measure(hf_trainer, label, generated.get(label))

        if base_model is None:
            with tuned_model.disable_adapter():
                base = measure(tuned_model, "base")
        else:
            base = measure(base_model, "base")
        tuned = measure(tuned_model, "tuned")
        metrics = trainer.compare(base.metrics, tuned.metrics)
        scoring.write_predictions(run.path / "eval" / "predictions.jsonl", evaluator.sets, base, tuned)
        run.write_metrics(metrics)
        print("base vs tuned:\n" + scoring.comparison_table(metrics))
        run.finish("success", evaluated=str(artifact))
        return metrics
    except BaseException as err:
        run.finish("interrupted" if isinstance(err, KeyboardInterrupt) else "failed", err)
        raise


@hydra.main(version_base="1.3", config_path=str(C.CONF_DIR), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    return C.run_task(evaluate, cfg)


if __name__ == "__main__":
    main()
    errors.end_process()
