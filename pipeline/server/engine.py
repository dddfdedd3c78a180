"""Dynamic batching: one generation thread takes queued requests, groups them, generates.

The first queued request waits at most ``max_wait_s`` for companions; requests for the same
model with compatible decoding (greedy, or sampling with the same temperature and top_p, no
seed) are left-padded into one ``generate`` call of at most ``max_batch_size`` rows. A request
with a seed runs alone, so its output does not depend on what it was batched with.

Each row is followed step by step by a stopping criterion that ends it at its own
``max_tokens``, at a stop string or at EOS, and streams its new text to the request. A batch
that fails is retried one request at a time, so one bad request fails only itself.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from pipeline.server.pool import ModelPool

log = logging.getLogger(__name__)


@dataclass
class Delta:
    index: int
    text: str


@dataclass
class Finish:
    index: int
    reason: str  # stop | length
    completion_tokens: int


@dataclass
class Failure:
    message: str


@dataclass
class GenerationRequest:
    """One prompt, generated ``n`` times; ``emit`` receives Delta / Finish / Failure events
    from the generation thread (it must be thread-safe)."""

    choice: str
    prompt_ids: List[int]
    emit: Callable[[Any], None]
    n: int = 1
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: List[str] = field(default_factory=list)
    cancelled: bool = False  # set by the client side when the caller went away
    emitted: bool = False

    def batch_key(self) -> Tuple:
        if self.temperature == 0:
            return (self.choice, "greedy")
        if self.seed is not None:
            return (self.choice, "seed", id(self))
        return (self.choice, "sample", self.temperature, self.top_p)


_STOP = object()


class Engine:
    """Owns the generation thread; :meth:`submit` is safe from any thread."""

    def __init__(self, pool: ModelPool, max_batch_size: int, max_wait_s: float,
                 on_batch: Callable[[int], None] = lambda rows: None):
        self.pool = pool
        self.tokenizer = pool.tokenizer
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.on_batch = on_batch
        self._queue: "queue.Queue[Any]" = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="generation", daemon=True)
        self.eos_ids = _eos_ids(pool, self.tokenizer)

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: GenerationRequest) -> None:
        self._queue.put(request)

    def pending(self) -> int:
        return self._queue.qsize()

    def close(self, timeout: Optional[float] = None) -> None:
        """Finishes every queued request, then stops the thread."""
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                return
            batch, rows = [first], first.n
            deadline = time.monotonic() + self.max_wait_s
            while rows < self.max_batch_size:
                try:
                    item = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
                except queue.Empty:
                    break
                if item is _STOP:  # finish this batch, then stop
                    stopping = True
                    break
                batch.append(item)
                rows += item.n
            for group in self._groups(batch):
                self._run(group)

    def _groups(self, batch: List[GenerationRequest]) -> List[List[GenerationRequest]]:
        """Compatible requests together, in chunks of at most ``max_batch_size`` rows."""
        by_key: Dict[Tuple, List[GenerationRequest]] = {}
        for request in batch:
            if not request.cancelled:
                by_key.setdefault(request.batch_key(), []).append(request)
        groups = []
        for requests in by_key.values():
            chunk: List[GenerationRequest] = []
            for request in requests:
                if chunk and sum(r.n for r in chunk) + request.n > self.max_batch_size:
                    groups.append(chunk)
                    chunk = []
                chunk.append(request)
            groups.append(chunk)
        return groups

    def _run(self, group: List[GenerationRequest]) -> None:
        try:
            self._generate(group)
        except Exception as err:  # one request's failure must not fail its companions
            log.exception("generation failed for a batch of %d request(s)", len(group))
            if len(group) == 1:
                group[0].emit(Failure(f"generation failed: {type(err).__name__}: {err}"))
                return
            for request in group:
                if request.emitted:  # it has streamed text already: a retry would repeat it
                    request.emit(Failure(f"generation failed: {type(err).__name__}: {err}"))
                else:
                    self._run([request])

    def _generate(self, group: List[GenerationRequest]) -> None:
        import torch  # lazy: start-up must not pay for torch
        from transformers import StoppingCriteriaList

        rows = [(request, i) for request in group for i in range(request.n)]
        width = max(len(request.prompt_ids) for request in group)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, (request, _) in enumerate(rows):  # left padding: every prompt ends at `width`
            input_ids[row, width - len(request.prompt_ids):] = torch.tensor(request.prompt_ids)
            attention_mask[row, width - len(request.prompt_ids):] = 1
        first = group[0]
        choice = self.pool.choices[first.choice]
        tracker = RowTracker(self.tokenizer, rows, width, self.eos_ids)
        kwargs: Dict[str, Any] = {"max_new_tokens": max(r.max_tokens for r in group), "use_cache": True,
                                  "pad_token_id": pad, "eos_token_id": sorted(self.eos_ids),
                                  "stopping_criteria": StoppingCriteriaList([tracker])}
        if first.temperature > 0:
            kwargs.update(do_sample=True, temperature=first.temperature, top_p=first.top_p, top_k=0)
        else:
            kwargs.update(do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None)
        if first.seed is not None:
            torch.manual_seed(first.seed)
        self.on_batch(len(rows))
        with torch.inference_mode(), ModelPool.activate(choice) as model:
            device = next(model.parameters()).device
            model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                           **kwargs)
        tracker.finish_all()


class RowTracker:
    """A stopping criterion that follows each row: streams its new text, ends it at its own
    ``max_tokens``, a stop string, EOS, or when its request was cancelled."""

    def __init__(self, tokenizer: Any, rows: Sequence[Tuple[GenerationRequest, int]], width: int,
                 eos_ids: set):
        self.tokenizer = tokenizer
        self.rows = rows
        self.width = width
        self.eos_ids = eos_ids
        self.sent = [""] * len(rows)  # text streamed so far
        self.count = [0] * len(rows)  # tokens generated (EOS excluded)
        self.done = [False] * len(rows)
        self.text = [""] * len(rows)  # decoded so far, stop strings not cut

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch  # lazy: start-up must not pay for torch

        new = input_ids[:, self.width:].tolist()
        for row, (request, _) in enumerate(self.rows):
            if self.done[row]:
                continue
            if request.cancelled:
                self.done[row] = True
            elif new[row][-1] in self.eos_ids:
                self._finish(row, self._text(new[row][:-1]), "stop")
            else:
                self.count[row] += 1
                self._advance(row, new[row], request)
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)

    def _text(self, ids: List[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _advance(self, row: int, ids: List[int], request: GenerationRequest) -> None:
        text = self.text[row] = self._text(ids)
        cut = min((text.find(s) for s in request.stop if s in text), default=-1)
        if cut >= 0:
            self._finish(row, text[:cut], "stop")
        elif self.count[row] >= request.max_tokens:
            self._finish(row, text, "length")
        else:
            # Hold back what may still become a stop string, or half of a multi-byte character.
            hold = max((len(s) - 1 for s in request.stop), default=0)
            safe = text[:len(text) - hold] if hold else text
            safe = safe.rstrip("\ufffd")
            self._send(row, safe)

    def _send(self, row: int, text: str) -> None:
        request, index = self.rows[row]
        if text.startswith(self.sent[row]) and len(text) > len(self.sent[row]):
            request.emit(Delta(index, text[len(self.sent[row]):]))
            request.emitted = True
            self.sent[row] = text

    def _finish(self, row: int, text: str, reason: str) -> None:
        request, index = self.rows[row]
        self._send(row, text)
        self.done[row] = True
        request.emitted = True  # a retry after a later failure would repeat this row
        request.emit(Finish(index, reason, self.count[row]))

    def finish_all(self) -> None:
        """Rows still open when ``generate`` returned ended at the batch's token budget."""
        for row, (request, _) in enumerate(self.rows):
            if not self.done[row] and not request.cancelled:
                self._finish(row, self.text[row], "length")


def _eos_ids(pool: ModelPool, tokenizer: Any) -> set:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for choice in pool.choices.values():
        configured = getattr(getattr(choice.model, "generation_config", None), "eos_token_id", None)
        ids |= set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    return ids
