"""Many processes: DeepSpeed ZeRO configs, the launch of workers, and who writes what.

The training loop stays transformers' Trainer, which owns DDP and DeepSpeed; this module only
(1) turns the ``distributed`` config into DeepSpeed's JSON, leaving every value the Trainer knows
(batch sizes, learning rate, clipping, mixed precision) as ``"auto"`` so the two cannot disagree,
(2) starts the worker processes through torch's elastic launcher (what ``torchrun`` runs) when
``python -m pipeline.train`` is called with ``nproc_per_node > 1`` outside a launcher, and
(3) tells a process whether it is rank 0, the only one that writes the run folder and W&B.

This module imports no torch at import time (configs compose and are checked quickly).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from pipeline.adapters.registry import AdapterSettings
from pipeline.config.errors import PipelineError
from pipeline.config.schema import DistributedConfig, TrainerConfig
from pipeline.model.precision import resolve as resolve_precision
from pipeline.runs.runfolder import ReplicaRunFolder, RunFolder, move_log_handlers, write_json

log = logging.getLogger(__name__)

# Environment variables a launcher (torchrun, the elastic agent, deepspeed, accelerate) sets.
LAUNCHER_ENV = ("LOCAL_RANK", "WORLD_SIZE")


def under_launcher() -> bool:
    """Whether this process was started by a launcher that already set the ranks."""
    return any(name in os.environ for name in LAUNCHER_ENV)


def from_slurm_env() -> bool:
    """Maps srun's task variables onto the ones torch reads, when srun started the tasks.

    ``srun`` (and Hydra's submitit launcher, which runs one task per GPU) sets ``SLURM_PROCID``,
    ``SLURM_LOCALID`` and ``SLURM_NTASKS`` but none of torch's names; the rendezvous address is
    the first node of the allocation and the port derives from the job id (so concurrent jobs
    sharing a node do not collide); MASTER_ADDR / MASTER_PORT already set win.

    Returns:
        Whether the variables were set from SLURM's (a multi-task SLURM step outside torchrun).
    """
    if under_launcher() or int(os.environ.get("SLURM_NTASKS", "1")) <= 1 or "SLURM_PROCID" not in os.environ:
        return False
    os.environ.update(RANK=os.environ["SLURM_PROCID"], LOCAL_RANK=os.environ["SLURM_LOCALID"],
                      WORLD_SIZE=os.environ["SLURM_NTASKS"])
    if "MASTER_ADDR" not in os.environ:
        os.environ["MASTER_ADDR"] = _first_slurm_host()
    os.environ.setdefault("MASTER_PORT", str(29500 + int(os.environ.get("SLURM_JOB_ID", "0")) % 1000))
    return True


def _first_slurm_host() -> str:
    """The first host of the job's node list (``scontrol`` expands ranges like ``gpu[01-04]``)."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError) as err:
        raise PipelineError(f"cannot expand SLURM_JOB_NODELIST={nodelist!r} with scontrol ({err}); "
                            "set MASTER_ADDR to the first node's address") from err
    return out[0]


def rank() -> int:
    """This process's global rank (0 without a launcher)."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0: the process that creates the run folder, writes metrics and the W&B run."""
    return rank() == 0


def needs_launch(cfg: DistributedConfig) -> bool:
    """Whether this command must start its workers itself (``nproc_per_node > 1``, no launcher)."""
    return cfg.strategy != "single" and cfg.nproc_per_node > 1 and not under_launcher()


# --------------------------------------------------------------------------- DeepSpeed JSON


def deepspeed_config(cfg: DistributedConfig) -> Dict[str, Any]:
    """DeepSpeed's config for ``cfg``, with ``"auto"`` wherever the Trainer fills the value.

    ``bf16.enabled`` / ``fp16.enabled`` are ``auto``: the Trainer sets them from
    ``trainer.precision``, so the engine and the autocast never disagree. Without an
    ``optimizer`` section the Trainer's own optimizer (``trainer.optim``, torch AdamW) is used,
    which needs no compiled op; offloading the optimizer needs DeepSpeed's CPU Adam instead.
    """
    zero: Dict[str, Any] = {"stage": cfg.zero_stage, "overlap_comm": True, "contiguous_gradients": True,
                            "reduce_bucket_size": "auto"}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if cfg.zero_stage == 3:
        zero.update({"stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
                     "stage3_gather_16bit_weights_on_model_save": cfg.gather_16bit_weights_on_save})
        if cfg.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config: Dict[str, Any] = {
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
        "zero_optimization": zero, "steps_per_print": 1_000_000, "wall_clock_breakdown": False,
    }
    if cfg.offload_optimizer:
        config["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                           "weight_decay": "auto"}}
    return _merged(config, cfg.deepspeed_extra)


def _merged(base: Dict[str, Any], extra: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def trainer_arguments(cfg: DistributedConfig, run_dir: Path) -> Dict[str, Any]:
    """``TrainingArguments`` for the strategy: ``deepspeed`` (the config dict), ``ddp_backend``.

    Rank 0 also writes the DeepSpeed config to ``<run_dir>/deepspeed.json`` (the record of what
    ran); every rank passes the dict itself, so none waits for the file.
    """
    args: Dict[str, Any] = {"ddp_backend": cfg.backend} if cfg.backend else {}
    if cfg.strategy == "deepspeed":
        args["deepspeed"] = deepspeed_config(cfg)
        if is_main_process():
            write_json(Path(run_dir) / "deepspeed.json", args["deepspeed"])
    return args


def join_process_group(cfg: DistributedConfig, run_dir: Path) -> Path:
    """Under a launcher: joins the process group and returns rank 0's run folder.

    Hydra in each process of ``torchrun`` / ``srun`` names its own timestamped run folder; they
    can differ by a second. Rank 0's wins; another rank's own folder (Hydra's config copy and an
    empty log) is removed. The Trainer and DeepSpeed reuse the group joined here.
    """
    import torch  # lazy: start-up must not pay for torch
    import torch.distributed as dist

    if world_size() <= 1:
        return run_dir
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend=cfg.backend or ("nccl" if torch.cuda.is_available() else "gloo"))
    shared = [str(run_dir)]
    dist.broadcast_object_list(shared, src=0)
    chosen = Path(shared[0])
    if chosen != Path(run_dir):
        move_log_handlers(Path(run_dir), chosen)
        shutil.rmtree(run_dir, ignore_errors=True)
    return chosen


def run_folder(cfg: DistributedConfig, run_dir: Path) -> RunFolder:
    """This process's view of the run folder: every rank of a multi-process run shares rank 0's,
    and only rank 0 writes it (other ranks also log warnings only)."""
    if world_size() == 1:
        return RunFolder(run_dir)
    shared = join_process_group(cfg, run_dir)
    if is_main_process():
        return RunFolder(shared)
    logging.getLogger().setLevel(logging.WARNING)
    return ReplicaRunFolder(shared)


def zero3_init_context(cfg: DistributedConfig, trainer: TrainerConfig) -> Any:
    """Keeps DeepSpeed's ZeRO-3 init switched on while the base model loads (or returns None).

    ``from_pretrained`` builds the model already sharded (``deepspeed.zero.Init``) while an
    ``HfDeepSpeedConfig`` object is alive; a quantized base under ZeRO-3 must load this way.
    The ``auto`` values are filled with the numbers the Trainer will use, since no Trainer exists
    yet. Hold the returned object until the Trainer is built.
    """
    if cfg.strategy != "deepspeed" or cfg.zero_stage != 3 or not cfg.zero_init:
        return None
    from transformers.integrations import HfDeepSpeedConfig  # lazy: transformers loads torch

    config = deepspeed_config(cfg)
    micro, accumulation = trainer.per_device_train_batch_size, trainer.gradient_accumulation_steps
    mixed = resolve_precision(trainer.precision).precision
    config.pop("train_batch_size")  # DeepSpeed derives it (its view of the world size may lag)
    config.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accumulation,
                  gradient_clipping=trainer.max_grad_norm,
                  bf16={"enabled": mixed == "bf16"}, fp16={"enabled": mixed == "fp16"})
    config.pop("optimizer", None)
    for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
        config["zero_optimization"].pop(key, None)  # DeepSpeed's defaults; the Trainer tunes them later
    log.info("ZeRO-3: the base model loads already sharded (deepspeed.zero.Init)")
    return HfDeepSpeedConfig(config)


def gathered(model: Any) -> Any:
    """A context in which a model built sharded by ``zero.Init`` can run forward before the
    Trainer has made its DeepSpeed engine (whose hooks gather each layer in turn); a no-op for
    any other model. It gathers every weight on every rank: only for the base evaluation."""
    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed  # lazy: optional, and it loads torch

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


# --------------------------------------------------------------------------- launching


def free_port(preferred: int) -> int:
    """``preferred`` when it is free on 127.0.0.1, else a free port the OS picks."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]


def worker_command(task_module: str, overrides: List[str], run_dir: Path) -> List[str]:
    """The command each worker runs: the same task and overrides, in rank 0's run folder.

    Each worker's Hydra would otherwise compute its own timestamped run folder. Hydra's copy of
    the config (``.hydra/``) was written by this launching process already.
    """
    kept = [o for o in overrides if not o.startswith(("hydra.run.dir=", "hydra.output_subdir="))]
    return ["-m", task_module, *kept, f"hydra.run.dir={run_dir}", "hydra.output_subdir=null"]


def launch(cfg: DistributedConfig, task_module: str, overrides: List[str], run_dir: Path) -> None:
    """Runs ``nproc_per_node`` workers of ``python -m task_module`` on this node and waits.

    torch's elastic launcher is what ``torchrun --standalone`` runs: it sets RANK, LOCAL_RANK,
    WORLD_SIZE and the rendezvous address, streams the workers' output and fails when one fails.

    Raises:
        PipelineError: when a worker fails (naming the failure and where its log is).
    """
    # lazy: start-up must not pay for torch
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    port = free_port(cfg.master_port)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=cfg.nproc_per_node,
                          run_id=f"pipeline-{os.getpid()}", rdzv_backend="c10d",
                          rdzv_endpoint=f"127.0.0.1:{port}", max_restarts=0, monitor_interval=1)
    log.info("launching %d workers (%s%s) on 127.0.0.1:%d", cfg.nproc_per_node, cfg.strategy,
             f" ZeRO-{cfg.zero_stage}" if cfg.strategy == "deepspeed" else "", port)
    env_before = dict(os.environ)
    try:
        elastic_launch(config, sys.executable)(*worker_command(task_module, overrides, run_dir))
    except ChildFailedError as err:
        raise PipelineError(f"a training worker failed: {err.format_msg().strip()}\n"
                            f"see {run_dir}/*.log for the workers' output") from err
    finally:  # the agent leaves its rendezvous variables in this process's environment
        os.environ.clear()
        os.environ.update(env_before)


# --------------------------------------------------------------------------- checks


def check(cfg: DistributedConfig, adapter: Optional[AdapterSettings], trainer_precision: str,
          cuda_devices: Optional[int], deepspeed_installed: bool) -> List[str]:
    """Problems with running ``adapter`` under ``cfg`` (empty when fine); never raises.

    Args:
        cfg: the ``distributed`` settings.
        adapter: the adapter settings object (its ``method``, ``quantized``, quantization).
        trainer_precision: ``trainer.precision``.
        cuda_devices: GPUs visible to this process, or None without CUDA.
        deepspeed_installed: whether ``import deepspeed`` would work.
    """
    problems = []
    if cfg.strategy == "single" and cfg.nproc_per_node > 1:
        problems.append(f"distributed.nproc_per_node={cfg.nproc_per_node} needs several processes; "
                        "choose distributed=ddp or a DeepSpeed option (zero1, zero2, zero3, ...)")
    if cuda_devices and cfg.nproc_per_node > cuda_devices and not under_launcher():
        problems.append(f"distributed.nproc_per_node={cfg.nproc_per_node} but only {cuda_devices} "
                        f"GPU(s) are visible; use distributed.nproc_per_node={cuda_devices} or fewer")
    if cfg.backend not in (None, "nccl", "gloo"):
        problems.append(f"distributed.backend={cfg.backend!r} is not one of null, nccl, gloo")
    if cfg.strategy == "deepspeed":
        problems += _check_deepspeed(cfg, adapter, trainer_precision, deepspeed_installed)
    elif cfg.zero_stage or cfg.offload_optimizer or cfg.offload_params:
        problems.append(f"distributed.zero_stage / offload_* are DeepSpeed settings, ignored with "
                        f"distributed.strategy={cfg.strategy}; use distributed=zero1/zero2/zero3")
    return problems


def _check_deepspeed(cfg: DistributedConfig, adapter: Optional[AdapterSettings], precision: str,
                     installed: bool) -> List[str]:
    problems = []
    if not installed:
        problems.append("distributed.strategy=deepspeed needs DeepSpeed: pip install 'pipeline[deepspeed]' "
                        "(or choose distributed=ddp)")
    if cfg.zero_stage not in (1, 2, 3):
        problems.append(f"distributed.zero_stage={cfg.zero_stage} must be 1, 2 or 3 with DeepSpeed")
    if cfg.offload_params and cfg.zero_stage != 3:
        problems.append("distributed.offload_params needs distributed.zero_stage=3 (only ZeRO-3 "
                        "shards parameters); use distributed=zero3_offload")
    if getattr(adapter, "quantized", False):
        quantization = adapter.quantization()
        if quantization.bits == 8 and cfg.zero_stage == 3:
            problems.append("adapter.bits=8 cannot be sharded by ZeRO-3 (bitsandbytes' 8-bit weights "
                            "are not partitionable); use adapter.bits=4 with adapter.quant_storage, "
                            "or distributed=zero2")
        elif cfg.zero_stage == 3:
            compute = quantization.compute_dtype
            if quantization.quant_storage != compute:
                problems.append(f"adapter=qlora under ZeRO-3 needs adapter.quant_storage equal to the "
                                f"compute dtype ({compute}), or the 4-bit weights cannot be sharded: "
                                f"set adapter.quant_storage={compute}")
            if not cfg.zero_init:
                problems.append("adapter=qlora under ZeRO-3 needs distributed.zero_init=true (the "
                                "quantized base must load already sharded)")
    if cfg.zero_stage == 3 and getattr(adapter, "method", "") != "full" and not cfg.gather_16bit_weights_on_save:
        problems.append("distributed.gather_16bit_weights_on_save=false under ZeRO-3 saves an empty "
                        "adapter; set it to true")
    return problems
