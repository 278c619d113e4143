"""The learning predictor's wiring: captured prompt routing in, refreshed predictions out.

The scheduler hands every step's :class:`~caps_vllm.routing.RoutingRecord` to
:meth:`OnlineLearner.observe` on the busy loop, which only pairs each request's routed rows
with its prompt token ids and queues them (bounded: ``learn_rows_per_step`` rows a step, at
most ``queue_rows`` waiting; beyond that rows are dropped and counted, learning is best
effort). A background thread updates the :class:`~caps_vllm.learned_table.LearnedTable`,
pushes the tokens whose experts changed into the :class:`~caps_vllm.predictor.ExpertPredictor`
(a request's vector is computed once, when it first enters the window, so a refresh only
affects requests predicted after it) and writes the state next to the router table at most
every ``persist_every_s`` and at shutdown, so no step waits for the table or the disk. At start
a state of the same model is resumed. ``background=False`` learns inline (tests, studies).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

import numpy as np

from caps_vllm.learned_table import LearnedTable, Recall
from caps_vllm.predictor import ExpertPredictor
from caps_vllm.routing import RoutingRecord

logger = logging.getLogger("caps_vllm.learner")


class OnlineLearner:
    def __init__(
        self,
        predictor: ExpertPredictor,
        max_tokens: int,
        half_life_tokens: float,
        persist_every_s: float = 60.0,
        background: bool = True,
        queue_rows: int = 65536,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.predictor = predictor
        self.table = LearnedTable(predictor.table, predictor.num_experts, max_tokens, half_life_tokens)
        self.path = predictor.learned_path
        self.resumed = self.path is not None and self.table.load(self.path, predictor.fingerprint)
        if self.resumed:
            changed = np.flatnonzero((self.table.table != predictor.table).any(axis=(1, 2)))
            predictor.refresh(changed, self.table.table[changed])
        self.persist_every_s, self.clock = persist_every_s, clock
        self.background, self.queue_rows = background, queue_rows
        self.dropped_rows = 0
        self._last_persist = clock()
        self._queue: deque[tuple[np.ndarray, np.ndarray]] = deque()
        self._queued = 0  # rows queued or being learned
        self._cv = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._reported = Recall(self.table.recall.picks, self.table.recall.learned_hits, self.table.recall.prior_hits)
        self._learned = Recall(**vars(self._reported))  # the worker's totals, read under the lock
        logger.info(
            "CAPS learning table: up to %d tokens (%.1f MB), half-life %.3g tokens, state %s%s",
            self.table.max_tokens,
            self.table.bytes / 2**20,
            half_life_tokens,
            self.path,
            " (resumed)" if self.resumed else "",
        )

    def observe(self, record: RoutingRecord, prompt_of: Callable[[str], Sequence[int] | None]) -> Recall:
        """Queue the record's prompt rows; returns the recall counts learned since the last call."""
        batch = []
        for rid, rows in record.prompt_rows.items():
            ids = prompt_of(rid)
            if ids is None or not len(rows):
                continue
            start = record.prompt_start.get(rid, 0)
            token_ids = np.asarray(ids[start : start + len(rows)], dtype=np.int64)
            if len(token_ids) == len(rows):  # (rows past the prompt's end are not its prompt tokens)
                batch.append((token_ids, rows))
        if batch and not self.background:
            self._learn(batch)
        elif batch:
            n = sum(len(ids) for ids, _ in batch)
            with self._cv:
                if self._queued + n > self.queue_rows:
                    self.dropped_rows += n
                else:
                    self._queue.extend(batch)
                    self._queued += n
                    self._cv.notify()
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="caps-learning-table", daemon=True)
                self._thread.start()
        with self._cv:
            now = Recall(**vars(self._learned))
        r, self._reported = self._reported, now
        return Recall(now.picks - r.picks, now.learned_hits - r.learned_hits, now.prior_hits - r.prior_hits)

    def _learn(self, batch: list[tuple[np.ndarray, np.ndarray]]) -> None:
        for token_ids, rows in batch:
            changed = self.table.observe(token_ids, rows)
            self.predictor.refresh(changed, self.table.table[changed])
        with self._cv:
            self._learned = Recall(**vars(self.table.recall))
        if self.path is not None and self.clock() - self._last_persist >= self.persist_every_s:
            self.persist()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if not self._queue:
                    return
                batch = list(self._queue)
                self._queue.clear()
            try:
                self._learn(batch)
            except Exception:  # never take the engine down; learning stops, the predictions stay
                logger.exception("CAPS learning table failed; it learns no more")
                with self._cv:
                    self._closed = True
                    self._queue.clear()
                    self._queued = 0
                    self._cv.notify_all()
                return
            with self._cv:
                self._queued -= sum(len(ids) for ids, _ in batch)
                self._cv.notify_all()

    def flush(self, timeout_s: float = 60.0) -> None:
        """Wait until every queued row is learned (tests, studies)."""
        with self._cv:
            self._cv.wait_for(lambda: self._queued == 0, timeout_s)

    def persist(self) -> None:
        """Write the state (learning thread, or inline without one); a failed write is only logged."""
        if self.path is None or not self.table.rows_learned:
            return
        self._last_persist = self.clock()
        try:
            LearnedTable.save(self.table.state(self.predictor.fingerprint), self.path)
        except OSError as exc:
            logger.warning("CAPS learned routing table not saved to %s: %s", self.path, exc)

    def close(self, timeout_s: float = 30.0) -> None:
        """Learn what is queued, stop the thread, persist the final state."""
        self.flush(timeout_s)
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self.persist()
