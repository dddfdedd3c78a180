"""Multi-process training: DeepSpeed configs, validation, and 2-process CPU runs over gloo.

The slow tests start the real command (``python -m pipeline.train distributed=... 
distributed.nproc_per_node=2``), which launches its own workers, and compare each strategy with
one single-process run at the same global batch (8 = 2 processes x 4).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch

from pipeline.commands.compose import checked_train, typed_config
from pipeline.config.errors import ConfigError
from pipeline.config.options import typed
from pipeline.config.schema import DistributedConfig
from pipeline.model import precision
from pipeline.trainer import build, distributed
from tests.conftest import CONF, ROOT, compose_train, python_path

# fp32 on every CPU kind (auto picks bf16 on AVX512-bf16, where DeepSpeed then keeps and saves
# bf16 weights) and no dropout (each rank draws its own masks): the runs then compare to the
# last digits the all-reduce order moves.
STEPS = ["model=tiny_llama", "debug=fast", "trainer.sampling=random", "evaluation.metrics=[]",
         "trainer.max_steps=4", "trainer.save_steps=2", "trainer.eval_steps=null", "trainer.precision=fp32",
         "adapter.lora_dropout=0"]


def _settings(**fields):
    return typed(DistributedConfig, fields)


# --------------------------------------------------------------------------- config and checks


def test_every_distributed_option_composes_and_validates(tmp_path):
    options = sorted(p.stem for p in (CONF / "distributed").glob("*.yaml"))
    assert options == ["ddp", "single", "zero1", "zero2", "zero2_offload", "zero3", "zero3_offload"]
    stages = {}
    for name in options:
        cfg = checked_train(compose_train(["model=tiny_llama", "debug=fast", f"distributed={name}"], tmp_path))
        # (deepspeed is installed with the test extra: its options validate)
        stages[name] = (cfg.distributed.strategy, cfg.distributed.zero_stage,
                        cfg.distributed.offload_optimizer, cfg.distributed.offload_params)
    assert stages["single"] == ("single", 0, False, False)
    assert stages["zero2_offload"] == ("deepspeed", 2, True, False)
    assert stages["zero3_offload"] == ("deepspeed", 3, True, True)


def test_deepspeed_json_leaves_trainer_values_auto():
    ds = distributed.deepspeed_config(_settings(strategy="deepspeed", zero_stage=3))
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"):
        assert ds[key] == "auto"
    assert ds["bf16"] == {"enabled": "auto"} and ds["fp16"] == {"enabled": "auto"}
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert "optimizer" not in ds  # the Trainer's torch AdamW: nothing to compile

    offload = distributed.deepspeed_config(_settings(strategy="deepspeed", zero_stage=2, offload_optimizer=True,
                                                     deepspeed_extra={"zero_optimization": {"overlap_comm": False}}))
    assert offload["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert offload["zero_optimization"]["overlap_comm"] is False  # extra merged, siblings kept
    assert offload["zero_optimization"]["stage"] == 2
    assert offload["optimizer"]["params"]["lr"] == "auto"


@pytest.mark.parametrize("requested", ["fp32", "bf16", "auto"])
def test_deepspeed_json_is_accepted_by_the_trainer(tmp_path, requested):
    """transformers fills every ``auto`` from TrainingArguments (no process group needed)."""
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    cfg = typed_config(compose_train([*STEPS, "distributed=zero2", f"trainer.precision={requested}"], tmp_path))
    hf = HfTrainerDeepSpeedConfig(distributed.deepspeed_config(cfg.distributed))
    args = build.training_arguments(cfg.trainer, tmp_path, 0, has_eval=False, report_to=[], run_name="x")
    hf.trainer_config_process(args)
    filled = json.dumps(hf.config)
    assert '"auto"' not in filled.replace('"reduce_bucket_size": "auto"', "")
    bf16 = precision.resolve(requested).precision == "bf16"  # auto: what this machine picks
    assert hf.config["train_micro_batch_size_per_gpu"] == 4 and hf.config["bf16"]["enabled"] is bf16
    assert args.use_cpu  # without it, every CPU rank would train on the same batches


@pytest.mark.parametrize("overrides, expected", [
    (["distributed=zero3", "adapter=qlora", "adapter.compute_dtype=float32"], "adapter.quant_storage=float32"),
    (["distributed=zero3", "adapter=qlora", "adapter.compute_dtype=bfloat16"], "adapter.quant_storage=bfloat16"),
    (["distributed=zero3", "adapter=qlora", "adapter.bits=8"], "adapter.bits=8 cannot be sharded by ZeRO-3"),
    (["distributed=zero3", "adapter=qlora", "adapter.quant_storage=float32", "distributed.zero_init=false"],
     "distributed.zero_init=true"),
    (["distributed.nproc_per_node=2"], "choose distributed=ddp"),
    (["distributed=zero2", "distributed.offload_params=true"], "distributed.offload_params needs"),
    (["distributed=zero3", "distributed.gather_16bit_weights_on_save=false"], "saves an empty adapter"),
    (["distributed=ddp", "distributed.zero_stage=2"], "ignored with distributed.strategy=ddp"),
    (["distributed=zero2", "distributed.zero_stage=0"], "distributed.zero_stage=0 must be 1, 2 or 3"),
])
def test_validation_names_incompatible_combinations(tmp_path, overrides, expected):
    cfg = compose_train(["model=tiny_llama", "debug=fast", *overrides], tmp_path)
    with pytest.raises(ConfigError) as err:
        checked_train(cfg)
    assert expected in str(err.value)


def test_checks_without_deepspeed_or_enough_gpus(monkeypatch):
    for name in distributed.LAUNCHER_ENV:
        monkeypatch.delenv(name, raising=False)
    ddp = _settings(strategy="ddp", nproc_per_node=8)
    assert "only 2 GPU(s) are visible" in " ".join(distributed.check(ddp, None, "bf16", 2, True))
    zero = _settings(strategy="deepspeed", zero_stage=2)
    assert "pip install 'pipeline[deepspeed]'" in " ".join(distributed.check(zero, None, "fp32", None, False))
    assert distributed.check(zero, None, "fp32", None, True) == []


def test_launch_detection_and_slurm_environment(monkeypatch):
    # A copy: from_slurm_env writes the environment, which later tests' subprocesses inherit.
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items()
                                        if k not in ("LOCAL_RANK", "WORLD_SIZE", "RANK", "MASTER_PORT")})
    ddp = _settings(strategy="ddp", nproc_per_node=2)
    assert distributed.needs_launch(ddp) and not distributed.needs_launch(_settings(strategy="ddp"))
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_PROCID", "9")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    monkeypatch.setenv("MASTER_ADDR", "node001")
    assert distributed.from_slurm_env()
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"]) == ("9", "1", "16")
    assert os.environ["MASTER_PORT"] == "29734"
    assert not distributed.needs_launch(ddp)  # srun started the processes: no second launch
    assert not distributed.is_main_process()


def test_workers_join_the_launching_run_folder():
    cmd = distributed.worker_command("pipeline.train", ["distributed=ddp", "hydra.run.dir=/elsewhere"],
                                     Path("/runs/a"))
    assert cmd == ["-m", "pipeline.train", "distributed=ddp", "hydra.run.dir=/runs/a",
                   "hydra.output_subdir=null"]


# --------------------------------------------------------------------------- 2-process runs


def _clean_env() -> Dict[str, str]:
    """This environment without any launcher's variables: the command must launch its workers."""
    launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher and not k.startswith("SLURM_")}
    return {**env, "DS_ACCELERATOR": "cpu", "WANDB_SILENT": "true", "PYTHONPATH": python_path()}


def _train_cli(overrides: List[str], run_dir: Path) -> subprocess.CompletedProcess:
    env = _clean_env()
    return subprocess.run([sys.executable, "-m", "pipeline.train", *overrides, f"hydra.run.dir={run_dir}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _history(run_dir: Path) -> Dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/loss" in r]
    steps = [r["step"] for r in train]
    assert len(steps) == len(set(steps)), f"a step was logged twice (by two ranks?): {steps}"
    return {r["step"]: r for r in train}


def _adapter_tensors(run_dir: Path) -> Dict[str, tuple]:
    from safetensors.torch import load_file

    return {k: tuple(v.shape) for k, v in load_file(str(run_dir / "adapter" / "adapter_model.safetensors")).items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One process at the global batch the 2-process runs use (8)."""
    run_dir = tmp_path_factory.mktemp("single")
    done = _train_cli([*STEPS, "trainer.per_device_train_batch_size=8"], run_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def _assert_matches_single(run_dir: Path, reference: Path) -> None:
    ours, single = _history(run_dir), _history(reference)
    assert sorted(ours) == [1, 2, 3, 4]
    for step in ours:
        # Equal token counts: the two ranks drew the two halves of the single run's batch, not
        # the same half twice (what happens on CPU without TrainingArguments(use_cpu=True)).
        assert ours[step]["train/num_input_tokens_seen"] == single[step]["train/num_input_tokens_seen"]
        assert ours[step]["train/loss"] == pytest.approx(single[step]["train/loss"], rel=1e-3)


def _adapter_weights(run_dir: Path) -> Dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


# distributed option -> extra overrides: zero.Init (what QLoRA + ZeRO-3 relies on) and the
# two offload variants run for real, 2 processes on CPU.
TWO_PROCESS = {"ddp": [], "zero3": [], "zero3_init": ["distributed.zero_init=true"],
               "zero2_offload": [], "zero3_offload": []}


@pytest.mark.slow
@pytest.mark.parametrize("option", list(TWO_PROCESS))
def test_two_processes_match_one_at_the_same_global_batch(reference, tmp_path, option):
    if option == "ddp":  # under torchrun, where Hydra in each rank names its own run folder
        run_dir = tmp_path
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               "--nproc_per_node", "2", "-m", "pipeline.train", *STEPS, "distributed=ddp",
                               f"hydra.run.dir={tmp_path}/rank${{oc.env:RANK}}"],
                              cwd=ROOT, env=_clean_env(), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert not (run_dir / "rank1").exists()  # rank 1 adopted rank 0's folder and removed its own
        tmp_path = run_dir / "rank0"
    else:  # launched by the command itself
        group = "zero3" if option == "zero3_init" else option
        done = _train_cli([*STEPS, f"distributed={group}", "distributed.nproc_per_node=2", *TWO_PROCESS[option]],
                          tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        ds = json.loads((tmp_path / "deepspeed.json").read_text())["zero_optimization"]
        assert ds["stage"] == (3 if group.startswith("zero3") else 2)
        assert ("offload_optimizer" in ds) == option.endswith("offload")
        assert ("offload_param" in ds) == (option == "zero3_offload")
        if option == "zero3_init":
            assert "loads already sharded (deepspeed.zero.Init)" in done.stderr + done.stdout
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["status"] == "success" and info["attempts"] == 1  # rank 0 alone wrote it
    _assert_matches_single(tmp_path, reference)
    shapes = _adapter_tensors(tmp_path)
    assert shapes == _adapter_tensors(reference)  # ZeRO-3 gathered every shard before saving
    assert all(0 not in shape for shape in shapes.values())
    # The saved adapter is the single-process one (to the last digits the all-reduce order moves).
    ours, single = _adapter_weights(tmp_path), _adapter_weights(reference)
    for name in single:
        torch.testing.assert_close(ours[name], single[name], rtol=1e-3, atol=1e-5)
    assert (tmp_path / "deepspeed.json").exists() == option.startswith("zero")


@pytest.mark.slow
def test_zero2_matches_one_process_and_resumes_from_its_checkpoint(reference, tmp_path):
    overrides = [*STEPS, "distributed=zero2", "distributed.nproc_per_node=2"]
    first = _train_cli(overrides, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    _assert_matches_single(tmp_path, reference)
    assert json.loads((tmp_path / "deepspeed.json").read_text())["zero_optimization"]["stage"] == 2
    # As if the job had died after step 2: continue from the ZeRO-2 checkpoint of step 2.
    shutil.rmtree(tmp_path / "checkpoints" / "checkpoint-4")
    again = _train_cli([*overrides, f"resume={tmp_path}"], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["status"] == "success" and info["attempts"] == 2
    # The history was rewound to checkpoint-2 and steps 3-4 logged again: each step once.
    rows = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]
    resumed = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r and r["step"] > 2}
    single = _history(reference)
    assert sorted(resumed) == [3, 4]
    for step, loss in resumed.items():  # the optimizer state and data order came back too
        assert loss == pytest.approx(single[step]["train/loss"], rel=1e-3)


# --------------------------------------------------------------------------- SLURM (submitit)


def test_slurm_launcher_runs_one_task_per_gpu(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "hydra.launcher.nodes=2",
                                          "hydra.launcher.gpus_per_node=4", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node, launcher.partition) == (2, 4, 4, "gpu")


@pytest.mark.slow
def test_submitit_local_multirun_finishes_every_job(tmp_path):
    env = _clean_env()
    done = subprocess.run([sys.executable, "-m", "pipeline.train", "-m", "hydra/launcher=local",
                           "model=tiny_llama", "debug=fast", "evaluation.metrics=[]", "trainer.max_steps=2",
                           "trainer.save_steps=null", "trainer.eval_steps=null", "adapter=lora,ia3",
                           f"hydra.sweep.dir={tmp_path}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = sorted(p.parent.name for p in tmp_path.glob("*/run.json"))
    assert runs == ["0_lora", "1_ia3"]
    for name in runs:
        info = json.loads((tmp_path / name / "run.json").read_text())
        assert info["status"] == "success", info.get("error")
        assert json.loads((tmp_path / name / "metrics.json").read_text())["train/steps"] == 2
    assert list((tmp_path / ".submitit").glob("*/*_result.pkl"))  # submitit ran the jobs
