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
import os
import signal
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from pipeline import precision, progress
from pipeline.config import ConfigError, Interrupted, PipelineError, TrainerConfig

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
            self.rows = len(_history_lines(path))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and state.is_world_process_zero:
                row = {"step": state.global_step, **namespaced(logs)}
                with path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
                self.rows += 1

        def state(self) -> dict:
            return {"args": {}, "attributes": {"rows": self.rows}}

    return RecordMetrics()


def _history_lines(path: Path) -> List[str]:
    """Complete rows of ``history.jsonl`` (a kill can leave a partial last line: dropped)."""
    if not path.exists():
        return []
    return [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
            if line.endswith("\n")]


def rewind_history(path: Path, checkpoint: Optional[str]) -> int:
    """Cuts ``history.jsonl`` back to what it held when ``checkpoint`` was saved.

    Without this, the steps between that checkpoint and a kill would appear twice once the
    resumed run logs them again. Without a checkpoint (a fresh start), only the base model's
    rows (step 0) are kept. Written to a temporary file and renamed.

    Returns:
        The number of rows kept.
    """
    lines = _history_lines(path)
    if not lines:
        return 0
    rows = None
    if checkpoint is not None:
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
        rows = state.get("stateful_callbacks", {}).get("RecordMetrics", {}).get("attributes", {}).get("rows")
        step = state["global_step"]
    else:
        step = 0
    if rows is None:  # a checkpoint saved without the row count: cut by step
        lines = [line for line in lines if json.loads(line)["step"] <= step]
    else:
        lines = lines[:rows]
    from pipeline.atomic import write_text

    write_text(path, "".join(lines))
    return len(lines)


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
        callbacks=[_recording_callback(history_path), progress_callback(), *(callbacks or [])])


class CheckpointError(PipelineError, ValueError):
    """A checkpoint that cannot be resumed from; the message names the file."""


def checkpoint_problem(folder: Path) -> Optional[str]:
    """Why ``folder`` is not a complete Trainer checkpoint (naming the file), or None.

    The Trainer writes a checkpoint in place, not to a temporary folder: weights, then
    optimizer, scheduler and RNG state, and ``trainer_state.json`` last. A kill during the save
    leaves a folder without (or with a truncated) ``trainer_state.json``, or a truncated file
    before it. Checked cheaply: JSON parsed, safetensors headers and sizes, the zip directory
    (at the end of the file) of each ``torch.save`` file.
    """
    import zipfile

    from safetensors import safe_open

    folder = Path(folder)
    state = folder / "trainer_state.json"
    if not state.is_file():
        return f"{state} is missing (the save did not finish)"
    try:
        json.loads(state.read_text(encoding="utf-8"))["global_step"]
    except (ValueError, KeyError, UnicodeDecodeError) as err:
        return f"{state} is unreadable ({type(err).__name__}: {err})"
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        return f"{folder} holds no *.safetensors weights"
    for path in weights:
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except Exception as err:  # safetensors raises its own error types
            return f"{path} is unreadable ({err})"
    for path in sorted(folder.glob("*.pt")) + sorted(folder.glob("*.pth")):
        try:
            zipfile.ZipFile(path).close()
        except (zipfile.BadZipFile, OSError) as err:
            return f"{path} is unreadable ({err})"
    return None


def _checkpoints_newest_first(output_dir: Path) -> List[Path]:
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    found = [p for p in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
             if p.is_dir() and p.name.rsplit("-", 1)[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.rsplit("-", 1)[1]), reverse=True)


def last_checkpoint(output_dir: Path) -> Optional[str]:
    """The newest complete checkpoint folder, or None.

    An incomplete or corrupt newer one (a kill during its save) is skipped with a warning, so
    the run continues from the previous complete one.
    """
    if not output_dir.is_dir():
        return None
    for folder in _checkpoints_newest_first(output_dir):
        problem = checkpoint_problem(folder)
        if problem is None:
            return str(folder)
        log.warning("Skipping checkpoint %s: %s", folder.name, problem)
    return None


def resume_checkpoint(path: Path) -> str:
    """The checkpoint that ``resume=<path>`` names: the folder itself, or a run folder's newest
    complete one.

    Raises:
        CheckpointError: naming the file that makes the checkpoint unusable, or saying that a
            run folder holds no complete checkpoint.
    """
    path = Path(path)
    if path.name.startswith("checkpoint-"):
        problem = checkpoint_problem(path)
        if problem:
            raise CheckpointError(f"resume={path}: cannot resume from this checkpoint: {problem}; "
                                  "name an earlier checkpoint or use resume=auto")
        return str(path)
    found = last_checkpoint(path / "checkpoints")
    if found is None:
        raise CheckpointError(f"resume={path}: no complete checkpoint in {path / 'checkpoints'}")
    return found


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


class Preempted(Interrupted):
    """The run stopped on a preemption signal: during training after saving a checkpoint, in
    any other phase at once (``phase``; ``checkpoint`` is then the newest complete one)."""

    def __init__(self, signum: int, step: int, checkpoint: Optional[str], exit_code: int,
                 phase: str = "training"):
        self.signal_name = signal.Signals(signum).name
        self.step, self.checkpoint, self.phase = step, checkpoint, phase
        if phase == "training":
            what = f"saved {checkpoint} at step {step} and stopped"
        else:
            what = (f"stopped during {phase}; the newest checkpoint is {checkpoint} (step {step})"
                    if checkpoint else f"stopped during {phase}, before any checkpoint")
        super().__init__(f"{self.signal_name} received: {what}; run the same command with "
                         "resume=auto to continue", exit_code)


class RunSignals:
    """``preemption.signals`` in every phase of a run, not only during training.

    ``enter(phase)`` records the phase (``on_phase``: ``phase`` in run.json). During training the
    preemption callback holds the handlers (finish the step, checkpoint, stop). In any other
    phase (loading, base evaluation, final evaluation) a signal stops the run at once:
    :class:`Preempted` is raised in the main thread with the phase and the newest complete
    checkpoint, so the run is marked ``interrupted`` and ``resume=auto`` continues from what
    was saved. While saving the results a signal waits: the run completes, then the process
    exits as usual. :meth:`restore` puts the previous handlers back.
    """

    def __init__(self, signals: List[str], exit_code: Optional[int]):
        self.signals = list(signals)  # names: checked by validation before install()
        self.exit_code = exit_code
        self.checkpoints: Optional[Path] = None
        self.on_phase: Optional[Callable[[str], None]] = None
        self.phase, self.pending = "starting", None
        self.previous: Dict[int, Any] = {}

    def install(self, checkpoints: Path, on_phase: Optional[Callable[[str], None]] = None) -> "RunSignals":
        """Takes over the signals for the run whose checkpoints are in ``checkpoints``;
        ``on_phase(phase)`` records each phase."""
        import threading

        self.checkpoints, self.on_phase = Path(checkpoints), on_phase
        if threading.current_thread() is threading.main_thread() and not self.previous:  # Python's rule
            self.previous = {signal.Signals[name]: signal.signal(signal.Signals[name], self._handle)
                             for name in self.signals}
        return self

    def restore(self) -> None:
        """Puts the previous handlers back (the run is over)."""
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}
        if self.pending is not None:
            log.warning("%s received while saving: the results were written first",
                        signal.Signals(self.pending).name)
            self.pending = None

    def enter(self, phase: str) -> None:
        self.phase = phase
        if self.on_phase is not None:
            self.on_phase(phase)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.phase == "saving":
            if self.pending is None:
                log.warning("%s received while saving: stopping once the results are written",
                            signal.Signals(signum).name)
            self.pending = signum
            return
        checkpoint = last_checkpoint(self.checkpoints)
        step = json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"] if checkpoint else 0
        log.warning("%s received during %s: stopping now", signal.Signals(signum).name, self.phase)
        raise Preempted(signum, step, str(checkpoint) if checkpoint else None,
                        preemption_exit_code(signum, self.exit_code), phase=self.phase)


def preemption_exit_code(signum: int, configured: Optional[int]) -> int:
    """``configured``, or else 128 + the signal number: what a shell reports for a process
    killed by that signal (143 for SIGTERM, 138 for SIGUSR1)."""
    return configured if configured is not None else 128 + int(signum)


def preemption_callback(signals: List[str], exit_code: Optional[int] = None) -> Any:
    """A ``TrainerCallback`` turning ``signals`` (names, e.g. ``SIGTERM``) during training into:
    finish the step, save a checkpoint, stop, raise :class:`Preempted`.

    The handlers are installed for the training phase only (``on_train_begin`` to
    ``on_train_end``) and only record the signal: the Trainer then saves a checkpoint at the end
    of the current optimizer step and leaves its loop, and ``on_train_end`` raises, so that the
    run is marked ``interrupted`` instead of being evaluated. ``exit_code`` as in
    :func:`preemption_exit_code`.
    """
    import threading

    from transformers import TrainerCallback

    class Preemption(TrainerCallback):
        def __init__(self):
            self.signums = [signal.Signals[name] for name in signals]
            self.received: Optional[int] = None
            self.previous: Dict[int, Any] = {}

        def handle(self, signum, frame):
            if self.received is None:
                log.warning("%s received: stopping after this step with a checkpoint",
                            signal.Signals(signum).name)
            self.received = signum

        def on_train_begin(self, args, state, control, **kwargs):
            if threading.current_thread() is threading.main_thread():  # Python's rule for handlers
                self.previous = {s: signal.signal(s, self.handle) for s in self.signums}

        def on_step_end(self, args, state, control, **kwargs):
            if self.received is not None:
                control.should_save = True
                control.should_training_stop = True

        def on_train_end(self, args, state, control, **kwargs):
            for signum, handler in self.previous.items():
                signal.signal(signum, handler)
            self.previous = {}
            if self.received is not None:
                checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                raise Preempted(self.received, state.global_step,
                                str(checkpoint) if checkpoint.is_dir() else None,
                                preemption_exit_code(self.received, exit_code))

    return Preemption()


def requeue_slurm_job() -> bool:
    """``scontrol requeue $SLURM_JOB_ID`` when running under SLURM, as Lightning's SLURM
    environment and submitit do on the time-limit signal: the job goes back to the queue and
    its next start runs the same command, which continues with ``resume=auto``.

    Returns:
        Whether the job was requeued (False outside SLURM or when scontrol fails).
    """
    import subprocess

    job = os.environ.get("SLURM_ARRAY_JOB_ID") and \
        f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}".rstrip("_")
    job = job or os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.error("could not requeue SLURM job %s: %s", job, err)
        return False
    if done.returncode != 0:
        log.error("scontrol requeue %s failed: %s", job, done.stderr.strip())
        return False
    log.info("requeued SLURM job %s", job)
    return True


def checkpoint_recorder(on_save: Callable[[str, Optional[str], Optional[float]], None]) -> Any:
    """A ``TrainerCallback`` calling ``on_save(checkpoint, best_checkpoint, best_metric)`` after
    every checkpoint the Trainer saves (to record them in ``run.json``)."""
    from transformers import TrainerCallback

    class RecordCheckpoints(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                on_save(str(Path(args.output_dir) / f"checkpoint-{state.global_step}"),
                        state.best_model_checkpoint, state.best_metric)

    return RecordCheckpoints()


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


def fit(cfg: TrainerConfig, model: Any, tokenizer: Any, splits: Any, run_dir: Path, *, seed: int,
        trains: bool, packing: bool, report_to: List[str], run_name: str,
        resume_from: Optional[str], evaluator: Any, base: Optional[Any] = None,
        on_base: Optional[Callable[[Any], None]] = None,
        callbacks: Optional[List[Any]] = None,
        best: Optional[Tuple[str, bool]] = None,
        distributed: Optional[Dict[str, Any]] = None,
        pack_length: int = 512, phases: Optional[RunSignals] = None) -> Tuple[Dict[str, Any], Any, Any]:
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
            attempt of this run or from the base measurement cache, or None to measure it now
            (before training, the fresh adapter is an identity: the model is the base model).
        on_base: called with the base measurement once taken (to persist it).
        callbacks: extra ``TrainerCallback`` objects (pruning, preemption signals).
        best: ``(metric_for_best_model, greater_is_better)`` from :func:`best_metric`, or None.
        distributed: multi-process ``TrainingArguments`` (DeepSpeed config, DDP backend).
        pack_length: with ``packing``, the token budget of one packed row.
        phases: the run's :class:`RunSignals`, told each phase (base evaluation, training,
            final evaluation, saving).

    Returns:
        ``(metrics, base, tuned)``: namespaced metrics (``base/*``, ``tuned/*``, ``delta/*``,
        ``train/*``, ``perf/*``) and the two measurements.
    """
    from peft import PeftModel

    from pipeline.data import collator
    from pipeline.tracking import folder_size_mb

    args = training_arguments(cfg, run_dir / "checkpoints", seed, has_eval=splits.validation is not None,
                              report_to=report_to, run_name=run_name, best=best,
                              distributed=distributed)
    rewind_history(run_dir / "history.jsonl", resume_from)
    trainer = build_trainer(model, tokenizer, args, splits.train, evaluation_slice(splits.validation, cfg),
                            collator(tokenizer, packing, pack_length), cfg.nan_policy, run_dir / "history.jsonl",
                            callbacks=callbacks, extra_eval=evaluator.during_training)
    enter = phases.enter if phases is not None else (lambda phase: None)
    if base is None:
        from pipeline.distributed import gathered

        enter("base evaluation")
        with gathered(model):  # no DeepSpeed engine yet: a zero.Init model cannot run alone
            base = evaluator.measure(trainer, "base")
        if on_base:
            on_base(base)
    elif resume_from is None:  # a cached measurement: the curves still start from the base
        evaluator.log_losses(trainer, base.metrics)
    metrics: Dict[str, Any] = {}
    tuned = base
    if trains:
        # Read now: rotation may delete the checkpoint during training.
        start = json.loads((Path(resume_from) / "trainer_state.json").read_text()) if resume_from else {}
        enter("training")
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
        metrics.update({"train/loss": loss, "train/steps": trainer.state.global_step,
                        "train/tokens": tokens, "perf/train_runtime_s": runtime,
                        "perf/train_tokens_per_s": attempt_tokens / runtime if runtime else 0.0,
                        "train/skipped_steps": trainer.skipped_steps})
        enter("final evaluation")
        tuned = evaluator.measure(trainer, "tuned")
        enter("saving")
        artifact = save_artifact(trainer, run_dir, isinstance(model, PeftModel))
        metrics["perf/artifact_mb"] = folder_size_mb(artifact)
    metrics.update(compare(base.metrics, tuned.metrics))
    return metrics, base, tuned
