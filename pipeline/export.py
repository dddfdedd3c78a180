"""Export entry point: ``python -m pipeline.export run=<run folder>|sweep=<sweep name> [export.merge=true]``.

``export.merge=true`` merges the adapter into its base and saves a self-contained safetensors
model with its tokenizer (loadable by ``from_pretrained``, vLLM, TGI or ``pipeline.serve
model=hub model.path=<folder>``). ``export.merge=false`` keeps the adapter separate, copies it
into the export folder and writes the exact ``vllm serve ... --enable-lora`` command.
Every export folder is written in a temporary sibling and renamed into place.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import hydra
from omegaconf import DictConfig

from pipeline import config as C, errors
from pipeline import model as models
from pipeline import vllm_engine

log = logging.getLogger("pipeline.export")

QUANTIZED_MERGE = ("the run's adapter was trained on a 4-bit base (adapter=qlora); merging into 4-bit "
                   "weights would re-quantise base + adapter and lose most of what the adapter learnt. "
                   "Set export.dequantize=true to merge into a float copy of the dequantised 4-bit "
                   "weights (the weights the adapter was trained against), or export.merge=false to "
                   "keep the adapter separate")


class ExportError(C.PipelineError, ValueError):
    """The export cannot be done as asked; the message says why and what to do instead."""


@dataclass
class ExportSource:
    model_cfg: C.ModelConfig
    artifact: Path  # adapter/ or model/
    quantization: Optional[C.QuantizationSettings]
    run: Optional[Path]
    seed: int  # a tiny base model's initialisation seed


def resolve_sweep(cfg: C.ExportConfig) -> None:
    """``sweep=<name>``: exports the sweep's best trial (a multi-objective sweep has no single
    best: the error lists its Pareto front, to pick one with ``run=``)."""
    if not cfg.sweep:
        return
    from pipeline.sweep_report import best_runs

    if cfg.run or cfg.adapter_path:
        raise C.ConfigError([f"sweep={cfg.sweep} chooses the run to export: drop run= and adapter_path="])
    runs, _ = best_runs(cfg.sweep, cfg.paths.output_dir)
    if len(runs) > 1:
        raise C.ConfigError([f"sweep={cfg.sweep} has {len(runs)} trials on its Pareto front; export one "
                             "of them with run=<folder>: " + ", ".join(f"trial {n}: run={d}" for n, d in runs.items())])
    cfg.run = next(iter(runs.values()))
    log.info("sweep %s: exporting its best trial, %s", cfg.sweep, cfg.run)


def read_source(cfg: C.ExportConfig) -> ExportSource:
    resolve_sweep(cfg)
    if cfg.run:
        from pipeline.runfolder import read_run

        data_cfg, model_cfg, settings, artifact = read_run(cfg.run)
        return ExportSource(model_cfg, artifact, settings.quantization(), Path(cfg.run), data_cfg.seed)
    if not cfg.adapter_path:
        raise C.ConfigError(["give run=<run folder>, or adapter_path=<adapter folder> with model=..."])
    if not (Path(cfg.adapter_path) / "adapter_config.json").exists():
        raise C.ConfigError([f"adapter_path={cfg.adapter_path!r} has no adapter_config.json"])
    settings = C.adapter_settings(cfg.adapter_method)
    return ExportSource(cfg.model, Path(cfg.adapter_path), settings.quantization(),
                        None, cfg.seed)


def output_folder(cfg: C.ExportConfig, source: ExportSource) -> Path:
    if cfg.export.output:
        target = Path(cfg.export.output)
    else:
        parent = source.run if source.run else Path(cfg.paths.run_dir)
        target = parent / "export" / ("merged" if cfg.export.merge else "vllm")
    if target.exists() and not cfg.export.overwrite:
        raise C.ConfigError([f"export.output={str(target)!r} exists; set export.overwrite=true or "
                             "another export.output"])
    return target


def merged_model(source: ExportSource, folder: str, dequantize: bool) -> Any:
    """The base with the adapter merged in, as a plain transformers model.

    Raises:
        ExportError: for a 4-bit base without ``dequantize``, or an adapter that cannot merge.
    """
    from pipeline.adapters import load_adapter

    if source.quantization and not dequantize:
        raise ExportError(f"export.merge=true: {QUANTIZED_MERGE}")
    base = models.load_model(folder, source.model_cfg)
    if source.quantization:
        from pipeline.quantization import dequantized_state_dict

        # load_model guards every 4-bit load, which keeps the layout dequantize_4bit reads.
        quantized = models.load_model(folder, source.model_cfg, source.quantization)
        dense = dequantized_state_dict(quantized)
        missing = set(dense) - set(base.state_dict())
        if missing:
            raise ExportError(f"dequantised weights {sorted(missing)[:3]} have no place in the float base")
        base.load_state_dict(dense, strict=False)
        del quantized
    tuned = load_adapter(base, source.artifact)
    try:
        from pipeline.progress import interactive

        return tuned.merge_and_unload(progressbar=interactive())  # a bar over the layers on a terminal
    except ValueError as err:  # the bottleneck tuner refuses with the reason
        raise ExportError(f"export.merge=true: {err}; or export.merge=false") from err


def write_merged(cfg: C.ExportConfig, source: ExportSource, folder: str, target: Path) -> None:
    import torch

    import time

    from pipeline.runfolder import folder_size_mb

    started = time.monotonic()
    tokenizer = models.load_tokenizer(folder, source.model_cfg)
    if not (source.artifact / "adapter_config.json").exists():
        model = models.load_model(str(source.artifact), source.model_cfg)  # full fine-tuning: as is
    else:
        model = merged_model(source, folder, cfg.export.dequantize)
    model = model.to(getattr(torch, cfg.export.dtype))
    model.config.use_cache = True  # training turned the KV cache off; serving wants it
    size_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    log.info("export: loaded and merged in %.0f s; saving %.0f MB (%s) to %s", time.monotonic() - started,
             size_mb, cfg.export.dtype, target)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "vllm_command.sh").write_text(
            vllm_engine.shell_command([str(target.resolve()), "--dtype", cfg.export.dtype]) + "\n")
        _provenance(tmp, source, folder, merged=True)

    saving = time.monotonic()
    _replace_folder(target, write)
    log.info("export: saved %.0f MB in %.0f s", folder_size_mb(target), time.monotonic() - saving)


def vllm_command(folder: str, model_cfg: C.ModelConfig, name: str, adapter: Path, served: Path) -> str:
    """``vllm serve <base> --dtype <dtype> --enable-lora ... --lora-modules <name>=<adapter>``.

    The base is what the adapter was trained on: the hub id for a hub model, else the local
    folder (a converted GGUF or a tiny model), whose weights the hub version may not equal. The
    dtype is the one ``pipeline.serve`` loads the base in, so both answer alike.
    """
    base = model_cfg.path if model_cfg.source == "hub" else folder
    try:
        args = vllm_engine.serve_arguments(base, vllm_engine.model_dtype(folder, model_cfg.dtype),
                                           {name: served}, settings_from={name: adapter})
    except vllm_engine.VllmError as err:
        raise ExportError(f"{err}; or pipeline.serve") from err
    return vllm_engine.shell_command(args)


def write_adapter(cfg: C.ExportConfig, source: ExportSource, folder: str, target: Path) -> str:
    if not (source.artifact / "adapter_config.json").exists():
        raise ExportError(f"{source.artifact} is a fully fine-tuned model, not an adapter: use "
                          "export.merge=true to export it")
    try:
        vllm_engine.refuse_quantized(str(source.artifact), source.quantization)
    except vllm_engine.VllmError as err:
        raise ExportError(str(err)) from err
    command = vllm_command(folder, source.model_cfg, cfg.export.lora_name, source.artifact,
                           target / "adapter")

    def write(tmp: Path) -> None:
        shutil.copytree(source.artifact, tmp / "adapter")
        (tmp / "vllm_command.sh").write_text(command + "\n")
        _provenance(tmp, source, folder, merged=False)

    _replace_folder(target, write)
    return command


def _provenance(tmp: Path, source: ExportSource, folder: str, merged: bool) -> None:
    from pipeline import runfolder

    runfolder.write_json(tmp / "export.json", {
        "run": str(source.run) if source.run else None, "artifact": str(source.artifact),
        "base": folder, "base_model": source.model_cfg.name, "merged": merged,
        "quantized_base": bool(source.quantization), "packages": runfolder.package_versions()})


def _replace_folder(target: Path, write: Any) -> None:
    """Writes a fresh ``target`` through a temp folder (replacing an old one only on success)."""
    from pipeline import atomic

    atomic.replace_folder(target, write)


def export(cfg: DictConfig) -> Path:
    """Writes the export folder and returns it."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    cfg = C.typed_config(cfg)
    source = read_source(cfg)
    target = output_folder(cfg, source)
    folder = models.resolve_folder(source.model_cfg, cfg.paths.cache_dir, source.seed)
    if cfg.export.merge:
        write_merged(cfg, source, folder, target)
        print(f"merged model: {target}\nserve it: python -m pipeline.serve model=hub model.path={target}"
              f"\nor: vllm serve {target} --dtype {cfg.export.dtype}")
    else:
        command = write_adapter(cfg, source, folder, target)
        print(f"adapter: {target / 'adapter'}\nvLLM command (also in {target / 'vllm_command.sh'}):\n{command}")
    return target


@hydra.main(version_base="1.3", config_path=str(C.CONF_DIR), config_name="export")
def _main(cfg: DictConfig) -> None:
    C.run_task(export, cfg)


def main() -> None:
    C.forget_sweeps()  # sweep=<name> is this config's key, not the train config's group
    _main()


if __name__ == "__main__":
    main()
    errors.end_process()
