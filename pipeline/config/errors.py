"""The errors a user is meant to read.

A :class:`PipelineError` says what is wrong and how to fix it; the entry points print it
without a traceback (:mod:`pipeline.commands.runner`). :class:`ConfigError` lists every
configuration problem at once. :class:`Interrupted` is a run stopped on request, resumable.
"""

from __future__ import annotations

from typing import List, Optional


class PipelineError(Exception):
    """An error in the user's input (config, data, model choice) or in the run itself that the
    message fully explains: the command line prints it without a traceback."""


class ConfigError(PipelineError, ValueError):
    """A configuration that cannot run; the message lists every problem found."""

    def __init__(self, problems: List[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} configuration problem(s):\n{lines}")


def missing_values(keys: List[str], others: Optional[List[str]] = None) -> ConfigError:
    """The error for keys still ``???`` after composition (with ``others``, problems found
    alongside, reported in the same error)."""
    return ConfigError([f"{key} is required: set it on the command line, e.g. {key}=..." for key in keys]
                       + list(others or []))


class Interrupted(Exception):
    """The run stopped early on request (a preemption signal) and can be resumed; the command
    exits with ``exit_code`` (see ``preemption.exit_code``)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
