"""How much of each source's gain a merged adapter keeps: two LoRA adapters trained on the embedded
default model (Django's English -> French strings and the shipped chat Q&A), merged by linear,
TIES and DARE-TIES, each merge measured on both sources' test sets.

    python benchmarks/merge_retention.py                  # 60 steps per source (~5 min on 2 CPU cores)
    python benchmarks/merge_retention.py --steps 20 --methods linear ties

Runs the documented commands (``pipeline.train`` twice, ``pipeline.merge`` per method) as
subprocesses in a scratch folder, and prints per method and source the test loss of the base, the
source's own adapter and the merge, and the share of the source's loss gain the merge keeps
(``kept``, from ``metrics.json``). Losses only (``evaluation=perplexity``): generation metrics on
the tiny sets these steps allow would be noise.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"django_fr": "data=django_en_fr", "chat_qa": "data=chatterbot_qa"}
DENSITY = {"linear": [], "ties": ["merge.density=0.5"], "dare_ties": ["merge.density=0.5"]}


def run(args: list, cwd: Path) -> float:
    """Runs ``python -m <args>``; returns its seconds (a failure stops the benchmark with its stderr)."""
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps per source (default 60)")
    parser.add_argument("--methods", nargs="+", default=list(DENSITY), choices=list(DENSITY))
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="merge_retention_"))
    common = ["logger=none", "evaluation=perplexity", f"trainer.max_steps={args.steps}", "trainer.save_steps=null"]
    seconds = {}
    for name, data in SOURCES.items():
        seconds[name] = run(["pipeline.train", data, *common, f"hydra.run.dir={scratch / name}"], ROOT)
    runs = f"runs=[{','.join(str(scratch / name) for name in SOURCES)}]"
    print(f"sources: {', '.join(f'{n} {s:.0f} s' for n, s in seconds.items())} ({args.steps} steps each, "
          f"SmolLM2-135M, LoRA r=16)")
    print(f"{'method':10} {'source':10} {'base':>8} {'source':>8} {'merged':>8} {'kept':>6} {'merge s':>8}")
    for method in args.methods:
        folder = scratch / f"merge_{method}"
        spent = run(["pipeline.merge", runs, f"merge.method={method}", *DENSITY[method], "evaluation=perplexity",
                     f"hydra.run.dir={folder}"], ROOT)
        metrics = json.loads((folder / "metrics.json").read_text())
        for name in SOURCES:
            kept = metrics[f"kept/{name}/test/loss"]
            print(f"{method:10} {name:10} {metrics[f'base/{name}/test/loss']:8.4f} "
                  f"{metrics[f'source/{name}/test/loss']:8.4f} {metrics[f'merged/{name}/test/loss']:8.4f} "
                  f"{(f'{100 * kept:.0f}%' if kept is not None else 'n/a'):>6} {spent:8.0f}")


if __name__ == "__main__":
    main()
