"""The frontend process: bind the HTTP port, meet the engine, build the tokenizer it sends, serve."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import threading
from collections.abc import Iterator

import uvicorn
import uvloop

from sfllm.config import EngineConfig
from sfllm.frontend.app import create_app
from sfllm.frontend.engine_client import EngineClient, EngineProtocolError, EngineUnavailableError
from sfllm.frontend.request_gate import DrainState
from sfllm.frontend.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# The engine may still be loading weights and capturing graphs when the frontend starts.
DEFAULT_ENGINE_HELLO_TIMEOUT_S = 600.0
# After the drain, connections still open get this long before they are cut (their requests aborted).
GRACEFUL_SHUTDOWN_S = 2


class DrainingServer(uvicorn.Server):
    """uvicorn, except that SIGTERM (or SIGINT) drains before it stops.

    Draining: new requests get 503 and /ready turns 503, while requests in progress
    may finish for up to `drain_timeout_s`; then the server stops, cutting what is
    left. A second signal stops it at once."""

    def __init__(self, config: uvicorn.Config, drain: DrainState, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.drain = drain
        self.drain_timeout_s = drain_timeout_s
        self._drain_task: asyncio.Task[None] | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.start_drain)
        try:
            yield
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    def start_drain(self) -> None:
        if self.drain.draining:
            logger.warning("asked again to stop: stopping now, cutting %d requests", self.drain.in_flight)
            self.should_exit = self.force_exit = True
            return
        logger.info("draining: no new requests; %d in progress get up to %g s", self.drain.in_flight,
                    self.drain_timeout_s)
        self.drain.start_draining()
        self._drain_task = asyncio.ensure_future(self._finish_drain())

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets)
        for connection in list(self.server_state.connections):
            connection.transport.close()  # cut: its client learns now, not when the process exits

    async def _finish_drain(self) -> None:
        if not await self.drain.wait_idle(self.drain_timeout_s):
            logger.warning("drain timeout of %g s passed with %d requests running; cutting them",
                           self.drain_timeout_s, self.drain.in_flight)
        self.should_exit = True


class FrontendStartupError(RuntimeError):
    """The frontend cannot start: port taken, engine absent or incompatible."""


def _bind_http_socket(host: str, port: int, shared: bool = False) -> socket.socket:
    """Bound before anything slow, so a taken port fails at once rather than after loading.

    `shared`: the other frontends of one launch bind the same port and the kernel spreads
    connections over them (SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if shared:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise FrontendStartupError(f"cannot listen on {host}:{port}: {error.strerror}; is another server using "
                                   "the port? Choose another with --port") from error
    sock.set_inheritable(True)
    return sock


def _configure_logging(level: str) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("sfllm").setLevel(level.upper())


async def _serve(config: EngineConfig, sock: socket.socket, engine_hello_timeout_s: float) -> None:
    engine = EngineClient(config.resolved_engine_address())
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
                                drain, config.drain_timeout_s)
        logger.info("serving %s on http://%s:%d", hello.model_name, config.host, config.port)
        await server.serve(sockets=[sock])
    finally:
        await engine.close()


def run_frontend(config: EngineConfig, engine_hello_timeout_s: float = DEFAULT_ENGINE_HELLO_TIMEOUT_S) -> None:
    """Serve the OpenAI API until interrupted; raises FrontendStartupError when it cannot start."""
    _configure_logging(config.log_level)
    shown = {**config.to_dict(), "api_key": "<set>" if config.api_key else None}
    logger.info("frontend config: %s", json.dumps(shown, sort_keys=True))
    sock = _bind_http_socket(config.host, config.port, shared=config.frontend_processes > 1)
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(_serve(config, sock, engine_hello_timeout_s))
    finally:
        sock.close()
