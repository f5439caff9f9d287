"""The one thread that runs the model for `fedtune serve`, and the error a request is refused with.

Requests wait in a bounded queue (a full one is refused with 503, not queued without end); the
thread merges the inputs of the waiting ones into model calls of at most ``max_batch`` inputs, so
under concurrent load single-text requests share forward passes, and the event loop never runs
the model itself.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """A request refused with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class _Job:
    inputs: list[str]
    max_new_tokens: int
    future: concurrent.futures.Future[list[Any]]


_STOP = object()


class Batcher:
    """The one thread that calls the model: jobs wait in a bounded queue and are merged into model calls.

    Consecutive waiting jobs with the same ``max_new_tokens`` share a call while their inputs fit in
    ``max_batch``; a job that does not fit waits for the next call, so order is kept.
    """

    def __init__(self, run: Callable[[list[str], int], list[Any]], *, max_batch: int, max_queue: int) -> None:
        self._run, self._max_batch = run, max_batch
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._loop, name="fedtune-inference", daemon=True)
        self.calls = 0  # model calls made (read by /health)
        self.jobs = 0  # jobs answered

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def submit(self, inputs: list[str], max_new_tokens: int = 0) -> concurrent.futures.Future[list[Any]]:
        future: concurrent.futures.Future[list[Any]] = concurrent.futures.Future()
        try:
            self._queue.put_nowait(_Job(list(inputs), max_new_tokens, future))
        except queue.Full:
            raise ApiError(503, f"busy: {self._queue.maxsize} requests are waiting for the model; retry later.") from None
        return future

    def _loop(self) -> None:
        held: Any = None
        while True:
            first = held if held is not None else self._queue.get()
            held = None
            if first is _STOP:
                return
            batch, size = [first], len(first.inputs)
            while held is None:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is not _STOP and nxt.max_new_tokens == first.max_new_tokens and size + len(nxt.inputs) <= self._max_batch:
                    batch.append(nxt)
                    size += len(nxt.inputs)
                else:
                    held = nxt
            self._call(batch)

    def _call(self, batch: list[_Job]) -> None:
        batch = [job for job in batch if job.future.set_running_or_notify_cancel()]  # a client that left costs nothing
        if not batch:
            return
        try:
            outputs = self._run([text for job in batch for text in job.inputs], batch[0].max_new_tokens)
        except Exception as err:  # noqa: BLE001 -- each waiting request gets a 500, and the thread keeps serving
            logger.exception("inference failed on a batch of %d requests", len(batch))
            for job in batch:
                job.future.set_exception(err)
            return
        finally:
            self.calls += 1
        start = 0
        for job in batch:
            job.future.set_result(outputs[start : start + len(job.inputs)])
            start += len(job.inputs)
        self.jobs += len(batch)
