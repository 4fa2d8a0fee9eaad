"""The API fuzzed from its own OpenAPI spec (schemathesis): no request, valid or not, gets a 500 or any
byte of a file outside the scan folder."""

from __future__ import annotations

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from test_serve import CANARY, serve_scan  # noqa: F401  (serve_scan is a fixture)

from mri.serve.app import create_app

EXAMPLES = {"POST /api/steer": 15, "GET /api/steer": 5}
"""Examples per operation where fewer than the default 40 will do (each steering example generates twice)."""


@pytest.mark.slow
def test_api_fuzzed_from_its_spec_never_fails_or_leaks(serve_scan):  # noqa: F811
    app = create_app(serve_scan)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    names = {f"{op.method.upper()} {op.path}" for op in operations}
    assert {
        "GET /api/features",
        "GET /api/features/{feature}",
        "POST /api/steer",
        "GET /api/files/{path}",
    } <= names
    TestClient(app).get("/api/steer")  # load the model once, outside the per-request timeout
    statuses: dict[str, dict[int, int]] = {}
    for op in operations:
        fuzz(op, statuses)
    assert all(code < 500 for counts in statuses.values() for code in counts), statuses
    assert any(code == 200 for code in statuses["POST /api/steer"]), statuses


def fuzz(op, statuses: dict[str, dict[int, int]]) -> None:
    """Call one operation with schemathesis's generated cases; count the status codes."""
    name = f"{op.method.upper()} {op.path}"

    @given(case=op.as_strategy())
    @settings(
        max_examples=EXAMPLES.get(name, 40),
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(case):
        response = case.call(timeout=120)
        counts = statuses.setdefault(name, {})
        counts[response.status_code] = counts.get(response.status_code, 0) + 1
        case.validate_response(response, checks=[not_a_server_error])
        assert CANARY not in response.text, f"{name} served a file outside the scan"

    check()
