"""OpenAI bodies -> GenerateInput, and engine outputs -> OpenAI response objects.

The only code that knows both OpenAI's JSON shapes and deltaserve's domain types.
Contracts:
- `input_of` refuses (InvalidParamError naming the field) what deltaserve cannot honour
  (n != 1, echo, suffix, best_of, penalties, logit_bias, tools, non-text content) rather
  than ignoring it, and applies OpenAI's defaults (temperature 1, top_p 1, max_tokens 16
  for completions and the server's max_new_tokens limit for chat).
- `Responder` renders one request's outputs: whole responses, stream chunks (chat chunks
  open with the assistant role), the usage chunk of `stream_options.include_usage`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from deltaserve.engine.types import MAX_LOGPROBS, FinishReason, RequestOutput, SamplingParams, TokenLogprob
from deltaserve.errors import InvalidArgumentError
from deltaserve.service.convert import GenerateInput
from deltaserve.service.http.errors import InvalidParamError
from deltaserve.service.http.schemas import ChatCompletionBody, ChatMessage, CompletionBody, Kind

LOGPROB_FLOOR = -9999.0  # JSON has no -inf: impossible tokens are shown at this log-probability
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_FINISH = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length", FinishReason.ABORT: "abort"}


def _refuse_unsupported(body: CompletionBody | ChatCompletionBody) -> None:
    if body.n not in (None, 1):
        raise InvalidParamError("n must be 1: deltaserve returns one choice per request", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name) not in (None, 0, 0.0):
            raise InvalidParamError(f"{name} is not supported; use repetition_penalty (extra field)", name)
    if body.logit_bias:
        raise InvalidParamError("logit_bias is not supported", "logit_bias")
    if isinstance(body, CompletionBody):
        if body.echo:
            raise InvalidParamError("echo is not supported", "echo")
        if body.suffix:
            raise InvalidParamError("suffix is not supported", "suffix")
        if body.best_of not in (None, 1):
            raise InvalidParamError("best_of must be 1", "best_of")
    else:
        if body.tools:
            raise InvalidParamError("tools are not supported", "tools")
        if body.tool_choice not in (None, "none"):
            raise InvalidParamError("tool_choice is not supported", "tool_choice")
        if body.response_format and body.response_format.get("type") not in (None, "text"):
            raise InvalidParamError("response_format other than text is not supported", "response_format")


def _max_tokens(body: CompletionBody | ChatCompletionBody, limit: int) -> int:
    name, value = "max_tokens", body.max_tokens
    if isinstance(body, ChatCompletionBody) and body.max_completion_tokens is not None:
        name, value = "max_completion_tokens", body.max_completion_tokens
    if value is None:
        return COMPLETION_MAX_TOKENS if isinstance(body, CompletionBody) else limit
    if not 1 <= value <= limit:
        raise InvalidParamError(f"{name} must be in [1, {limit}], got {value}", name)
    return value


def logprobs_wanted(body: CompletionBody | ChatCompletionBody) -> int | None:
    """Top log-probabilities to show per token; None when log-probabilities were not asked for."""
    if isinstance(body, CompletionBody):
        n, name = body.logprobs, "logprobs"
    else:
        if not body.logprobs:
            if body.top_logprobs:
                raise InvalidParamError("top_logprobs needs logprobs: true", "top_logprobs")
            return None
        n, name = body.top_logprobs or 0, "top_logprobs"
    if n is not None and not 0 <= n <= MAX_LOGPROBS:
        raise InvalidParamError(f"{name} must be in [0, {MAX_LOGPROBS}], got {n}", name)
    return n


def sampling_of(body: CompletionBody | ChatCompletionBody, max_new_tokens_limit: int) -> SamplingParams:
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    shown = logprobs_wanted(body)
    try:
        return SamplingParams(
            max_new_tokens=_max_tokens(body, max_new_tokens_limit),
            temperature=1.0 if body.temperature is None else body.temperature,
            top_k=body.top_k or 0,
            top_p=1.0 if body.top_p is None else body.top_p,
            repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
            seed=body.seed,
            stop=stop,
            ignore_eos=bool(body.ignore_eos),
            logprobs=0 if shown is None else max(1, shown),  # the engine counts the chosen token in
        )
    except InvalidParamError:
        raise
    except InvalidArgumentError as exc:
        raise InvalidParamError(str(exc), str(exc).split(" ", 1)[0]) from None


def _content(m: ChatMessage, i: int) -> str:
    if m.content is None or isinstance(m.content, str):
        return m.content or ""
    parts = []
    for j, part in enumerate(m.content):
        if part.type != "text" or part.text is None:
            raise InvalidParamError(
                f"only text content parts are supported, got {part.type!r}", f"messages[{i}].content[{j}]"
            )
        parts.append(part.text)
    return "".join(parts)


def messages_of(body: ChatCompletionBody) -> tuple[tuple[str, str], ...]:
    if not body.messages:
        raise InvalidParamError("messages must contain at least one message", "messages")
    out = []
    for i, m in enumerate(body.messages):
        role = CHAT_ROLES.get(m.role)
        if role is None:
            raise InvalidParamError(
                f"role {m.role!r} is not supported (use system, developer, user or assistant)",
                f"messages[{i}].role",
            )
        out.append((role, _content(m, i)))
    return tuple(out)


def prompt_of(body: CompletionBody) -> str:
    if isinstance(body.prompt, str):
        return body.prompt
    if len(body.prompt) != 1:
        raise InvalidParamError("prompt must be a string or a list of exactly one string", "prompt")
    return body.prompt[0]


def input_of(
    body: CompletionBody | ChatCompletionBody, tenant: str | None, request_id: str, max_new_tokens_limit: int
) -> GenerateInput:
    """The pipeline's input for `body` (see the module doc for what is refused)."""
    _refuse_unsupported(body)
    chat = isinstance(body, ChatCompletionBody)
    alpha = 1.0 if body.alpha is None else body.alpha
    return GenerateInput(
        tenant=tenant,
        prompt=None if chat else prompt_of(body),
        messages=messages_of(body) if chat else None,
        sampling=sampling_of(body, max_new_tokens_limit),
        alpha=alpha,
        request_id=request_id,
        more=tuple((d.tenant, d.alpha) for d in body.deltas or ()),
    )


def finish_reason(out: RequestOutput) -> str | None:
    if not out.finished:
        return None
    return _FINISH.get(out.finish_reason, "stop") if out.finish_reason is not None else "stop"


def usage(out: RequestOutput) -> dict[str, Any]:
    return {
        "prompt_tokens": out.prompt_tokens,
        "completion_tokens": out.completion_tokens,
        "total_tokens": out.prompt_tokens + out.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": out.cached_tokens},
    }


def logprob_ids(outs: Sequence[RequestOutput]) -> list[int]:
    """Every token id whose text a rendering of `outs` shows (chosen and top alternatives)."""
    ids = {lp.token_id for out in outs for lp in out.logprobs or ()}
    ids |= {t for out in outs for lp in out.logprobs or () for t, _ in lp.top}
    return sorted(ids)


@dataclass
class Responder:
    """Renders the outputs of one request as OpenAI objects (see the module doc).

    shown: top log-probabilities per token (None = no logprobs); texts: token id -> text.
    """

    kind: Kind
    id: str
    model: str
    created: int
    shown: int | None
    token_ids: bool
    include_usage: bool = False
    _offset: int = field(default=0, repr=False)  # completions' text_offset across chunks

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _logprobs(self, lps: Sequence[TokenLogprob], texts: Mapping[int, str]) -> dict[str, Any] | None:
        if self.shown is None:
            return None
        n = self.shown
        if self.kind == "chat":
            return {
                "content": [
                    {
                        **_token(lp.token_id, lp.logprob, texts),
                        "top_logprobs": [_token(t, p, texts) for t, p in lp.top[:n]],
                    }
                    for lp in lps
                ]
            }
        offsets = []
        for lp in lps:
            offsets.append(self._offset)
            self._offset += len(texts[lp.token_id])
        return {
            "tokens": [texts[lp.token_id] for lp in lps],
            "token_logprobs": [_finite(lp.logprob) for lp in lps],
            "top_logprobs": [{texts[t]: _finite(p) for t, p in lp.top[:n]} for lp in lps],
            "text_offset": offsets,
        }

    def _choice(
        self, text: str, ids: Sequence[int], lps: Sequence[TokenLogprob], texts: Mapping[int, str],
        reason: str | None, stream: bool, first: bool = False,
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0}
        if self.kind == "completion":
            choice["text"] = text
        elif stream:
            choice["delta"] = {"role": "assistant", "content": text} if first else (
                {"content": text} if text or reason is None else {}
            )
        else:
            choice["message"] = {"role": "assistant", "content": text}
        choice["logprobs"] = self._logprobs(lps, texts)
        choice["finish_reason"] = reason
        if self.token_ids:
            choice["token_ids"] = list(ids)
        return choice

    def whole(self, outs: Sequence[RequestOutput], texts: Mapping[int, str]) -> dict[str, Any]:
        """The non-streamed response of a finished request (`outs`: all its outputs, in order)."""
        last = outs[-1]
        text = "".join(o.new_text for o in outs)
        ids = [t for o in outs for t in o.new_token_ids]
        lps = [lp for o in outs for lp in o.logprobs or ()]
        obj = self._head("text_completion" if self.kind == "completion" else "chat.completion")
        obj["choices"] = [self._choice(text, ids, lps, texts, finish_reason(last), stream=False)]
        obj["usage"] = usage(last)
        return obj

    def chunk(self, out: RequestOutput, texts: Mapping[int, str], first: bool) -> dict[str, Any]:
        """The stream chunk of one engine output."""
        obj = self._head("text_completion" if self.kind == "completion" else "chat.completion.chunk")
        obj["choices"] = [
            self._choice(
                out.new_text, out.new_token_ids, out.logprobs or (), texts, finish_reason(out),
                stream=True, first=first,
            )
        ]
        if self.include_usage:
            obj["usage"] = None
        return obj

    def usage_chunk(self, last: RequestOutput) -> dict[str, Any]:
        """The extra last chunk of `stream_options.include_usage`: no choices, the usage."""
        obj = self._head("text_completion" if self.kind == "completion" else "chat.completion.chunk")
        obj["choices"] = []
        obj["usage"] = usage(last)
        return obj


def _token(token_id: int, logprob: float, texts: Mapping[int, str]) -> dict[str, Any]:
    text = texts[token_id]
    return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode())}


def _finite(logprob: float) -> float:
    return logprob if logprob >= LOGPROB_FLOOR else LOGPROB_FLOOR  # also maps NaN to the floor
