"""What a server serves and how it starts: the serve settings checked, the base model, the
sources served by name (a run folder, named adapters, or both, on one base), the API key, and
either the built-in app (:mod:`pipeline.server.app`) or the arguments of vLLM's own server."""

from __future__ import annotations

import logging
import os
import re
from typing import List, Optional

from pipeline.adapters.saved import read_run
from pipeline.config.app_schema import ServeConfig, ServerConfig
from pipeline.config.errors import ConfigError
from pipeline.config.schema import ModelConfig
from pipeline.model import loading
from pipeline.scoring import vllm_client
from pipeline.server.app import create_app
from pipeline.server.pool import ModelPool, Source, base_problems, source_from_path

log = logging.getLogger("pipeline.serve")

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def problems(cfg: ServeConfig) -> List[str]:
    """Every problem with the serve settings across fields (each value's own range is its
    schema's), before any model loads."""
    s: ServerConfig = cfg.server
    found = []
    if s.default_max_tokens > s.max_tokens_limit:
        found.append(f"server.default_max_tokens={s.default_max_tokens} must be <= "
                     f"server.max_tokens_limit={s.max_tokens_limit}")
    adapters = cfg.adapters if cfg.adapters is not None else {}
    if not isinstance(adapters, dict) or not all(isinstance(v, str) for v in adapters.values()):
        return found + [f"adapters={cfg.adapters!r} must map names to folders, e.g. "
                        "adapters='{fr: outputs/runs/a, qa: outputs/runs/b}'"]
    names = ([cfg.run_name] if cfg.run else []) + [str(n) for n in adapters]
    for name in names:
        if not NAME.match(str(name)):
            found.append(f"served name {name!r} must be letters, digits and . _ : / - (max 128)")
    if len(set(names)) != len(names):
        found.append(f"served names must be unique: run_name={cfg.run_name!r} is also in adapters")
    if base_name(cfg) in names:
        found.append(f"base_name={base_name(cfg)!r} is also an adapter name; set base_name=<other>")
    return found


def check(cfg: ServeConfig) -> None:
    """Raises :class:`ConfigError` listing :func:`problems`, if any."""
    found = problems(cfg)
    if found:
        raise ConfigError(found)


def base_cfg(cfg: ServeConfig) -> ModelConfig:
    """The base model: the run's (from its config.yaml) when ``run`` is given, else ``model``."""
    return read_run(cfg.run).model if cfg.run else cfg.model


def base_seed(cfg: ServeConfig) -> int:
    """A tiny base model is rebuilt from its seed: the run's, when serving a run."""
    return read_run(cfg.run).data.seed if cfg.run else cfg.seed


def base_name(cfg: ServeConfig) -> str:
    return cfg.base_name or (base_cfg(cfg).name if cfg.run else cfg.model.name)


def sources(cfg: ServeConfig, base: ModelConfig) -> List[Source]:
    found = [source_from_path(cfg.run_name, cfg.run, base, "run")] if cfg.run else []
    return found + [source_from_path(str(name), str(path), base, f"adapters.{name}")
                    for name, path in (cfg.adapters or {}).items()]


def api_key(cfg: ServeConfig) -> Optional[str]:
    """From the environment variable ``server.api_key_env``, else ``server.api_key``."""
    return os.environ.get(cfg.server.api_key_env) or cfg.server.api_key or None


def build_app(cfg: ServeConfig):
    """Loads the models and returns the ASGI app (tests call this, then start uvicorn)."""
    check(cfg)
    base = base_cfg(cfg)
    pool = ModelPool(base, base_name(cfg), sources(cfg, base), cfg.paths.cache_dir, base_seed(cfg))
    return create_app(pool, cfg.server, api_key(cfg))


def vllm_arguments(cfg: ServeConfig) -> List[str]:
    """``vllm serve`` arguments for the same models, names, address and limits; every problem
    vLLM would have with them is raised here, before anything starts.

    Raises:
        VllmError: for adapters vLLM cannot serve (DoRA, IA3, bottleneck, QLoRA), a fully
            fine-tuned run served beside other models, or adapters on different bases.
    """
    check(cfg)
    base = base_cfg(cfg)
    folder = loading.resolve_folder(base, cfg.paths.cache_dir, base_seed(cfg))
    served = sources(cfg, base)
    loras, problems = {}, base_problems(served, folder, cfg.paths.cache_dir, base_seed(cfg))
    for source in served:
        try:
            vllm_client.refuse_quantized(source.name, source.quantization)
            if source.is_adapter:
                vllm_client.lora_rank(source.artifact)
                loras[source.name] = source.artifact
            elif len(served) > 1:
                problems.append(f"{source.name} is a fully fine-tuned model: vLLM serves one model per "
                                "server, so serve it alone (no adapters=)")
        except vllm_client.VllmError as err:
            problems.append(str(err))
    if problems:
        raise vllm_client.VllmError("server.engine=vllm cannot serve this:\n  - " + "\n  - ".join(problems))
    full = [s for s in served if not s.is_adapter]
    if full:  # a fully fine-tuned run: its own folder is the model
        args = vllm_client.serve_arguments(str(full[0].artifact), vllm_client.model_dtype(
            str(full[0].artifact), full[0].model_cfg.dtype), {}, full[0].name)
    else:
        args = vllm_client.serve_arguments(folder, vllm_client.model_dtype(folder, base.dtype), loras,
                                           base_name(cfg))
    s = cfg.server
    return args + ["--host", s.host, "--port", str(s.port),
                   "--uvicorn-log-level", s.log_level, *s.vllm_args]


def exec_vllm(cfg: ServeConfig) -> None:
    """Replaces this process with vLLM's server (signals then reach vLLM directly)."""
    args = vllm_arguments(cfg)
    command = vllm_client.worker_command("serve", *args)
    env = dict(os.environ)
    key = api_key(cfg)
    if key:
        env["VLLM_API_KEY"] = key  # never on the command line, where ps and logs would show it
    log.info("serving through vLLM on http://%s:%d/v1 (API key %s): %s", cfg.server.host, cfg.server.port,
             "required" if key else "not required", vllm_client.shell_command(args))
    warn_if_exposed(cfg.server)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.execve(command[0], command, env)


def warn_if_exposed(server: ServerConfig) -> None:
    if server.host not in LOCAL_HOSTS:
        log.warning("server.host=%s: the server is reachable from other machines", server.host)
