"""The engine loop thread and its bridge to asyncio.

One thread owns the ``EngineCore`` and runs iterations back to back while there is work; it sleeps on a
condition variable when idle (no busy-waiting). HTTP handlers never touch the core: they post new
requests and aborts to the loop, and receive their outputs through a per-request ``asyncio.Queue`` fed
with ``loop.call_soon_threadsafe`` once per iteration.

The loop runs on the worker of a one-thread executor, so that the server can load the model and calibrate
on that same thread first: torch work on a second thread, after another thread has run parallel ops,
ran prefill ~1.4× slower on this machine (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor

from niyama.engine.core import EngineCore, StepOutput
from niyama.engine.sampler import SamplingParams
from niyama.request import Request
from niyama.server.metrics import Metrics

log = logging.getLogger("niyama.server")


def engine_thread() -> ThreadPoolExecutor:
    """The one-worker executor for all torch work. SIGINT and SIGTERM are blocked on its thread (and on the
    OpenMP workers it starts, which inherit the mask), so that the kernel delivers them to the main thread:
    one delivered to a busy worker woke nobody, and a main thread asleep in ``Future.result()`` never ran
    Python's handler (Ctrl-C during calibration was ignored until it ended)."""
    return ThreadPoolExecutor(1, thread_name_prefix="niyama-engine", initializer=signal.pthread_sigmask,
                              initargs=(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM}))


class QueueFull(Exception):
    """The waiting queue is at ``max_queued_requests``, or waiting and relegated requests together at
    ``RELEGATED_ROOM`` times that."""


class Unavailable(RuntimeError):
    """The engine is not running, or the server is shutting down."""


class AsyncEngine:
    # Relegated requests (they have missed, or cannot meet, their SLO; they complete when capacity is left)
    # do not take the queue's places: a queue full of them would refuse new requests that can still be
    # served in time. Waiting and relegated requests together stay within this many times the queue's size.
    RELEGATED_ROOM = 4

    def __init__(self, core: EngineCore, metrics: Metrics, max_queued_requests: int,
                 thread: ThreadPoolExecutor | None = None):
        """``thread``: the one-worker executor to run the loop on (default: a new one)."""
        self.core = core
        self.metrics = metrics
        self.max_queued_requests = max_queued_requests
        self._cond = threading.Condition()
        self._new: list[tuple[Request, SamplingParams]] = []
        self._aborts: list[str] = []
        self._streams: dict[str, asyncio.Queue[StepOutput | BaseException]] = {}
        self._last_token_time: dict[str, float] = {}
        self._num_queued = 0  # waiting (+ taken from _new since the last recount)
        self._num_relegated = 0
        self._free_slots = core.scheduler.config.max_num_seqs  # running slots free at the last recount
        self._stopped = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = thread or engine_thread()
        self._running: Future[None] | None = None

    # -- lifecycle (event-loop side) -----------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._running = self._thread.submit(self._run)

    @property
    def alive(self) -> bool:
        """Whether the engine loop is running (False before ``start`` and once it has ended)."""
        return self._running is not None and not self._running.done()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._running is not None:
            self._running.result()

    # -- requests (event-loop side) ------------------------------------------------------------
    def submit(self, request: Request, params: SamplingParams) -> AsyncIterator[StepOutput]:
        """Queue a request (``QueueFull`` when the queue is at its limit) and return its outputs."""
        queue: asyncio.Queue[StepOutput | BaseException] = asyncio.Queue()
        if not self.alive:  # its loop ended (a failure it could not survive): nobody would answer
            raise Unavailable("the engine is not running")
        with self._cond:
            # Requests that will take a free running slot do not wait; a burst used to count them as queued.
            queued = self._num_queued + len(self._new) - self._free_slots
            if queued >= self.max_queued_requests or \
                    queued + self._num_relegated >= self.RELEGATED_ROOM * self.max_queued_requests:
                raise QueueFull
            self._streams[request.request_id] = queue
            self._new.append((request, params))
            self._cond.notify()
        return self._outputs(request.request_id, queue)

    def end_open_requests(self) -> None:
        """(Event-loop side.) End every open request with ``Unavailable``, so that its client hears why, and
        abort it in the loop (its KV blocks freed before the next iteration)."""
        with self._cond:
            open_requests = list(self._streams.items())
            self._aborts.extend(rid for rid, _ in open_requests)
            self._cond.notify()
        for _, queue in open_requests:
            queue.put_nowait(Unavailable("the server is shutting down"))

    async def _outputs(self, rid: str, queue: asyncio.Queue[StepOutput | BaseException]
                       ) -> AsyncIterator[StepOutput]:
        """Yield until the request finishes. Leaving early (client gone, task cancelled) aborts it; the
        loop frees its KV blocks before its next iteration."""
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(rid)

    def abort(self, rid: str) -> None:
        """(Event-loop side.) Stop a request the client no longer reads; the loop frees its KV blocks before
        its next iteration. A finished or unknown request is left alone."""
        with self._cond:
            self._aborts.append(rid)
            self._cond.notify()

    # -- the loop (engine thread) --------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._stopped or self._new or self._aborts or self.core.has_work()):
                    self._cond.wait()
                if self._stopped:
                    return
                new, self._new = self._new, []
                self._num_queued += len(new)  # counted as queued until the iteration's end recounts
                aborts, self._aborts = self._aborts, []
            try:
                self._iterate(new, aborts)
            except Exception as e:  # a bug must not leave clients hanging: fail every open stream
                log.exception("engine iteration failed")
                self._fail_all(e)
                self._observe_state()

    def _iterate(self, new: list[tuple[Request, SamplingParams]], aborts: list[str]) -> None:
        core = self.core
        for rid in aborts:
            request = core.abort(rid)
            if request is not None:
                self.metrics.observe_finished(request)
            self._drop(rid)
        for request, params in new:
            if request.request_id not in self._streams:
                continue  # the client left before the request reached the loop
            try:
                core.add(request, params)
            except ValueError as e:
                self._deliver([(request.request_id, e)])
                self._drop(request.request_id)
        outputs = []
        if core.has_work():
            outputs = core.step()
            if core.last_iteration is not None:
                self.metrics.observe_iteration(core.last_iteration)
        for out in outputs:
            r = out.request
            self.metrics.observe_token(r, self._last_token_time.get(r.request_id))
            if out.finished:
                self.metrics.observe_finished(r)
                self._last_token_time.pop(r.request_id, None)
            elif r.last_token_time is not None:
                self._last_token_time[r.request_id] = r.last_token_time
        self._observe_state()
        self._deliver([(out.request.request_id, out) for out in outputs])
        for out in outputs:
            if out.finished:
                self._drop(out.request.request_id)

    def _observe_state(self) -> None:
        s = self.core.scheduler
        with self._cond:  # submit reads both together
            self._num_queued = s.num_waiting
            self._num_relegated = s.num_relegated
            self._free_slots = max(s.config.max_num_seqs - s.num_running, 0)
        self.metrics.observe_state(s.num_running, s.num_waiting, s.num_relegated, self.core.kv.usage,
                                   s.num_preemptions)

    def _deliver(self, items: list[tuple[str, StepOutput | BaseException]]) -> None:
        """Hand outputs to their streams with one call into the event loop."""
        routed = [(q, item) for rid, item in items if (q := self._streams.get(rid)) is not None]
        if routed and self._loop is not None:
            self._loop.call_soon_threadsafe(_put_all, routed)

    def _drop(self, rid: str) -> None:
        with self._cond:
            self._streams.pop(rid, None)
        self._last_token_time.pop(rid, None)

    def _fail_all(self, error: Exception) -> None:
        """Answer every open stream with the error first, then abort its request (counted as finished)."""
        with self._cond:
            rids = list(self._streams)
        self._deliver([(rid, RuntimeError(f"engine failure: {error}")) for rid in rids])
        for rid in rids:
            self._drop(rid)
            try:
                request = self.core.abort(rid)
            except Exception:  # keep the loop alive for the requests still to come
                log.exception("aborting %s after an engine failure failed", rid)
                continue
            if request is not None:
                self.metrics.observe_finished(request)


def _put_all(routed: list[tuple[asyncio.Queue, StepOutput | BaseException]]) -> None:
    for queue, item in routed:
        queue.put_nowait(item)
