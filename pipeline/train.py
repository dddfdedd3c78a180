"""Training entry point: ``python -m pipeline.train [group=option ...] [key=value ...]``.

Composes the config, validates it, builds each stage (data -> model -> adapter -> trainer),
trains, evaluates base vs tuned, and returns the objective metric (for sweeps).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from pipeline import config as C
from pipeline import data, evaluation, model as models, tracking, training

log = logging.getLogger("pipeline.train")


def train(cfg: DictConfig) -> float:
    """Runs one training job described by ``cfg`` and returns its objective value."""
    run = tracking.RunFolder(Path(cfg.paths.run_dir))
    overrides = list(hydra.core.hydra_config.HydraConfig.get().overrides.task)
    try:
        run.start(cfg, overrides)  # recorded even when validation fails
        tracking.reset_peak_memory()  # this run's own peak, also inside a multirun
        C.validate(cfg)  # every cheap check, before any model is touched
        if cfg.resume != "never":
            run = _resume_target(cfg, run, overrides)
        folder = models.resolve_folder(cfg.model, cfg.paths.cache_dir, cfg.seed)
        architecture = models.describe(folder, cfg.model)
        C.validate(cfg, architecture)  # target modules, quantizability: need the architecture
        settings = OmegaConf.to_object(cfg.adapter)

        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
        transformers.set_seed(cfg.seed)
        tokenizer = models.load_tokenizer(folder, cfg.model)
        splits = data.build_datasets(cfg.data, tokenizer)
        model = models.load_model(folder, cfg.model, settings.quantization())
        model = settings.apply(model, architecture)
        summary = _startup_summary(cfg, model, splits)
        evaluator = evaluation.Evaluator.build(cfg.evaluation, splits, tokenizer, seed=cfg.seed,
                                               plain_template=cfg.data.template == "plain")
        wandb_run = tracking.start_wandb(cfg, run)
        metrics, base, tuned = training.fit(
            cfg.trainer, model, tokenizer, splits, run.path, seed=cfg.seed, trains=settings.trains,
            packing=cfg.data.packing, report_to=["wandb"] if wandb_run else [],
            run_name=run.path.name, resume_from=training.last_checkpoint(run.path / "checkpoints"),
            evaluator=evaluator, base=evaluation.Measurement.load(run.path / "eval" / "base.json"),
            on_base=lambda measured: measured.save(run.path / "eval" / "base.json"),
            callbacks=_callbacks(cfg, run), pack_length=cfg.data.pack_length)
        evaluation.write_predictions(run.path / "eval" / "predictions.jsonl", evaluator.sets, base, tuned)
        metrics.update(summary, **tracking.peak_memory_mb(), **{"perf/wall_time_s": run.elapsed()})
        run.write_metrics(metrics)
        log.info("base vs tuned:\n%s", evaluation.comparison_table(metrics))
        tracking.finish_wandb(wandb_run, metrics, run.path / "eval" / "predictions.jsonl")
        objective = tracking.objective_value(metrics, cfg.objective.metric)
        run.finish("success", objective={cfg.objective.metric: objective})
        return objective
    except KeyboardInterrupt as err:
        run.finish("interrupted", err)
        tracking.abort_wandb(exit_code=130)
        raise
    except BaseException as err:
        run.finish("failed", err)
        tracking.abort_wandb(exit_code=1)
        raise


def _resume_target(cfg: DictConfig, run: tracking.RunFolder, overrides: list) -> tracking.RunFolder:
    """For ``resume=auto`` / a path: the run folder to continue (this one when none is found)."""
    found = Path(cfg.resume) if cfg.resume != "auto" else tracking.find_resumable(run.path, overrides)
    if found is None or found == run.path:
        return run
    found = found.parent.parent if found.name.startswith("checkpoint-") else found
    log.info("Resuming the run in %s", found)
    tracking.move_log_handlers(run.path, found)
    shutil.rmtree(run.path, ignore_errors=True)  # only Hydra's copy of the config was written
    cfg.paths.run_dir = str(found)
    resumed = tracking.RunFolder(found)
    resumed.start(cfg, overrides)
    return resumed


def _callbacks(cfg: DictConfig, run: tracking.RunFolder) -> list:
    """Trainer callbacks that this run's config asks for."""
    return [training.first_step_callback(lambda: _first_step(run))]


def _first_step(run: tracking.RunFolder) -> None:
    """Records when training began (``first_step_at`` in run.json): start-up cost."""
    now = time.time()
    run.update(first_step_at=now)
    log.info("first training step begins %.1f s after the run started", now - run.started)


def _startup_summary(cfg: DictConfig, model, splits: data.Splits) -> dict:
    """Logs the derived numbers once (nanoGPT's "tokens per iteration") and returns them."""
    trainable, total = models.parameter_counts(model)
    world = int(__import__("os").environ.get("WORLD_SIZE", 1))
    global_batch = cfg.trainer.per_device_train_batch_size * cfg.trainer.gradient_accumulation_steps * world
    train = splits.stats["train"]
    summary = {"params/trainable": trainable, "params/total": total,
               "params/trainable_pct": 100.0 * trainable / total, "data/train_examples": train["examples"],
               "train/global_batch_size": global_batch}
    log.info("data: %s | train %d examples (%d dropped as longer than %d tokens), eval %s, test %s",
             splits.stats["format"], train["examples"], train["dropped_too_long"], cfg.data.max_length,
             splits.stats["validation"]["examples"], splits.stats["test"]["examples"])
    log.info("params: %s trainable / %s total = %.4f%% (adapter=%s)",
             f"{trainable:,}", f"{total:,}", summary["params/trainable_pct"], cfg.adapter.method)
    log.info("batch: global %d (= %d per device x %d accumulation x %d processes), ~%.0f tokens per step",
             global_batch, cfg.trainer.per_device_train_batch_size, cfg.trainer.gradient_accumulation_steps,
             world, global_batch * train["tokens"] / max(train["examples"], 1))
    return summary


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    return C.run_task(train, cfg)


if __name__ == "__main__":
    main()
