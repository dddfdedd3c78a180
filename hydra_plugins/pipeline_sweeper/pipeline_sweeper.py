"""Hydra's entry to the Optuna sweeps of :mod:`pipeline.study` (``hydra/sweeper=pipeline_optuna``).

Hydra only instantiates sweepers from the ``hydra_plugins`` package, so this thin class lives
here: it turns Hydra's objects (the composed sweep config, the command line, the launcher and
its job results) into typed configs, override lists and exceptions, and hands the sweep to
:func:`pipeline.study.driver.run`. Sweep files select it with
``override /hydra/sweeper: pipeline_optuna``.
"""

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from pipeline.commands.compose import typed_config
from pipeline.config.errors import ConfigError, PipelineError
from pipeline.runs import atomic
from pipeline.study import driver
from pipeline.study.definition import SweptConfig


@dataclass
class PipelineOptunaSweeperConf:
    _target_: str = "hydra_plugins.pipeline_sweeper.pipeline_sweeper.PipelineOptunaSweeper"


ConfigStore.instance().store(group="hydra/sweeper", name="pipeline_optuna",
                             node=PipelineOptunaSweeperConf, provider="pipeline")


def passed_through(arguments: List[str]) -> List[str]:
    """Command-line overrides every trial gets; grid syntax (``a=1,2``) has no place here."""
    parsed = OverridesParser.create().parse_overrides(list(arguments))
    grids = [o.input_line for o in parsed if o.is_sweep_override()]
    if grids:
        raise ConfigError([f"{g}: a sweep searches sweep.params, not comma lists; add the key to "
                           "sweep.params or give one value" for g in grids])
    return [o.input_line for o in parsed if not o.get_key_element().startswith("sweep.trial")]


class PipelineOptunaSweeper(Sweeper):
    """Asks Optuna for trials, launches them through the configured launcher, tells results.

    The sweep itself (space, objectives, sampler, pruner, storage) is the task config's
    ``sweep`` node, so that the jobs see it too.
    """

    def __init__(self) -> None:
        self.config: Optional[DictConfig] = None
        self.launcher = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    @staticmethod
    def _typed(cfg: DictConfig) -> SweptConfig:
        """A composed train (or merge) config without Hydra's node, as its typed object; ``paths.run_dir``
        (a job's folder, known only once it is launched) set to a placeholder."""
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.pop("hydra", None)
        cfg.paths.run_dir = "."
        return typed_config(cfg)

    def _compose(self, overrides: List[str]) -> SweptConfig:
        """A job's config, composed as the launcher will compose it."""
        return self._typed(self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides)))

    def _launch(self, jobs: List[List[str]], first_index: int) -> List[Optional[BaseException]]:
        """Runs the jobs through Hydra's launcher: per job the exception it failed with, or None."""
        returns = self.launcher.launch(jobs, initial_job_idx=first_index)
        return [job._return_value if job.status == JobStatus.FAILED else None for job in returns]

    def sweep(self, arguments: List[str]) -> Any:
        HydraConfig.instance().set_config(self.config)  # paths interpolate ${hydra:runtime.cwd}
        folder = Path(self.config.hydra.sweep.dir)
        folder.mkdir(parents=True, exist_ok=True)
        # Hydra's own sweepers record the command's composed config there; so does this one.
        atomic.write_text(folder / "multirun.yaml", OmegaConf.to_yaml(self.config))
        try:  # the driver refuses a config without a sweep definition
            return driver.run(self._typed(self.config), folder, self._launch,
                              passed_through(arguments), compose=self._compose)
        except PipelineError as err:  # the message says what is wrong; a traceback would bury it
            print(f"error: {err}", file=sys.stderr)
            sys.exit(1)
