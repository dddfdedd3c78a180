"""The end-of-sweep summary: ``report.md``, ``report.json`` and plots in the sweep folder.

Best trial (or Pareto front) with the command that reproduces it and the commands that serve
and export it, the wall-clock budget used, parameter importances once there are enough
completed trials to mean something, failed trials with their errors, and configurations
rejected before launch (``sweep.max_memory_gb``).
"""

from __future__ import annotations

import collections
import json
import logging
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from pipeline.config.errors import ConfigError
from pipeline.runs import atomic
from pipeline.runs.runfolder import write_json
from pipeline.study.definition import SweptConfig, objectives, target_of

log = logging.getLogger("pipeline.sweep")

# Importances (fANOVA over a random forest) fitted on fewer completed trials than this rank
# noise: below it the report says how many more are needed instead of printing numbers.
MIN_TRIALS_FOR_IMPORTANCE = 10


def best_command(config: SweptConfig, passed: Sequence[str], trial: Any) -> str:
    """The plain command (training, or merging) that reproduces a trial (its sweep file's base
    settings, the other command-line overrides, the trial's values)."""
    base = [o for o in passed if not o.startswith("sweep.")]
    return " ".join([f"python -m pipeline.{target_of(config).command}", *base, *trial.user_attrs.get("overrides", [])])


def entry_commands(config: SweptConfig, passed: Sequence[str], folder: Path) -> Dict[str, str]:
    """``python -m pipeline.serve sweep=<name>`` and ``python -m pipeline.export sweep=<name>``
    (with the folder instead of the name when the sweep folder is not the default one)."""
    output_dir = [o for o in passed if o.startswith("paths.output_dir=")]
    default = Path(config.paths.output_dir) / "sweeps" / config.sweep.name
    which = config.sweep.name if folder.resolve() == default.resolve() else str(folder)
    return {task: " ".join([f"python -m pipeline.{task}", f"sweep={which}", *output_dir])
            for task in ("serve", "export")}


def _first_objective(study: Any) -> Optional[Any]:
    """Importance target of a multi-objective study: its first objective, lower is better."""
    if len(study.directions) == 1:
        return None
    sign = -1.0 if study.directions[0].name == "MAXIMIZE" else 1.0
    return lambda t: sign * t.values[0]


def importances(study: Any) -> Dict[str, Any]:
    """``{"values": {param: importance}}``, or ``{"values": {}, "why": ...}`` when there are too
    few completed trials (or nothing varies) for the numbers to mean anything."""
    import optuna  # lazy: optuna takes a second to import; only sweeps need it

    complete = sum(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False))
    if complete < MIN_TRIALS_FOR_IMPORTANCE:
        return {"values": {}, "why": f"{complete} completed trial(s); importances need at least "
                                     f"{MIN_TRIALS_FOR_IMPORTANCE} to rank anything but noise"}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values = optuna.importance.get_param_importances(study, target=_first_objective(study))
        return {"values": dict(values)}
    except (RuntimeError, ValueError) as err:  # e.g. a single distinct value
        return {"values": {}, "why": str(err)}


def _plots(study: Any, folder: Path, names: List[str], ranked: Dict[str, float]) -> List[str]:
    """Optimisation history, importances and (multi-objective) Pareto front as PNG files."""
    import matplotlib  # lazy: matplotlib takes a second to import; only reports draw

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: optuna takes a second to import; only sweeps need it
    from optuna.visualization import matplotlib as vis

    plots = {}
    if len(names) == 1:
        plots["history.png"] = lambda: vis.plot_optimization_history(study, target_name=names[0])
    else:
        plots["pareto_front.png"] = lambda: vis.plot_pareto_front(study, target_names=names)
    if ranked:
        plots["importances.png"] = lambda: vis.plot_param_importances(
            study, target=_first_objective(study), target_name=names[0])
    written = []
    for file, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                axes = plot()
            figure = getattr(axes, "figure", None) or axes.flat[0].figure
            figure.set_size_inches(8, 5)
            with atomic.open_atomic(folder / file, "wb") as f:
                figure.savefig(f, format="png", bbox_inches="tight", dpi=100)
            plt.close(figure)
            written.append(file)
        except Exception as err:  # a plot is a convenience; the report stands without it
            log.warning("plot %s failed: %s", file, err)
    return written


def best_trials(study: Any, multi_objective: bool) -> List[Any]:
    """The best trial, or the Pareto front; with constraints, among feasible trials only
    (Optuna's own rule): none when no completed trial meets them."""
    if multi_objective:
        return study.best_trials
    if not any(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False)):
        return []
    try:
        return [study.best_trial]
    except ValueError:  # "No feasible trials are completed yet."
        return []


def infeasible(trial: Any) -> bool:
    """A completed trial that breaks a constraint (Optuna: a constraint value above 0)."""
    return trial.state.name == "COMPLETE" and any(v > 0 for v in trial.constraints.values())


def _broken(trial: Any) -> str:
    """The constraints a trial breaks, with their intervals."""
    results = trial.user_attrs.get("constraints", {})
    return "; ".join(f"{m}: change {r['change']:+.4g} [{r['low']:+.4g}, {r['high']:+.4g}], max_drop {r['max_drop']:g}"
                     for m, r in results.items() if r["violation"] > 0) or "constraint values above 0"


def report(study: Any, folder: Path, config: SweptConfig, passed: Sequence[str],
           budget: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Writes ``report.json``, ``report.md`` and the plots in the sweep folder; logs the summary.

    ``budget``: ``{"used_min", "timeout_min", "spent"}`` from the sweep's budget
    (:class:`pipeline.study.driver.Budget`).
    """
    names = [o.metric for o in objectives(config)]
    trials = study.get_trials(deepcopy=False)
    counts = dict(collections.Counter(t.state.name for t in trials))
    best = best_trials(study, len(names) > 1)
    rows = [{"number": t.number, "values": dict(zip(names, t.values)), "params": t.params,
             "run_dir": t.user_attrs.get("run_dir"), "wandb_run_id": t.user_attrs.get("wandb_run_id"),
             "command": best_command(config, passed, t)} for t in best]
    ranked = importances(study)
    summary = {"study": config.sweep.name, "objectives": names,
               "directions": [o.direction for o in objectives(config)], "trials": counts,
               "best": rows, "importances": ranked["values"], "importances_why": ranked.get("why"),
               "plots": _plots(study, folder, names, ranked["values"]), "budget": budget,
               "commands": entry_commands(config, passed, folder) if rows else {},
               "rejected": {t.number: t.user_attrs["rejected"] for t in trials if "rejected" in t.user_attrs},
               "constraints": [c.metric for c in config.sweep.constraints],
               "infeasible": {t.number: _broken(t) for t in trials if infeasible(t)},
               "failed": {t.number: t.user_attrs.get("error", "no error recorded: its worker stopped")
                          for t in trials if t.state.name == "FAIL"}}
    write_json(folder / "report.json", summary)
    text = report_markdown(summary)
    atomic.write_text(folder / "report.md", text)
    log.info("sweep report (%s):\n%s", folder / "report.md", text)
    return summary


def _states(counts: Dict[str, int], rejected: int) -> str:
    parts = []
    for state, n in sorted(counts.items()):
        if state == "PRUNED" and rejected:
            parts.append(f"{n} pruned ({rejected} of them rejected before launch)")
        else:
            parts.append(f"{n} {state.lower()}")
    return ", ".join(parts)


def report_markdown(summary: Dict[str, Any]) -> str:
    title = "Pareto front" if len(summary["objectives"]) > 1 else "Best trial"
    lines = [f"# Sweep {summary['study']}", "", "Trials: " + _states(summary["trials"], len(summary["rejected"]))]
    budget = summary.get("budget")
    if budget:
        limit = f" of sweep.timeout_min={budget['timeout_min']:g}" if budget["timeout_min"] else ""
        spent = "; budget spent, no further trials started" if budget["spent"] else ""
        lines += ["", f"Wall-clock: {budget['used_min']:.1f} min used{limit}{spent}"]
    lines += ["", f"## {title}", ""]
    if summary.get("constraints"):
        lines += [f"Among trials that meet every constraint ({', '.join(summary['constraints'])}: the paired 95% "
                  "interval of tuned minus base within sweep.constraints' max_drop).", ""]
        if not summary["best"] and summary["infeasible"]:
            lines += ["No completed trial meets the constraints; see Infeasible trials below.", ""]
    header = ["trial", *summary["objectives"], "params"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary["best"]:
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in row["params"].items())
        lines.append("| " + " | ".join([str(row["number"]), *[f"{v:.4g}" for v in row["values"].values()],
                                        params]) + " |")
    for row in summary["best"]:
        where = f" ({row['run_dir']})" if row["run_dir"] else ""
        lines += ["", f"Trial {row['number']}{where}:", "", f"    {row['command']}"]
    if summary["commands"]:
        what = "every Pareto-front trial, each as model trial_<n>" if len(summary["objectives"]) > 1 \
            else "the best trial's adapter"
        lines += ["", f"Serve {what}, or export the best:", "",
                  f"    {summary['commands']['serve']}", f"    {summary['commands']['export']}"]
    lines += ["", "## Parameter importances", ""]
    if summary["importances"]:
        lines += [f"- {k}: {v:.3f}" for k, v in summary["importances"].items()]
    else:
        lines.append(f"Not shown: {summary['importances_why']}.")
    if summary["rejected"]:
        lines += ["", "## Rejected before launch", ""]
        lines += [f"- trial {n}: {why}" for n, why in summary["rejected"].items()]
    if summary.get("infeasible"):
        lines += ["", "## Infeasible trials (never best, never served)", ""]
        lines += [f"- trial {n}: {why}" for n, why in summary["infeasible"].items()]
    if summary["failed"]:
        lines += ["", "## Failed trials", ""]
        lines += [f"- trial {n}: {e}" for n, e in summary["failed"].items()]
    if summary["plots"]:
        lines += ["", "Plots: " + ", ".join(summary["plots"])]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- from sweep to serving


def sweep_folder(ref: str, output_dir: str) -> Path:
    """The folder of sweep ``ref``: a sweep folder itself, or ``<output_dir>/sweeps/<ref>``."""
    for folder in (Path(ref), Path(output_dir) / "sweeps" / ref):
        if (folder / "report.json").is_file():
            return folder
    raise ConfigError([f"sweep={ref}: no sweep report at {Path(output_dir) / 'sweeps' / ref / 'report.json'}; "
                       f"run the sweep first (python -m pipeline.train -m sweep=<file> sweep.name={ref}), "
                       "or give the sweep folder (sweep=path/to/sweeps/<name>)"])


def best_runs(ref: str, output_dir: str) -> Tuple[Dict[int, str], bool]:
    """``({trial number: run folder}, multi_objective)``: the best trial, or every trial on the
    Pareto front of a multi-objective sweep, as its sweep report lists them."""
    folder = sweep_folder(ref, output_dir)
    summary = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    runs = {}
    for row in summary["best"]:
        recorded = Path(row.get("run_dir") or f"trial_{row['number']}")
        # A relative output_dir records folders relative to where the sweep ran.
        found = next((p for p in (recorded, folder / recorded.name) if (p / "config.yaml").is_file()), None)
        if found is None:
            raise ConfigError([f"sweep={ref}: trial {row['number']}'s run folder {recorded} is gone "
                               f"(nor is it in {folder})"])
        runs[row["number"]] = str(found)
    if not runs:
        raise ConfigError([f"sweep={ref}: {folder / 'report.json'} lists no completed trial yet"])
    return runs, len(summary["objectives"]) > 1
