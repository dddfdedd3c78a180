"""The HTTP app: OpenAI's /v1/models, /v1/completions, /v1/chat/completions (with SSE
streaming), SageMaker's /ping and /invocations, /health and /metrics.

Every error is an OpenAI error body; malformed requests (bad JSON, missing or mistyped fields,
unknown model, limits) are 4xx. Generation runs in the engine's thread; handlers only encode,
check limits, submit and relay events.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Dict, List, Optional, Tuple

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from pipeline.config.app_schema import ServerConfig
from pipeline.server.engine import Delta, Engine, Failure, Finish, GenerationRequest
from pipeline.server.counters import Metrics
from pipeline.server.pool import ModelPool
from pipeline.server.protocol import APIError, ChatRequest, CompletionRequest, Sampling, validation_error

log = logging.getLogger(__name__)


class Service:
    """Turns validated requests into engine work and OpenAI responses."""

    def __init__(self, pool: ModelPool, cfg: ServerConfig, engine: Engine, metrics: Metrics):
        self.pool, self.cfg, self.engine, self.metrics = pool, cfg, engine, metrics
        self.tokenizer = pool.tokenizer

    def default_model(self) -> str:
        """SageMaker requests need not name a model: the first adapter, else the base."""
        return next(iter([n for n in self.pool.choices if n != self.pool.base_name] or [self.pool.base_name]))

    def check_model(self, name: str) -> str:
        if name not in self.pool.choices:
            raise APIError(404, f"the model {name!r} does not exist; available: "
                                f"{', '.join(self.pool.choices)}", "model", "model_not_found")
        return name

    def encode_chat(self, body: ChatRequest) -> List[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions",
                           "messages", "no_chat_template")

        def encode() -> List[int]:
            messages = [{"role": "system" if m.role == "developer" else m.role, "content": _encodable(m.text())}
                        for m in body.messages]
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]

        return _client_text(encode, "messages")

    def encode_completion(self, body: CompletionRequest) -> List[List[int]]:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise APIError(400, "prompt must not be empty", "prompt", "invalid_value")
        return _client_text(lambda: [self.tokenizer(_encodable(p))["input_ids"] for p in prompts], "prompt")

    def max_tokens(self, requested: Optional[int], prompts: List[List[int]], param: str) -> int:
        """The request's token budget, after checking prompt and generation limits."""
        limit = self.cfg.max_tokens_limit
        if requested is not None and requested > limit:
            raise APIError(400, f"max_tokens={requested} exceeds this server's limit of {limit}",
                           "max_tokens", "invalid_value")
        max_tokens = requested or self.cfg.default_max_tokens
        if not min(len(p) for p in prompts):
            raise APIError(400, "the prompt holds no token (an empty prompt, and this model adds no "
                                "start token); send some text", param, "invalid_value")
        longest = max(len(p) for p in prompts)
        if longest > self.cfg.max_prompt_tokens:
            raise APIError(400, f"the prompt has {longest} tokens; this server accepts at most "
                                f"{self.cfg.max_prompt_tokens}", param, "context_length_exceeded")
        context = self.pool.context_length
        if context and longest + max_tokens > context:
            if requested is not None:
                raise APIError(400, f"prompt ({longest} tokens) + max_tokens ({max_tokens}) exceeds "
                                    f"the model's context of {context} tokens", "max_tokens",
                               "context_length_exceeded")
            max_tokens = context - longest
        if max_tokens < 1:
            raise APIError(400, f"the prompt fills the model's context of {context} tokens", param,
                           "context_length_exceeded")
        return max_tokens

    async def run(self, model: str, prompts: List[List[int]], body: Sampling,
                  max_tokens: int) -> Tuple[List[GenerationRequest], AsyncIterator[Tuple[int, Any]]]:
        """Submits one engine request per prompt; returns them and their events as
        (choice index, event), ending after every row finished or at the first failure."""
        if body.n * len(prompts) > self.cfg.max_n:
            raise APIError(400, f"n x prompts = {body.n * len(prompts)} exceeds this server's limit "
                                f"of {self.cfg.max_n} completions per request", "n", "invalid_value")
        loop = asyncio.get_running_loop()
        events: "asyncio.Queue[Tuple[int, Any]]" = asyncio.Queue()
        requests = []
        for p, ids in enumerate(prompts):
            def emit(event: Any, p: int = p) -> None:
                loop.call_soon_threadsafe(events.put_nowait, (p, event))
            requests.append(GenerationRequest(model, ids, emit, body.n, max_tokens, body.temperature,
                                              body.top_p, body.seed, body.stops()))
        for request in requests:
            self.engine.submit(request)

        async def relay() -> AsyncIterator[Tuple[int, Any]]:
            open_rows = body.n * len(prompts)
            while open_rows:
                p, event = await events.get()
                if isinstance(event, Failure):
                    yield -1, event
                    return
                open_rows -= isinstance(event, Finish)
                yield p * body.n + event.index, event

        return requests, relay()

    async def complete(self, body: Sampling, prompts: List[List[int]], chat: bool) -> Response:
        model = self.check_model(body.model)
        body.refuse_unsupported()
        param = "messages" if chat else "prompt"
        # A chat field; a completion body may carry anything under that name (extra fields pass).
        requested = (body.max_completion_tokens if chat else None) or body.max_tokens
        max_tokens = self.max_tokens(requested, prompts, param)
        requests, events = await self.run(model, prompts, body, max_tokens)
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": model}
        prompt_tokens = sum(len(p) for p in prompts)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = self._stream(head, events, requests, chat, len(prompts) * body.n, prompt_tokens,
                                  include_usage)
            return StreamingResponse(stream, media_type="text/event-stream")
        return JSONResponse(await self._collect(head, events, chat, len(prompts) * body.n, prompt_tokens))

    async def _collect(self, head: Dict, events: AsyncIterator, chat: bool, rows: int,
                       prompt_tokens: int) -> Dict[str, Any]:
        texts, reasons, tokens = [""] * rows, ["length"] * rows, [0] * rows
        async for index, event in events:
            if isinstance(event, Failure):
                raise APIError(500, event.message, None, "generation_failed", "server_error")
            if isinstance(event, Delta):
                texts[index] += event.text
            else:
                reasons[index], tokens[index] = event.reason, event.completion_tokens
        self.metrics.count_tokens(prompt_tokens, sum(tokens))
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t},
                        "finish_reason": r, "logprobs": None} for i, (t, r) in enumerate(zip(texts, reasons))]
        else:
            choices = [{"index": i, "text": t, "finish_reason": r, "logprobs": None}
                       for i, (t, r) in enumerate(zip(texts, reasons))]
        return {**head, "object": "chat.completion" if chat else "text_completion", "choices": choices,
                "usage": _usage(prompt_tokens, sum(tokens))}

    async def _stream(self, head: Dict, events: AsyncIterator, requests: List[GenerationRequest],
                      chat: bool, rows: int, prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(index: int, text: Optional[str], reason: Optional[str], role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                choice = {"index": index, "delta": delta, "finish_reason": reason, "logprobs": None}
            else:
                choice = {"index": index, "text": text or "", "finish_reason": reason, "logprobs": None}
            return _sse({**head, "object": obj, "choices": [choice]})

        completion_tokens = 0
        try:
            if chat:
                for index in range(rows):
                    yield chunk(index, None, None, role=True)
            async for index, event in events:
                if isinstance(event, Failure):
                    yield _sse(APIError(500, event.message, None, "generation_failed", "server_error").body())
                    break
                if isinstance(event, Delta):
                    yield chunk(index, event.text, None)
                else:
                    completion_tokens += event.completion_tokens
                    yield chunk(index, None, event.reason)
            else:
                self.metrics.count_tokens(prompt_tokens, completion_tokens)
                if include_usage:
                    yield _sse({**head, "object": obj, "choices": [],
                                "usage": _usage(prompt_tokens, completion_tokens)})
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or we finished): stop generating for it
            for request in requests:
                request.cancelled = True


def _encodable(text: str) -> str:
    """``text`` if it is valid Unicode; JSON can carry lone UTF-16 surrogates (``"\\ud800"``),
    which no tokenizer encodes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise APIError(400, f"the text holds a character that is not valid Unicode ({err.reason}: "
                            f"{text[err.start:err.end]!a} at position {err.start})", None, "invalid_value") from None
    return text


def _client_text(encode: Any, param: str) -> Any:
    """Runs the tokenization of client text: any failure there is the request's fault (400),
    never a 500 that would also close the client's connection."""
    try:
        return encode()
    except APIError as err:
        err.param = err.param or param
        raise
    except Exception as err:
        raise APIError(400, f"the {param} could not be tokenized: {type(err).__name__}: {err}", param,
                       "invalid_value") from None


def _contained(endpoint: Any) -> Any:
    """An endpoint whose unexpected errors answer an OpenAI 500 body from within the app:
    Starlette's last-resort handler re-raises, and the server then drops the connection."""
    @functools.wraps(endpoint)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await endpoint(*args, **kwargs)
        except (APIError, HTTPException, RequestValidationError):
            raise
        except Exception as err:
            log.exception("internal error")
            raise APIError(500, f"internal error: {type(err).__name__}", None, "internal_error",
                           "server_error") from None

    return wrapper


def _usage(prompt: int, completion: int) -> Dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(payload: Dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _error_response(error: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


class MetricsMiddleware:
    """Counts every response by path and status and times it to its last byte (streams too)."""

    PATHS = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/invocations", "/ping",
             "/health", "/metrics")

    def __init__(self, app: Any, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), {"code": 500}

        async def timed_send(message: Dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            path = scope["path"] if scope["path"] in self.PATHS else "other"
            self.metrics.request(path, status["code"], time.perf_counter() - start)


def _authorizer(api_key: Optional[str]) -> Callable[[Request], None]:
    """The dependency that checks ``Authorization: Bearer <api_key>`` (nothing when None)."""

    def authorize(request: Request) -> None:
        if not api_key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key: send the header Authorization: Bearer <key>",
                           None, "invalid_api_key")

    return authorize


def create_app(pool: ModelPool, cfg: ServerConfig, api_key: Optional[str]) -> FastAPI:
    """The app serving ``pool``; ``api_key`` (None: open) guards /v1 and /invocations."""
    metrics = Metrics()
    engine = Engine(pool, cfg.max_batch_size, cfg.max_wait_ms / 1000, metrics.batch)
    service = Service(pool, cfg, engine, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await run_in_threadpool(engine.close)  # queued work finishes before the process exits

    app = FastAPI(title="pipeline", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    _error_handlers(app)

    guarded = [Depends(_authorizer(api_key))]

    @app.get("/v1/models", dependencies=guarded)
    async def list_models() -> Dict[str, Any]:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "pipeline",
             "root": pool.base_name, "parent": choice.parent} for name, choice in pool.choices.items()]}

    @app.post("/v1/completions", dependencies=guarded)
    @_contained
    async def completions(body: CompletionRequest) -> Response:
        return await service.complete(body, service.encode_completion(body), chat=False)

    @app.post("/v1/chat/completions", dependencies=guarded)
    @_contained
    async def chat_completions(body: ChatRequest) -> Response:
        return await service.complete(body, [service.encode_chat(body)], chat=True)

    @app.post("/invocations", dependencies=guarded)
    @_contained
    async def invocations(request: Request) -> Response:
        return await _invocation(service, await request.body())

    @app.get("/ping")
    async def ping() -> Response:
        return Response(status_code=200)

    @app.get("/health")
    async def health() -> Dict[str, Any]:
        return {"status": "ok", "models": list(pool.choices), "queued": engine.pending()}

    @app.get("/metrics")
    async def metrics_text() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(engine.pending()), media_type="text/plain; version=0.0.4")

    return app


async def _invocation(service: Service, raw: bytes) -> Response:
    """SageMaker's single endpoint: a chat body (``messages``) or a completion body (``prompt``);
    ``model`` may be left out (the first adapter, else the base)."""
    try:
        payload = json.loads(raw or b"null")
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError, too deep
        raise APIError(400, f"the request body is not valid JSON: {err}", None, "invalid_json")
    if not isinstance(payload, dict):
        raise APIError(400, "the request body must be a JSON object with messages or prompt", None,
                       "invalid_value")
    payload.setdefault("model", service.default_model())
    chat = "messages" in payload
    try:
        body = (ChatRequest if chat else CompletionRequest).model_validate(payload)
    except ValidationError as err:
        raise validation_error(err.errors()) from None
    if chat:
        return await service.complete(body, [service.encode_chat(body)], chat=True)
    return await service.complete(body, service.encode_completion(body), chat=False)


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return _error_response(err)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        return _error_response(validation_error(list(err.errors())))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return _error_response(APIError(err.status_code, str(err.detail), None, code))

    @app.exception_handler(Exception)
    async def internal(request: Request, err: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        return _error_response(APIError(500, f"internal error: {type(err).__name__}", None,
                                        "internal_error", "server_error"))
