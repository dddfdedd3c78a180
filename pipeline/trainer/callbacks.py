"""The Trainer callbacks of a run: the metric history in the run folder, progress lines where no
bar can show, the first step's time, checkpoints recorded in ``run.json``, and the set a
training run installs (:func:`run_callbacks`). Pruning (:mod:`pipeline.study.trial`), preemption
(:mod:`pipeline.trainer.preemption`) and CUDA memory (:mod:`pipeline.trainer.tracking`) bring
their own.

Each callback class is defined inside its factory: ``TrainerCallback`` comes from transformers,
which the module must not import (composing a config stays fast).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from pipeline.config.schema import PreemptionConfig
from pipeline.runs import progress
from pipeline.runs.checkpoints import history_lines
from pipeline.runs.runfolder import RunFolder
from pipeline.trainer import preemption, tracking

log = logging.getLogger(__name__)


def namespaced(logs: Dict[str, Any]) -> Dict[str, Any]:
    """The names W&B shows: ``eval_loss`` -> ``eval/loss``, ``loss`` -> ``train/loss``."""
    from transformers.integrations.integration_utils import rewrite_logs  # lazy: loads torch

    return rewrite_logs(logs)


def recording_callback(path: Path) -> Any:
    from transformers import TrainerCallback  # lazy: transformers loads torch
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
    from transformers import TrainerCallback  # lazy: transformers loads torch

    class FirstStep(TrainerCallback):
        seen = False

        def on_step_begin(self, args, state, control, **kwargs):
            if not self.seen:
                self.seen = True
                on_first_step()

    return FirstStep()


def epoch_time_callback(steps_per_epoch: int, steps: int, after: int = 5) -> Any:
    """A callback that logs, once ``after`` steps past the first have run (or at the last step
    of a shorter run), how long one full epoch would take on this machine at the measured step
    time (the first step, with its warm-up, is left out)."""
    from transformers import TrainerCallback  # lazy: transformers loads torch

    class EpochTime(TrainerCallback):
        started: Optional[float] = None
        first: int = 0

        def on_step_end(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            if self.started is None:
                self.started, self.first = time.monotonic(), state.global_step
                return
            measured = state.global_step - self.first
            if measured == after or (0 < measured < after and state.global_step == steps):
                per_step = (time.monotonic() - self.started) / measured
                log.info("one epoch (%d steps) would take about %s on this machine (%.2f s per step with its "
                         "evaluations and checkpoints, "
                         "measured over %d steps); this run: %d steps", steps_per_epoch,
                         progress.duration(per_step * steps_per_epoch), per_step, measured, steps)

    return EpochTime()


def progress_callback() -> Any:
    """Training progress as log lines (steps done of all, ETA) where no bar can show: SLURM
    logs, CI, pipes. On a terminal the Trainer's own bar shows instead."""
    from transformers import TrainerCallback  # lazy: transformers loads torch

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


def checkpoint_recorder(on_save: Callable[[str, Optional[str], Optional[float]], None]) -> Any:
    """A ``TrainerCallback`` calling ``on_save(checkpoint, best_checkpoint, best_metric)`` after
    every checkpoint the Trainer saves (to record them in ``run.json``)."""
    from transformers import TrainerCallback  # lazy: transformers loads torch

    class RecordCheckpoints(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                on_save(str(Path(args.output_dir) / f"checkpoint-{state.global_step}"),
                        state.best_model_checkpoint, state.best_metric)

    return RecordCheckpoints()


def run_callbacks(settings: PreemptionConfig, run: RunFolder) -> List[Any]:
    """The callbacks every training run installs: preemption signals, checkpoints and the first
    step recorded in ``run.json``, and the CUDA model-state memory."""
    def record(checkpoint: str, best: Optional[str], best_value: Optional[float]) -> None:
        run.update(last_checkpoint=checkpoint, best_checkpoint=best, best_metric=best_value)

    def first_step() -> None:  # when training began (first_step_at): the start-up cost
        now = time.time()
        run.update(first_step_at=now)
        log.info("first training step begins %.1f s after the run started", now - run.started)

    return [preemption.preemption_callback(settings), checkpoint_recorder(record),
            first_step_callback(first_step), tracking.model_state_callback()]
