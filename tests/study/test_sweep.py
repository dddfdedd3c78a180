"""Optuna sweeps: sweep files, the conditional search space, up-front checks, and real sweeps on
the tiny model (pruning, a failing trial, kill and resume, two workers, PostgreSQL, submitit)."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import optuna
import pytest

from pipeline import export, serve
from pipeline.commands.compose import checked_train, typed_config
from pipeline.config.errors import ConfigError
from pipeline.config.ranges import range_problems
from pipeline.config.schema import SweepParam, TrainConfig, TrainerConfig
from pipeline.runs.runfolder import write_json
from pipeline.server import plan
from pipeline.study import definition, driver, summary as sweep_summary, trial as sweep_trial
from pipeline.trainer import memory, tracking
from pipeline.trainer.build import evaluation_slice
from tests.conftest import ROOT, compose_train, python_path, read_json
from tests.server.test_serve import compose_serve
from tests.test_export import compose_export

SWEEPS = sorted(p.stem for p in (ROOT / "sweeps").glob("*.yaml"))
# Seconds per trial: tiny model, losses only (no generation), no checkpoints.
FAST = ["model=tiny_llama", "debug=fast", "evaluation=perplexity", "trainer.save_steps=null",
        "trainer.max_steps=4", "trainer.eval_steps=2"]
FINISHED = ("success", "pruned", "failed")


def sweep_command(name: str, out: Path, *extra: str) -> List[str]:
    return [sys.executable, "-m", "pipeline.train", "-m", f"sweep={name}", *FAST,
            f"paths.output_dir={out}", *extra]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": python_path(), "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "1"}


def run_sweep(cmd: List[str], timeout: int = 600) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def load(folder: Path, name: str, url: str = "") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=url or f"sqlite:///{folder / 'study.db'}")


def run_statuses(folder: Path) -> List[str]:
    statuses = []
    for info in folder.glob("trial_*/run.json"):
        try:
            statuses.append(read_json(info)["status"])
        except ValueError:  # being replaced this instant
            pass
    return statuses


def mid_trial(folder: Path, finished: int) -> bool:
    """At least ``finished`` trials done and one training right now (it has logged a step)."""
    statuses = run_statuses(folder)
    training = [p for p in folder.glob("trial_*/history.jsonl")
                if read_json(p.parent / "run.json")["status"] == "running"]
    return sum(s in FINISHED for s in statuses) >= finished and bool(training)


# --------------------------------------------------------------------------- definitions and checks


def compose_sweep(name: str, tmp_path: Path, *overrides: str) -> TrainConfig:
    """A sweep's composed train config, typed (as the sweeper hands it to the driver)."""
    return typed_config(compose_train([f"sweep={name}", f"paths.output_dir={tmp_path}", *overrides], tmp_path))


@pytest.mark.parametrize("name", SWEEPS)
def test_every_sweep_file_composes_and_passes_checks(name, tmp_path):
    assert {"lora_rank_alpha_lr", "qlora_rank_alpha_lr", "quality_vs_params"} <= set(SWEEPS)
    cfg = checked_train(compose_train([f"sweep={name}", f"paths.output_dir={tmp_path}"], tmp_path))
    assert definition.check(cfg) == []
    assert cfg.sweep.name == name and cfg.sweep.trial is None
    header = (ROOT / "sweeps" / f"{name}.yaml").read_text()
    assert f"python -m pipeline.train -m sweep={name}" in header  # the exact command
    if cfg.sweep.pruner is not None:
        assert cfg.trainer.eval_steps and definition.intermediate_metric(cfg) == "eval_loss"


def test_sweep_file_selects_the_sweeper_and_a_stable_folder(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["sweep=qlora_rank_alpha_lr", f"paths.output_dir={tmp_path}",
                                          "sweep.trial=7"], return_hydra_config=True)
    assert cfg.hydra.sweeper._target_.endswith("PipelineOptunaSweeper")
    assert cfg.adapter.method == "qlora"
    # No date or time in the folder: a resumed sweep (and its W&B group) stays the same.
    assert cfg.hydra.sweep.dir == f"{tmp_path}/sweeps/qlora_rank_alpha_lr"
    assert cfg.hydra.sweep.subdir == "trial_7"
    assert tracking.multirun_group(Path(cfg.hydra.sweep.dir)) == "sweeps_qlora_rank_alpha_lr"


def test_the_sweeper_needs_a_sweep_definition(tmp_path):
    cfg = typed_config(compose_train(["model=tiny_llama"], tmp_path))
    with pytest.raises(ConfigError, match="hydra/sweeper=pipeline_optuna needs a sweep definition"):
        driver.run(cfg, tmp_path, lambda jobs, first: [], [])


def test_search_space_is_conditional(tmp_path):
    cfg = compose_sweep("quality_vs_params", tmp_path)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0),
                                directions=["minimize", "minimize"])
    seen = set()
    for _ in range(30):
        values = definition.suggest(study.ask(), cfg)
        seen.add(values["adapter"])
        if values["adapter"] == "ia3":  # IA3 has no rank, alpha or dropout
            assert set(values) == {"adapter", "trainer.learning_rate"}
        else:
            assert values["adapter.lora_alpha"] / values["adapter.r"] in (1, 2)
            assert 0 <= values["adapter.lora_dropout"] <= 0.2
    assert seen == {"lora", "dora", "ia3"}
    # Optuna samples the multiple, under a name that says so.
    assert any("adapter.lora_alpha/adapter.r" in t.params for t in study.trials)
    assert definition.overrides({"adapter": "lora", "adapter.r": 8, "x": [1, "a b"], "y": None}) == [
        "adapter=lora", "adapter.r=8", "x=[1,'a b']", "y=null"]


def test_up_front_checks_name_key_and_fix(tmp_path):
    with pytest.raises(ConfigError, match="sweep.n_trials=0 must be > 0"):  # a value's own range: the config's check
        compose_sweep("lora_rank_alpha_lr", tmp_path, "sweep.n_trials=0")
    cfg = compose_sweep("lora_rank_alpha_lr", tmp_path, "objective.metric=tuned/test/loss",
                        "trainer.eval_steps=null")
    cfg.sweep.params["trainer.learning_rat"] = SweepParam(type="float", low=1e-4, high=1e-3)
    cfg.sweep.params["adapter.r"] = SweepParam(type="categorical", choices=[])
    cfg.sweep.params["trainer.sampling"] = SweepParam(type="categorical", choices=["random", "bogus"])
    cfg.sweep.params["trainer.max_steps"] = SweepParam(type="categorical", choices=[10, "ten"])
    problems = "\n".join(definition.check(cfg))
    assert "sweep.params.trainer.learning_rat: trainer.learning_rat is not a key" in problems
    assert "sweep.params.adapter.r is categorical: give it choices" in problems
    assert ("sweep.params.trainer.sampling has choice 'bogus' that trainer.sampling does not take: "
            "Invalid value 'bogus', expected one of [random, group_by_length, sequential]") in problems
    assert ("sweep.params.trainer.max_steps has choice 'ten' that trainer.max_steps does not take: "
            "Value 'ten' of type 'str' could not be converted to Integer") in problems
    assert "'random'" not in problems and "choice 10 " not in problems
    assert "'tuned/test/loss' is not measured during training" in problems
    assert "sweep.pruner needs trainer.eval_steps" in problems

    multi = compose_sweep("quality_vs_params", tmp_path)
    multi.sweep.pruner = {"_target_": "optuna.pruners.MedianPruner"}
    assert any("sweep.pruner needs a single objective" in p for p in definition.check(multi))
    bleu = compose_sweep("lora_rank_alpha_lr", tmp_path, "objective.metric=tuned/eval/bleu",
                         "evaluation.during_training=true", "evaluation.splits=[eval,test]")
    assert definition.check(bleu) == [] and definition.intermediate_metric(bleu) == "eval_bleu"


def test_multi_objective_report_shows_the_pareto_front(tmp_path):
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.trial import create_trial

    cfg = compose_sweep("quality_vs_params", tmp_path)
    study = optuna.create_study(directions=["minimize", "minimize"])
    dists = {"adapter": CategoricalDistribution(["lora", "ia3"]),
             "trainer.learning_rate": FloatDistribution(1e-4, 3e-3, log=True)}
    points = [("lora", 1e-3, [2.0, 900.0]), ("ia3", 2e-3, [2.5, 100.0]), ("lora", 3e-4, [3.0, 900.0]),
              ("ia3", 2e-4, [2.4, 150.0])]
    for method, lr, values in points:
        study.add_trial(create_trial(
            params={"adapter": method, "trainer.learning_rate": lr}, distributions=dists, values=values,
            user_attrs={"overrides": [f"adapter={method}", f"trainer.learning_rate={lr}"]}))
    summary = sweep_summary.report(study, tmp_path, cfg, ["sweep=quality_vs_params", "model=tiny_llama"])

    front = {row["number"]: row["values"] for row in summary["best"]}
    assert front == {0: {"tuned/eval/loss": 2.0, "params/trainable": 900.0},  # 2 is dominated by 0
                     1: {"tuned/eval/loss": 2.5, "params/trainable": 100.0},
                     3: {"tuned/eval/loss": 2.4, "params/trainable": 150.0}}
    assert summary["best"][0]["command"] == ("python -m pipeline.train sweep=quality_vs_params "
                                            "model=tiny_llama adapter=lora trainer.learning_rate=0.001")
    assert (tmp_path / "pareto_front.png").stat().st_size > 1000
    text = (tmp_path / "report.md").read_text()
    assert "## Pareto front" in text and "| 3 | 2.4 | 150 |" in text
    assert read_json(tmp_path / "report.json")["trials"] == {"COMPLETE": 4}


# --------------------------------------------------------------------------- real sweeps


@pytest.mark.slow
def test_sweep_prunes_survives_a_failing_trial_and_resumes_after_kill(tmp_path):
    name, folder = "lora_rank_alpha_lr", tmp_path / "sweeps" / "lora_rank_alpha_lr"
    folder.mkdir(parents=True)
    # The injected failure: an enqueued dropout that validation rejects (Optuna warns that it is
    # outside the space and passes it on).
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{folder / 'study.db'}")
    study.enqueue_trial({"adapter.lora_dropout": 1.5})
    cmd = sweep_command(name, tmp_path, "sweep.n_trials=12", "sweep.heartbeat_s=1", "sweep.max_failures=4")

    first = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 900
    # the injected trial fails before launch (no run folder): three finished and one training
    while not mid_trial(folder, 3) and first.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)  # no clean-up at all: the harshest stop
    first.wait()
    before = {t.number: t for t in load(folder, name).trials}
    assert len(before) == 5, "the first run was to be killed in its fifth trial"  # injected, 3 done, 1 running
    done_before = {n: t for n, t in before.items() if t.state.name in ("COMPLETE", "PRUNED")}
    infos_before = {n: read_json(folder / f"trial_{n}" / "run.json") for n in done_before}

    output = run_sweep(cmd).stdout + ""
    trials = load(folder, name).trials
    states = {t.number: t.state.name for t in trials}
    assert sorted(states) == list(range(len(trials))) and len(trials) == 12
    # Finished trials were not re-run: same values, same run folders, one attempt each.
    for n, old in done_before.items():
        assert trials[n].state == old.state and trials[n].values == old.values
        assert read_json(folder / f"trial_{n}" / "run.json") == infos_before[n]
    # The trial in flight at the kill failed once its heartbeat went stale, and its run folder
    # says so; numbers continued.
    killed = [n for n, t in before.items() if t.state.name == "RUNNING"]
    assert len(killed) == 1 and states[killed[0]] == "FAIL"
    assert "worker stopped" in read_json(folder / f"trial_{killed[0]}" / "run.json")["error"]
    new = [n for n in states if n not in before]
    assert new and min(new) == max(before) + 1
    # Some trials were pruned, with the run folder saying so and their last reported step.
    pruned = [t for t in trials if t.state.name == "PRUNED"]
    assert pruned, states
    for t in pruned:
        info = read_json(folder / f"trial_{t.number}" / "run.json")
        assert info["status"] == "pruned" and "TrialPruned" in info["error"]
        assert t.last_step == 2
    # Trials evaluate only where successive halving decides (eval_steps=2: rungs 2, 6, ...), so
    # not at step 4, where an evaluation every eval_steps would cost as much and decide nothing.
    assert all(set(t.intermediate_values) == {2} for t in trials if t.state.name in ("COMPLETE", "PRUNED"))
    # The injected trial failed alone, with its error, when its config was checked before launch
    # (no job, no run folder); the rest went on.
    injected = trials[0]
    assert injected.state.name == "FAIL" and "adapter.lora_dropout=1.5 must be in [0, 1)" in injected.user_attrs["error"]
    assert not (folder / "trial_0").exists()
    completed = [t for t in trials if t.state.name == "COMPLETE"]
    for t in completed:
        assert read_json(folder / f"trial_{t.number}" / "run.json")["status"] == "success"
        assert t.user_attrs["config"]["sweep"]["trial"] == t.number  # resolved config on the trial
        assert t.user_attrs["metrics"]["tuned/eval/loss"] == t.value
    # The end-of-sweep report: best trial with a ready command line, importances, plots.
    report = read_json(folder / "report.json")
    best = report["best"][0]
    assert best["number"] == min(completed, key=lambda t: t.value).number
    assert best["command"].startswith(f"python -m pipeline.train sweep={name} model=tiny_llama")
    assert "sweep.n_trials" not in best["command"] and "adapter.lora_alpha=" in best["command"]
    # Too few completed trials for importances: the report says so instead of printing noise.
    assert len(completed) < sweep_summary.MIN_TRIALS_FOR_IMPORTANCE
    assert report["importances"] == {} and "importances need at least" in report["importances_why"]
    assert (folder / "history.png").stat().st_size > 1000 and not (folder / "importances.png").exists()
    assert "Best trial" in (folder / "report.md").read_text() and "sweep report" in output + ""
    # Hydra's record of the command, as sweeps/README.md lists it in the sweep folder
    assert f"name: {name}" in (folder / "multirun.yaml").read_text()


def test_a_trial_whose_config_does_not_compose_fails_alone(tmp_path):
    """A sampled configuration that Hydra cannot compose fails that trial, before launch; the
    trials beside it still launch (the launcher would otherwise stop the sweep with it)."""
    cfg = compose_sweep("lora_rank_alpha_lr", tmp_path)
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}")
    calls = []

    def compose(job):
        calls.append(job)
        broken = ["trainer.max_steps=ten"] if len(calls) == 2 else []  # the second trial's config
        return typed_config(compose_train([f"sweep={cfg.sweep.name}", *job[:-1], *broken], tmp_path / "job"))

    batch, jobs = driver._ask(study, cfg, 3, ["model=tiny_llama"], [], compose)
    states = [t.state.name for t in study.get_trials()]
    assert len(batch) == len(jobs) == 2 and states == ["RUNNING", "FAIL", "RUNNING"]
    error = study.get_trials()[1].user_attrs["error"]
    assert error.startswith("ConfigCompositionException: Error merging override trainer.max_steps=ten")
    assert "could not be converted to Integer" in error


@pytest.mark.slow
def test_sweep_stops_at_max_failures(tmp_path):
    # A value outside its range is refused before any trial starts ...
    cmd = sweep_command("lora_rank_alpha_lr", tmp_path, "sweep.max_failures=2", "trainer.warmup_ratio=2")
    done = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "trainer.warmup_ratio=2.0 must be in [0, 1)" in done.stderr
    assert not (tmp_path / "sweeps" / "lora_rank_alpha_lr" / "study.db").exists()
    # ... one only TrainingArguments refuses fails each trial, until max_failures stops the sweep.
    cmd = sweep_command("lora_rank_alpha_lr", tmp_path, "sweep.max_failures=2", "+trainer.extra.warmup_steps=-3")
    done = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "2 failed trials reached sweep.max_failures=2" in done.stderr
    trials = load(tmp_path / "sweeps" / "lora_rank_alpha_lr", "lora_rank_alpha_lr").trials
    assert [t.state.name for t in trials] == ["FAIL", "FAIL"]
    assert all("warmup_steps = -3" in t.user_attrs["error"] for t in trials)


def postgres_url() -> str:
    """The PostgreSQL server .ci/run starts: with PIPELINE_TEST_POSTGRES set (CI), an unreachable
    server fails the test; without it (a developer's machine), the test skips unless the default
    local server answers."""
    given = os.environ.get("PIPELINE_TEST_POSTGRES")
    url = given or "postgresql://pipeline:pipeline@127.0.0.1:5432/pipeline_test"
    try:
        import psycopg  # SQLAlchemy's driver for postgresql:// URLs

        psycopg.connect(url, connect_timeout=3).close()
    except Exception as err:
        if given:
            pytest.fail(f"PIPELINE_TEST_POSTGRES={url} is set but unusable: {type(err).__name__}: {err}")
        pytest.skip(f"no PostgreSQL server at {url} ({str(err).strip()}); .ci/postgres starts one and "
                    "prints the URL for PIPELINE_TEST_POSTGRES")
    return url


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_workers_share_one_study(backend, tmp_path):
    name = f"workers_{backend}_{os.getpid()}_{int(time.time())}"
    url = postgres_url() if backend == "postgresql" else f"sqlite:///{tmp_path / 'shared.db'}"
    cmd = sweep_command("lora_rank_alpha_lr", tmp_path, f"sweep.name={name}", "sweep.n_trials=3",
                        f"sweep.storage='{url}'", "sweep.pruner=null")
    workers = [subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), outputs[0][-2000:] + outputs[1][-2000:]
    ran = [set(map(int, re.findall(r"trial (\d+): COMPLETE", out))) for out in outputs]
    trials = load(tmp_path, name, url).trials
    numbers = [t.number for t in trials]
    # Both worked, never on the same trial; the study holds the trials asked for (a race at the
    # last trial may add one).
    assert ran[0] and ran[1] and not ran[0] & ran[1] and ran[0] | ran[1] == set(numbers)
    assert 3 <= len(trials) <= 4 and all(t.state.name == "COMPLETE" for t in trials)
    for n in numbers:
        assert read_json(tmp_path / "sweeps" / name / f"trial_{n}" / "run.json")["status"] == "success"


@pytest.mark.slow
def test_sweep_through_submitit_launcher(tmp_path):
    name = "lora_rank_alpha_lr"
    run_sweep(sweep_command(name, tmp_path, "hydra/launcher=submitit_local", "sweep.n_trials=2",
                            "sweep.n_jobs=2", "hydra.launcher.timeout_min=10"))
    folder = tmp_path / "sweeps" / name
    trials = load(folder, name).trials
    assert [t.state.name for t in trials] in (["COMPLETE", "COMPLETE"], ["COMPLETE", "PRUNED"],
                                              ["PRUNED", "COMPLETE"])
    for t in trials:  # each trial ran in its own submitit process and reported to the storage
        assert t.intermediate_values and t.user_attrs["run_dir"] == str(folder / f"trial_{t.number}")
    assert list((folder / ".submitit").glob("*/*_result.pkl"))


def test_progress_line_counts_trials_and_names_the_best(tmp_path):
    study = optuna.create_study(direction="minimize")
    assert driver.progress_line(study, 4, ["tuned/eval/loss"]) == "trials 0/4 done (none yet)"
    for value in (3.0, 1.5):
        study.add_trial(optuna.trial.create_trial(value=value, params={}, distributions={}))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED, params={}, distributions={}))
    assert driver.progress_line(study, 4, ["tuned/eval/loss"]) == \
        "trials 3/4 done (2 complete, 1 pruned), best tuned/eval/loss 1.5 (trial 1)"


def test_a_sweep_measures_its_base_once(tmp_path):
    name = "lora_rank_alpha_lr"
    run_sweep(sweep_command(name, tmp_path, "sweep.n_trials=3", f"paths.base_cache_dir={tmp_path / 'cache'}",
                            f"paths.data_cache_dir={tmp_path / 'tokenized'}"))
    folder = tmp_path / "sweeps" / name
    infos = [read_json(folder / f"trial_{n}" / "run.json") for n in range(3)]
    assert [i["base_measurement"] for i in infos] == ["measured", "cached", "cached"]
    assert [i["data_tokenization"] for i in infos] == ["tokenized", "cached", "cached"]  # and tokenized once
    assert len({i["base_fingerprint"] for i in infos}) == 1
    assert len(list((tmp_path / "cache").iterdir())) == 1


# --------------------------------------------------------------------------- budgets, memory, serving


def test_pruner_presets_and_their_first_rung(tmp_path):
    cfg = compose_sweep("lora_rank_alpha_lr", tmp_path, "trainer.eval_steps=7")
    assert cfg.sweep.pruner == "asha" and cfg.trainer.eval_examples == 64
    asha = definition.make_pruner(cfg)
    assert isinstance(asha, optuna.pruners.SuccessiveHalvingPruner) and asha._min_resource == 7
    median = compose_sweep("lora_rank_alpha_lr", tmp_path, "sweep.pruner=median")
    assert isinstance(definition.make_pruner(median), optuna.pruners.MedianPruner) and definition.check(median) == []
    assert isinstance(definition.make_pruner(compose_sweep("qlora_rank_alpha_lr", tmp_path)), optuna.pruners.HyperbandPruner)
    # Where they decide, so where trials evaluate: eval_steps x 4^k (asha), x 3^k (hyperband);
    # nowhere in particular for the median pruner (it reads every evaluation).
    assert sweep_trial.pruner_rungs(cfg) == (7, 4) and sweep_trial.pruner_rungs(median) is None
    assert sweep_trial.pruner_rungs(compose_sweep("qlora_rank_alpha_lr", tmp_path)) == (5, 3)
    assert [s for s in range(1, 200) if sweep_trial.is_rung(s, (7, 3))] == [7, 21, 63, 189]
    assert [s for s in range(1, 70) if sweep_trial.is_rung(s, (4, 4))] == [4, 16, 64]
    halving = compose_sweep("lora_rank_alpha_lr", tmp_path,
                            "sweep.pruner={_target_: optuna.pruners.SuccessiveHalvingPruner}")
    assert sweep_trial.pruner_rungs(halving) is None  # min_resource: auto, known only later
    halving.sweep.pruner["min_resource"] = 2
    assert sweep_trial.pruner_rungs(halving) == (2, 4)  # Optuna's default reduction factor
    bad = compose_sweep("lora_rank_alpha_lr", tmp_path, "sweep.pruner=halving")
    assert "sweep.pruner='halving' is not one of asha, hyperband, median" in "\n".join(definition.check(bad))
    with pytest.raises(ConfigError) as err:
        compose_sweep("lora_rank_alpha_lr", tmp_path, "sweep.timeout_min=0", "sweep.max_memory_gb=-1")
    assert err.value.problems == ["sweep.timeout_min=0.0 must be > 0 or null", "sweep.max_memory_gb=-1.0 must be > 0 or null"]


def test_budget_counts_wall_time_once_across_workers_and_sessions(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(driver.time, "time", lambda: clock[0])
    study = optuna.create_study()
    a = driver.Budget(study, timeout_min=1)  # worker A starts at 1000
    clock[0] = 1010
    b = driver.Budget(study, timeout_min=1)  # worker B joins at 1010
    assert a.used_s() == 10  # 1000 -> 1010: A alone
    clock[0] = 1040
    assert b.used_s() == 40  # 1010 -> 1040: both ran; counted once
    assert not a.spent()  # 1040 again: nothing new
    clock[0] = 1065
    assert a.spent() and study.user_attrs["budget_used_s"] == 65
    # A later session (after a gap of an hour) continues the budget; the gap does not count.
    clock[0] = 5000
    later = driver.Budget(study, timeout_min=2)
    clock[0] = 5030
    assert later.summary() == {"used_min": 95 / 60, "timeout_min": 2, "spent": False}


@pytest.mark.slow
def test_sweep_stops_at_its_budget_and_a_rerun_continues_it(tmp_path):
    name = "lora_rank_alpha_lr"
    folder = tmp_path / "sweeps" / name
    # 0.05 min = 3 s: spent during the first trial (start-up and the base measurement).
    cmd = sweep_command(name, tmp_path, "sweep.n_trials=6", "sweep.timeout_min=0.05")
    first = run_sweep(cmd)
    trials = load(folder, name).trials
    assert len(trials) == 1 and trials[0].state.name in ("COMPLETE", "PRUNED")  # it finished
    used = load(folder, name).user_attrs["budget_used_s"]
    assert used >= 3
    report = read_json(folder / "report.json")
    assert report["budget"]["spent"] and report["budget"]["timeout_min"] == 0.05
    assert "sweep.timeout_min=0.05 spent" in first.stdout + first.stderr
    assert "Wall-clock:" in (folder / "report.md").read_text() and "budget spent" in (folder / "report.md").read_text()
    # The same command again: the budget is the study's, already spent, so nothing new runs.
    run_sweep(cmd)
    again = load(folder, name)
    assert len(again.trials) == 1 and used <= again.user_attrs["budget_used_s"] < used + 30


@pytest.mark.slow
def test_memory_aware_sweep_rejects_what_cannot_fit_then_serves_and_exports_the_best(tmp_path, monkeypatch):
    name = "lora_rank_alpha_lr"
    folder = tmp_path / "sweeps" / name

    def needed(r):  # the estimator's figure for the tiny model at LoRA rank r
        cfg = typed_config(compose_train(["model=tiny_llama", f"adapter.r={r}"], tmp_path / "probe"))
        return memory.for_config(cfg, memory.count_for_config(cfg)).total / memory.GB

    limit = (needed(8) + needed(16)) / 2  # ranks 4 and 8 fit, 16 and 32 do not
    run_sweep(sweep_command(name, tmp_path, "sweep.n_trials=8", f"sweep.max_memory_gb={limit}",
                            "logger=wandb", f"paths.base_cache_dir={tmp_path / 'cache'}"))
    study = load(folder, name)
    rejected = [t for t in study.trials if "rejected" in t.user_attrs]
    launched = [t for t in study.trials if "rejected" not in t.user_attrs]
    assert rejected and launched and len(study.trials) == 8
    for t in rejected:  # told to Optuna as pruned, with the estimate; never started
        assert t.state.name == "PRUNED" and t.params["adapter.r"] in (16, 32)
        assert f"> sweep.max_memory_gb={limit:g}" in t.user_attrs["rejected"]
        assert "GiB per device" in t.user_attrs["rejected"] and not (folder / f"trial_{t.number}").exists()
    for t in launched:  # the dashboard leads back to each run: folder and W&B run
        assert t.params["adapter.r"] in (4, 8) and t.state.name in ("COMPLETE", "PRUNED")
        info = read_json(folder / f"trial_{t.number}" / "run.json")
        assert t.user_attrs["run_dir"] == str(folder / f"trial_{t.number}")
        assert t.user_attrs["wandb_run_id"] == info["wandb_id"] and t.user_attrs["wandb_run"]
        assert t.user_attrs["intermediate_evaluations"]["count"] >= 1
    assert study.metric_names == ["tuned/eval/loss"]  # not "Objective 0"
    report = read_json(folder / "report.json")
    assert set(report["rejected"]) == {str(t.number) for t in rejected}
    text = (folder / "report.md").read_text()
    assert "## Rejected before launch" in text
    assert f"python -m pipeline.serve sweep={name} paths.output_dir={tmp_path}" in text
    assert f"python -m pipeline.export sweep={name} paths.output_dir={tmp_path}" in text

    # From sweep to serving: the report's export command, as a user runs it.
    best = folder / f"trial_{study.best_trial.number}"
    done = subprocess.run([sys.executable, "-m", "pipeline.export", f"sweep={name}", f"paths.output_dir={tmp_path}"],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (best / "export" / "vllm" / "adapter" / "adapter_config.json").exists()
    # ... and the server loads the best trial's adapter under the run's name.
    cfg = compose_serve(["server.port=8123"], tmp_path / "serve")
    cfg.sweep, cfg.paths.output_dir = name, str(tmp_path)
    resolved = serve.with_sweep(typed_config(cfg))
    app = plan.build_app(resolved)
    assert resolved.run == str(best) and list(app.state.service.pool.choices) == ["tiny_llama", "tuned"]


def test_serve_and_export_name_a_missing_or_ambiguous_sweep(tmp_path):
    cfg = compose_serve([], tmp_path)
    cfg.sweep, cfg.paths.output_dir = "nope", str(tmp_path)
    cfg = typed_config(cfg)
    with pytest.raises(ConfigError, match="sweep=nope: no sweep report at .*nope/report.json; run the sweep"):
        serve.with_sweep(cfg)
    # A multi-objective sweep: the server takes its whole Pareto front, export asks for one.
    folder = tmp_path / "sweeps" / "front"
    for n in (1, 3):
        (folder / f"trial_{n}").mkdir(parents=True)
        (folder / f"trial_{n}" / "config.yaml").write_text("{}")
    write_json(folder / "report.json", {"objectives": ["tuned/eval/loss", "params/trainable"], "best": [
        {"number": 1, "run_dir": str(folder / "trial_1")}, {"number": 3, "run_dir": "outputs/elsewhere/trial_3"}]})
    # trial 3's recorded folder is relative to another cwd: found in the sweep folder
    resolved = serve.with_sweep(dataclasses.replace(cfg, sweep="front"))
    assert (resolved.run, resolved.run_name, dict(resolved.adapters)) == (str(folder / "trial_1"), "trial_1",
                                                                       {"trial_3": str(folder / "trial_3")})
    ecfg = compose_export([], tmp_path)
    ecfg.sweep, ecfg.paths.output_dir = str(folder), str(tmp_path)  # a folder works as well as a name
    with pytest.raises(ConfigError, match="2 trials on its Pareto front; export one of them with run="):
        export.with_sweep(typed_config(ecfg))


def test_importances_need_enough_completed_trials(tmp_path):
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    cfg = compose_sweep("lora_rank_alpha_lr", tmp_path)
    study = optuna.create_study()
    dists = {"trainer.learning_rate": FloatDistribution(1e-5, 1e-2, log=True), "adapter.lora_dropout": FloatDistribution(0, 0.2)}
    for i in range(sweep_summary.MIN_TRIALS_FOR_IMPORTANCE):
        lr, dropout = 1e-5 * 2 ** i, 0.02 * (i % 3)
        study.add_trial(create_trial(params={"trainer.learning_rate": lr, "adapter.lora_dropout": dropout},
                                     distributions=dists, value=5.0 - i))  # the loss follows the learning rate
        ranked = sweep_summary.importances(study)
        if i + 1 < sweep_summary.MIN_TRIALS_FOR_IMPORTANCE:
            assert ranked["values"] == {} and f"{i + 1} completed trial(s)" in ranked["why"]
    assert max(ranked["values"], key=ranked["values"].get) == "trainer.learning_rate"
    summary = sweep_summary.report(study, tmp_path, cfg, ["sweep=lora_rank_alpha_lr"])
    assert "- trainer.learning_rate:" in (tmp_path / "report.md").read_text() and "importances.png" in summary["plots"]


def test_evaluations_during_training_score_a_fixed_slice():
    import datasets

    rows = datasets.Dataset.from_dict({"x": list(range(10))})
    assert evaluation_slice(rows, TrainerConfig(eval_examples=4))["x"] == [0, 1, 2, 3]
    assert evaluation_slice(rows, TrainerConfig(eval_examples=None)) is rows
    assert evaluation_slice(rows, TrainerConfig(eval_examples=64)) is rows
    assert evaluation_slice(None, TrainerConfig(eval_examples=4)) is None
    assert range_problems(TrainerConfig(eval_examples=0), "trainer.") == ["trainer.eval_examples=0 must be > 0 or null"]
