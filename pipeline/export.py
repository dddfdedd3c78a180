"""Export entry point: ``python -m pipeline.export run=<run folder>|sweep=<sweep name> [export.merge=true]``.

``export.merge=true`` merges the adapter into its base and saves a self-contained safetensors
model with its tokenizer (loadable by ``from_pretrained``, vLLM, TGI or ``pipeline.serve
model=hub model.path=<folder>``). ``export.merge=false`` keeps the adapter separate, copies it
into the export folder and writes the exact ``vllm serve ... --enable-lora`` command.
Every export folder is written in a temporary sibling and renamed into place.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import hydra
from omegaconf import DictConfig

from pipeline.adapters.merging import merged_model
from pipeline.adapters.registry import ADAPTERS, settings_for
from pipeline.adapters.saved import is_adapter, read_run
from pipeline.commands import runner, store
from pipeline.commands.compose import typed_config
from pipeline.config.app_schema import ExportConfig
from pipeline.config.errors import ConfigError, PipelineError
from pipeline.config.options import CONF_DIR
from pipeline.config.schema import ModelConfig, QuantizationSettings
from pipeline.model import loading
from pipeline.runs import atomic
from pipeline.runs.runfolder import folder_size_mb, package_versions, write_json
from pipeline.scoring import vllm_client
from pipeline.study.summary import best_runs

log = logging.getLogger("pipeline.export")


class ExportError(PipelineError, ValueError):
    """The export cannot be done as asked; the message says why and what to do instead."""


@dataclass
class ExportSource:
    model_cfg: ModelConfig
    artifact: Path  # adapter/ or model/
    quantization: Optional[QuantizationSettings]
    run: Optional[Path]
    seed: int  # a tiny base model's initialisation seed


def with_sweep(cfg: ExportConfig) -> ExportConfig:
    """``sweep=<name>``: exports the sweep's best trial (a multi-objective sweep has no single
    best: the error lists its Pareto front, to pick one with ``run=``)."""
    if not cfg.sweep:
        return cfg
    if cfg.run or cfg.adapter_path:
        raise ConfigError([f"sweep={cfg.sweep} chooses the run to export: drop run= and adapter_path="])
    runs, _ = best_runs(cfg.sweep, cfg.paths.output_dir)
    if len(runs) > 1:
        raise ConfigError([f"sweep={cfg.sweep} has {len(runs)} trials on its Pareto front; export one "
                           "of them with run=<folder>: " + ", ".join(f"trial {n}: run={d}" for n, d in runs.items())])
    log.info("sweep %s: exporting its best trial, %s", cfg.sweep, next(iter(runs.values())))
    return dataclasses.replace(cfg, run=next(iter(runs.values())))


def problems(cfg: ExportConfig) -> List[str]:
    """Every problem with the ``export`` config that shows before any weights load."""
    found = []
    given = [key for key in ("run", "sweep", "adapter_path") if getattr(cfg, key)]
    if not given:
        found.append("give run=<run folder>, sweep=<sweep name>, or adapter_path=<adapter folder> with model=...")
    elif len(given) > 1:
        found.append(f"{' and '.join(f'{k}=' for k in given)} are all given; give one of them")
    if cfg.run and not (Path(cfg.run) / "config.yaml").is_file():
        found.append(f"run={cfg.run!r} is not a run folder (it has no config.yaml)")
    if cfg.adapter_path and not is_adapter(Path(cfg.adapter_path)):
        found.append(f"adapter_path={cfg.adapter_path!r} has no adapter_config.json")
    if cfg.adapter_path and cfg.adapter_method not in ADAPTERS:
        found.append(f"adapter_method={cfg.adapter_method!r} is unknown; choose one of: {', '.join(sorted(ADAPTERS))}")
    if cfg.export.output and Path(cfg.export.output).exists() and not cfg.export.overwrite:
        found.append(f"export.output={cfg.export.output!r} exists; set export.overwrite=true or another export.output")
    return found


def read_source(cfg: ExportConfig) -> ExportSource:
    """What to export: the run's (``run``, also as a sweep chose it), else ``adapter_path`` on
    ``model``; :func:`problems` has checked that one of them is given and is what it should be."""
    if cfg.run:
        saved = read_run(cfg.run)
        return ExportSource(saved.model, saved.artifact, saved.settings.quantization(), Path(cfg.run), saved.data.seed)
    settings = settings_for(cfg.adapter_method)
    return ExportSource(cfg.model, Path(cfg.adapter_path), settings.quantization(), None, cfg.seed)


def output_folder(cfg: ExportConfig, source: ExportSource) -> Path:
    if cfg.export.output:
        target = Path(cfg.export.output)
    else:
        parent = source.run if source.run else Path(cfg.paths.run_dir)
        target = parent / "export" / ("merged" if cfg.export.merge else "vllm")
    if target.exists() and not cfg.export.overwrite:
        raise ConfigError([f"export.output={str(target)!r} exists; set export.overwrite=true or "
                           "another export.output"])
    return target


def write_merged(cfg: ExportConfig, source: ExportSource, folder: str, target: Path) -> None:
    import torch  # lazy: start-up must not pay for torch

    started = time.monotonic()
    tokenizer = loading.load_tokenizer(folder, source.model_cfg)
    if not is_adapter(source.artifact):
        model = loading.load_model(str(source.artifact), source.model_cfg)  # full fine-tuning: as is
    else:
        model = merged_model(folder, source.model_cfg, source.artifact, source.quantization, cfg.export.dequantize)
    model = model.to(getattr(torch, cfg.export.dtype))
    model.config.use_cache = True  # training turned the KV cache off; serving wants it
    size_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    log.info("export: loaded and merged in %.0f s; saving %.0f MB (%s) to %s", time.monotonic() - started,
             size_mb, cfg.export.dtype, target)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "vllm_command.sh").write_text(
            vllm_client.shell_command([str(target.resolve()), "--dtype", cfg.export.dtype]) + "\n")
        _provenance(tmp, source, folder, merged=True)

    saving = time.monotonic()
    atomic.replace_folder(target, write)
    log.info("export: saved %.0f MB in %.0f s", folder_size_mb(target), time.monotonic() - saving)


def vllm_command(folder: str, model_cfg: ModelConfig, name: str, adapter: Path, served: Path) -> str:
    """``vllm serve <base> --dtype <dtype> --enable-lora ... --lora-modules <name>=<adapter>``.

    The base is what the adapter was trained on: the hub id for a hub model, else the local
    folder (a converted GGUF or a tiny model), whose weights the hub version may not equal. The
    dtype is the one ``pipeline.serve`` loads the base in, so both answer alike.
    """
    base = model_cfg.path if model_cfg.source == "hub" else folder
    try:
        args = vllm_client.serve_arguments(base, vllm_client.model_dtype(folder, model_cfg.dtype),
                                           {name: served}, settings_from={name: adapter})
    except vllm_client.VllmError as err:
        raise ExportError(f"{err}; or pipeline.serve") from err
    return vllm_client.shell_command(args)


def write_adapter(cfg: ExportConfig, source: ExportSource, folder: str, target: Path) -> str:
    if not is_adapter(source.artifact):
        raise ExportError(f"{source.artifact} is a fully fine-tuned model, not an adapter: use "
                          "export.merge=true to export it")
    try:
        vllm_client.refuse_quantized(str(source.artifact), source.quantization)
    except vllm_client.VllmError as err:
        raise ExportError(str(err)) from err
    command = vllm_command(folder, source.model_cfg, cfg.export.lora_name, source.artifact,
                           target / "adapter")

    def write(tmp: Path) -> None:
        shutil.copytree(source.artifact, tmp / "adapter")
        (tmp / "vllm_command.sh").write_text(command + "\n")
        _provenance(tmp, source, folder, merged=False)

    atomic.replace_folder(target, write)
    return command


def _provenance(tmp: Path, source: ExportSource, folder: str, merged: bool) -> None:
    write_json(tmp / "export.json", {
        "run": str(source.run) if source.run else None, "artifact": str(source.artifact),
        "base": folder, "base_model": source.model_cfg.name, "merged": merged,
        "quantized_base": bool(source.quantization), "packages": package_versions()})


def export(cfg: DictConfig) -> Path:
    """Writes the export folder and returns it."""
    loading.quiet_progress_bars()  # the export logs its own progress
    config = with_sweep(typed_config(cfg, problems))  # every problem at once, before any weights load
    source = read_source(config)
    target = output_folder(config, source)
    folder = loading.resolve_folder(source.model_cfg, config.paths.cache_dir, source.seed)
    if config.export.merge:
        write_merged(config, source, folder, target)
        name = config.export.lora_name  # the model id clients ask for, as for an adapter export
        print(f"merged model: {target}\nserve it: python -m pipeline.serve model=hub model.path={target} "
              f"base_name={name}\nor: vllm serve {target} --dtype {config.export.dtype} --served-model-name {name}")
    else:
        command = write_adapter(config, source, folder, target)
        print(f"adapter: {target / 'adapter'}\nvLLM command (also in {target / 'vllm_command.sh'}):\n{command}")
    runner.announce(target, "export")
    return target


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="export")
def _main(cfg: DictConfig) -> None:
    runner.main(export, cfg)


def main() -> None:
    store.forget_sweeps()  # sweep=<name> is this config's key, not the train config's group
    _main()


if __name__ == "__main__":
    main()
    runner.end_process()
