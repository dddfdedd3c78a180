"""Preemption: a signal (SIGTERM, SIGUSR1 before a SLURM time limit) stops a run resumably.

During training the run finishes its step, saves a checkpoint and stops; in any other phase it
stops at once. Either way the run folder is marked ``interrupted`` and ``resume=auto``
continues; under SLURM the job can requeue itself.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from pipeline.config.errors import Interrupted
from pipeline.config.schema import PreemptionConfig
from pipeline.runs.checkpoints import last_checkpoint

log = logging.getLogger(__name__)


class Preempted(Interrupted):
    """The run stopped on a preemption signal: during training after saving a checkpoint, in
    any other phase at once (``phase``; ``checkpoint`` is then the newest complete one).
    ``requeue``: the job should go back to SLURM's queue (SIGUSR1 with ``preemption.requeue``)."""

    def __init__(self, signum: int, step: int, checkpoint: Optional[str], exit_code: int,
                 phase: str = "training", requeue: bool = False):
        self.signal_name = signal.Signals(signum).name
        self.step, self.checkpoint, self.phase = step, checkpoint, phase
        self.requeue = requeue and self.signal_name == "SIGUSR1"
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
    exits as usual. :meth:`restore` puts the previous handlers back; used as a context manager
    (``with RunSignals(...).install(...) as phases:``) it restores them on leaving.
    """

    def __init__(self, settings: PreemptionConfig):
        self.signals = list(settings.signals)  # names: checked by validation before install()
        self.exit_code, self.requeue = settings.exit_code, settings.requeue
        self.checkpoints: Optional[Path] = None
        self.on_phase: Optional[Callable[[str], None]] = None
        self.phase, self.pending = "starting", None
        self.previous: Dict[int, Any] = {}

    def install(self, checkpoints: Path, on_phase: Optional[Callable[[str], None]] = None) -> "RunSignals":
        """Takes over the signals for the run whose checkpoints are in ``checkpoints``;
        ``on_phase(phase)`` records each phase."""
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

    def __enter__(self) -> "RunSignals":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()

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
                        preemption_exit_code(signum, self.exit_code), phase=self.phase, requeue=self.requeue)


def preemption_exit_code(signum: int, configured: Optional[int]) -> int:
    """``configured``, or else 128 + the signal number: what a shell reports for a process
    killed by that signal (143 for SIGTERM, 138 for SIGUSR1)."""
    return configured if configured is not None else 128 + int(signum)


def preemption_callback(settings: PreemptionConfig) -> Any:
    """A ``TrainerCallback`` turning ``preemption.signals`` (names, e.g. ``SIGTERM``) during
    training into: finish the step, save a checkpoint, stop, raise :class:`Preempted`.

    The handlers are installed for the training phase only (``on_train_begin`` to
    ``on_train_end``) and only record the signal: the Trainer then saves a checkpoint at the end
    of the current optimizer step and leaves its loop, and ``on_train_end`` raises, so that the
    run is marked ``interrupted`` instead of being evaluated. The exit code is as in
    :func:`preemption_exit_code`.
    """
    from transformers import TrainerCallback  # lazy: transformers loads torch

    exit_code = settings.exit_code

    class Preemption(TrainerCallback):
        def __init__(self):
            self.signums = [signal.Signals[name] for name in settings.signals]
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
                                preemption_exit_code(self.received, exit_code), requeue=settings.requeue)

    return Preemption()


def requeue_slurm_job() -> bool:
    """``scontrol requeue $SLURM_JOB_ID`` when running under SLURM, as Lightning's SLURM
    environment and submitit do on the time-limit signal: the job goes back to the queue and
    its next start runs the same command, which continues with ``resume=auto``.

    Returns:
        Whether the job was requeued (False outside SLURM or when scontrol fails).
    """
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
