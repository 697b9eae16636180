"""The benchmark client against a misbehaving HTTP server: every failure is recorded, nothing hangs.

Our own server does not break its streams on purpose, so this one (real HTTP, aiohttp.web) does: each
request's ``max_tokens`` picks how it misbehaves.
"""

from __future__ import annotations

import asyncio
import json
import socket

import aiohttp
import pytest
from aiohttp import web

from niyama.bench.client import BenchConfig, ServerError, list_models, run_load_async
from niyama.qos import Importance, QoSClasses
from niyama.sim.workload import RequestSpec

CLASSES = QoSClasses.from_dict({"default": "chat", "classes": {
    "chat": {"ttft": 5.0, "tbt": 1.0}, "batch": {"ttlt": 30.0}}})
GOOD, HTTP_ERROR, NO_DONE, SHORT, FLAT_ERROR, HANG, MALFORMED = 4, 1, 2, 3, 5, 6, 7


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
    """Serve ``app`` on a free port; returns (runner, base URL)."""
    runner = web.AppRunner(app)
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
    kinds = [GOOD, HTTP_ERROR, NO_DONE, SHORT, FLAT_ERROR, HANG, MALFORMED]
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
    hung = by_kind[HANG]
    assert hung.cancelled and hung.error is None and hung.finished is None and len(hung.chunk_times) == 1
    assert all(r.ended is not None for r in run.results)


def test_priority_mode_needs_a_priority_for_every_class():
    specs = [RequestSpec(0.0, 8, GOOD, "chat", Importance.STANDARD)]
    cfg = BenchConfig(base_url="http://127.0.0.1:9/v1", qos_mode="priority", priorities={"batch": 0})
    with pytest.raises(ValueError, match="no priority for class"):
        asyncio.run(run_load_async(specs, CLASSES, cfg))


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
