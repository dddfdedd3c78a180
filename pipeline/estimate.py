"""GPU memory per device before launch: ``python -m pipeline.estimate [train overrides]``.

Takes the same overrides as ``pipeline.train`` (model, adapter, distributed, trainer.precision)
and prints, per device, the memory for weights, gradients and optimizer states: the model
states that ZeRO shards (:mod:`pipeline.trainer.memory`). Activations are not included. The
model is built on the meta device from its config: no weights are read or downloaded.
"""

from __future__ import annotations

import argparse
import sys
from typing import List

from pipeline.commands import runner
from pipeline.commands.compose import compose_train
from pipeline.runs import quiet
from pipeline.trainer import memory


def predict(argv: List[str]) -> memory.MemoryEstimate:
    """The estimate for ``pipeline.train`` with ``argv`` overrides (benchmarks compare it with
    what a run measures)."""
    cfg = compose_train(argv)
    return memory.for_config(cfg, memory.count_for_config(cfg))


def main(argv: List[str]) -> int:
    """Composes the ``train`` config from ``argv`` overrides and prints the estimate."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.estimate", description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="train config overrides, e.g. adapter=qlora distributed=zero3")
    quiet.add_verbose_switch(parser)
    args = parser.parse_args(argv)
    quiet.install(args.verbose)

    def show() -> None:
        cfg = compose_train(args.overrides)
        print(memory.describe(cfg, memory.count_for_config(cfg)))

    return runner.tool(show)


def cli() -> None:
    """The ``pipeline-estimate`` console script."""
    sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
    cli()
