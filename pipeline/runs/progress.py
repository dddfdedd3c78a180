"""Progress of long work: a tqdm bar on a terminal, a log line now and then elsewhere.

On a terminal (stderr is a TTY) a bar shows counts, rate and ETA. In a SLURM log, CI or a pipe,
bars would print a line per refresh; there a log line is written at most every 30 s or every
10% of the work (whichever comes first), plus one at the end. Either way the first completed
chunk is followed by a log line with the estimated total time, so a long evaluation says early
how long it will take; work expected to take under 10 s stays silent.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Optional

log = logging.getLogger("pipeline.progress")

LOG_EVERY_S = 30.0
LOG_EVERY_FRACTION = 0.1
QUIET_BELOW_S = 10.0  # work expected to take less says nothing (a tiny model's evaluation)


def interactive() -> bool:
    """True when stderr is a terminal (bars), False in logs and pipes (periodic lines)."""
    return sys.stderr.isatty()


def duration(seconds: float) -> str:
    """Seconds in words: ``42 s``, ``3 min 05 s``, ``2 h 10 min``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class Progress:
    """Counts work done out of ``total`` and shows it (a bar or log lines).

    Use as a context manager: ``with Progress(806, "base: test loss", "examples") as p:
    p.update(16)``.
    """

    def __init__(self, total: int, what: str, unit: str = "it", bar: Optional[bool] = None,
                 clock=time.monotonic):
        self.total, self.what, self.unit = max(int(total), 0), what, unit
        self.done = 0
        self._clock = clock
        self._start = self._last_log = clock()
        self._last_fraction = 0.0
        self._estimated = False
        self._quiet = False
        self._bar: Any = None
        if interactive() if bar is None else bar:
            from tqdm.auto import tqdm  # lazy: only a terminal shows a bar

            self._bar = tqdm(total=self.total, desc=what, unit=f" {unit}", dynamic_ncols=True, leave=False)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close(failed=exc[0] is not None)

    def update(self, n: int = 1) -> None:
        self.done += n
        now = self._clock()
        if self._bar is not None:
            self._bar.update(n)
        if not self._estimated and self.done < self.total:
            self._estimated = True
            expected = self.total * (now - self._start) / self.done
            self._quiet = expected < QUIET_BELOW_S
            if not self._quiet:
                log.info("%s: %d %s, about %s in all", self.what, self.total, self.unit, duration(expected))
            self._last_log = now
            return
        if self._bar is None and not self._quiet:
            fraction = self.done / self.total if self.total else 1.0
            if (now - self._last_log >= LOG_EVERY_S or fraction - self._last_fraction >= LOG_EVERY_FRACTION) \
                    and self.done < self.total:
                self._log_line(now)
                self._last_log, self._last_fraction = now, fraction

    def _log_line(self, now: float) -> None:
        elapsed = now - self._start
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        log.info("%s: %d/%d %s (%.0f%%), %s elapsed, ETA %s", self.what, self.done, self.total,
                 self.unit, 100.0 * self.done / max(self.total, 1), duration(elapsed), duration(eta))

    def close(self, failed: bool = False) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        spent = self._clock() - self._start
        if not failed and (spent >= QUIET_BELOW_S or (self._estimated and not self._quiet)):
            log.info("%s: %d %s in %s", self.what, self.done, self.unit,
                     duration(spent))
