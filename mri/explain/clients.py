"""Chat clients over plain HTTP (urllib): any OpenAI-compatible `/chat/completions` endpoint and the
Anthropic Messages API, with a concurrency limit, retries with exponential backoff, a response cache keyed by
the prompt's hash (sqlite) and token and cost accounting.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
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
        }

    # ---- per provider ------------------------------------------------------------------------------
    def _request(self, system: str, user: str) -> tuple[str, dict[str, str], dict[str, Any]]:
        """(url, headers, JSON body) of one request."""
        raise NotImplementedError

    def _parse(self, reply: dict[str, Any]) -> tuple[str, int, int]:
        """(text, input tokens, output tokens) of one reply."""
        raise NotImplementedError

    # ---- shared ------------------------------------------------------------------------------------
    def cache_key(self, system: str, user: str) -> str:
        body = {"provider": self.provider, "model": self.model, "system": system, "user": user,
                "max_tokens": self.max_tokens, "temperature": self.temperature}  # fmt: skip
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        """US dollars at the configured prices per million tokens."""
        return (input_tokens * self.price_in + output_tokens * self.price_out) / 1e6

    def complete(self, system: str, user: str) -> Completion:
        """One reply, from the cache when this exact request was answered before."""
        key = self.cache_key(system, user)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                with self._lock:
                    self.usage["cached"] += 1
                return Completion(hit[0], 0, 0, 0.0, True)  # nothing was billed
        url, headers, body = self._request(system, user)
        with self._slots:
            reply = self._post(url, headers, body)
        text, n_in, n_out = self._parse(reply)
        cost = self.cost(n_in, n_out)
        with self._lock:
            self.usage["requests"] += 1
            self.usage["input_tokens"] += n_in
            self.usage["output_tokens"] += n_out
            self.usage["cost_usd"] += cost
        if self.cache is not None:
            self.cache.put(key, text, n_in, n_out)
        return Completion(text, n_in, n_out, cost, False)

    def complete_many(self, prompts: Sequence[tuple[str, str]]) -> list[Completion]:
        """Replies to many (system, user) prompts, at most `concurrency` requests in flight, in order."""
        if len(prompts) <= 1:
            return [self.complete(*p) for p in prompts]
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(lambda p: self.complete(*p), prompts))

    def _post(self, url: str, headers: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps(body).encode()
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(
                url, data=data, headers={"content-type": "application/json", **headers}
            )
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode(errors="replace")
                if e.code not in RETRY_STATUS or attempt == self.retries:
                    raise MriError(
                        f"{self.provider} request to {url} failed: HTTP {e.code}: {detail}"
                    ) from None
                wait = self._wait(attempt, e.headers.get("retry-after"))
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                if attempt == self.retries:
                    raise MriError(f"{self.provider} endpoint {url} unreachable: {e}") from None
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

    def _parse(self, reply: dict[str, Any]) -> tuple[str, int, int]:
        try:
            text = reply["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError) as e:
            raise MriError(f"unexpected reply from {self.base_url}: {str(reply)[:200]}") from e
        usage = reply.get("usage") or {}
        return text, int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))


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

    def _parse(self, reply: dict[str, Any]) -> tuple[str, int, int]:
        try:
            text = "".join(b.get("text", "") for b in reply["content"] if b.get("type") == "text")
        except (KeyError, TypeError, AttributeError) as e:
            raise MriError(f"unexpected reply from {self.base_url}: {str(reply)[:200]}") from e
        usage = reply.get("usage") or {}
        return text, int(usage.get("input_tokens", 0)), int(usage.get("output_tokens", 0))


def make_client(provider: str, **kwargs: Any) -> ChatClient:
    """A client for 'openai' (or any compatible server via base_url) or 'anthropic'."""
    classes = {"openai": OpenAIClient, "anthropic": AnthropicClient}
    if provider not in classes:
        raise MriError(f"unknown LLM provider {provider!r}; use openai or anthropic")
    return classes[provider](**kwargs)
