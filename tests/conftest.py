"""Shared fixtures: compose the real configs (conf/) with test overrides and run stages."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from pipeline.commands import store  # noqa: F401  (registers the schemas the configs compose against)
from pipeline.config.options import load_option
from pipeline.model import loading
from pipeline.train import train

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# Tiny models and the converted default model are cached across test runs (and in CI, across
# the session): converting the packaged GGUF takes ~45 s once.
os.environ.setdefault("WANDB_SILENT", "true")


def python_path() -> str:
    """PYTHONPATH for a subprocess: this checkout first, then what the environment had (packages
    installed with ``pip install --target`` live there)."""
    return os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


def compose_train(overrides: List[str], run_dir: Path) -> DictConfig:
    """The ``train`` config exactly as ``python -m pipeline.train`` composes it, with the
    Hydra runtime values the task function reads (overrides, mode) set."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        # Each test's own base-measurement cache (beside its run folder), so that no test finds
        # what another measured; tests of the cache itself pass paths.base_cache_dir.
        cfg = compose("train", overrides=[f"paths.run_dir={run_dir}", f"paths.root_dir={ROOT}",
                                          f"paths.base_cache_dir={Path(run_dir).parent / 'base_cache'}",
                                          f"paths.data_cache_dir={Path(run_dir).parent / 'data_cache'}",
                                          *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def run_train(overrides: List[str], run_dir: Path) -> float:
    return train(compose_train(overrides, run_dir))


def read_json(path: Path) -> Dict[str, Any]:
    return json.loads(path.read_text())


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> str:
    """The cached tiny Llama (random weights, SmolLM2 tokenizer) as a from_pretrained folder."""
    cache = os.environ.get("PIPELINE_CACHE_DIR", "~/.cache/pipeline")
    return loading.resolve_folder(load_option("model", "tiny_llama"), cache, seed=42)


@pytest.fixture(scope="session")
def tokenizer(tiny_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_folder)


def write_jsonl(path: Path, records: List[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path
