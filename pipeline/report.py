"""Report entry point: compare configurations on quality and cost across the runs of a multirun
or sweep.

    python -m pipeline.report outputs/multirun/<date>/<time>          # run folders, no W&B needed
    python -m pipeline.report outputs/sweeps/<name>                   # the trial_<N> folders of a sweep
    python -m pipeline.report --wandb-project my-project --group <group>   # from W&B (online)

Writes ``report/`` in the folder (or ``--out``): ``report.md``, ``report.csv``, plots and
``report.html`` (:mod:`pipeline.comparison.writer`), also logged to W&B as a run of job type
``report``. Reads folders of finished runs, not a config, so it takes plain arguments.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

from pipeline.commands import runner
from pipeline.comparison.collect import runs_from_folder, runs_from_wandb
from pipeline.comparison.page import log_to_wandb
from pipeline.comparison.writer import write_report
from pipeline.trainer.tracking import multirun_group


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Compare configurations across the runs of a multirun or sweep.")
    parser.add_argument("folder", nargs="?", help="a multirun or sweep folder of run folders")
    parser.add_argument("--wandb-project", help="read runs from this W&B project instead (online)")
    parser.add_argument("--wandb-entity")
    parser.add_argument("--group", help="the W&B group of the runs")
    parser.add_argument("--out", help="where to write (default: <folder>/report)")
    parser.add_argument("--metric", help="primary quality metric (default: tuned/test/bleu if present)")
    parser.add_argument("--ignore", action="append", default=[], metavar="KEY",
                        help="a setting (a key or a prefix: data.seed, trainer) whose differences do not "
                             "make another configuration, as seed's never do (repeatable)")
    parser.add_argument("--baseline", help="the configuration the others are compared with (default: the first row)")
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                        help="bootstrap resamples of the paired differences (default 1000)")
    parser.add_argument("--wandb-mode", default="offline", choices=["offline", "online", "disabled"],
                        help="log the report as a W&B run of job type report (default offline)")
    args = parser.parse_args(argv)
    if args.bootstrap < 1:
        parser.error(f"--bootstrap {args.bootstrap}: give at least 1 resample (1000 is usual)")
    if args.wandb_project:
        runs = runs_from_wandb(args.wandb_project, args.group, args.wandb_entity)
        out = Path(args.out or f"report-{args.group or args.wandb_project}")
    elif args.folder:
        folder = Path(args.folder)
        if not folder.is_dir():
            raise SystemExit(f"{folder} is not a folder")
        runs = runs_from_folder(folder)
        out = Path(args.out) if args.out else folder / "report"
    else:
        parser.error("give a folder, or --wandb-project")
    result = write_report(runs, out, args.metric, args.ignore, args.baseline, args.bootstrap)
    print((out / "report.md").read_text())
    if args.wandb_mode != "disabled":
        project = args.wandb_project or "pipeline"
        group = args.group or (multirun_group(Path(args.folder)) if args.folder else None)
        log_to_wandb(result, out, project, group, args.wandb_mode)
    runner.announce(out, "report")


if __name__ == "__main__":
    main()
    runner.end_process()
