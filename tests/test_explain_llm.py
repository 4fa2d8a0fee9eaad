"""LLM explainer and scorers against local servers that speak the OpenAI and Anthropic protocols."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from test_atlas_build import planted  # noqa: F401  (a fixture)

from mri.errors import MriError
from mri.explain import AnthropicClient, OpenAIClient, explain_atlas
from mri.explain import prompts as P

CONCEPT = " word"


def canned(system: str, user: str) -> str:
    """A perfect oracle for the planted " word" feature, reading the prompt the way a model would."""
    lines = re.findall(r"^(\d+)\. (.*)$", user, re.M)
    if system == P.EXPLAIN_SYSTEM:
        assert "<<" in user and ">>" in user  # activating tokens are highlighted
        return 'The highlighted tokens are all the same.\nExplanation: the token " word"'
    if system == P.DETECT_SYSTEM:
        return json.dumps([int(CONCEPT in text) for _, text in lines])
    if system == P.FUZZ_SYSTEM:
        return json.dumps([int(set(re.findall(r"<<(.*?)>>", t)) == {CONCEPT}) for _, t in lines])
    if system == P.SIMULATE_SYSTEM:
        tokens = json.loads(user.split(": ", 2)[2])
        return "Here: " + json.dumps([10 if t == CONCEPT else 0 for t in tokens])
    raise AssertionError(f"unexpected system prompt {system[:40]}")


class FakeLLM:
    """A stdlib HTTP server on 127.0.0.1 for one protocol; `fail` holds status codes to answer first."""

    def __init__(self, protocol: str, fail: list[int] | None = None, delay: float = 0.0):
        self.protocol, self.fail, self.delay = protocol, list(fail or []), delay
        self.requests: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                with fake.lock:
                    fake.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    status = fake.fail.pop(0) if fake.fail else 200
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                time.sleep(fake.delay)
                with fake.lock:
                    fake.in_flight -= 1
                if status != 200:
                    self.send_response(status)
                    self.send_header("retry-after", "0")
                    self.end_headers()
                    self.wfile.write(b'{"error": "injected"}')
                    return
                reply = fake.reply(self.path, self.headers, body)
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def reply(self, path, headers, body) -> dict:
        if self.protocol == "openai":
            assert path == "/v1/chat/completions" and headers["authorization"] == "Bearer test-key"
            system, user = (m["content"] for m in body["messages"])
            assert [m["role"] for m in body["messages"]] == ["system", "user"]
            text = canned(system, user)
            return {"choices": [{"message": {"role": "assistant", "content": text}}],
                    "usage": {"prompt_tokens": 100, "completion_tokens": 10}}  # fmt: skip
        assert path == "/v1/messages" and headers["x-api-key"] == "test-key"
        assert headers["anthropic-version"] == "2023-06-01" and body["max_tokens"] > 0
        assert [m["role"] for m in body["messages"]] == ["user"]
        text = canned(body["system"], body["messages"][0]["content"])
        return {
            "content": [{"type": "text", "text": text}],
            "usage": {"input_tokens": 50, "output_tokens": 5},
        }

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def options(url: str, **kw) -> dict:
    return {
        "base_url": url,
        "api_key": "test-key",
        "backoff_s": 0.001,
        "price_in": 1.0,
        "price_out": 2.0,
        **kw,
    }


def test_openai_explainer_and_scorers_with_retries_cache_and_costs(planted):  # noqa: F811
    _, _, _, atlas = planted
    with FakeLLM("openai", fail=[429, 500]) as server:
        rows = explain_atlas(
            atlas,
            explainer="openai",
            scorers=["detection", "fuzzing", "simulation"],
            features=[0],
            client_options=options(server.url + "/v1", model="m-test"),
            progress=False,
        ).to_pylist()
        sent = len(server.requests)
        assert {r["scorer"] for r in rows} == {"detection", "fuzzing", "simulation"}
        for r in rows:
            assert (
                r["label"] == 'the token " word"'
                and r["explainer"] == "openai"
                and r["explainer_model"] == "m-test"
            )
            assert r["score"] >= 0.9 and r["ci_low"] <= r["score"] <= r["ci_high"], r
            assert r["explain_input_tokens"] == 100 and r["explain_cost_usd"] == pytest.approx(120e-6)
            assert r["score_cost_usd"] == pytest.approx(
                (r["score_input_tokens"] + 2 * r["score_output_tokens"]) / 1e6
            )
        assert sum(r["score"] > 0 for r in rows) == 3 and all(
            server.requests[i]["body"]["model"] == "m-test" for i in range(sent)
        )
        cache = atlas.path / "llm-cache.sqlite"
        assert cache.is_file()
        again = explain_atlas(atlas, explainer="openai", scorers=["detection", "fuzzing", "simulation"], features=[0],
                              client_options=options(server.url + "/v1", model="m-test"), progress=False).to_pylist()  # fmt: skip
        assert len(server.requests) == sent  # every prompt answered from the cache
        assert [r["score"] for r in again] == [r["score"] for r in rows]
        assert all(r["explain_cost_usd"] == 0 and r["score_cost_usd"] == 0 for r in again)


def test_anthropic_protocol_and_retry_on_429():
    with FakeLLM("anthropic", fail=[429]) as server:
        client = AnthropicClient("claude-test", base_url=server.url, api_key="test-key", backoff_s=0.001)
        reply = client.complete(P.DETECT_SYSTEM, "Description: x\n\n1. a word here\n2. nothing")
        assert json.loads(reply.text) == [1, 0] and (reply.input_tokens, reply.output_tokens) == (50, 5)
        assert client.usage["retries"] == 1 and client.usage["requests"] == 1 and len(server.requests) == 2
        assert server.requests[-1]["body"]["model"] == "claude-test"


def test_errors_that_should_not_be_retried_and_giving_up():
    with FakeLLM("openai", fail=[400]) as server:
        client = OpenAIClient(base_url=server.url, api_key="test-key", backoff_s=0.001)
        with pytest.raises(MriError, match="HTTP 400"):
            client.complete("s", "u")
        assert len(server.requests) == 1
    with FakeLLM("openai", fail=[503] * 10) as server:
        client = OpenAIClient(base_url=server.url, api_key="test-key", backoff_s=0.001, retries=3)
        with pytest.raises(MriError, match="HTTP 503"):
            client.complete("s", "u")
        assert len(server.requests) == 4


def test_concurrency_limit_holds(tmp_path):
    with FakeLLM("openai", delay=0.05) as server:
        client = OpenAIClient(
            base_url=server.url + "/v1", api_key="test-key", concurrency=2, cache=tmp_path / "c.sqlite"
        )
        prompts = [(P.DETECT_SYSTEM, f"Description: d\n\n1. text {i}") for i in range(8)]
        replies = client.complete_many(prompts)
        assert [r.text for r in replies] == ["[0]"] * 8 and server.max_in_flight == 2
        assert client.usage["input_tokens"] == 800 and client.usage["cost_usd"] == 0.0
        assert len(client.cache) == 8


def test_reply_parsing():
    assert P.parse_explanation("blah\nExplanation: capital cities\n") == "capital cities"
    assert P.parse_explanation("just a phrase") == "just a phrase"
    assert P.parse_list("Answer: [1, 0, 1]", 3) == [1.0, 0.0, 1.0]
    assert P.parse_list("[1, 0] then [0, 0, 1]", 3) == [0.0, 0.0, 1.0]
    assert P.parse_list("[12, -1]", 2, hi=10) == [10.0, 0.0]
    assert P.parse_list("no list", 2) is None
