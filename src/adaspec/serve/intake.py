"""A request's way in: its body read within bounds (`read_body`, on the event loop), then on a parse thread parsed
(requests.py), its method chosen and checked (policy.py), its prompt tokenised and its generation config made: a
`Prepared` job (`Intake.prepare`). Errors are ApiErrors whose messages name no server path."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Request
from starlette.requests import ClientDisconnect

from adaspec.core.config import DEFAULT_SEED, GenerationConfig, SamplingConfig
from adaspec.core.errors import AdaspecError
from adaspec.core.models import LoadedModel, encode_prompt
from adaspec.methods import MethodSpec, parse_method
from adaspec.serve.errors import Aborted, ApiError, api_error
from adaspec.serve.policy import RequestPolicy
from adaspec.serve.requests import Body, ChatBody, CompletionBody, parse_body
from adaspec.serve.text import MAX_STOP_CHARS, MAX_STOPS

SEED_MODULUS = 1 << 32  # a request's 64-bit seed, as every backend takes it


@dataclass
class Prepared:
    """A validated request, ready to queue."""

    prompt_ids: list[int]
    config: GenerationConfig
    spec: MethodSpec
    chat: bool
    stream: bool
    include_usage: bool


class Intake:
    """Validates and tokenises requests for one target: the method a request may choose (`policy`, over the
    operator's `method`), its prompt within the target's context, its sampling and budget (`max_tokens` when it
    names none)."""

    def __init__(self, target: LoadedModel, method: str, policy: RequestPolicy, max_tokens: int,
                 redact: Callable[[str], str]) -> None:
        self.name, self.tokenizer = target.name, target.tokenizer
        self.default = parse_method(method)  # the operator's: it may name paths
        self.context = int(getattr(target.model.config, "max_position_embeddings", 1 << 30))
        self.vocab = int(target.model.config.vocab_size)
        self.policy, self.max_tokens, self.redact = policy, max_tokens, redact

    def check_model(self, name: str) -> None:
        if name != self.name:
            raise ApiError(404, f"the model '{name}' does not exist; this server serves '{self.name}'",
                           param="model", code="model_not_found")

    def prompt_ids(self, body: Body) -> list[int]:
        try:
            if isinstance(body, ChatBody):
                messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                            for m in body.messages]
                return encode_prompt(self.tokenizer, messages, chat=True)
            assert isinstance(body, CompletionBody)
            prompt = body.prompt
            if isinstance(prompt, list) and len(prompt) != 1 and not all(isinstance(t, int) for t in prompt):
                raise ApiError(400, "one prompt per request: batches of prompts are not supported", param="prompt")
            if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
                prompt = prompt[0]
            if isinstance(prompt, str):
                return encode_prompt(self.tokenizer, prompt, chat=False)
            bad = [t for t in prompt if not 0 <= t < self.vocab]
            if bad:
                raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (0..{self.vocab - 1})",
                               param="prompt")
            return list(prompt)
        except ApiError:
            raise
        except Exception as e:  # the tokenizer or a chat template refused the input
            param = "messages" if isinstance(body, ChatBody) else "prompt"
            raise ApiError(400, self.redact(f"could not build the prompt: {e}"[:1000]), param=param) from None

    def prepare(self, raw: bytes, chat: bool, content_type: str | None = None, draining: bool = False) -> Prepared:
        """The request validated and tokenised, or an ApiError whose message names no server path; 503 while the
        server is `draining`."""
        try:
            return self._prepare(raw, chat, content_type, draining)
        except ApiError as e:
            e.message = self.redact(e.message)
            raise

    def _prepare(self, raw: bytes, chat: bool, content_type: str | None, draining: bool) -> Prepared:
        body = parse_body(raw, ChatBody if chat else CompletionBody, content_type)
        self.check_model(body.model)
        if draining:
            raise ApiError(503, "the server is shutting down", "server_error", code="shutting_down")
        spec = self.policy.spec(body.speculative, self.default)
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if len(stop) > MAX_STOPS or any(not 0 < len(s) <= MAX_STOP_CHARS for s in stop):
            raise ApiError(400, f"stop takes at most {MAX_STOPS} non-empty strings of at most {MAX_STOP_CHARS} "
                                "characters", param="stop")
        ids = self.prompt_ids(body)
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        asked = getattr(body, "max_completion_tokens", None) or body.max_tokens
        room = self.context - len(ids)
        if room < 1 or (asked is not None and asked > room):
            raise ApiError(400, f"the prompt has {len(ids)} tokens and {asked or 1} more were asked for, beyond the "
                                f"model's context of {self.context} tokens; shorten the prompt or lower max_tokens",
                           param="messages" if chat else "prompt", code="context_length_exceeded")
        temperature = 1.0 if body.temperature is None else float(body.temperature)
        try:
            sampling = SamplingConfig(temperature, 0, 1.0 if body.top_p is None else float(body.top_p))
            seed = (body.seed % SEED_MODULUS if body.seed is not None else DEFAULT_SEED if sampling.greedy
                    else secrets.randbits(31))
            config = GenerationConfig(asked or min(self.max_tokens, room), sampling, stop,
                                      stop_on_eos=not body.ignore_eos, seed=seed)
        except AdaspecError as e:
            raise ApiError(400, str(e)) from None
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return Prepared(ids, config, spec, chat, bool(body.stream), include_usage)


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The request body: 413 past `limit` bytes (at once when Content-Length says so), 408 when it has not arrived
    within `timeout_s`, 499 when the client leaves first."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(int(declared), limit)
    chunks: list[bytes] = []

    async def read() -> None:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large(size, limit)
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), timeout_s)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout_s:g} s", "timeout_error",
                       code="body_timeout") from None
    except ClientDisconnect:
        raise api_error(Aborted("disconnect")) from None
    return b"".join(chunks)


def too_large(size: int, limit: int) -> ApiError:
    return ApiError(413, f"the request body has {size} bytes or more, beyond this server's limit of {limit}",
                    code="body_too_large")
