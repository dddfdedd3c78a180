"""Trainer stage: TrainingArguments from the config, transformers' Trainer, and our callbacks.

The Trainer owns the loop, gradient accumulation, mixed precision, checkpointing, resume and
the W&B integration. What we add: ``use_cpu`` whenever CUDA is absent (without it, multi-process
CPU runs silently train every rank on the same data), a non-finite loss guard, and a callback
that keeps the logged metrics, with W&B's namespaced names, in the run folder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from pipeline import precision, progress
from pipeline.checkpoints import history_lines, rewind_history
from pipeline.config import ConfigError, PipelineError, TrainerConfig
from pipeline.preemption import RunSignals

log = logging.getLogger(__name__)


class NonFiniteLossError(PipelineError, RuntimeError):
    """The training loss became NaN or infinite."""


def namespaced(logs: Dict[str, Any]) -> Dict[str, Any]:
    """The names W&B shows: ``eval_loss`` -> ``eval/loss``, ``loss`` -> ``train/loss``."""
    from transformers.integrations.integration_utils import rewrite_logs

    return rewrite_logs(logs)


def unknown_extra_keys(extra: Dict[str, Any]) -> List[str]:
    """A problem for each ``trainer.extra`` key that is not a ``TrainingArguments`` field."""
    import difflib

    from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    problems = []
    for key in extra:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=3)
            problems.append(f"trainer.extra.{key} is not a TrainingArguments field"
                            + (f"; did you mean {', '.join(close)}?" if close else ""))
    return problems


def training_arguments(cfg: TrainerConfig, output_dir: Path, seed: int, *, has_eval: bool,
                       report_to: List[str], run_name: str,
                       best: Optional[Tuple[str, bool]] = None,
                       distributed: Optional[Dict[str, Any]] = None) -> Any:
    """Builds ``TrainingArguments``; ``cfg.extra`` keys must be TrainingArguments fields.

    ``best`` (from :func:`best_metric`) makes the Trainer track the best checkpoint, which
    ``save_total_limit`` rotation then never deletes. ``distributed`` adds the multi-process
    arguments (``deepspeed``: a config dict, ``ddp_backend``), see
    :func:`pipeline.distributed.trainer_arguments`.

    Raises:
        ConfigError: for an unknown ``trainer.extra`` key (listing close matches).
    """
    import torch
    from transformers import TrainingArguments

    problems = unknown_extra_keys(cfg.extra)
    if problems:
        raise ConfigError(problems)
    evaluate_every = cfg.eval_steps if has_eval else None
    mixed = precision.resolve(cfg.precision).precision  # as is, unless auto (train() resolved it)
    kwargs: Dict[str, Any] = dict(
        output_dir=str(output_dir), seed=seed, data_seed=seed, run_name=run_name,
        max_steps=cfg.max_steps, num_train_epochs=cfg.num_train_epochs,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_ratio, lr_scheduler_type=cfg.lr_scheduler_type,
        max_grad_norm=cfg.max_grad_norm, optim=cfg.optim,
        bf16=mixed == "bf16", fp16=mixed == "fp16",
        logging_steps=cfg.logging_steps, logging_nan_inf_filter=False,
        eval_strategy="steps" if evaluate_every else "no", eval_steps=evaluate_every,
        save_strategy="steps" if cfg.save_steps else "no", save_steps=cfg.save_steps or 500,
        save_total_limit=cfg.save_total_limit, train_sampling_strategy=cfg.sampling,
        dataloader_num_workers=cfg.dataloader_num_workers,
        include_num_input_tokens_seen="non_padding", report_to=report_to,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=not progress.interactive(),  # a bar on a terminal; else progress_callback
    )
    if best and evaluate_every:
        kwargs.update(metric_for_best_model=best[0], greater_is_better=best[1])
        if cfg.save_steps and cfg.save_steps % evaluate_every:
            log.warning("trainer.save_steps=%d is not a multiple of trainer.eval_steps=%d: a "
                        "checkpoint exists only where both fall, so the best one may not be kept",
                        cfg.save_steps, evaluate_every)
    kwargs.update(distributed or {})
    kwargs.update(cfg.extra)
    return TrainingArguments(**kwargs)


def _recording_callback(path: Path) -> Any:
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState

    class RecordMetrics(TrainerCallback, ExportableState):
        """Appends every logged dict, namespaced as in W&B, to ``history.jsonl``.

        Its state (the number of rows written) goes into every checkpoint's
        ``trainer_state.json``, so a resume can cut the history back to that checkpoint.
        """

        def __init__(self):
            self.rows = len(history_lines(path))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and state.is_world_process_zero:
                row = {"step": state.global_step, **namespaced(logs)}
                with path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
                self.rows += 1

        def state(self) -> dict:
            return {"args": {}, "attributes": {"rows": self.rows}}

    return RecordMetrics()


def first_step_callback(on_first_step: Callable[[], None]) -> Any:
    """A callback that calls ``on_first_step()`` once, as this process's first training step
    begins (the end of start-up: imports, data, model, base evaluation)."""
    from transformers import TrainerCallback

    class FirstStep(TrainerCallback):
        seen = False

        def on_step_begin(self, args, state, control, **kwargs):
            if not self.seen:
                self.seen = True
                on_first_step()

    return FirstStep()


def progress_callback() -> Any:
    """Training progress as log lines (steps done of all, ETA) where no bar can show: SLURM
    logs, CI, pipes. On a terminal the Trainer's own bar shows instead."""
    from transformers import TrainerCallback

    class TrainingProgress(TrainerCallback):
        shown: Optional[progress.Progress] = None

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero and not progress.interactive():
                self.shown = progress.Progress(state.max_steps - state.global_step, "training", "steps",
                                               bar=False)

        def on_step_end(self, args, state, control, **kwargs):
            if self.shown is not None:
                self.shown.update(1)

        def on_train_end(self, args, state, control, **kwargs):
            if self.shown is not None:
                self.shown.close()
                self.shown = None

    return TrainingProgress()


def build_trainer(model: Any, tokenizer: Any, args: Any, train_dataset: Any,
                  eval_dataset: Optional[Any], data_collator: Any, nan_policy: str,
                  history_path: Path, callbacks: Optional[List[Any]] = None,
                  extra_eval: Optional[Callable[[Any], Dict[str, float]]] = None) -> Any:
    """transformers' Trainer with a non-finite-loss guard and run-folder metric history.

    ``extra_eval(model)`` adds metrics (e.g. BLEU on a validation slice) to every evaluation
    during training, logged as ``eval/<name>`` and seen by callbacks (pruning) like the loss.
    """
    trainer = _trainer_class()(
        model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        data_collator=data_collator, processing_class=tokenizer,
        callbacks=[_recording_callback(history_path), progress_callback(), *(callbacks or [])])
    trainer.nan_policy, trainer.extra_eval = nan_policy, extra_eval
    return trainer


def _trainer_class() -> type:
    """The Trainer that :func:`build_trainer` makes (defined on first use: importing this
    module does not import transformers)."""
    import torch
    from transformers import Trainer

    class PipelineTrainer(Trainer):
        skipped_steps = 0
        nan_policy: str = "stop"
        extra_eval: Optional[Callable[[Any], Dict[str, float]]] = None

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            if torch.isfinite(loss):
                return loss
            step = self.state.global_step + 1
            if self.nan_policy == "stop":
                raise NonFiniteLossError(
                    f"training loss is {loss.item()} at step {step}; lower trainer.learning_rate, "
                    "use trainer.precision=fp32, or set trainer.nan_policy=skip")
            # skip: drop this step's gradients (optimizers skip parameters whose grad is None).
            model.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            log.warning("non-finite loss at step %d: skipped (%d so far)", step, self.skipped_steps)
            return torch.zeros_like(loss)

        def _track_num_input_tokens(self, inputs):
            # The Trainer counts non-padding tokens by the attention mask, or else as ids other
            # than the padding id; packed rows have no mask (it would turn off the block-diagonal
            # attention), and the padding id is often the end-of-turn token that every example
            # holds, so count them as the packing collator laid them out.
            if "attention_mask" in inputs or "position_ids" not in inputs or \
                    self.args.include_num_input_tokens_seen != "non_padding":
                return super()._track_num_input_tokens(inputs)
            from pipeline.packing import real_tokens

            count = torch.as_tensor(real_tokens(inputs), device=self.args.device, dtype=torch.int64)
            self.state.num_input_tokens_seen += self.accelerator.gather(count).sum().item()

        def evaluate(self, *args, **kwargs):
            # Every data loader iteration draws its seed from the global RNG: without the fork,
            # each evaluation would shift all later dropout masks and shuffles, and a run that
            # evaluates every few steps (a sweep trial, for its pruner) would train another
            # model than the same config without evaluations.
            device = self.args.device
            devices = [device.index or 0] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                return super().evaluate(*args, **kwargs)

        def evaluation_loop(self, *args, **kwargs):
            output = super().evaluation_loop(*args, **kwargs)
            prefix = kwargs.get("metric_key_prefix", args[3] if len(args) > 3 else "eval")
            if self.extra_eval is not None and prefix == "eval" and self.state.global_step > 0:
                output.metrics.update({f"eval_{k}": v for k, v in self.extra_eval(self.model).items()})
            return output

    return PipelineTrainer


def best_metric(objective: str, direction: str, logged: List[str]) -> Optional[Tuple[str, bool]]:
    """The Trainer's ``(metric_for_best_model, greater_is_better)`` for the run's objective.

    ``tuned/eval/<name>`` is what the Trainer logs as ``eval_<name>`` at each evaluation during
    training, so checkpoint rotation then keeps the best checkpoint by the objective.

    Args:
        objective: ``objective.metric``, e.g. ``tuned/eval/loss``.
        direction: ``minimize`` or ``maximize``.
        logged: the metric names evaluations during training log (``loss``, and generation
            metrics with ``evaluation.during_training``); empty when there are none.

    Returns:
        None for an objective not measured during training (test metrics, costs).
    """
    name = objective[len("tuned/eval/"):] if objective.startswith("tuned/eval/") else None
    if name not in logged:
        return None
    return f"eval_{name}", direction == "maximize"


def whole_run_loss(attempt_loss: float, log_history: List[Dict[str, Any]], start: int, end: int) -> float:
    """The mean training loss over steps 1..``end`` of a run resumed at step ``start``.

    The Trainer's ``training_loss`` averages only the steps of its own ``train()`` call; the
    steps before the checkpoint come from the logged losses it restored (``loss`` rows are
    means over the steps since the previous row). Exact when ``start`` is a logging step.
    """
    if start <= 0 or end <= 0:
        return attempt_loss
    total, previous = 0.0, 0
    for row in sorted((r for r in log_history if "loss" in r and r["step"] <= start),
                      key=lambda r: r["step"]):
        total += row["loss"] * (row["step"] - previous)
        previous = row["step"]
    before = total / previous * start if previous else 0.0
    return (before + attempt_loss * (end - start)) / end


def compare(base: Dict[str, float], tuned: Dict[str, float]) -> Dict[str, float]:
    """``base/*``, ``tuned/*`` and ``delta/*`` (tuned - base) keys for the same metric names."""
    out = {f"base/{k}": v for k, v in base.items()}
    out.update({f"tuned/{k}": v for k, v in tuned.items()})
    out.update({f"delta/{k}": tuned[k] - base[k] for k in base if k in tuned})
    return out


def save_artifact(trainer: Any, run_dir: Path, is_peft: bool) -> Path:
    """Saves the adapter (PEFT) or the whole model, with the tokenizer, atomically.

    The folder is self-contained: ``PeftModel.from_pretrained(base, folder)`` (or
    ``AutoModelForCausalLM.from_pretrained(folder)`` for full fine-tuning) loads it alone.
    """
    import shutil

    target = run_dir / ("adapter" if is_peft else "model")
    tmp = run_dir / f".{target.name}.tmp"
    main = trainer.is_world_process_zero()
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    # Every rank calls save_model: under ZeRO-3 it gathers the sharded weights (a collective);
    # only rank 0 writes, and only rank 0 moves the folder into place.
    trainer.save_model(str(tmp))
    if main:
        from pipeline.atomic import commit_folder

        # The Trainer also pickles its arguments; the run folder keeps config.yaml instead, and
        # a folder that serving loads should hold no pickles.
        (tmp / "training_args.bin").unlink(missing_ok=True)
        commit_folder(tmp, target)
    trainer.accelerator.wait_for_everyone()
    return target


def evaluation_slice(validation: Optional[Any], cfg: TrainerConfig) -> Optional[Any]:
    """What evaluations during training score: the first ``trainer.eval_examples`` validation
    examples (a fixed slice, the same at every step and in every trial), or all of them."""
    if validation is None or cfg.eval_examples is None or cfg.eval_examples >= len(validation):
        return validation
    log.info("evaluations during training: the first %d of %d validation examples "
             "(trainer.eval_examples)", cfg.eval_examples, len(validation))
    return validation.select(range(cfg.eval_examples))


def _base_measurement(trainer: Any, model: Any, evaluator: Any, base: Optional[Any],
                      on_base: Optional[Callable[[Any], None]], resume_from: Optional[str],
                      enter: Callable[[str], None]) -> Any:
    """The base model's measurement: ``base`` when given (resumed or cached; a cached one is
    still logged, so the curves start from the base), else measured now and handed to
    ``on_base``. Before training the fresh adapter is an identity: the model is the base."""
    if base is not None:
        if resume_from is None:
            evaluator.log_losses(trainer, base.metrics)
        return base
    from pipeline.distributed import gathered

    enter("base evaluation")
    with gathered(model):  # no DeepSpeed engine yet: a zero.Init model cannot run alone
        base = evaluator.measure(trainer, "base")
    if on_base:
        on_base(base)
    return base


def _train(trainer: Any, cfg: TrainerConfig, resume_from: Optional[str]) -> Dict[str, Any]:
    """Trains (or continues from ``resume_from``); returns the ``train/*`` and ``perf/*`` figures
    of the whole run (the loss over every step, the tokens per second of this attempt)."""
    # Read now: rotation may delete the checkpoint during training.
    start = json.loads((Path(resume_from) / "trainer_state.json").read_text()) if resume_from else {}
    if resume_from and 0 < cfg.max_steps <= start.get("global_step", 0):
        # Training had finished (the run stopped in its final evaluation). From a checkpoint
        # at max_steps the Trainer would still take one more step: load it instead.
        from transformers import TrainerState

        trainer._load_from_checkpoint(str(resume_from))
        trainer.state = TrainerState.load_from_json(str(Path(resume_from) / "trainer_state.json"))
        log.info("training had finished at step %d (%s): measuring the tuned model",
                 trainer.state.global_step, resume_from)
        runtime, attempt_loss = 0.0, 0.0
    else:
        output = trainer.train(resume_from_checkpoint=resume_from)
        runtime, attempt_loss = output.metrics["train_runtime"], output.training_loss
    tokens = trainer.state.num_input_tokens_seen
    loss = whole_run_loss(attempt_loss, trainer.state.log_history,
                          start.get("global_step", 0), trainer.state.global_step)
    attempt_tokens = tokens - start.get("num_input_tokens_seen", 0)  # the runtime is this attempt's
    return {"train/loss": loss, "train/steps": trainer.state.global_step, "train/tokens": tokens,
            "perf/train_runtime_s": runtime, "perf/train_tokens_per_s": attempt_tokens / runtime if runtime else 0.0,
            "train/skipped_steps": trainer.skipped_steps}


def prepare(cfg: TrainerConfig, model: Any, tokenizer: Any, splits: Any, run_dir: Path, *, seed: int,
            packing: bool, report_to: List[str], run_name: str, resume_from: Optional[str],
            evaluator: Any, callbacks: Optional[List[Any]] = None, best: Optional[Tuple[str, bool]] = None,
            distributed: Optional[Dict[str, Any]] = None, pack_length: int = 512) -> Any:
    """The run's Trainer: its arguments, batches and callbacks, the history cut back to
    ``resume_from``.

    Args:
        cfg: trainer settings.
        model: the model with its adapter attached (or all weights trainable).
        tokenizer: the model's tokenizer.
        splits: :class:`pipeline.data.Splits`.
        run_dir: the run folder (checkpoints go in ``checkpoints/``).
        seed: the run's seed.
        packing: padding-free batches, of ``pack_length`` tokens per row.
        report_to: Trainer integrations (``["wandb"]`` or ``[]``).
        run_name: the run's display name.
        resume_from: a checkpoint folder to continue from, or None.
        evaluator: :class:`pipeline.scoring.Evaluator` (its metrics during training, if any).
        callbacks: extra ``TrainerCallback`` objects (pruning, preemption signals).
        best: ``(metric_for_best_model, greater_is_better)`` from :func:`best_metric`, or None.
        distributed: multi-process ``TrainingArguments`` (DeepSpeed config, DDP backend).
    """
    from pipeline.packing import collator

    args = training_arguments(cfg, run_dir / "checkpoints", seed, has_eval=splits.validation is not None,
                              report_to=report_to, run_name=run_name, best=best,
                              distributed=distributed)
    rewind_history(run_dir / "history.jsonl", resume_from)
    return build_trainer(model, tokenizer, args, splits.train, evaluation_slice(splits.validation, cfg),
                         collator(tokenizer, packing, pack_length), cfg.nan_policy, run_dir / "history.jsonl",
                         callbacks=callbacks, extra_eval=evaluator.during_training)


def fit(trainer: Any, cfg: TrainerConfig, run_dir: Path, *, trains: bool, resume_from: Optional[str],
        evaluator: Any, base: Optional[Any] = None, on_base: Optional[Callable[[Any], None]] = None,
        phases: Optional[RunSignals] = None) -> Tuple[Dict[str, Any], Any, Any]:
    """Measures the base model, trains, measures the tuned model and saves it.

    Args:
        trainer: from :func:`prepare`.
        cfg: trainer settings.
        run_dir: the run folder (the artifact goes in ``adapter/`` or ``model/``).
        trains: False for ``adapter=none`` (evaluation only).
        resume_from: the checkpoint ``trainer`` continues from, or None.
        evaluator: :class:`pipeline.scoring.Evaluator` (losses and generation metrics).
        base: the base model's :class:`~pipeline.scoring.Measurement` from an earlier
            attempt of this run or from the base measurement cache, or None to measure it now
            (before training, the fresh adapter is an identity: the model is the base model).
        on_base: called with the base measurement once taken (to persist it).
        phases: the run's :class:`RunSignals`, told each phase (base evaluation, training,
            final evaluation, saving).

    Returns:
        ``(metrics, base, tuned)``: namespaced metrics (``base/*``, ``tuned/*``, ``delta/*``,
        ``train/*``, ``perf/*``) and the two measurements.
    """
    from peft import PeftModel

    from pipeline.runfolder import folder_size_mb

    enter = phases.enter if phases is not None else (lambda phase: None)
    base = _base_measurement(trainer, trainer.model, evaluator, base, on_base, resume_from, enter)
    metrics: Dict[str, Any] = {}
    tuned = base
    if trains:
        enter("training")
        metrics.update(_train(trainer, cfg, resume_from))
        enter("final evaluation")
        tuned = evaluator.measure(trainer, "tuned")
        enter("saving")
        artifact = save_artifact(trainer, run_dir, isinstance(trainer.model, PeftModel))
        metrics["perf/artifact_mb"] = folder_size_mb(artifact)
    metrics.update(compare(base.metrics, tuned.metrics))
    return metrics, base, tuned
