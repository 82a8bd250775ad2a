"""The ASGI app: OpenAI's chat and completions endpoints over a ``SchedulerBridge``, and a health check.

``create_app(service)`` returns a Starlette app with

* ``GET /v1/models`` (and ``/v1/models/{id}``): the one model served, under ``service.model_id``;
* ``POST /v1/chat/completions``: messages rendered with the model's chat template (generation prompt added);
* ``POST /v1/completions``: a prompt string or token ids, no template;
* ``GET /health``: 200 with the scheduler's statistics (running, waiting, KV tokens free, …; ``speculation``:
  with speculative decoding, ``compute.speculation.SpeculationStats.as_dict`` summed over the replies that ended,
  tokens per target pass and the draft's share of the time included; else null) while the server serves; 503
  once the engine failed or while shutting down. It needs no API key.

Both generation endpoints answer with one JSON object, or with ``"stream": true`` as server-sent events:
``chat.completion.chunk`` / ``text_completion`` objects, then ``data: [DONE]``; with
``stream_options.include_usage`` every chunk has ``"usage": null`` and one last chunk with no choices carries
the usage. For a model that thinks (``compute.serve.text.thinks``) the chat reply's reasoning goes to
``reasoning_content`` and the answer to ``content``, in the message and in the deltas. Finish reasons: "stop"
(EOS or a stop string), "length" (``max_tokens`` or the context is full), "abort" (cancelled by a shutdown).

With ``service.api_key`` set, every ``/v1`` request needs ``Authorization: Bearer KEY`` (compared in
constant time). Every error is OpenAI's error JSON (``compute.serve.errors``). A streamed reply whose engine
fails half-way ends with an ``{"error": …}`` event, then ``[DONE]``. A client that disconnects has its
request cancelled, streamed or not.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hmac
import json
import logging
from collections.abc import AsyncIterator

import anyio
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from compute.chat import Tokenizer
from compute.engine import FinishReason
from compute.scheduler import ErrorEvent, FinishEvent, TokenEvent
from compute.serve.bridge import Generation, SchedulerBridge
from compute.serve.errors import (
    MAX_BODY_BYTES,
    APIError,
    invalid_request,
    model_not_found,
    server_error,
    unauthorized,
    unavailable,
)
from compute.serve.schemas import (
    ChatRequest,
    ResponseIds,
    SamplingDefaults,
    Usage,
    chat_chunk,
    chat_completion,
    parse_chat,
    parse_completion,
    sampling_params,
    stop_strings,
    text_completion,
    usage_chunk,
)
from compute.serve.text import Delta, ReplyText, prompt_opens_reasoning, thinks

log = logging.getLogger(__name__)

FINISH_REASONS = {
    FinishReason.EOS: "stop",
    FinishReason.LENGTH: "length",
    FinishReason.CONTEXT: "length",  # the KV cache is full: as OpenAI says for the context limit
    FinishReason.STOPPED: "abort",  # only the server cancels a request whose client still listens: a shutdown
}
# How long a stream may take to end by itself after a shutdown began, beyond the server's grace, before
# sse-starlette cancels it.
STREAM_EXIT_MARGIN_S = 5.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Service:
    """Everything the handlers need."""

    bridge: SchedulerBridge
    tokenizer: Tokenizer
    model_id: str  # the name clients use in "model"
    defaults: SamplingDefaults
    api_key: str | None  # None: no key needed
    shutdown_grace_s: float  # how long running requests may go on after a shutdown began


@dataclasses.dataclass(frozen=True)
class Finished:
    finish_reason: str  # OpenAI's
    usage: Usage


def create_app(service: Service) -> Starlette:
    routes = [
        Route("/health", functools.partial(_health, service), methods=["GET"]),
        Route("/v1/models", functools.partial(_models, service), methods=["GET"]),
        Route("/v1/models/{model_id:path}", functools.partial(_model, service), methods=["GET"]),
        Route("/v1/chat/completions", functools.partial(_chat, service), methods=["POST"]),
        Route("/v1/completions", functools.partial(_completion, service), methods=["POST"]),
    ]
    handlers = {APIError: _api_error, HTTPException: _http_error, Exception: _unexpected_error}
    return Starlette(routes=routes, exception_handlers=handlers)


async def _api_error(request: Request, error: APIError) -> Response:
    return error.response()


async def _http_error(request: Request, error: HTTPException) -> Response:
    kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
    message = f"{request.method} {request.url.path}: {error.detail}"
    return APIError(error.status_code, message, type=kind).response()


async def _unexpected_error(request: Request, error: Exception) -> Response:
    log.exception("%s %s failed", request.method, request.url.path)
    return server_error(f"internal error: {type(error).__name__}: {error}").response()


async def _health(service: Service, request: Request) -> Response:
    bridge = service.bridge
    if bridge.failure is not None:
        return JSONResponse({"status": "failed", "error": bridge.failure}, status_code=503)
    stats = bridge.scheduler.stats()
    speculation = stats.speculation.as_dict() if stats.speculation is not None else None
    status, code = ("shutting_down", 503) if bridge.closing else ("ok", 200)
    body = {"status": status, "model": service.model_id, **dataclasses.asdict(stats), "speculation": speculation}
    return JSONResponse(body, status_code=code)


def _authorize(service: Service, request: Request) -> None:
    if service.api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key:
        raise unauthorized("No API key: send it in an 'Authorization: Bearer KEY' header")
    if not hmac.compare_digest(key.strip().encode(), service.api_key.encode()):
        raise unauthorized("Incorrect API key")


def _model_object(service: Service) -> dict:
    return {"id": service.model_id, "object": "model", "created": 0, "owned_by": "spillover"}


async def _models(service: Service, request: Request) -> Response:
    _authorize(service, request)
    return JSONResponse({"object": "list", "data": [_model_object(service)]})


async def _model(service: Service, request: Request) -> Response:
    _authorize(service, request)
    model_id = request.path_params["model_id"]
    if model_id != service.model_id:
        raise model_not_found(model_id, service.model_id)
    return JSONResponse(_model_object(service))


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    too_large = APIError(413, f"the body is larger than {MAX_BODY_BYTES} bytes", type="invalid_request_error")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise too_large
    return bytes(body)


def _check_model(service: Service, model: str) -> None:
    if model != service.model_id:
        raise model_not_found(model, service.model_id)


def _render_chat(service: Service, request: ChatRequest) -> list[int]:
    # "developer" is OpenAI's newer name for the system role; templates know "system".
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in request.messages
    ]
    if not getattr(service.tokenizer, "chat_template", None):
        raise invalid_request("this model's tokenizer has no chat template: use /v1/completions", param="messages")
    try:
        encoded = service.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )
    except Exception as e:  # the template's own raise_exception (e.g. roles that do not alternate)
        raise invalid_request(f"the chat template refused the messages: {e}", param="messages") from None
    return list(encoded["input_ids"])


async def _chat(service: Service, request: Request) -> Response:
    _authorize(service, request)
    chat = parse_chat(await _read_body(request))
    _check_model(service, chat.model)
    prompt_ids = _render_chat(service, chat)
    max_tokens = chat.max_completion_tokens if chat.max_completion_tokens is not None else chat.max_tokens
    params = sampling_params(chat, service.defaults, max_tokens=max_tokens)
    reasoning = prompt_opens_reasoning(service.tokenizer, prompt_ids) if thinks(service.tokenizer) else None
    text = ReplyText(service.tokenizer, stop=stop_strings(chat), reasoning=reasoning)
    generation = service.bridge.submit(prompt_ids, params, param="messages")
    ids = ResponseIds("chatcmpl", service.model_id)
    if chat.stream:
        include_usage = chat.stream_options is not None and chat.stream_options.include_usage
        return _event_stream(service, generation, _chat_chunks(generation, text, ids, include_usage))
    finished, delta = await _until_finished(request, generation, text)
    return JSONResponse(
        chat_completion(
            ids,
            content=delta.content,
            reasoning=delta.reasoning if reasoning is not None else None,
            finish_reason=finished.finish_reason,
            usage=finished.usage,
        )
    )


def _completion_prompt(service: Service, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        if not prompt:
            raise invalid_request("the prompt is empty", param="prompt")
        return list(service.tokenizer(prompt)["input_ids"])
    known = len(service.tokenizer)
    bad = [t for t in prompt if t >= known]
    if bad:
        raise invalid_request(f"prompt token ids {bad[:5]} are not in the tokenizer's [0, {known})", param="prompt")
    return prompt


async def _completion(service: Service, request: Request) -> Response:
    _authorize(service, request)
    completion = parse_completion(await _read_body(request))
    _check_model(service, completion.model)
    prompt_ids = _completion_prompt(service, completion.prompt_value())
    params = sampling_params(completion, service.defaults, max_tokens=completion.max_tokens)
    text = ReplyText(service.tokenizer, stop=stop_strings(completion))
    generation = service.bridge.submit(prompt_ids, params, param="prompt")
    ids = ResponseIds("cmpl", service.model_id)
    if completion.stream:
        include_usage = completion.stream_options is not None and completion.stream_options.include_usage
        return _event_stream(service, generation, _completion_chunks(generation, text, ids, include_usage))
    finished, delta = await _until_finished(request, generation, text)
    return JSONResponse(
        text_completion(ids, text=delta.content, finish_reason=finished.finish_reason, usage=finished.usage)
    )


async def _reply(generation: Generation, text: ReplyText) -> AsyncIterator[Delta | Finished]:
    """The reply's text deltas as they come, then one ``Finished``; an engine failure raises ``APIError``."""
    async for event in generation.events():
        if isinstance(event, TokenEvent):
            delta = text.add(event.token_id)
            if text.stopped:
                # The reply is complete: answer now, and let the scheduler drop the sequence at its next pass.
                generation.cancel()
                tail = text.finish()
                yield Delta(delta.reasoning + tail.reasoning, delta.content + tail.content)
                yield Finished("stop", Usage(prompt_tokens=generation.prompt_tokens, completion_tokens=text.tokens))
                return
            if delta:
                yield delta
        elif isinstance(event, FinishEvent):
            tail = text.finish()
            if tail:
                yield tail
            usage = Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens)
            yield Finished(FINISH_REASONS[event.finish_reason], usage)
        elif isinstance(event, ErrorEvent):
            if event.fatal:
                raise unavailable(f"the engine has stopped: {event.message}")
            raise server_error(f"the request failed: {event.message}")


async def _until_finished(request: Request, generation: Generation, text: ReplyText) -> tuple[Finished, Delta]:
    """The whole reply, for a response that is not streamed; a client that disconnects meanwhile cancels it."""

    async def collect() -> tuple[Finished, Delta]:
        whole = Delta()
        async for item in _reply(generation, text):
            if isinstance(item, Finished):
                return item, whole
            whole.reasoning += item.reasoning
            whole.content += item.content
        raise server_error("the reply ended without a finish event")

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    reply = asyncio.ensure_future(collect())
    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({reply, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not reply.done():
            reply.cancel()
            generation.cancel()
    if not reply.done() or reply.cancelled():
        raise invalid_request("the client disconnected before the reply was complete")  # nobody reads it
    return reply.result()


def _event_stream(service: Service, generation: Generation, chunks: AsyncIterator[dict | str]) -> Response:
    async def events() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield chunk if isinstance(chunk, str) else json.dumps(chunk, ensure_ascii=False, separators=(",", ":"))
        except APIError as e:
            yield json.dumps(e.body(), ensure_ascii=False, separators=(",", ":"))
            yield "[DONE]"
        finally:
            generation.cancel()  # the client went away (a no-op when the reply ended)

    # A shutdown ends each stream through the bridge (cancelled after the grace, then "abort" and [DONE]);
    # sse-starlette cuts a stream only if that has not happened in time.
    return EventSourceResponse(
        events(),
        sep="\n",
        ping=15,
        shutdown_event=anyio.Event(),
        shutdown_grace_period=service.shutdown_grace_s + STREAM_EXIT_MARGIN_S,
    )


async def _chat_chunks(
    generation: Generation, text: ReplyText, ids: ResponseIds, include_usage: bool
) -> AsyncIterator[dict | str]:
    yield chat_chunk(ids, {"role": "assistant", "content": ""}, with_usage=include_usage)
    async for item in _reply(generation, text):
        if isinstance(item, Finished):
            yield chat_chunk(ids, {}, finish_reason=item.finish_reason, with_usage=include_usage)
            if include_usage:
                yield usage_chunk(ids, "chat.completion.chunk", item.usage)
            break
        delta = {}
        if item.reasoning:
            delta["reasoning_content"] = item.reasoning
        if item.content:
            delta["content"] = item.content
        if delta:
            yield chat_chunk(ids, delta, with_usage=include_usage)
    yield "[DONE]"


async def _completion_chunks(
    generation: Generation, text: ReplyText, ids: ResponseIds, include_usage: bool
) -> AsyncIterator[dict | str]:
    def chunk(piece: str, finish_reason: str | None) -> dict:
        body = text_completion(ids, text=piece, finish_reason=finish_reason, usage=None)
        return {**body, "usage": None} if include_usage else body

    async for item in _reply(generation, text):
        if isinstance(item, Finished):
            yield chunk("", item.finish_reason)
            if include_usage:
                yield usage_chunk(ids, "text_completion", item.usage)
            break
        if item.content:
            yield chunk(item.content, None)
    yield "[DONE]"
