"""From Hydra's composed config to the typed config the stages take, once per command.

:func:`checked_train` turns the composed ``train`` config into a ``TrainConfig`` object and runs
every check that needs no weights (:mod:`pipeline.commands.validation`), reporting all problems
at once; :func:`typed_config` converts the other entry points' configs. After this, nothing in
the pipeline sees a ``DictConfig``. :func:`compose_train` composes without a run folder, for the
tools that print and exit (``pipeline.estimate``, ``python -m pipeline.data``, benchmarks).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, List, Optional, Union

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from pipeline.commands import store  # noqa: F401  (registers the schemas the configs compose against)
from pipeline.commands import validation
from pipeline.commands.keys import unknown_adapter_keys, unknown_keys
from pipeline.config.errors import ConfigError, missing_values
from pipeline.config.options import CONF_DIR, plain
from pipeline.config.ranges import range_problems
from pipeline.config.app_schema import EvaluateConfig, ExportConfig, ServeConfig
from pipeline.config.schema import TrainConfig

# The typed config of an entry point.
EntryConfig = Union[TrainConfig, EvaluateConfig, ServeConfig, ExportConfig]


def record(cfg: DictConfig) -> Dict[str, Any]:
    """The composed config as plain values for ``config.yaml``: resolved, or as written when a
    value is still missing (the run folder records the config before validation says so)."""
    try:
        return plain(cfg)
    except Exception:  # a missing value: validation reports it next; keep what we have
        return OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)


def missing_keys(node: DictConfig, prefix: str = "") -> List[str]:
    """Dotted keys whose value is ``???``. Unlike ``OmegaConf.missing_keys`` this resolves no
    interpolation: ``name: ${model.path}`` with ``path: ???`` would raise a type error there."""
    missing = []
    for key in node.keys():
        if OmegaConf.is_missing(node, key):
            missing.append(f"{prefix}{key}")
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not OmegaConf.is_interpolation(node, key):
            missing += missing_keys(child, f"{prefix}{key}.")
    return missing


def typed_config(cfg: Union[DictConfig, EntryConfig],
                 checks: Callable[[Any], List[str]] = lambda typed: []) -> EntryConfig:
    """An entry point's composed config as its schema object, every interpolation resolved:
    ``TrainConfig``, ``EvaluateConfig``, ``ServeConfig`` or ``ExportConfig``, the adapter as its
    method's settings; every value checked against its declared range
    (:mod:`pipeline.config.ranges`). ``checks`` adds the entry point's rules across fields, so
    that one error lists every problem.

    Raises:
        ConfigError: every key the schema does not have (with the closest known key), every
            value still missing (``???``) or out of its range, and what ``checks`` finds.
    """
    if not OmegaConf.is_config(cfg):
        return cfg
    problems = unknown_keys(cfg)
    missing = sorted(missing_keys(cfg))
    if missing:  # the other checks would trip over them
        raise missing_values(missing, problems)
    try:
        typed = _convert(cfg)
    except ConfigError as err:
        raise ConfigError(problems + err.problems) from None
    problems += range_problems(typed) + checks(typed)
    if problems:
        raise ConfigError(problems)
    return typed


def _convert(cfg: DictConfig) -> EntryConfig:
    try:
        return OmegaConf.to_object(cfg)
    except MissingMandatoryValue as err:  # behind an interpolation
        raise missing_values([getattr(err, "full_key", None) or str(err)]) from None
    except OmegaConfBaseException as err:  # a value that does not fit its key once resolved
        raise _conversion_error(cfg, err) from None


def _conversion_error(cfg: DictConfig, err: OmegaConfBaseException) -> ConfigError:
    """The error for a value that does not fit its key once its interpolation is resolved: a key
    taken from another that is null (``model.name: ${model.path}`` with no ``model.path``) is a
    missing value of that other key; anything else names the key and what went wrong."""
    key = getattr(err, "full_key", None) or "?"
    source = _interpolated_from(cfg, key)
    if source is not None and OmegaConf.select(cfg, source, throw_on_missing=False) is None:
        return missing_values([source])
    return ConfigError([f"{key}: {str(err).splitlines()[0]}"])


def _interpolated_from(cfg: DictConfig, key: str) -> Optional[str]:
    """The key that ``key``'s value is a plain interpolation of (``${model.path}``), or None."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if not isinstance(node, DictConfig) or leaf not in node or not OmegaConf.is_interpolation(node, leaf):
        return None
    found = re.fullmatch(r"\$\{([\w.]+)\}", str(node._get_node(leaf)._value()))
    return found.group(1) if found else None


def checked_train(cfg: DictConfig) -> TrainConfig:
    """The composed ``train`` config as a ``TrainConfig`` object, after every check that needs
    no weights (the adapter's checks against the model's architecture run once it is known:
    :func:`pipeline.adapters.registry.check_architecture`).

    Raises:
        ConfigError: every problem found, each naming key, value and fix.
    """
    def rules(typed: TrainConfig) -> List[str]:
        adapter_keys = unknown_adapter_keys(cfg)
        return adapter_keys + validation.problems(typed, check_adapter=not adapter_keys)

    return typed_config(cfg, rules)


def compose_train(overrides: List[str]) -> TrainConfig:
    """The checked ``train`` config for ``overrides``, composed as ``pipeline.train`` composes
    it, for tools that print and exit: no run folder, no log file.

    Raises:
        ConfigError: every problem the checks find; Hydra's ``ConfigCompositionException`` for
            an override that does not compose.
    """
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["paths.run_dir=.", *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # ${hydra:runtime...} interpolations resolve
    with open_dict(cfg):
        del cfg["hydra"]
    return checked_train(cfg)
