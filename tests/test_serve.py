"""The web app's API over a real scan of the shipped mri-tiny organism: browsing agrees with the atlas files,
feature pages agree with `Atlas.feature`, steering agrees with `mri.steer.generate`, graphs and the audit
report are served as written, and their feature numbers link only to atlases of their own dictionaries;
paths stay inside the scan folder, every bound answers with a 4xx, and nothing loads from another host."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

import mri
from mri.atlas import Atlas, build_atlas
from mri.atlas.source import dictionary_fingerprint
from mri.data.corpus import sample_corpus
from mri.dictionaries import save
from mri.explain.run import explain_atlas
from mri.serve.app import STATIC, create_app
from mri.serve.paths import MAX_BODY_BYTES, MAX_NEW_TOKENS, OutsideRoot, inside
from mri.trace import ReplacementModel, atlas_labels, attribute, load_transcoders, write_graph
from mri.trace.export import IDENTITY
from mri.trace.toy import random_transcoders

PROMPT = "The capital of the region is"
CANARY = "canary-outside-the-scan-7f3c"
"""Written in a file beside (outside) the scan folder: no response may ever contain it."""


def circuit_tracer_style(data: dict) -> dict:
    """Our graph rewritten as circuit-tracer writes it: error nodes `0_{layer}_{pos}`, pinned ids as one
    comma-separated string, a supernode spanning two nodes, no `influence`/`activation` fields. (An error id
    that would collide with a layer-0 feature's, as circuit-tracer's can, keeps ours.)"""
    taken = {n["node_id"] for n in data["nodes"]}
    rename = {}
    for node in data["nodes"]:
        if node["node_id"].startswith("err_"):
            layer, pos = node["node_id"].split("_")[1:]
            if f"0_{layer}_{pos}" not in taken:
                rename[node["node_id"]] = f"0_{layer}_{pos}"
    nodes = []
    for node in data["nodes"]:
        node = {k: v for k, v in node.items() if k not in ("influence", "activation")}
        node["node_id"] = rename.get(node["node_id"], node["node_id"])
        nodes.append(node)
    links = [
        {
            **link,
            "source": rename.get(link["source"], link["source"]),
            "target": rename.get(link["target"], link["target"]),
        }
        for link in data["links"]
    ]
    features = [n["node_id"] for n in nodes if n["feature_type"] == "cross layer transcoder"]
    qparams = {
        **data["qParams"],
        "pinnedIds": ",".join(features[:2]),
        "supernodes": [["group", *features[:2]]],
    }
    # circuit-tracer's metadata has no mri `info`, so nothing says which dictionaries the graph was traced with
    metadata = {k: v for k, v in data["metadata"].items() if k != "info"} | {"slug": "circuit-tracer-style"}
    return {**data, "metadata": metadata, "nodes": nodes, "links": links, "qParams": qparams}


def build_scan(root: Path) -> Path:
    """A small real scan: random transcoders for both layers of mri-tiny saved under dicts/, an atlas of
    each (labelled by the offline explainer) under atlases/, a decoy atlas at layer 0 of another transcoder
    with the same config (other weights: latent i there is another feature), a traced graph under graphs/
    that records its transcoders' identities (plus the same graph in circuit-tracer's flavour of the schema,
    which records none), and a steering example of one transcoder feature under steer/ as `mri demo`
    writes it."""
    from mri.steer import neutral_prompts
    from mri.steer.concept_demo import concept_demo

    scan = root / "scan"
    model = mri.load("mri-tiny")
    paths, atlases = [], []
    for layer, coder in random_transcoders(model, n_latents=96, active=8).coders.items():
        paths.append(save(coder, scan / "dicts" / f"tc{layer}"))
        atlas = build_atlas(model, paths[-1], sample_corpus(), scan / "atlases" / f"L{layer}", tokens=1536,
                            ctx_len=64, progress=False)  # fmt: skip
        explain_atlas(atlas, limit=24, progress=False)
        atlases.append(atlas)
    decoy = save(
        random_transcoders(model, n_latents=96, active=8, seed=1).coders[0], scan / "dicts" / "decoy0"
    )
    build_atlas(model, decoy, sample_corpus(), scan / "atlases" / "decoy-L0", tokens=1024, ctx_len=64,
                progress=False)  # fmt: skip
    transcoders = load_transcoders(paths, model.n_layers)
    graph = attribute(PROMPT, ReplacementModel(model, transcoders), max_feature_nodes=60)
    labels = atlas_labels(atlases)
    path = write_graph(
        graph, scan / "graphs" / "capital.json", node_threshold=0.95, labels=labels, transcoders=transcoders
    )
    data = json.loads(path.read_text())
    (scan / "graphs" / "circuit-tracer.json").write_text(json.dumps(circuit_tracer_style(data)))
    steered = concept_demo(
        model, transcoders.coders[1], 3, neutral_prompts(3), strength=40.0, max_new_tokens=12
    )
    (scan / "steer").mkdir()
    example = {"best": steered, "passed": steered["passed"], "tried": [steered], "dictionary": str(paths[1]),
               "dictionary_fingerprint": dictionary_fingerprint(transcoders.coders[1])}  # fmt: skip
    (scan / "steer" / "concept.json").write_text(json.dumps(example))
    (root / "secret.txt").write_text(CANARY)
    (root / "secret.json").write_text(json.dumps({"secret": CANARY}))
    return scan


_BUILT: list[Path] = []
"""The scan, built once per session: the fuzz and browser tests import this fixture, and each importing
module would otherwise build its own."""


@pytest.fixture(scope="session")
def serve_scan(tmp_path_factory) -> Path:
    if not _BUILT:
        _BUILT.append(build_scan(tmp_path_factory.mktemp("serve")))
    return _BUILT[0]


@pytest.fixture(scope="session")
def client(serve_scan) -> TestClient:
    return TestClient(create_app(serve_scan))


def audited_copy(scan: Path, dest: Path) -> Path:
    """A copy of `scan` with a real audit report in audit/ (mri-tiny against itself, read through the
    layer-0 transcoder, a small config: about a second), written by `mri.audit.audit` as `mri audit` does,
    its inputs naming that transcoder; the ledger goes beside the copy."""
    import shutil

    from mri.audit import AuditConfig, audit
    from mri.dictionaries import load

    shutil.copytree(scan, dest)
    config = AuditConfig(kl_texts=2, prompts=4, new_tokens=6, carriers=2, candidates=4, confirm_prompts=2,
                         probes=False, lexicon="none")  # fmt: skip
    tc0 = load(dest / "dicts" / "tc0")
    inputs = {
        "dictionary": str((dest / "dicts" / "tc0").resolve()),
        "dictionary_fingerprint": dictionary_fingerprint(tc0),
    }
    model = mri.load("mri-tiny")
    audit(model, model, tc0, dest / "audit", config, ledger=dest.parent / "ledger.jsonl", inputs=inputs,
          log=lambda _: None)  # fmt: skip
    return dest


def test_scan_lists_atlases_graphs_and_no_audit(client):
    info = client.get("/api/scan").json()
    assert [a["id"] for a in info["atlases"]] == ["atlases/L0", "atlases/L1", "atlases/decoy-L0"]
    assert [a["layer"] for a in info["atlases"]] == [0, 1, 0]
    assert info["atlases"][1]["dictionary"] == "tc1" and info["graphs"] == 2 and info["audit"] is False
    assert info["steer_example"] is True
    assert client.get("/api/audit").json() == {"present": False, "report": None, "atlas": None}


def test_graph_nodes_link_only_to_the_atlas_of_their_own_transcoder(client, serve_scan):
    """The decoy atlas is at layer 0 with the layer-0 transcoder's config: only the fingerprint (config and
    weights) tells them apart, and a graph that records no identity (circuit-tracer's) links nowhere."""
    from mri.dictionaries import load

    graph = client.get("/api/graphs/capital.json").json()
    identity = graph["metadata"]["info"][IDENTITY]
    layers = {int(n["layer"]) for n in graph["nodes"] if n["feature_type"] == "cross layer transcoder"}
    assert layers == {0, 1}
    ask = [{"layer": int(k), **v} for k, v in identity.items()]
    got = {
        r["layer"]: r["atlas"] for r in client.post("/api/graph-atlases", json={"dictionaries": ask}).json()
    }
    assert got == {0: "atlases/L0", 1: "atlases/L1"}
    for layer, atlas in got.items():
        manifest = json.loads((serve_scan / atlas / "manifest.json").read_text())
        assert manifest["dictionary_fingerprint"] == dictionary_fingerprint(
            load(serve_scan / f"dicts/tc{layer}")
        )
    decoy = json.loads((serve_scan / "atlases/decoy-L0/manifest.json").read_text())
    assert decoy["dictionary_config"] == identity["0"]["config"]  # the same config: only weights differ
    # config alone cannot tell L0 from the decoy, so layer 0 gets no link; layer 1 has one candidate
    by_config = [{"layer": d["layer"], "config": d["config"]} for d in ask]
    got = client.post("/api/graph-atlases", json={"dictionaries": by_config}).json()
    assert {r["layer"]: r["atlas"] for r in got} == {0: None, 1: "atlases/L1"}
    other = [{**ask[0], "fingerprint": "0" * 32}]
    assert client.post("/api/graph-atlases", json={"dictionaries": other}).json() == [
        {"layer": 0, "atlas": None}
    ]
    assert (
        client.post(
            "/api/graph-atlases", json={"dictionaries": [{"layer": 0, "fingerprint": "../x"}]}
        ).status_code
        == 422
    )
    assert "info" not in client.get("/api/graphs/circuit-tracer.json").json()["metadata"]


def test_steer_example_is_summarised_with_the_atlas_of_its_dictionary(client, serve_scan):
    written = json.loads((serve_scan / "steer/concept.json").read_text())["best"]
    got = client.get("/api/steer/example").json()
    assert got["present"] and got["example"]["atlas"] == "atlases/L1"
    ex = got["example"]
    assert (ex["feature"], ex["mode"], ex["strength"]) == (3, "add", 40.0) and ex["dictionary"] == "tc1"
    assert ex["steered_rate"] == written["steered_rate"] and ex["unsteered_rate"] == written["unsteered_rate"]
    assert [e["prompt"] for e in ex["examples"]] == [e["prompt"] for e in written["examples"][:3]]
    assert ex["file"] == "steer/concept.json"
    assert TestClient(create_app(serve_scan / "atlases/L0")).get("/api/steer/example").json() == {
        "present": False,
        "example": None,
    }


def test_browse_pages_through_every_feature_once_in_order(client, serve_scan):
    density = pq.read_table(serve_scan / "atlases/L1/features.parquet").column("density").to_pylist()
    seen = []
    for page in range(3):
        body = client.get(
            "/api/features", params={"atlas": "atlases/L1", "offset": 40 * page, "limit": 40}
        ).json()
        assert body["total"] == 96
        seen += [r["feature"] for r in body["features"]]
    assert sorted(seen) == list(range(96))
    assert [density[f] for f in seen] == sorted(density, reverse=True)
    asc = client.get(
        "/api/features", params={"atlas": "atlases/L1", "sort": "feature", "order": "asc", "limit": 5}
    )
    assert [r["feature"] for r in asc.json()["features"]] == [0, 1, 2, 3, 4]


def test_search_by_token_label_number_and_density_matches_the_atlas(client, serve_scan):
    atlas = Atlas(serve_scan / "atlases/L0")
    f = atlas.feature(int(atlas.search(None, limit=1)[0]["feature"]))
    peak = f["examples"][0]["tokens"][f["examples"][0]["peak"]]
    body = client.get(
        "/api/features", params={"atlas": "atlases/L0", "q": peak.strip() or peak, "limit": 500}
    ).json()
    found = {r["feature"] for r in body["features"]}
    assert {r["feature"] for r in atlas.search(peak, limit=500)} <= found and f["feature"] in found
    assert all(
        r["label"]
        for r in client.get("/api/features", params={"atlas": "atlases/L0", "q": "fires on"}).json()[
            "features"
        ]
    )
    assert [
        r["feature"]
        for r in client.get("/api/features", params={"atlas": "atlases/L0", "q": "7"}).json()["features"]
    ].count(7) == 1
    window = client.get(
        "/api/features", params={"atlas": "atlases/L0", "min_density": 0.1, "max_density": 0.3, "limit": 500}
    ).json()
    want = atlas.sql("SELECT count(*) AS n FROM features WHERE density >= 0.1 AND density <= 0.3")[0]["n"]
    assert window["total"] == want and all(0.1 <= r["density"] <= 0.3 for r in window["features"])
    assert client.get("/api/features", params={"q": "%_\\'\""}).status_code == 200


def test_feature_page_agrees_with_the_atlas_reader(client, serve_scan):
    atlas = Atlas(serve_scan / "atlases/L1")
    for feature in (0, 17, 95):
        want = atlas.feature(feature)
        got = client.get(f"/api/features/{feature}", params={"atlas": "atlases/L1"}).json()
        assert got["density"] == want["density"] and got["hist"] == want["hist"]
        assert [t["token"] for t in got["logit_pos"]] == want["logit_pos_tokens"]
        assert [n["feature"] for n in got["neighbours"]] == [i for i in want["neighbour_ids"] if i >= 0]
        assert got["label"] == want["label"]
        key = lambda e: (e["kind"], e["rank"])  # noqa: E731
        assert [
            (e["kind"], e["context"], e["tokens"], e["peak"], e["band"])
            for e in sorted(got["examples"], key=key)
        ] == [
            (e["kind"], e["context"], e["tokens"], e["peak"], e["band"])
            for e in sorted(want["examples"], key=key)
        ]
    assert client.get("/api/features/96", params={"atlas": "atlases/L1"}).status_code == 404
    assert client.get("/api/features/0", params={"atlas": "nope"}).status_code == 404
    assert client.get("/api/features/-1").status_code == 422


def test_steering_matches_mri_steer_and_changes_the_text(client, serve_scan):
    from mri.dictionaries import load
    from mri.steer import FeatureEdit, Steering, generate

    info = client.get("/api/steer", params={"atlas": "atlases/L1"}).json()
    assert info["site"] == "blocks.1.hook_mlp_out" and info["scale"] > 0
    body = {"prompt": "The weather today", "atlas": "atlases/L1", "max_new_tokens": 12,
            "edits": [{"feature": 3, "mode": "add", "strength": 8 * info["scale"]}]}  # fmt: skip
    got = client.post("/api/steer", json=body).json()
    model = mri.load("mri-tiny")
    sae = load(serve_scan / "dicts/tc1")
    steering = Steering(model, [FeatureEdit(sae, 3, "add", 8 * info["scale"])], "all")
    assert (
        got["unsteered"] == generate(model, ["The weather today"], max_new_tokens=12, temperature=0).texts[0]
    )
    assert (
        got["steered"]
        == generate(model, ["The weather today"], steering, max_new_tokens=12, temperature=0).texts[0]
    )
    assert got["steered"] != got["unsteered"]
    zero = client.post("/api/steer", json={**body, "edits": [{"feature": 3, "strength": 0.0}]}).json()
    assert zero["steered"] == zero["unsteered"]


def test_limits_answer_with_4xx(client):
    base = {"prompt": "Hi", "edits": [{"feature": 0, "strength": 1.0}]}
    assert client.post("/api/steer", json={**base, "max_new_tokens": MAX_NEW_TOKENS + 1}).status_code == 422
    assert client.post("/api/steer", json={**base, "prompt": "x" * 5000}).status_code == 422
    assert client.post("/api/steer", json={**base, "edits": []}).status_code == 422
    assert (
        client.post("/api/steer", json={**base, "edits": [{"feature": 0, "strength": 1e9}]}).status_code
        == 422
    )
    assert client.post("/api/steer", json={**base, "edits": [{"feature": 10**6}]}).status_code == 404
    big = json.dumps({**base, "prompt": "x" * (MAX_BODY_BYTES + 1)})
    r = client.post("/api/steer", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "bytes" in r.json()["detail"]

    def chunks():
        for _ in range(MAX_BODY_BYTES // 1024 + 2):
            yield b" " * 1024

    r = client.post("/api/steer", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert client.get("/api/features", params={"limit": 501}).status_code == 422
    assert client.get("/api/features", params={"min_density": "nan"}).status_code == 422
    assert client.get("/api/features", params={"sort": "drop table"}).status_code == 422


def test_graphs_are_served_as_written(client, serve_scan):
    listed = {g["name"]: g for g in client.get("/api/graphs").json()}
    assert (
        set(listed) == {"capital.json", "circuit-tracer.json"} and listed["capital.json"]["prompt"] == PROMPT
    )
    got = client.get("/api/graphs/capital.json")
    assert got.json() == json.loads((serve_scan / "graphs/capital.json").read_text())
    assert client.get("/api/graphs/missing.json").status_code == 404
    assert client.get("/api/graphs/..%2Fdicts%2Ftc0%2Fconfig.json").status_code in (403, 404)


@pytest.mark.parametrize(
    "path",
    ["../secret.txt", "..%2Fsecret.txt", "%2E%2E/secret.json", "atlases/../../secret.txt", "/etc/passwd",
     "%2Fetc%2Fpasswd", "..\\secret.txt", "atlases/%00/x.json", ".hidden.json", "dicts/tc0/dictionary.safetensors"],
)  # fmt: skip
def test_files_outside_the_scan_or_not_plain_are_refused(client, path):
    r = client.get(f"/api/files/{path}")
    assert r.status_code in (403, 404) and CANARY not in r.text


def test_files_inside_the_scan_are_served_sandboxed(client, serve_scan):
    r = client.get("/api/files/atlases/L0/manifest.json")
    assert r.status_code == 200 and r.json()["kind"] == "atlas"
    assert "sandbox" in r.headers["content-security-policy"]
    assert client.get("/api/files/atlases/L0/features.parquet").status_code == 404
    # a name longer than the OS allows (found by the fuzzer: it was an OSError, a 500)
    assert client.get("/api/files/" + "\u0130" * 200).status_code == 403
    assert client.get("/api/graphs/" + "a" * 300 + ".json").status_code == 422  # its name pattern


def test_symlink_out_of_the_scan_is_refused(serve_scan, tmp_path):
    link = serve_scan / "graphs" / "escape.json"
    os.symlink(serve_scan.parent / "secret.json", link)
    try:
        c = TestClient(create_app(serve_scan))
        for url in ("/api/graphs/escape.json", "/api/files/graphs/escape.json"):
            r = c.get(url)
            assert r.status_code == 403 and CANARY not in r.text
        assert "escape.json" in [g["name"] for g in c.get("/api/graphs").json()]
    finally:
        link.unlink()


@given(
    st.lists(
        st.sampled_from(["..", ".", "", "a", "graphs", "%2e", "/", "\\", "~", "c:", "..%2f", "\x00"]),
        max_size=6,
    )
)
@settings(max_examples=200, deadline=None)
def test_inside_never_resolves_outside(parts):
    root = Path(__file__).parent
    relative = "/".join(parts)
    try:
        target = inside(root, relative)
    except OutsideRoot:
        return
    assert target.is_relative_to(root.resolve())


def test_audit_report_links_features_to_the_atlas_of_its_dictionary(serve_scan, tmp_path):
    from mri.audit.report import read_report

    scan = audited_copy(serve_scan, tmp_path / "audited")
    got = TestClient(create_app(scan)).get("/api/audit").json()
    assert got["present"] and got["atlas"] == "atlases/L0"
    assert got["report"]["kind"] == "audit-report" and got["report"]["findings"]
    assert [f["kind"] for f in got["report"]["findings"]] == [
        f["kind"] for f in read_report(scan / "audit")["findings"]
    ]


def test_audit_report_is_served_when_present(tmp_path):
    scan = tmp_path / "scan"
    (scan / "audit").mkdir(parents=True)
    report = {
        "title": "Audit of mri-tiny",
        "findings": [{"title": "x", "severity": "high", "score": float("nan")}],
    }
    (scan / "audit" / "report.json").write_text(json.dumps(report))
    got = TestClient(create_app(scan)).get("/api/audit").json()
    assert (
        got["present"]
        and got["atlas"] is None
        and got["report"]["findings"][0]
        == {
            "title": "x",
            "severity": "high",
            "score": None,
        }
    )


def test_hosts_headers_and_front_end(client):
    assert client.get("/api/scan", headers={"host": "evil.example"}).status_code == 400
    r = client.get("/")
    assert r.status_code == 200 and "/static/app.js" in r.text
    assert (
        "default-src 'self'" in r.headers["content-security-policy"]
        and r.headers["x-frame-options"] == "DENY"
    )
    assert client.get("/static/..%2Fapp.py").status_code in (403, 404)
    spec = client.get("/openapi.json").json()
    assert {
        "/api/features",
        "/api/features/{feature}",
        "/api/steer",
        "/api/steer/example",
        "/api/graph-atlases",
        "/api/graphs/{name}",
        "/api/audit",
    } <= set(spec["paths"])


def test_no_cdn_docs_and_nothing_served_from_another_host(client):
    """FastAPI's /docs and /redoc load Swagger UI and ReDoc from a CDN, which the CSP blanks: they are off,
    the spec stays, and no page or script the app serves names another host (the SVG namespace URI is an
    identifier, never fetched)."""
    import re

    for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        assert client.get(path).status_code == 404
    assert client.get("/openapi.json").json()["info"]["title"] == "mri"
    served = {"/": client.get("/").text}
    served |= {
        f"/static/{p.name}": client.get(f"/static/{p.name}").text for p in STATIC.iterdir() if p.is_file()
    }
    assert {"/", "/static/index.html", "/static/app.js", "/static/graph.js", "/static/app.css"} <= set(served)
    for path, text in served.items():
        text = text.replace("http://www.w3.org/2000/svg", "")
        assert "cdn." not in text.lower() and not re.search(r"https?://", text), path
        assert not re.search(r"""["'`]/(docs|redoc)\b""", text), path  # no link to the CDN pages


def test_cli_registers_serve():
    from typer.testing import CliRunner

    from mri.cli import _app

    result = CliRunner().invoke(_app, ["serve", "--help"])
    assert result.exit_code == 0 and "127.0.0.1" in result.output
