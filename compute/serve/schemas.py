"""The OpenAI request bodies the server accepts, checked, and the response objects it sends back.

Requests are parsed straight from the body's bytes with pydantic in strict mode (``parse_chat`` /
``parse_completion``): a number must be a JSON number, a string a JSON string, and every failure becomes one
``APIError`` 400 whose ``param`` names the offending field (``messages.1.content``). Fields OpenAI defines
that do not change the text (``user``, ``metadata``, ``store``, …) and unknown fields are ignored; fields that
would change it and are not supported (``n`` > 1, ``logprobs``, ``tools``, penalties other than 0, a
``response_format`` other than text, ``echo``, ``suffix``, ``best_of`` > 1, ``logit_bias``) are refused
with 400 rather than silently dropped. ``top_k`` and ``repetition_penalty`` are accepted as extensions (as
vLLM does).

Sampling fields a request leaves out take the server's defaults (``spillover serve --temperature …``,
``-n`` for the token limit); ``SamplingDefaults`` carries them. The response builders return plain dicts in
OpenAI's shapes (``chat.completion``, ``chat.completion.chunk``, ``text_completion``).
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from compute.sampling import SamplingParams
from compute.serve.errors import invalid_request

MAX_STOP_STRINGS = 16
MAX_SEED = 2**63 - 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingDefaults:
    """What a request gets for each sampling field it does not set (the server's command-line options)."""

    temperature: float  # 0 = greedy
    top_p: float  # 1 = off
    top_k: int  # 0 = off
    repetition_penalty: float  # 1 = off
    max_tokens: int  # the reply's token limit when neither max_tokens nor max_completion_tokens is given


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


StopStrings = str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP_STRINGS)] | None
Probability = Annotated[float, Field(gt=0, le=1)]


class _Sampling(_Strict):
    """The fields both endpoints share."""

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Probability | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None  # -1 or 0: off (vLLM's and HF's spellings)
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    stop: StopStrings = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


class ChatRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list | None = None
    functions: list | None = None
    response_format: dict | None = None


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(_Sampling):
    # a string, one token-id list, or a list holding exactly one of those (n = 1: one prompt per request)
    prompt: str | TokenIds | Annotated[list[str], Field(min_length=1, max_length=1)] | Annotated[
        list[TokenIds], Field(min_length=1, max_length=1)
    ]
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None

    def prompt_value(self) -> str | list[int]:
        """The one prompt: its text, or its token ids."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            return prompt[0]
        return prompt


def parse_chat(body: bytes) -> ChatRequest:
    request = _parse(ChatRequest, body)
    _refuse_unsupported(request)
    if request.logprobs:
        raise invalid_request("logprobs are not supported by this server", param="logprobs")
    if request.top_logprobs is not None:
        raise invalid_request("top_logprobs is not supported by this server", param="top_logprobs")
    if request.tools or request.functions:
        raise invalid_request("tools and function calling are not supported by this server", param="tools")
    if request.response_format is not None and request.response_format.get("type", "text") != "text":
        raise invalid_request("only response_format {\"type\": \"text\"} is supported", param="response_format")
    return request


def parse_completion(body: bytes) -> CompletionRequest:
    request = _parse(CompletionRequest, body)
    _refuse_unsupported(request)
    if request.echo:
        raise invalid_request("echo is not supported by this server", param="echo")
    if request.suffix:
        raise invalid_request("suffix is not supported by this server", param="suffix")
    if request.best_of not in (None, 1):
        raise invalid_request("best_of must be 1: this server returns one completion per request", param="best_of")
    if request.logprobs is not None:
        raise invalid_request("logprobs are not supported by this server", param="logprobs")
    return request


def _parse(model: type[BaseModel], body: bytes):
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        errors = e.errors(include_url=False)
    if errors[0]["type"] == "json_invalid":
        raise invalid_request(f"The body is not valid JSON: {errors[0]['msg']}")
    # A field that takes one of several types reports a failure per type ("stop" as a string, as a list): the
    # one that got furthest into the value says most; among equals, a wrong value says more than a wrong type.
    error = max(errors, key=lambda err: (len(err["loc"]), not err["type"].endswith("_type")))
    param = ".".join(str(part) for part in error["loc"] if not _is_union_branch(part)) or None
    where = f"'{param}'" if param else "the body"
    raise invalid_request(f"Invalid value for {where}: {error['msg']}", param=param)


UNION_BRANCHES = {"str", "int", "float", "bool", "constrained-str", "constrained-int", "constrained-float"}


def _is_union_branch(part) -> bool:
    """Whether a part of an error's location names a member of a union (``list[str]``) rather than a field."""
    return isinstance(part, str) and ("[" in part or part in UNION_BRANCHES)


def _refuse_unsupported(request: _Sampling) -> None:
    if request.n not in (None, 1):
        raise invalid_request(f"n must be 1: this server returns one choice per request (got {request.n})", param="n")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(request, name):
            raise invalid_request(f"{name} is not supported (use repetition_penalty)", param=name)
    if request.logit_bias:
        raise invalid_request("logit_bias is not supported by this server", param="logit_bias")
    if request.stream_options is not None and not request.stream:
        raise invalid_request("stream_options is only allowed when stream is true", param="stream_options")


def sampling_params(request: _Sampling, defaults: SamplingDefaults, *, max_tokens: int | None) -> SamplingParams:
    """The request's sampling, the server's defaults filling what it leaves out."""

    def pick(value, default):
        return default if value is None else value

    top_k = pick(request.top_k, defaults.top_k)
    return SamplingParams(
        temperature=pick(request.temperature, defaults.temperature),
        top_p=pick(request.top_p, defaults.top_p),
        top_k=max(top_k, 0),
        repetition_penalty=pick(request.repetition_penalty, defaults.repetition_penalty),
        seed=request.seed,
        max_new_tokens=pick(max_tokens, defaults.max_tokens),
    )


def stop_strings(request: _Sampling) -> tuple[str, ...]:
    if request.stop is None:
        return ()
    stops = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop)
    if any(not s for s in stops):
        raise invalid_request("a stop string must not be empty", param="stop")
    return stops


@dataclasses.dataclass(frozen=True, kw_only=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


class ResponseIds:
    """The id, creation time and model name every object of one response carries."""

    def __init__(self, prefix: str, model: str):
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def header(self, object_name: str) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model}


def chat_completion(
    ids: ResponseIds, *, content: str, reasoning: str | None, finish_reason: str, usage: Usage
) -> dict:
    message: dict = {"role": "assistant", "content": content}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    return {
        **ids.header("chat.completion"),
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage.as_dict(),
    }


def chat_chunk(ids: ResponseIds, delta: dict, *, finish_reason: str | None = None, with_usage: bool) -> dict:
    chunk = {
        **ids.header("chat.completion.chunk"),
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
    if with_usage:
        chunk["usage"] = None  # every chunk but the last carries a null usage when include_usage is set
    return chunk


def usage_chunk(ids: ResponseIds, object_name: str, usage: Usage) -> dict:
    """The last chunk of a stream with ``stream_options.include_usage``: no choices, the usage."""
    return {**ids.header(object_name), "choices": [], "usage": usage.as_dict()}


def text_completion(ids: ResponseIds, *, text: str, finish_reason: str | None, usage: Usage | None) -> dict:
    """A ``text_completion``: the whole answer (with usage), or one streamed chunk (``usage`` None)."""
    body = {
        **ids.header("text_completion"),
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
    }
    if usage is not None:
        body["usage"] = usage.as_dict()
    return body
