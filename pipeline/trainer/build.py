"""The Trainer of a run: ``TrainingArguments`` from the config, transformers' ``Trainer`` with our
guards, and the batches it trains and evaluates on.

The Trainer owns the loop, gradient accumulation, mixed precision, checkpointing, resume and
the W&B integration. What we add: ``use_cpu`` whenever CUDA is absent (without it, multi-process
CPU runs silently train every rank on the same data), a non-finite loss guard, evaluations that
leave the RNG alone, and the run folder's metric history (:mod:`pipeline.trainer.callbacks`);
and for speed, with the same loss and gradients: the output layer only where a label is
(:mod:`pipeline.trainer.loss`), the frozen base held in bf16 while training under bf16 autocast
(:class:`pipeline.model.precision.FrozenBase`), packed batches where the model's attention
honours them (:func:`packing_for`), and ``trainer.compile`` (:func:`compile_decision`).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from pipeline.config.errors import ConfigError, PipelineError
from pipeline.config.schema import TrainerConfig
from pipeline.data.packing import boundary_problem, collator, real_tokens
from pipeline.data.splits import Splits
from pipeline.model import precision
from pipeline.runs import progress
from pipeline.runs.checkpoints import rewind_history
from pipeline.scoring.measurement import Evaluator
from pipeline.trainer import opening
from pipeline.trainer.callbacks import progress_callback, recording_callback
from pipeline.trainer.loss import labelled_loss, output_layer, unsupported

log = logging.getLogger(__name__)


class NonFiniteLossError(PipelineError, RuntimeError):
    """The training loss became NaN or infinite."""


def unknown_extra_keys(extra: Dict[str, Any]) -> List[str]:
    """A problem for each ``trainer.extra`` key that is not a ``TrainingArguments`` field."""
    from transformers import TrainingArguments  # lazy: transformers loads torch

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

    ``best`` (from :func:`pipeline.trainer.objective.best_metric`) makes the Trainer track the best checkpoint, which
    ``save_total_limit`` rotation then never deletes. ``distributed`` adds the multi-process
    arguments (``deepspeed``: a config dict, ``ddp_backend``), see
    :func:`pipeline.trainer.distributed.trainer_arguments`.

    Raises:
        ConfigError: for an unknown ``trainer.extra`` key (listing close matches).
    """
    import torch  # lazy: start-up must not pay for torch
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
        torch_compile=compile_decision(cfg.compile),
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


def compile_decision(requested: str) -> bool:
    """Whether ``trainer.compile`` compiles the model (``TrainingArguments.torch_compile``), logged
    with the reason.

    ``auto`` compiles only where compiling was measured to repay its compile time, and so far it
    was nowhere: on a 2-core AVX512-bf16 CPU, 12 steps of the embedded default took 375 s compiled
    against 16 s (the batches' changing shapes recompile, and the compiled step was still slower,
    2.4 s against 1.4 s: ``benchmarks/training_speed.py --pipeline-overrides trainer.compile=on``).
    GPUs are not measured yet, so ``auto`` stays off there too; ``trainer.compile=on`` compiles.
    """
    if requested != "auto":
        log.info("torch.compile: %s (trainer.compile=%s)", requested, requested)
        return requested == "on"
    log.info("torch.compile: off (trainer.compile=auto: compiling has not been measured to repay its "
             "compile time on this kind of machine; trainer.compile=on compiles)")
    return False


def build_trainer(model: Any, tokenizer: Any, args: Any, train_dataset: Any,
                  eval_dataset: Optional[Any], data_collator: Any, nan_policy: str,
                  history_path: Path, callbacks: Optional[List[Any]] = None,
                  extra_eval: Optional[Callable[[Any], Dict[str, float]]] = None,
                  labelled_logits: bool = False, base_in_compute_dtype: bool = False,
                  shared_opening: bool = False) -> Any:
    """transformers' Trainer with a non-finite-loss guard and run-folder metric history.

    ``extra_eval(model)`` adds metrics (e.g. BLEU on a validation slice) to every evaluation
    during training, logged as ``eval/<name>`` and seen by callbacks (pruning) like the loss.
    ``labelled_logits``: the training loss takes the output layer only at labelled positions
    (:mod:`pipeline.trainer.loss`), where the model allows it. ``base_in_compute_dtype``: under
    bf16 autocast, the frozen base's matmul weights are held in bf16 while training
    (:class:`pipeline.model.precision.FrozenBase`). ``shared_opening``: the tokens every row
    of a batch begins with run once per batch (:mod:`pipeline.trainer.opening`), where the
    run and the model allow it.
    """
    trainer = _trainer_class()(
        model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        data_collator=data_collator, processing_class=tokenizer,
        callbacks=[recording_callback(history_path), progress_callback(), *(callbacks or [])])
    trainer.nan_policy, trainer.extra_eval = nan_policy, extra_eval
    why_not = unsupported(model) if labelled_logits else ""
    if labelled_logits and trainer.label_smoother is not None:
        why_not = "label smoothing (trainer.extra.label_smoothing_factor) takes transformers' own loss"
    if why_not:
        log.info("training loss over every position (trainer.labelled_logits has no effect): %s", why_not)
    elif labelled_logits:
        log.info("training loss: the output layer only at labelled positions (trainer.labelled_logits)")
    trainer.labelled_logits = labelled_logits and not why_not
    trainer.frozen_dtype = _frozen_dtype(trainer) if base_in_compute_dtype else None
    trainer.shared_opening = shared_opening and _opening_decision(trainer)
    return trainer


def _opening_decision(trainer: Any) -> bool:
    """Whether the Trainer computes a batch's shared opening once (``trainer.shared_opening``),
    logged with the reason where not."""
    args, model = trainer.args, trainer.model
    peft_config = getattr(model, "peft_config", {}) or {}
    why_not = ""
    if not trainer.labelled_logits:
        why_not = "it is part of the labelled-position loss, which is off"
    elif args.world_size > 1 or trainer.is_deepspeed_enabled:
        why_not = "several processes (DDP and ZeRO expect one forward per backward)"
    elif args.gradient_checkpointing or getattr(model, "is_gradient_checkpointing", False):
        why_not = "gradient checkpointing (the model drops its cache while it recomputes layers)"
    elif args.neftune_noise_alpha is not None:
        why_not = "NEFTune scales its noise by each call's length, which the opening would change"
    elif any(getattr(c, "is_prompt_learning", False) for c in peft_config.values()):
        why_not = "prompt learning puts its own keys and values in the cache"
    else:
        why_not = opening.rope_problem(getattr(model, "config", None)) or \
            opening.cache_problem(model, output_layer(model))
    if why_not:
        log.info("shared opening: every row computed whole (trainer.shared_opening has no effect): %s", why_not)
        return False
    log.info("shared opening: the tokens every row of a batch begins with (at least %d, no label) run "
             "once per batch (trainer.shared_opening)", opening.MINIMUM)
    return True


def _frozen_dtype(trainer: Any) -> Optional[Any]:
    """The dtype the frozen base is held in while training: bf16 under bf16 autocast, unless
    DeepSpeed (which casts the model itself) runs it or the base is quantized; else None."""
    import torch  # lazy: start-up must not pay for torch

    model = trainer.model
    if not trainer.args.bf16 or trainer.is_deepspeed_enabled or getattr(model, "is_quantized", False) \
            or getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        return None
    return torch.bfloat16


def _trainer_class() -> type:
    """The Trainer that :func:`build_trainer` makes (defined on first use: importing this
    module does not import transformers)."""
    import torch  # lazy: start-up must not pay for torch
    from transformers import Trainer

    class PipelineTrainer(Trainer):
        skipped_steps = 0
        nan_policy: str = "stop"
        extra_eval: Optional[Callable[[Any], Dict[str, float]]] = None
        labelled_logits: bool = False  # the output layer and loss at labelled positions only
        frozen_dtype: Optional[Any] = None  # the frozen base's matmul weights while training
        shared_opening: bool = False  # a batch's common opening computed once
        opening_seen: bool = False  # a batch has shared its opening (logged once)

        def train(self, *args, **kwargs):
            if self.frozen_dtype is None:
                return super().train(*args, **kwargs)
            frozen = precision.FrozenBase(self.model, self.frozen_dtype,
                                          Path(self.args.output_dir) /
                                          f".frozen_base.{self.args.process_index}.pt")
            cast = frozen.cast()
            if cast:
                log.info("frozen base: %s weights held in %s while training (trainer.base_in_compute_dtype)",
                         f"{cast:,}", str(self.frozen_dtype).replace("torch.", ""))
            try:
                return super().train(*args, **kwargs)
            finally:
                frozen.restore()

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # Evaluation wants the logits (return_outputs); label smoothing and a custom loss
            # function take the full logits as transformers computes them.
            if return_outputs or not self.labelled_logits or "labels" not in inputs or \
                    self.label_smoother is not None or self.compute_loss_func is not None:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            # As transformers' own path: num_items_in_batch reaches the loss only where the model
            # takes loss kwargs (else training_step divides the mean by the accumulation steps).
            given = num_items_in_batch if self.model_accepts_loss_kwargs else None
            shared = opening.shared_length(inputs) if self.shared_opening else 0
            if shared and not self.opening_seen:
                self.opening_seen = True
                log.info("shared opening: the first %d tokens of each of %d rows run once (the first batch "
                         "that shares one)", shared, len(inputs["input_ids"]))
            loss = labelled_loss(model, inputs, given, output_layer(self.accelerator.unwrap_model(model)), shared)
            if self.args.average_tokens_across_devices and given is not None:
                # what Trainer.compute_loss does: the gradient is averaged over processes later
                loss = loss * (self.accelerator.num_processes // self.get_tp_size()
                               if self.args.n_gpu <= 1 else self.args.n_gpu)
            return loss

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


def evaluation_slice(validation: Optional[Any], cfg: TrainerConfig) -> Optional[Any]:
    """What evaluations during training score: the first ``trainer.eval_examples`` validation
    examples (a fixed slice, the same at every step and in every trial), or all of them."""
    if validation is None or cfg.eval_examples is None or cfg.eval_examples >= len(validation):
        return validation
    log.info("evaluations during training: the first %d of %d validation examples "
             "(trainer.eval_examples)", cfg.eval_examples, len(validation))
    return validation.select(range(cfg.eval_examples))


def prepare(cfg: TrainerConfig, model: Any, tokenizer: Any, splits: Splits, run_dir: Path, *, seed: int,
            packing: bool, report_to: List[str], run_name: str, resume_from: Optional[str],
            evaluator: Evaluator, callbacks: Optional[List[Any]] = None, best: Optional[Tuple[str, bool]] = None,
            distributed: Optional[Dict[str, Any]] = None, pack_length: int = 512) -> Any:
    """The run's Trainer: its arguments, batches and callbacks, the history cut back to
    ``resume_from``.

    Args:
        cfg: trainer settings.
        model: the model with its adapter attached (or all weights trainable).
        tokenizer: the model's tokenizer.
        splits: the tokenized splits.
        run_dir: the run folder (checkpoints go in ``checkpoints/``).
        seed: the run's seed.
        packing: padding-free batches, of ``pack_length`` tokens per row.
        report_to: Trainer integrations (``["wandb"]`` or ``[]``).
        run_name: the run's display name.
        resume_from: a checkpoint folder to continue from, or None.
        evaluator: the run's evaluation sets (their generation metrics during training, if any).
        callbacks: extra ``TrainerCallback`` objects (pruning, preemption signals).
        best: ``(metric_for_best_model, greater_is_better)`` from
            :func:`pipeline.trainer.objective.best_metric`, or None.
        distributed: multi-process ``TrainingArguments`` (DeepSpeed config, DDP backend).
    """
    args = training_arguments(cfg, run_dir / "checkpoints", seed, has_eval=splits.validation is not None,
                              report_to=report_to, run_name=run_name, best=best,
                              distributed=distributed)
    rewind_history(run_dir / "history.jsonl", resume_from)
    return build_trainer(model, tokenizer, args, splits.train, evaluation_slice(splits.validation, cfg),
                         collator(tokenizer, packing, pack_length), cfg.nan_policy, run_dir / "history.jsonl",
                         callbacks=callbacks, extra_eval=evaluator.during_training,
                         labelled_logits=cfg.labelled_logits, base_in_compute_dtype=cfg.base_in_compute_dtype,
                         shared_opening=cfg.shared_opening)


def packing_for(requested: bool, model: Any) -> bool:
    """Whether the run packs its batches: ``data.packing``, unless the model's attention would
    let packed examples see each other (then the loss would not be the padded batch's), which
    a forward of six tokens tells (:func:`pipeline.data.packing.boundary_problem`); the decision
    and its reason are logged."""
    if not requested:
        return False
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        # ZeRO-3 shards the weights; gathering them all for a probe would cost what it saves
        log.info("data.packing: packed batches (not probed under ZeRO-3: transformers' attention "
                 "derives the boundaries from the position ids)")
        return True
    problem = boundary_problem(model)
    if problem:
        log.warning("data.packing: padded batches instead of packed ones: %s", problem)
        return False
    log.info("data.packing: packed batches, position ids restarting per example (the attention "
             "honours the boundaries: checked)")
    return True


def describe_speedups(trainer: Any) -> Dict[str, Any]:
    """What the Trainer does beyond transformers' own loop to train faster, for logs and benchmarks."""
    return {"labelled_logits": trainer.labelled_logits,
            "frozen_base": str(trainer.frozen_dtype).replace("torch.", "") if trainer.frozen_dtype else None,
            "packed": trainer.data_collator.__class__.__name__ == "PackingCollator",
            "shared_opening": trainer.shared_opening,
            "torch_compile": trainer.args.torch_compile}
