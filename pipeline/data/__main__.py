"""``python -m pipeline.data [--examples N] [train overrides]``: what the model will train on,
before any compute (:mod:`pipeline.data.preview`).

Takes the same overrides as ``pipeline.train`` (``data=...``, ``data.path=...``, ``model=...``
for its tokenizer and chat template) and prints the rendered examples with the tokens that carry
loss marked, the token lengths per split, tokens per epoch and the leakage check. An entry point
that lives in the data package so that ``python -m pipeline.data`` names the stage it shows.
"""

from __future__ import annotations

import argparse
import sys
from typing import List

from pipeline.commands import runner
from pipeline.commands.compose import compose_train
from pipeline.data.preview import preview
from pipeline.model import loading
from pipeline.runs import quiet


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.data", description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=3, help="rendered training examples to show")
    parser.add_argument("overrides", nargs="*", help="train config overrides, e.g. data=my_jsonl data.path=x")
    quiet.add_verbose_switch(parser)
    args = parser.parse_args(argv)
    quiet.install(args.verbose)

    def show() -> None:
        cfg = compose_train(args.overrides)
        # Only the tokenizer is read: a random model's config folder holds it, without its weights.
        folder = loading.config_folder(cfg.model, cfg.paths.cache_dir, cfg.data.seed)
        tokenizer = loading.load_tokenizer(folder, cfg.model)
        sys.stdout.write(preview(cfg, tokenizer, args.examples, sys.stdout.isatty()))

    return runner.tool(show)


def cli() -> None:
    """The ``pipeline-data`` console script (``python -m pipeline.data``)."""
    sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
    cli()
