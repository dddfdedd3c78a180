"""Server counters in Prometheus' text format (no client library needed for a few series)."""

from __future__ import annotations

import threading
from typing import Dict, List, Tuple

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Histogram:
    def __init__(self, buckets: Tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1

    def lines(self, name: str, labels: str = "") -> List[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        wrap = f"{{{labels}}}" if labels else ""
        return out + [f"{name}_sum{wrap} {self.sum:.6f}", f"{name}_count{wrap} {self.count}"]


class Metrics:
    """Requests by path and status, latency, tokens, generation batch sizes; thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: Dict[Tuple[str, int], int] = {}
        self.latency: Dict[str, Histogram] = {}
        self.tokens = {"prompt": 0, "completion": 0}
        self.batch_rows = Histogram(BATCH_BUCKETS)

    def request(self, path: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(path, status)] = self.requests.get((path, status), 0) + 1
            self.latency.setdefault(path, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def count_tokens(self, prompt: int, completion: int) -> None:
        with self._lock:
            self.tokens["prompt"] += prompt
            self.tokens["completion"] += completion

    def batch(self, rows: int) -> None:
        with self._lock:
            self.batch_rows.observe(rows)

    def render(self, queued: int) -> str:
        with self._lock:
            lines = ["# TYPE pipeline_requests_total counter"]
            lines += [f'pipeline_requests_total{{path="{p}",status="{s}"}} {n}'
                      for (p, s), n in sorted(self.requests.items())]
            lines.append("# TYPE pipeline_request_seconds histogram")
            for path, hist in sorted(self.latency.items()):
                lines += hist.lines("pipeline_request_seconds", f'path="{path}"')
            lines.append("# TYPE pipeline_tokens_total counter")
            lines += [f'pipeline_tokens_total{{kind="{k}"}} {v}' for k, v in self.tokens.items()]
            lines.append("# TYPE pipeline_batch_rows histogram")
            lines += self.batch_rows.lines("pipeline_batch_rows")
            lines += ["# TYPE pipeline_queued_requests gauge", f"pipeline_queued_requests {queued}"]
        return "\n".join(lines) + "\n"
