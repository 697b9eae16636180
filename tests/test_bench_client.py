"""The benchmark client against a misbehaving HTTP server: every failure is recorded, nothing hangs.

Our own server does not break its streams on purpose, so this one (real HTTP, aiohttp.web) does: each
request's ``max_tokens`` picks how it misbehaves.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from niyama.bench.client import (
    BenchConfig,
    ServerError,
    _priorities,
    _service_tiers,
    list_models,
    run_load_async,
)
from niyama.qos import Importance, QoSClasses
from niyama.sim.workload import RequestSpec

CLASSES = QoSClasses.from_dict({"default": "chat", "classes": {
    "chat": {"ttft": 5.0, "tbt": 1.0}, "batch": {"ttlt": 30.0}}})
GOOD, HTTP_ERROR, NO_DONE, SHORT, FLAT_ERROR, HANG, MALFORMED, SILENT_ERROR = 4, 1, 2, 3, 5, 6, 7, 8


def _event(payload: dict) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


async def _completions(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    n = body["max_tokens"]
    if n == HTTP_ERROR:
        return web.json_response({"error": {"message": "boom", "type": "server_error"}}, status=500)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    if n == HANG:
        await resp.write(_event({"choices": [{"text": "a"}]}))
        await asyncio.sleep(3600)
    if n == FLAT_ERROR:
        await resp.write(_event({"object": "error", "message": "vllm says no"}))
        return resp
    if n == SILENT_ERROR:  # an error event with an empty message once counted as a success
        await resp.write(_event({"object": "error", "message": ""}))
        return resp
    if n == MALFORMED:
        await resp.write(b"data: {not json\n\n")
        return resp
    produced = 1 if n == SHORT else n
    for _ in range(produced):
        await resp.write(_event({"choices": [{"text": "tok"}]}))
    await resp.write(_event({"choices": [], "usage": {"prompt_tokens": 8, "completion_tokens": produced}}))
    if n != NO_DONE:
        await resp.write(b"data: [DONE]\n\n")
    return resp


async def _models(_: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": "fake"}]})


async def _start(app: web.Application) -> tuple[web.AppRunner, str]:
    """Serve ``app`` on a free port; returns (runner, base URL). Cleanup waits at most a second for handlers
    still running (a hung stream's would hold it for aiohttp's default minute)."""
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    return runner, f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


@pytest.fixture
def fake_server():
    """A coroutine that starts the server on a free port and returns (runner, base URL)."""

    async def start():
        app = web.Application()
        app.router.add_get("/v1/models", _models)
        app.router.add_post("/v1/completions", _completions)
        return await _start(app)

    return start


def test_failures_are_recorded_and_a_hung_stream_is_cut_by_the_drain_timeout(fake_server):
    kinds = [GOOD, HTTP_ERROR, NO_DONE, SHORT, FLAT_ERROR, HANG, MALFORMED, SILENT_ERROR]
    specs = [RequestSpec(0.01 * i, 8, n, "batch", Importance.STANDARD) for i, n in enumerate(kinds)]

    async def main():
        runner, url = await fake_server()
        try:
            cfg = BenchConfig(base_url=url, drain_timeout=1.0, progress=False)
            return await run_load_async(specs, CLASSES, cfg)
        finally:
            await runner.cleanup()

    run = asyncio.run(main())
    by_kind = dict(zip(kinds, run.results, strict=True))
    assert run.stop_reason == "drain" and run.duration > 0
    good = by_kind[GOOD]
    assert good.error is None and good.finished is not None and len(good.chunk_times) == 4
    assert good.output_tokens == 4
    assert by_kind[HTTP_ERROR].error == "HTTP 500: boom"
    assert by_kind[NO_DONE].error == "the stream ended without [DONE]"
    assert "stopped at 1 of 3 tokens" in by_kind[SHORT].error
    assert by_kind[FLAT_ERROR].error == "vllm says no"
    assert by_kind[MALFORMED].error.startswith("bad stream event")
    assert by_kind[SILENT_ERROR].error == "an error event without a message"
    hung = by_kind[HANG]
    assert hung.cancelled and hung.error is None and hung.finished is None and len(hung.chunk_times) == 1
    assert all(r.ended is not None for r in run.results)


def test_priorities_given_for_some_classes_keep_the_others_defaults():
    assert _priorities(CLASSES) == {"chat": 0, "batch": 1}
    assert _priorities(CLASSES, {"batch": -3}) == {"chat": 0, "batch": -3}


@pytest.mark.parametrize("answer", [b'{"object": "list"}', b'[1, 2]', b"<html>hello</html>"])
def test_a_server_that_is_not_openai_compatible_is_named_as_such(answer):
    async def models(_: web.Request) -> web.Response:
        return web.Response(body=answer, content_type="text/html")

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/v1/models", models)
        runner, url = await _start(app)
        try:
            async with aiohttp.ClientSession() as session:
                with pytest.raises(ServerError, match="did not answer with OpenAI's model list"):
                    await list_models(session, url)
        finally:
            await runner.cleanup()

    asyncio.run(main())


def _one(kind: int, cls: str = "chat") -> list[RequestSpec]:
    return [RequestSpec(0.0, 8, kind, cls, Importance.STANDARD)]


def test_a_stalled_stream_fails_after_the_stall_timeout(fake_server):
    """Without a drain timeout, a server that stops sending used to hang the benchmark forever."""
    async def main():
        runner, url = await fake_server()
        try:
            return await run_load_async(_one(HANG), CLASSES, BenchConfig(base_url=url, stall_timeout=0.5,
                                                                         progress=False))
        finally:
            await runner.cleanup()

    hung = asyncio.run(main()).results[0]
    assert hung.error == "the stream stalled: nothing arrived within the stall timeout"


def test_a_server_that_never_lists_its_models_is_given_up_on(monkeypatch):
    monkeypatch.setattr("niyama.bench.client.SETUP_TIMEOUT", 0.5)

    async def models(_: web.Request) -> web.Response:
        await asyncio.sleep(3600)

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/v1/models", models)
        runner, url = await _start(app)
        try:
            with pytest.raises(ServerError, match="did not answer within 0.5 s"):
                await run_load_async(_one(GOOD), CLASSES, BenchConfig(base_url=url, progress=False))
        finally:
            await runner.cleanup()

    asyncio.run(main())


@pytest.mark.parametrize(("cfg", "error", "message"), [
    ({"model": "other"}, ServerError, "does not serve model 'other' \\(it lists fake\\)"),
    ({"qos_mode": "service-tier", "service_tiers": {"chatt": "priority"}}, ValueError,
     "--service-tiers names unknown class\\(es\\) chatt"),
    ({"qos_mode": "service-tier", "service_tiers": {"chat": "fast"}}, ValueError,
     "--service-tiers: fast is not a service tier \\(OpenAI's: auto, default, flex, scale, priority\\)"),
    ({"qos_mode": "priority", "priorities": {"chat": 0, "batch": 1, "bulk": 2}}, ValueError,
     "--priorities names unknown class\\(es\\) bulk"),
])
def test_settings_that_cannot_be_what_the_user_meant_stop_before_the_run(fake_server, cfg, error, message):
    async def main():
        runner, url = await fake_server()
        try:
            await run_load_async(_one(GOOD), CLASSES, BenchConfig(base_url=url, progress=False, **cfg))
        finally:
            await runner.cleanup()

    with pytest.raises(error, match=message):
        asyncio.run(main())


def test_a_base_url_without_its_scheme_is_named():
    with pytest.raises(ValueError, match="must start with http:// or https://"):
        asyncio.run(run_load_async(_one(GOOD), CLASSES, BenchConfig(base_url="127.0.0.1:8000/v1")))


def test_default_service_tiers_follow_the_class_kind_not_its_name():
    assert _service_tiers(CLASSES) == {"chat": "priority", "batch": "flex"}


@contextmanager
def _serving_in_a_thread(completions) -> Iterator[str]:
    """A fake OpenAI server on its own event loop thread, for code that runs its own loops (``run_load``)."""
    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_get("/v1/models", _models)
    app.router.add_post("/v1/completions", completions)
    runner, url = loop.run_until_complete(_start(app))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield url
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()


def _capacity_args(url: str, qos: Path, *extra: str):
    from niyama.cli import build_parser

    qos.write_text('default = "chat"\n[classes.chat]\nttft = 5.0\ntbt = 1.0\n')
    return build_parser().parse_args([
        "bench", "capacity", "--base-url", url, "--trace", "synthetic", "--input-len", "8", "--output-len",
        str(GOOD), "--duration", "2", "--qos-config", str(qos), "--no-progress", *extra])


def _refusing_after(served_ok: int):
    """A completions handler that serves ``served_ok`` requests, then refuses every one with 429."""
    served = 0

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal served
        served += 1
        if served > served_ok:
            return web.json_response({"error": {"message": "busy"}}, status=429)
        return await _completions(request)

    return handler


def test_a_capacity_search_goes_on_past_a_point_where_every_request_was_refused(tmp_path):
    """A server that sheds load (429) under a higher rate used to end the whole search with an error."""
    from niyama.bench.commands import find_live_capacity

    with _serving_in_a_thread(_refusing_after(4)) as url:  # the first point's requests pass
        args = _capacity_args(url, tmp_path / "qos.toml", "--start", "2", "--tolerance", "0.5")
        result, runs = find_live_capacity(args, QoSClasses.load(tmp_path / "qos.toml"), tmp_path / "cap", "cap")
    assert runs[0]["worst_violation_pct"] == 0.0 and len(runs) >= 2
    assert all(r["worst_violation_pct"] >= 10.0 for r in runs[1:]) and 2.0 <= result.capacity < 3.0


def test_capacity_searches_in_threads_take_turns_point_by_point(tmp_path):
    """`make eval-live` runs its schedulers' searches at once, each against its own server, so that the
    machine's drift falls on each alike: their points must alternate in time, and a search that ends must
    not hold the other up."""
    from niyama.bench.commands import find_live_capacity
    from niyama.bench.turns import Turns

    turns = Turns(["coarse", "fine"])
    running: set[str] = set()
    overlaps: list[set[str]] = []

    @contextmanager
    def point(label: str) -> Iterator[None]:
        with turns.turn(label):
            overlaps.append(set(running))  # points already running as this one starts: none
            running.add(label)
            try:
                yield
            finally:
                running.discard(label)

    def search(label: str, tolerance: str) -> list[dict]:
        with _serving_in_a_thread(_refusing_after(4)) as url:  # each: 2 req/s passes, higher rates fail
            args = _capacity_args(url, tmp_path / f"{label}.toml", "--start", "2", "--tolerance", tolerance)
            try:
                return find_live_capacity(args, QoSClasses.load(tmp_path / f"{label}.toml"), tmp_path, label,
                                          lambda: point(label))[1]
            finally:
                turns.leave(label)

    with ThreadPoolExecutor(2) as pool:
        coarse, fine = pool.map(search, ["coarse", "fine"], ["0.5", "0.1"])
    started = sorted([(r["started"], "coarse") for r in coarse] + [(r["started"], "fine") for r in fine])
    assert len(fine) > len(coarse) >= 2 and not any(overlaps)
    assert [label for _, label in started] == ["coarse", "fine"] * len(coarse) + ["fine"] * (len(fine) - len(coarse))


def test_turns_refuse_a_name_that_takes_no_turns():
    from niyama.bench.turns import Turns

    turns = Turns(["a"])
    turns.leave("a")
    with pytest.raises(ValueError, match="'a' takes no turns here"), turns.turn("a"):
        pass


def test_duration_without_a_rate_replays_that_window_of_the_trace():
    """It was ignored: `--duration 10` replayed the whole hour of the trace."""
    from niyama.bench.commands import workload
    from niyama.cli import build_parser
    from niyama.sim.workload import load_trace

    args = build_parser().parse_args(["bench", "--trace", "azure_conv", "--duration", "10"])
    arrivals = load_trace("azure_conv").arrivals
    assert workload(args, CLASSES, None).num_requests == int((arrivals < 10).sum()) < len(arrivals)


def test_ctrl_c_keeps_what_the_run_measured(tmp_path):
    """Ctrl-C used to throw away every measurement of a long run; now the requests already sent are judged and
    written, and the command still ends as interrupted (status 130)."""
    from tests.test_cli import _interrupt_once

    qos = tmp_path / "qos.toml"
    qos.write_text('default = "chat"\n[classes.chat]\nttft = 5.0\ntbt = 1.0\n')
    with _serving_in_a_thread(_completions) as url:
        p = _interrupt_once(["bench", "--base-url", url, "--trace", "synthetic", "--input-len", "8", "--output-len",
                             str(GOOD), "--rate", "2", "--num-requests", "100", "--qos-config", str(qos),
                             "--output-dir", str(tmp_path), "--label", "cut"], "| 2/100 ")
    assert "interrupted after" in p.stdout.read()
    summary = json.loads((tmp_path / "bench-cut.json").read_text())
    rows = (tmp_path / "bench-cut.jsonl").read_text().splitlines()
    assert summary["stop_reason"] == "interrupted" and summary["planned_requests"] == 100
    assert 2 <= len(rows) == summary["overall"]["requests"] < 100
