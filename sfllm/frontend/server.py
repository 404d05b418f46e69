"""The frontend process: bind the HTTP port, load the tokenizer, meet the engine, serve."""
from __future__ import annotations

import asyncio
import json
import logging
import socket

import uvicorn
import uvloop

from sfllm.config import EngineConfig
from sfllm.frontend.app import create_app
from sfllm.frontend.engine_client import EngineClient, EngineProtocolError, EngineUnavailableError
from sfllm.frontend.tokenizer import Tokenizer
from sfllm.model_source import resolve_model

logger = logging.getLogger(__name__)

# The engine may still be loading weights and capturing graphs when the frontend starts.
DEFAULT_ENGINE_HELLO_TIMEOUT_S = 600.0
# On shutdown, streams still open after this long are cut (their requests aborted).
GRACEFUL_SHUTDOWN_S = 5


class FrontendStartupError(RuntimeError):
    """The frontend cannot start: port taken, engine absent or incompatible."""


def _bind_http_socket(host: str, port: int) -> socket.socket:
    """Bound before anything slow, so a taken port fails at once rather than after loading."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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


async def _serve(config: EngineConfig, tokenizer: Tokenizer, sock: socket.socket,
                 engine_hello_timeout_s: float) -> None:
    engine = EngineClient(config.resolved_engine_address())
    logger.info("waiting up to %g s for the engine at %s", engine_hello_timeout_s, engine.address)
    try:
        await engine.connect(engine_hello_timeout_s)
    except (EngineUnavailableError, EngineProtocolError) as error:
        raise FrontendStartupError(str(error)) from error
    try:
        app = create_app(config, engine, tokenizer)
        server = uvicorn.Server(uvicorn.Config(app, loop="uvloop", http="httptools", access_log=config.access_log,
                                               log_level=config.log_level,
                                               timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S))
        logger.info("serving %s on http://%s:%d", config.model_name, config.host, config.port)
        await server.serve(sockets=[sock])
    finally:
        await engine.close()


def run_frontend(config: EngineConfig, engine_hello_timeout_s: float = DEFAULT_ENGINE_HELLO_TIMEOUT_S) -> None:
    """Serve the OpenAI API until interrupted; raises FrontendStartupError when it cannot start."""
    _configure_logging(config.log_level)
    shown = {**config.to_dict(), "api_key": "<set>" if config.api_key else None}
    logger.info("frontend config: %s", json.dumps(shown, sort_keys=True))
    sock = _bind_http_socket(config.host, config.port)
    try:
        source = resolve_model(config.model, config.load_format, config.cache_dir)
        tokenizer = Tokenizer.from_model_source(source)
        logger.info("tokenizer of %s loaded from %s", source.name, source.tokenizer_folder)
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(_serve(config, tokenizer, sock, engine_hello_timeout_s))
    finally:
        sock.close()
