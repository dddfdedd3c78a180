"""Where the configs live, and reading them without Hydra: one group option as its schema
object (:func:`load_option`), config nodes merged onto a schema (:func:`typed`), any config or
schema object back as plain values (:func:`plain`) for records, W&B and fingerprints, and the
resolvers the configs use (``${asset:...}``, ``${unique_dir:...}``; registered on import).

The config groups (``conf/``) and the sweep definitions (``sweeps/``) ship inside the package:
in a checkout ``pipeline/conf`` and ``pipeline/sweeps`` link to the top-level folders, and a
wheel holds copies of them (package data), so an installed package finds its configs from any
folder. This module imports no torch/transformers: composing a config must stay fast.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Dict

from omegaconf import OmegaConf

from pipeline.config.errors import ConfigError
from pipeline.config.schema import SCHEMAS

PACKAGE_DIR = Path(__file__).resolve().parent.parent
ASSETS_DIR = PACKAGE_DIR / "assets"
CONF_DIR = (PACKAGE_DIR / "conf").resolve()
SWEEPS_DIR = (PACKAGE_DIR / "sweeps").resolve()  # the `sweep` config group


def group_options(group: str) -> list:
    """The option names of config group ``group`` (``conf/<group>/*.yaml``)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def load_option(group: str, name: str, **overrides: Any) -> Any:
    """A group option as its typed schema object (e.g. the ``model`` a tiny model borrows a
    tokenizer from), read from ``conf/<group>/<name>.yaml`` without composing a whole config.
    ``overrides`` replace fields, e.g. those interpolating the root config (``seed``).

    Raises:
        ConfigError: for an option that does not exist, listing those that do.
    """
    path = CONF_DIR / group / f"{name}.yaml"
    if not path.exists():
        raise ConfigError([f"{group} option {name!r} does not exist; available: {', '.join(group_options(group))}"])
    node = OmegaConf.load(path)
    node.pop("defaults", None)
    return typed(SCHEMAS[group], node, overrides)


def typed(schema: type, *nodes: Any) -> Any:
    """``nodes`` merged onto ``schema`` and checked by it, as a schema object."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), *nodes))


def plain(node: Any) -> Any:
    """A config node or schema object as plain dicts, lists and values (choices as their
    strings, interpolations resolved): for config.yaml, W&B, trial attributes and fingerprints."""
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        node = OmegaConf.structured(node)
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True, enum_to_str=True)
    return node


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
