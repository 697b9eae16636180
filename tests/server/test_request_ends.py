"""Requests that end early: the server shuts down (a bounded drain, then every client hears why), its engine
has stopped, or the client leaves."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import httpx2 as httpx
import pytest

from niyama.engine import EngineConfig, LLMEngine, SamplingParams
from niyama.engine.core import EngineCore
from niyama.predictor import BatchTimePredictor
from niyama.qos import QoS
from niyama.request import FinishReason, Request, RequestStatus
from niyama.scheduler import SchedulerConfig
from niyama.server.app import _stream
from niyama.server.async_engine import AsyncEngine, QueueFull, Unavailable
from niyama.server.metrics import Metrics
from tests.server.conftest import serve


def test_sigterm_ends_open_requests_after_the_grace_period(cache_dir):
    """uvicorn alone waited for every open stream (a chat without max_tokens runs to the context's end)."""
    with serve(cache_dir, "--scheduler", "fcfs", "--shutdown-grace", "1") as s:
        body = {"model": s.model, "prompt": "Hello", "max_tokens": 4000, "ignore_eos": True}
        answers: list[httpx.Response] = []
        waiting = threading.Thread(target=lambda: answers.append(
            httpx.post(f"{s.url}/v1/completions", json=body, timeout=120)))
        waiting.start()
        events = []
        with httpx.stream("POST", f"{s.url}/v1/completions", json={**body, "stream": True}, timeout=120) as stream:
            for line in stream.iter_lines():
                if not line:
                    continue
                events.append(line.removeprefix("data: "))
                if len(events) == 1:  # both requests run: stop the server
                    s.process.send_signal(signal.SIGTERM)
                    stopped = time.monotonic()
        waiting.join()
        s.process.wait(timeout=60)  # (uvicorn re-raises the signal once it has shut down: status -15)
    assert time.monotonic() - stopped < 30  # the grace period, one iteration, start-up of nothing new
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "unavailable" and "shutting down" in error["message"]
    assert len(events) > 3  # tokens went on flowing during the grace period
    assert answers[0].status_code == 503 and answers[0].json()["error"]["code"] == "unavailable"


def test_a_second_signal_ends_open_requests_and_the_server_at_once(cache_dir):
    """uvicorn skips the app's shutdown after a second signal, so the engine thread was never stopped and the
    process hung forever, with or without open requests."""
    with serve(cache_dir, "--scheduler", "fcfs", "--shutdown-grace", "60") as s:
        body = {"model": s.model, "prompt": "Hello", "max_tokens": 4000, "ignore_eos": True, "stream": True}
        events = []
        with httpx.stream("POST", f"{s.url}/v1/completions", json=body, timeout=120) as stream:
            for line in stream.iter_lines():
                if not line:
                    continue
                events.append(line.removeprefix("data: "))
                if len(events) == 1:
                    s.process.send_signal(signal.SIGINT)
                    time.sleep(0.5)
                    s.process.send_signal(signal.SIGINT)
                    stopped = time.monotonic()
        s.process.wait(timeout=30)
    assert time.monotonic() - stopped < 15  # not the 60 s grace period
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "unavailable"


def test_a_stopped_engine_refuses_requests_instead_of_queueing_them():
    """Requests submitted after its loop ended used to be queued and never answered."""
    core = LLMEngine(EngineConfig(kv_cache_memory=16 << 20)).core

    async def main() -> None:
        engine = AsyncEngine(core, Metrics("test"), max_queued_requests=8)
        engine.start()
        engine.stop()
        with pytest.raises(Unavailable):
            engine.submit(Request("r", 0.0, QoS("x", ttlt=60.0), 3, 2, [1, 2, 3]), SamplingParams(max_tokens=2))

    asyncio.run(main())


def test_a_burst_fills_the_free_running_slots_and_then_the_queue():
    """One running slot and a queue of two take three of a burst of five. Requests not yet picked up by the
    engine loop all counted as queued, so the burst got three 429s instead of two."""
    core = LLMEngine(EngineConfig(kv_cache_memory=16 << 20, max_num_seqs=1)).core

    async def main() -> list[bool]:
        engine = AsyncEngine(core, Metrics("test"), max_queued_requests=2)
        engine.start()
        accepted = []
        for i in range(5):  # no await in between: the loop has not taken any of them when the last comes
            try:
                engine.submit(Request(f"r{i}", 0.0, QoS("x", ttlt=60.0), 3, 500, [1, 2, 3]),
                              SamplingParams(max_tokens=500, ignore_eos=True))
                accepted.append(True)
            except QueueFull:
                accepted.append(False)
        engine.stop()
        return accepted

    assert asyncio.run(main()) == [True, True, True, False, False]


def test_relegated_requests_leave_the_queue_to_requests_that_can_still_be_served():
    """A queue of two, one running slot, and requests that are already late: Niyama relegates them, and they
    no longer fill the queue (new requests that can be served in time would get 429 behind them); waiting
    and relegated requests together stay within ``RELEGATED_ROOM`` times the queue."""
    offline = LLMEngine(EngineConfig(kv_cache_memory=16 << 20, max_num_seqs=1))
    config = SchedulerConfig(max_num_seqs=1, relegation_period=0.0)
    core = EngineCore(offline.runner, offline.tokenizer, "niyama", config, BatchTimePredictor.load("a100-llama3-8b"))
    late = QoS("late", ttft=0.001, tbt=0.001)  # arrived at 0.0 on the monotonic clock: long past due

    async def main() -> list[bool]:
        engine = AsyncEngine(core, Metrics("test"), max_queued_requests=2)
        engine.start()
        accepted = []
        for i in range(1 + engine.RELEGATED_ROOM * 2 + 1):
            request = Request(f"r{i}", 0.0, late, 3, 500, [1, 2, 3])
            try:
                engine.submit(request, SamplingParams(max_tokens=500, ignore_eos=True))
                accepted.append(True)
            except QueueFull:
                accepted.append(False)
                continue
            for _ in range(500):  # until the loop has taken it in: running, or relegated behind the first
                if request.status in (RequestStatus.RUNNING, RequestStatus.RELEGATED):
                    break
                await asyncio.sleep(0.01)
        relegated = core.scheduler.num_relegated
        engine.stop()
        assert relegated == engine.RELEGATED_ROOM * 2
        return accepted

    assert asyncio.run(main()) == [True] * (1 + AsyncEngine.RELEGATED_ROOM * 2) + [False]


def test_a_stream_left_before_its_outputs_are_read_aborts_its_request():
    """The role chunk goes out before the engine's outputs are first read; a client that left right then
    used to leave its request running to max_tokens (a generator that never started has no cleanup)."""
    async def outputs():
        raise AssertionError("never read")
        yield

    async def main() -> list[int]:
        aborted = []
        events = _stream({"id": "x"}, outputs(), chat=True, include_usage=False, abort=lambda: aborted.append(1))
        assert '"role": "assistant"' in await anext(events)
        await events.aclose()  # the client is gone
        return aborted

    assert asyncio.run(main()) == [1]


def test_ending_open_requests_aborts_them_in_the_engine():
    """At shutdown each open request hears ``Unavailable``; its request used to go on in the engine, holding
    its KV blocks, because the stream counted the error as the request's end and never aborted it."""
    core = LLMEngine(EngineConfig(kv_cache_memory=16 << 20)).core
    request = Request("r", 0.0, QoS("x", ttlt=600.0), 3, 500, [1, 2, 3])

    async def main() -> None:
        engine = AsyncEngine(core, Metrics("test"), max_queued_requests=8)
        engine.start()
        outputs = engine.submit(request, SamplingParams(max_tokens=500, ignore_eos=True))
        await anext(outputs)  # running
        engine.end_open_requests()
        with pytest.raises(Unavailable):
            while True:
                await anext(outputs)
        for _ in range(600):  # the loop aborts it before its next iteration
            if request.finish_reason is not None:
                break
            await asyncio.sleep(0.05)
        engine.stop()

    asyncio.run(main())
    assert request.finish_reason is FinishReason.ABORT and request.num_output_tokens < 500
    assert core.scheduler.num_running == 0 and core.kv.usage == 0
