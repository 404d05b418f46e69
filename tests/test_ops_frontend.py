"""Operating the HTTP frontend, over a scripted engine: probes, metrics, API key, limits, timeouts, drain."""
from __future__ import annotations

import asyncio
import hmac
import http.client
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import uvicorn
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from test_frontend_app import MODEL, ScriptedEngine

from sfllm.config import ServerConfig
from sfllm.engine.engine_process import FRONTEND_MESSAGES_PER_READ, EngineCounters, EngineServer
from sfllm.frontend.app import create_app
from sfllm.frontend.refusal_log import RefusalLog
from sfllm.frontend.request_gate import DrainState
from sfllm.frontend.server import DrainingServer
from sfllm.frontend.tokenizer import Tokenizer
from sfllm.messages import (QUEUE_TIME_BUCKETS_S, AbortRequest, EngineStats, FrontendToEngine, MessageCodec,
                            RequestOutput)
from sfllm.sampling_params import SamplingParams
from sfllm.scheduler.request import Request


class Client:
    """Requests to one app instance, each in a fresh event loop."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def request(self, method: str, path: str, body: Any = None,
                headers: dict[str, str] | None = None) -> httpx.Response:
        async def send() -> httpx.Response:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://t") as client:
                content = None if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
                return await client.request(method, path, content=content,
                                            headers={"content-type": "application/json", **(headers or {})})
        return asyncio.run(send())

    def get(self, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
        return self.request("GET", path, headers=headers)

    def post(self, path: str, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
        return self.request("POST", path, body, headers)


def scrape(client: Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        assert family.name.startswith(("sfllm_", "vllm:", "sglang:")), family.name
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def engine_stats(**changes: Any) -> EngineStats:
    values = dict(running={"high": 0, "normal": 2, "background": 1}, waiting={"high": 0, "normal": 5, "background": 0},
                  num_kv_blocks=8, num_free_kv_blocks=6, num_cached_kv_blocks=1, prefix_cache_queries=10,
                  prefix_cache_hits=4, num_preemptions=3, num_steps=77, step_time_s=0.02, batch_size=3,
                  gpu_memory_allocated=1000, gpu_memory_reserved=2000, ready=True, num_prompt_tokens=123,
                  num_generation_tokens=456, num_finished={"stop": 3, "abort": 1},
                  queue_time_counts=[1, 2] + [0] * (len(QUEUE_TIME_BUCKETS_S) - 2) + [1], queue_time_sum_s=200.5,
                  num_spec_proposed_tokens=40, num_spec_accepted_tokens=30)
    return EngineStats(**(values | changes))


def test_ready_follows_the_engine_and_the_drain(tokenizer: Tokenizer) -> None:
    engine = ScriptedEngine(tokenizer)
    drain = DrainState()
    client = Client(create_app(ServerConfig().frontend(), engine, tokenizer, drain))  # type: ignore[arg-type]
    assert client.get("/ready").json() == {"status": "ready", "model": MODEL}
    assert [client.request("HEAD", path).status_code for path in ("/ready", "/health")] == [200, 200]
    engine.connected = False
    assert client.get("/ready").status_code == 503
    assert client.request("HEAD", "/ready").status_code == 503
    engine.connected = True
    engine.healthy = False  # connected, but its stats are stale: a stalled engine takes no requests either
    assert client.get("/ready").status_code == 503
    engine.healthy = True
    assert client.get("/ready").status_code == 200
    drain.start_draining()
    ready = client.get("/ready")
    assert (ready.status_code, ready.json()["status"]) == (503, "draining")
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["draining"] is True, "alive while it drains"
    assert client.request("HEAD", "/health").status_code == 200
    refused = client.post("/v1/completions", {"prompt": "x", "max_tokens": 1})
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "server_draining"
    assert client.get("/metrics").status_code == 200
    assert engine.requests == []


def test_metrics_count_requests_time_them_and_report_the_engine(tokenizer: Tokenizer) -> None:
    engine = ScriptedEngine(tokenizer)
    engine.stats = engine_stats()
    client = Client(create_app(ServerConfig().frontend(), engine, tokenizer))  # type: ignore[arg-type]
    assert client.post("/v1/completions", {"prompt": "x", "max_tokens": 3}).status_code == 200
    streamed = client.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 3,
                                                    "stream": True, "n": 2}, headers={"X-Priority": "high"})
    assert streamed.status_code == 200
    assert client.post("/v1/completions", {"prompt": "x", "temperature": 9}).status_code == 400
    assert client.post("/v1/completions", {"prompt": "x", "temperature": "hot"}).status_code == 400
    metrics = scrape(client)

    def value(name: str, **labels: str) -> float:
        return metrics[(name, tuple(sorted(labels.items())))]

    assert value("sfllm_requests_total", status="200", priority="normal") == 1
    assert value("sfllm_requests_total", status="200", priority="high") == 1
    assert value("sfllm_requests_total", status="400", priority="normal") == 1, "failed in the handler"
    assert value("sfllm_requests_total", status="400", priority="none") == 1, "failed before it: no priority"
    assert value("sfllm_time_to_first_token_seconds_count") == 3, "one per sequence"
    assert value("sfllm_time_per_output_token_seconds_count") == 3
    assert value("sfllm_e2e_request_latency_seconds_count") == 2, "successful requests only"
    assert 0 < value("sfllm_e2e_request_latency_seconds_sum") < 30
    assert value("sfllm_engine_healthy") == 1
    assert value("sfllm_num_requests_running", priority="normal") == 2
    assert value("sfllm_num_requests_waiting", priority="normal") == 5
    assert value("sfllm_kv_cache_usage_ratio") == 0.25
    assert value("sfllm_prefix_cache_hit_rate") == 0.4
    assert value("sfllm_prefix_cache_hits_total") == 4 and value("sfllm_prefix_cache_queries_total") == 10
    assert value("sfllm_preemptions_total") == 3 and value("sfllm_engine_steps_total") == 77
    assert value("sfllm_batch_size") == 3 and value("sfllm_step_time_seconds") == 0.02
    assert value("sfllm_gpu_memory_allocated_bytes") == 1000 and value("sfllm_gpu_memory_reserved_bytes") == 2000
    assert value("sfllm_prompt_tokens_total") == 123 and value("sfllm_generation_tokens_total") == 456
    assert value("sfllm_requests_finished_total", reason="stop") == 3
    assert value("sfllm_spec_proposed_tokens_total") == 40 and value("sfllm_spec_accepted_tokens_total") == 30
    assert value("sfllm_request_queue_time_seconds_bucket", le="0.01") == 1
    assert value("sfllm_request_queue_time_seconds_bucket", le="0.025") == 3
    assert value("sfllm_request_queue_time_seconds_bucket", le="120.0") == 3
    assert value("sfllm_request_queue_time_seconds_bucket", le="+Inf") == 4
    assert value("sfllm_request_queue_time_seconds_count") == 4
    assert value("sfllm_request_queue_time_seconds_sum") == 200.5


def test_metrics_also_under_the_names_vllm_and_sglang_give_them(tokenizer: Tokenizer) -> None:
    """Gateways, autoscalers and dashboards built for vLLM or SGLang read the same values under their names."""
    engine = ScriptedEngine(tokenizer)
    engine.stats = engine_stats()
    client = Client(create_app(ServerConfig().frontend(), engine, tokenizer))  # type: ignore[arg-type]
    assert client.post("/v1/completions", {"prompt": "x", "max_tokens": 3, "n": 2}).status_code == 200
    metrics = scrape(client)

    def value(name: str, **labels: str) -> float:
        return metrics[(name, tuple(sorted((labels | {"model_name": MODEL}).items())))]

    for running, waiting in (("vllm:num_requests_running", "vllm:num_requests_waiting"),
                             ("sglang:num_running_reqs", "sglang:num_queue_reqs")):
        assert (value(running), value(waiting)) == (3, 5), "summed over the priority classes"
    assert value("vllm:kv_cache_usage_perc") == value("sglang:token_usage") == 0.25
    assert (value("vllm:prefix_cache_queries_total"), value("vllm:prefix_cache_hits_total")) == (10, 4)
    assert value("vllm:num_preemptions_total") == 3
    assert value("vllm:prompt_tokens_total") == value("sglang:prompt_tokens_total") == 123
    assert value("vllm:generation_tokens_total") == value("sglang:generation_tokens_total") == 456
    assert value("vllm:request_success_total", finished_reason="stop") == 3
    assert value("vllm:request_success_total", finished_reason="abort") == 1
    assert value("vllm:request_queue_time_seconds_bucket", le="0.025") == 3
    assert value("vllm:request_queue_time_seconds_sum") == 200.5
    for name in ("vllm:time_to_first_token_seconds", "sglang:time_to_first_token_seconds",
                 "vllm:request_time_per_output_token_seconds"):
        assert value(f"{name}_count") == 2, "one per sequence"
        assert value(f"{name}_bucket", le="+Inf") == 2
    for name in ("vllm:e2e_request_latency_seconds", "sglang:e2e_request_latency_seconds"):
        assert value(f"{name}_count") == 1
        assert value(f"{name}_sum") == metrics[("sfllm_e2e_request_latency_seconds_sum", ())]
    assert not [key for key in metrics if key[0].startswith(("vllm:", "sglang:")) and ("priority", "normal") in key[1]]
    prompt_tokens = len(tokenizer.encode("x"))
    assert value("vllm:request_prompt_tokens_count") == 2
    assert value("vllm:request_prompt_tokens_sum") == 2 * prompt_tokens
    assert value("vllm:request_generation_tokens_sum") == 6
    assert value("vllm:request_generation_tokens_bucket", le="5.0") == 2
    assert value("vllm:request_success_total", finished_reason="length") == 0, "every reason from 0"


def test_engine_counters_total_tokens_finishes_and_queue_time() -> None:
    counters = EngineCounters()
    scheduled = Request("a", "c", [1, 2, 3], SamplingParams(), "normal", 0.0, enqueue_time=10.0,
                        first_scheduled_time=10.03)
    never_scheduled = Request("b", "c", [1, 2], SamplingParams(), "normal", 0.0, enqueue_time=10.0)
    counters.admitted(scheduled, 0.0, str)
    counters.admitted(never_scheduled, 0.0, str)
    counters.count([RequestOutput(request_id="a", token_ids=[5], num_prompt_tokens=3)])
    counters.count([RequestOutput(request_id="a", token_ids=[6], finish_reason="length"),
                    RequestOutput(request_id="b", token_ids=[], finish_reason="abort"),
                    RequestOutput(request_id="c", token_ids=[], finish_reason="error", error="queue full")])
    assert (counters.num_prompt_tokens, counters.num_generation_tokens) == (3, 2)
    assert counters.num_finished == {"length": 1, "abort": 1, "error": 1}
    assert counters.queue_time_counts[2] == 1 and sum(counters.queue_time_counts) == 1, "0.03 s: the 0.05 bucket"
    assert counters.queue_time_sum_s == pytest.approx(0.03)


def test_the_engine_reads_a_bounded_number_of_frontend_messages_per_turn() -> None:
    """A flood of frontend messages is handled over several loop turns, in order, none dropped."""
    context = zmq.Context()
    router, dealer = context.socket(zmq.ROUTER), context.socket(zmq.DEALER)
    try:
        router.bind("inproc://engine")
        dealer.setsockopt(zmq.IDENTITY, b"frontend-1")
        dealer.connect("inproc://engine")
        codec = MessageCodec(FrontendToEngine)
        total = 2 * FRONTEND_MESSAGES_PER_READ + 10
        for index in range(total):
            dealer.send(codec.encode(AbortRequest(request_ids=[f"r{index}"])))
        handled: list[str] = []
        server = EngineServer.__new__(EngineServer)  # only the socket, the codec and the handler are used
        server.sock, server.codec = router, codec
        server._handle = lambda identity, message: handled.append(message.request_ids[0])
        turns = 0
        while len(handled) < total:
            assert router.poll(timeout=1000), f"{total - len(handled)} messages never arrived"
            before = len(handled)
            server._drain_frontends()
            assert 0 < len(handled) - before <= FRONTEND_MESSAGES_PER_READ
            turns += 1
        assert turns >= 3 and handled == [f"r{index}" for index in range(total)]
    finally:
        router.close(linger=0)
        dealer.close(linger=0)
        context.term()


def test_engine_counters_log_where_a_high_priority_first_token_waited(caplog: pytest.LogCaptureFixture) -> None:
    counters = EngineCounters()
    now = time.monotonic()
    high = Request("h", "c", [1, 2], SamplingParams(), "high", 0.0, enqueue_time=now, first_scheduled_time=now + 0.004)
    normal = Request("n", "c", [1, 2], SamplingParams(), "normal", 0.0, enqueue_time=now, first_scheduled_time=now)
    unasked = Request("u", "c", [1, 2], SamplingParams(), "high", 0.0, enqueue_time=now, first_scheduled_time=now)

    def no_state() -> str:
        raise AssertionError("the engine's state is read for the debug log alone")

    counters.admitted(unasked, time.time(), no_state)  # INFO: nothing recorded
    with caplog.at_level(logging.DEBUG, logger="sfllm.engine.engine_process"):
        counters.admitted(high, time.time() - 0.001, lambda: "2 steps in flight")
        counters.admitted(normal, time.time(), lambda: "never asked")
        counters.count([RequestOutput(request_id=r, token_ids=[5], num_prompt_tokens=2) for r in ("h", "n", "u")])

    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("high-priority request h: at the engine ")
    assert "(2 steps in flight); scheduled 4.0 ms later, first output sent at " in lines[0]


def test_api_key_guards_all_but_the_probes_and_compares_in_constant_time(
        tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[int, int]] = []
    compare_digest = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((len(a), len(b)))
        return compare_digest(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    config = ServerConfig(api_key="sekret").frontend()
    client = Client(create_app(config, ScriptedEngine(tokenizer), tokenizer))  # type: ignore[arg-type]
    for path in ("/v1/models", "/docs", "/openapi.json"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer " + "s" * 1000}):
            response = client.get(path, headers=headers)
            assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer", path
    assert client.post("/v1/completions", {"prompt": "x"}).status_code == 401
    assert compared and all(lengths == (32, 32) for lengths in compared), "digests: equal lengths whatever is sent"
    for path in ("/health", "/ready", "/metrics"):
        assert client.get(path).status_code == 200, path
    good = {"Authorization": "Bearer sekret"}
    assert client.get("/v1/models", headers=good).status_code == 200
    assert client.post("/v1/completions", {"prompt": "x", "max_tokens": 1}, headers=good).status_code == 200
    for scheme in ("bearer sekret", "BEARER sekret", "bEaReR  sekret"):  # RFC 7235: the scheme ignores case
        assert client.get("/v1/models", headers={"Authorization": scheme}).status_code == 200, scheme
    for wrong in ("Basic sekret", "Bearersekret", "sekret", "Bearer sekret2", "Bearer Sekret"):
        assert client.get("/v1/models", headers={"Authorization": wrong}).status_code == 401, wrong


def test_browsers_may_call_the_api_from_any_page_by_default_or_from_the_origins_named(
        tokenizer: Tokenizer, caplog: pytest.LogCaptureFixture) -> None:
    """CORS, as vLLM's and SGLang's defaults: a page's preflight needs no key, and refusals carry the headers."""
    page = {"Origin": "https://chat.example"}
    preflight = page | {"Access-Control-Request-Method": "POST",
                        "Access-Control-Request-Headers": "authorization, content-type"}
    client = Client(create_app(ServerConfig(api_key="sekret").frontend(), ScriptedEngine(tokenizer),
                               tokenizer))  # type: ignore[arg-type]
    answer = client.request("OPTIONS", "/v1/chat/completions", headers=preflight)
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "*"
    assert "POST" in answer.headers["access-control-allow-methods"]
    assert "authorization" in answer.headers["access-control-allow-headers"].lower()
    refused = client.post("/v1/completions", {"prompt": "x"}, headers=page)
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == "*", "the page reads why"
    served = client.post("/v1/completions", {"prompt": "x", "max_tokens": 1},
                         headers=page | {"Authorization": "Bearer sekret", "X-Request-Id": "page-1"})
    assert served.status_code == 200 and served.headers["access-control-allow-origin"] == "*"
    assert served.headers["access-control-expose-headers"].lower() == "x-request-id", "the page may read its id"
    assert "access-control-allow-credentials" not in served.headers

    named = ServerConfig(allowed_origins=["https://chat.example"], allow_credentials=True).frontend()
    client = Client(create_app(named, ScriptedEngine(tokenizer), tokenizer))  # type: ignore[arg-type]
    answer = client.request("OPTIONS", "/v1/models", headers=preflight)
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "https://chat.example"
    assert answer.headers["access-control-allow-credentials"] == "true"
    other = {"Origin": "https://elsewhere.example", "Access-Control-Request-Method": "POST"}
    assert client.request("OPTIONS", "/v1/models", headers=other).status_code == 400
    assert "access-control-allow-origin" not in client.get("/v1/models", headers=other).headers
    with caplog.at_level(logging.WARNING, logger="sfllm.frontend.app"):  # vLLM's --allow-credentials alone
        client = Client(create_app(ServerConfig(allow_credentials=True).frontend(), ScriptedEngine(tokenizer),
                                   tokenizer))  # type: ignore[arg-type]
    assert "allow_credentials with any origin" in caplog.text
    answer = client.request("OPTIONS", "/v1/models", headers=other)
    assert answer.headers["access-control-allow-origin"] == "https://elsewhere.example", "echoed, as vLLM's"


def call_asgi(app: Any, body_chunks: list[bytes], headers: list[tuple[bytes, bytes]]) -> tuple[int, bytes]:
    """POST /v1/completions with the body in chunks, as a client sending chunked transfer encoding."""
    chunks = list(body_chunks)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if chunks:
            chunk = chunks.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "root_path": "", "headers": [(b"host", b"t"), *headers],
             "client": ("127.0.0.1", 5000), "server": ("t", 80)}
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 10))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def test_request_body_size_limit_is_413_declared_or_streamed(tokenizer: Tokenizer) -> None:
    engine = ScriptedEngine(tokenizer)
    app = create_app(ServerConfig(max_request_body_bytes=1000).frontend(), engine, tokenizer)  # type: ignore[arg-type]
    declared = Client(app).post("/v1/completions", {"prompt": "x" * 2000})
    assert declared.status_code == 413 and declared.json()["error"]["code"] == "request_too_large"
    assert "1000 bytes" in declared.json()["error"]["message"]
    status, body = call_asgi(app, [b'{"prompt": "', b"x" * 600, b"x" * 600, b'"}'],
                             [(b"content-type", b"application/json")])
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"
    status, _ = call_asgi(app, [b'{"prompt": "', b"x" * 300, b'", "max_tokens": 1}'],
                          [(b"content-type", b"application/json")])
    assert status == 200
    assert len(engine.requests) == 1


@pytest.mark.parametrize(("body", "param", "code", "numbers"), [
    ({"prompt": "word " * 20, "max_tokens": 1}, "prompt", "prompt_too_long", ["8", "max_prompt_tokens"]),
    ({"messages": [{"role": "user", "content": "word " * 20}]}, "messages", "prompt_too_long", ["8"]),
    ({"prompt": "x", "max_tokens": 6}, "max_tokens", "max_tokens_too_large", ["6", "5", "max_output_tokens"]),
    ({"prompt": "x", "n": 5}, "n", "too_many_sequences", ["5", "4", "max_n"]),
    ({"prompt": ["a", "b", "c"], "n": 2}, "n", "too_many_sequences", ["6", "4"]),
    ({"prompt": "x", "stop": ["a", "b", "c"]}, "stop", "too_many_stop_sequences", ["3", "2"]),
    ({"prompt": "x", "stop_token_ids": [1, 2, 3]}, "stop_token_ids", "too_many_stop_sequences", ["3", "2"]),
    ({"prompt": "x", "stop": "abcdef"}, "stop", "stop_sequence_too_long", ["6", "5"]),
    ({"prompt": "x", "top_k": 2**64}, "top_k", None, []),
    ({"prompt": "x", "stop_token_ids": [-1]}, "stop_token_ids[0]", None, []),
])
def test_limits_are_400s_that_name_the_limit(tokenizer: Tokenizer, body: dict[str, Any], param: str,
                                            code: str | None, numbers: list[str]) -> None:
    engine = ScriptedEngine(tokenizer)
    config = ServerConfig(max_prompt_tokens=8, max_output_tokens=5, max_n=4, max_stop_sequences=2,
                          max_stop_sequence_chars=5).frontend()
    client = Client(create_app(config, engine, tokenizer))  # type: ignore[arg-type]
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    response = client.post(path, body)
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == param, error
    assert code is None or error["code"] == code
    assert all(number in error["message"] for number in numbers), error["message"]
    assert engine.requests == []


def test_max_output_tokens_clips_the_default_budget(tokenizer: Tokenizer) -> None:
    engine = ScriptedEngine(tokenizer)
    config = ServerConfig(max_output_tokens=5).frontend()
    client = Client(create_app(config, engine, tokenizer))  # type: ignore[arg-type]
    client.post("/v1/completions", {"prompt": "x"})
    client.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})
    assert [r.params.max_tokens for r in engine.requests] == [5, 5]


def test_request_timeout_is_504_and_aborts_the_engine_request(tokenizer: Tokenizer,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    engine = ScriptedEngine(tokenizer, delay_s=0.05)
    config = ServerConfig(request_timeout_s=0.4).frontend()
    client = Client(create_app(config, engine, tokenizer))  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="sfllm.frontend.refusal_log"):
        whole = client.post("/v1/completions", {"prompt": "x", "max_tokens": 100})
    assert [record.getMessage() for record in caplog.records] == [
        "a request on /v1/completions answered 504 request_timeout: it ran past --request-timeout-s (one such line "
        "per 10 s at most; /metrics counts them all)"], "at the default log level, without the access log"
    assert whole.status_code == 504 and whole.json()["error"]["code"] == "request_timeout"
    assert "0.4 s" in whole.json()["error"]["message"]
    streamed = client.post("/v1/completions", {"prompt": "x", "max_tokens": 100, "stream": True})
    events = streamed.text.split("\n\n")
    assert streamed.status_code == 200 and events[-2] == "data: [DONE]"
    assert json.loads(events[-3].removeprefix("data: "))["error"]["code"] == "request_timeout"
    assert 3 < len(events) < 40, "some tokens, then the error"
    assert sorted(engine.aborted) == sorted(r.request_id for r in engine.requests) and len(engine.aborted) == 2
    metrics = scrape(client)
    assert metrics[("sfllm_requests_total", (("priority", "normal"), ("status", "504")))] == 2


def test_refusals_are_logged_a_line_per_interval_and_the_next_line_counts_the_rest(
        caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    refusals = RefusalLog(interval_s=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="sfllm.frontend.refusal_log"):
        refusals.note(503, "engine_overloaded", "/v1/completions")
        for step in range(5):
            now[0] += 1.0
            refusals.note(503, "engine_overloaded", "/v1/chat/completions")
        refusals.note(504, None, "/v1/completions")  # a stream's error event without a code
        now[0] += 10.0
        refusals.note(503, "server_draining", "/v1/completions")
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 3, lines
    assert lines[0].startswith("a request on /v1/completions answered 503 engine_overloaded: the engine's waiting "
                               "queue is full (--max-waiting-requests)")
    assert lines[1] == ("6 more requests refused or cut short in the 15 s before: 5 x 503 engine_overloaded, "
                        "1 x 504 error")
    assert lines[2].startswith("a request on /v1/completions answered 503 server_draining: this frontend is draining")


def test_a_responses_stream_cut_by_the_timeout_ends_with_an_error_event_counted_as_its_status(
        tokenizer: Tokenizer) -> None:
    engine = ScriptedEngine(tokenizer, delay_s=0.05)
    client = Client(create_app(ServerConfig(request_timeout_s=0.4).frontend(), engine, tokenizer))  # type: ignore
    streamed = client.post("/v1/responses", {"input": "x", "max_output_tokens": 90, "stream": True})
    last = json.loads(streamed.text.strip().split("\n\n")[-1].split("\n")[1].removeprefix("data: "))
    assert streamed.status_code == 200 and last["type"] == "error" and last["code"] == "request_timeout", last
    assert scrape(client)[("sfllm_requests_total", (("priority", "normal"), ("status", "504")))] == 1


def test_a_generate_stream_cut_by_the_timeout_ends_with_an_error_event_counted_as_its_status(
        tokenizer: Tokenizer) -> None:
    engine = ScriptedEngine(tokenizer, delay_s=0.05)
    client = Client(create_app(ServerConfig(request_timeout_s=0.4).frontend(), engine, tokenizer))  # type: ignore
    streamed = client.post("/generate", {"text": "x", "sampling_params": {"max_new_tokens": 90}, "stream": True})
    events = streamed.text.split("\n\n")
    assert streamed.status_code == 200 and events[-2] == "data: [DONE]"
    assert json.loads(events[-3].removeprefix("data: "))["error"]["code"] == "request_timeout"
    assert scrape(client)[("sfllm_requests_total", (("priority", "normal"), ("status", "504")))] == 1


def test_a_long_prompt_is_tokenized_off_the_event_loop(tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = ScriptedEngine(tokenizer)
    app = create_app(ServerConfig(max_prompt_tokens=100).frontend(), engine, tokenizer)  # type: ignore[arg-type]
    tokenizing, release = threading.Event(), threading.Event()
    encode = tokenizer.encode

    def held_encode(text: str, *args) -> list[int]:
        tokenizing.set()
        assert release.wait(30), "released once /health answered"
        return encode(text, *args)

    monkeypatch.setattr(tokenizer, "encode", held_encode)

    async def scenario() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            big = asyncio.create_task(client.post("/v1/completions", json={"prompt": "word " * 500}))
            assert await asyncio.to_thread(tokenizing.wait, 30)
            # Were the prompt tokenized on the event loop, /health could not answer until the release.
            health = await asyncio.wait_for(client.get("/health"), 30)
            assert health.status_code == 200 and not big.done()
            release.set()
            assert (await big).status_code == 400

    asyncio.run(scenario())


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


class ServerThread:
    """The frontend's real uvicorn server on a loopback port, in a thread of its own."""

    def __init__(self, app: Any, engine: Any, drain: DrainState, drain_timeout_s: float) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1)
        serving = threading.Event()
        self.server = DrainingServer(config, engine, drain, drain_timeout_s, on_serving=serving.set)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self.server.serve([self.sock]),))
        self.thread.start()
        assert serving.wait(10), "server did not start"

    def drain(self) -> None:
        self.loop.call_soon_threadsafe(self.server.start_drain)

    def hand_over(self) -> None:
        self.loop.call_soon_threadsafe(self.server.start_handover)


def read_stream(url: str, body: dict[str, Any], first_chunk: threading.Event, result: dict[str, Any],
                lines: list[str]) -> None:
    """`lines` fills as they come; `result` gets the outcome and the lines at the end."""
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as response:
            for line in response.iter_lines():
                lines.append(line)
                first_chunk.set()
        result["outcome"] = "done" if "data: [DONE]" in lines else "no [DONE]"
    except httpx.HTTPError as error:
        result["outcome"] = f"cut: {type(error).__name__}"
    result["lines"] = lines


def test_sigterm_drain_finishes_running_requests_refuses_new_ones_and_ends_the_rest_with_503_at_the_timeout(
        tokenizer: Tokenizer) -> None:
    engine = ScriptedEngine(tokenizer, max_context_length=4096, delay_s=0.02)
    drain = DrainState()
    app = create_app(ServerConfig().frontend(), engine, tokenizer, drain)  # type: ignore[arg-type]
    server = ServerThread(app, engine, drain, drain_timeout_s=1.5)
    unstreamed: dict[str, httpx.Response] = {}
    waiting = threading.Thread(target=lambda: unstreamed.setdefault("reply", httpx.post(
        f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 3000}, timeout=30)))
    waiting.start()
    results: list[dict[str, Any]] = [{"lines": []}, {"lines": []}]
    started = [threading.Event(), threading.Event()]
    bodies = [{"prompt": "x", "max_tokens": 40, "stream": True}, {"prompt": "x", "max_tokens": 3000, "stream": True}]
    lines = [[], []]
    readers = [threading.Thread(target=read_stream, args=(server.url, body, event, result, received))
               for body, event, result, received in zip(bodies, started, results, lines)]
    for reader in readers:
        reader.start()
    assert all(event.wait(10) for event in started)
    wait_until(lambda: len(engine.requests) == 3)
    server.drain()
    wait_until(lambda: drain.draining)
    long_lines_at_drain = len(lines[1])
    refused = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=5)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_draining"
    assert httpx.get(f"{server.url}/ready", timeout=5).status_code == 503
    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
    for reader in [*readers, waiting]:
        reader.join(15)
    server.thread.join(15)
    assert not server.thread.is_alive(), "the server exited after the drain"
    short, long = results
    assert short["outcome"] == "done", short
    assert long["outcome"] == "done", "the long stream ended with an error event, then [DONE]"
    events = [line.removeprefix("data: ") for line in long["lines"] if line]
    error = json.loads(events[-2])["error"]
    assert error["code"] == "server_shutdown" and "drain timeout" in error["message"], events[-2:]
    assert len(long["lines"]) > max(long_lines_at_drain, len(short["lines"])), "it ran on during the drain"
    reply = unstreamed["reply"]
    assert reply.status_code == 503 and reply.json()["error"]["code"] == "server_shutdown", reply.text
    assert reply.headers["retry-after"]
    long_requests = [r.request_id for r in engine.requests if r.params.max_tokens == 3000]
    assert len(long_requests) == 2 and set(long_requests) <= set(engine.aborted)


def test_a_handover_takes_no_new_connection_and_closes_each_open_one_after_its_next_answer(
        tokenizer: Tokenizer) -> None:
    drain = DrainState()
    engine = ScriptedEngine(tokenizer)
    server = ServerThread(create_app(ServerConfig().frontend(), engine, tokenizer, drain), engine, drain, 30)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        assert "connection" not in client.get("/health").headers, "a keep-alive connection"
        server.hand_over()
        wait_until(lambda: drain.handing_over)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.url}/health", timeout=5)  # the port's other frontends take new connections
        reply = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert reply.status_code == 200 and reply.headers["connection"] == "close", "served, then closed"
        assert not drain.draining, "nothing is refused"
    server.thread.join(15)
    assert not server.thread.is_alive(), "it exits once its connections are closed"


def test_a_bug_answers_500_and_the_connection_serves_the_next_request(tokenizer: Tokenizer) -> None:
    """An exception no handler expects is a 500 in OpenAI's shape, and the keep-alive connection stays usable
    (Starlette's own handler re-raises, and uvicorn then drops the connection unannounced: the client's next request
    on it fails). http.client reuses its one socket and does not retry, so a dropped connection fails here."""
    drain = DrainState()
    engine = ScriptedEngine(tokenizer, error=RuntimeError("a bug"))  # type: ignore[arg-type]
    server = ServerThread(create_app(ServerConfig().frontend(), engine, tokenizer, drain), engine, drain, 5)
    connection = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=10)
    try:
        for _ in range(2):
            connection.request("POST", "/v1/completions", json.dumps({"prompt": "x", "max_tokens": 2}),
                               {"Content-Type": "application/json"})
            reply = connection.getresponse()
            assert reply.status == 500 and reply.getheader("connection") != "close"
            assert json.loads(reply.read())["error"] == {"message": "internal server error: RuntimeError",
                                                         "type": "server_error", "param": None, "code": None}
            connection.request("GET", "/health")
            health = connection.getresponse()
            assert health.status == 200, "the same connection answers again"
            health.read()
    finally:
        connection.close()
        server.drain()
        server.thread.join(15)
    assert len(engine.requests) == 2


@pytest.mark.parametrize("path, fields, param", [
    ("/v1/completions", {"bad_words": ["ok", "\ud800"]}, "bad_words"),
    ("/v1/chat/completions", {"bad_words": ["\udfff"]}, "bad_words"),
    ("/v1/chat/completions", {"response_format": {"type": "regex", "regex": "a\ud83d"}}, "response_format"),
    ("/v1/completions", {"response_format": {"type": "json_schema",
                                             "json_schema": {"name": "x", "schema": {"const": "\ud83d"}}}},
     "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}, {
        "role": "assistant", "content": "y", "reasoning_content": "\ud800"}, {"role": "user", "content": "z"}]},
     "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}, {
        "role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "f", "arguments": '{"a": "\\udc00"}'}}]}, {"role": "tool", "tool_call_id": "c1", "content": "1"}]},
     "messages"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f", "description": "\ud83d"}}]},
     "tools"),
    ("/v1/chat/completions", {"chat_template_kwargs": {"enable_thinking": "\ud800"}}, "chat_template_kwargs"),
    ("/v1/chat/completions", {"max_completion_tokens": 0}, "max_completion_tokens"),
    ("/v1/completions", {"max_new_tokens": -5}, "max_new_tokens"),
    ("/v1/completions", {"max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"n": 2, "best_of": 1}, "best_of"),
    ("/v1/completions", {"best_of": 0}, "best_of"),
    ("/v1/chat/completions", {"best_of": 3}, "best_of"),  # was dropped unread: one choice, no word
])
def test_each_bad_field_is_a_400_that_names_it(tokenizer: Tokenizer, path: str, fields: dict[str, Any],
                                               param: str) -> None:
    """Unpaired surrogates where the tokenizer or the grammar compiler would choke on them, a token budget under 1
    in whichever field the client used, best_of under n."""
    client = Client(create_app(ServerConfig().frontend(), ScriptedEngine(tokenizer), tokenizer))  # type: ignore[arg-type]
    prompt = {"prompt": "x"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]}
    budget = {} if any(field.startswith("max_") for field in fields) else {"max_tokens": 2}
    response = client.post(path, {**prompt, **budget, **fields})  # json.dumps escapes each surrogate
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param, response.text
    assert param in response.json()["error"]["message"] or param == "response_format"


def test_more_sequences_than_the_waiting_queue_holds_are_a_400_not_a_503(tokenizer: Tokenizer) -> None:
    """A request's sequences queue at once: past `max_waiting_requests` the engine would answer a retryable 503 that
    no retry could pass."""
    config = ServerConfig(max_waiting_requests=3).frontend()
    client = Client(create_app(config, ScriptedEngine(tokenizer), tokenizer))  # type: ignore[arg-type]
    refused = client.post("/v1/completions", {"prompt": ["a", "b"], "n": 2, "max_tokens": 1})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "too_many_sequences", refused.text
    assert "at most 3 per request" in refused.json()["error"]["message"]
    assert client.post("/v1/completions", {"prompt": "a", "n": 3, "max_tokens": 1}).status_code == 200
    assert ServerConfig().frontend().max_n == 128


def test_an_image_part_is_a_400_saying_only_text_is_read(tokenizer: Tokenizer) -> None:
    client = Client(create_app(ServerConfig().frontend(), ScriptedEngine(tokenizer), tokenizer))  # type: ignore[arg-type]
    content = [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "http://x/a.png"}}]
    response = client.post("/v1/chat/completions", {"messages": [{"role": "user", "content": content}]})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "messages[0].content[1].type"
    assert "'image_url' are not supported" in error["message"] and "text only" in error["message"], error


# ---- fuzzing: request bodies a client could send ---------------------------------------------

# Text with unpaired surrogates too: JSON can carry them.
_ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=12)
_scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | _ANY_TEXT
JUNK = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=5)
_TEXT = st.text(min_size=1, max_size=40)
_VOCAB_SIZE = 49152  # SmolLM2's
_TOKEN_IDS = st.lists(st.integers(0, _VOCAB_SIZE - 1), min_size=1, max_size=6)
# Valid values; token budgets stay tiny so every valid request is over in a few engine steps.
_SAMPLING = {
    "model": st.just(MODEL),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "top_k": st.integers(-1, 100),
    "min_p": st.floats(0, 1),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.5, 2),
    "seed": st.integers(-2**63, 2**63 - 1),
    "n": st.integers(1, 2),
    "stop": _TEXT | st.lists(_TEXT, max_size=3),
    "stop_token_ids": st.lists(st.integers(0, _VOCAB_SIZE - 1), max_size=3),
    "ignore_eos": st.booleans(),
    "skip_special_tokens": st.booleans(),
    "include_stop_str_in_output": st.booleans(),
    "priority": st.sampled_from(["high", "normal", "background"]) | st.integers(-2**63, 2**63 - 1),
    "user": _TEXT,
}
_STREAMING = st.sampled_from([{}, {"stream": False}, {"stream": True},
                              {"stream": True, "stream_options": {"include_usage": True}}])


def _streamed(bodies: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    return st.builds(lambda body, streaming: {**body, **streaming}, bodies, _STREAMING)


_COMPLETION = _streamed(st.fixed_dictionaries(
    {"prompt": _TEXT | _TOKEN_IDS | st.lists(_TEXT, min_size=1, max_size=2), "max_tokens": st.integers(1, 3)},
    optional={**_SAMPLING, "echo": st.booleans(), "logprobs": st.integers(0, 5)}))
_MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant"]),
     "content": _TEXT | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": _TEXT}), max_size=2)},
    optional={"name": _TEXT})
_CHAT = _streamed(st.fixed_dictionaries(
    {"messages": st.lists(_MESSAGE, min_size=1, max_size=3), "max_tokens": st.integers(1, 3)},
    optional={**_SAMPLING, "logprobs": st.booleans(), "top_logprobs": st.integers(0, 5)}))
# A key a client may misuse: each of the endpoint's own, plus some sfllm has never heard of.
_KEYS = st.sampled_from(sorted({*_SAMPLING, "prompt", "messages", "max_tokens", "max_new_tokens",
                                "max_completion_tokens", "echo", "logprobs", "top_logprobs", "stream",
                                "stream_options", "tools", "logit_bias"}))


def _with_junk(bodies: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[Any]:
    """A valid body; or one with a field set to junk; or junk in place of the body.

    A token budget set to junk stays invalid or small, so no request runs long."""
    def corrupt(body: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
        if key in ("max_tokens", "max_new_tokens", "max_completion_tokens"):
            if value is None:
                value = []
            elif isinstance(value, int) and value > 3:
                value = -value
        return {**body, key: value}

    return bodies | st.builds(corrupt, bodies, _KEYS, JUNK) | JUNK


REQUESTS = (st.tuples(st.just("/v1/completions"), _with_junk(_COMPLETION))
            | st.tuples(st.just("/v1/chat/completions"), _with_junk(_CHAT)))
PRIORITY_HEADERS = st.sampled_from([
    {}, {}, {}, {"X-Priority": "background"}, {"X-Priority": "\u00e9t\u00e9".encode("latin-1")}])


def check_answer(response: httpx.Response) -> None:
    """No 5xx, an OpenAI error body for every 4xx, and a clean event stream for every 200 stream."""
    assert response.status_code < 500, response.text
    if response.status_code != 200:
        assert response.json()["error"]["message"]
    elif response.headers["content-type"].startswith("text/event-stream"):
        events = response.text.split("\n\n")
        assert events[-2:] == ["data: [DONE]", ""]
        for event in events[:-2]:
            assert "error" not in json.loads(event.removeprefix("data: ")), event


@pytest.fixture(scope="module")
def fuzz_client(tokenizer: Tokenizer) -> Client:
    config = ServerConfig(max_n=8).frontend()
    return Client(create_app(config, ScriptedEngine(tokenizer), tokenizer))  # type: ignore[arg-type]


@settings(max_examples=150, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(request=REQUESTS, headers=PRIORITY_HEADERS)
def test_fuzzed_requests_get_no_5xx_from_the_frontend(fuzz_client: Client, request: tuple[str, Any],
                                                      headers: dict[str, str]) -> None:
    path, body = request
    check_answer(fuzz_client.post(path, body, headers=headers))


@pytest.mark.parametrize("body", [
    b"", b"null", b"[]", b"{", b'"x"', b"\xff\xfe{}", b"[" * 50_000, b'{"prompt": "a\\ud800b"}',
    b'{"messages": [{"role": "user", "content": "\\udfff"}]}', b'{"prompt": "x", "stop": "\\ud800"}',
    b'{"prompt": "x", "seed": 9223372036854775807, "n": 3, "max_tokens": 1}',
    b'{"prompt": "x", "seed": -9223372036854775808, "n": 3, "max_tokens": 1}'])
def test_odd_bodies_are_4xx(tokenizer: Tokenizer, body: bytes) -> None:
    engine = ScriptedEngine(tokenizer)
    client = Client(create_app(ServerConfig().frontend(), engine, tokenizer))  # type: ignore[arg-type]
    for path in ("/v1/completions", "/v1/chat/completions"):
        response = client.post(path, body)
        assert response.status_code < 500, response.text
    seeds = [r.params.seed for r in engine.requests]
    assert all(0 <= seed < 2**63 for seed in seeds if seed is not None), "seeds fit the worker's int64"
