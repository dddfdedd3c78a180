"""Small adapters and run folders on the tiny Llama, for the serve and export tests."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import List

from pipeline.adapters.registry import ADAPTERS
from pipeline.commands.compose import record
from pipeline.config.options import load_option
from pipeline.model import loading
from pipeline.runs.runfolder import RunFolder
from tests.conftest import compose_train


def make_lora(base_folder: str, path: Path, seed: int) -> Path:
    """A LoRA adapter (q_proj, v_proj, r=4) whose B is random, so that it changes the outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_folder)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(path)
    return path


def make_bottleneck(base_folder: str, path: Path, seed: int) -> Path:
    """A bottleneck adapter (the pipeline's PEFT tuner) with a random up-projection."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_folder)
    architecture = loading.describe(base_folder, load_option("model", "tiny_llama"))
    tuned = ADAPTERS["bottleneck"](r=8).apply(model, architecture)
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if "bottleneck_" in name:
                param.normal_(0, 0.1)
    tuned.save_pretrained(path)
    return path


def make_run(run_dir: Path, adapter: Path, overrides: List[str]) -> Path:
    """A finished-looking run folder: the composed train config and ``adapter`` as its adapter/."""
    cfg = compose_train(["model=tiny_llama", "debug=fast", "logger=none", *overrides], run_dir)
    RunFolder(run_dir).start(record(cfg), overrides)
    shutil.copytree(adapter, run_dir / "adapter")
    RunFolder(run_dir).finish("success")
    return run_dir
