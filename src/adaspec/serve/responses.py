"""OpenAI's response bodies: a completion (text or chat) as one JSON object, or as server-sent events (chunks with
text deltas, a last chunk with the finish reason, usage if asked, then `data: [DONE]`); each carries our
`speculative` statistics."""

from __future__ import annotations

import json
import time
import uuid

from fastapi.responses import Response

from adaspec.core.decode import GenerationResult
from adaspec.methods import MethodSpec
from adaspec.serve.intake import Prepared

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
SSE_DONE = "data: [DONE]\n\n"


def head(model: str, chat: bool, chunk: bool = False) -> dict:
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
    return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "object": kind,
            "created": int(time.time()), "model": model}


def usage(result: GenerationResult) -> dict:
    n, m = len(result.prompt_ids), result.new_tokens
    return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}


def speculative_stats(spec: MethodSpec, result: GenerationResult) -> dict:
    """Per-request decoding statistics; a peer (transformers generate) reports no steps, so they are null.
    `batch`: the mean number of sequences decoded together in its steps (1: it ran alone)."""
    if not result.steps:
        return {"method": spec.label, "steps": None, "drafted": None, "accepted": None, "mean_accepted": None,
                "acceptance_rate": None, "batch": None}
    drafted = sum(s.drafted for s in result.steps)
    accepted = sum(s.accepted for s in result.steps)
    return {"method": spec.label, "steps": len(result.steps), "drafted": drafted, "accepted": accepted,
            "mean_accepted": round(result.mean_accepted, 4),
            "acceptance_rate": round(accepted / drafted, 4) if drafted else None,
            "batch": round(sum(s.batch or 1 for s in result.steps) / len(result.steps), 4)}


def completion(p: Prepared, model: str, text: str, result: GenerationResult) -> dict:
    """The whole completion, as one JSON object."""
    choice: dict = {"index": 0, "logprobs": None, "finish_reason": FINISH.get(result.stop_reason, "stop")}
    if p.chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {**head(model, p.chat), "choices": [choice], "usage": usage(result),
            "speculative": speculative_stats(p.spec, result)}


class Chunks:
    """The server-sent events of one streamed completion, all under the same head."""

    def __init__(self, p: Prepared, model: str) -> None:
        self.p, self.head = p, head(model, p.chat, chunk=True)

    def start(self) -> list[str]:
        """A chat stream opens with the assistant's role."""
        if not self.p.chat:
            return []
        return [sse({**self.head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                               "logprobs": None, "finish_reason": None}]})]

    def delta(self, text: str | None, finish: str | None = None, **extra: object) -> str:
        choice: dict = {"index": 0, "logprobs": None, "finish_reason": finish}
        if self.p.chat:
            choice["delta"] = {} if text is None else {"content": text}
        else:
            choice["text"] = text or ""
        return sse({**self.head, "choices": [choice], **extra})

    def end(self, result: GenerationResult) -> list[str]:
        """The finish reason with our statistics, then the usage if the request asked for it."""
        stats = speculative_stats(self.p.spec, result)
        events = [self.delta(None, FINISH.get(result.stop_reason, "stop"), speculative=stats)]
        if self.p.include_usage:
            events.append(sse({**self.head, "choices": [], "usage": usage(result)}))
        return events


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def json_response(payload: dict, status: int = 200) -> Response:
    return Response(json.dumps(payload, ensure_ascii=False).encode(), status, media_type="application/json")
