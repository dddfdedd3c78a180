"""The configuration: where it lives, its registration in Hydra, and how entry points read it.

- :mod:`pipeline.schema`: the typed schemas of the stages and of training, and
  :mod:`pipeline.app_schema` those of evaluate, serve and export (re-exported here);
- :mod:`pipeline.checks`: the rules across fields, :func:`validate` (re-exported here);
- :mod:`pipeline.errors`: the errors a user reads (re-exported here);
- here: registration of the schemas, the adapter methods and the sweeps in Hydra's ConfigStore,
  the resolvers, reading one option or one node as its schema object, and the conversion every
  entry point makes once, after validation, from the composed ``DictConfig`` to its schema
  object (:func:`typed_config`); records go back to plain values through :func:`plain`.

This module imports no torch/transformers at import time: composing a config must stay fast.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from pipeline.adapters import ADAPTERS, AdapterSettings
from pipeline.app_schema import EvaluateConfig, ExportConfig, ExportSettings, ServeConfig, ServerConfig
from pipeline.checks import metric_names, validate
from pipeline.errors import ConfigError, Interrupted, PipelineError, missing_values, run_task
from pipeline.schema import (ASSETS_DIR, CONF_DIR, SWEEPS_DIR, SCHEMAS, MixSource, DataConfig,
                             TinyModelConfig, ModelConfig, TrainerConfig, DecodingConfig,
                             EvaluationConfig, WandbConfig, LoggerConfig, PathsConfig,
                             DistributedConfig, PreemptionConfig, ObjectiveConfig, SweepParam,
                             SweepConfig, TrainConfig, ArchitectureInfo, QuantizationSettings)

# Re-exported: entry points and tests read every config name as config.<name>.
__all__ = [
    "ADAPTERS", "AdapterSettings", "metric_names", "validate", "ConfigError", "Interrupted",
    "PipelineError", "run_task", "ASSETS_DIR", "CONF_DIR", "SWEEPS_DIR", "SCHEMAS", "MixSource",
    "DataConfig", "TinyModelConfig", "ModelConfig", "TrainerConfig", "DecodingConfig",
    "EvaluationConfig", "WandbConfig", "LoggerConfig", "PathsConfig", "DistributedConfig",
    "PreemptionConfig", "ObjectiveConfig", "SweepParam", "SweepConfig", "TrainConfig",
    "EvaluateConfig", "ServerConfig", "ServeConfig", "ExportSettings", "ExportConfig",
    "ArchitectureInfo", "QuantizationSettings", "adapter_settings", "register_configs", "expose_sweeper_plugin",
    "register_sweeps", "forget_sweeps", "unique_dir", "register_resolvers", "load_option",
    "typed", "typed_config", "plain", "compose_train",
]


def adapter_settings(method: str, key: str = "adapter_method") -> AdapterSettings:
    """A registered method's default settings, for an adapter folder given by path.

    Raises:
        ConfigError: for a method that is not registered.
    """
    if method not in ADAPTERS:
        raise ConfigError([f"{key}={method!r} is unknown; choose one of: {', '.join(sorted(ADAPTERS))}"])
    return ADAPTERS[method]()


def register_configs() -> None:
    """Stores every schema in Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="evaluate_schema", node=EvaluateConfig)
    cs.store(name="serve_schema", node=ServeConfig)
    cs.store(name="export_schema", node=ExportConfig)
    for group, schema in SCHEMAS.items():
        cs.store(group=f"schema/{group}", name="base", node=schema)
    for name, settings in ADAPTERS.items():
        cs.store(group="schema/adapter", name=name, node=settings)
    register_sweeps(cs)
    expose_sweeper_plugin()


def expose_sweeper_plugin() -> None:
    """Lets Hydra find our sweeper however the project is installed.

    Hydra discovers plugins by listing the ``hydra_plugins`` namespace package's folders; an
    editable install by setuptools >= 64 serves ours through an import hook that this listing
    cannot see (hydra issues 2359, 3252), so the sweeper would be missing outside the repository
    root. Adding the folder to the namespace path is what a plain install amounts to.
    """
    try:
        import hydra_plugins
    except ImportError:  # no plugin installed at all; ours is then found from the repository root
        return
    folder = str(Path(__file__).resolve().parent.parent / "hydra_plugins")
    if Path(folder).is_dir() and folder not in list(hydra_plugins.__path__):
        hydra_plugins.__path__.append(folder)


def register_sweeps(cs: ConfigStore) -> None:
    """Makes each ``sweeps/<name>.yaml`` the option ``sweep=<name>`` (package ``_global_``).

    The files live beside ``conf/`` rather than in it so that a sweep reads as a project asset
    of its own; storing them here finds them from any working directory.
    """
    for path in sorted(SWEEPS_DIR.glob("*.yaml")):
        try:
            node = OmegaConf.load(path)
        except Exception as err:  # a YAML error would otherwise surface without the file name
            raise ConfigError([f"{path}: {err}"]) from err
        cs.store(group="sweep", name=path.stem, node=node, package="_global_", provider="sweeps")


def forget_sweeps() -> None:
    """Drops the ``sweep`` config group, for entry points (serve, export) whose own ``sweep``
    key names a finished sweep: Hydra reads ``sweep=<name>`` as a group choice while the group
    exists, and these configs have no such group."""
    ConfigStore.instance().repo.pop("sweep", None)


def _resolve_asset(relative: str) -> str:
    return str(ASSETS_DIR / relative)


_CLAIMED: Dict[str, str] = {}


def unique_dir(base: str) -> str:
    """``${unique_dir:<folder>}``: ``<folder>``, or ``<folder>_2``, ``_3``... when another run
    already has it, claimed by creating it (``mkdir`` is atomic: of runs started in the same
    second, e.g. a SLURM job array, each gets its own folder). The same base resolves to the
    same folder within a process. An uncreatable folder is returned as is, for the run folder
    check to report."""
    if base in _CLAIMED:
        return _CLAIMED[base]
    parent = Path(base).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        return base
    for n in range(1, 10_000):
        candidate = base if n == 1 else f"{base}_{n}"
        try:
            os.mkdir(candidate)
        except FileExistsError:
            continue
        except OSError:
            return base
        _CLAIMED[base] = candidate
        return candidate
    return base


def register_resolvers() -> None:
    """``${asset:data/x.jsonl}`` points into the installed package's assets folder;
    ``${unique_dir:...}`` claims a run folder of its own."""
    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", _resolve_asset)
    if not OmegaConf.has_resolver("unique_dir"):
        OmegaConf.register_new_resolver("unique_dir", unique_dir)


register_resolvers()
register_configs()


def load_option(group: str, name: str, **overrides: Any) -> Any:
    """A group option as its typed schema object (e.g. the ``model`` a tiny model borrows a
    tokenizer from), read from ``conf/<group>/<name>.yaml`` without composing a whole config.
    ``overrides`` replace fields, e.g. those interpolating the root config (``seed``)."""
    path = CONF_DIR / group / f"{name}.yaml"
    if not path.exists():
        options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        raise ConfigError([f"{group} option {name!r} does not exist; available: {', '.join(options)}"])
    node = OmegaConf.load(path)
    node.pop("defaults", None)
    return typed(SCHEMAS[group], node, overrides)


def compose_train(overrides: List[str]) -> TrainConfig:
    """The validated ``train`` config for ``overrides`` as a ``TrainConfig`` object, composed as
    ``pipeline.train`` composes it, for tools that print and exit (``pipeline.estimate``,
    ``pipeline.data``, benchmarks): no run folder, no log file.

    Raises:
        ConfigError: every problem validation finds; Hydra's ``ConfigCompositionException`` for
            an override that does not compose.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["paths.run_dir=.", *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # ${hydra:runtime...} interpolations resolve
    with open_dict(cfg):
        del cfg["hydra"]
    validate(cfg)
    return typed_config(cfg)


def typed(schema: type, *nodes: Any) -> Any:
    """``nodes`` merged onto ``schema`` and checked by it, as a schema object."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), *nodes))


def typed_config(cfg: Any) -> Any:
    """An entry point's composed (and validated) config as its schema object, every
    interpolation resolved: ``TrainConfig``, ``EvaluateConfig``, ``ServeConfig`` or
    ``ExportConfig``, the adapter as its method's settings. Entry points convert once and pass
    these objects on; the stages never see a ``DictConfig``.

    Raises:
        ConfigError: a value still missing (``???``), named by its key.
    """
    from omegaconf.errors import MissingMandatoryValue

    if not OmegaConf.is_config(cfg):
        return cfg
    try:
        return OmegaConf.to_object(cfg)
    except MissingMandatoryValue as err:
        key = getattr(err, "full_key", None) or str(err)
        raise missing_values([key]) from None


def plain(node: Any) -> Any:
    """A config node or schema object as plain dicts, lists and values (choices as their
    strings, interpolations resolved): for config.yaml, W&B, trial attributes and fingerprints."""
    import dataclasses

    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        node = OmegaConf.structured(node)
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True, enum_to_str=True)
    return node
