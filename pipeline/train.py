"""Training entry point: ``python -m pipeline.train [group=option ...] [key=value ...]``.

The table of contents of a run: compose and check the config once into the typed
``TrainConfig`` that nothing changes afterwards, then data -> model -> adapter -> trainer
(base measurement, training, tuned measurement) -> results, and return the objective metric
(what a sweep optimises). Each stage lives in its subpackage; how the run ends (run folder
status, W&B, exit code) is :mod:`pipeline.commands.runner`'s.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Optional

import hydra
from omegaconf import DictConfig, OmegaConf

from pipeline.adapters.registry import check_architecture
from pipeline.commands import runner
from pipeline.commands.compose import checked_train, record
from pipeline.config.options import CONF_DIR, plain
from pipeline.config.schema import TrainConfig
from pipeline.data.packing import collator
from pipeline.data.splits import build_datasets
from pipeline.model import loading, precision
from pipeline.runs import resume
from pipeline.runs.runfolder import RunFolder, objective_value
from pipeline.scoring.base_cache import BaseSource
from pipeline.scoring.measurement import Evaluator, before_after_table, write_predictions
from pipeline.study import trial as sweep_trial
from pipeline.trainer import build, callbacks, distributed, fit, memory, objective, startup, tracking
from pipeline.trainer.preemption import RunSignals

log = logging.getLogger("pipeline.train")


def train(cfg: DictConfig) -> float:
    """Runs one training job described by ``cfg`` and returns its objective value."""
    overrides = runner.task_overrides()
    distributed.from_slurm_env()
    processes = OmegaConf.to_object(cfg.distributed)
    if distributed.needs_launch(processes):
        return _launch_workers(cfg, overrides)
    run = distributed.run_folder(processes, Path(cfg.paths.run_dir))
    with runner.recording(run, record(cfg), overrides) as recorded:
        config = checked_train(cfg)  # every check that needs no weights, all problems at once
        moved = resume.move_to(run, resume.resume_folder(config.resume, run.path, overrides))
        if moved is not run:  # continue that run, in its own folder
            config = dataclasses.replace(config, paths=dataclasses.replace(config.paths, run_dir=str(moved.path)))
            recorded.run = run = moved
            run.start(plain(config), overrides)
        checkpoint = resume.checkpoint(config.resume, run.path)  # a bad one fails before any weights load
        trial = sweep_trial.start_trial(config, run)
        tracking.reset_peak_memory()  # this run's own peak, also inside a multirun
        with RunSignals(config.preemption).install(run.path / "checkpoints", lambda p: run.update(phase=p)) as phases:
            return _fit(config, run, checkpoint, trial, phases)


def _fit(cfg: TrainConfig, run: RunFolder, checkpoint: Optional[str], trial: Any, phases: RunSignals) -> float:
    """The stages in order: data -> model -> adapter -> base measurement, training, tuned
    measurement -> results. Returns the objective."""
    phases.enter("loading")
    chosen = precision.announce(cfg.trainer.precision)  # auto -> bf16 or fp32, for this machine
    run.update(precision=chosen.as_record())
    # data.seed, not seed: the base (a tiny model's initialisation) and the split stay fixed
    # across the seeds of a multirun, as pipeline.evaluate/serve/export rebuild them.
    folder = loading.resolve_folder(cfg.model, cfg.paths.cache_dir, cfg.data.seed)
    architecture = loading.describe(folder, cfg.model)
    check_architecture(cfg.adapter, architecture)  # target modules, quantizability
    startup.prepare(cfg.seed)  # seeds; no library progress bars in logs
    tokenizer = loading.load_tokenizer(folder, cfg.model)
    splits = build_datasets(cfg.data, tokenizer, cfg.paths.data_cache_dir if cfg.data.cache else None)
    run.update(data_overlap=splits.stats["overlap"], data_sources=splits.stats["sources"],
               data_tokenization=splits.stats["tokenization"])
    # Held while the model loads and the Trainer is built: ZeRO-3 then builds the model sharded.
    zero3_init = distributed.zero3_init_context(cfg.distributed, cfg.trainer)  # noqa: F841
    model = cfg.adapter.apply(loading.load_model(folder, cfg.model, cfg.adapter.quantization()), architecture)
    cfg.adapter.initialize_from_data(model, splits.train, collator(tokenizer, False),  # EVA: padded batches
                                     cfg.trainer.per_device_train_batch_size)
    summary = startup.summary(cfg, model, splits)
    log.info(memory.describe(cfg, memory.count_parameters(model)))
    packing = build.packing_for(cfg.data.packing, model)  # off where the attention would cross examples
    batches = collator(tokenizer, packing, cfg.data.pack_length)
    evaluator = Evaluator.build(cfg.evaluation, splits, tokenizer, seed=cfg.data.seed,
                                plain_template=cfg.data.template == "plain", collate=batches,
                                loss_batch_size=cfg.trainer.per_device_eval_batch_size)
    summary.update(evaluator.counts())
    run.update(loss_precision=evaluator.loss_precision.as_record())

    base = BaseSource.find(run, cfg.paths.base_cache_dir, evaluator, folder=folder, model=cfg.model,
                           quantization=cfg.adapter.quantization(),
                           use_cache=cfg.evaluation.cache_base and distributed.world_size() == 1,
                           writes=distributed.is_main_process())
    wandb_run = tracking.start_wandb(cfg, run, runner.multirun_folder(), {"trainer.precision": chosen.precision}) \
        if distributed.is_main_process() else None
    sweep_trial.record_wandb(trial, wandb_run)
    trainer = build.prepare(
        cfg.trainer, model, tokenizer, splits, run.path, seed=cfg.seed, packing=packing,
        pack_length=cfg.data.pack_length, report_to=["wandb"] if wandb_run else [], run_name=run.path.name,
        resume_from=checkpoint, evaluator=evaluator,
        callbacks=callbacks.run_callbacks(cfg.preemption, run) + sweep_trial.callbacks(cfg, trial)
        + [callbacks.epoch_time_callback(summary["train/steps_per_epoch"], summary["train/planned_steps"])],
        best=objective.best_for(cfg, splits.validation is not None),
        distributed=distributed.trainer_arguments(cfg.distributed, run.path))
    metrics, base_measured, tuned = fit.fit(trainer, cfg.trainer, run.path, trains=cfg.adapter.trains,
                                            resume_from=checkpoint, evaluator=evaluator,
                                            base=base.measurement, on_base=base.save, phases=phases,
                                            base_without_adapter=not cfg.adapter.fresh_is_base())

    phases.enter("saving")
    predictions = run.path / "eval" / "predictions.jsonl"
    if distributed.is_main_process():
        write_predictions(predictions, evaluator.recorded_sets, base_measured, tuned)
    metrics.update(summary, **tracking.peak_memory_mb(), **{"perf/wall_time_s": run.elapsed()})
    run.write_metrics(metrics)
    log.info("base vs tuned:\n%s", before_after_table(metrics))
    log.info("%s", objective.result_line(metrics, cfg.objective.metric, cfg.objective.direction,
                                         objective.primary_metric(cfg)))
    tracking.finish_wandb(wandb_run, metrics, predictions)
    sweep_trial.record_metrics(trial, metrics)
    if distributed.is_main_process() and cfg.sweep is not None and cfg.sweep.constraints:
        constraints = sweep_trial.constraint_results(cfg, predictions)  # a sweep's floors
        sweep_trial.record_constraints(trial, constraints)
        run.update(constraints=constraints)
    value = objective_value(metrics, cfg.objective.metric)
    run.finish("success", objective={cfg.objective.metric: value}, phase="done")
    return value


def _launch_workers(cfg: DictConfig, overrides: list) -> float:
    """Starts ``distributed.nproc_per_node`` workers running this same command and returns the
    objective rank 0 recorded. Checks the config first, so a bad one fails before any launch."""
    run = RunFolder(Path(cfg.paths.run_dir))
    with runner.recording(run, record(cfg), overrides, when_failing=True) as recorded:
        config = checked_train(cfg)
        recorded.run = run = resume.move_to(run, resume.resume_folder(config.resume, run.path, overrides))
        distributed.launch(config.distributed, "pipeline.train", overrides, run.path)
    return float(run.info()["objective"][config.objective.metric])


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float:
    return runner.main(train, cfg)


if __name__ == "__main__":
    main()
    runner.end_process()
