"""Runs the caption app on a TCP port: in the foreground (the launcher) or in a background thread (tests, benchmarks)."""

from __future__ import annotations

import asyncio
import signal
import threading
from typing import Callable

from aiohttp import web

from showtell_dist.serving.app import DRAIN


async def _start_site(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_host, bound_port = runner.addresses[0][:2]
    shown_host = f"[{bound_host}]" if ":" in bound_host else bound_host
    return runner, f"http://{shown_host}:{bound_port}"


def serve_forever(app: web.Application, host: str, port: int, on_ready: Callable[[str], None] = print,
                  on_draining: Callable[[], None] = lambda: None) -> None:
    """Serves until SIGINT or SIGTERM; `on_ready(url)` once the port accepts (port 0: a free one).

    The first signal drains (the app's DRAIN: new work and /health answered 503 while the requests in
    flight finish, up to its bound; `on_draining()` is called as it starts), then the server closes and
    this returns. A second signal closes at once.
    """

    async def main():
        runner, url = await _start_site(app, host, port)
        signalled = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, signalled.set)
        on_ready(url)
        try:
            await signalled.wait()
            if DRAIN in app:
                signalled.clear()
                on_draining()
                drain = loop.create_task(app[DRAIN]())
                again = loop.create_task(signalled.wait())
                await asyncio.wait([drain, again], return_when=asyncio.FIRST_COMPLETED)
                again.cancel()
                drain.cancel()
        finally:
            await runner.cleanup()

    asyncio.run(main())


class BackgroundServer:
    """`with BackgroundServer(app) as server: requests.get(server.url + "/health")` on 127.0.0.1, a free port."""

    def __init__(self, app: web.Application, host: str = "127.0.0.1", port: int = 0):
        self._app, self._host, self._port = app, host, port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="caption-server", daemon=True)
        self._runner: web.AppRunner | None = None
        self.url: str | None = None

    def __enter__(self) -> "BackgroundServer":
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(_start_site(self._app, self._host, self._port), self._loop)
        self._runner, self.url = future.result(timeout=60)
        return self

    def drain(self, timeout_s: float = 120) -> None:
        """What SIGTERM does to serve_forever: new work refused, requests in flight finished (blocks until done)."""
        asyncio.run_coroutine_threadsafe(self._app[DRAIN](), self._loop).result(timeout=timeout_s)

    def __exit__(self, *exc) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=60)
        self._loop.close()
