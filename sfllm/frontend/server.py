"""The frontend process: bind (or inherit) the HTTP port, meet the engine, build the tokenizer it sends, serve."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator

import uvicorn
import uvloop

from sfllm.config import FrontendConfig
from sfllm.frontend.app import create_app
from sfllm.frontend.engine_client import EngineClient, EngineProtocolError, EngineUnavailableError
from sfllm.frontend.errors import ServerShutdownError
from sfllm.frontend.request_gate import DrainState
from sfllm.frontend.tokenizer import Tokenizer
from sfllm.gc_pauses import freeze_startup_objects
from sfllm.http_socket import CannotBind, bind_http_socket
from sfllm.ipc import sigint_ignored
from sfllm.ordered_stop import ORDERED_STOP

logger = logging.getLogger(__name__)

# The engine may still be loading weights and capturing graphs when the frontend starts.
DEFAULT_ENGINE_HELLO_TIMEOUT_S = 600.0
# After the drain, connections still open get this long before they are cut (their requests aborted).
GRACEFUL_SHUTDOWN_S = 2
# Requests ended at the drain timeout get this long to write their 503 or error event before the server stops.
ERROR_ANSWER_S = 1.0


class DrainingServer(uvicorn.Server):
    """uvicorn, except that SIGTERM (or SIGINT, or launch's ORDERED_STOP) drains before it stops, and SIGUSR1 hands
    over.

    Draining: new requests get 503 and /ready turns 503, while requests in progress
    may finish for up to `drain_timeout_s`; then those left are ended with a 503
    (an error event where a stream has begun), aborted in the engine, and the server
    stops. A second SIGTERM or SIGINT stops it at once; launch's order never does (it may follow a SIGTERM sent to
    every process at once, see sfllm.ordered_stop).

    Handing over (another frontend on the shared port has started, see sfllm/http_socket.py):
    this one accepts no more connections and serves the requests that come on its open ones,
    each answer closing its connection; it stops once they are all closed (idle ones at
    uvicorn's keep-alive timeout), or after `drain_timeout_s`. No client sees an error."""

    def __init__(self, config: uvicorn.Config, engine: EngineClient, drain: DrainState, drain_timeout_s: float,
                 on_serving: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self.engine = engine
        self.drain = drain
        self.drain_timeout_s = drain_timeout_s
        self.on_serving = on_serving
        self._drain_task: asyncio.Task[None] | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        loop = asyncio.get_running_loop()
        handlers = {signal.SIGTERM: self.start_drain, signal.SIGUSR1: self.start_handover,
                    ORDERED_STOP: self.start_ordered_drain}
        if not sigint_ignored():  # ignored under `sfllm launch`, which signals its frontends itself
            handlers[signal.SIGINT] = self.start_drain
        for sig, handler in handlers.items():
            loop.add_signal_handler(sig, handler)
        try:
            yield
        finally:
            for sig in handlers:
                loop.remove_signal_handler(sig)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if not self.started:
            return
        freeze_startup_objects()  # a full collection would hold up every stream this frontend serves
        if self.on_serving is not None:
            self.on_serving()

    def start_drain(self) -> None:
        if self.drain.draining:
            logger.warning("asked again to stop: stopping now, cutting %d requests", self.drain.in_flight)
            self.engine.end_streams(ServerShutdownError("it was asked to stop again while draining"))
            self.should_exit = self.force_exit = True
            return
        logger.info("draining: no new requests; %d in progress get up to %g s", self.drain.in_flight,
                    self.drain_timeout_s)
        self.drain.start_draining()
        self._drain_task = asyncio.ensure_future(self._finish_drain())

    def start_ordered_drain(self) -> None:
        if not self.drain.draining:
            self.start_drain()

    def start_handover(self) -> None:
        if self.drain.draining or self.drain.handing_over:
            return
        logger.info("handing over: no new connections; %d open ones close after their next answer or when idle",
                    len(self.server_state.connections))
        self.drain.start_handover()
        for server in self.servers:
            server.close()  # this process's copy of the socket: the other frontends keep accepting
        # An answer already under way stays keep-alive: its client, told nothing, may send its next request
        # on the connection; closing it after this answer would race that request.
        self._drain_task = asyncio.ensure_future(self._finish_handover())

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets)
        for connection in list(self.server_state.connections):
            connection.transport.close()  # cut: its client learns now, not when the process exits

    async def _finish_drain(self) -> None:
        if not await self.drain.wait_idle(self.drain_timeout_s):
            logger.warning("drain timeout of %g s passed with %d requests running; ending them with a 503",
                           self.drain_timeout_s, self.drain.in_flight)
            self.engine.end_streams(ServerShutdownError("its drain timeout passed"))
            await self.drain.wait_idle(ERROR_ANSWER_S)
        self.should_exit = True

    async def _finish_handover(self) -> None:
        deadline = time.monotonic() + self.drain_timeout_s
        while self.server_state.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if self.server_state.connections:
            logger.warning("handover timeout of %g s passed with %d connections open; closing them",
                           self.drain_timeout_s, len(self.server_state.connections))
        self.should_exit = True


class FrontendStartupError(RuntimeError):
    """The frontend cannot start: port taken, engine absent or incompatible."""


def _configure_logging(level: str) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("sfllm").setLevel(level.upper())


async def _serve(config: FrontendConfig, sock: socket.socket, engine_hello_timeout_s: float,
                 on_serving: Callable[[], None] | None) -> None:
    engine = EngineClient(config.engine_address)
    logger.info("waiting up to %g s for the engine at %s", engine_hello_timeout_s, engine.address)
    try:
        hello = await engine.connect(engine_hello_timeout_s)
    except (EngineUnavailableError, EngineProtocolError) as error:
        raise FrontendStartupError(str(error)) from error
    try:
        tokenizer = Tokenizer(hello.tokenizer)
        drain = DrainState()
        app = create_app(config, engine, tokenizer, drain)
        server = DrainingServer(uvicorn.Config(app, loop="uvloop", http="httptools", access_log=config.access_log,
                                               log_level=config.log_level,
                                               timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S),
                                engine, drain, config.drain_timeout_s, on_serving)
        logger.info("serving %s on http://%s:%d", hello.model_name, config.host, config.port)
        await server.serve(sockets=[sock])
    finally:
        await engine.close()


def run_frontend(config: FrontendConfig, engine_hello_timeout_s: float = DEFAULT_ENGINE_HELLO_TIMEOUT_S,
                 http_fd: int | None = None, ready_fd: int | None = None) -> None:
    """Serve the OpenAI API until interrupted; raises FrontendStartupError when it cannot start.

    `http_fd`: the port's socket, inherited from `sfllm launch`; without it the frontend binds
    the port itself. `ready_fd`: a pipe that gets one byte once this frontend serves."""
    _configure_logging(config.log_level)
    shown = {**dataclasses.asdict(config), "api_key": "<set>" if config.api_key else None}
    logger.info("frontend config: %s", json.dumps(shown, sort_keys=True))
    if http_fd is not None:
        sock = socket.socket(fileno=http_fd)
    else:
        try:
            sock = bind_http_socket(config.host, config.port)  # before anything slow: a taken port fails at once
        except CannotBind as error:
            raise FrontendStartupError(str(error)) from error
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(_serve(config, sock, engine_hello_timeout_s,
                              None if ready_fd is None else functools.partial(_tell_ready, ready_fd)))
    finally:
        sock.close()


def _tell_ready(ready_fd: int) -> None:
    with os.fdopen(ready_fd, "wb") as pipe:
        pipe.write(b"1")
