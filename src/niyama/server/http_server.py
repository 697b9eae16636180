"""uvicorn's server with a bounded shutdown: on SIGINT/SIGTERM, open requests get a grace period to finish,
then each ends with a 503 error (a stream gets an error event and ``[DONE]``); a second signal ends them at
once. uvicorn alone waits for every open stream, however long it runs."""

from __future__ import annotations

import asyncio
import socket
from types import FrameType

import uvicorn

from niyama.server.async_engine import AsyncEngine


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, grace: float):
        config.timeout_graceful_shutdown = grace + 5  # then uvicorn cancels whatever is still open
        super().__init__(config)
        self.engine, self.grace = engine, grace
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and self._loop is not None:  # a second signal: end open requests now
            self._loop.call_soon_threadsafe(self.engine.end_open_requests)
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        timer = asyncio.get_running_loop().call_later(self.grace, self.engine.end_open_requests)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()
            if self.force_exit:  # uvicorn then skips the app's shutdown, which stops the engine thread
                self.engine.stop()
