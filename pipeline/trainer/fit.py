"""Fitting: the base measurement, training, the tuned measurement, the saved artifact.

Measuring is :mod:`pipeline.scoring` (a model, a tokenizer and the evaluation sets: no
Trainer); here the measurements are taken at the right moments of the Trainer's life and their
losses logged through it, so the loss curves in the run folder and W&B start from the base.
"""

from __future__ import annotations

import json
import logging
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from pipeline.adapters import lora
from pipeline.config.schema import TrainerConfig
from pipeline.runs.atomic import commit_folder
from pipeline.runs.runfolder import folder_size_mb
from pipeline.scoring.measurement import Evaluator, Measurement, before_after, loss_logs
from pipeline.trainer.distributed import gathered
from pipeline.trainer.preemption import RunSignals

log = logging.getLogger(__name__)


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


def save_artifact(trainer: Any, run_dir: Path, is_peft: bool) -> Path:
    """Saves the adapter (PEFT) or the whole model, with the tokenizer, atomically.

    The folder is self-contained: ``PeftModel.from_pretrained(base, folder)`` (or
    ``AutoModelForCausalLM.from_pretrained(folder)`` for full fine-tuning) loads it alone.
    """
    target = run_dir / ("adapter" if is_peft else "model")
    tmp = run_dir / f".{target.name}.tmp"
    main = trainer.is_world_process_zero()
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    # Every rank calls save_model: under ZeRO-3 it gathers the sharded weights (a collective);
    # only rank 0 writes, and only rank 0 moves the folder into place.
    trainer.save_model(str(tmp))
    if main:
        # The Trainer also pickles its arguments; the run folder keeps config.yaml instead, and
        # a folder that serving loads should hold no pickles.
        (tmp / "training_args.bin").unlink(missing_ok=True)
        initial = run_dir / lora.INITIAL_ADAPTER
        if is_peft and initial.exists():  # PiSSA/OLoRA: an adapter for the original base, not the residual
            lora.save_converted(trainer.accelerator.unwrap_model(trainer.model), tmp, initial)
        commit_folder(tmp, target)
        shutil.rmtree(initial, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    return target


def _measure(trainer: Any, evaluator: Evaluator, label: str) -> Measurement:
    """``evaluator``'s measurement of the Trainer's model, its eval/test losses logged through the
    Trainer (W&B, history; step 0 for the base model)."""
    measured = evaluator.measure(trainer.model, label)
    trainer.log(loss_logs(measured.metrics))
    return measured


def _base_measurement(trainer: Any, model: Any, evaluator: Evaluator, base: Optional[Measurement],
                      on_base: Optional[Callable[[Measurement], None]], resume_from: Optional[str],
                      enter: Callable[[str], None], without_adapter: bool) -> Measurement:
    """The base model's measurement: ``base`` when given (resumed or cached; a cached one is
    still logged, so the curves start from the base), else measured now and handed to
    ``on_base``. Before training the fresh adapter is mostly an identity: the model is the base;
    where it is not (``without_adapter``: LoftQ), the adapter is disabled while measuring."""
    if base is not None:
        if resume_from is None:
            trainer.log(loss_logs(base.metrics))
        return base
    enter("base evaluation")
    # no DeepSpeed engine yet: a zero.Init model cannot run alone
    with gathered(model), (model.disable_adapter() if without_adapter else nullcontext()):
        base = _measure(trainer, evaluator, "base")
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
        from transformers import TrainerState  # lazy: transformers loads torch

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


def fit(trainer: Any, cfg: TrainerConfig, run_dir: Path, *, trains: bool, resume_from: Optional[str],
        evaluator: Evaluator, base: Optional[Measurement] = None,
        on_base: Optional[Callable[[Measurement], None]] = None,
        phases: Optional[RunSignals] = None,
        base_without_adapter: bool = False) -> Tuple[Dict[str, Any], Measurement, Measurement]:
    """Measures the base model, trains, measures the tuned model and saves it.

    Args:
        trainer: from :func:`pipeline.trainer.build.prepare`.
        cfg: trainer settings.
        run_dir: the run folder (the artifact goes in ``adapter/`` or ``model/``).
        trains: False for ``adapter=none`` (evaluation only).
        resume_from: the checkpoint ``trainer`` continues from, or None.
        evaluator: the evaluation sets (losses and generation metrics).
        base: the base model's measurement from an earlier
            attempt of this run or from the base measurement cache, or None to measure it now
            (before training, the fresh adapter is an identity: the model is the base model).
        on_base: called with the base measurement once taken (to persist it).
        phases: the run's :class:`RunSignals`, told each phase (base evaluation, training,
            final evaluation, saving).
        base_without_adapter: measure the base with the adapter disabled, for an adapter that
            is no identity when fresh (:meth:`AdapterSettings.fresh_is_base`).

    Returns:
        ``(metrics, base, tuned)``: namespaced metrics (``base/*``, ``tuned/*``, ``delta/*``,
        ``train/*``, ``perf/*``) and the two measurements.
    """
    from peft import PeftModel  # lazy: peft loads torch and transformers

    enter = phases.enter if phases is not None else (lambda phase: None)
    base = _base_measurement(trainer, trainer.model, evaluator, base, on_base, resume_from, enter,
                             base_without_adapter)
    metrics: Dict[str, Any] = {}
    tuned = base
    if trains:
        if trainer.is_world_process_zero() and lora.moves_base(trainer.model):
            lora.save_initial(trainer.model, run_dir / lora.INITIAL_ADAPTER)  # before any step
        enter("training")
        metrics.update(_train(trainer, cfg, resume_from))
        enter("final evaluation")
        tuned = _measure(trainer, evaluator, "tuned")
        enter("saving")
        artifact = save_artifact(trainer, run_dir, isinstance(trainer.model, PeftModel))
        metrics["perf/artifact_mb"] = folder_size_mb(artifact)
    metrics.update(before_after(base.metrics, tuned.metrics))
    return metrics, base, tuned
