"""Adding an adapter method takes one module in pipeline/adapters/ and one YAML in conf/adapter/.

The test writes both for a method the project does not have (PEFT's LayerNorm tuning), touches
nothing else, and runs it end to end in fresh processes: train, the memory estimate, re-evaluate
the saved adapter, and every registry-driven list (config options, the schema) sees it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, read_json

MODULE = '''"""LayerNorm tuning (PEFT's LN_TUNING): only the normalisation weights train."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.adapters.registry import AdapterSettings, register_adapter


@register_adapter("{name}")
@dataclass
class LnTuningSettings(AdapterSettings):
    method: str = "{name}"

    def apply(self, model: Any, architecture: Any) -> Any:
        from peft import LNTuningConfig, get_peft_model

        return get_peft_model(model, LNTuningConfig(task_type="CAUSAL_LM"))
'''
YAML = """# LayerNorm tuning (a method added by a test).
defaults:
  - /schema/adapter/{name}@_here_
  - _self_
"""


@pytest.fixture
def new_method():
    """The method's module and YAML, written where a contributor would put them, then removed."""
    name = f"ln_tuning_{os.getpid()}"
    module = ROOT / "pipeline" / "adapters" / f"{name}.py"
    option = ROOT / "conf" / "adapter" / f"{name}.yaml"
    module.write_text(MODULE.format(name=name))
    option.write_text(YAML.format(name=name))
    try:
        yield name
    finally:
        module.unlink()
        option.unlink()
        for cached in (ROOT / "pipeline" / "adapters" / "__pycache__").glob(f"{name}.*"):
            cached.unlink()


def _run(*args: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.mark.slow
def test_a_method_is_one_module_and_one_yaml(new_method, tmp_path):
    fast = ["model=tiny_llama", "debug=fast", "logger=none", f"adapter={new_method}",
            f"paths.base_cache_dir={tmp_path / 'cache'}"]
    run_dir = tmp_path / "run"
    _run("-m", "pipeline.train", *fast, f"hydra.run.dir={run_dir}")
    info, metrics = read_json(run_dir / "run.json"), read_json(run_dir / "metrics.json")
    assert info["status"] == "success" and f"method: {new_method}" in (run_dir / "config.yaml").read_text()
    # Only the norms train: 2 layers x 2 norms + the final norm, 64 weights each (tiny Llama).
    assert metrics["params/trainable"] == 5 * 64
    assert json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LN_TUNING"
    assert metrics["tuned/test/loss"] != metrics["base/test/loss"]

    # The memory estimate asks the method for its trainable layers (on the meta device).
    estimate = _run("-m", "pipeline.estimate", *fast)
    assert "320 trainable" in estimate.stdout + estimate.stderr

    # The saved adapter loads through the registry's one loader, and measures as trained.
    again = tmp_path / "evaluate"
    _run("-m", "pipeline.evaluate", f"run={run_dir}", "evaluation.metrics=[]", f"hydra.run.dir={again}")
    reevaluated = read_json(again / "metrics.json")
    assert reevaluated["tuned/test/loss"] == pytest.approx(metrics["tuned/test/loss"], rel=1e-4)

    # Tests and benchmarks list the registry, so they include the new method too.
    listed = _run("-c", "from pipeline.adapters.registry import ADAPTERS; "
                        "import benchmarks.method_throughput as throughput; "
                        "print(sorted(ADAPTERS)); print(throughput.trained_methods())")
    assert listed.stdout.count(new_method) == 2
