"""Keys the schema does not have: refused, with the closest key it has.

Hydra checks an override of an existing key against the schema, but ``+key=value`` adds a key
anywhere (Hydra's own hint for a misspelled key suggests the ``+``), and converting to the
schema's dataclasses then keeps no such key: ``+trainer.learnig_rate=1e-4`` would train at the
old rate without a word. :func:`unknown_keys` finds them after composition;
:func:`guard_overrides` makes an override under a key that another option set to null a
composition error that says which option defines it, where OmegaConf would fail an assertion.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Dict, List, Optional, Tuple

from hydra._internal.config_loader_impl import ConfigLoaderImpl  # the override step guard_overrides wraps
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, ListConfig, OmegaConf

from pipeline.adapters.registry import ADAPTERS, settings_fields
from pipeline.config.options import CONF_DIR, group_options


def unknown_keys(cfg: DictConfig, skip: Tuple[str, ...] = ("adapter",)) -> List[str]:
    """Keys of the composed config that its schema does not have, each with the closest key it
    has: ``+trainer.learnig_rate=1e-4`` would otherwise be carried along unused (converting to
    the schema's dataclasses keeps no such key) and the run would train at the old rate. Only
    the maps the schema declares open (``Dict`` fields such as ``trainer.extra``) take new keys.
    The adapter's keys depend on its method: :func:`unknown_adapter_keys` checks them.
    """
    found: List[Tuple[str, Any]] = []
    _walk_unknown(cfg, "", found, skip)
    if not found:
        return []
    known = _known_keys(cfg, "")
    open_maps = sorted(_open_maps(OmegaConf.get_type(cfg), ""))
    problems = []
    for key, value in found:
        guess = _closest(key, known)
        hint = f"did you mean {guess}?" if guess else "remove it"
        problems.append(f"{key}={value!r} is not a setting: {hint} (new keys go only in "
                        f"{', '.join(open_maps) or 'no map of this config'})")
    return problems


def unknown_adapter_keys(cfg: DictConfig) -> List[str]:
    """Keys added with ``+adapter.x=`` (or by an overlay) that the chosen method does not have
    (converting would drop them silently)."""
    method = cfg.adapter.method
    if method not in ADAPTERS:
        return [f"adapter.method={method!r} is unknown; choose one of: {', '.join(sorted(ADAPTERS))}"]
    known = settings_fields(method)
    problems = []
    for key in cfg.adapter.keys():
        if key not in known:
            owners = adapter_owners(key)
            hint = f"; it belongs to adapter={'/'.join(owners)}" if owners else ""
            problems.append(f"adapter.{key}={cfg.adapter[key]!r} is not a setting of "
                            f"adapter={method}: remove it{hint}")
    return problems


def adapter_owners(key: str) -> List[str]:
    """The registered adapter methods that have the setting ``key``."""
    return sorted(n for n in ADAPTERS if key in settings_fields(n))


def _walk_unknown(node: Any, prefix: str, found: List[Tuple[str, Any]], skip: Tuple[str, ...]) -> None:
    if isinstance(node, ListConfig):
        for i in range(len(node)):
            child = node._get_node(i)
            if isinstance(child, (DictConfig, ListConfig)):
                _walk_unknown(child, f"{prefix}[{i}].", found, skip)
        return
    if not isinstance(node, DictConfig) or node._is_none() or node._is_missing():
        return
    schema = OmegaConf.get_type(node)
    fields = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    for key in node.keys():
        dotted = f"{prefix}{key}"
        if dotted in skip:
            continue
        if fields is not None and key not in fields:
            found.append((dotted, OmegaConf.to_container(node, resolve=False)[key]))
            continue
        if OmegaConf.is_interpolation(node, key):
            continue
        child = node._get_node(key)
        if isinstance(child, (DictConfig, ListConfig)):
            _walk_unknown(child, f"{dotted}.", found, skip)


def _known_keys(node: Any, prefix: str) -> List[str]:
    """Every dotted key the schemas of ``node`` declare (the candidates of a "did you mean")."""
    keys = []
    if isinstance(node, DictConfig) and not node._is_none() and not node._is_missing():
        schema = OmegaConf.get_type(node)
        if dataclasses.is_dataclass(schema):
            for spec in dataclasses.fields(schema):
                keys.append(f"{prefix}{spec.name}")
                if spec.name in node and not OmegaConf.is_interpolation(node, spec.name):
                    keys += _known_keys(node._get_node(spec.name), f"{prefix}{spec.name}.")
    return keys


def _open_maps(schema: Any, prefix: str) -> List[str]:
    """The dotted keys of the schema's ``Dict`` fields: the maps that take new keys."""
    if not dataclasses.is_dataclass(schema):
        return []
    found = []
    for name, hint in typing.get_type_hints(schema).items():
        origin = typing.get_origin(hint)
        if origin in (dict, Dict):
            found.append(f"{prefix}{name}")
        elif dataclasses.is_dataclass(hint):
            found += _open_maps(hint, f"{prefix}{name}.")
    return found


def _closest(key: str, known: List[str]) -> Optional[str]:
    """The known key most like ``key``: a sibling with a similar name first, else any key whose
    last part is similar (``learnig_rate`` -> ``trainer.learning_rate``)."""
    parent, _, leaf = key.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in known if k.rpartition(".")[0] == parent}
    match = difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.75)
    if match:
        return siblings[match[0]]
    leaves = {}
    for k in known:
        leaves.setdefault(k.rpartition(".")[2], k)
    match = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.75)
    return leaves[match[0]] if match else None


def null_parent(cfg: DictConfig, key: str) -> Optional[str]:
    """The dotted key above ``key`` whose value is null in ``cfg`` (setting ``key`` then has
    nowhere to go), or None."""
    node: Any = cfg
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node, DictConfig) or part not in node.keys():
            return None  # an unknown key: Hydra's and unknown_keys' errors say so
        node = node._get_node(part)
        if node._is_none():
            return ".".join(parts[: i + 1])
    return None


def _options_defining(key: str) -> List[str]:
    """The options of ``key``'s config group under which ``key`` is a section, not null:
    ``logger.wandb`` -> ``logger=wandb``."""
    group, _, rest = key.partition(".")
    found = []
    for name in group_options(group) if (CONF_DIR / group).is_dir() else []:
        node = OmegaConf.load(CONF_DIR / group / f"{name}.yaml")
        if rest and OmegaConf.select(node, rest, throw_on_missing=False) is not None:
            found.append(f"{group}={name}")
    return found


def override_problem(cfg: DictConfig, key: str, adds: bool) -> Optional[str]:
    """Why ``key=value`` (``+key=value`` where ``adds``) cannot apply to ``cfg``, in words, or
    None (Hydra applies it, or says itself why not)."""
    parent = null_parent(cfg, key)
    if parent is None:
        return None if adds else _misspelt(cfg, key)
    options = _options_defining(parent)
    group = parent.partition(".")[0]
    fix = f"add {' or '.join(options)} to the command line" if options else f"set {parent} itself"
    return (f"Could not override '{key}': {parent} is null here (the {group} option in use, or an "
            f"option such as debug=... that picks it, sets none); {fix}, or drop the override")


def _misspelt(cfg: DictConfig, key: str) -> Optional[str]:
    """For a key its schema lacks, the closest one it has, instead of Hydra's hint to add the
    key with ``+`` (which a schema refuses later anyway)."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, throw_on_missing=False) if parent else cfg
    if not isinstance(node, DictConfig) or leaf in node.keys() or not dataclasses.is_dataclass(OmegaConf.get_type(node)):
        return None
    owners = adapter_owners(leaf) if parent == "adapter" else []
    guess = _closest(key, _known_keys(cfg, ""))
    if owners:
        hint = f"it is a setting of adapter={'/'.join(owners)}, not of adapter={node.method}"
    else:
        hint = f"did you mean {guess}?" if guess else "remove it"
    return f"Could not override '{key}': not a setting; {hint}"


def guard_overrides() -> None:
    """Checks each command-line override against the config composed so far, before Hydra
    applies it (idempotent).

    Hydra hands ``a.b.c=v`` to ``OmegaConf.update``, which fails an assertion ("Unexpected type
    for root: NoneType") with a raw traceback when ``a.b`` is null; Hydra reports only
    OmegaConf's own exceptions compactly. This wraps Hydra's (private) override step to raise its
    ``ConfigCompositionException`` instead, which every entry point prints as one line; should
    Hydra rename the step, overrides apply as before and only this message is lost.
    """
    original = getattr(ConfigLoaderImpl, "_apply_overrides_to_config", None)
    if original is None or getattr(original, "guarded", False):
        return

    def apply(overrides: List[Any], cfg: DictConfig) -> None:
        for override in overrides:  # one at a time: an earlier one may set what a later one needs
            if override.package is None and not override.is_delete():
                adds = override.is_add() or override.is_force_add()
                problem = override_problem(cfg, override.key_or_group, adds)
                if problem:
                    raise ConfigCompositionException(problem)
            original([override], cfg)

    apply.guarded = True
    ConfigLoaderImpl._apply_overrides_to_config = staticmethod(apply)
