"""The frontend's connection to the engine: one ZeroMQ DEALER speaking `sfllm.messages`.

Every send is non-blocking: a message the engine cannot take now (not connected) is
dropped, and the request it belonged to fails at once rather than waiting for a
reconnect that may never come. The socket only queues messages on live connections
(IMMEDIATE), so a restarted engine never receives requests nobody waits for.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator

import msgspec
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from sfllm import messages
from sfllm.messages import (PROTOCOL_VERSION, AbortRequest, ClientGoodbye, ClientHello, EngineHello, EngineStats,
                            FlushPrefixCache, GenerateRequest, Heartbeat, Message, MessageCodec, OutputBatch,
                            ProfileControl, RequestOutput)

logger = logging.getLogger(__name__)

# How long a closing client's last messages (its aborts, its goodbye) may wait to go out: the engine is local
GOODBYE_LINGER_MS = 200
# How many aborted request ids to remember: outputs still arriving for them are dropped quietly.
_MAX_REMEMBERED_ABORTS = 8192


class EngineUnavailableError(Exception):
    """The engine is not connected or stopped answering; the request can be retried later."""


class EngineProtocolError(Exception):
    """The engine speaks another version of `sfllm.messages`."""

    def __init__(self, engine_version: int) -> None:
        super().__init__(f"the engine speaks protocol version {engine_version} but this frontend speaks "
                         f"version {PROTOCOL_VERSION}; run the same sfllm version on both")
        self.engine_version = engine_version


class EngineRequestError(Exception):
    """The engine refused or lost one request; `status_code` is the HTTP status to answer with, `param` the
    request field at fault where the engine names one."""

    def __init__(self, message: str, status_code: int, param: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.param = param


def _mergeable(output: RequestOutput) -> bool:
    return output.error is None and output.finish_reason is None


def _merge(first: RequestOutput, second: RequestOutput) -> RequestOutput:
    """`second` appended to `first`: the second as it is (its ending: finish reason, stop token), with the tokens
    of both and the prompt's logprobs of the first (the only one that has them)."""
    logprobs = None if first.logprobs is None and second.logprobs is None else \
        (first.logprobs or []) + (second.logprobs or [])
    return msgspec.structs.replace(second, token_ids=first.token_ids + second.token_ids, logprobs=logprobs,
                                   prompt_logprobs=first.prompt_logprobs or second.prompt_logprobs,
                                   num_prompt_tokens=second.num_prompt_tokens or first.num_prompt_tokens,
                                   num_cached_tokens=second.num_cached_tokens or first.num_cached_tokens)


HEARTBEAT_INTERVAL_S = 0.5  # how often the engine's stats (health, metrics) are asked for


class EngineClient:
    """Hello, heartbeats, request streams and aborts over one DEALER socket.

    Liveness has two levels: `healthy` means an `EngineStats` answered a heartbeat
    within `stats_fresh_s` (what /health reports); `connected` means the engine said
    hello and has not been silent for `engine_timeout_s`. Losing the connection fails
    every request in flight; the client keeps saying hello until an engine answers, so
    either side can be restarted alone. An engine process that exits is noticed at once
    (the socket closes); `engine_timeout_s` only bounds a hung one, generously, since a
    long step delays the engine's answers.
    """

    def __init__(self, address: str, *, heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S,
                 stats_fresh_s: float = 2.0, engine_timeout_s: float = 10.0) -> None:
        self.address = address
        self.client_id = uuid.uuid4().hex
        self.heartbeat_interval_s = heartbeat_interval_s
        self.stats_fresh_s = stats_fresh_s
        self.engine_timeout_s = engine_timeout_s
        self.hello: EngineHello | None = None
        self.stats: EngineStats | None = None
        self._codec = MessageCodec(messages.EngineToFrontend)
        self._context: zmq.asyncio.Context | None = None
        self._socket: zmq.asyncio.Socket | None = None
        self._monitor: zmq.asyncio.Socket | None = None
        self._connected = False
        self._protocol_error: EngineProtocolError | None = None
        self._hello_received = asyncio.Event()
        self._last_message_time = 0.0
        self._last_stats_time = 0.0
        self._streams: dict[str, asyncio.Queue[RequestOutput | Exception]] = {}
        self._aborted: OrderedDict[str, None] = OrderedDict()
        self._lost: list[str] = []  # failed while the engine was silent; aborted when it answers again
        self._tasks: list[asyncio.Task[None]] = []
        self._ended: Exception | None = None  # set by end_streams: later requests fail with it too

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def healthy(self) -> bool:
        return (self._connected and self.stats is not None and self.stats.ready
                and time.monotonic() - self._last_stats_time < self.stats_fresh_s)

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    async def connect(self, timeout_s: float) -> EngineHello:
        """Open the socket, start the background tasks and wait for the engine's hello."""
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.IDENTITY, self.client_id.encode())
        self._socket.setsockopt(zmq.IMMEDIATE, 1)
        self._socket.setsockopt(zmq.LINGER, 0)
        # A full receive queue would make the engine's ROUTER drop outputs silently; never let it fill.
        self._socket.setsockopt(zmq.RCVHWM, 0)
        self._monitor = self._socket.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        self._socket.connect(self.address)
        self._tasks = [asyncio.create_task(self._receive_loop()), asyncio.create_task(self._heartbeat_loop()),
                       asyncio.create_task(self._monitor_loop())]
        try:
            await asyncio.wait_for(self._hello_received.wait(), timeout_s)
        except TimeoutError:
            await self.close()
            raise EngineUnavailableError(f"the engine at {self.address} did not say hello within {timeout_s:g} s; "
                                         "is the engine running with the same engine address?") from None
        if self._protocol_error is not None:
            await self.close()
            raise self._protocol_error
        assert self.hello is not None
        return self.hello

    async def close(self) -> None:
        """Abort what is in flight, say goodbye, then close the socket."""
        if self._connected:
            if self._streams:
                self._send(AbortRequest(request_ids=list(self._streams)))
            self._send(ClientGoodbye(client_id=self.client_id))
        self._connected = False
        self._lose_connection("the frontend is shutting down")
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._context is not None:
            self._context.destroy(linger=GOODBYE_LINGER_MS)
        self._socket = self._monitor = self._context = None

    async def submit(self, request: GenerateRequest) -> AsyncIterator[RequestOutput]:
        """Start a request and yield its outputs until the one with a finish reason.

        Close the iterator early (e.g. `contextlib.aclosing`) to abort the request."""
        if self._ended is not None:
            raise self._ended
        if not self._connected:
            raise EngineUnavailableError(self._unavailable_reason())
        if request.request_id in self._streams:
            raise ValueError(f"request id {request.request_id} is already in flight")
        queue: asyncio.Queue[RequestOutput | Exception] = asyncio.Queue()
        self._streams[request.request_id] = queue
        finished = False
        try:
            if not self._send(request):
                finished = True
                raise EngineUnavailableError(f"the engine at {self.address} is not reachable")
            held: RequestOutput | Exception | None = None
            while True:
                item = held if held is not None else await queue.get()
                held = None
                # A stream that fell behind the engine catches up in one larger output, not many small ones.
                while isinstance(item, RequestOutput) and _mergeable(item) and not queue.empty():
                    following = queue.get_nowait()
                    if isinstance(following, Exception) or following.error is not None:
                        held = following
                        break
                    item = _merge(item, following)
                if isinstance(item, Exception):
                    finished = True
                    raise item
                if item.error is not None:
                    finished = True
                    raise EngineRequestError(item.error, item.error_code or 500, item.error_param)
                finished = item.finish_reason is not None
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request.request_id, None)
            if not finished:
                self.abort([request.request_id])

    def abort(self, request_ids: list[str]) -> None:
        """Tell the engine to drop these requests; never waits."""
        for request_id in request_ids:
            self._streams.pop(request_id, None)
            self._aborted[request_id] = None
        while len(self._aborted) > _MAX_REMEMBERED_ABORTS:
            self._aborted.popitem(last=False)
        if self._connected:
            self._send(AbortRequest(request_ids=list(request_ids)))

    def abort_running(self, request_ids: list[str] | None = None) -> int:
        """Asks the engine to end these requests of this client's in flight (None: all of them); each stream then
        ends with the engine's output of finish reason "abort", as a request the engine stopped. How many it asked."""
        if not self._connected:
            return 0
        running = list(self._streams) if request_ids is None else [r for r in request_ids if r in self._streams]
        if running:
            self._send(AbortRequest(request_ids=running))
        return len(running)

    def end_streams(self, error: Exception) -> int:
        """End every request in flight: each stream raises `error`, and the engine is told to drop them.

        How a frontend that must stop now still answers its requests; a request submitted later (one still being
        tokenized, a choice not yet started) fails with `error` too. Returns how many were in flight."""
        self._ended = error
        request_ids = list(self._streams)
        for queue in self._streams.values():
            queue.put_nowait(error)
        self.abort(request_ids)
        return len(request_ids)

    def set_profiling(self, start: bool) -> bool:
        """Start or stop the engine's profiler; False if the engine could not be told."""
        return self._connected and self._send(ProfileControl(start=start))

    def flush_prefix_cache(self) -> bool:
        """Have the engine forget its cached prefixes before this frontend's next requests; False if it could not
        be told."""
        return self._connected and self._send(FlushPrefixCache())

    def _send(self, message: Message) -> bool:
        assert self._socket is not None
        # With DONTWAIT pyzmq sends synchronously and hands back an already finished future.
        future = self._socket.send(self._codec.encode(message), flags=zmq.DONTWAIT)
        return future.done() and future.exception() is None

    def _unavailable_reason(self) -> str:
        if self._protocol_error is not None:
            return str(self._protocol_error)
        return f"the engine at {self.address} is not connected"

    def _lose_connection(self, reason: str) -> None:
        if self._connected:
            logger.warning("lost the engine at %s: %s", self.address, reason)
        self._connected = False
        error = EngineUnavailableError(f"the engine stopped serving this request: {reason}")
        for request_id, queue in self._streams.items():
            queue.put_nowait(error)
            self._lost.append(request_id)
        self._streams.clear()
        del self._lost[:-_MAX_REMEMBERED_ABORTS]

    async def _receive_loop(self) -> None:
        assert self._socket is not None
        while True:
            data = await self._socket.recv()
            try:
                message = self._codec.decode(data)
            except msgspec.DecodeError as error:
                logger.error("dropping an engine message that does not decode: %s", error)
                continue
            self._last_message_time = time.monotonic()
            if isinstance(message, OutputBatch):
                self._dispatch(message.outputs)
            elif isinstance(message, EngineStats):
                self.stats = message
                self._last_stats_time = self._last_message_time
            elif isinstance(message, EngineHello):
                self._on_hello(message)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        stale: list[str] = []
        for output in outputs:
            queue = self._streams.get(output.request_id)
            if queue is not None:
                queue.put_nowait(output)
            elif output.finish_reason is None and output.error is None and output.request_id not in self._aborted:
                stale.append(output.request_id)
        if stale:
            self.abort(stale)

    def _on_hello(self, hello: EngineHello) -> None:
        if hello.protocol_version != PROTOCOL_VERSION:
            if self._protocol_error is None:
                logger.error("%s", EngineProtocolError(hello.protocol_version))
            self._protocol_error = EngineProtocolError(hello.protocol_version)
            self._lose_connection(str(self._protocol_error))
        else:
            self._protocol_error = None
            if not self._connected:
                logger.info("connected to the engine at %s: model %s, context %d tokens, %d KV blocks of %d",
                            self.address, hello.model_name, hello.max_context_length, hello.num_kv_blocks,
                            hello.block_size)
            self.hello = hello
            self._connected = True
            if self._lost:
                self.abort(self._lost)
                self._lost = []
        self._hello_received.set()

    async def _heartbeat_loop(self) -> None:
        while True:
            if self._connected and time.monotonic() - self._last_message_time > self.engine_timeout_s:
                self._lose_connection(f"no message for {self.engine_timeout_s:g} s")
            if self._connected:
                self._send(Heartbeat(client_id=self.client_id))
                await asyncio.sleep(self.heartbeat_interval_s)
            else:
                self._send(ClientHello(protocol_version=PROTOCOL_VERSION, client_id=self.client_id))
                # Before the first hello, retry often: the first one usually precedes the connection.
                first_contact = not self._hello_received.is_set()
                await asyncio.sleep(min(0.1, self.heartbeat_interval_s) if first_contact else self.heartbeat_interval_s)

    async def _monitor_loop(self) -> None:
        """A dropped connection means the engine process is gone: fail its requests now."""
        assert self._monitor is not None
        while True:
            event = parse_monitor_message(await self._monitor.recv_multipart())
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self._lose_connection("the connection closed")
            elif event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._send(ClientHello(protocol_version=PROTOCOL_VERSION, client_id=self.client_id))
