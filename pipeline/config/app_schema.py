"""The schemas of the entry points other than training: ``evaluate``, ``serve``, ``export`` and ``merge``
(their ``conf/<entry>.yaml``). The stages they share with training are in :mod:`pipeline.config.schema`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from omegaconf import MISSING

from pipeline.config.choices import Direction, MergeMethod, ServerEngine, WeightsDtype
from pipeline.config.ranges import SEED, bounded, unbounded
from pipeline.config.schema import (DataConfig, EvaluationConfig, LoggerConfig, ModelConfig, ObjectiveConfig,
                                    PathsConfig, SweepConfig)


@dataclass
class EvaluateConfig:
    """The composed ``evaluate`` config: a finished run, or any model plus an adapter folder."""

    data: DataConfig = MISSING
    model: ModelConfig = MISSING
    evaluation: EvaluationConfig = MISSING
    logger: LoggerConfig = MISSING
    paths: PathsConfig = MISSING
    run: Optional[str] = None  # a run folder: its model, data (same split), adapter
    adapter_path: Optional[str] = None  # an adapter (or full model) folder for `model`
    # The registered method adapter_path was trained with (qlora: the base loads in 4-bit).
    adapter_method: str = "lora"
    seed: int = bounded(42, **SEED)
    task_name: str = "evaluate"
    tags: List[str] = field(default_factory=list)


@dataclass
class ServerConfig:
    """How the OpenAI-compatible server listens, batches and limits requests."""

    # builtin: this package's server (every adapter method, dynamic batching); vllm: vLLM's own
    # OpenAI-compatible server on the same models, names, key and address (LoRA adapters only;
    # see pipeline/scoring/vllm_client.py for its environment). The batching and limit settings below
    # are the built-in engine's; vLLM takes its own from ``vllm_args``.
    engine: ServerEngine = ServerEngine.builtin
    vllm_args: List[str] = field(default_factory=list)  # extra `vllm serve` arguments
    host: str = "127.0.0.1"  # 0.0.0.0 exposes it to the network: set it deliberately
    port: int = bounded(8000, ge=1, le=65535)
    # The API key is read from this environment variable (unset or empty: no key required);
    # ``api_key`` in the config is a fallback for tests. Neither is ever logged.
    api_key_env: str = "PIPELINE_API_KEY"
    api_key: Optional[str] = None
    max_batch_size: int = bounded(8, gt=0)  # rows (prompts x n) generated together
    max_wait_ms: float = bounded(10.0, ge=0)  # how long the first queued request waits for companions
    max_prompt_tokens: int = bounded(1024, gt=0)
    max_tokens_limit: int = bounded(512, gt=0)  # the largest max_tokens a request may ask for
    default_max_tokens: int = bounded(64, gt=0)
    max_n: int = bounded(8, gt=0)
    timeout_graceful_shutdown: Optional[float] = bounded(30.0, ge=0)  # seconds in-flight requests get on shutdown
    log_level: str = "info"


@dataclass
class ServeConfig:
    """The composed ``serve`` config: a run folder, named adapters, or both, on one base."""

    model: ModelConfig = MISSING
    paths: PathsConfig = MISSING
    server: ServerConfig = field(default_factory=ServerConfig)
    run: Optional[str] = None  # a run folder: its base model and its adapter/ or model/
    run_name: str = "tuned"  # the ``model`` name under which ``run`` is served
    # A sweep's name (outputs/sweeps/<name>) or folder: serves its best trial as ``run``, or every
    # Pareto-front trial of a multi-objective sweep as ``trial_<n>`` (from its report.json).
    sweep: Optional[str] = None
    # name -> run folder or adapter folder. Typed Any: Hydra cannot add keys to a typed dict
    # from the command line (`adapters={fr: ...}`); serve.check validates it instead.
    adapters: Any = None
    base_name: Optional[str] = None  # the base model's served name (null: model.name)
    seed: int = bounded(42, **SEED)
    task_name: str = "serve"


@dataclass
class ExportSettings:
    merge: bool = False  # true: one merged safetensors model; false: adapter + vLLM command
    dequantize: bool = False  # merge into a dequantised copy of a 4-bit base (else refused)
    dtype: WeightsDtype = WeightsDtype.float32  # of the merged weights
    output: Optional[str] = None  # the export folder (null: <run>/export/merged or .../vllm)
    lora_name: str = "tuned"  # the model id the export is served under (adapter or merged model)
    overwrite: bool = False


@dataclass
class ExportConfig:
    """The composed ``export`` config: a finished run, or a model plus an adapter folder."""

    model: ModelConfig = MISSING
    paths: PathsConfig = MISSING
    export: ExportSettings = field(default_factory=ExportSettings)
    run: Optional[str] = None
    sweep: Optional[str] = None  # a sweep's name or folder: exports its best trial's run
    adapter_path: Optional[str] = None
    adapter_method: str = "lora"  # the registered method adapter_path was trained with
    seed: int = bounded(42, **SEED)
    task_name: str = "export"


@dataclass
class MergeSettings:
    """How the source adapters combine: PEFT's ``add_weighted_adapter``."""

    method: MergeMethod = MergeMethod.linear
    # One weight per source run; null: 1/n each for the averaging methods, 1.0 each for the TIES
    # family (whose sign election already averages the agreeing weights).
    weights: Optional[List[float]] = unbounded(None, why="a negative weight subtracts a task (task arithmetic)")
    # ties, dare_* and magnitude_prune*: the fraction of each adapter's weights kept.
    density: Optional[float] = bounded(None, gt=0, le=1)
    seed: int = bounded(42, **SEED)  # DARE's random pruning


@dataclass
class MergeConfig:
    """The composed ``merge`` config: the source runs, how they merge, how each is measured."""

    evaluation: EvaluationConfig = MISSING
    logger: LoggerConfig = MISSING
    paths: PathsConfig = MISSING
    merge: MergeSettings = field(default_factory=MergeSettings)
    runs: List[str] = MISSING  # run folders of LoRA adapters trained on the same base
    # What a merge sweep optimises (sweep.objectives overrides it): the share of the sources'
    # validation gain the merge keeps, averaged over them. kept/*/eval/<metric>: one per source.
    objective: ObjectiveConfig = field(default_factory=lambda: ObjectiveConfig("kept/mean/eval/loss",
                                                                               Direction.maximize))
    seed: int = bounded(42, **SEED)
    task_name: str = "merge"
    sweep: Optional[SweepConfig] = None  # set by `merge_sweep=<name>` (sweeps/merge/)
