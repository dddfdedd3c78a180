"""How a command ends: the one place that turns the way a task ended into a run folder status,
a W&B exit code, an exit status and a line on the terminal.

- :func:`main` runs a Hydra entry point's task: a :class:`PipelineError` ends a single run with
  its message on stderr and exit code 1 (the message says what is wrong and how to fix it; a
  traceback would bury it); in a multirun it propagates, for the sweeper to record and go on. An
  :class:`Interrupted` run exits with its own code (143 for SIGTERM, ...).
- :func:`recording` marks a run folder ``failed``, ``interrupted`` or ``pruned`` when the work
  inside it raises (closing W&B with the same outcome and requeueing a preempted SLURM job), and
  says where the results are when it succeeds.
- :func:`tool` runs a command that prints and exits (``pipeline.estimate``, ``pipeline.data``).
- :func:`end_process` ends a finished command without the interpreter's teardown.
- :class:`RunFolderCheck` refuses an unwritable run folder before Hydra creates it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, TypeVar

from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from pipeline.config.errors import Interrupted, PipelineError
from pipeline.runs import quiet
from pipeline.runs.runfolder import ReplicaRunFolder, RunFolder, unwritable_reason
from pipeline.study.trial import is_pruned
from pipeline.trainer import preemption, tracking

T = TypeVar("T")


def task_overrides() -> List[str]:
    """The command line's overrides of this job (as Hydra parsed them)."""
    return list(HydraConfig.get().overrides.task)


def multirun_folder() -> Optional[Path]:
    """The folder of the multirun this job belongs to, or None for a single run."""
    hydra_cfg = HydraConfig.get()
    return Path(hydra_cfg.sweep.dir) if hydra_cfg.mode == RunMode.MULTIRUN else None


def main(task: Callable[[DictConfig], T], cfg: DictConfig) -> T:
    """Runs an entry point's ``task`` and turns its errors into an exit status (see the module
    docstring). The libraries' notices stay quiet unless ``hydra.verbose`` is set."""
    wandb_mode = OmegaConf.select(cfg, "logger.wandb.mode")  # None: logger=none, or no logger group
    quiet.install(verbose=bool(HydraConfig.get().verbose), logs_to_wandb=wandb_mode not in (None, "disabled"))
    try:
        return task(cfg)
    except Interrupted as err:  # in a multirun too: the whole process is being stopped
        print(f"interrupted: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except PipelineError as err:
        if HydraConfig.get().mode != RunMode.RUN:
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


class Recording:
    """The run folder a command records its outcome in (a resume may switch it: set ``run``)."""

    def __init__(self, run: RunFolder):
        self.run = run


@contextlib.contextmanager
def recording(run: RunFolder, config: Optional[Dict[str, Any]] = None, overrides: Optional[List[str]] = None,
              *, when_failing: bool = False, results: str = "results") -> Iterator[Recording]:
    """Records how the work in the block ends in the run folder (and W&B).

    Args:
        run: the run folder.
        config: the composed config as plain values: the folder is started with it (config.yaml,
            run.json ``running``) before the block runs, so that a run failing its checks is
            recorded too.
        overrides: the command line's overrides (run.json).
        when_failing: start the folder only if the block fails before anyone else started it
            (a launcher whose workers start it), and mark it only while it is still running.
        results: what the success line calls the run folder.

    On success the run folder's path is printed (``results: <path>``); the block itself marks
    the run ``success`` with what it measured.
    """
    recorded = Recording(run)
    if config is not None and not when_failing:
        run.start(config, overrides or [])
    try:
        yield recorded
    except BaseException as err:
        folder = recorded.run
        if when_failing:
            if not folder.info_path.exists() and config is not None:  # failed before rank 0 started
                folder.start(config, overrides or [])
            if folder.info_path.exists() and folder.info()["status"] != "running":
                raise
        _record_failure(folder, err)
        raise
    if not isinstance(recorded.run, ReplicaRunFolder):
        announce(recorded.run.path, results)


def _record_failure(run: RunFolder, err: BaseException) -> None:
    """Marks the run folder (and W&B) with the way ``err`` ended it."""
    if isinstance(err, KeyboardInterrupt):
        run.finish("interrupted", err)
        tracking.abort_wandb(exit_code=130)
    elif isinstance(err, preemption.Preempted):
        run.finish("interrupted", err, signal=err.signal_name, checkpoint=err.checkpoint,
                   exit_code=err.exit_code, phase=err.phase)
        tracking.abort_wandb(exit_code=err.exit_code, preempted=True)
        if err.requeue:
            preemption.requeue_slurm_job()
    elif isinstance(err, Interrupted):
        run.finish("interrupted", err)
        tracking.abort_wandb(exit_code=err.exit_code)
    elif is_pruned(err):  # the pruner stopped this trial: not a failure
        run.finish("pruned", err)
        tracking.abort_wandb(exit_code=0)
    else:
        run.finish("failed", err)
        tracking.abort_wandb(exit_code=1)


def announce(path: Path, what: str = "results") -> None:
    """The line that says where a finished command put its results."""
    print(f"{what}: {Path(path).resolve()}", flush=True)


def tool(work: Callable[[], None]) -> int:
    """Runs a command that prints and exits; its errors (a bad override, a config problem) are
    printed without a traceback. Returns the exit status."""
    try:
        work()
    except (PipelineError, ConfigCompositionException) as err:
        print(f"error: {cli_message(err)}", file=sys.stderr)
        return 1
    return 0


def cli_message(err: BaseException) -> str:
    """What a command-line tool prints for ``err``: its text, and for a Hydra composition error
    (a bad override) also the cause it wraps, which names the key and what it takes."""
    if isinstance(err, ConfigCompositionException) and err.__cause__ is not None:
        return f"{err}\n{err.__cause__}"
    return str(err)


def end_process() -> None:
    """Ends an entry point's process once its work is done and written, without the
    interpreter's teardown.

    Tearing down the ~4,000 modules torch, transformers and peft import, and the loaded model,
    took 1.7 s after a tiny model's run and 3.4 s after SmolLM2-135M's on 2 CPU cores, every
    run, with nothing left to do. What an orderly exit does that matters still happens, in its
    order: non-daemon threads are waited for, then the exit handlers run (logging's flush and
    close, W&B, multiprocessing's children, temporary folders); only then does the process end.
    Called from ``python -m`` entry points after ``main`` returned; a failure exits as before.
    """
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # private, but the one call that runs the handlers an exit runs
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class RunFolderCheck(Callback):
    """A Hydra callback (``hydra.callbacks`` in ``conf/hydra/default.yaml``) that stops with a
    one-line error when the run folder cannot be written: Hydra itself creates it before the
    task runs, and its failure would be a traceback. At the end of a multirun it says where the
    multirun's folder is."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        self._check("hydra.run.dir", self._folder(config, "run"))

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        self._check("hydra.sweep.dir", self._folder(config, "sweep"))

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        announce(Path(self._folder(config, "sweep")), "multirun results")

    @staticmethod
    def _folder(config: Any, mode: str) -> str:
        # Hydra calls this before it sets its own config for ${hydra:...} (paths.root_dir is
        # ${hydra:runtime.cwd}); set it now, as the job's start does again right after.
        HydraConfig.instance().set_config(config)
        return config.hydra[mode].dir

    @staticmethod
    def _check(key: str, folder: str) -> None:
        reason = unwritable_reason(Path(folder))
        if reason:
            print(f"error: {key}={folder!r}: cannot create the run folder ({reason}); choose a "
                  f"writable folder with {key}=... or paths.output_dir=...", file=sys.stderr)
            sys.exit(1)
