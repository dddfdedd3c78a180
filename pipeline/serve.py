"""Serving entry point: ``python -m pipeline.serve run=<run folder>``,
``python -m pipeline.serve sweep=<sweep name>`` (its best trial, or its Pareto front) or
``python -m pipeline.serve model=... adapters='{fr: <run or adapter folder>, qa: ...}'``.

Loads the base once with every adapter attached by name and serves them behind an
OpenAI-compatible API (plus SageMaker's /ping and /invocations) until interrupted; SIGTERM or
Ctrl-C stops accepting requests and finishes the ones in flight.
"""

from __future__ import annotations

import logging
import os
import re
from typing import List, Optional

import hydra
from omegaconf import DictConfig

from pipeline import config as C
from pipeline.server.pool import ModelPool, Source, base_problems, source_from_path

log = logging.getLogger("pipeline.serve")

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


def check(cfg: C.ServeConfig) -> None:
    """Every problem with the serve settings at once, before any model loads."""
    s: C.ServerConfig = cfg.server
    problems = []
    if not 0 < s.port < 65536:
        problems.append(f"server.port={s.port} must be in 1..65535 (0 is not allowed: clients need to know it)")
    for key in ("max_batch_size", "max_prompt_tokens", "max_tokens_limit", "default_max_tokens", "max_n"):
        if getattr(s, key) <= 0:
            problems.append(f"server.{key}={getattr(s, key)} must be > 0")
    if s.default_max_tokens > s.max_tokens_limit:
        problems.append(f"server.default_max_tokens={s.default_max_tokens} must be <= "
                        f"server.max_tokens_limit={s.max_tokens_limit}")
    if s.max_wait_ms < 0:
        problems.append(f"server.max_wait_ms={s.max_wait_ms} must be >= 0")
    adapters = cfg.adapters if cfg.adapters is not None else {}
    if not isinstance(adapters, (dict, DictConfig)) or not all(isinstance(v, str) for v in adapters.values()):
        raise C.ConfigError([f"adapters={cfg.adapters!r} must map names to folders, e.g. "
                             "adapters='{fr: outputs/runs/a, qa: outputs/runs/b}'"])
    names = ([cfg.run_name] if cfg.run else []) + [str(n) for n in adapters]
    for name in names:
        if not NAME.match(str(name)):
            problems.append(f"served name {name!r} must be letters, digits and . _ : / - (max 128)")
    if len(set(names)) != len(names):
        problems.append(f"served names must be unique: run_name={cfg.run_name!r} is also in adapters")
    if base_name(cfg) in names:
        problems.append(f"base_name={base_name(cfg)!r} is also an adapter name; set base_name=<other>")
    if problems:
        raise C.ConfigError(problems)


def resolve_sweep(cfg: C.ServeConfig) -> None:
    """``sweep=<name>``: its best trial becomes ``run``; a multi-objective sweep's Pareto-front
    trials are each served as ``trial_<n>`` (the first as ``run``: the base comes from its config)."""
    if not cfg.sweep:
        return
    from pipeline.sweep_report import best_runs

    if cfg.run or cfg.adapters:
        raise C.ConfigError([f"sweep={cfg.sweep} chooses the runs to serve: drop run= and adapters="])
    runs, multi = best_runs(cfg.sweep, cfg.paths.output_dir)
    first, *rest = runs
    cfg.run = runs[first]
    if multi:
        cfg.run_name = f"trial_{first}"
        cfg.adapters = {f"trial_{n}": runs[n] for n in rest} or None
    log.info("sweep %s: serving %s", cfg.sweep, ", ".join(f"trial {n} ({runs[n]})" for n in runs))


def base_cfg(cfg: C.ServeConfig) -> C.ModelConfig:
    """The base model: the run's (from its config.yaml) when ``run`` is given, else ``model``."""
    if cfg.run:
        from pipeline.runfolder import read_run

        return read_run(cfg.run)[1]
    return cfg.model


def base_seed(cfg: C.ServeConfig) -> int:
    """A tiny base model is rebuilt from its seed: the run's, when serving a run."""
    if cfg.run:
        from pipeline.runfolder import read_run

        return read_run(cfg.run)[0].seed
    return cfg.seed


def base_name(cfg: C.ServeConfig) -> str:
    return cfg.base_name or (base_cfg(cfg).name if cfg.run else cfg.model.name)


def sources(cfg: C.ServeConfig, base: C.ModelConfig) -> List[Source]:
    found = [source_from_path(cfg.run_name, cfg.run, base, "run")] if cfg.run else []
    return found + [source_from_path(str(name), str(path), base, f"adapters.{name}")
                    for name, path in (cfg.adapters or {}).items()]


def api_key(cfg: C.ServeConfig) -> Optional[str]:
    """From the environment variable ``server.api_key_env``, else ``server.api_key``."""
    return os.environ.get(cfg.server.api_key_env) or cfg.server.api_key or None


def build_app(cfg: DictConfig | C.ServeConfig):
    """Loads the models and returns the ASGI app (tests call this, then start uvicorn)."""
    try:
        from pipeline.server.app import create_app
    except ImportError as err:
        raise C.PipelineError(f"serving needs FastAPI and uvicorn ({err}): pip install fastapi uvicorn") from err

    cfg = C.typed_config(cfg)
    resolve_sweep(cfg)
    check(cfg)
    base = base_cfg(cfg)
    pool = ModelPool(base, base_name(cfg), sources(cfg, base), cfg.paths.cache_dir, base_seed(cfg))
    return create_app(pool, cfg.server, api_key(cfg))


def vllm_arguments(cfg: DictConfig | C.ServeConfig) -> List[str]:
    """``vllm serve`` arguments for the same models, names, address and limits; every problem
    vLLM would have with them is raised here, before anything starts.

    Raises:
        VllmError: for adapters vLLM cannot serve (DoRA, IA3, bottleneck, QLoRA), a fully
            fine-tuned run served beside other models, or adapters on different bases.
    """
    from pipeline import model as models
    from pipeline import vllm_engine

    cfg = C.typed_config(cfg)
    resolve_sweep(cfg)
    check(cfg)
    base = base_cfg(cfg)
    folder = models.resolve_folder(base, cfg.paths.cache_dir, base_seed(cfg))
    served = sources(cfg, base)
    loras, problems = {}, base_problems(served, folder, cfg.paths.cache_dir, base_seed(cfg))
    for source in served:
        try:
            vllm_engine.refuse_quantized(source.name, source.quantization)
            if source.is_adapter:
                vllm_engine.lora_rank(source.artifact)
                loras[source.name] = source.artifact
            elif len(served) > 1:
                problems.append(f"{source.name} is a fully fine-tuned model: vLLM serves one model per "
                                "server, so serve it alone (no adapters=)")
        except vllm_engine.VllmError as err:
            problems.append(str(err))
    if problems:
        raise vllm_engine.VllmError("server.engine=vllm cannot serve this:\n  - " + "\n  - ".join(problems))
    full = [s for s in served if not s.is_adapter]
    if full:  # a fully fine-tuned run: its own folder is the model
        args = vllm_engine.serve_arguments(str(full[0].artifact), vllm_engine.model_dtype(
            str(full[0].artifact), full[0].model_cfg.dtype), {}, full[0].name)
    else:
        args = vllm_engine.serve_arguments(folder, vllm_engine.model_dtype(folder, base.dtype), loras,
                                           base_name(cfg))
    s = cfg.server
    return args + ["--host", s.host, "--port", str(s.port),
                   "--uvicorn-log-level", s.log_level, *s.vllm_args]


def serve_with_vllm(cfg: C.ServeConfig) -> None:
    """Replaces this process with vLLM's server (signals then reach vLLM directly)."""
    from pipeline import vllm_engine

    args = vllm_arguments(cfg)
    command = vllm_engine.worker_command("serve", *args)
    env = dict(os.environ)
    key = api_key(cfg)
    if key:
        env["VLLM_API_KEY"] = key  # never on the command line, where ps and logs would show it
    log.info("serving through vLLM on http://%s:%d/v1 (API key %s): %s", cfg.server.host, cfg.server.port,
             "required" if key else "not required", vllm_engine.shell_command(args))
    if cfg.server.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("server.host=%s: the server is reachable from other machines", cfg.server.host)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.execve(command[0], command, env)


def serve(cfg: DictConfig) -> None:
    """Serves until interrupted."""
    import uvicorn

    cfg = C.typed_config(cfg)
    if cfg.server.engine == "vllm":
        return serve_with_vllm(cfg)
    app = build_app(cfg)
    s = cfg.server
    log.info("serving %s on http://%s:%d/v1 (API key %s)", ", ".join(app.state.service.pool.choices),
             s.host, s.port, "required" if api_key(cfg) else "not required")
    if s.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("server.host=%s: the server is reachable from other machines", s.host)
    uvicorn.run(app, host=s.host, port=s.port, log_level=s.log_level,
                timeout_graceful_shutdown=s.timeout_graceful_shutdown)


@hydra.main(version_base="1.3", config_path=str(C.CONF_DIR), config_name="serve")
def _main(cfg: DictConfig) -> None:
    return C.run_task(serve, cfg)


def main() -> None:
    C.forget_sweeps()  # sweep=<name> is this config's key, not the train config's group
    _main()


if __name__ == "__main__":
    main()
