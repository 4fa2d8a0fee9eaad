"""Chat clients over plain HTTP (urllib): any OpenAI-compatible `/chat/completions` endpoint and the
Anthropic Messages API, with a concurrency limit, retries with exponential backoff, a response cache keyed by
the prompt's hash (sqlite) and token and cost accounting.

A reply that is not what the protocol promises (a body that is not JSON, an HTML error page, `{}`, an
`{"error": ...}` object sent with status 200) does not stop a run of thousands of features: it comes back as
a `Completion` with `malformed=True` and empty text, is counted in `usage["malformed"]`, and is not cached,
so a rerun asks again. So is a well-formed reply whose text the caller's `check` cannot read. An endpoint
that refuses the connection is tried twice, not through the whole backoff schedule: a refusal means
nothing listens there, which waiting does not fix.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

from mri.errors import MriError

PROVIDERS = {
    "openai": {"url": "https://api.openai.com/v1", "key": "OPENAI_API_KEY", "model": "gpt-4o-mini"},
    "anthropic": {
        "url": "https://api.anthropic.com",
        "key": "ANTHROPIC_API_KEY",
        "model": "claude-3-5-haiku-latest",
    },
}
RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504, 529}


class Completion(NamedTuple):
    """One chat reply and what it cost."""

    text: str
    input_tokens: int
    output_tokens: int
    cost_usd: float
    cached: bool
    """True when served from the response cache (no request made, no cost)."""
    malformed: bool = False
    """True when the reply could not be read: not this protocol's reply (text is then ""), or a text the
    caller's `check` rejected (text kept)."""


class ResponseCache:
    """Replies keyed by sha256 of the request, in a sqlite file; safe to share between threads."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, text TEXT, input_tokens INTEGER, "
            "output_tokens INTEGER, created TEXT)"
        )
        self._db.commit()

    def get(self, key: str) -> tuple[str, int, int] | None:
        """(text, input tokens, output tokens) first billed for this request, or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT text, input_tokens, output_tokens FROM replies WHERE key = ?", (key,)
            ).fetchone()
        return None if row is None else (row[0], int(row[1]), int(row[2]))

    def put(self, key: str, text: str, input_tokens: int, output_tokens: int) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO replies VALUES (?, ?, ?, ?, ?)",
                (key, text, input_tokens, output_tokens, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
            )
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM replies").fetchone()[0])


class ChatClient:
    """A chat model behind HTTP. Subclasses say how a request looks and how a reply is read."""

    provider = ""

    def __init__(
        self,
        model: str | None = None,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        max_tokens: int = 400,
        temperature: float = 0.0,
        concurrency: int = 4,
        retries: int = 5,
        backoff_s: float = 1.0,
        timeout_s: float = 60.0,
        cache: ResponseCache | str | Path | None = None,
        price_in: float = 0.0,
        price_out: float = 0.0,
    ):
        spec = PROVIDERS[self.provider]
        self.model = model or spec["model"]
        env_url = os.environ.get(f"{self.provider.upper()}_BASE_URL")
        self.base_url = (base_url or env_url or spec["url"]).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get(spec["key"])
        if not self.api_key:
            raise MriError(
                f"set {spec['key']} to use the {self.provider} explainer (or use --explainer offline)"
            )
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.retries = retries
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self.cache = ResponseCache(cache) if isinstance(cache, (str, Path)) else cache
        self.price_in, self.price_out = price_in, price_out
        self.concurrency = max(1, concurrency)
        self._slots = threading.BoundedSemaphore(self.concurrency)
        self._lock = threading.Lock()
        self.usage = {
            "requests": 0,
            "cached": 0,
            "retries": 0,
            "input_tokens": 0,
            "output_tokens": 0,
            "cost_usd": 0.0,
            "malformed": 0,
        }

    # ---- per provider ------------------------------------------------------------------------------
    def _request(self, system: str, user: str) -> tuple[str, dict[str, str], dict[str, Any]]:
        """(url, headers, JSON body) of one request."""
        raise NotImplementedError

    def _parse(self, reply: dict[str, Any]) -> tuple[str, int, int] | None:
        """(text, input tokens, output tokens) of one reply; None when it is not this protocol's reply."""
        raise NotImplementedError

    # ---- shared ------------------------------------------------------------------------------------
    def cache_key(self, system: str, user: str) -> str:
        body = {"provider": self.provider, "model": self.model, "system": system, "user": user,
                "max_tokens": self.max_tokens, "temperature": self.temperature}  # fmt: skip
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        """US dollars at the configured prices per million tokens."""
        return (input_tokens * self.price_in + output_tokens * self.price_out) / 1e6

    def complete(self, system: str, user: str, check: Callable[[str], bool] | None = None) -> Completion:
        """One reply, from the cache when this exact request was answered before.

        `check(text)` says whether the caller can read the reply; one it cannot read is `malformed` (its
        text kept), counted, and not cached: cached, an unreadable answer would be served again to every
        identical prompt and to every rerun."""
        key = self.cache_key(system, user)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None and (check is None or check(hit[0])):
                with self._lock:
                    self.usage["cached"] += 1
                return Completion(hit[0], 0, 0, 0.0, True)  # nothing was billed
        url, headers, body = self._request(system, user)
        with self._slots:
            raw = self._post(url, headers, body)
        try:
            reply = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            reply = None
        parsed = self._parse(reply) if isinstance(reply, dict) else None
        if parsed is None:  # HTML, plain text, {} or {"error": ...}: counted, never cached
            n_in, n_out = _usage_of(reply)
            cost = self.cost(n_in, n_out)
            with self._lock:
                self.usage["requests"] += 1
                self.usage["malformed"] += 1
                self.usage["input_tokens"] += n_in
                self.usage["output_tokens"] += n_out
                self.usage["cost_usd"] += cost
            return Completion("", n_in, n_out, cost, False, malformed=True)
        text, n_in, n_out = parsed
        readable = check is None or check(text)
        cost = self.cost(n_in, n_out)
        with self._lock:
            self.usage["requests"] += 1
            self.usage["malformed"] += not readable
            self.usage["input_tokens"] += n_in
            self.usage["output_tokens"] += n_out
            self.usage["cost_usd"] += cost
        if self.cache is not None and readable:
            self.cache.put(key, text, n_in, n_out)
        return Completion(text, n_in, n_out, cost, False, malformed=not readable)

    def complete_many(
        self,
        prompts: Sequence[tuple[str, str]],
        checks: Sequence[Callable[[str], bool] | None] | None = None,
    ) -> list[Completion]:
        """Replies to many (system, user) prompts, at most `concurrency` requests in flight, in order;
        `checks[i]` is prompt i's `check` (see `complete`)."""
        jobs = [(*p, c) for p, c in zip(prompts, checks or [None] * len(prompts), strict=True)]
        if len(jobs) <= 1:
            return [self.complete(*j) for j in jobs]
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(lambda j: self.complete(*j), jobs))

    def _post(self, url: str, headers: dict[str, str], body: dict[str, Any]) -> bytes:
        """The body of a 2xx reply, as bytes (parsed by the caller, which tolerates garbage).

        HTTP 408/409/429/5xx, timeouts and dropped connections are retried with backoff; a refused
        connection (or a host name that does not resolve) once, since nothing listens there."""
        data = json.dumps(body).encode()
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(
                url, data=data, headers={"content-type": "application/json", **headers}
            )
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    return resp.read()
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode(errors="replace")
                if e.code not in RETRY_STATUS or attempt == self.retries:
                    raise MriError(
                        f"{self.provider} request to {url} failed: HTTP {e.code}: {detail}"
                    ) from None
                wait = self._wait(attempt, e.headers.get("retry-after"))
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as e:
                reason = getattr(e, "reason", e)
                refused = isinstance(reason, (ConnectionRefusedError, socket.gaierror))
                if attempt == self.retries or (refused and attempt >= 1):
                    raise MriError(
                        f"{self.provider} endpoint {url} unreachable ({reason}): check --base-url, "
                        "or use --explainer offline"
                    ) from None
                wait = self._wait(attempt, None)
            with self._lock:
                self.usage["retries"] += 1
            time.sleep(wait)
        raise AssertionError("unreachable")

    def _wait(self, attempt: int, retry_after: str | None) -> float:
        """Exponential backoff (backoff_s * 2^attempt), or the server's Retry-After when it is longer."""
        wait = self.backoff_s * 2**attempt
        try:
            return max(wait, min(float(retry_after), 60.0)) if retry_after else wait
        except ValueError:
            return wait


class OpenAIClient(ChatClient):
    """Any OpenAI-compatible chat endpoint: POST {base_url}/chat/completions."""

    provider = "openai"

    def _request(self, system: str, user: str) -> tuple[str, dict[str, str], dict[str, Any]]:
        body = {
            "model": self.model,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        return f"{self.base_url}/chat/completions", {"authorization": f"Bearer {self.api_key}"}, body

    def _parse(self, reply: dict[str, Any]) -> tuple[str, int, int] | None:
        try:
            text = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            return None
        if not isinstance(text, str):
            return None
        return (text, *_usage_of(reply))


class AnthropicClient(ChatClient):
    """The Anthropic Messages API: POST {base_url}/v1/messages."""

    provider = "anthropic"
    version = "2023-06-01"

    def _request(self, system: str, user: str) -> tuple[str, dict[str, str], dict[str, Any]]:
        body = {
            "model": self.model,
            "system": system,
            "messages": [{"role": "user", "content": user}],
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        headers = {"x-api-key": self.api_key or "", "anthropic-version": self.version}
        return f"{self.base_url}/v1/messages", headers, body

    def _parse(self, reply: dict[str, Any]) -> tuple[str, int, int] | None:
        try:
            blocks = [b for b in reply["content"] if b.get("type") == "text"]
            text = "".join(str(b.get("text", "")) for b in blocks)
        except (KeyError, TypeError, AttributeError):
            return None
        if not blocks:
            return None
        return (text, *_usage_of(reply))


def _usage_of(reply: Any) -> tuple[int, int]:
    """(input, output) tokens a reply says it used, under either protocol's names; (0, 0) when it says
    nothing readable (a malformed reply may still have been billed, and then it is counted)."""
    usage = reply.get("usage") if isinstance(reply, dict) else None
    if not isinstance(usage, dict):
        return 0, 0

    def count(*names: str) -> int:
        for name in names:
            try:
                return max(int(usage[name]), 0)
            except (KeyError, TypeError, ValueError):
                continue
        return 0

    return count("prompt_tokens", "input_tokens"), count("completion_tokens", "output_tokens")


def make_client(provider: str, **kwargs: Any) -> ChatClient:
    """A client for 'openai' (or any compatible server via base_url) or 'anthropic'."""
    classes = {"openai": OpenAIClient, "anthropic": AnthropicClient}
    if provider not in classes:
        raise MriError(f"unknown LLM provider {provider!r}; use openai or anthropic")
    return classes[provider](**kwargs)
