"""`mri demo` end to end: every stage writes its part of the scan, and the web app serves the result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_builds_a_whole_scan_that_the_app_serves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi.testclient import TestClient

    from mri.demo import run_demo
    from mri.serve.app import create_app

    monkeypatch.setenv("MRI_CACHE", str(tmp_path / "cache"))
    scan = tmp_path / "scan"
    summary = run_demo(scan, tokens=16384)
    stages = summary["stages"]
    assert {"record", "decompose", "explain", "steer", "trace", "audit"} <= set(stages)
    assert stages["decompose"]["fvu"] < 0.5 and stages["explain"]["scored"] > 0
    assert json.loads((scan / "manifest.json").read_text())["kind"] == "scan"
    steer = json.loads((scan / "steer" / "concept.json").read_text())
    assert steer["tried"] and steer["best"]["strength"] > 0
    graph = json.loads((scan / "graphs" / "two-hop.json").read_text())
    assert graph["nodes"] and graph["links"]
    report = json.loads((scan / "audit" / "report.json").read_text())
    assert report["findings"][0]["confidence"] >= report["findings"][-1]["confidence"]

    client = TestClient(create_app(scan))
    assert client.get("/api/scan").status_code == 200
    page = client.get("/api/features", params={"limit": 5}).json()
    assert page["total"] > 0
    assert client.get(f"/api/features/{page['features'][0]['feature']}").status_code == 200
    assert [g["name"] for g in client.get("/api/graphs").json()] == ["two-hop.json"]
    assert client.get("/api/audit").status_code == 200
