"""The app as a person uses it, in headless Chromium (Debian's, driven by Playwright): search a feature, open
its page, move a steering slider and get a generation, replay the scan's steering example, open a graph,
hover and click a node, pin it and follow it to its own transcoder's feature page, load a circuit-tracer
graph file (which names no dictionary, so its nodes link nowhere) and merge its supernodes, list the API's
endpoints, and read an audit report's findings and evidence. Screenshots of each step are saved (the
folder is printed)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import threading
import time

import pytest
from test_serve import audited_copy, serve_scan  # noqa: F401  (a fixture)

from mri.atlas import Atlas
from mri.serve.app import create_app, free_port


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs it (apt-get install -y chromium)")
        pytest.skip("needs Debian's chromium (apt-get install -y chromium)")
    return path


@contextlib.contextmanager
def running(scan):
    """The app over `scan` under uvicorn on 127.0.0.1 at a free port, in a thread; yields its URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(scan), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def live(serve_scan):  # noqa: F811
    with running(serve_scan) as url:
        yield url


@pytest.fixture(scope="module")
def audited(serve_scan, tmp_path_factory):  # noqa: F811
    """A copy of the scan with a real audit report, served; yields (folder, URL)."""
    scan = audited_copy(serve_scan, tmp_path_factory.mktemp("audited") / "scan")
    with running(scan) as url:
        yield scan, url


@pytest.mark.slow
def test_a_person_browses_steers_and_traces(live, audited, serve_scan, tmp_path):  # noqa: F811
    from playwright.sync_api import expect, sync_playwright

    shots = tmp_path / "screenshots"
    shots.mkdir()
    atlas = Atlas(serve_scan / "atlases/L0")
    feature = atlas.feature(int(atlas.search(None, limit=1)[0]["feature"]))
    peak = feature["examples"][0]["tokens"][feature["examples"][0]["peak"]].strip()
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("console", lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None)
        page.set_default_timeout(60_000)

        page.goto(live)
        page.wait_for_selector("body[data-ready]")
        expect(page.locator("#total")).to_have_text(re.compile(r"^96 matches"))
        page.fill("#search", peak)
        expect(page.locator("#total")).not_to_have_text(re.compile(r"^96 "))
        link = page.locator("#features tbody a", has_text=re.compile(rf"^{feature['feature']}$"))
        expect(link).to_have_count(1)
        page.screenshot(path=shots / "1-search.png")

        link.click()
        expect(page.locator("#feature-title")).to_have_text(f"Feature {feature['feature']}")
        expect(page.locator("#histogram rect").first).to_be_visible()
        expect(page.locator(".examples.top .ex")).to_have_count(
            sum(e["kind"] == "top" for e in feature["examples"])
        )
        page.screenshot(path=shots / "2-feature.png", full_page=True)

        page.click("#steer-link")
        slider = page.locator(".strength").first
        expect(slider).to_be_enabled()
        expect(page.locator(".feature-label")).to_contain_text(f"#{feature['feature']}")
        slider.focus()
        slider.press("End")  # the slider to its largest strength, as a keyboard user moves it
        expect(page.locator(".strength-value")).to_have_text(re.compile(r"^8×"))
        expect(page.locator("#steered")).not_to_be_empty()
        expect(page.locator("#steer-status")).to_contain_text("tokens in")
        steered, plain = page.inner_text("#steered"), page.inner_text("#unsteered")
        assert steered.startswith("The weather today") and steered != plain
        page.screenshot(path=shots / "3-steer.png")

        # the scan's steering example: its figures and samples, then replayed at its exact strength
        example = page.locator("#steer-example")
        expect(example).to_contain_text("#3")
        expect(example).to_contain_text("add at strength 40")
        expect(example.locator(".steer-sample")).to_have_count(2)
        page.click("#steer-example-load")
        expect(page.locator(".feature-label")).to_contain_text("#3")
        assert "atlas=atlases%2FL1" in page.url
        expect(page.locator(".strength-value")).to_have_text("40.00 (the example's strength)")
        page.click("#generate")
        expect(page.locator("#steer-status")).to_contain_text("tokens in")
        assert page.inner_text("#steered") != page.inner_text("#unsteered")
        page.screenshot(path=shots / "3b-steer-example.png", full_page=True)

        page.click("nav a[data-nav=graphs]")
        page.click("#graphs a[href='#/graph/capital.json']")
        node = page.locator("#graph-svg .node.feature").first
        expect(node).to_be_visible()
        node.hover()
        expect(page.locator(".tooltip")).to_be_visible()
        expect(page.locator("#graph-svg.hovering")).to_have_count(1)
        page.screenshot(path=shots / "4-graph-hover.png")
        node_id = node.get_attribute("data-id")
        node.click()
        expect(page.locator("#node-detail")).to_contain_text(node_id)
        page.click("#pin")
        expect(page.locator("#pinned h3")).to_have_text("Pinned (1)")
        expect(page.locator(f"#graph-svg .node.pinned[data-id='{node_id}']")).to_have_count(1)
        page.screenshot(path=shots / "5-graph-click.png")
        layer, latent, _ = node_id.split("_")
        expect(page.locator("#open-feature")).to_contain_text(f"(atlases/L{layer})")  # never the decoy
        page.click("#open-feature")
        expect(page.locator("#feature-title")).to_have_text(f"Feature {latent}")
        assert f"atlas=atlases%2FL{layer}" in page.url

        page.goto(live + "#/graphs")
        page.set_input_files("#graph-file", serve_scan / "graphs" / "circuit-tracer.json")
        expect(page.locator("#supernodes h3")).to_have_text("Supernodes (1)")
        expect(page.locator("#pinned h3")).to_have_text("Pinned (2)")
        expect(page.locator("#graph-svg .node.error").first).to_be_visible()
        page.locator("#graph-svg .node.feature").first.click()  # the file names no dictionary: no link
        expect(page.locator("#no-feature-page")).to_have_text("no atlas of this transcoder in this scan")
        expect(page.locator("#open-feature")).to_have_count(0)
        page.check("#merge-supernodes")
        expect(page.locator("#graph-svg .node[data-kind=supernode]")).to_have_count(1)
        page.screenshot(path=shots / "6-circuit-tracer-graph.png")

        page.click("nav a[data-nav=audit]")
        expect(page.locator("#no-audit")).to_be_visible()

        page.click("footer a[href='#/api']")
        expect(page.locator("#endpoints .endpoint", has_text="/api/graph-atlases")).to_have_count(1)
        expect(page.locator("#endpoints .endpoint", has_text="/api/features/{feature}")).to_have_count(1)
        page.screenshot(path=shots / "7-api.png")

        # a scan with an audit report: every finding with its evidence, features linked to their atlas
        folder, url = audited
        report = json.loads((folder / "audit" / "report.json").read_text())
        page.goto(url + "#/audit")
        expect(page.locator("#findings .finding")).to_have_count(len(report["findings"]))
        first = page.locator("#findings .finding").first
        expect(first).to_contain_text(report["findings"][0]["title"])
        expect(first.locator(".evidence")).to_contain_text("kl_ratio")
        expect(page.locator("#audit-features")).to_contain_text("atlases/L0")
        links = page.locator("#findings a[href^='#/feature/']")
        expect(links.first).to_be_visible()
        assert all("atlas=atlases%2FL0" in h for h in links.evaluate_all("els => els.map(e => e.href)"))
        page.screenshot(path=shots / "8-audit.png", full_page=True)
        browser.close()
    print(f"screenshots: {shots}")
    assert sorted(p.name for p in shots.iterdir()) == [
        "1-search.png",
        "2-feature.png",
        "3-steer.png",
        "3b-steer-example.png",
        "4-graph-hover.png",
        "5-graph-click.png",
        "6-circuit-tracer-graph.png",
        "7-api.png",
        "8-audit.png",
    ]
    assert not problems, problems
