"""W&B and the comparison: the report run logs every table and plot, and a training run's W&B
config is its resolved config, so the W&B UI (and ``--wandb-project``) can group by any setting.

Offline runs are read back from their folder: ``wandb leet inspect --summary --json`` for the
config and the summary, the run's ``files/media`` for the logged tables and images (an offline
run writes its ``files/config.yaml`` only when synced). A readback that fails fails the test.
"""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path
from typing import Any, Dict

import pytest
import yaml

from pipeline.comparison import collect, grouping, page, writer
from tests.conftest import read_json, run_train


def _offline_run(folder: Path) -> Path:
    runs = list((folder / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, f"expected one offline W&B run in {folder / 'wandb'}, found {runs}"
    return runs[0]


def _inspect(offline: Path) -> Dict[str, Any]:
    """The run as ``wandb leet inspect --summary --json`` reads it: config, summary, state ..."""
    out = subprocess.run(["wandb", "leet", "inspect", "--summary", "--json", str(offline)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"wandb leet inspect --summary failed: {out.stderr[-500:]}"
    return json.loads(out.stdout)


def _png_size(path: Path) -> tuple:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", header[16:24])


@pytest.fixture(scope="module")
def logged_report(tmp_path_factory):
    """The report of the fake compare_methods multirun, logged offline; its result and summary."""
    from tests.report_runs import write_methods_multirun

    root = write_methods_multirun(tmp_path_factory.mktemp("wandb") / "multirun" / "2026-12-01" / "11-00-00")
    out = root / "report"
    result = writer.write_report(collect.runs_from_folder(root), out, replicates=200)
    page.log_to_wandb(result, out, "tests", "2026-12-01_11-00-00", "offline")
    offline = _offline_run(out)
    return result, offline, _inspect(offline)["summary"]


def test_report_run_logs_each_table_as_a_wandb_table(logged_report):
    result, offline, summary = logged_report
    expected = page.wandb_tables(result)
    assert set(expected) == {"report/comparison", "report/paired_differences", "report/pareto_front",
                             "report/retention"}
    for key, (columns, rows) in expected.items():
        assert summary[key]["_type"] == "table-file", key
        logged = read_json(offline / "files" / summary[key]["path"])
        assert logged["columns"] == columns, key
        _assert_same_rows(logged["data"], rows)
    comparison_rows = {row[0]: dict(zip(expected["report/comparison"][0], row))
                       for row in read_json(offline / "files" / summary["report/comparison"]["path"])["data"]}
    assert comparison_rows["lora"]["tuned/test/bleu mean"] == pytest.approx(result["table"]["lora"]["tuned/test/bleu"][0])
    assert comparison_rows["full"]["runs"] == 2 and comparison_rows["full"]["method"] == "full"
    pareto = read_json(offline / "files" / summary["report/pareto_front"]["path"])
    assert [row[0] for row in pareto["data"] if row[-1]] == result["pareto"]


def _assert_same_rows(logged: list, expected: list) -> None:
    """Rows equal cell by cell, floats to rounding (W&B writes them as JSON)."""
    assert len(logged) == len(expected)
    for got, want in zip(logged, expected):
        assert len(got) == len(want) and all(a == (pytest.approx(b) if isinstance(b, float) else b)
                                             for a, b in zip(got, want)), (got, want)


def test_report_run_logs_every_plot_as_a_wandb_image(logged_report):
    result, offline, summary = logged_report
    images = {k: v for k, v in summary.items() if isinstance(v, dict) and v.get("_type") == "image-file"}
    assert set(images) == {f"report/{p.stem}" for p in result["images"]} and len(images) == 5
    for path in result["images"]:
        logged = images[f"report/{path.stem}"]
        assert (logged["width"], logged["height"]) == _png_size(path)
        assert (offline / "files" / logged["path"]).read_bytes() == path.read_bytes()


def test_training_run_wandb_config_is_its_resolved_config(tmp_path):
    """The W&B config holds the whole resolved config, nested, so W&B shows and groups by
    ``adapter.r`` or any other override; the report's W&B reader flattens it to the same keys.

    Two known differences from the run folder's ``config.yaml``: W&B drops empty mappings
    (``trainer.extra: {}``), and it is started after ``trainer.precision=auto`` is applied, so
    it holds the precision chosen (``run.json``'s ``precision.resolved``). transformers' W&B
    callback adds the TrainingArguments and the model config beside it.
    """
    run_dir = tmp_path / "run"
    run_train(["model=tiny_llama", "debug=fast", "logger=wandb", "logger.wandb.project=tests",
               "adapter.r=4", "trainer.learning_rate=5e-4"], run_dir)
    logged = grouping.flatten(_inspect(_offline_run(run_dir))["config"])
    resolved = grouping.flatten(yaml.safe_load((run_dir / "config.yaml").read_text()))
    resolved = {key: value for key, value in resolved.items() if value != {}}
    resolved["trainer.precision"] = read_json(run_dir / "run.json")["precision"]["resolved"]
    assert {key: logged.get(key, "absent") for key in resolved} == resolved
    assert logged["adapter.r"] == 4 and logged["trainer.learning_rate"] == 5e-4
    assert logged["evaluation.decoding.seed"] == 42  # interpolations resolved, not "${seed}"
