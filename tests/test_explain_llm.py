"""LLM explainer and scorers against local servers that speak the OpenAI and Anthropic protocols."""

from __future__ import annotations

import json
import math
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
    """A stdlib HTTP server on 127.0.0.1 for one protocol; `fail` holds status codes to answer first.

    `raw(system, user)` may replace a reply: bytes are sent as the whole 200 body (garbage, HTML, `{}`), a
    str as the text of a well-formed reply; None keeps the canned answer."""

    def __init__(self, protocol: str, fail: list[int] | None = None, delay: float = 0.0, raw=None):
        self.protocol, self.fail, self.delay, self.raw = protocol, list(fail or []), delay, raw
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
                data = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("content-type", "text/html" if data.startswith(b"<") else "application/json")
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
            text = self.raw(system, user) if self.raw else None
            if isinstance(text, bytes):
                return text
            text = canned(system, user) if text is None else text
            return {"choices": [{"message": {"role": "assistant", "content": text}}],
                    "usage": {"prompt_tokens": 100, "completion_tokens": 10}}  # fmt: skip
        assert path == "/v1/messages" and headers["x-api-key"] == "test-key"
        assert headers["anthropic-version"] == "2023-06-01" and body["max_tokens"] > 0
        assert [m["role"] for m in body["messages"]] == ["user"]
        text = self.raw(body["system"], body["messages"][0]["content"]) if self.raw else None
        if isinstance(text, bytes):
            return text
        text = canned(body["system"], body["messages"][0]["content"]) if text is None else text
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
    # a rambling reply without the asked-for line, an error page or nothing: no label, not its last line
    assert P.parse_explanation("I looked at the texts.\nThey vary a lot.") is None
    assert P.parse_explanation("<html><body>502 Bad Gateway</body></html>") is None
    assert P.parse_explanation("") is None and P.parse_explanation("Explanation:   ") is None
    assert P.parse_list("Answer: [1, 0, 1]", 3) == [1.0, 0.0, 1.0]
    assert P.parse_list("[1, 0] then [0, 0, 1]", 3) == [0.0, 0.0, 1.0]
    assert P.parse_list("[12, -1]", 2, hi=10) == [10.0, 0.0]
    assert P.parse_list("no list", 2) is None


GARBAGE = b"upstream hiccup, please retry"
HTML = b"<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body></html>"
ERROR = json.dumps({"error": {"message": "model overloaded", "type": "server_error"}}).encode()
MALFORMED = {"garbage text": GARBAGE, "empty object": b"{}", "error object": ERROR, "html page": HTML}


@pytest.mark.parametrize("protocol", ["openai", "anthropic"])
@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_a_malformed_200_reply_is_counted_not_raised_and_not_cached(protocol, kind, tmp_path):
    with FakeLLM(protocol, raw=lambda system, user: MALFORMED[kind]) as server:
        cls, url = (
            (OpenAIClient, server.url + "/v1") if protocol == "openai" else (AnthropicClient, server.url)
        )
        client = cls(base_url=url, api_key="test-key", cache=tmp_path / "c.sqlite", backoff_s=0.001)
        for _ in range(2):
            reply = client.complete(P.DETECT_SYSTEM, "Description: d\n\n1. text")
            assert reply.malformed and reply.text == "" and not reply.cached
        assert (
            client.usage["malformed"] == 2 and client.usage["requests"] == 2 and client.usage["retries"] == 0
        )
        assert len(client.cache) == 0 and len(server.requests) == 2  # asked again: nothing was cached


def test_a_run_survives_malformed_replies_and_counts_them_exactly(planted, tmp_path, monkeypatch):  # noqa: F811
    """Feature i's explanation comes back as a good reply, garbage text, `{}` and an HTML page; for the one
    feature with a label, the first detection batch is an `{"error": ...}` object and the first simulation
    reply a well-formed reply with no list in it. The run finishes; the counts are exact."""
    import shutil

    import pyarrow.parquet as pq
    import typer
    from typer.testing import CliRunner

    from mri.atlas import Atlas
    from mri.explain import feature_view
    from mri.explain.commands import explain as explain_command
    from mri.explain.report import read_floor_report

    _, _, _, shared = planted
    path = tmp_path / "atlas"
    shutil.copytree(shared.path, path)
    for name in ("llm-cache.sqlite", "explanations.parquet"):
        (path / name).unlink(missing_ok=True)
    explain_bodies = {1: GARBAGE, 2: b"{}", 3: HTML}
    first = {"detect": True, "simulate": True}

    def raw(system, user):
        if system == P.EXPLAIN_SYSTEM:
            feature = int(re.match(r"Examples of feature (\d+):", user).group(1))
            return explain_bodies.get(feature, f'Explanation: the token " word" (feature {feature})')
        assert "(feature 0)" in user  # only the labelled feature is scored
        if system == P.DETECT_SYSTEM and first["detect"]:
            first["detect"] = False
            return ERROR
        if system == P.SIMULATE_SYSTEM and first["simulate"]:
            first["simulate"] = False
            return "Sorry, I cannot predict activations for these tokens."
        return None

    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    app = typer.Typer()
    app.command()(explain_command)
    with FakeLLM("openai", raw=raw) as server:
        result = CliRunner().invoke(
            app,
            [str(path), "--explainer", "openai", "--base-url", server.url + "/v1", "--llm-model", "m-bad",
             "--scorer", "detection", "--scorer", "simulation", "--concurrency", "1"],
        )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "5 malformed LLM replies (explain 3, score 2)" in result.output

    rows = {(r["feature"], r["scorer"]): r for r in pq.read_table(path / "explanations.parquet").to_pylist()}
    assert len(rows) == 8
    for f in (1, 2, 3):  # no label rather than the raw reply, not scored, counted once per row
        for scorer in ("detection", "simulation"):
            r = rows[f, scorer]
            assert r["label"] is None and r["explain_malformed"] and r["malformed_replies"] == 1
            assert math.isnan(r["score"]) and math.isnan(r["ci_low"])
    view = feature_view(Atlas(path), 0)
    n_pos, n_neg = len(view.activating[:20]), len(view.non_activating[:20])
    det, sim = rows[0, "detection"], rows[0, "simulation"]
    assert det["label"] == 'the token " word" (feature 0)' and not det["explain_malformed"]
    assert det["malformed_replies"] == 1 and sim["malformed_replies"] == 1
    assert det["n_activating"] + det["n_non_activating"] == n_pos + n_neg - 5  # one batch of 5 left out
    assert (sim["n_activating"], sim["n_non_activating"]) == (n_pos - 1, n_neg)  # the first example left out
    assert det["score"] >= 0.9 and sim["score"] >= 0.9  # what could be read still scores the label
    report = read_floor_report(path)
    assert report["malformed_replies"] == {
        "total": 5,
        "explain": 3,
        "score": {"detection": 1, "simulation": 1},
        "unlabelled_features": 3,
    }
    assert report["scorers"]["detection"]["scored"] == 1 and report["explained"] == 4


def test_an_unreachable_endpoint_fails_fast_and_says_what_to_do(planted):  # noqa: F811
    import socket

    _, _, _, atlas = planted
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.perf_counter()
    with pytest.raises(MriError) as err:  # default retries (5) and backoff (1 s): 31 s if it backed off
        explain_atlas(atlas, explainer="openai", features=[0], progress=False,
                      client_options={"base_url": f"http://127.0.0.1:{port}/v1", "api_key": "k"})  # fmt: skip
    seconds = time.perf_counter() - started
    message = str(err.value)
    assert f"127.0.0.1:{port}/v1/chat/completions unreachable (" in message
    assert message.endswith("check --base-url, or use --explainer offline") and "\n" not in message
    assert seconds < 20, seconds
    client = OpenAIClient(base_url=f"http://127.0.0.1:{port}", api_key="k", backoff_s=0.01)
    with pytest.raises(MriError, match="unreachable"):
        client.complete("s", "u")
    assert client.usage["retries"] == 1  # a refusal is tried twice, not retries + 1 times
