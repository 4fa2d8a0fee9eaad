"""`mri demo` end to end: every stage runs and writes its part of the scan, each stage's wall time is
recorded, the web app serves the result, its graph's feature nodes open only their own transcoder's feature
pages, and its steering playground steers the demo's model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

STAGES = ("record", "decompose", "explain", "steer", "trace", "audit")


@pytest.mark.slow
def test_demo_builds_a_whole_scan_that_the_app_serves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastapi.testclient import TestClient

    from mri.atlas import Atlas
    from mri.demo import run_demo
    from mri.serve.app import create_app
    from mri.trace.export import IDENTITY, parse_node
    from mri.zoo.dictionaries import resolve

    monkeypatch.setenv("MRI_CACHE", str(tmp_path / "cache"))
    scan = tmp_path / "scan"
    summary = run_demo(scan, tokens=16384)
    stages = summary["stages"]
    assert set(STAGES) <= set(stages) and summary["skipped"] == []  # trace included: transcoders are shipped
    manifest = json.loads((scan / "manifest.json").read_text())
    assert manifest["kind"] == "scan" and manifest["timings"] == summary["timings"]
    timings = summary["timings"]
    assert all(timings[s] > 0 for s in (*STAGES, "load")) and timings["total"] == summary["seconds"]
    assert sum(timings[s] for s in (*STAGES, "load")) <= timings["total"] + 1e-6
    assert stages["decompose"]["fvu"] < 0.5 and stages["explain"]["scored"] > 0
    steer = json.loads((scan / "steer" / "concept.json").read_text())
    assert steer["tried"] and steer["best"]["strength"] > 0
    graph = json.loads((scan / "graphs" / "two-hop.json").read_text())
    assert graph["nodes"] and graph["links"]
    report = json.loads((scan / "audit" / "report.json").read_text())
    assert report["findings"][0]["confidence"] >= report["findings"][-1]["confidence"]

    client = TestClient(create_app(scan))
    info = client.get("/api/scan").json()
    assert set(STAGES) <= set(info["stages"]) and info["steer_example"] and info["audit"]
    page = client.get("/api/features", params={"limit": 5}).json()
    assert page["total"] > 0
    assert client.get(f"/api/features/{page['features'][0]['feature']}").status_code == 200
    assert [g["name"] for g in client.get("/api/graphs").json()] == ["two-hop.json"]
    assert client.get("/api/audit").json()["atlas"] == "atlas"  # the audit read the demo's SAE

    # every feature node opens its own transcoder's atlas, or nothing: never the SAE atlas of its layer
    identity = graph["metadata"]["info"][IDENTITY]
    ask = [{"layer": int(layer), **d} for layer, d in identity.items()]
    linked = {
        r["layer"]: r["atlas"] for r in client.post("/api/graph-atlases", json={"dictionaries": ask}).json()
    }
    shipped = {int(Atlas(scan / a).manifest["site"].split(".")[1]): a for a in stages["trace"]["atlases"]}
    features = [parse_node(n)[1] for n in graph["nodes"] if parse_node(n)[0] == "feature"]
    assert features and {layer for layer, _, _ in features} <= set(linked)
    for layer, _, latent in features:
        atlas = linked[layer]
        assert atlas is None or atlas == shipped[layer]
        if atlas is not None:
            Atlas(scan / atlas).check_dictionary(resolve("mri-base", "transcoders")[layer])  # MriError if not
            assert latent < Atlas(scan / atlas).n_features
    assert all(linked[layer] is not None for layer, _, _ in features)  # the demo built every one of them
    assert (
        sum(bool(n["clerp"]) for n in graph["nodes"] if parse_node(n)[0] == "feature") >= len(features) // 2
    )

    # the steering example, summarised for the Steer page and replayed through the playground
    example = client.get("/api/steer/example").json()["example"]
    assert example["feature"] == steer["best"]["feature"] and example["atlas"] == stages["steer"]["atlas"]
    body = {"prompt": example["examples"][0]["prompt"], "atlas": example["atlas"], "max_new_tokens": 24,
            "edits": [{"feature": example["feature"], "mode": "add", "strength": example["strength"]}]}  # fmt: skip
    out = client.post("/api/steer", json=body)
    assert out.status_code == 200, out.text
    texts = out.json()
    assert texts["steered"] and texts["unsteered"] and texts["steered"] != texts["unsteered"]
