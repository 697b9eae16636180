"""FastAPI routes: OpenAI's chat and text completions (streaming or not), models, health and metrics."""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from niyama import __version__
from niyama.engine.core import StepOutput
from niyama.engine.sampler import SEED_RANGE, SamplingParams
from niyama.engine.tokenizer import Tokenizer
from niyama.qos import QoSError
from niyama.request import Request as EngineRequest
from niyama.server.async_engine import AsyncEngine, QueueFull, Unavailable
from niyama.server.protocol import ChatCompletionRequest, CompletionRequest, SamplingRequest
from niyama.server.qos_mapping import QoSPolicy

QOS_HEADER = "X-Niyama-QoS"
DISCONNECT_POLL_SECONDS = 0.5  # how often a non-streaming request checks that its client is still there
MAX_STOP_SEQUENCES = 64  # OpenAI takes 4, vLLM any number; each is searched for after every token


class APIError(Exception):
    """An error answered in OpenAI's shape ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type, self.headers = type_, headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> Response:
        # ASCII-escaped JSON: a message may quote the client's own text, lone surrogates included, which
        # JSONResponse's UTF-8 encoding cannot carry.
        return Response(json.dumps(self.body()), status_code=self.status, headers=self.headers,
                        media_type="application/json")


@dataclass
class ServerState:
    engine: AsyncEngine
    tokenizer: Tokenizer
    policy: QoSPolicy
    model_name: str
    max_model_len: int
    vocab_size: int  # token ids a prompt may hold: [0, vocab_size)


def create_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.engine.start()
        yield
        state.engine.stop()

    app = FastAPI(title="Niyama", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible LLM server with per-request QoS (TTFT/TBT/TTLT deadlines).")

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> Response:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> Response:
        err = e.errors()[0]
        if err["type"] == "json_invalid":
            return APIError(400, f"the request body is not valid JSON: {err['ctx']['error']}").response()
        if tuple(err["loc"]) == ("body",):  # empty, or not sent as JSON (curl -d without a JSON content type)
            return APIError(400, "the request body must be a JSON object, sent with Content-Type: "
                            "application/json").response()
        err = _deepest(e.errors(), err)
        param = _param(err["loc"][1:])
        return APIError(400, f"{param}: {err['msg']}" if param else err["msg"], param).response()

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException) -> Response:
        code = "not_found" if e.status_code == 404 else None
        return APIError(e.status_code, str(e.detail), code=code, headers=e.headers).response()

    @app.exception_handler(Exception)
    async def internal_error(_: Request, e: Exception) -> Response:
        return APIError(500, f"internal error: {type(e).__name__}: {e}", type_="server_error").response()

    @app.api_route("/health", methods=["GET", "HEAD"])  # HEAD: load balancers' and probes' cheap check
    async def health() -> JSONResponse:
        if not state.engine.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def model_card() -> dict[str, Any]:
        return {"id": state.model_name, "object": "model", "created": 0, "owned_by": "niyama",
                "max_model_len": state.max_model_len}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict[str, Any]:
        if model != state.model_name:
            raise _unknown_model(model, state.model_name)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: Request,
                               x_niyama_qos: str | None = Header(default=None)) -> Response:
        _check_request(state, body)
        if not body.messages:
            raise APIError(400, "messages must not be empty", "messages")
        if unsupported := body.unsupported_part():
            param, kind = unsupported
            raise APIError(400, f"content parts of type {kind!r} are not supported (this model reads text only)",
                           param, "unsupported_parameter")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        ids = await _tokenize(state.tokenizer.chat, messages, "messages")
        return await _complete(state, http, body, ids, x_niyama_qos, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request,
                          x_niyama_qos: str | None = Header(default=None)) -> Response:
        _check_request(state, body)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):  # a list of prompts
            if len(prompt) != 1:
                raise APIError(400, "only one prompt per request is supported", "prompt")
            prompt = prompt[0]
        ids = await _tokenize(state.tokenizer.encode, prompt, "prompt") if isinstance(prompt, str) else list(prompt)
        bad = [t for t in ids if not 0 <= t < state.vocab_size]
        if bad:
            raise APIError(400, f"the prompt holds token id {bad[0]}, outside this model's vocabulary "
                           f"[0, {state.vocab_size})", "prompt")
        return await _complete(state, http, body, ids, x_niyama_qos, chat=False)

    return app


def _unknown_model(model: str, served: str) -> APIError:
    return APIError(404, f"the model {model!r} does not exist (served: {served!r})", "model", "model_not_found")


def _check_request(state: ServerState, body: ChatCompletionRequest | CompletionRequest) -> None:
    """What can be refused before the prompt is read: the model name, unimplemented fields, stream options."""
    if body.model != state.model_name:
        raise _unknown_model(body.model, state.model_name)
    if field := body.unsupported():
        raise APIError(400, f"{field} is not supported by this server", field, "unsupported_parameter")
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", "stream_options")


async def _tokenize(tokenize: Callable[[Any], list[int]], text: Any, param: str) -> list[int]:
    """Token ids of a prompt, computed off the event loop: a long prompt takes seconds to tokenize, and
    every open stream would wait for it. Concurrent calls are safe: a fast tokenizer is only mutated when a
    call changes its truncation or padding, which no call here does."""
    try:
        return await asyncio.to_thread(tokenize, text)
    except (TypeError, UnicodeError):  # what the tokenizer raises for text with a lone surrogate (JSON's \ud800)
        raise APIError(400, f"the {param} is not valid Unicode text (a lone surrogate?)", param) from None
    except (ValueError, TemplateError) as e:
        raise APIError(400, f"the {param} cannot be tokenized: {e}", param) from None


def _sampling_params(body: SamplingRequest, num_prompt_tokens: int, max_model_len: int) -> SamplingParams:
    """Sampling parameters, each checked so that the error names its field."""
    if body.n != 1:
        raise APIError(400, "only n=1 is supported", "n")
    if not 0 <= body.temperature <= 2:
        raise APIError(400, f"temperature must be in [0, 2], got {body.temperature}", "temperature")
    if not 0 < body.top_p <= 1:
        raise APIError(400, f"top_p must be in (0, 1], got {body.top_p}", "top_p")
    if body.top_k < -1:
        raise APIError(400, f"top_k must be >= 0 (or -1, as vLLM takes it: no limit), got {body.top_k}", "top_k")
    if body.seed is not None and body.seed not in SEED_RANGE:
        raise APIError(400, f"seed must be in [-2^63, 2^64), got {body.seed}", "seed")
    if num_prompt_tokens < 1:
        raise APIError(400, "the prompt is empty", "prompt")
    if num_prompt_tokens >= max_model_len:
        raise APIError(400, f"the prompt has {num_prompt_tokens} tokens; this model's context is "
                       f"{max_model_len}", "messages" if isinstance(body, ChatCompletionRequest) else "prompt",
                       "context_length_exceeded")
    name, max_tokens = "max_tokens", body.max_tokens
    if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None:
        name, max_tokens = "max_completion_tokens", body.max_completion_tokens
    if max_tokens is None:
        max_tokens = max_model_len - num_prompt_tokens
    if max_tokens < 1:
        raise APIError(400, f"{name} must be at least 1, got {max_tokens}", name)
    if num_prompt_tokens + max_tokens > max_model_len:
        raise APIError(400, f"prompt ({num_prompt_tokens} tokens) + {name} ({max_tokens}) exceeds this "
                       f"model's context of {max_model_len} tokens", name, "context_length_exceeded")
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if len(stop) > MAX_STOP_SEQUENCES:
        raise APIError(400, f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stop)}", "stop")
    return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                          top_k=max(body.top_k, 0),
                          seed=body.seed, stop=stop, ignore_eos=body.ignore_eos)


async def _complete(state: ServerState, http: Request, body: SamplingRequest, prompt_ids: list[int],
                    header: str | None, chat: bool) -> Response:
    params = _sampling_params(body, len(prompt_ids), state.max_model_len)
    try:
        qos = state.policy.resolve(body.qos, header, body.service_tier)
    except QoSError as e:
        raise APIError(400, str(e), e.field, "invalid_qos") from None
    prefix = "chatcmpl" if chat else "cmpl"
    request = EngineRequest(f"{prefix}-{uuid.uuid4().hex}", time.monotonic(), qos, len(prompt_ids),
                            params.max_tokens, prompt_ids, priority=body.priority)
    try:
        outputs = state.engine.submit(request, params)
    except QueueFull:
        state.engine.metrics.observe_rejected(qos.name)
        raise APIError(429, "the server's request queue is full; retry later", None, "queue_full",
                       "rate_limit_error", {"Retry-After": "1"}) from None
    except Unavailable as e:
        raise _engine_error(e) from None
    head = {"id": request.request_id, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": state.model_name,
            "service_tier": state.policy.tier_of(qos, body.service_tier)}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        abort = partial(state.engine.abort, request.request_id)
        return StreamingResponse(_stream(head, outputs, chat, include_usage, abort), media_type="text/event-stream")
    collecting = asyncio.ensure_future(_collect(outputs))
    while not (await asyncio.wait({collecting}, timeout=DISCONNECT_POLL_SECONDS))[0]:
        if await http.is_disconnected():  # nobody will read the answer: stop computing it
            collecting.cancel()  # leaving the outputs early aborts the request and frees its KV blocks
            return Response(status_code=499)
    try:
        text, last = collecting.result()
    except (ValueError, RuntimeError) as e:
        raise _engine_error(e) from None
    r = last.request
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": "".join(text)}, "logprobs": None,
                  "finish_reason": _finish_reason(r)}
    else:
        choice = {"index": 0, "text": "".join(text), "logprobs": None, "finish_reason": _finish_reason(r)}
    return JSONResponse({**head, "choices": [choice], "usage": _usage(r), "niyama": niyama_info(r)})


async def _collect(outputs: AsyncIterator[StepOutput]) -> tuple[list[str], StepOutput]:
    """All text pieces of a request and its last output."""
    text, last = [], None
    async for out in outputs:
        text.append(out.text)
        last = out
    assert last is not None
    return text, last


async def _stream(head: dict[str, Any], outputs: AsyncIterator[StepOutput], chat: bool,
                  include_usage: bool, abort: Callable[[], None]) -> AsyncIterator[str]:
    """Server-sent events: one chunk per new piece of text, the finish reason and ``niyama`` on the
    last, then usage (when asked) and ``[DONE]``. A client that leaves early aborts the request, even
    before ``outputs`` is first read (a generator that never started cannot clean up after itself)."""
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

    def event(choices: list[dict[str, Any]], **extra: Any) -> str:
        return f"data: {json.dumps({**head, 'choices': choices, **extra})}\n\n"

    def choice(text: str, finish: str | None, role: bool = False) -> dict[str, Any]:
        if not chat:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        delta = {"role": "assistant", "content": text} if role else ({"content": text} if text else {})
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    ended = False
    try:
        if chat:
            yield event([choice("", None, role=True)])
        try:
            async for out in outputs:
                if out.finished:
                    ended = True
                    r = out.request
                    yield event([choice(out.text, _finish_reason(r))], niyama=niyama_info(r))
                    if include_usage:
                        yield event([], usage=_usage(r))
                elif out.text:
                    yield event([choice(out.text, None)])
        except (ValueError, RuntimeError) as e:
            ended = True
            yield f"data: {json.dumps(_engine_error(e).body())}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        if not ended:
            abort()


def _engine_error(e: Exception) -> APIError:
    """The engine refused the request (ValueError: 400), is not serving (503) or failed while running it
    (500)."""
    if isinstance(e, ValueError):
        return APIError(400, str(e))
    if isinstance(e, Unavailable):
        return APIError(503, str(e), type_="server_error", code="unavailable")
    return APIError(500, str(e), type_="server_error")


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _deepest(errors: list[dict[str, Any]], first: dict[str, Any]) -> dict[str, Any]:
    """Of the errors about ``first``'s field, the one deepest inside it. A union field (``prompt``, a message's
    ``content``) gets one error per member type, the first for the ``str`` member ("Input should be a valid
    string"), while the deepest names what is wrong inside the list the client sent."""
    field = first["loc"][:2]
    same = [e for e in errors if e["loc"][:2] == field]
    return max(same, key=lambda e: len((_param(e["loc"]) or "").split(".")))  # the first of the deepest


def _param(loc: tuple[int | str, ...]) -> str | None:
    """A field path from pydantic's error location, without the union-member tags it inserts
    (``stop.list[str].0`` → ``stop.0``)."""
    return ".".join(str(p) for p in loc if not (isinstance(p, str) and ("[" in p or p in _TYPE_TAGS))) or None


def _finish_reason(r: EngineRequest) -> str:
    return r.finish_reason.value if r.finish_reason else "stop"


def _usage(r: EngineRequest) -> dict[str, int]:
    return {"prompt_tokens": r.num_prompt_tokens, "completion_tokens": r.num_output_tokens,
            "total_tokens": r.num_prompt_tokens + r.num_output_tokens}


def niyama_info(r: EngineRequest) -> dict[str, Any]:
    """The ``niyama`` object of a finished request: its class and how it fared against its SLO."""
    return {
        "class": r.qos.name,
        "qos": {"ttft": r.qos.ttft, "tbt": r.qos.tbt, "ttlt": r.qos.ttlt, "importance": r.qos.importance.name.lower()},
        "ttft": r.ttft,
        "max_token_lateness": r.max_lateness if math.isfinite(r.max_lateness) else None,
        "slo_met": r.slo_met,
        "tbt_met": r.tbt_met,
        "relegated": r.relegated,
        "queue_time": r.queue_time,
        "num_preemptions": r.num_preemptions,
    }

