"""Hydra's entry to the Optuna sweeps of ``pipeline.sweep`` (``hydra/sweeper=pipeline_optuna``).

Hydra only instantiates sweepers from the ``hydra_plugins`` package, so this thin class lives
here and hands everything to :mod:`pipeline.sweep`. Sweep files select it with
``override /hydra/sweeper: pipeline_optuna``.
"""

from dataclasses import dataclass
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


@dataclass
class PipelineOptunaSweeperConf:
    _target_: str = "hydra_plugins.pipeline_sweeper.pipeline_sweeper.PipelineOptunaSweeper"


ConfigStore.instance().store(group="hydra/sweeper", name="pipeline_optuna",
                             node=PipelineOptunaSweeperConf, provider="pipeline")


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

    def _compose(self, overrides: List[str]) -> DictConfig:
        """A job's config, composed as the launcher will compose it."""
        from omegaconf import open_dict

        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(cfg):
            del cfg["hydra"]
        return cfg

    def sweep(self, arguments: List[str]) -> Any:
        import sys

        from pipeline import sweep_loop
        from pipeline.config import PipelineError

        try:
            return sweep_loop.run(self.config, self.launcher, arguments, compose=self._compose)
        except PipelineError as err:  # the message says what is wrong; a traceback would bury it
            print(f"error: {err}", file=sys.stderr)
            sys.exit(1)
