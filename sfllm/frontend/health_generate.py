"""SGLang's `GET /health_generate`: healthy once the engine has generated a token, the whole path through the
scheduler and the worker, not only the engine's heartbeats that `/health` reads. SGLang's routers and probes call
it."""
from __future__ import annotations

import asyncio
import uuid
from contextlib import aclosing

from fastapi.responses import JSONResponse

from sfllm.frontend.engine_client import EngineClient, EngineRequestError, EngineUnavailableError
from sfllm.frontend.errors import ServerShutdownError
from sfllm.messages import GenerateRequest
from sfllm.sampling_params import SamplingParams

HEALTH_GENERATE_TIMEOUT_S = 20.0  # SGLang's default wait


async def health_generate(engine: EngineClient) -> JSONResponse:
    """200 once one greedy token of a one-token prompt (id 0, as SGLang's) came back, high priority so that a full
    queue does not hold it; 503 saying why otherwise."""
    request = GenerateRequest(request_id=f"health-generate-{uuid.uuid4().hex}", prompt_token_ids=[0],
                              params=SamplingParams(max_tokens=1, temperature=0.0, detokenize=False),
                              priority="high")
    timeout_s = HEALTH_GENERATE_TIMEOUT_S
    try:
        async with asyncio.timeout(timeout_s):
            async with aclosing(engine.submit(request)) as outputs:
                async for output in outputs:
                    if output.finish_reason is not None:
                        break
    except TimeoutError:
        return _unhealthy(f"the engine generated no token within {timeout_s:g} s")
    except (EngineUnavailableError, EngineRequestError, ServerShutdownError) as error:
        return _unhealthy(str(error))
    return JSONResponse({"status": "ok"})


def _unhealthy(reason: str) -> JSONResponse:
    return JSONResponse({"status": "unhealthy", "reason": reason}, status_code=503)
