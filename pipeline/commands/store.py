"""The configs registered with Hydra: every schema (the stages', the entry points', each adapter
method's settings) in Hydra's ConfigStore, so that the YAML options extending them are checked
while composing; the sweeps of ``sweeps/`` as the ``sweep`` group (``sweeps/merge/``: ``merge_sweep``); our sweeper plugin made
findable. (The resolvers the configs use are :mod:`pipeline.config.options`'.)

Importing this module registers everything (idempotent): every entry point imports it before
Hydra composes. It imports no torch/transformers: composing a config must stay fast.
"""

from __future__ import annotations

from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

try:
    import hydra_plugins  # a namespace package: ours, and those of other installed plugins
except ImportError:
    hydra_plugins = None

from pipeline.adapters.registry import ADAPTERS
from pipeline.commands.keys import guard_overrides
from pipeline.config.app_schema import EvaluateConfig, ExportConfig, MergeConfig, ServeConfig
from pipeline.config.errors import ConfigError
from pipeline.config.options import PACKAGE_DIR, SWEEPS_DIR
from pipeline.config.schema import SCHEMAS, TrainConfig


def register_configs() -> None:
    """Stores every schema in Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="evaluate_schema", node=EvaluateConfig)
    cs.store(name="serve_schema", node=ServeConfig)
    cs.store(name="export_schema", node=ExportConfig)
    cs.store(name="merge_schema", node=MergeConfig)
    for group, schema in SCHEMAS.items():
        cs.store(group=f"schema/{group}", name="base", node=schema)
    for name, settings in ADAPTERS.items():
        cs.store(group="schema/adapter", name=name, node=settings)
    register_sweeps(cs)
    expose_sweeper_plugin()
    guard_overrides()


def expose_sweeper_plugin() -> None:
    """Lets Hydra find our sweeper however the project is installed.

    Hydra discovers plugins by listing the ``hydra_plugins`` namespace package's folders; an
    editable install by setuptools >= 64 serves ours through an import hook that this listing
    cannot see (hydra issues 2359, 3252), so the sweeper would be missing outside the repository
    root. Adding the folder to the namespace path is what a plain install amounts to.
    """
    if hydra_plugins is None:  # no plugin installed at all; ours is then found from the repository root
        return
    folder = str(PACKAGE_DIR.parent / "hydra_plugins")
    if Path(folder).is_dir() and folder not in list(hydra_plugins.__path__):
        hydra_plugins.__path__.append(folder)


def register_sweeps(cs: ConfigStore) -> None:
    """Makes each ``sweeps/<name>.yaml`` the option ``sweep=<name>`` of ``train``, and each
    ``sweeps/merge/<name>.yaml`` the option ``merge_sweep=<name>`` of ``merge`` (package
    ``_global_``).

    The files live beside ``conf/`` rather than in it so that a sweep reads as a project asset
    of its own; storing them here finds them from any working directory. Merge sweeps are a
    group of their own: they set merge keys, which a train config does not have, and serve and
    export drop the ``sweep`` group (:func:`forget_sweeps`), not this one.
    """
    for group, folder in (("sweep", SWEEPS_DIR), ("merge_sweep", SWEEPS_DIR / "merge")):
        for path in sorted(folder.glob("*.yaml")):
            try:
                node = OmegaConf.load(path)
            except Exception as err:  # a YAML error would otherwise surface without the file name
                raise ConfigError([f"{path}: {err}"]) from err
            cs.store(group=group, name=path.stem, node=node, package="_global_", provider="sweeps")


def forget_sweeps() -> None:
    """Drops the ``sweep`` config group, for entry points (serve, export) whose own ``sweep``
    key names a finished sweep: Hydra reads ``sweep=<name>`` as a group choice while the group
    exists, and these configs have no such group."""
    ConfigStore.instance().repo.pop("sweep", None)


register_configs()
