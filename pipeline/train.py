"""Training entry point: ``python -m pipeline.train [group=option ...] [key=value ...]``.

Composes the config, validates it, builds each stage (data -> model -> adapter -> trainer),
trains, evaluates base vs tuned, and returns the objective metric (for sweeps).
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Tuple

import hydra
from omegaconf import DictConfig

from pipeline import config as C, errors
from pipeline import (base_cache, checkpoints, data, distributed, estimate, scoring, model as models,
                      precision, preemption, runfolder, sweep, tracking, trainer)

log = logging.getLogger("pipeline.train")


def train(cfg: DictConfig) -> float:
    """Runs one training job described by ``cfg`` and returns its objective value."""
    overrides = list(hydra.core.hydra_config.HydraConfig.get().overrides.task)
    distributed.from_slurm_env()
    if distributed.needs_launch(cfg.distributed):
        return _launch_workers(cfg, overrides)
    job = _Job(cfg, _run_folder(cfg), overrides)
    try:
        return job.execute()
    except KeyboardInterrupt as err:
        job.run.finish("interrupted", err)
        tracking.abort_wandb(exit_code=130)
        raise
    except preemption.Preempted as err:
        job.run.finish("interrupted", err, signal=err.signal_name, checkpoint=err.checkpoint,
                       exit_code=err.exit_code, phase=err.phase)
        tracking.abort_wandb(exit_code=err.exit_code, preempted=True)
        if cfg.preemption.requeue and err.signal_name == "SIGUSR1":
            preemption.requeue_slurm_job()
        raise
    except BaseException as err:
        if sweep.is_pruned(err):  # the pruner stopped this trial: not a failure
            job.run.finish("pruned", err)
            tracking.abort_wandb(exit_code=0)
            raise
        job.run.finish("failed", err)
        tracking.abort_wandb(exit_code=1)
        raise
    finally:
        job.signals.restore()


@dataclass
class _Loaded:
    """What the loading phase built for the rest of the job."""

    folder: str
    settings: Any  # the adapter method's settings
    tokenizer: Any
    splits: data.Splits
    model: Any
    evaluator: scoring.Evaluator
    summary: dict  # startup figures that go into metrics.json
    zero3_init: Any = None  # held for the job's life (DeepSpeed ZeRO-3 zero.Init)


class _Job:
    """One training job through its phases: start (run folder, checks, resume target) -> load
    (data, model, adapter, evaluation sets) -> fit (base measurement, training, tuned
    measurement) -> save. A resume may switch the run folder (``run``); ``trial`` is the Optuna
    trial when the job is one of a sweep; ``signals`` stop it resumably in any phase. ``cfg`` is
    the composed config until it is validated, then its ``TrainConfig`` object (``composed``
    keeps the node for the checks that need the model's architecture)."""

    def __init__(self, cfg: DictConfig, run: runfolder.RunFolder, overrides: list):
        self.cfg, self.composed, self.run, self.overrides = cfg, cfg, run, overrides
        self.trial = None
        self.signals = preemption.RunSignals(list(cfg.preemption.signals), cfg.preemption.exit_code)
        self.wandb_run = None

    def execute(self) -> float:
        resume_from = self._start()
        loaded = self._load()
        metrics, base, tuned = self._fit(loaded, resume_from)
        return self._save(loaded, metrics, base, tuned)

    def _start(self) -> Optional[str]:
        """Records the run, checks the config, finds what to resume; returns the checkpoint."""
        run = self.run
        run.start(self.composed, self.overrides)  # recorded even when validation fails
        self.trial = sweep.start_trial(self.composed, run)
        tracking.reset_peak_memory()  # this run's own peak, also inside a multirun
        C.validate(self.composed)  # every cheap check, before any model is touched
        self.cfg = cfg = C.typed_config(self.composed)
        if cfg.resume != "never":
            self.run = run = _resume_target(cfg, run, self.overrides)
        resume_from = _resume_checkpoint(cfg, run)  # before any weights load: a bad one fails now
        # From here a preemption signal in any phase marks the run interrupted.
        self.signals.install(run.path / "checkpoints", lambda phase: run.update(phase=phase))
        self.signals.enter("loading")
        run.update(precision=precision.apply(cfg.trainer).as_record())  # auto -> bf16 or fp32
        return resume_from

    def _load(self) -> _Loaded:
        """Data, model with its adapter, and the evaluation sets."""
        cfg, run = self.cfg, self.run
        # data.seed, not seed: the base (a tiny model's initialisation) and the split stay fixed
        # across the seeds of a multirun, as pipeline.evaluate/serve/export rebuild them.
        folder = models.resolve_folder(cfg.model, cfg.paths.cache_dir, cfg.data.seed)
        architecture = models.describe(folder, cfg.model)
        C.validate(self.composed, architecture)  # target modules, quantizability: need the architecture
        settings = cfg.adapter

        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
        transformers.set_seed(cfg.seed)
        tokenizer = models.load_tokenizer(folder, cfg.model)
        splits = data.build_datasets(cfg.data, tokenizer, cfg.paths.data_cache_dir if cfg.data.cache else None)
        # Validation/test examples also in train; examples per source (data.mix) per split.
        run.update(data_overlap=splits.stats["overlap"], data_sources=splits.stats["sources"],
                   data_tokenization=splits.stats["tokenization"])
        zero3_init = distributed.zero3_init_context(cfg.distributed, cfg.trainer)
        model = settings.apply(models.load_model(folder, cfg.model, settings.quantization()), architecture)
        summary = _startup_summary(cfg, model, splits)
        log.info(estimate.describe(cfg, estimate.count_parameters(model)))
        evaluator = scoring.Evaluator.build(cfg.evaluation, splits, tokenizer, seed=cfg.data.seed,
                                               plain_template=cfg.data.template == "plain")
        summary.update(evaluator.counts())
        run.update(loss_precision=evaluator.loss_precision.as_record())
        return _Loaded(folder, settings, tokenizer, splits, model, evaluator, summary, zero3_init)

    def _fit(self, loaded: _Loaded, resume_from: Optional[str]) -> Tuple[dict, Any, Any]:
        """The base measurement (measured, cached or resumed), training, the tuned measurement."""
        cfg, run = self.cfg, self.run
        base_source = _BaseMeasurement.find(cfg, run, loaded.folder, loaded.settings.quantization(),
                                            loaded.evaluator)
        self.wandb_run = tracking.start_wandb(cfg, run) if distributed.is_main_process() else None
        sweep.record_wandb(self.trial, self.wandb_run)
        hf_trainer = trainer.prepare(
            cfg.trainer, loaded.model, loaded.tokenizer, loaded.splits, run.path, seed=cfg.seed,
            packing=cfg.data.packing, pack_length=cfg.data.pack_length,
            report_to=["wandb"] if self.wandb_run else [], run_name=run.path.name, resume_from=resume_from,
            evaluator=loaded.evaluator, callbacks=_callbacks(cfg, run) + sweep.callbacks(cfg, self.trial),
            best=_best_metric(cfg, loaded.splits),
            distributed=distributed.trainer_arguments(cfg.distributed, run.path))
        return trainer.fit(hf_trainer, cfg.trainer, run.path, trains=loaded.settings.trains,
                           resume_from=resume_from, evaluator=loaded.evaluator,
                           base=base_source.measurement, on_base=base_source.save, phases=self.signals)

    def _save(self, loaded: _Loaded, metrics: dict, base: Any, tuned: Any) -> float:
        """Predictions, metrics, the comparison table, W&B and the run's status; the objective."""
        cfg, run = self.cfg, self.run
        self.signals.enter("saving")
        predictions = run.path / "eval" / "predictions.jsonl"
        if distributed.is_main_process():
            scoring.write_predictions(predictions, loaded.evaluator.sets, base, tuned)
        metrics.update(loaded.summary, **tracking.peak_memory_mb(), **{"perf/wall_time_s": run.elapsed()})
        run.write_metrics(metrics)
        log.info("base vs tuned:\n%s", scoring.comparison_table(metrics))
        tracking.finish_wandb(self.wandb_run, metrics, predictions)
        sweep.record_metrics(self.trial, metrics)
        objective = runfolder.objective_value(metrics, cfg.objective.metric)
        run.finish("success", objective={cfg.objective.metric: objective}, phase="done")
        return objective


class _BaseMeasurement:
    """Where the base model's measurement comes from: an earlier attempt of this run (resumed),
    the cache of base measurements (cached), or a measurement now (measured). Recorded in
    ``run.json`` as ``base_measurement`` with the fingerprint."""

    def __init__(self, run: runfolder.RunFolder, cache_dir: str, key, measurement):
        self.run, self.cache_dir, self.key, self.measurement = run, cache_dir, key, measurement

    @classmethod
    def find(cls, cfg: C.TrainConfig, run: runfolder.RunFolder, folder: str, quantization,
             evaluator: scoring.Evaluator) -> "_BaseMeasurement":
        resumed = scoring.Measurement.load(run.path / "eval" / "base.json")
        key = None
        # Several processes measure together (ZeRO-3 gathers weights collectively): they must
        # agree on measuring, which a cache that another run may fill meanwhile cannot promise.
        if cfg.evaluation.cache_base and distributed.world_size() == 1:
            key = base_cache.fingerprint(folder, C.plain(cfg.model),
                                         quantization, evaluator)
        cached = base_cache.load(cfg.paths.base_cache_dir, key, evaluator) if key and resumed is None else None
        source = "resumed" if resumed else "cached" if cached else "measured"
        if cached:
            log.info("base model: measurement reused from the cache (fingerprint %s)", key[:12])
            if distributed.is_main_process():  # the run folder stays self-contained (and resumable)
                cached.save(run.path / "eval" / "base.json")
        run.update(base_measurement=source, base_fingerprint=key)
        return cls(run, cfg.paths.base_cache_dir, key, resumed or cached)

    def save(self, measured: scoring.Measurement) -> None:
        """Keeps a new measurement in the run folder (for a resume) and in the cache."""
        if not distributed.is_main_process():
            return
        measured.save(self.run.path / "eval" / "base.json")
        if self.key:
            base_cache.store(self.cache_dir, self.key, measured)


def _resume_folder(cfg: C.TrainConfig, run_dir: Path, overrides: list) -> Path:
    """For ``resume=auto`` / a path: the run folder to continue (``run_dir`` when none is found)."""
    found = Path(cfg.resume) if cfg.resume != "auto" else runfolder.find_resumable(run_dir, overrides)
    if found is None:
        return run_dir
    if cfg.resume != "auto" and found != run_dir:
        checkpoints.resume_checkpoint(found)  # a corrupt one fails here, before the folder is reused
    return found.parent.parent if found.name.startswith("checkpoint-") else found


def _resume_target(cfg: C.TrainConfig, run: runfolder.RunFolder, overrides: list) -> runfolder.RunFolder:
    """For ``resume=auto`` / a path: the run folder to continue (this one when none is found)."""
    found = _resume_folder(cfg, run.path, overrides)
    if found == run.path:
        return run
    log.info("Resuming the run in %s", found)
    runfolder.move_log_handlers(run.path, found)
    shutil.rmtree(run.path, ignore_errors=True)  # only Hydra's copy of the config was written
    cfg.paths.run_dir = str(found)
    resumed = type(run)(found)
    resumed.start(cfg, overrides)
    return resumed


def _resume_checkpoint(cfg: C.TrainConfig, run: runfolder.RunFolder):
    """The checkpoint to continue from: the one ``resume=<checkpoint>`` names (it must be
    complete), else the run folder's newest complete one (None: start afresh)."""
    if cfg.resume not in ("never", "auto") and Path(cfg.resume).name.startswith("checkpoint-"):
        return checkpoints.resume_checkpoint(Path(cfg.resume))
    return checkpoints.last_checkpoint(run.path / "checkpoints")


def _best_metric(cfg: C.TrainConfig, splits: data.Splits):
    """The objective as the Trainer's metric_for_best_model, when evaluations during training
    measure it (so checkpoint rotation keeps the best checkpoint)."""
    logged = []
    if cfg.trainer.eval_steps and splits.validation is not None:
        logged = ["loss"]
        if cfg.evaluation.during_training:
            logged += [m.split("/")[-1] for m in C.metric_names(cfg) if m.startswith("tuned/eval/")
                       and not m.endswith(("/loss", "/perplexity"))]
    return trainer.best_metric(cfg.objective.metric, cfg.objective.direction, logged)


def _run_folder(cfg: DictConfig) -> runfolder.RunFolder:
    """This process's view of the run folder; every rank of a multi-process run shares rank 0's,
    and only rank 0 writes it (other ranks also log warnings only)."""
    if distributed.world_size() == 1:
        return runfolder.RunFolder(Path(cfg.paths.run_dir))
    cfg.paths.run_dir = str(distributed.join_process_group(cfg.distributed, Path(cfg.paths.run_dir)))
    if distributed.is_main_process():
        return runfolder.RunFolder(Path(cfg.paths.run_dir))
    logging.getLogger().setLevel(logging.WARNING)
    return runfolder.ReplicaRunFolder(Path(cfg.paths.run_dir))


def _launch_workers(cfg: DictConfig, overrides: list) -> float:
    """Starts ``distributed.nproc_per_node`` workers running this same command and returns the
    objective rank 0 recorded. Checks the config first, so a bad one fails before any launch."""
    run = runfolder.RunFolder(Path(cfg.paths.run_dir))
    target = run.path
    try:
        C.validate(cfg)
        cfg = C.typed_config(cfg)
        if cfg.resume != "never":  # the workers join the folder to continue
            target = _resume_folder(cfg, run.path, overrides)
            if target != run.path:
                runfolder.move_log_handlers(run.path, target)
                shutil.rmtree(run.path, ignore_errors=True)
                run = runfolder.RunFolder(target)
        distributed.launch(cfg.distributed, "pipeline.train", overrides, target)
    except BaseException as err:
        if not run.info_path.exists():  # failed before rank 0 started: record it here
            run.start(cfg, overrides)
        if run.info()["status"] == "running":
            run.finish("interrupted" if isinstance(err, KeyboardInterrupt) else "failed", err)
        raise
    return float(run.info()["objective"][cfg.objective.metric])


def _callbacks(cfg: C.TrainConfig, run: runfolder.RunFolder) -> list:
    """Trainer callbacks that this run's config asks for."""
    def record(checkpoint, best, best_value):
        run.update(last_checkpoint=checkpoint, best_checkpoint=best, best_metric=best_value)

    return [preemption.preemption_callback(list(cfg.preemption.signals), cfg.preemption.exit_code),
            checkpoints.checkpoint_recorder(record),
            trainer.first_step_callback(lambda: _first_step(run)), tracking.model_state_callback()]


def _first_step(run: runfolder.RunFolder) -> None:
    """Records when training began (``first_step_at`` in run.json): start-up cost."""
    now = time.time()
    run.update(first_step_at=now)
    log.info("first training step begins %.1f s after the run started", now - run.started)


def _startup_summary(cfg: C.TrainConfig, model, splits: data.Splits) -> dict:
    """Logs the derived numbers once (nanoGPT's "tokens per iteration") and returns them."""
    trainable, total = models.parameter_counts(model)
    world = int(__import__("os").environ.get("WORLD_SIZE", 1))
    global_batch = cfg.trainer.per_device_train_batch_size * cfg.trainer.gradient_accumulation_steps * world
    train = splits.stats["train"]
    summary = {"params/trainable": trainable, "params/total": total,
               "params/trainable_pct": 100.0 * trainable / total, "data/train_examples": train["examples"],
               "data/validation_examples": splits.stats["validation"]["examples"],
               "data/test_examples": splits.stats["test"]["examples"],
               "data/validation_in_train": splits.stats["overlap"]["validation"]["normalized"],
               "data/test_in_train": splits.stats["overlap"]["test"]["normalized"],
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


@hydra.main(version_base="1.3", config_path=str(C.CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float:
    return C.run_task(train, cfg)


if __name__ == "__main__":
    main()
    errors.end_process()
