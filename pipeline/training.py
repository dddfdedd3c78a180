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

from pipeline.config import PipelineError, TrainerConfig

log = logging.getLogger(__name__)


class NonFiniteLossError(PipelineError, RuntimeError):
    """The training loss became NaN or infinite."""


def namespaced(logs: Dict[str, Any]) -> Dict[str, Any]:
    """The names W&B shows: ``eval_loss`` -> ``eval/loss``, ``loss`` -> ``train/loss``."""
    from transformers.integrations.integration_utils import rewrite_logs

    return rewrite_logs(logs)


def training_arguments(cfg: TrainerConfig, output_dir: Path, seed: int, *, has_eval: bool,
                       report_to: List[str], run_name: str) -> Any:
    """Builds ``TrainingArguments``; ``cfg.extra`` keys must be TrainingArguments fields.

    Raises:
        ValueError: for an unknown ``trainer.extra`` key (listing close matches).
    """
    import difflib

    import torch
    from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    for key in cfg.extra:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=3)
            raise ValueError(f"trainer.extra.{key} is not a TrainingArguments field"
                             + (f"; did you mean {', '.join(close)}?" if close else ""))
    evaluate_every = cfg.eval_steps if has_eval else None
    kwargs: Dict[str, Any] = dict(
        output_dir=str(output_dir), seed=seed, data_seed=seed, run_name=run_name,
        max_steps=cfg.max_steps, num_train_epochs=cfg.num_train_epochs,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_ratio, lr_scheduler_type=cfg.lr_scheduler_type,
        max_grad_norm=cfg.max_grad_norm, optim=cfg.optim,
        bf16=cfg.precision == "bf16", fp16=cfg.precision == "fp16",
        logging_steps=cfg.logging_steps, logging_nan_inf_filter=False,
        eval_strategy="steps" if evaluate_every else "no", eval_steps=evaluate_every,
        save_strategy="steps" if cfg.save_steps else "no", save_steps=cfg.save_steps or 500,
        save_total_limit=cfg.save_total_limit, train_sampling_strategy=cfg.sampling,
        dataloader_num_workers=cfg.dataloader_num_workers,
        include_num_input_tokens_seen="non_padding", report_to=report_to,
        use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
    )
    kwargs.update(cfg.extra)
    return TrainingArguments(**kwargs)


def _recording_callback(path: Path) -> Any:
    from transformers import TrainerCallback

    class RecordMetrics(TrainerCallback):
        """Appends every logged dict, namespaced as in W&B, to ``history.jsonl``."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and state.is_world_process_zero:
                row = {"step": state.global_step, **namespaced(logs)}
                with path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")

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


def build_trainer(model: Any, tokenizer: Any, args: Any, train_dataset: Any,
                  eval_dataset: Optional[Any], data_collator: Any, nan_policy: str,
                  history_path: Path, callbacks: Optional[List[Any]] = None,
                  extra_eval: Optional[Callable[[Any], Dict[str, float]]] = None) -> Any:
    """transformers' Trainer with a non-finite-loss guard and run-folder metric history.

    ``extra_eval(model)`` adds metrics (e.g. BLEU on a validation slice) to every evaluation
    during training, logged as ``eval/<name>`` and seen by callbacks (pruning) like the loss.
    """
    import torch
    from transformers import Trainer

    class PipelineTrainer(Trainer):
        skipped_steps = 0

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            if torch.isfinite(loss):
                return loss
            step = self.state.global_step + 1
            if nan_policy == "stop":
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
            from pipeline.data import real_tokens

            count = torch.as_tensor(real_tokens(inputs), device=self.args.device, dtype=torch.int64)
            self.state.num_input_tokens_seen += self.accelerator.gather(count).sum().item()

        def evaluation_loop(self, *args, **kwargs):
            output = super().evaluation_loop(*args, **kwargs)
            prefix = kwargs.get("metric_key_prefix", args[3] if len(args) > 3 else "eval")
            if extra_eval is not None and prefix == "eval" and self.state.global_step > 0:
                output.metrics.update({f"eval_{k}": v for k, v in extra_eval(self.model).items()})
            return output

    return PipelineTrainer(
        model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        data_collator=data_collator, processing_class=tokenizer,
        callbacks=[_recording_callback(history_path), *(callbacks or [])])


def last_checkpoint(output_dir: Path) -> Optional[str]:
    """The newest complete checkpoint folder, or None."""
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None


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
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.save_model(str(tmp))
    # The Trainer also pickles its arguments; the run folder keeps config.yaml instead, and a
    # folder that serving loads should hold no pickles.
    (tmp / "training_args.bin").unlink(missing_ok=True)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def fit(cfg: TrainerConfig, model: Any, tokenizer: Any, splits: Any, run_dir: Path, *, seed: int,
        trains: bool, packing: bool, report_to: List[str], run_name: str,
        resume_from: Optional[str], evaluator: Any, base: Optional[Any] = None,
        on_base: Optional[Callable[[Any], None]] = None,
        callbacks: Optional[List[Any]] = None, pack_length: int = 512
        ) -> Tuple[Dict[str, Any], Any, Any]:
    """Measures the base model, trains, measures the tuned model and saves it.

    Args:
        cfg: trainer settings.
        model: the model with its adapter attached (or all weights trainable).
        tokenizer: the model's tokenizer.
        splits: :class:`pipeline.data.Splits`.
        run_dir: the run folder (checkpoints go in ``checkpoints/``).
        seed: the run's seed.
        trains: False for ``adapter=none`` (evaluation only).
        packing: padding-free batches.
        report_to: Trainer integrations (``["wandb"]`` or ``[]``).
        run_name: the run's display name.
        resume_from: a checkpoint folder to continue from, or None.
        evaluator: :class:`pipeline.evaluation.Evaluator` (losses and generation metrics).
        base: the base model's :class:`~pipeline.evaluation.Measurement` from an earlier
            attempt of this run, or None to measure it now (before training, the fresh adapter
            is an identity: the model is the base model).
        on_base: called with the base measurement once taken (to persist it).
        callbacks: extra ``TrainerCallback`` objects (pruning, preemption signals).
        pack_length: with ``packing``, the token budget of one packed row.

    Returns:
        ``(metrics, base, tuned)``: namespaced metrics (``base/*``, ``tuned/*``, ``delta/*``,
        ``train/*``, ``perf/*``) and the two measurements.
    """
    from peft import PeftModel

    from pipeline.data import collator
    from pipeline.tracking import folder_size_mb

    args = training_arguments(cfg, run_dir / "checkpoints", seed, has_eval=splits.validation is not None,
                              report_to=report_to, run_name=run_name)
    trainer = build_trainer(model, tokenizer, args, splits.train, splits.validation,
                            collator(tokenizer, packing, pack_length), cfg.nan_policy, run_dir / "history.jsonl",
                            callbacks=callbacks, extra_eval=evaluator.during_training)
    if base is None:
        base = evaluator.measure(trainer)
        if on_base:
            on_base(base)
    metrics: Dict[str, Any] = {}
    tuned = base
    if trains:
        output = trainer.train(resume_from_checkpoint=resume_from)
        runtime = output.metrics["train_runtime"]
        tokens = trainer.state.num_input_tokens_seen
        metrics.update({"train/loss": output.training_loss, "train/steps": trainer.state.global_step,
                        "train/tokens": tokens, "perf/train_runtime_s": runtime,
                        "perf/train_tokens_per_s": tokens / runtime if runtime else 0.0,
                        "train/skipped_steps": trainer.skipped_steps})
        tuned = evaluator.measure(trainer)
        artifact = save_artifact(trainer, run_dir, isinstance(model, PeftModel))
        metrics["perf/artifact_mb"] = folder_size_mb(artifact)
    metrics.update(compare(base.metrics, tuned.metrics))
    return metrics, base, tuned
