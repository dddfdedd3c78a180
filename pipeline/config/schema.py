"""Typed config schemas: one dataclass per config group, and one per entry point's config.

The YAML options under ``conf/`` extend them (``defaults: [/schema/<group>/<name>@_here_]``),
so a typo, a wrong type or a choice outside its values (a :class:`Choice` enum) fails at
composition and names the key; :mod:`pipeline.commands.store` registers them with Hydra and
:mod:`pipeline.commands.validation` holds the rules across fields. Entry points then convert
the composed config once into these objects (:func:`pipeline.commands.compose.typed_train`)
and pass them on. The adapter group's schemas are the registered methods' settings
(:mod:`pipeline.adapters.registry`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import II, MISSING, SI

from pipeline.config.choices import (Compile, DataFormat, DecodingStrategy, Direction, EvaluationEngine, LossPrecision,
                              ModelDtype, ModelSource, NanPolicy, ParamType, Precision, Sampling, Strategy,
                              Template, TinyArchitecture, TinyDtype, TrainOn, Truncation, WandbMode)
from pipeline.config.ranges import SEED, bounded, unbounded

# --------------------------------------------------------------------------- data


@dataclass
class MixSource:
    """Another source mixed into the training examples (``data.mix``): a data option, with the
    settings in which it differs, and how many of its training examples join, as a count
    (``examples``) or as a fraction of the main source's training examples (``fraction``)."""

    data: str = MISSING  # a data option: conf/data/<name>.yaml
    overrides: Dict[str, Any] = field(default_factory=dict)  # e.g. {path: other.jsonl, format: sharegpt}
    examples: Optional[int] = bounded(None, ge=0)
    fraction: Optional[float] = bounded(None, ge=0)


@dataclass
class DataConfig:
    """Where the examples come from and how they become token ids.

    ``path`` is a local file (.jsonl/.json/.csv/.parquet), a folder of such files, or a
    Hugging Face hub dataset id. ``format`` says how records map to a conversation.
    """

    name: str = MISSING
    path: str = MISSING
    format: DataFormat = DataFormat.auto
    subset: Optional[str] = None  # hub dataset configuration name
    source_split: str = "train"  # split read from the source before our own split
    # Held-out sets as the user has them, used as they are (never re-split; cut only to a count
    # given as data.validation_size / data.test_size >= 1): local files or folders ...
    validation_path: Optional[str] = None
    test_path: Optional[str] = None
    # ... or, for a hub dataset (a local folder of split-named files is read as its splits
    # without this, by datasets' own file-name rules), its named splits,
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
    train_on: TrainOn = TrainOn.all
    # Examples of validation/test whose conversation (exact) or prompt (normalised: case,
    # whitespace and punctuation ignored) also occurs in train are counted and reported
    # (run.json data_overlap); dedup=true removes those train examples.
    dedup: bool = False
    # Reuse tokenized splits across runs with the same data, settings and tokenizer
    # (paths.data_cache_dir): a sweep tokenizes once.
    cache: bool = True
    system_prompt: Optional[str] = None
    template: Template = Template.chat  # chat: the tokenizer's chat template | plain: prompt + completion + eos
    max_length: int = bounded(256, ge=8)
    truncation: Truncation = Truncation.drop  # what to do with longer examples
    validation_size: float = bounded(0.1, ge=0)  # fraction (< 1) or count (>= 1) of examples
    test_size: float = bounded(0.1, ge=0)
    # A fraction of a large file is more than evaluation needs (every validation example is
    # scored at each trainer.eval_steps): fractions are capped at these counts, and the rest
    # trains. Counts given as validation_size/test_size are kept as they are. null: no cap.
    max_validation_examples: Optional[int] = bounded(200, gt=0)
    max_test_examples: Optional[int] = bounded(300, gt=0)
    max_examples: Optional[int] = bounded(None, gt=0)  # cap before splitting (debug, quick experiments)
    # Padding-free batches (position ids restart per example): the same loss as padded batches,
    # without computing padding. Off by itself where the model's attention would let packed
    # examples see each other (a six-token forward checks it at start-up; the log says why).
    packing: bool = True
    pack_length: int = bounded(512, ge=8)  # packing: the token budget of one packed row (>= max_length)
    # Other sources mixed into train (never into validation/test), e.g. some general chat data
    # against forgetting: [{data: chatterbot_qa, fraction: 0.2}]. Each source's own training
    # split is sampled (seeded), so its held-out examples stay unseen; counts land in run.json.
    mix: List[MixSource] = field(default_factory=list)
    # The split's seed (and a tiny model's initialisation). Fixed rather than ${seed}: the runs
    # of a multirun over seeds then train on the same split and are evaluated on the same
    # examples, so they compare example by example and share one base measurement.
    seed: int = bounded(42, **SEED)


# --------------------------------------------------------------------------- model


@dataclass
class TinyModelConfig:
    """A randomly initialised model built from a config: tiny for tests and ``debug=fast``, or a
    real model's shape (``model=synthetic_llama_8b``) to measure memory and speed offline."""

    architecture: TinyArchitecture = TinyArchitecture.llama
    hidden_size: int = bounded(64, gt=0)
    intermediate_size: int = bounded(128, gt=0)
    num_layers: int = bounded(2, gt=0)
    num_heads: int = bounded(4, gt=0)
    num_kv_heads: int = bounded(2, gt=0)
    max_position_embeddings: int = bounded(1024, gt=0)
    vocab_size: Optional[int] = bounded(None, gt=0)  # null: the tokenizer's; a real model's size counts its rows
    tie_word_embeddings: bool = True
    dtype: TinyDtype = TinyDtype.float32  # of the stored random weights


@dataclass(frozen=True)
class QuantizationSettings:
    """A base quantized on load by bitsandbytes (QLoRA's): the arguments of
    :func:`pipeline.model.quantization.bnb_config`, as the adapter settings resolve them."""

    bits: int = bounded(4, one_of=(4, 8))
    quant_type: str = "nf4"  # nf4 | fp4
    double_quant: bool = True
    compute_dtype: str = "bfloat16"  # resolved: never "auto"
    quant_storage: Optional[str] = None

    def as_dict(self) -> Dict[str, Any]:
        """Plain values: for ``bnb_config(**...)``, fingerprints and records."""
        return dataclasses.asdict(self)

    def key(self) -> str:
        """A stable text of the settings (models quantized alike share it)."""
        return json.dumps(self.as_dict(), sort_keys=True)


@dataclass
class ModelConfig:
    """Base model: hub id or local folder, a packaged GGUF file, or a tiny random model.

    ``source``: ``hub`` loads ``path`` (hub id or local folder) with ``from_pretrained``;
    ``gguf`` converts ``gguf_file`` from the installed package ``gguf_package`` once into a
    cached Hugging Face folder; ``tiny`` builds ``tiny`` with the tokenizer of ``tokenizer``.
    """

    name: str = MISSING
    source: ModelSource = ModelSource.hub
    path: Optional[str] = None
    revision: Optional[str] = None
    gguf_package: Optional[str] = None
    gguf_file: Optional[str] = None
    tokenizer: Optional[str] = None  # model config name or folder whose tokenizer a tiny model uses
    tiny: Optional[TinyModelConfig] = None
    dtype: ModelDtype = ModelDtype.float32
    attn_implementation: Optional[str] = "sdpa"  # sdpa | eager | flash_attention_2 | null
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False


# --------------------------------------------------------------------------- trainer


@dataclass
class TrainerConfig:
    """The knobs of transformers' ``TrainingArguments`` this pipeline exposes by name.

    Anything else ``TrainingArguments`` accepts goes in ``extra`` (checked against its fields).
    """

    max_steps: int = bounded(-1, gt=0, also=(-1,), meaning="-1: train trainer.num_train_epochs instead")
    num_train_epochs: float = bounded(1.0, gt=0)
    per_device_train_batch_size: int = bounded(8, gt=0)
    per_device_eval_batch_size: int = bounded(8, gt=0)
    gradient_accumulation_steps: int = bounded(1, gt=0)
    learning_rate: float = bounded(2e-4, gt=0)
    # A lookup table for experiments that vary the method, used by interpolation:
    # learning_rate: ${trainer.learning_rate_per_method.${adapter.method}}
    learning_rate_per_method: Dict[str, float] = bounded(gt=0, default_factory=dict)
    weight_decay: float = bounded(0.0, ge=0)
    warmup_ratio: float = bounded(0.03, ge=0, lt=1)
    lr_scheduler_type: str = "cosine"
    max_grad_norm: float = bounded(1.0, ge=0, meaning="0: no clipping")
    optim: str = "adamw_torch"
    # auto: bf16 autocast where the device multiplies bf16 natively (AVX512-bf16/AMX CPUs,
    # Ampere+ GPUs), else fp32; see pipeline/model/precision.py. fp32 | bf16 | fp16 force one.
    precision: Precision = Precision.auto
    logging_steps: int = bounded(10, gt=0)
    eval_steps: Optional[int] = bounded(50, gt=0)  # null: evaluate only at the end
    # Evaluations during training (every eval_steps: the loss curve, pruning, best checkpoint)
    # score the first eval_examples validation examples, a fixed slice; null: all of them. The
    # base and tuned measurements always use the whole validation split.
    eval_examples: Optional[int] = bounded(None, gt=0)
    save_steps: Optional[int] = bounded(100, gt=0)  # null: no intermediate checkpoints
    save_total_limit: Optional[int] = bounded(2, gt=0)
    sampling: Sampling = Sampling.random  # group_by_length: less padding
    dataloader_num_workers: int = bounded(0, ge=0)
    nan_policy: NanPolicy = NanPolicy.stop  # what a non-finite loss does
    # The training loss takes the output layer (vocabulary-sized) and the cross-entropy only at
    # positions whose next token carries a label: the same loss and gradients, without the
    # logits of every prompt and padding position (pipeline/trainer/loss.py).
    labelled_logits: bool = True
    # Under bf16 autocast, the frozen base's matmul weights held in bf16 while training instead of
    # cast in every step (trainable weights and optimizer states stay fp32; the weights as loaded
    # are back for measuring and saving). No effect in fp32, under DeepSpeed or on a 4-bit base.
    base_in_compute_dtype: bool = True
    # The tokens every row of a batch begins with (a chat template's system turn, a fixed
    # instruction; at least 16, no label) run once per batch, the rows' remainders after them
    # (pipeline/trainer/opening.py). One process, no gradient checkpointing or NEFTune; the log
    # says where it does not apply.
    shared_opening: bool = True
    # torch.compile of the model (TrainingArguments' torch_compile): off | on | auto, which turns
    # it on only where it was measured to repay its compile time (pipeline/trainer/build.py:
    # compile_decision; the log states the decision). Quote off/on in YAML files.
    compile: Compile = Compile.auto
    extra: Dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- evaluation


@dataclass
class DecodingConfig:
    """How both the base and the tuned model generate (the same for both)."""

    strategy: DecodingStrategy = DecodingStrategy.greedy
    max_new_tokens: int = bounded(48, gt=0)
    temperature: float = bounded(1.0, gt=0)  # sample only
    top_p: float = bounded(1.0, gt=0, le=1)  # sample only
    num_beams: int = bounded(4, gt=0)  # beam only
    stop_strings: List[str] = field(default_factory=list)
    seed: int = bounded(II("seed"), **SEED)  # the run's seed


@dataclass
class BenchmarksConfig:
    """Standard benchmarks through lm-evaluation-harness (the ``bench`` extra), run on the base
    and the tuned model in memory (:mod:`pipeline.scoring.benchmarks`).

    ``tasks``: lm-eval task or group names (``arc_easy``, ``mmlu``, ``gsm8k``), or those of the
    task YAMLs in ``include_path`` (lm-eval's own format). A standard task downloads its dataset
    from the Hugging Face Hub on first use (then cached; ``HF_DATASETS_OFFLINE=1`` reads the
    cache). Results are ``base|tuned|delta/benchmark/<task>/<metric>``; a group reports its
    totals only unless ``subtasks`` is true.
    """

    tasks: List[str] = field(default_factory=list)
    include_path: Optional[str] = None  # a folder of task YAMLs (searched recursively)
    # Examples per task (null: every example); a group's subtasks each take this many (MMLU:
    # 57 x limit). 100 keeps a multiple-choice task to seconds on a CPU; its standard error is
    # then several points (shown next to each score).
    limit: Optional[int] = bounded(100, gt=0)
    num_fewshot: Optional[int] = bounded(None, ge=0, meaning="null: each task's own default")
    batch_size: int = bounded(8, gt=0)
    subtasks: bool = False  # also each subtask of a group (MMLU has 57)
    chat_template: bool = False  # render prompts with the tokenizer's chat template (lm-eval's apply_chat_template)
    seed: int = bounded(1234, **SEED)  # few-shot sampling and lm-eval's own seeds


@dataclass
class EvaluationConfig:
    """Generation metrics on held-out prompts, base model vs tuned model.

    ``metrics`` are names from :data:`pipeline.scoring.metrics.METRICS` (or ``evaluate:<name>`` for a
    metric loaded by ``evaluate.load``); an empty list evaluates loss and perplexity only.
    """

    splits: List[str] = field(default_factory=lambda: ["test"])  # eval (validation) and/or test
    extra_datasets: List[str] = field(default_factory=list)  # data options, evaluated on their test split
    max_examples: Optional[int] = bounded(100, gt=0)  # per set
    # Generation batch: on 2 CPU cores 32 prompts a batch decoded the default's and a
    # classification file's test prompts 1.15-1.4x faster than 16, with the same outputs (one
    # pass over the weights serves more rows). Lower it if generation runs out of memory.
    batch_size: int = bounded(32, gt=0)
    # Loss and perplexity under bf16 autocast (auto: where the hardware multiplies bf16
    # natively; about 3x faster on an AVX512-bf16 CPU, losses moved by up to ~1%) or fp32.
    # Generation always runs in the model's own dtype. The choice is in run.json.
    loss_precision: LossPrecision = LossPrecision.auto
    metrics: List[str] = field(default_factory=list)
    labels: Optional[List[str]] = None  # classification: the label set outputs are parsed into
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    # Generation metrics at every trainer evaluation (trainer.eval_steps) on the first
    # `during_training_examples` validation examples, logged as eval/<metric>: lets sweeps
    # optimise and prune on BLEU/ROUGE, not only loss. Off by default: generation is slow.
    during_training: bool = False
    during_training_examples: int = bounded(16, gt=0)
    # Reuse the base model's measurement across runs that share its fingerprint (same base,
    # quantisation, tokenizer, examples, decoding and metrics): pipeline/scoring/base_cache.py.
    cache_base: bool = True
    # Who generates the answers: transformers' generate (every method, greedy/sample/beam) or
    # vLLM's offline engine (LoRA and full fine-tuning on a float base; greedy or sample),
    # in its own environment (pipeline/scoring/vllm_client.py). Greedy answers are the same but where
    # kernels break a near-tie differently; losses are always computed by transformers.
    engine: EvaluationEngine = EvaluationEngine.transformers
    # lm-evaluation-harness tasks on both models (none by default): BenchmarksConfig.
    benchmarks: BenchmarksConfig = field(default_factory=BenchmarksConfig)


# --------------------------------------------------------------------------- logger / paths


@dataclass
class WandbConfig:
    project: str = "pipeline"
    entity: Optional[str] = None
    group: Optional[str] = None
    name: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    job_type: str = "train"
    mode: WandbMode = WandbMode.offline


@dataclass
class LoggerConfig:
    wandb: Optional[WandbConfig] = None


@dataclass
class PathsConfig:
    root_dir: str = MISSING
    output_dir: str = MISSING
    cache_dir: str = MISSING
    run_dir: str = MISSING
    # Base-model measurements shared by the runs of sweeps and multiruns (pipeline/scoring/base_cache.py).
    base_cache_dir: str = SI("${paths.cache_dir}/base_measurements")
    # Tokenized splits shared alike (pipeline/data/cache.py; data.cache=false opts out).
    data_cache_dir: str = SI("${paths.cache_dir}/tokenized")


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

    strategy: Strategy = Strategy.single
    nproc_per_node: int = bounded(1, gt=0)
    nnodes: int = bounded(1, gt=0)  # nodes of a SLURM job (the memory estimate shards over nnodes x nproc_per_node)
    zero_stage: int = bounded(0, ge=0, le=3)  # deepspeed only: 1 | 2 | 3
    offload_optimizer: bool = False  # optimizer states in CPU memory (DeepSpeedCPUAdam, compiles once)
    offload_params: bool = False  # stage 3: parameters in CPU memory too
    # ZeRO-3: build the model already sharded (deepspeed.zero.Init) instead of whole on every
    # rank's CPU memory; required for a quantized base under ZeRO-3 (the base model is then
    # gathered whole once, for its evaluation before training).
    zero_init: bool = False
    # ZeRO-3: gather the full 16-bit weights when saving, else the saved adapter/model is empty.
    gather_16bit_weights_on_save: bool = True
    backend: Optional[str] = None  # null: nccl on CUDA, gloo on CPU
    master_port: int = bounded(29500, ge=1, le=65535)  # rendezvous port of a self-launched single-node run
    # Anything else DeepSpeed's JSON accepts, merged over the generated config.
    deepspeed_extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class PreemptionConfig:
    """What a preemption signal during training does: finish the step, save a checkpoint,
    mark the run ``interrupted``, exit with ``exit_code``; ``resume=auto`` continues it."""

    signals: List[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    # null: 128 + the signal number (143 SIGTERM, 138 SIGUSR1), as a shell reports a job killed
    # by it; set it to the code your cluster requeues on (slurm.conf RequeueExit).
    exit_code: Optional[int] = bounded(None, ge=1, le=255, meaning="0 would read as success")
    # Under SLURM (SLURM_JOB_ID set), on SIGUSR1 (`sbatch --signal=USR1@<seconds>` before the
    # time limit) run `scontrol requeue $SLURM_JOB_ID`. SIGTERM is left to SLURM: it comes
    # from scancel, or from a preemption that SLURM requeues itself (PreemptMode=REQUEUE).
    requeue: bool = True


@dataclass
class ObjectiveConfig:
    metric: str = "tuned/eval/loss"
    direction: Direction = Direction.minimize


# --------------------------------------------------------------------------- sweeps


@dataclass
class ConstraintConfig:
    """A floor a sweep's trials must keep (infeasible in Optuna's sense otherwise).

    ``metric``: ``<set>/<metric>`` with per-example scores in ``eval/predictions.jsonl``
    (``benchmark/arc_easy/acc``, ``test/accuracy``, ``test/loss``). The trial is feasible when
    the paired 95% bootstrap interval of tuned minus base on that metric, over the examples,
    stays within ``max_drop`` of no change: its lower bound >= -max_drop for a score, its upper
    bound <= max_drop for a loss. A small benchmark's standard error is several points: the
    interval, not the point difference, decides.
    """

    metric: str = MISSING
    max_drop: float = bounded(0.0, ge=0, meaning="how far the interval may reach the bad way")



@dataclass
class SweepParam:
    """One dimension of a sweep's search space (see sweeps/README.md).

    ``type``: float | int (``low``, ``high``, optional ``log``/``step``) or categorical
    (``choices``). ``times``: the sampled value is a multiple of this earlier key's value
    (e.g. alpha as a multiple of rank); the Optuna parameter is then named ``<key>/<times>``.
    """

    type: ParamType = MISSING
    low: Optional[float] = unbounded(None, why="the swept key's own range applies to the samples")
    high: Optional[float] = unbounded(None, why="the swept key's own range applies to the samples")
    log: bool = False
    step: Optional[float] = bounded(None, gt=0)
    choices: Optional[List[Any]] = None
    times: Optional[str] = None


@dataclass
class SweepConfig:
    """An Optuna study driven by ``python -m pipeline.train -m sweep=<name>``.

    ``objectives`` empty: the run's ``objective`` (single objective). ``sampler``/``pruner``:
    ``_target_`` an Optuna class plus its arguments; ``pruner`` may also name a preset of
    ``pipeline.study.definition.PRUNERS`` (asha, hyperband, median); ``pruner: null`` never prunes.
    ``storage`` null: SQLite ``study.db`` in the sweep folder. ``trial`` is set by the
    sweeper on each job (the trial the job belongs to); never set it by hand.
    """

    name: str = MISSING  # the study name and the sweep folder's name
    params: Dict[str, SweepParam] = field(default_factory=dict)
    objectives: List[ObjectiveConfig] = field(default_factory=list)
    constraints: List[ConstraintConfig] = field(default_factory=list)
    sampler: Optional[Dict[str, Any]] = None
    pruner: Any = None  # a preset name, {_target_: ..., ...} or null
    n_trials: int = bounded(20, gt=0)  # trials the study should hold (earlier sessions and other workers count)
    n_jobs: int = bounded(1, gt=0)  # trials launched together (in parallel with a parallel launcher)
    storage: Optional[str] = None  # an Optuna RDB URL (sqlite:///..., postgresql://...)
    max_failures: int = bounded(3, gt=0)  # failed trials in the study after which the sweep stops
    heartbeat_s: int = bounded(60, gt=0)  # trials of a killed worker fail after 2 heartbeats without news
    # Wall-clock budget of the study in minutes (null: none): no new trial starts once it is
    # spent; trials in flight finish. Kept in the storage, so a resumed sweep continues it.
    timeout_min: Optional[float] = bounded(None, gt=0)
    # Per-device memory limit in GiB (null: none): a sampled configuration whose model states
    # (pipeline.estimate) exceed it is recorded as pruned, with the estimate, and never starts.
    max_memory_gb: Optional[float] = bounded(None, gt=0)
    trial: Optional[int] = bounded(None, ge=0)


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
    seed: int = bounded(42, **SEED)
    resume: str = "never"  # never | auto | path to a run folder or checkpoint
    task_name: str = "train"
    tags: List[str] = field(default_factory=list)
    sweep: Optional[SweepConfig] = None  # set by `sweep=<name>` (sweeps/)


@dataclass
class ArchitectureInfo:
    """What validation needs to know about a model without loading its weights."""

    model_type: str
    module_names: List[str]  # every submodule's qualified name
    linear_modules: List[str]  # qualified names of nn.Linear / GPT-2 Conv1D modules
    hidden_size: int
    num_layers: int


SCHEMAS: Dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "trainer": TrainerConfig,
    "logger": LoggerConfig,
    "paths": PathsConfig,
    "evaluation": EvaluationConfig,
    "distributed": DistributedConfig,
}
