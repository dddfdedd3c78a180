"""Serving entry point: ``python -m pipeline.serve run=<run folder>``,
``python -m pipeline.serve sweep=<sweep name>`` (its best trial, or its Pareto front) or
``python -m pipeline.serve model=... adapters='{fr: <run or adapter folder>, qa: ...}'``.

Loads the base once with every adapter attached by name and serves them behind an
OpenAI-compatible API (plus SageMaker's /ping and /invocations) until interrupted; SIGTERM or
Ctrl-C stops accepting requests and finishes the ones in flight. ``server.engine=vllm`` hands the
same models, names, key and address to vLLM's own server instead (:mod:`pipeline.server.plan`).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, List

import hydra
import uvicorn
from omegaconf import DictConfig

from pipeline.commands import runner, store
from pipeline.commands.compose import typed_config
from pipeline.config.app_schema import ServeConfig
from pipeline.config.errors import ConfigError
from pipeline.config.options import CONF_DIR
from pipeline.server import plan
from pipeline.study.summary import best_runs

log = logging.getLogger("pipeline.serve")


def with_sweep(cfg: ServeConfig) -> ServeConfig:
    """``sweep=<name>``: its best trial becomes ``run``; a multi-objective sweep's Pareto-front
    trials are each served as ``trial_<n>`` (the first as ``run``: the base comes from its config)."""
    if not cfg.sweep:
        return cfg
    if cfg.run or cfg.adapters:
        raise ConfigError([f"sweep={cfg.sweep} chooses the runs to serve: drop run= and adapters="])
    runs, multi = best_runs(cfg.sweep, cfg.paths.output_dir)
    first, *rest = runs
    log.info("sweep %s: serving %s", cfg.sweep, ", ".join(f"trial {n} ({runs[n]})" for n in runs))
    if not multi:
        return dataclasses.replace(cfg, run=runs[first])
    return dataclasses.replace(cfg, run=runs[first], run_name=f"trial_{first}",
                               adapters={f"trial_{n}": runs[n] for n in rest} or None)


def build_app(cfg: DictConfig) -> Any:
    """The ASGI app for a composed ``serve`` config, its models loaded (tests start it with
    uvicorn themselves)."""
    return plan.build_app(with_sweep(typed_config(cfg, plan.problems)))


def vllm_arguments(cfg: DictConfig) -> List[str]:
    """The ``vllm serve`` arguments for a composed ``serve`` config (see :func:`plan.vllm_arguments`)."""
    return plan.vllm_arguments(with_sweep(typed_config(cfg, plan.problems)))


def serve(cfg: DictConfig) -> None:
    """Serves until interrupted."""
    config = with_sweep(typed_config(cfg, plan.problems))
    if config.server.engine == "vllm":
        return plan.exec_vllm(config)
    app = plan.build_app(config)
    s = config.server
    log.info("serving %s on http://%s:%d/v1 (API key %s)", ", ".join(app.state.service.pool.choices),
             s.host, s.port, "required" if plan.api_key(config) else "not required")
    plan.warn_if_exposed(s)
    uvicorn.run(app, host=s.host, port=s.port, log_level=s.log_level,
                timeout_graceful_shutdown=s.timeout_graceful_shutdown)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="serve")
def _main(cfg: DictConfig) -> None:
    return runner.main(serve, cfg)


def main() -> None:
    store.forget_sweeps()  # sweep=<name> is this config's key, not the train config's group
    _main()


if __name__ == "__main__":
    main()
