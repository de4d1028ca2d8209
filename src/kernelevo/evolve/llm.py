"""The LLM proposer's side of the wire: requests through the `openai` client to any
OpenAI-compatible endpoint (OpenAI, a local `mlx_lm.server`, llama.cpp's server, ...), and
the replies turned into candidate programs.

Nothing the endpoint does stops a run: rate limits (429) and server errors (5xx) are retried
with exponential backoff; a timeout, a connection error, an empty reply, a stream cut short,
a reply without a program — each comes back as a `Reply` whose outcome says so, and is
recorded with its reason.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class LLMSettings:
    base_url: str
    api_key: str
    model: str
    temperature: float = 0.7
    max_tokens: int = 4096  # of one reply
    timeout_s: float = 120.0
    retries: int = 3  # for 429 and 5xx, with exponential backoff
    backoff_s: float = 1.0
    parallel: int = 2  # requests in flight at once
    price_in: float = 0.0  # per million prompt tokens
    price_out: float = 0.0  # per million completion tokens


@dataclass
class Reply:
    text: str | None
    outcome: str  # ok | empty | truncated | timeout | rate-limited | error
    reason: str = ""
    tokens_in: int = 0
    tokens_out: int = 0
    latency_s: float = 0.0
    estimated_tokens: bool = False

    def cost(self, s: LLMSettings) -> float:
        return (self.tokens_in * s.price_in + self.tokens_out * s.price_out) / 1e6


def _estimate(text: str) -> int:
    return max(1, len(text) // 4)


class LLMClient:
    def __init__(self, settings: LLMSettings):
        try:
            from openai import OpenAI
        except ImportError as err:  # an optional dependency
            raise RuntimeError("the LLM proposer needs the openai package: pip install "
                               "'kernelevo[evolve]'") from err
        self.settings = settings
        # Retries are ours (to record them and to back off), so the client makes none.
        self.client = OpenAI(base_url=settings.base_url, api_key=settings.api_key or "none",
                             timeout=settings.timeout_s, max_retries=0)
        self._usage_in_stream = True

    def complete(self, messages: list[dict]) -> Reply:
        import openai

        s = self.settings
        started = time.perf_counter()
        prompt_text = "".join(m["content"] for m in messages)
        last = ""
        for attempt in range(s.retries + 1):
            try:
                reply = self._stream(messages)
                reply.latency_s = time.perf_counter() - started
                if not reply.tokens_in:
                    reply.tokens_in, reply.estimated_tokens = _estimate(prompt_text), True
                return reply
            except openai.RateLimitError as err:
                last, outcome = f"rate limited (429): {_short(err)}", "rate-limited"
            except openai.InternalServerError as err:
                last, outcome = f"server error ({err.status_code}): {_short(err)}", "error"
            except openai.APITimeoutError:
                return Reply(None, "timeout", f"no reply within {s.timeout_s:g} s",
                             _estimate(prompt_text), 0, time.perf_counter() - started, True)
            except openai.APIConnectionError as err:
                last, outcome = f"connection error: {_short(err)}", "error"
            except openai.APIStatusError as err:  # 4xx other than 429: no retry helps
                return Reply(None, "error", f"HTTP {err.status_code}: {_short(err)}",
                             _estimate(prompt_text), 0, time.perf_counter() - started, True)
            if attempt < s.retries:
                time.sleep(s.backoff_s * 2 ** attempt)
        return Reply(None, outcome, f"{last} (after {s.retries + 1} attempts)", _estimate(prompt_text),
                     0, time.perf_counter() - started, True)

    def _stream(self, messages: list[dict]) -> Reply:
        import openai

        s = self.settings
        kwargs = dict(model=s.model, messages=messages, temperature=s.temperature,
                      max_tokens=s.max_tokens, stream=True)
        if self._usage_in_stream:
            kwargs["stream_options"] = {"include_usage": True}
        try:
            stream = self.client.chat.completions.create(**kwargs)
        except openai.BadRequestError as err:
            if self._usage_in_stream and "stream_options" in str(err):
                self._usage_in_stream = False  # a server that does not know the option
                return self._stream(messages)
            raise
        parts: list[str] = []
        finish = None
        tokens_in = tokens_out = 0
        try:
            for chunk in stream:
                if getattr(chunk, "usage", None):
                    tokens_in = chunk.usage.prompt_tokens or 0
                    tokens_out = chunk.usage.completion_tokens or 0
                for choice in chunk.choices or ():
                    if choice.delta and choice.delta.content:
                        parts.append(choice.delta.content)
                    if choice.finish_reason:
                        finish = choice.finish_reason
        except (openai.APIConnectionError, openai.APIError) as err:
            text = "".join(parts)
            return Reply(text or None, "truncated", f"the stream broke off: {_short(err)}",
                         tokens_in, tokens_out or _estimate(text), estimated_tokens=not tokens_out)
        except Exception as err:  # noqa: BLE001 — the transport below raises its own types
            text = "".join(parts)
            return Reply(text or None, "truncated", f"the stream broke off: {type(err).__name__}: {err}",
                         tokens_in, tokens_out or _estimate(text), estimated_tokens=not tokens_out)
        text = "".join(parts)
        estimated = not tokens_out
        tokens_out = tokens_out or _estimate(text)
        if finish is None:
            return Reply(text or None, "truncated", "the stream ended without a finish reason",
                         tokens_in, tokens_out, estimated_tokens=estimated)
        if finish == "length":
            return Reply(text or None, "truncated", f"cut at max_tokens={s.max_tokens}",
                         tokens_in, tokens_out, estimated_tokens=estimated)
        if not text.strip():
            return Reply(None, "empty", "the reply was empty", tokens_in, tokens_out,
                         estimated_tokens=estimated)
        return Reply(text, "ok", "", tokens_in, tokens_out, estimated_tokens=estimated)


def _short(err: Exception, limit: int = 200) -> str:
    text = str(err).replace("\n", " ")
    return text[:limit]


# -- replies to programs ----------------------------------------------------------------

_EDIT = re.compile(r"<<<<<<< SEARCH\n(.*?)\n?=======\n(.*?)\n?>>>>>>> REPLACE", re.DOTALL)
_FENCE = re.compile(r"```[ \t]*(?:kevo)?[ \t]*\n(.*?)```", re.DOTALL)


class ReplyError(ValueError):
    """A reply that holds no usable program."""


def program_from_reply(reply: str, parent: str) -> tuple[str, str]:
    """(program text, how it was given: 'program' or 'edits') from a reply; ReplyError
    with the reason otherwise."""
    edits = _EDIT.findall(reply)
    if edits:
        text = parent
        for i, (search, replacement) in enumerate(edits, 1):
            count = text.count(search)
            if count == 0:
                loose = _loosely(text, search)
                if loose is None:
                    raise ReplyError(f"edit {i}: its SEARCH text is not in the parent program")
                search = loose
            elif count > 1:
                raise ReplyError(f"edit {i}: its SEARCH text occurs {count} times in the parent")
            text = text.replace(search, replacement, 1)
        return (text if text.endswith("\n") else text + "\n"), "edits"
    for block in _FENCE.findall(reply):
        if re.search(r"^\s*kevo\s+\d", block, re.MULTILINE):
            return _from_header(block), "program"
    if re.search(r"^\s*kevo\s+\d", reply, re.MULTILINE):
        return _from_header(reply), "program"
    raise ReplyError("the reply holds neither a ```kevo program nor SEARCH/REPLACE edits")


def _from_header(text: str) -> str:
    """The text from its comments and `kevo N` header on (prose before it dropped)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"\s*kevo\s+\d", line))
    while start > 0 and lines[start - 1].lstrip().startswith("#"):
        start -= 1
    return "\n".join(lines[start:]).rstrip() + "\n"


def _loosely(text: str, search: str) -> str | None:
    """The one span of `text` equal to `search` up to trailing spaces on each line."""
    wanted = [line.rstrip() for line in search.splitlines()]
    lines = text.splitlines(keepends=True)
    hits = []
    for i in range(len(lines) - len(wanted) + 1):
        if [line.rstrip() for line in lines[i:i + len(wanted)]] == wanted:
            hits.append("".join(lines[i:i + len(wanted)]).rstrip("\n"))
    return hits[0] if len(hits) == 1 else None
