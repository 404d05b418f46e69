"""The OpenAI-compatible HTTP API: routes, authentication, error shapes."""
from __future__ import annotations

import logging
import os
import time

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.middleware.cors import CORSMiddleware

import sfllm
from sfllm.config import FrontendConfig
from sfllm.frontend.auth import ApiKeyMiddleware
from sfllm.frontend.chat_completions import ChatCompletionEndpoint
from sfllm.frontend.completions import CompletionEndpoint
from sfllm.frontend.engine_client import EngineClient
from sfllm.frontend.errors import APIError, ModelNotFoundError, UnexpectedErrorMiddleware, install_error_handlers
from sfllm.frontend.health_generate import health_generate
from sfllm.frontend.metrics import CONTENT_TYPE, FrontendMetrics, MetricsMiddleware
from sfllm.frontend.native_generate import AbortRequestBody, NativeGenerateEndpoint, NativeGenerateRequest
from sfllm.frontend.openai_protocol import ChatCompletionRequest, CompletionRequest
from sfllm.frontend.openai_responses import ChatCompletionResponse, CompletionResponse, ModelCard, ModelList
from sfllm.frontend.request_checks import RequestLimits
from sfllm.frontend.request_gate import DrainState, RequestGateMiddleware
from sfllm.frontend.request_id_header import RequestIdHeaderMiddleware
from sfllm.frontend.responses_endpoint import ResponsesEndpoint
from sfllm.frontend.responses_protocol import ResponsesRequest
from sfllm.frontend.tokenize_endpoints import (DetokenizeRequest, DetokenizeResponse, TokenizeEndpoints,
                                               TokenizeRequest, TokenizeResponse)
from sfllm.frontend.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


def _json_or_stream(model: type) -> dict[int | str, dict[str, object]]:
    return {200: {"model": model, "description": "JSON; with `stream`, server-sent events of chunks "
                                                "ending in `data: [DONE]`"}}


def create_app(config: FrontendConfig, engine: EngineClient, tokenizer: Tokenizer,
               drain: DrainState | None = None) -> FastAPI:
    """The API of the engine's model, under the engine's name; `engine` must be connected (see
    `EngineClient.connect`).

    `drain` is how the server tells the app to stop taking requests (see `DrainState`)."""
    app = FastAPI(title="sfllm", description="OpenAI-compatible LLM server")
    install_error_handlers(app)
    drain = drain or DrainState()
    assert engine.hello is not None, "create_app needs a connected engine"
    served_model_name = engine.hello.model_name
    metrics = FrontendMetrics(engine, drain, served_model_name, engine.hello.max_context_length)
    # Outermost last: metrics see every answer, the key is checked before the body is read.
    app.add_middleware(UnexpectedErrorMiddleware)
    app.add_middleware(RequestGateMiddleware, drain=drain, max_body_bytes=config.max_request_body_bytes)
    if config.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=config.api_key)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    if config.allow_credentials and "*" in config.allowed_origins:
        logger.warning("allow_credentials with any origin: every page a user opens may call this API with their "
                       "cookies (the page's origin is echoed back); --allowed-origins names the ones to trust")
    app.add_middleware(RequestIdHeaderMiddleware)
    # outermost: a browser's preflight needs no key, and refusals (401, 413, 503) carry the headers it reads
    app.add_middleware(CORSMiddleware, allow_origins=config.allowed_origins, allow_methods=config.allowed_methods,
                       allow_headers=config.allowed_headers, allow_credentials=config.allow_credentials,
                       expose_headers=["X-Request-Id"])
    created = int(time.time())
    limits = RequestLimits.from_config(config)
    completion_endpoint = CompletionEndpoint(served_model_name, engine, tokenizer, limits, metrics)
    chat_endpoint = ChatCompletionEndpoint(served_model_name, engine, tokenizer, limits, metrics,
                                           config.reasoning_parser, config.tool_call_parser)
    responses_endpoint = ResponsesEndpoint(chat_endpoint)
    native_generate = NativeGenerateEndpoint(completion_endpoint)
    v1 = APIRouter(prefix="/v1")

    @v1.post("/completions", response_model=None, responses=_json_or_stream(CompletionResponse))
    async def create_completion(body: CompletionRequest, request: Request) -> Response:
        return await completion_endpoint(body, request)

    @v1.post("/chat/completions", response_model=None, responses=_json_or_stream(ChatCompletionResponse))
    async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
        return await chat_endpoint(body, request)

    @v1.post("/responses", response_model=None)
    async def create_response(body: ResponsesRequest, request: Request) -> Response:
        return await responses_endpoint(body, request)

    @v1.api_route("/responses/{response_id}", methods=["GET", "DELETE"], include_in_schema=False)
    @v1.api_route("/responses/{response_id}/{action}", methods=["GET", "POST"], include_in_schema=False)
    async def stored_response(response_id: str) -> Response:
        raise APIError(404, f"No response {response_id!r}: this server stores no response (each is answered once, "
                            "as with store false)", error_type="not_found_error", param="response_id")

    def model_card() -> ModelCard:
        max_model_len = engine.hello.max_context_length if engine.hello is not None else None
        return ModelCard(id=served_model_name, created=created, max_model_len=max_model_len)

    @v1.get("/models")
    async def list_models() -> ModelList:
        return ModelList(data=[model_card()])

    @v1.get("/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> ModelCard:
        if model_id != served_model_name:
            raise ModelNotFoundError(model_id, served_model_name)
        return model_card()

    app.include_router(v1)

    @app.get("/version")
    async def version() -> dict[str, str]:
        """vLLM's: the server's version."""
        return {"version": sfllm.__version__}

    @app.get("/get_model_info")
    async def get_model_info() -> dict[str, object]:
        """SGLang's, as its router and benchmark read it."""
        return {"model_path": served_model_name, "tokenizer_path": served_model_name, "is_generation": True,
                "max_context_length": model_card().max_model_len}

    @app.get("/get_server_info")
    @app.get("/server_info")
    async def get_server_info() -> JSONResponse:
        """SGLang's (and its newer name): the engine's limits under SGLang's names, from the engine's latest hello,
        as SGLang's benchmarks and routers read them."""
        hello = engine.hello
        return JSONResponse({
            "model_path": served_model_name, "tokenizer_path": served_model_name,
            "served_model_name": served_model_name, "context_length": hello.max_context_length,
            "page_size": hello.block_size, "max_total_num_tokens": hello.num_kv_blocks * hello.block_size,
            "max_running_requests": hello.max_running_requests, "chunked_prefill_size": hello.max_running_tokens,
            "tp_size": hello.tensor_parallel_size, "dp_size": 1, "disable_radix_cache": not hello.prefix_cache,
            "version": sfllm.__version__})

    tokenize_endpoints = TokenizeEndpoints(served_model_name, tokenizer, engine)

    @app.post("/generate", response_model=None)
    async def generate(body: NativeGenerateRequest, request: Request) -> Response:
        return await native_generate(body, request)

    @app.post("/abort_request")
    async def abort_request(body: AbortRequestBody) -> JSONResponse:
        """SGLang's: ends a /generate request by its rid, or every request this frontend runs (`abort_all`)."""
        return native_generate.abort(body)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        """A prompt's or a chat's token ids, as the completion endpoints would send them to the model."""
        return await tokenize_endpoints.tokenize(body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        """The text of token ids, special tokens included."""
        return await tokenize_endpoints.detokenize(body)

    @app.get("/health")
    async def health() -> JSONResponse:
        """Liveness: 200 with the engine's latest stats while it answers heartbeats, else 503.

        Never waits for generation; a draining frontend stays live until it exits."""
        stats = engine.stats
        if not engine.healthy or stats is None:
            return JSONResponse({"status": "unavailable", "engine_connected": engine.connected,
                                 "frontend_pid": os.getpid()}, status_code=503)
        return JSONResponse({"status": "ok", "running": stats.running, "waiting": stats.waiting,
                             "kv_blocks_total": stats.num_kv_blocks, "kv_blocks_free": stats.num_free_kv_blocks,
                             "kv_blocks_cached": stats.num_cached_kv_blocks, "batch_size": stats.batch_size,
                             "step_time_s": stats.step_time_s, "num_preemptions": stats.num_preemptions,
                             "frontend_requests_in_flight": engine.num_in_flight, "draining": drain.draining,
                             "frontend_pid": os.getpid()})

    @app.get("/health_generate")
    async def generation_health() -> JSONResponse:
        """SGLang's: 200 once the engine generated a token (within 20 s), else 503; behind the API key, as it
        costs a step."""
        return await health_generate(engine)

    @app.get("/ready")
    async def ready() -> JSONResponse:
        """Readiness: 200 once the engine said hello (model loaded, graphs captured) while it answers (as for
        /health); 503 while it is away or stalled, or once this frontend drains, so load balancers send no new
        requests."""
        if drain.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if engine.hello is None or not (engine.connected and engine.healthy):
            return JSONResponse({"status": "engine_unavailable"}, status_code=503)
        return JSONResponse({"status": "ready", "model": served_model_name})

    for path, probe in (("/health", health), ("/ready", ready)):  # probes that read only the status use HEAD
        app.add_api_route(path, probe, methods=["HEAD"], include_in_schema=False)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        """The server's metrics in Prometheus text format."""
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/start_profile")
    async def start_profile() -> JSONResponse:
        """Starts a PyTorch profiler trace in the worker; it is written to --profile-dir on /stop_profile."""
        return _engine_told(engine.set_profiling(True), "started")

    @app.post("/stop_profile")
    async def stop_profile() -> JSONResponse:
        return _engine_told(engine.set_profiling(False), "stopped")

    # vLLM's and SGLang's endpoints of pooling, scoring and classifying models: a clear 404 rather than "Not Found"
    for path in POOLING_PATHS:
        app.add_api_route(path, pooling_not_served, methods=["POST"], include_in_schema=False)

    # SGLang's name (its benchmark calls it before a run), and vLLM's
    @app.post("/flush_cache")
    @app.get("/flush_cache")
    @app.post("/reset_prefix_cache")
    async def flush_prefix_cache() -> JSONResponse:
        """Empties the prefix cache: requests sent after this answer find no cached prefix."""
        return _engine_told(engine.flush_prefix_cache(), "flushed")

    return app


POOLING_PATHS = ("/v1/embeddings", "/pooling", "/score", "/v1/score", "/rerank", "/v1/rerank", "/v2/rerank",
                 "/classify", "/encode")


async def pooling_not_served(request: Request) -> JSONResponse:
    raise APIError(404, f"{request.url.path} needs an embedding, scoring or reward model, which vLLM and SGLang serve "
                        "as such; this server serves generative models only", error_type="not_found_error",
                   code="endpoint_not_supported")


def _engine_told(sent: bool, state: str) -> JSONResponse:
    if sent:
        return JSONResponse({"status": state})
    return JSONResponse({"error": {"message": "the engine is not connected", "type": "service_unavailable_error",
                                   "param": None, "code": "engine_unavailable"}}, status_code=503)
