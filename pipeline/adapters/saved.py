"""Trained adapters on disk: what a finished run folder trained (:func:`read_run`: its data,
base model, adapter settings and artifact, from its ``config.yaml``) and a saved adapter attached
to its base, whatever its registered method (:func:`load_adapter`). ``pipeline.evaluate``,
``pipeline.serve`` and ``pipeline.export`` read runs through here; run folders written by any
earlier version of the pipeline read back alike (their ``config.yaml`` is plain YAML). A
``pipeline.merge`` folder reads as a run too: its ``merged_from.yaml`` (:func:`write_merged_from`)
says the base, data and adapter settings of its sources, its ``adapter/`` is the merged adapter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import yaml
from omegaconf import OmegaConf

from pipeline.adapters.registry import ADAPTERS, AdapterSettings, register_tuners
from pipeline.config.errors import ConfigError
from pipeline.config.options import typed
from pipeline.config.schema import DataConfig, ModelConfig
from pipeline.runs.atomic import write_text
from pipeline.runs.runfolder import read_json

# In a merge folder: the model, data and adapter sections of its first source's config.yaml (every
# source shares the base: pipeline.merge checks it), so the folder serves and exports alone.
MERGED_FROM = "merged_from.yaml"


class SavedRun(NamedTuple):
    """A finished run as its config.yaml describes it, and its artifact folder."""

    data: DataConfig
    model: ModelConfig
    settings: AdapterSettings
    artifact: Path  # adapter/ (PEFT) or model/ (full fine-tuning)


def read_run(run: str) -> SavedRun:
    """Data, base model, adapter settings and artifact folder of a run folder.

    Raises:
        ConfigError: when ``run`` is not a run folder, has no artifact, or names an adapter
            method that is not registered.
    """
    run_dir = Path(run)
    if not (run_dir / "config.yaml").exists():
        raise ConfigError([f"run={run!r} is not a run folder (no config.yaml)"])
    saved = _trained(run_dir, run)
    method = saved.adapter.method
    if method not in ADAPTERS:
        raise ConfigError([f"run={run!r} was trained with adapter method {method!r}, which is not "
                           f"registered; registered: {', '.join(sorted(ADAPTERS))}"])
    artifact = next((run_dir / n for n in ("adapter", "model") if (run_dir / n).exists()), None)
    if artifact is None:
        status = read_json(run_dir / "run.json").get("status") if (run_dir / "run.json").exists() else None
        raise ConfigError([f"run={run!r} has no adapter/ or model/ folder (status: {status})"])
    return SavedRun(typed(DataConfig, saved.data), typed(ModelConfig, saved.model),
                    typed(ADAPTERS[method], saved.adapter), artifact)


def _trained(run_dir: Path, run: str) -> Any:
    """The model, data and adapter sections that describe what the folder's artifact is: a
    training run's config.yaml, or a merge folder's :data:`MERGED_FROM`."""
    saved = OmegaConf.load(run_dir / "config.yaml")
    if "adapter" in saved or "merge" not in saved:
        return saved
    if not (run_dir / MERGED_FROM).exists():
        raise ConfigError([f"run={run!r} is a merge folder without {MERGED_FROM} (written by an older "
                           "pipeline.merge): merge again, or give its adapter/ with model=<the base> "
                           "(adapters={merged: <folder>/adapter} or adapter_path=<folder>/adapter)"])
    return OmegaConf.load(run_dir / MERGED_FROM)


def write_merged_from(run_dir: Path, source: str) -> None:
    """Records in merge folder ``run_dir`` the base, data and adapter settings of source run
    ``source`` (the merged adapter applies to the same base), for :func:`read_run`."""
    saved = OmegaConf.to_container(_trained(Path(source), source), resolve=True)
    described = {key: saved[key] for key in ("model", "data", "adapter")}
    write_text(run_dir / MERGED_FROM, "# The sources' base, data and adapter settings (the first source's): "
               "what serve, export and evaluate read for this folder.\n"
               + yaml.safe_dump(described, sort_keys=False))


def is_adapter(artifact: Path) -> bool:
    """Whether ``artifact`` is a PEFT adapter folder (else a whole model folder)."""
    return (Path(artifact) / "adapter_config.json").exists()


def load_adapter(base: Any, artifact: Path, **kwargs: Any) -> Any:
    """``base`` with the saved adapter in ``artifact`` attached, whatever its registered method.

    Args:
        base: the base model, loaded as the adapter was trained on it (4-bit for QLoRA).
        artifact: the adapter folder (``adapter_config.json`` and the weights).
        kwargs: passed to ``PeftModel.from_pretrained`` (e.g. ``adapter_name``).
    """
    from peft import PeftModel  # lazy: peft loads torch and transformers

    register_tuners()
    return PeftModel.from_pretrained(base, artifact, **kwargs)
