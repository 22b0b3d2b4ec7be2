"""Request bodies: JSON parsed and validated strictly, off the event loop (serve/app.py runs `parse_body` on a
thread). Every string is whole Unicode, every number a JSON number of the right kind and range, and OpenAI's
parameters this server does not implement get a 400 naming them instead of being ignored."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)

from adaspec.serve.errors import ApiError, unsupported

INT64 = 1 << 63  # OpenAI's seed is a signed 64-bit integer


def _whole_unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("holds a lone surrogate code point: not valid Unicode") from None
    return text


Text = Annotated[StrictStr, AfterValidator(_whole_unicode)]
OptionValue = StrictInt | StrictFloat | StrictBool | Text


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Speculative(Strict):
    """Per request: the method (`sd`, `sd:k=4`, `ar`, ...) and its options ({"k": 4})."""

    method: Text | None = None
    options: dict[Text, OptionValue] = Field(default_factory=dict)

    @field_validator("method")
    @classmethod
    def _named(cls, method: str | None) -> str | None:
        if method is not None and not method.strip():
            raise ValueError("is empty: name a method (sd, ar, ...) or leave method out for the server's default")
        return method


class StreamOptions(Strict):
    include_usage: StrictBool = False
    include_obfuscation: StrictBool | None = None  # accepted; nothing here is obfuscated


class Body(Strict):
    """What both endpoints take. Fields typed JsonValue are OpenAI's that we do not implement: accepted only at
    their do-nothing value (UNSUPPORTED)."""

    model: Text
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: StrictFloat | None = Field(None, ge=0, le=2)
    top_p: StrictFloat | None = Field(None, gt=0, le=1)
    n: StrictInt | None = None
    stop: Text | list[Text] | None = None
    seed: StrictInt | None = Field(None, ge=-INT64, lt=INT64)
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    speculative: Speculative | None = None
    ignore_eos: StrictBool | None = None  # vLLM's extension: generate exactly max_tokens
    user: Text | None = None  # accepted, unused
    frequency_penalty: JsonValue = None
    presence_penalty: JsonValue = None
    logit_bias: JsonValue = None


class CompletionBody(Body):
    prompt: Text | list[Text] | list[StrictInt] | list[list[StrictInt]]
    echo: JsonValue = None
    best_of: JsonValue = None
    logprobs: JsonValue = None
    suffix: JsonValue = None


class TextPart(Strict):
    type: Literal["text"]
    text: Text


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None  # accepted; chat templates do not show it

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatBody(Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: JsonValue = None
    top_logprobs: JsonValue = None
    tools: JsonValue = None
    tool_choice: JsonValue = None
    functions: JsonValue = None
    function_call: JsonValue = None
    parallel_tool_calls: StrictBool | None = None  # accepted: without tools there is nothing to call
    response_format: JsonValue = None
    modalities: JsonValue = None
    audio: JsonValue = None
    prediction: JsonValue = None
    reasoning_effort: JsonValue = None
    verbosity: JsonValue = None
    web_search_options: JsonValue = None
    metadata: dict[Text, Text] | None = None  # accepted; nothing is stored
    store: StrictBool | None = None
    service_tier: Text | None = None


# parameter -> (the values that ask for nothing we lack, what to say otherwise)
UNSUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "n": ((None, 1), "one choice per request (n must be 1)"),
    "best_of": ((None, 1), "one candidate per request (best_of must be 1)"),
    "echo": ((None, False), "the prompt is not echoed"),
    "suffix": ((None, ""), "no insertion (suffix)"),
    "logprobs": ((None, False), "no log probabilities"),
    "top_logprobs": ((None,), "no log probabilities"),
    "logit_bias": ((None, {}), "no logit bias"),
    "frequency_penalty": ((None, 0), "no frequency penalty"),
    "presence_penalty": ((None, 0), "no presence penalty"),
    "tools": ((None, []), "no tool calls"),
    "tool_choice": ((None, "none"), "no tool calls"),
    "functions": ((None, []), "no function calls"),
    "function_call": ((None, "none"), "no function calls"),
    "response_format": ((None, {"type": "text"}), "no structured output (response_format must be text)"),
    "modalities": ((None, ["text"]), "text only"),
    "audio": ((None,), "text only"),
    "prediction": ((None,), "no predicted outputs"),
    "reasoning_effort": ((None,), "not a reasoning model"),
    "verbosity": ((None,), "no verbosity control"),
    "web_search_options": ((None,), "no web search"),
}


def _same(a: Any, b: Any) -> bool:
    """JSON equality that tells true from 1 and false from 0."""
    return type(a) is type(b) and a == b or (type(a) in (int, float) and type(b) in (int, float) and a == b)


def check_supported(body: Body) -> None:
    for name, (allowed, what) in UNSUPPORTED.items():
        if name in body.model_fields_set and not any(_same(getattr(body, name), v) for v in allowed):
            raise unsupported(name, what)


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


_UNION_TAG = re.compile(r"^(str|int|float|bool|none|list\[.*|dict\[.*|function-.*|json-.*|.*\[.*\].*)$")


def _param(loc: tuple) -> str | None:
    """A pydantic error location as a dotted parameter name, without the union member tags pydantic adds."""
    parts = [str(x) for x in loc if isinstance(x, int) or not _UNION_TAG.match(str(x))]
    return ".".join(parts) or None


def parse_body(raw: bytes, kind: type[Body], content_type: str | None = None) -> Body:
    """The request body as `kind`; an ApiError (400) saying what is wrong with it otherwise."""
    try:
        data = json.loads(raw, parse_constant=_no_constant)  # NaN and Infinity are not JSON
    except RecursionError:
        raise ApiError(400, "the body is not valid JSON: it nests too deeply") from None
    except ValueError as e:  # JSONDecodeError, invalid UTF-8, an integer past Python's digit limit
        hint = f" (Content-Type was {content_type})" if content_type and "json" not in content_type else ""
        reason = str(e).splitlines()[0][:200]
        raise ApiError(400, f"the body is not valid JSON{hint}: {reason}; send a JSON object "
                            "(Content-Type: application/json)") from None
    if not isinstance(data, dict):
        kind_name = "null" if data is None else type(data).__name__
        raise ApiError(400, f"the body must be a JSON object, not {kind_name}")
    try:
        body = kind.model_validate(data)
    except ValidationError as e:
        first = max(e.errors(include_url=False), key=lambda err: len(err.get("loc", ())))  # a union's closest member
        param = _param(first.get("loc", ()))
        if first.get("type") == "extra_forbidden":
            raise ApiError(400, f"unrecognized request argument supplied: {param}", param=param,
                           code="unknown_parameter") from None
        message = first.get("msg", "invalid value")
        raise ApiError(400, f"{param}: {message}" if param else message, param=param) from None
    except RecursionError:
        raise ApiError(400, "the body nests too deeply") from None
    check_supported(body)
    return body
