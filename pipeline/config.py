"""Typed config schemas, their registration in Hydra's ConfigStore, and cross-field checks.

Every config group has a dataclass schema here; the YAML options under ``conf/`` extend them
(``defaults: [/schema/<group>/<name>@_here_]``), so a typo or a wrong type fails at composition
and names the key. Rules that involve several fields run in :func:`validate` before any weights
load, and report every problem at once.

This module imports no torch/transformers at import time: composing a config must stay fast.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from pipeline.adapters import ADAPTERS, AdapterSettings
from pipeline.precision import PRECISIONS

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
SWEEPS_DIR = Path(__file__).resolve().parent.parent / "sweeps"  # the `sweep` config group


class PipelineError(Exception):
    """An error in the user's input (config, data, model choice) or in the run itself that the
    message fully explains: the CLI prints it without a traceback."""


def run_task(task: Any, cfg: DictConfig) -> Any:
    """Runs an entry point's task. A :class:`PipelineError` ends a single run with its message
    on stderr and exit code 1: the message says what is wrong and how to fix it, and a traceback
    would bury it. In a multirun it propagates, for the sweeper to record and go on."""
    import sys

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        return task(cfg)
    except Interrupted as err:  # in a multirun too: the whole process is being stopped
        print(f"interrupted: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except PipelineError as err:
        if HydraConfig.get().mode != RunMode.RUN:
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


class Interrupted(Exception):
    """The run stopped early on request (a preemption signal) and can be resumed; the CLI
    exits with ``exit_code`` (see ``preemption.exit_code``)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class ConfigError(PipelineError, ValueError):
    """A configuration that cannot run; the message lists every problem found."""

    def __init__(self, problems: List[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} configuration problem(s):\n{lines}")


# --------------------------------------------------------------------------- data


@dataclass
class MixSource:
    """Another source mixed into the training examples (``data.mix``): a data option, with the
    settings in which it differs, and how many of its training examples join, as a count
    (``examples``) or as a fraction of the main source's training examples (``fraction``)."""

    data: str = MISSING  # a data option: conf/data/<name>.yaml
    overrides: Dict[str, Any] = field(default_factory=dict)  # e.g. {path: other.jsonl, format: sharegpt}
    examples: Optional[int] = None
    fraction: Optional[float] = None


@dataclass
class DataConfig:
    """Where the examples come from and how they become token ids.

    ``path`` is a local file (.jsonl/.json/.csv/.parquet), a folder of such files, or a
    Hugging Face hub dataset id. ``format`` says how records map to a conversation.
    """

    name: str = MISSING
    path: str = MISSING
    format: str = "auto"  # auto | prompt_completion | instruction | messages | sharegpt
    subset: Optional[str] = None  # hub dataset configuration name
    source_split: str = "train"  # split read from the source before our own split
    # Held-out sets as the user has them, used as they are (never re-split; only capped by
    # max_validation_examples / max_test_examples): local files or folders ...
    validation_path: Optional[str] = None
    test_path: Optional[str] = None
    # ... or, for a hub dataset (or a folder of train/validation/test files), its named splits,
    # e.g. {train: train, validation: validation, test: test}. Typed Any: Hydra cannot add keys
    # to a typed dict from the command line (data.splits='{...}'); _check_data validates it.
    splits: Any = None
    revision: Optional[str] = None
    # Field names, so that datasets with other column names need no conversion.
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    instruction_field: str = "instruction"
    input_field: str = "input"
    output_field: str = "output"
    messages_field: str = "messages"
    # ShareGPT: a list of {from, value} turns; `from` is mapped to a chat role by sharegpt_roles.
    conversations_field: str = "conversations"
    sharegpt_roles: Dict[str, str] = field(default_factory=lambda: {
        "system": "system", "human": "user", "user": "user", "gpt": "assistant",
        "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant", "bing": "assistant"})
    # Which assistant turns of a multi-turn conversation carry loss: all | last.
    train_on: str = "all"
    # Examples of validation/test whose conversation (exact) or prompt (normalised: case,
    # whitespace and punctuation ignored) also occurs in train are counted and reported
    # (run.json data_overlap); dedup=true removes those train examples.
    dedup: bool = False
    # Reuse tokenized splits across runs with the same data, settings and tokenizer
    # (paths.data_cache_dir): a sweep tokenizes once.
    cache: bool = True
    system_prompt: Optional[str] = None
    template: str = "chat"  # chat: the tokenizer's chat template | plain: prompt + completion + eos
    max_length: int = 256
    truncation: str = "drop"  # drop | truncate | error: what to do with longer examples
    validation_size: float = 0.1  # fraction (< 1) or count (>= 1) of examples
    test_size: float = 0.1
    # A fraction of a large file is more than evaluation needs (every validation example is
    # scored at each trainer.eval_steps): fractions are capped at these counts, and the rest
    # trains. Counts given as validation_size/test_size are kept as they are. null: no cap.
    max_validation_examples: Optional[int] = 200
    max_test_examples: Optional[int] = 300
    max_examples: Optional[int] = None  # cap before splitting (debug, quick experiments)
    packing: bool = False  # padding-free batches (position ids restart per example)
    pack_length: int = 512  # packing: the token budget of one packed row (>= max_length)
    # Other sources mixed into train (never into validation/test), e.g. some general chat data
    # against forgetting: [{data: chatterbot_qa, fraction: 0.2}]. Each source's own training
    # split is sampled (seeded), so its held-out examples stay unseen; counts land in run.json.
    mix: List[MixSource] = field(default_factory=list)
    # The split's seed (and a tiny model's initialisation). Fixed rather than ${seed}: the runs
    # of a multirun over seeds then train on the same split and are evaluated on the same
    # examples, so they compare example by example and share one base measurement.
    seed: int = 42


# --------------------------------------------------------------------------- model


@dataclass
class TinyModelConfig:
    """A randomly initialised model built from a config (tests, ``debug=fast``)."""

    architecture: str = "llama"  # llama | gpt2
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 1024


@dataclass
class ModelConfig:
    """Base model: hub id or local folder, a packaged GGUF file, or a tiny random model.

    ``source``: ``hub`` loads ``path`` (hub id or local folder) with ``from_pretrained``;
    ``gguf`` converts ``gguf_file`` from the installed package ``gguf_package`` once into a
    cached Hugging Face folder; ``tiny`` builds ``tiny`` with the tokenizer of ``tokenizer``.
    """

    name: str = MISSING
    source: str = "hub"  # hub | gguf | tiny
    path: Optional[str] = None
    revision: Optional[str] = None
    gguf_package: Optional[str] = None
    gguf_file: Optional[str] = None
    tokenizer: Optional[str] = None  # model config name or folder whose tokenizer a tiny model uses
    tiny: Optional[TinyModelConfig] = None
    dtype: str = "float32"  # float32 | bfloat16 | float16 | auto
    attn_implementation: Optional[str] = "sdpa"  # sdpa | eager | flash_attention_2 | null
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False


# --------------------------------------------------------------------------- trainer


@dataclass
class TrainerConfig:
    """The knobs of transformers' ``TrainingArguments`` this pipeline exposes by name.

    Anything else ``TrainingArguments`` accepts goes in ``extra`` (checked against its fields).
    """

    max_steps: int = -1
    num_train_epochs: float = 1.0
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4
    # A lookup table for experiments that vary the method, used by interpolation:
    # learning_rate: ${trainer.learning_rate_per_method.${adapter.method}}
    learning_rate_per_method: Dict[str, float] = field(default_factory=dict)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    lr_scheduler_type: str = "cosine"
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch"
    # auto: bf16 autocast where the device multiplies bf16 natively (AVX512-bf16/AMX CPUs,
    # Ampere+ GPUs), else fp32; see pipeline/precision.py. fp32 | bf16 | fp16 force one.
    precision: str = "auto"
    logging_steps: int = 10
    eval_steps: Optional[int] = 50  # null: evaluate only at the end
    # Evaluations during training (every eval_steps: the loss curve, pruning, best checkpoint)
    # score the first eval_examples validation examples, a fixed slice; null: all of them. The
    # base and tuned measurements always use the whole validation split.
    eval_examples: Optional[int] = None
    save_steps: Optional[int] = 100  # null: no intermediate checkpoints
    save_total_limit: Optional[int] = 2
    sampling: str = "random"  # random | group_by_length (less padding) | sequential
    dataloader_num_workers: int = 0
    nan_policy: str = "stop"  # stop | skip: what a non-finite loss does
    extra: Dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- evaluation


@dataclass
class DecodingConfig:
    """How both the base and the tuned model generate (the same for both)."""

    strategy: str = "greedy"  # greedy | sample | beam
    max_new_tokens: int = 48
    temperature: float = 1.0  # sample only
    top_p: float = 1.0  # sample only
    num_beams: int = 4  # beam only
    stop_strings: List[str] = field(default_factory=list)
    seed: int = "${seed}"  # type: ignore[assignment]


@dataclass
class EvaluationConfig:
    """Generation metrics on held-out prompts, base model vs tuned model.

    ``metrics`` are names from :data:`pipeline.metrics.METRICS` (or ``evaluate:<name>`` for a
    metric loaded by ``evaluate.load``); an empty list evaluates loss and perplexity only.
    """

    task: str = "generation"  # generation | qa | classification | perplexity (documentation)
    splits: List[str] = field(default_factory=lambda: ["test"])  # eval (validation) and/or test
    extra_datasets: List[str] = field(default_factory=list)  # data options, evaluated on their test split
    max_examples: Optional[int] = 100  # per set
    batch_size: int = 16
    # Loss and perplexity under bf16 autocast (auto: where the hardware multiplies bf16
    # natively; about 3x faster on an AVX512-bf16 CPU, losses moved by up to ~0.5%) or fp32.
    # Generation always runs in the model's own dtype. The choice is in run.json.
    loss_precision: str = "auto"  # auto | fp32 | bf16
    metrics: List[str] = field(default_factory=list)
    labels: Optional[List[str]] = None  # classification: the label set outputs are parsed into
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    # Generation metrics at every trainer evaluation (trainer.eval_steps) on the first
    # `during_training_examples` validation examples, logged as eval/<metric>: lets sweeps
    # optimise and prune on BLEU/ROUGE, not only loss. Off by default: generation is slow.
    during_training: bool = False
    during_training_examples: int = 16
    # Reuse the base model's measurement across runs that share its fingerprint (same base,
    # quantisation, tokenizer, examples, decoding and metrics): pipeline/base_cache.py.
    cache_base: bool = True


# --------------------------------------------------------------------------- logger / paths


@dataclass
class WandbConfig:
    project: str = "pipeline"
    entity: Optional[str] = None
    group: Optional[str] = None
    name: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    job_type: str = "train"
    mode: str = "offline"  # offline | online | disabled


@dataclass
class LoggerConfig:
    wandb: Optional[WandbConfig] = None


@dataclass
class PathsConfig:
    root_dir: str = MISSING
    output_dir: str = MISSING
    cache_dir: str = MISSING
    run_dir: str = MISSING
    # Base-model measurements shared by the runs of sweeps and multiruns (pipeline/base_cache.py).
    base_cache_dir: str = "${paths.cache_dir}/base_measurements"
    # Tokenized splits shared alike (pipeline/data_cache.py; data.cache=false opts out).
    data_cache_dir: str = "${paths.cache_dir}/tokenized"


# --------------------------------------------------------------------------- distributed


@dataclass
class DistributedConfig:
    """How many processes train and how DeepSpeed ZeRO shards them (``distributed`` group).

    ``strategy``: ``single`` (one process), ``ddp`` (torch DistributedDataParallel through the
    Trainer) or ``deepspeed`` (ZeRO ``zero_stage`` 1-3, optionally offloading optimizer states
    and, at stage 3, parameters to CPU memory). With ``nproc_per_node > 1`` outside a launcher,
    ``python -m pipeline.train`` starts the workers itself (torch's elastic launcher); under
    torchrun or srun it joins the processes already started.
    """

    strategy: str = "single"  # single | ddp | deepspeed
    nproc_per_node: int = 1
    nnodes: int = 1  # nodes of a SLURM job (the memory estimate shards over nnodes x nproc_per_node)
    zero_stage: int = 0  # deepspeed only: 1 | 2 | 3
    offload_optimizer: bool = False  # optimizer states in CPU memory (DeepSpeedCPUAdam, compiles once)
    offload_params: bool = False  # stage 3: parameters in CPU memory too
    # ZeRO-3: build the model already sharded (deepspeed.zero.Init) instead of whole on every
    # rank's CPU memory; required for a quantized base under ZeRO-3 (the base model is then
    # gathered whole once, for its evaluation before training).
    zero_init: bool = False
    # ZeRO-3: gather the full 16-bit weights when saving, else the saved adapter/model is empty.
    gather_16bit_weights_on_save: bool = True
    backend: Optional[str] = None  # null: nccl on CUDA, gloo on CPU
    master_port: int = 29500  # rendezvous port of a self-launched single-node run
    # Anything else DeepSpeed's JSON accepts, merged over the generated config.
    deepspeed_extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class PreemptionConfig:
    """What a preemption signal during training does: finish the step, save a checkpoint,
    mark the run ``interrupted``, exit with ``exit_code``; ``resume=auto`` continues it."""

    signals: List[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    # null: 128 + the signal number (143 SIGTERM, 138 SIGUSR1), as a shell reports a job killed
    # by it; set it to the code your cluster requeues on (slurm.conf RequeueExit).
    exit_code: Optional[int] = None
    # Under SLURM (SLURM_JOB_ID set), on SIGUSR1 (`sbatch --signal=USR1@<seconds>` before the
    # time limit) run `scontrol requeue $SLURM_JOB_ID`. SIGTERM is left to SLURM: it comes
    # from scancel, or from a preemption that SLURM requeues itself (PreemptMode=REQUEUE).
    requeue: bool = True


@dataclass
class ObjectiveConfig:
    metric: str = "tuned/eval/loss"
    direction: str = "minimize"  # minimize | maximize


# --------------------------------------------------------------------------- sweeps


@dataclass
class SweepParam:
    """One dimension of a sweep's search space (see sweeps/README.md).

    ``type``: float | int (``low``, ``high``, optional ``log``/``step``) or categorical
    (``choices``). ``times``: the sampled value is a multiple of this earlier key's value
    (e.g. alpha as a multiple of rank); the Optuna parameter is then named ``<key>/<times>``.
    """

    type: str = MISSING  # float | int | categorical
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    step: Optional[float] = None
    choices: Optional[List[Any]] = None
    times: Optional[str] = None


@dataclass
class SweepConfig:
    """An Optuna study driven by ``python -m pipeline.train -m sweep=<name>``.

    ``objectives`` empty: the run's ``objective`` (single objective). ``sampler``/``pruner``:
    ``_target_`` an Optuna class plus its arguments; ``pruner`` may also name a preset of
    ``pipeline.sweep.PRUNERS`` (asha, hyperband, median); ``pruner: null`` never prunes.
    ``storage`` null: SQLite ``study.db`` in the sweep folder. ``trial`` is set by the
    sweeper on each job (the trial the job belongs to); never set it by hand.
    """

    name: str = MISSING  # the study name and the sweep folder's name
    params: Dict[str, SweepParam] = field(default_factory=dict)
    objectives: List[ObjectiveConfig] = field(default_factory=list)
    sampler: Optional[Dict[str, Any]] = None
    pruner: Any = None  # a preset name, {_target_: ..., ...} or null
    n_trials: int = 20  # trials the study should hold (earlier sessions and other workers count)
    n_jobs: int = 1  # trials launched together (in parallel with a parallel launcher)
    storage: Optional[str] = None  # an Optuna RDB URL (sqlite:///..., postgresql://...)
    max_failures: int = 3  # failed trials in the study after which the sweep stops
    heartbeat_s: int = 60  # trials of a killed worker fail after 2 heartbeats without news
    # Wall-clock budget of the study in minutes (null: none): no new trial starts once it is
    # spent; trials in flight finish. Kept in the storage, so a resumed sweep continues it.
    timeout_min: Optional[float] = None
    # Per-device memory limit in GiB (null: none): a sampled configuration whose model states
    # (pipeline.estimate) exceed it is recorded as pruned, with the estimate, and never starts.
    max_memory_gb: Optional[float] = None
    trial: Optional[int] = None


# --------------------------------------------------------------------------- top level


@dataclass
class TrainConfig:
    """The composed ``train`` config. ``adapter`` is typed by its own group schema."""

    data: DataConfig = MISSING
    model: ModelConfig = MISSING
    adapter: Any = MISSING
    trainer: TrainerConfig = MISSING
    logger: LoggerConfig = MISSING
    paths: PathsConfig = MISSING
    evaluation: EvaluationConfig = MISSING
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    preemption: PreemptionConfig = field(default_factory=PreemptionConfig)
    seed: int = 42
    resume: str = "never"  # never | auto | path to a run folder or checkpoint
    task_name: str = "train"
    tags: List[str] = field(default_factory=list)
    sweep: Optional[SweepConfig] = None  # set by `sweep=<name>` (sweeps/)


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
    seed: int = 42
    task_name: str = "evaluate"
    tags: List[str] = field(default_factory=list)


@dataclass
class ServerConfig:
    """How the OpenAI-compatible server listens, batches and limits requests."""

    host: str = "127.0.0.1"  # 0.0.0.0 exposes it to the network: set it deliberately
    port: int = 8000
    # The API key is read from this environment variable (unset or empty: no key required);
    # ``api_key`` in the config is a fallback for tests. Neither is ever logged.
    api_key_env: str = "PIPELINE_API_KEY"
    api_key: Optional[str] = None
    max_batch_size: int = 8  # rows (prompts x n) generated together
    max_wait_ms: float = 10.0  # how long the first queued request waits for companions
    max_prompt_tokens: int = 1024
    max_tokens_limit: int = 512  # the largest max_tokens a request may ask for
    default_max_tokens: int = 64
    max_n: int = 8
    timeout_graceful_shutdown: Optional[float] = 30.0  # seconds in-flight requests get on shutdown
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
    seed: int = 42
    task_name: str = "serve"


@dataclass
class ExportSettings:
    merge: bool = False  # true: one merged safetensors model; false: adapter + vLLM command
    dequantize: bool = False  # merge into a dequantised copy of a 4-bit base (else refused)
    dtype: str = "float32"  # float32 | bfloat16 | float16: dtype of the merged weights
    output: Optional[str] = None  # the export folder (null: <run>/export/merged or .../vllm)
    lora_name: str = "tuned"  # the name vLLM serves the adapter under
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
    seed: int = 42
    task_name: str = "export"


SCHEMAS: Dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "trainer": TrainerConfig,
    "logger": LoggerConfig,
    "paths": PathsConfig,
    "evaluation": EvaluationConfig,
    "distributed": DistributedConfig,
}


def register_configs() -> None:
    """Stores every schema in Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="evaluate_schema", node=EvaluateConfig)
    cs.store(name="serve_schema", node=ServeConfig)
    cs.store(name="export_schema", node=ExportConfig)
    for group, schema in SCHEMAS.items():
        cs.store(group=f"schema/{group}", name="base", node=schema)
    for name, settings in ADAPTERS.items():
        cs.store(group="schema/adapter", name=name, node=settings)
    register_sweeps(cs)
    expose_sweeper_plugin()


def expose_sweeper_plugin() -> None:
    """Lets Hydra find our sweeper however the project is installed.

    Hydra discovers plugins by listing the ``hydra_plugins`` namespace package's folders; an
    editable install by setuptools >= 64 serves ours through an import hook that this listing
    cannot see (hydra issues 2359, 3252), so the sweeper would be missing outside the repository
    root. Adding the folder to the namespace path is what a plain install amounts to.
    """
    try:
        import hydra_plugins
    except ImportError:  # no plugin installed at all; ours is then found from the repository root
        return
    folder = str(SWEEPS_DIR.parent / "hydra_plugins")
    if Path(folder).is_dir() and folder not in list(hydra_plugins.__path__):
        hydra_plugins.__path__.append(folder)


def register_sweeps(cs: ConfigStore) -> None:
    """Makes each ``sweeps/<name>.yaml`` the option ``sweep=<name>`` (package ``_global_``).

    The files live beside ``conf/`` rather than in it so that a sweep reads as a project asset
    of its own; storing them here finds them from any working directory.
    """
    for path in sorted(SWEEPS_DIR.glob("*.yaml")):
        try:
            node = OmegaConf.load(path)
        except Exception as err:  # a YAML error would otherwise surface without the file name
            raise ConfigError([f"{path}: {err}"]) from err
        cs.store(group="sweep", name=path.stem, node=node, package="_global_", provider="sweeps")


def forget_sweeps() -> None:
    """Drops the ``sweep`` config group, for entry points (serve, export) whose own ``sweep``
    key names a finished sweep: Hydra reads ``sweep=<name>`` as a group choice while the group
    exists, and these configs have no such group."""
    ConfigStore.instance().repo.pop("sweep", None)


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
register_configs()


# --------------------------------------------------------------------------- cross-field checks

CHOICES = {
    "data.format": ("auto", "prompt_completion", "instruction", "messages", "sharegpt"),
    "data.train_on": ("all", "last"),
    "data.template": ("chat", "plain"),
    "data.truncation": ("drop", "truncate", "error"),
    "model.source": ("hub", "gguf", "tiny"),
    "model.dtype": ("float32", "bfloat16", "float16", "auto"),
    "trainer.precision": PRECISIONS,
    "trainer.nan_policy": ("stop", "skip"),
    "trainer.sampling": ("random", "group_by_length", "sequential"),
    "objective.direction": ("minimize", "maximize"),
    "evaluation.task": ("generation", "qa", "classification", "perplexity"),
    "evaluation.decoding.strategy": ("greedy", "sample", "beam"),
}


def _get(cfg: DictConfig, dotted: str) -> Any:
    return OmegaConf.select(cfg, dotted, throw_on_missing=False)


def _check_choices(cfg: DictConfig) -> List[str]:
    problems = []
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            problems.append(f"{key}={value!r} is not one of {', '.join(allowed)}")
    return problems


def _check_unknown_adapter_keys(cfg: DictConfig) -> List[str]:
    """Keys added with ``+adapter.x=`` (or by an overlay) that the chosen method does not have."""
    method = cfg.adapter.method
    if method not in ADAPTERS:
        return [f"adapter.method={method!r} is unknown; choose one of: {', '.join(sorted(ADAPTERS))}"]
    known = {f.name for f in dataclasses.fields(ADAPTERS[method])}
    problems = []
    for key in cfg.adapter.keys():
        if key not in known:
            owners = sorted(n for n, m in ADAPTERS.items()
                            if key in {f.name for f in dataclasses.fields(m)})
            hint = f"; it belongs to adapter={'/'.join(owners)}" if owners else ""
            problems.append(f"adapter.{key}={cfg.adapter[key]!r} is not a setting of "
                            f"adapter={method}: remove it{hint}")
    return problems


LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")  # the loaders of pipeline.data.LOADERS


def _check_data(data: DataConfig) -> List[str]:
    problems = []
    if data.max_length < 8:
        problems.append(f"data.max_length={data.max_length} must be >= 8")
    for key in ("validation_size", "test_size"):
        value = getattr(data, key)
        if not value >= 0:
            problems.append(f"data.{key}={value} must be >= 0 (a fraction < 1 or a count)")
    fractions = [v for v in (data.validation_size, data.test_size) if v < 1]
    if sum(fractions) >= 1:
        problems.append(f"data.validation_size + data.test_size = {sum(fractions)} leaves no "
                        "training examples; make them smaller")
    if data.packing and data.pack_length < data.max_length:
        problems.append(f"data.pack_length={data.pack_length} must be >= data.max_length="
                        f"{data.max_length} (every example must fit in a packed row); raise it")
    for key in ("max_examples", "max_validation_examples", "max_test_examples"):
        value = getattr(data, key)
        if value is not None and value <= 0:
            problems.append(f"data.{key}={value} must be > 0 or null")
    if data.template == "plain" and data.format == "messages":
        problems.append("data.format=messages needs data.template=chat (a chat template renders "
                        "the turns); use data.template=chat")
    if data.splits is not None and (not isinstance(data.splits, (dict, DictConfig)) or not all(
            k in ("train", "validation", "test") and isinstance(v, str) for k, v in data.splits.items())):
        problems.append(f"data.splits={data.splits!r} must map train/validation/test to source split "
                        "names, e.g. data.splits='{train: train, validation: validation, test: test}'")
    for i, source in enumerate(data.mix):
        if (source.examples is None) == (source.fraction is None):
            problems.append(f"data.mix[{i}] ({source.data}) needs examples (a count) or fraction (of the "
                            "main training examples), one of them")
        elif not (source.examples or 0) >= 0 or not (source.fraction or 0) >= 0:
            problems.append(f"data.mix[{i}] ({source.data}): examples and fraction must be >= 0")
        if not (CONF_DIR / "data" / f"{source.data}.yaml").exists():
            options = sorted(p.stem for p in (CONF_DIR / "data").glob("*.yaml"))
            problems.append(f"data.mix[{i}].data={source.data!r} is not a data option; available: {', '.join(options)}")
    path = data.path
    looks_local = path.startswith(("/", ".", "~")) or Path(path).suffix in LOCAL_SUFFIXES
    if looks_local and not Path(os.path.expanduser(path)).exists():
        problems.append(f"data.path={path!r} does not exist")
    return problems



def _check_model(model: ModelConfig) -> List[str]:
    problems = []
    if model.source == "hub" and not model.path:
        problems.append("model.path is required with model.source=hub (a hub id or a local folder)")
    elif model.source == "hub" and model.path.startswith(("/", ".", "~")) \
            and not Path(os.path.expanduser(model.path)).is_dir():
        problems.append(f"model.path={model.path!r} is not an existing folder (a local path; "
                        "a hub id looks like org/name)")
    if model.source == "gguf" and not (model.gguf_package and model.gguf_file):
        problems.append("model.gguf_package and model.gguf_file are required with model.source=gguf")
    if model.source == "tiny":
        if model.tiny is None:
            problems.append("model.tiny must describe the architecture with model.source=tiny")
        elif model.tiny.architecture not in ("llama", "gpt2"):
            problems.append(f"model.tiny.architecture={model.tiny.architecture!r} is not one of llama, gpt2")
        if not model.tokenizer:
            problems.append("model.tokenizer is required with model.source=tiny (whose tokenizer to use)")
    return problems


def _check_trainer(trainer: TrainerConfig) -> List[str]:
    problems = []
    positive = ("per_device_train_batch_size", "per_device_eval_batch_size",
                "gradient_accumulation_steps", "logging_steps")
    for key in positive:
        if getattr(trainer, key) <= 0:
            problems.append(f"trainer.{key}={getattr(trainer, key)} must be > 0")
    if not trainer.learning_rate > 0:
        problems.append(f"trainer.learning_rate={trainer.learning_rate} must be > 0")
    if trainer.max_steps == 0 or (trainer.max_steps < 0 and trainer.num_train_epochs <= 0):
        problems.append("trainer.max_steps or trainer.num_train_epochs must be > 0")
    if not 0 <= trainer.warmup_ratio < 1:
        problems.append(f"trainer.warmup_ratio={trainer.warmup_ratio} must be in [0, 1)")
    for key in ("eval_steps", "eval_examples", "save_steps", "save_total_limit"):
        value = getattr(trainer, key)
        if value is not None and value <= 0:
            problems.append(f"trainer.{key}={value} must be > 0 or null")
    if trainer.extra:
        from pipeline.training import unknown_extra_keys

        problems += unknown_extra_keys(trainer.extra)
    return problems


def _check_preemption(preemption: PreemptionConfig) -> List[str]:
    import signal

    problems = [f"preemption.signals has {name!r}, not a signal name such as SIGTERM or SIGUSR1"
                for name in preemption.signals
                if name not in signal.Signals.__members__ or name in ("SIGKILL", "SIGSTOP")]
    code = preemption.exit_code
    if code is not None and not 0 < code < 256:
        problems.append(f"preemption.exit_code={code} must be in 1..255 (0 would read as success)")
    return problems


def _check_evaluation(cfg: DictConfig) -> List[str]:
    from pipeline.metrics import METRICS

    ev: EvaluationConfig = cfg.evaluation
    problems = []
    sizes = {"eval": "validation_size", "test": "test_size"}
    for split in ev.splits:
        if split not in sizes:
            problems.append(f"evaluation.splits has {split!r}; use eval and/or test")
        elif getattr(cfg.data, sizes[split]) == 0:  # a negative size is reported by _check_data
            problems.append(f"evaluation.splits has {split!r} but data.{sizes[split]}=0; remove it "
                            f"or set data.{sizes[split]}")
    options = {p.stem for p in (CONF_DIR / "data").glob("*.yaml")}
    for name in ev.extra_datasets:
        if name not in options:
            problems.append(f"evaluation.extra_datasets has {name!r}, not a data option; "
                            f"available: {', '.join(sorted(options))}")
    for name in ev.metrics:
        if name not in METRICS and not name.startswith("evaluate:"):
            problems.append(f"evaluation.metrics has unknown metric {name!r}; available: "
                            f"{', '.join(sorted(METRICS))}, or evaluate:<name or path>")
    if {"accuracy", "macro_f1"} & set(ev.metrics) and not ev.labels:
        problems.append("evaluation.labels must list the label set for accuracy / macro_f1, "
                        "e.g. evaluation.labels=[positive,negative]")
    if ev.max_examples is not None and ev.max_examples <= 0:
        problems.append(f"evaluation.max_examples={ev.max_examples} must be > 0 or null")
    if ev.loss_precision not in ("auto", "fp32", "bf16"):
        problems.append(f"evaluation.loss_precision={ev.loss_precision!r}: use auto, fp32 or bf16")
    if ev.batch_size <= 0 or ev.decoding.max_new_tokens <= 0:
        problems.append("evaluation.batch_size and evaluation.decoding.max_new_tokens must be > 0")
    if ev.during_training and not (cfg.trainer.eval_steps and cfg.data.validation_size > 0
                                   and ev.metrics):
        problems.append("evaluation.during_training needs trainer.eval_steps, a validation split "
                        "(data.validation_size > 0) and evaluation.metrics")
    return problems


def metric_names(cfg: DictConfig) -> List[str]:
    """Every final metric name a run of ``cfg`` can report (for ``objective.metric``)."""
    ev: EvaluationConfig = cfg.evaluation
    generated = []
    for name in ev.metrics:
        if name in ("accuracy", "macro_f1"):
            generated += [name, "unparsable_rate", *[f"f1/{label}" for label in ev.labels or []]]
        elif not name.startswith("evaluate:"):
            generated.append(name)
    sets = [s for s, size in (("eval", cfg.data.validation_size), ("test", cfg.data.test_size)) if size > 0]
    names = [f"{side}/{s}/{m}" for side in ("base", "tuned", "delta") for s in sets + list(ev.extra_datasets)
             for m in ["loss", "perplexity"] + (generated if s in ev.splits or s in ev.extra_datasets else [])]
    fixed = ["train/loss", "train/steps", "train/tokens", "perf/train_tokens_per_s",
             "perf/train_runtime_s", "perf/peak_rss_mb", "perf/wall_time_s", "perf/artifact_mb",
             "params/trainable", "params/total", "params/trainable_pct"]
    return sorted(set(names)) + fixed


def _check_objective(cfg: DictConfig) -> List[str]:
    name = cfg.objective.metric
    if name in metric_names(cfg) or any(m.startswith("evaluate:") for m in cfg.evaluation.metrics):
        return []
    return [f"objective.metric={name!r} is not a metric this run reports; available: "
            f"{', '.join(metric_names(cfg))}"]


def _check_distributed(cfg: DictConfig, settings: AdapterSettings) -> List[str]:
    """What cannot run under ``distributed`` with this adapter, precision and machine."""
    import importlib.util

    from pipeline import distributed

    cuda = None
    if cfg.distributed.nproc_per_node > 1:  # only then does the GPU count matter: torch is slow to import
        import torch

        cuda = torch.cuda.device_count() if torch.cuda.is_available() else None
    installed = importlib.util.find_spec("deepspeed") is not None
    return distributed.check(cfg.distributed, settings, cfg.trainer.precision, cuda, installed)


def _check_resume(resume: str) -> List[str]:
    if resume in ("never", "auto") or Path(resume).exists():
        return []
    return [f"resume={resume!r} is neither never, auto nor an existing run folder or checkpoint"]


def _missing_keys(node: DictConfig, prefix: str = "") -> List[str]:
    """Dotted keys whose value is ``???``. Unlike ``OmegaConf.missing_keys`` this resolves no
    interpolation: ``name: ${model.path}`` with ``path: ???`` would raise a type error there."""
    missing = []
    for key in node.keys():
        if OmegaConf.is_missing(node, key):
            missing.append(f"{prefix}{key}")
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not OmegaConf.is_interpolation(node, key):
            missing += _missing_keys(child, f"{prefix}{key}.")
    return missing


def validate(cfg: DictConfig, architecture: Optional["ArchitectureInfo"] = None) -> None:
    """Runs every cross-field check and raises one :class:`ConfigError` listing all problems.

    Args:
        cfg: the composed ``train`` config.
        architecture: module names and model type of the base model (from its config, no
            weights); when given, adapter target modules are checked against it.

    Raises:
        ConfigError: when anything is wrong; the message names key, value and fix.
    """
    missing = sorted(_missing_keys(cfg))
    if missing:  # the other checks would trip over them
        raise ConfigError([f"{key} is required: set it on the command line, e.g. {key}=..."
                           for key in missing])
    problems = _check_choices(cfg)
    problems += _check_unknown_adapter_keys(cfg)
    problems += _check_data(cfg.data)
    problems += _check_model(cfg.model)
    problems += _check_trainer(cfg.trainer)
    problems += _check_resume(cfg.resume)
    problems += _check_preemption(cfg.preemption)
    problems += _check_evaluation(cfg)
    problems += _check_objective(cfg)
    if cfg.adapter.method in ADAPTERS and not any(p.startswith("adapter.") for p in problems):
        settings: AdapterSettings = OmegaConf.to_object(cfg.adapter)
        problems += settings.check(architecture)
        if settings.quantized and cfg.model.dtype == "float16" and cfg.trainer.precision != "fp16":
            problems.append("model.dtype=float16 with a quantized base trains in fp16 weights "
                            "without loss scaling; use model.dtype=float32 or trainer.precision=fp16")
        problems += _check_distributed(cfg, settings)
    if problems:
        raise ConfigError(problems)


@dataclass
class ArchitectureInfo:
    """What validation needs to know about a model without loading its weights."""

    model_type: str
    module_names: List[str]  # every submodule's qualified name
    linear_modules: List[str]  # qualified names of nn.Linear / GPT-2 Conv1D modules
    hidden_size: int
    num_layers: int


CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def load_option(group: str, name: str, **overrides: Any) -> Any:
    """A group option as its typed schema object (e.g. the ``model`` a tiny model borrows a
    tokenizer from), read from ``conf/<group>/<name>.yaml`` without composing a whole config.
    ``overrides`` replace fields, e.g. those interpolating the root config (``seed``)."""
    path = CONF_DIR / group / f"{name}.yaml"
    if not path.exists():
        options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        raise ConfigError([f"{group} option {name!r} does not exist; available: {', '.join(options)}"])
    node = OmegaConf.load(path)
    node.pop("defaults", None)
    return typed(SCHEMAS[group], node, overrides)


def typed(schema: type, *nodes: Any) -> Any:
    """``nodes`` merged onto ``schema`` and checked by it, as a schema object."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), *nodes))
