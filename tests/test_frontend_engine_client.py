"""EngineClient against a scripted ROUTER socket standing in for the scheduler."""
from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import aclosing
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from sfllm import messages
from sfllm.frontend.engine_client import (EngineClient, EngineProtocolError, EngineRequestError,
                                          EngineUnavailableError, _merge)
from sfllm.messages import (PROTOCOL_VERSION, AbortRequest, ClientGoodbye, ClientHello, EngineHello, EngineStats,
                            GenerateRequest, Heartbeat, MessageCodec, OutputBatch, RequestOutput, SampledLogprobs,
                            SamplingDefaults, TokenizerSpec, TokenLogprob)
from sfllm.sampling_params import SamplingParams

FAST = {"heartbeat_interval_s": 0.05, "stats_fresh_s": 0.3, "engine_timeout_s": 0.5}


class ScriptedRouter:
    """Answers hellos and heartbeats; answers each GenerateRequest with `reply(request)`."""

    def __init__(self, address: str, protocol_version: int = PROTOCOL_VERSION,
                 reply: Callable[[GenerateRequest], list[RequestOutput]] | None = None) -> None:
        self.address = address
        self.protocol_version = protocol_version
        self.reply = reply or (lambda request: [])
        self.silent = False
        self.received: list[messages.Message] = []
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(address)
        self._decoder = MessageCodec(messages.FrontendToEngine)
        self._encoder = MessageCodec(messages.EngineToFrontend)
        self._task = asyncio.create_task(self._serve())

    async def _serve(self) -> None:
        while True:
            identity, data = await self._socket.recv_multipart()
            message = self._decoder.decode(data)
            self.received.append(message)
            if self.silent:
                continue
            if isinstance(message, ClientHello):
                await self._send(identity, EngineHello(
                    protocol_version=self.protocol_version, model_name="m", max_context_length=64,
                    eos_token_ids=[2], num_kv_blocks=4, block_size=16,
                    tokenizer=TokenizerSpec(tokenizer_json="{}", chat_template=None, special_tokens={}, vocab_size=8),
                    sampling_defaults=SamplingDefaults()))
            elif isinstance(message, Heartbeat):
                await self._send(identity, EngineStats(
                    running={}, waiting={}, num_kv_blocks=4, num_free_kv_blocks=4, num_cached_kv_blocks=0,
                    prefix_cache_queries=0, prefix_cache_hits=0, num_preemptions=0, num_steps=0, step_time_s=0.0,
                    batch_size=0, gpu_memory_allocated=0, gpu_memory_reserved=0, ready=True))
            elif isinstance(message, GenerateRequest):
                for output in self.reply(message):
                    await self._send(identity, OutputBatch(outputs=[output]))

    async def _send(self, identity: bytes, message: messages.Message) -> None:
        await self._socket.send_multipart([identity, self._encoder.encode(message)])

    def aborted(self) -> list[str]:
        return [i for m in self.received if isinstance(m, AbortRequest) for i in m.request_ids]

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._context.destroy(linger=0)


def counting_reply(num_tokens: int) -> Callable[[GenerateRequest], list[RequestOutput]]:
    def reply(request: GenerateRequest) -> list[RequestOutput]:
        return [RequestOutput(request_id=request.request_id, token_ids=[100 + i],
                              finish_reason="length" if i == num_tokens - 1 else None, num_prompt_tokens=2)
                for i in range(num_tokens)]
    return reply


def unfinished_reply(request: GenerateRequest) -> list[RequestOutput]:
    """One token and no finish: the request runs until it is aborted."""
    return [RequestOutput(request_id=request.request_id, token_ids=[100])]


def request(request_id: str = "r-0") -> GenerateRequest:
    return GenerateRequest(request_id=request_id, prompt_token_ids=[1, 2], params=SamplingParams(), arrival_time=0.0)


@pytest.fixture
def address() -> Iterator[str]:
    # ipc paths must stay short (about 100 bytes), so not under pytest's long tmp_path.
    with tempfile.TemporaryDirectory(prefix="sfllm-") as folder:
        yield f"ipc://{Path(folder) / 'engine.sock'}"


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout=20))


async def wait_until(condition: Callable[[], bool], timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def test_hello_heartbeats_and_a_streamed_request(address: str) -> None:
    async def scenario() -> None:
        router = ScriptedRouter(address, reply=counting_reply(3))
        client = EngineClient(address, **FAST)
        hello = await client.connect(timeout_s=5)
        assert (hello.model_name, hello.max_context_length) == ("m", 64)
        await wait_until(lambda: client.healthy)
        async with aclosing(client.submit(request())) as outputs:
            tokens = [token async for output in outputs for token in output.token_ids]
        assert tokens == [100, 101, 102]
        assert client.num_in_flight == 0 and router.aborted() == []
        hellos = [m for m in router.received if isinstance(m, ClientHello)]
        assert hellos[0].client_id == client.client_id and hellos[0].protocol_version == PROTOCOL_VERSION
        await client.close()
        await router.close()
    run(scenario)


def test_a_stream_behind_the_engine_gets_its_queued_outputs_merged(address: str) -> None:
    async def scenario() -> None:
        router = ScriptedRouter(address, reply=counting_reply(6))
        client = EngineClient(address, **FAST)
        await client.connect(timeout_s=5)
        async with aclosing(client.submit(request("slow"))) as outputs:
            first = await anext(outputs)
            # The stream falls behind: the other outputs arrive before it reads on.
            await wait_until(lambda: len(first.token_ids) + client._streams["slow"].qsize() == 6)
            rest = [output async for output in outputs]
        assert first.token_ids + [t for output in rest for t in output.token_ids] == [100, 101, 102, 103, 104, 105]
        outputs_seen = [first, *rest]  # six without merging; the first may already hold several
        assert len(outputs_seen) <= 2
        assert outputs_seen[-1].finish_reason == "length" and outputs_seen[-1].num_prompt_tokens == 2
        assert router.aborted() == []
        await client.close()
        await router.close()
    run(scenario)


def test_merged_outputs_keep_the_prompts_logprobs_and_the_stop_token() -> None:
    prompt = [SampledLogprobs(logprob=-1.0, top=[TokenLogprob(token_id=7, logprob=-0.5)], rank=2)]
    outputs = [RequestOutput(request_id="r", token_ids=[1], prompt_logprobs=prompt, num_prompt_tokens=3),
               RequestOutput(request_id="r", token_ids=[2]),
               RequestOutput(request_id="r", token_ids=[3, 4], finish_reason="stop", stop_token_id=4)]
    merged = _merge(_merge(outputs[0], outputs[1]), outputs[2])
    assert (merged.token_ids, merged.prompt_logprobs, merged.finish_reason, merged.stop_token_id,
            merged.num_prompt_tokens) == ([1, 2, 3, 4], prompt, "stop", 4, 3)


def test_closing_a_stream_early_aborts_the_request(address: str) -> None:
    async def scenario() -> None:
        def unfinished(request: GenerateRequest) -> list[RequestOutput]:
            return [RequestOutput(request_id=request.request_id, token_ids=[100 + i]) for i in range(5)]
        router = ScriptedRouter(address, reply=unfinished)
        client = EngineClient(address, **FAST)
        await client.connect(timeout_s=5)
        async with aclosing(client.submit(request("early"))) as outputs:
            async for _ in outputs:
                break
        await wait_until(lambda: router.aborted() == ["early"])
        await client.close()
        await router.close()
    run(scenario)


def test_closing_the_client_aborts_what_runs_then_says_goodbye(address: str) -> None:
    """A frontend that stops on purpose tells the engine, which frees its requests' blocks and logs it as gone
    at once, rather than 3 s later as a frontend that went silent."""
    async def scenario() -> None:
        router = ScriptedRouter(address, reply=unfinished_reply)
        client = EngineClient(address, **FAST)
        await client.connect(timeout_s=5)
        outputs = client.submit(request("running"))
        await anext(outputs)
        await client.close()
        await wait_until(lambda: any(isinstance(m, ClientGoodbye) for m in router.received))
        last = [m for m in router.received if isinstance(m, (AbortRequest, ClientGoodbye))]
        assert last == [AbortRequest(request_ids=["running"]), ClientGoodbye(client_id=client.client_id)]
        await outputs.aclose()
        await router.close()
    run(scenario)


def test_ending_the_streams_raises_in_each_and_aborts_them_in_the_engine(address: str) -> None:
    """How a frontend at its drain timeout answers the requests still running (see DrainingServer)."""
    async def scenario() -> None:
        router = ScriptedRouter(address, reply=unfinished_reply)
        client = EngineClient(address, **FAST)
        await client.connect(timeout_s=5)

        async def read(request_id: str) -> list[int]:
            async with aclosing(client.submit(request(request_id))) as outputs:
                return [token async for output in outputs for token in output.token_ids]
        readers = [asyncio.create_task(read(request_id)) for request_id in ("a", "b")]
        await wait_until(lambda: client.num_in_flight == 2)
        assert client.end_streams(RuntimeError("stopping")) == 2
        for reader in readers:
            with pytest.raises(RuntimeError, match="stopping"):
                await reader
        await wait_until(lambda: sorted(router.aborted()) == ["a", "b"])
        assert client.num_in_flight == 0 and client.end_streams(RuntimeError("again")) == 0
        # a request that reaches the client after that (one still being tokenized) fails the same way, unsent
        with pytest.raises(RuntimeError, match="again"):
            await read("late")
        await asyncio.sleep(0.1)
        assert sorted(m.request_id for m in router.received if isinstance(m, GenerateRequest)) == ["a", "b"]
        await client.close()
        await router.close()
    run(scenario)


def test_engine_error_carries_its_status(address: str) -> None:
    async def scenario() -> None:
        def refuse(request: GenerateRequest) -> list[RequestOutput]:
            return [RequestOutput(request_id=request.request_id, token_ids=[], error="queue full", error_code=503)]
        router = ScriptedRouter(address, reply=refuse)
        client = EngineClient(address, **FAST)
        await client.connect(timeout_s=5)
        with pytest.raises(EngineRequestError, match="queue full") as error:
            async for _ in client.submit(request()):
                pass
        assert error.value.status_code == 503
        await client.close()
        await router.close()
    run(scenario)


def test_protocol_mismatch_names_both_versions(address: str) -> None:
    async def scenario() -> None:
        router = ScriptedRouter(address, protocol_version=PROTOCOL_VERSION + 1)
        with pytest.raises(EngineProtocolError, match=f"version {PROTOCOL_VERSION + 1}.*version {PROTOCOL_VERSION}"):
            await EngineClient(address, **FAST).connect(timeout_s=5)
        await router.close()
    run(scenario)


def test_no_engine_fails_after_the_timeout(address: str) -> None:
    async def scenario() -> None:
        with pytest.raises(EngineUnavailableError, match="did not say hello within 0.3 s"):
            await EngineClient(address, **FAST).connect(timeout_s=0.3)
    run(scenario)


def test_engine_exit_fails_requests_in_flight_and_a_new_engine_is_adopted(address: str) -> None:
    async def scenario() -> None:
        router = ScriptedRouter(address)  # never answers the request
        client = EngineClient(address, heartbeat_interval_s=0.05, stats_fresh_s=0.3, engine_timeout_s=30)
        await client.connect(timeout_s=5)
        stream = client.submit(request("lost"))
        pending = asyncio.ensure_future(anext(stream))
        await wait_until(lambda: any(isinstance(m, GenerateRequest) for m in router.received))
        await router.close()
        with pytest.raises(EngineUnavailableError):
            await asyncio.wait_for(pending, timeout=2)  # well before engine_timeout_s: the socket closed
        assert not client.connected and not client.healthy
        with pytest.raises(EngineUnavailableError):
            await anext(client.submit(request("refused")))

        router = ScriptedRouter(address, reply=counting_reply(2))
        await wait_until(lambda: client.connected and client.healthy)
        async with aclosing(client.submit(request("after"))) as outputs:
            assert [token async for output in outputs for token in output.token_ids] == [100, 101]
        await client.close()
        await router.close()
    run(scenario)


def test_silent_engine_fails_requests_in_flight_and_health(address: str) -> None:
    async def scenario() -> None:
        router = ScriptedRouter(address)
        client = EngineClient(address, **FAST)
        await client.connect(timeout_s=5)
        await wait_until(lambda: client.healthy)
        stream = client.submit(request("stuck"))
        pending = asyncio.ensure_future(anext(stream))
        router.silent = True
        await wait_until(lambda: not client.healthy, timeout_s=1)
        with pytest.raises(EngineUnavailableError, match="no message"):
            await asyncio.wait_for(pending, timeout=2)
        router.silent = False  # the engine comes back: the client says hello again and aborts what it lost
        await wait_until(lambda: client.connected and client.healthy)
        await wait_until(lambda: "stuck" in router.aborted())
        await client.close()
        await router.close()
    run(scenario)
