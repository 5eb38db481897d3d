"""Running the emulator: in a background thread for tests (`EmulatorServer`), or blocking
(`serve`, behind `batchops emulator`)."""

from __future__ import annotations

import asyncio
import errno
import socket
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from batchops.emulator.app import ABORT_SCOPE_KEY, create_app
from batchops.emulator.scenario import Scenario
from batchops.emulator.state import Emulator
from batchops.errors import InputError

T = TypeVar("T")
START_TIMEOUT = 5.0


class _AbortableH11(H11Protocol):
    """h11 protocol that lets the app close its connection without answering
    (the `drop_connection_every` fault): ASGI itself has no way to do that."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        inner = self.app

        async def app(scope: Any, receive: Any, send: Any) -> None:
            scope[ABORT_SCOPE_KEY] = transport.abort
            await inner(scope, receive, send)

        self.app = app


class _QuickServer(uvicorn.Server):
    """uvicorn.Server whose stop takes ~10 ms instead of ~200 ms (uvicorn polls its exit flag
    and waits for connections in 100 ms steps): tests start and stop hundreds of emulators."""

    async def main_loop(self) -> None:
        counter = 0
        while not await self.on_tick(counter):
            for _ in range(10):  # on_tick stays at ~10 Hz, as uvicorn expects
                if self.should_exit:
                    return
                await asyncio.sleep(0.01)
            counter = (counter + 1) % 864_000

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()  # idle keep-alive connections close at once
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.config.timeout_graceful_shutdown or 0.0)
        while (self.server_state.connections or self.server_state.tasks) and loop.time() < deadline:
            await asyncio.sleep(0.01)
        for task in self.server_state.tasks:
            task.cancel()
        for server in self.servers:
            await server.wait_closed()
        await self.lifespan.shutdown()


def _config(app: Any, host: str, port: int, log_level: str) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=_AbortableH11,
        lifespan="on",
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=1,
    )


def _as_scenario(scenario: Scenario | str | Path | dict[str, Any] | None) -> Scenario:
    if scenario is None:
        return Scenario()
    if isinstance(scenario, Scenario):
        return scenario
    if isinstance(scenario, dict):
        return Scenario.model_validate(scenario)
    return Scenario.from_file(scenario)


class EmulatorServer:
    """The emulator on a background thread; use as a context manager or start()/stop()."""

    def __init__(
        self,
        scenario: Scenario | str | Path | dict[str, Any] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
    ) -> None:
        self.emulator = Emulator(_as_scenario(scenario))
        self.host = host
        self._port = port
        self._log_level = log_level
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sock: socket.socket | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> EmulatorServer:
        if self._thread is not None:
            return self
        # Bind here so the port (0 = any free port) is known before the thread starts.
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on accepted sockets whose proto
        # says TCP (with proto 0 every keep-alive answer waits ~40 ms for a delayed ACK).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self._port))
        self._port = sock.getsockname()[1]
        self._sock = sock
        config = _config(create_app(self.emulator), self.host, self._port, self._log_level)
        server = _QuickServer(config)
        self._server = server
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)

            async def main() -> None:
                serving = asyncio.create_task(server.serve(sockets=[sock]))
                while not server.started and not serving.done():
                    await asyncio.sleep(0.005)
                ready.set()
                await serving

            try:
                loop.run_until_complete(main())
            except BaseException as exc:  # surfaced by start()
                failure.append(exc)
            finally:
                ready.set()
                loop.close()

        self._thread = threading.Thread(target=run, name=f"emulator-{self._port}", daemon=True)
        self._thread.start()
        if not ready.wait(START_TIMEOUT) or not server.started:
            self.stop()
            raise RuntimeError(f"emulator did not start: {failure[0] if failure else 'timeout'}")
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._sock is not None:
            self._sock.close()
        self._server = self._thread = self._sock = None
        self.emulator.close()  # its working dir (file bytes, spools, counts) goes too

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ addresses
    @property
    def port(self) -> int:
        return self._port

    @property
    def root_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self._port}"

    @property
    def base_url(self) -> str:
        return self.root_url + "/v1"

    # ------------------------------------------------------------------ control (thread-safe)
    def _on_loop(self, fn: Callable[[], T]) -> T:
        """Run fn on the server's loop (the only thread that touches the state)."""
        loop = self._loop
        if loop is None or self._thread is None or not loop.is_running():
            return fn()

        async def call() -> T:
            return fn()

        coro: Coroutine[Any, Any, T] = call()
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=10)

    def stats(self) -> dict[str, Any]:
        """Same as GET /_emulator/stats."""
        return self._on_loop(self.emulator.stats)

    def update_scenario(self, **changes: Any) -> Scenario:
        """Change some knobs now (same as POST /_emulator/scenario)."""
        return self._on_loop(lambda: self.emulator.update_scenario(changes))

    @property
    def scenario(self) -> Scenario:
        return self.emulator.scenario

    def reset(self) -> None:
        """Forget all files, batches and counters (the scenario stays)."""
        self._on_loop(self.emulator.reset)


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready socket on host:port; a busy port is one InputError line (exit 2)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        reason = "already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        raise InputError(
            f"cannot listen on {host}:{port}: {reason} (give another --port)"
        ) from None
    return sock


def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    scenario: Scenario | str | Path | dict[str, Any] | None = None,
    log_level: str = "info",
    sock: socket.socket | None = None,
) -> None:
    """Run the emulator in the foreground until interrupted (`batchops emulator`).

    `sock`: already bound by `bind` (the CLI binds first, so a busy port fails before it prints
    the URL)."""
    emu = Emulator(_as_scenario(scenario))
    sock = sock or bind(host, port)
    config = _config(create_app(emu), host, sock.getsockname()[1], log_level)
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        emu.close()
